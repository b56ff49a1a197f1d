//! `rustspeed merge-lora`: folds a PEFT LoRA adapter into its base model and writes a plain HF
//! model directory (PEFT's `merge_and_unload()` + `save_pretrained`), the same files
//! `rustspeed train --merge` writes next to `final/`.

use std::path::PathBuf;

use rustspeed_kernels::DType;
use rustspeed_models::peft::merge::merge_adapter_dir;
use rustspeed_models::peft::PeftError;

use crate::exit::UsageError;

#[derive(clap::Args)]
pub struct Args {
    /// The base model: an HF directory (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// The PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write the merged HF model directory.
    #[arg(long)]
    pub output: PathBuf,
    /// Dtype of the written weights (default: the base's `torch_dtype`, else f32). The merge
    /// itself is computed in f32 and rounded once.
    #[arg(long, value_enum)]
    pub dtype: Option<MergeDtype>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum MergeDtype {
    F16,
    Bf16,
    F32,
}

impl From<MergeDtype> for DType {
    fn from(d: MergeDtype) -> DType {
        match d {
            MergeDtype::F16 => DType::F16,
            MergeDtype::Bf16 => DType::BF16,
            MergeDtype::F32 => DType::F32,
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.model.join("config.json").is_file() {
        return Err(UsageError(format!(
            "--model {}: not an HF model directory (no config.json); merge-lora needs the dense base the adapter was trained on",
            args.model.display()
        ))
        .into());
    }
    if !args.adapter.join("adapter_config.json").is_file() {
        return Err(UsageError(format!(
            "--adapter {}: no adapter_config.json; expected a PEFT adapter directory (e.g. OUT/final of rustspeed train --lora-r ...)",
            args.adapter.display()
        ))
        .into());
    }
    if args.output == args.model || args.output == args.adapter {
        return Err(UsageError(format!(
            "--output {}: would overwrite the input; choose a new directory",
            args.output.display()
        ))
        .into());
    }
    let dtype = match args.dtype {
        Some(d) => d.into(),
        None => base_dtype(&args.model),
    };
    let saved = merge_adapter_dir(&args.model, &args.adapter, &args.output, dtype).map_err(
        |e| -> anyhow::Error {
            match e {
                // The user's files: a bad or unsupported adapter config.
                PeftError::Json { .. }
                | PeftError::Invalid { .. }
                | PeftError::Unsupported { .. }
                | PeftError::Io { .. } => UsageError(e.to_string()).into(),
                other => other.into(),
            }
        },
    )?;
    eprintln!(
        "merged {} into {}: {} ({:?})",
        args.adapter.display(),
        args.model.display(),
        saved.dir.display(),
        dtype
    );
    Ok(())
}

/// The base's dtype from config.json (`torch_dtype`, or `dtype` in newer transformers), as
/// PEFT's merged model keeps the dtype the base was loaded in.
fn base_dtype(model: &std::path::Path) -> DType {
    let text = std::fs::read_to_string(model.join("config.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let name = v
        .get("torch_dtype")
        .or_else(|| v.get("dtype"))
        .and_then(|d| d.as_str());
    match name {
        Some("bfloat16") => DType::BF16,
        Some("float16") => DType::F16,
        _ => DType::F32,
    }
}
