//! `--quantize FORMAT [--double-quant]`, shared by `train` and `eval`.

use rustspeed_kernels::quant::{QuantConfig, QuantFormat};

use crate::exit::UsageError;

/// The quantization `--quantize FORMAT [--double-quant]` asks for.
pub fn quant_config(format: &str, double_quant: bool) -> Result<QuantConfig, UsageError> {
    let parsed: QuantFormat = format
        .parse()
        .map_err(|e| UsageError(format!("--quantize {format}: {e}")))?;
    Ok(match parsed {
        QuantFormat::Nf4 => QuantConfig::nf4(double_quant),
        QuantFormat::Fp4 => QuantConfig::fp4(double_quant),
        QuantFormat::Int8 if double_quant => {
            return Err(UsageError(
                "--double-quant applies to nf4 and fp4 only".into(),
            ))
        }
        QuantFormat::Int8 => QuantConfig::int8(),
    })
}
