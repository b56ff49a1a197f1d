//! Parameter-efficient fine-tuning in `rustspeed train`: LoRA from flags, a PEFT
//! adapter_config.json or an existing adapter, over a dense or quantized (QLoRA) base; or
//! PEFT's prompt learning (prompt tuning, P-tuning, prefix tuning) from `--num-virtual-tokens`,
//! a config or an adapter. The output is a PEFT adapter directory (and for LoRA a merged model
//! with `--merge`).

use std::path::{Path, PathBuf};

use rustspeed_kernels::Float;
use rustspeed_models::loader::{load_model_tuned, model_config};
use rustspeed_models::peft::prompt::init_prompt_from_tokens;
use rustspeed_models::peft::{
    self, config::target_modules_from_flag, AdapterKind, LoraConfig, PromptInit, PromptTuningConfig,
};
use rustspeed_models::tokenizer::Tokenizer;
use rustspeed_models::{Model, Tuning};

use super::Args;
use crate::commands::quantize::{check_quant_flags, quant_config};
use crate::exit::UsageError;

/// The tuning the flags ask for; `None` for full fine-tuning.
pub fn tuning_from_args(args: &Args) -> anyhow::Result<Option<Tuning>> {
    check_quant_flags(
        args.quantize.as_deref(),
        args.double_quant,
        args.compute_dtype.as_deref(),
    )?;
    let flags_given = args.lora_r.is_some()
        || args.lora_alpha.is_some()
        || args.lora_dropout.is_some()
        || args.lora_target_modules.is_some();
    let sources = [
        args.peft_config.is_some(),
        args.adapter.is_some(),
        flags_given,
        args.num_virtual_tokens.is_some(),
    ];
    if sources.iter().filter(|&&s| s).count() > 1 {
        return Err(UsageError(
            "give the adapter one way: --lora-* flags, --num-virtual-tokens N, --peft-config FILE, or --adapter DIR (whose adapter_config.json is used)"
                .into(),
        )
        .into());
    }
    let usage = |e: peft::PeftError| UsageError(e.to_string());
    let config_path = args.peft_config.as_ref().or(args.adapter.as_ref());
    let prompt = match config_path {
        Some(path) => match adapter_kind(path)? {
            AdapterKind::Lora => None,
            AdapterKind::Prompt(_) => Some(PromptTuningConfig::from_path(path).map_err(usage)?),
        },
        None => args
            .num_virtual_tokens
            .map(|n| PromptTuningConfig::new(n as usize)),
    };
    if let Some(mut config) = prompt {
        if let Some(dir) = &args.adapter {
            if config.has_encoder() {
                return Err(UsageError(format!(
                    "not supported yet: --adapter {}: continuing a {} adapter{} (PEFT saves only the encoder's output, not the encoder, and refuses to train a loaded prompt-learning adapter too); start a new one with --peft-config",
                    dir.display(),
                    config.kind.peft_type(),
                    if config.prefix_projection { " with prefix_projection" } else { "" },
                ))
                .into());
            }
            // The saved rows are the trained parameter: prompt tuning or a plain prefix.
            config.saved_form = true;
        }
        return prompt_tuning(args, config).map(Some);
    }
    let lora = if let Some(path) = config_path {
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
            .with_quantization(quant_config(
                q,
                args.double_quant,
                args.compute_dtype.as_deref(),
            )?)
            .map_err(usage)?;
    }
    Ok(Some(tuning))
}

/// Which method the adapter_config.json at `path` (a file or a directory) describes.
fn adapter_kind(path: &Path) -> anyhow::Result<AdapterKind> {
    let file = if path.is_dir() {
        path.join(peft::adapter::CONFIG_FILE)
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| UsageError(format!("cannot read {}: {e}", file.display())))?;
    peft::adapter_kind(&file.display().to_string(), &text)
        .map_err(|e| UsageError(e.to_string()).into())
}

/// Prompt learning: refuses what cannot go with it, then resolves the config on the model.
fn prompt_tuning(args: &Args, config: PromptTuningConfig) -> anyhow::Result<Tuning> {
    let method = config.kind.peft_type();
    if let Some(q) = &args.quantize {
        return Err(UsageError(format!(
            "not supported yet: --quantize {q} with {method} (rustspeed quantizes a base only under LoRA)"
        ))
        .into());
    }
    if args.merge {
        return Err(UsageError(format!(
            "--merge needs LoRA: a {method} adapter has no weights to merge into the model"
        ))
        .into());
    }
    if args.from_scratch {
        return Err(UsageError(format!(
            "--from-scratch with {method}: prompt learning adapts a pretrained base"
        ))
        .into());
    }
    let cfg = model_config(&args.model)?;
    Tuning::prompt(config, &cfg).map_err(|e| UsageError(e.to_string()).into())
}

/// The base with adapters attached (LoRA: A random as PEFT, B zero; prompt learning: as
/// `prompt_tuning_init` says), or the adapter of `--adapter`.
pub fn load_tuned<T: Float>(args: &Args, tuning: &Tuning) -> anyhow::Result<Model<T>> {
    let loaded = load_model_tuned::<T>(&args.model, tuning, args.seed)?;
    let mut model = loaded.model;
    if let Some(dir) = &args.adapter {
        peft::load_adapter(dir, &mut model)?;
    } else if let Some(c) = tuning
        .prompt_config()
        .filter(|c| c.init == PromptInit::Text)
    {
        let text = c
            .init_text
            .as_deref()
            .expect("checked when the config was read");
        let tokenizer =
            init_tokenizer(args, c.tokenizer_name_or_path.as_deref(), loaded.tokenizer)?;
        let ids = tokenizer.encode(text, true)?;
        init_prompt_from_tokens(&mut model, &ids)?;
    }
    eprintln!("{}", peft::adapter::param_counts(&model));
    Ok(model)
}

/// The tokenizer of `prompt_tuning_init_text`: `tokenizer_name_or_path` when it is a local
/// directory, else the base model's (PEFT would fetch a hub name; rustspeed reads no hub).
fn init_tokenizer(
    args: &Args,
    name: Option<&str>,
    base: Option<Tokenizer>,
) -> anyhow::Result<Tokenizer> {
    if let Some(dir) = name.map(PathBuf::from).filter(|p| p.is_dir()) {
        return Ok(Tokenizer::from_dir(&dir)?);
    }
    if let Some(name) = name {
        tracing::warn!(
            "tokenizer_name_or_path {name:?} is not a local directory: tokenizing prompt_tuning_init_text with {}'s tokenizer",
            args.model.display()
        );
    }
    base.ok_or_else(|| {
        UsageError(format!(
            "prompt_tuning_init TEXT needs a tokenizer: {} has none and tokenizer_name_or_path names no local directory",
            args.model.display()
        ))
        .into()
    })
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
