//! `--quantize FORMAT [--double-quant] [--compute-dtype D]`, shared by `train` and `eval`.

use rustspeed_kernels::quant::{QuantConfig, QuantFormat};
use rustspeed_kernels::DType;

use crate::exit::UsageError;

/// The quantization `--quantize FORMAT [--double-quant] [--compute-dtype D]` asks for.
pub fn quant_config(
    format: &str,
    double_quant: bool,
    compute_dtype: Option<&str>,
) -> Result<QuantConfig, UsageError> {
    let compute = compute_dtype.map(parse_compute_dtype).transpose()?;
    Ok(base_config(format, double_quant)?.with_compute_dtype(compute))
}

/// `--double-quant` and `--compute-dtype` qualify `--quantize`; alone they would do nothing.
pub fn check_quant_flags(
    quantize: Option<&str>,
    double_quant: bool,
    compute_dtype: Option<&str>,
) -> Result<(), UsageError> {
    if quantize.is_some() {
        return Ok(());
    }
    if double_quant {
        return Err(UsageError("--double-quant needs --quantize nf4|fp4".into()));
    }
    if let Some(d) = compute_dtype {
        return Err(UsageError(format!(
            "--compute-dtype {d} needs --quantize nf4|fp4|int8 (it is the quantized layers' compute dtype; the model's dtype comes from the DeepSpeed config)"
        )));
    }
    Ok(())
}

/// bitsandbytes' `bnb_4bit_compute_dtype` spellings.
fn parse_compute_dtype(s: &str) -> Result<DType, UsageError> {
    match s.to_ascii_lowercase().trim_start_matches("torch.") {
        "f32" | "fp32" | "float32" | "float" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
        _ => Err(UsageError(format!(
            "--compute-dtype {s}: expected f32, bf16 or f16 (also float32, bfloat16, float16)"
        ))),
    }
}

fn base_config(format: &str, double_quant: bool) -> Result<QuantConfig, UsageError> {
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
