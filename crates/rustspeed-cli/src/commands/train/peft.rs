//! Parameter-efficient fine-tuning in `rustspeed train`: LoRA from flags, a PEFT
//! adapter_config.json or an existing adapter, over a dense or quantized (QLoRA) base; the
//! output is a PEFT adapter directory (and a merged model with `--merge`).

use std::path::Path;

use rustspeed_kernels::Float;
use rustspeed_models::loader::{load_model_tuned, model_config};
use rustspeed_models::peft::{self, config::target_modules_from_flag, LoraConfig};
use rustspeed_models::{Model, Tuning};

use super::Args;
use crate::commands::quantize::quant_config;
use crate::exit::UsageError;

/// The tuning the flags ask for; `None` for full fine-tuning.
pub fn tuning_from_args(args: &Args) -> anyhow::Result<Option<Tuning>> {
    let flags_given = args.lora_r.is_some()
        || args.lora_alpha.is_some()
        || args.lora_dropout.is_some()
        || args.lora_target_modules.is_some();
    let sources = [
        args.peft_config.is_some(),
        args.adapter.is_some(),
        flags_given,
    ];
    if sources.iter().filter(|&&s| s).count() > 1 {
        return Err(UsageError(
            "give LoRA one way: --lora-* flags, --peft-config FILE, or --adapter DIR (whose adapter_config.json is used)"
                .into(),
        )
        .into());
    }
    let usage = |e: peft::PeftError| UsageError(e.to_string());
    let lora = if let Some(path) = args.peft_config.as_ref().or(args.adapter.as_ref()) {
        Some(LoraConfig::from_path(path).map_err(usage)?)
    } else if flags_given {
        let d = LoraConfig::default();
        Some(LoraConfig {
            r: args.lora_r.unwrap_or(d.r),
            lora_alpha: args.lora_alpha.unwrap_or(d.lora_alpha),
            lora_dropout: args.lora_dropout.unwrap_or(d.lora_dropout),
            target_modules: args
                .lora_target_modules
                .as_deref()
                .map(target_modules_from_flag),
            ..d
        })
    } else {
        None
    };
    let Some(lora) = lora else {
        if args.quantize.is_some() {
            return Err(UsageError(
                "--quantize: a quantized base trains only through adapters; add --lora-r (or --peft-config / --adapter)".into(),
            )
            .into());
        }
        if args.merge {
            return Err(UsageError(
                "--merge needs LoRA (--lora-r, --peft-config or --adapter)".into(),
            )
            .into());
        }
        return Ok(None);
    };
    if args.from_scratch {
        return Err(UsageError(
            "--from-scratch with LoRA: adapters fine-tune a pretrained base".into(),
        )
        .into());
    }
    let cfg = model_config(&args.model)?;
    let mut tuning = Tuning::lora(lora, &cfg).map_err(usage)?;
    if let Some(q) = &args.quantize {
        tuning = tuning
            .with_quantization(quant_config(q, args.double_quant)?)
            .map_err(usage)?;
    }
    Ok(Some(tuning))
}

/// The base with adapters attached (A random as PEFT, B zero), or the adapter of `--adapter`.
pub fn load_tuned<T: Float>(args: &Args, tuning: &Tuning) -> anyhow::Result<Model<T>> {
    let mut model = load_model_tuned::<T>(&args.model, tuning, args.seed)?.model;
    if let Some(dir) = &args.adapter {
        peft::load_adapter(dir, &mut model)?;
    }
    eprintln!("{}", peft::adapter::param_counts(&model));
    Ok(model)
}

/// `final/` as a PEFT adapter; with `--merge`, `merged/` as a full HF model.
pub fn export_adapter<T: Float>(
    args: &Args,
    model: &Model<T>,
    final_dir: &Path,
) -> anyhow::Result<()> {
    let base = args.model.to_string_lossy().into_owned();
    peft::save_adapter(final_dir, model, Some(&base))?;
    if args.merge {
        if !args.model.is_dir() {
            return Err(UsageError(format!(
                "not supported yet: --merge with a {} base (merge needs an HF directory)",
                args.model.display()
            ))
            .into());
        }
        let merged = args.output_dir.join("merged");
        peft::merge::merge_adapter_dir(&args.model, final_dir, &merged, T::DTYPE)?;
        eprintln!("merged model: {}", merged.display());
    }
    Ok(())
}
