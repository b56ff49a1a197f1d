//! `rustspeed zero-to-fp32 CHECKPOINT_DIR OUTPUT_DIR [--tag T] [--dtype f32|bf16]`: DeepSpeed's
//! `zero_to_fp32.py`. Consolidates a checkpoint of any world size and ZeRO stage into an HF
//! weights directory (`model.safetensors`, sharded at 5 GB with an index), reading one rank's
//! fp32 master at a time (see `rustspeed::consolidate`). config.json and the tokenizer files
//! come from `--config`, else from the training run's `final/` next to the checkpoint
//! (`OUTPUT/checkpoint-N` -> `OUTPUT/final`), when there is one.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rustspeed::consolidate::{consolidate_fp32, save_fp32_state};
use rustspeed_kernels::DType;
use rustspeed_models::export::{
    export_config, hf_dtype_name, read_config_json, DEFAULT_MAX_SHARD_BYTES, TOKENIZER_FILES,
};

use crate::exit::UsageError;

#[derive(clap::Args)]
pub struct Args {
    /// The checkpoint directory (holding `latest` and the global_stepN tags), e.g.
    /// OUTPUT_DIR/checkpoint-500 of `rustspeed train`.
    pub checkpoint_dir: PathBuf,
    /// Where model.safetensors (or its shards and index) go; created if missing.
    pub output_dir: PathBuf,
    /// The tag to convert (default: the one `latest` names).
    #[arg(long)]
    pub tag: Option<String>,
    /// The saved weights' dtype.
    #[arg(long, value_enum, default_value_t = OutDtype::F32)]
    pub dtype: OutDtype,
    /// An HF config.json to write next to the weights (default: CHECKPOINT_DIR/../final/config.json
    /// when it exists).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Bytes per weights file before sharding (transformers' default, 5 GB).
    #[arg(long, default_value_t = DEFAULT_MAX_SHARD_BYTES)]
    pub max_shard_size: usize,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum OutDtype {
    F32,
    Bf16,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.checkpoint_dir.is_dir() {
        return Err(UsageError(format!(
            "CHECKPOINT_DIR {}: no such directory (pass the directory holding `latest`, e.g. OUTPUT_DIR/checkpoint-N)",
            args.checkpoint_dir.display()
        ))
        .into());
    }
    if args.max_shard_size == 0 {
        return Err(UsageError("--max-shard-size must be at least 1 byte".into()).into());
    }
    let config = match &args.config {
        Some(c) if !c.is_file() => {
            return Err(UsageError(format!(
                "--config {}: no such file (pass an HF config.json)",
                c.display()
            ))
            .into())
        }
        Some(c) => Some(c.clone()),
        None => final_dir(&args.checkpoint_dir)
            .map(|d| d.join("config.json"))
            .filter(|c| c.is_file()),
    };
    let dtype = match args.dtype {
        OutDtype::F32 => DType::F32,
        OutDtype::Bf16 => DType::BF16,
    };
    let state = consolidate_fp32(&args.checkpoint_dir, args.tag.as_deref())
        .with_context(|| format!("consolidating {}", args.checkpoint_dir.display()))?;
    tracing::info!(
        "read tag {} (ZeRO stage {}, {} ranks): {} parameters, {} elements",
        state.tag,
        state.zero_stage,
        state.world_size,
        state.layout.slots().len(),
        state.layout.numel()
    );
    save_fp32_state(&state, &args.output_dir, dtype, args.max_shard_size)
        .with_context(|| format!("writing {}", args.output_dir.display()))?;
    if let Some(src) = &config {
        write_config(src, &args.output_dir.join("config.json"), dtype)?;
        // The tokenizer travels with the config it was trained with.
        if let Some(dir) = src.parent() {
            for name in TOKENIZER_FILES {
                let from = dir.join(name);
                if from.is_file() {
                    let to = args.output_dir.join(name);
                    std::fs::copy(&from, &to).with_context(|| {
                        format!("copying {} to {}", from.display(), to.display())
                    })?;
                }
            }
        }
    } else {
        tracing::warn!(
            "no config.json written: pass --config FILE (no final/config.json next to {})",
            args.checkpoint_dir.display()
        );
    }
    eprintln!(
        "saved {} ({} tensors, {} elements, {}) from tag {} of {} (ZeRO stage {}, {} ranks)",
        args.output_dir.display(),
        state.layout.slots().len(),
        state.layout.numel(),
        hf_dtype_name(dtype),
        state.tag,
        args.checkpoint_dir.display(),
        state.zero_stage,
        state.world_size
    );
    Ok(())
}

/// `OUTPUT/final` for a checkpoint at `OUTPUT/checkpoint-N`.
fn final_dir(checkpoint_dir: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(checkpoint_dir).ok()?;
    Some(abs.parent()?.join("final"))
}

/// config.json with both dtype keys naming the saved weights' dtype (as `rustspeed train`'s
/// export writes it).
fn write_config(src: &Path, dst: &Path, dtype: DType) -> anyhow::Result<()> {
    let config = read_config_json(src).map_err(|e| UsageError(format!("--config: {e}")))?;
    let out =
        export_config(&config, dtype).map_err(|e| UsageError(format!("{}: {e}", src.display())))?;
    let text = serde_json::to_string_pretty(&out).expect("plain JSON");
    std::fs::write(dst, text).with_context(|| format!("writing {}", dst.display()))
}
