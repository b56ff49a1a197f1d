//! `rustspeed train`: fine-tunes a model (HF directory or .gguf) on a data file with a DeepSpeed
//! config, HF Trainer style. The flags fill the config's `"auto"` values; the data crate turns
//! the file into samples; every optimizer step takes the next global batch of the seeded data
//! order, split into `gradient_accumulation_steps` micro-batches. Checkpoints carry the data
//! cursor, so a resumed run trains on exactly the samples an uninterrupted run would.
//!
//! World size 1 only for now; an epoch's last partial global batch is dropped because the
//! engine runs exactly `gradient_accumulation_steps` micro-batches per step.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use anyhow::Context;
use half::{bf16, f16};
use rustspeed::engine::{Engine, EngineOptions};
use rustspeed_config::{
    load, resolve, DsConfig, Precision, ResolveOptions, TrainingArgs, WorldSize, WorldSizeSource,
};
use rustspeed_data::{collate, DataConfig, DataCursor, DataOrder, DataState, Format, SpecialIds};
use rustspeed_kernels::Float;
use rustspeed_models::export::{read_config_json, save_pretrained};
use rustspeed_models::gguf::GgufFile;
use rustspeed_models::hf_config::ModelConfig;
use rustspeed_models::loader::{load_model, LoadError};
use rustspeed_models::tokenizer::Tokenizer;
use rustspeed_models::Batch;
use serde_json::json;

use crate::commands::eval::DataError;
use crate::exit::UsageError;

/// HF's default `max_shard_size` ("5GB").
const MAX_SHARD_BYTES: usize = 5_000_000_000;

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory (config.json, safetensors, tokenizer) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Training data: .jsonl, .json, .csv, .tsv, .txt or .parquet.
    #[arg(long)]
    pub data: PathBuf,
    /// DeepSpeed config (ds_config.json).
    #[arg(long = "deepspeed_config", alias = "deepspeed")]
    pub deepspeed_config: PathBuf,
    /// Where metrics.jsonl, checkpoint-N/ and final/ go.
    #[arg(long)]
    pub output_dir: PathBuf,
    #[arg(long)]
    pub per_device_train_batch_size: Option<u64>,
    #[arg(long)]
    pub gradient_accumulation_steps: Option<u64>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Epochs to train when --max-steps is not given (HF default 3).
    #[arg(long, default_value_t = 3.0)]
    pub num_train_epochs: f64,
    /// Total optimizer steps; overrides --num-train-epochs.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// A log line every N steps.
    #[arg(long, default_value_t = 500)]
    pub logging_steps: u64,
    /// A checkpoint every N steps into OUTPUT_DIR/checkpoint-N (0: none).
    #[arg(long, default_value_t = 500)]
    pub save_steps: u64,
    /// Seed of the data order and the dropout masks.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, conflicts_with = "fp16")]
    pub bf16: bool,
    #[arg(long)]
    pub fp16: bool,
    /// Continue from a checkpoint directory; without a value, the newest
    /// OUTPUT_DIR/checkpoint-N.
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    pub resume_from_checkpoint: Option<String>,
    /// Tokens per packed block (default: min(1024, the model's maximum positions)).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Longest unpacked sample (default: the model's maximum positions).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// text, alpaca or chat (default: detected).
    #[arg(long)]
    pub format: Option<String>,
    /// Pack texts into blocks (default on for the text format).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub packing: Option<bool>,
    /// Keep file order instead of shuffling each epoch.
    #[arg(long)]
    pub no_shuffle: bool,
}

/// What the model source provides before its weights are loaded in the training dtype.
struct Source {
    config: ModelConfig,
    config_json: serde_json::Value,
    tokenizer: Tokenizer,
    /// The HF directory whose tokenizer files the export copies; `None` for GGUF.
    hf_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.logging_steps == 0 {
        return Err(UsageError("--logging-steps must be at least 1".into()).into());
    }
    if args.max_steps == Some(0) {
        return Err(UsageError("--max-steps must be at least 1".into()).into());
    }
    if args.num_train_epochs.is_nan() || args.num_train_epochs <= 0.0 {
        return Err(UsageError("--num-train-epochs must be positive".into()).into());
    }
    let source = open_source(&args.model)?;
    let max_pos = source.config.max_position_embeddings;
    let block_size = args.block_size.unwrap_or(max_pos.min(1024));
    for (flag, v) in [
        ("--block-size", Some(block_size)),
        ("--max-length", args.max_length),
    ] {
        if let Some(v) = v.filter(|&v| v > max_pos) {
            return Err(UsageError(format!(
                "{flag} {v} exceeds the model's maximum positions ({max_pos})"
            ))
            .into());
        }
    }
    let data = prepare_data(&args, &source, block_size)?;
    let num_samples = data.len();

    let raw = load(&args.deepspeed_config)?;
    let mut targs = TrainingArgs {
        per_device_train_batch_size: args.per_device_train_batch_size,
        gradient_accumulation_steps: args.gradient_accumulation_steps,
        learning_rate: args.learning_rate,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        warmup_steps: args.warmup_steps,
        max_steps: args.max_steps,
        fp16: args.fp16.then_some(true),
        bf16: args.bf16.then_some(true),
        hidden_size: Some(source.config.hidden_size as u64),
        ..TrainingArgs::default()
    };
    let resolve_with = |targs: &TrainingArgs| {
        let opts = ResolveOptions {
            world_size: WorldSize {
                value: 1,
                source: WorldSizeSource::Default,
            },
            training_args: Some(targs.clone()),
        };
        resolve(&raw, &opts).map_err(anyhow::Error::from)
    };
    // The step count from epochs needs the global batch, which the config resolves; the
    // batch sizes do not depend on the step count, so a probe resolve with any count gives it.
    if targs.max_steps.is_none() {
        let probe = match resolve_with(&targs) {
            Ok(c) => c,
            Err(_) => resolve_with(&TrainingArgs {
                max_steps: Some(1),
                ..targs.clone()
            })?,
        };
        let per_epoch = num_samples / probe.train_batch_size() as usize;
        targs.max_steps = Some(((per_epoch as f64 * args.num_train_epochs).ceil() as u64).max(1));
    }
    let config = resolve_with(&targs)?;
    // The config owns the precision; a flag it did not take (no "auto" to fill) must not
    // be dropped silently.
    for (flag, given, want, key) in [
        ("--bf16", args.bf16, Precision::Bf16, "bf16.enabled"),
        ("--fp16", args.fp16, Precision::Fp16, "fp16.enabled"),
    ] {
        if given && config.precision != want {
            return Err(UsageError(format!(
                "{flag}: {} does not enable it; set {key} to true or \"auto\"",
                args.deepspeed_config.display()
            ))
            .into());
        }
    }
    let unsupported = config.unsupported_keys();
    if let Some(key) = unsupported.first() {
        return Err(UsageError(format!("not supported yet: {key}")).into());
    }
    let max_steps = targs.max_steps.expect("set above");
    let run = Run {
        args: &args,
        source: &source,
        samples: &data,
        config: &config,
        max_steps,
    };
    match config.precision {
        Precision::Fp32 => run.train::<f32>(),
        Precision::Bf16 => run.train::<bf16>(),
        Precision::Fp16 => run.train::<f16>(),
    }
}

fn open_source(path: &Path) -> anyhow::Result<Source> {
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        let file = GgufFile::open(path)?;
        return Ok(Source {
            config: file.model_config()?,
            config_json: file.config_json()?,
            tokenizer: file.tokenizer()?,
            hf_dir: None,
        });
    }
    if !path.join("config.json").is_file() {
        return Err(UsageError(format!(
            "{}: not a model (an HF directory with config.json, or a .gguf file)",
            path.display()
        ))
        .into());
    }
    let tokenizer = Tokenizer::from_dir(path).map_err(|e| {
        UsageError(format!(
            "{}: no usable tokenizer to encode the data: {e}",
            path.display()
        ))
    })?;
    Ok(Source {
        config: ModelConfig::from_path(path)?,
        config_json: read_config_json(path)?,
        tokenizer,
        hf_dir: Some(path.to_path_buf()),
    })
}

fn prepare_data(
    args: &Args,
    source: &Source,
    block_size: usize,
) -> anyhow::Result<Vec<rustspeed_data::Sample>> {
    let data_err = |e: rustspeed_data::DataError| DataError(e.to_string());
    let mut cfg = DataConfig::new(vec![args.data.clone()]);
    cfg.format = args
        .format
        .as_deref()
        .map(Format::from_str)
        .transpose()
        .map_err(data_err)?;
    cfg.packing = args.packing;
    cfg.block_size = block_size;
    cfg.max_length = Some(
        args.max_length
            .unwrap_or(source.config.max_position_embeddings),
    );
    cfg.seed = args.seed;
    let tok = &source.tokenizer;
    let eos = tok.eos_token_id().ok_or_else(|| {
        UsageError(format!(
            "{}: the tokenizer names no EOS token (needed to end and pad samples)",
            args.model.display()
        ))
    })?;
    let special = SpecialIds {
        eos,
        bos: tok.bos_token_id(),
    };
    let encode = rustspeed_data::TryEncode(|t: &str, s: bool| tok.encode(t, s));
    let prepared = rustspeed_data::prepare(&cfg, &encode, special).map_err(data_err)?;
    let samples = prepared.train.samples;
    tracing::info!(
        "data {}: format {}, packing {}, {} samples",
        args.data.display(),
        prepared.format,
        prepared.packing,
        samples.len()
    );
    Ok(samples)
}

struct Run<'a> {
    args: &'a Args,
    source: &'a Source,
    samples: &'a [rustspeed_data::Sample],
    config: &'a DsConfig,
    max_steps: u64,
}

impl Run<'_> {
    fn train<T: Float>(&self) -> anyhow::Result<()> {
        let args = self.args;
        let t0 = Instant::now();
        let loaded = load_model::<T>(&args.model).map_err(|e| match e {
            LoadError::NotAModel { .. } => anyhow::Error::new(UsageError(e.to_string())),
            other => anyhow::Error::new(other),
        })?;
        let param_count = loaded.model.layout.numel();
        let options = EngineOptions {
            seed: args.seed,
            ..EngineOptions::default()
        };
        let mut engine = Engine::initialize(loaded.model, self.config, options)?;
        let micro = self.config.micro_batch_size() as usize;
        let global = self.config.train_batch_size() as usize;
        let num_samples = self.samples.len();
        if num_samples < global {
            return Err(DataError(format!(
                "{}: {num_samples} samples are fewer than one global batch ({global})",
                args.data.display()
            ))
            .into());
        }
        let order = DataOrder {
            num_samples,
            seed: args.seed,
            shuffle: !args.no_shuffle,
            drop_last: true,
        };
        let steps_per_epoch = order.steps_per_epoch(global);
        if !num_samples.is_multiple_of(global) {
            tracing::warn!(
                "each epoch's last {} samples (fewer than the global batch {global}) are dropped",
                num_samples % global
            );
        }
        std::fs::create_dir_all(&args.output_dir)
            .with_context(|| format!("creating {}", args.output_dir.display()))?;
        let metrics_path = args.output_dir.join("metrics.jsonl");
        let mut cursor = DataCursor::new(order);
        if let Some(dir) = &args.resume_from_checkpoint {
            let dir = if dir.is_empty() {
                latest_checkpoint(&args.output_dir)?
            } else {
                PathBuf::from(dir)
            };
            let client = engine
                .load_checkpoint(&dir, None)?
                .ok_or_else(|| UsageError(format!("{}: no checkpoint found", dir.display())))?;
            let state: DataState = serde_json::from_value(client["data"].clone())
                .with_context(|| format!("{}: no data cursor in client state", dir.display()))?;
            cursor = DataCursor::resume(order, state).map_err(|e| DataError(e.to_string()))?;
            truncate_metrics(&metrics_path, engine.global_steps())?;
            tracing::info!(
                "resumed from {} at step {}",
                dir.display(),
                engine.global_steps()
            );
        } else if metrics_path.exists() {
            std::fs::remove_file(&metrics_path)
                .with_context(|| format!("removing {}", metrics_path.display()))?;
        }
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("opening {}", metrics_path.display()))?;
        eprintln!(
            "training {} ({param_count} params, {}) on {num_samples} samples: micro batch {micro} x accumulation {} = {global}, {} steps ({steps_per_epoch} per epoch), loaded in {:.1}s",
            args.model.display(),
            T::DTYPE,
            self.config.gradient_accumulation_steps(),
            self.max_steps,
            t0.elapsed().as_secs_f64()
        );

        let bar = indicatif::ProgressBar::new(self.max_steps);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} eta {eta}")
                .expect("a valid template"),
        );
        bar.set_position(engine.global_steps());
        // A hidden bar (stderr not a terminal) drops its println; logs must still appear.
        let log = |line: String| {
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        };
        let pad = self.source.tokenizer.eos_token_id().unwrap_or(0);
        let print_every = self.config.steps_per_print;
        let (mut total_tokens, t_train) = (0u64, Instant::now());
        while engine.global_steps() < self.max_steps {
            let step = cursor.next_step(global);
            let batches: Vec<Batch> = step
                .samples
                .chunks(micro)
                .map(|idx| {
                    let refs: Vec<_> = idx.iter().map(|&i| &self.samples[i]).collect();
                    let b = collate(&refs, pad, None);
                    Batch::from_hf_labels(b.batch_size, b.seq_len, b.input_ids, &b.labels)
                })
                .collect();
            let tokens: u64 = step
                .samples
                .iter()
                .map(|&i| self.samples[i].len() as u64)
                .sum();
            let t = Instant::now();
            let report = engine.train_batch(&mut batches.into_iter())?;
            let secs = t.elapsed().as_secs_f64();
            total_tokens += tokens;
            let n = report.step.global_step;
            let line = json!({
                "step": n,
                "epoch": n as f64 / steps_per_epoch as f64,
                "loss": report.loss,
                "lr": report.step.lr,
                "grad_norm": finite_or_null(report.step.grad_norm),
                "loss_scale": report.step.loss_scale,
                "skipped": report.step.skipped,
                "tokens": tokens,
                "tokens_per_second": tokens as f64 / secs.max(1e-9),
            });
            writeln!(metrics, "{line}")
                .with_context(|| format!("writing {}", metrics_path.display()))?;
            bar.set_position(n);
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s",
                report.loss,
                report.step.lr,
                tokens as f64 / secs.max(1e-9)
            ));
            if n % args.logging_steps == 0 || print_every.is_some_and(|p| p > 0 && n % p == 0) {
                log(format!(
                    "step {n}: loss {:.4}, lr {:.3e}, grad_norm {:.4}, loss_scale {}, {:.0} tokens/s",
                    report.loss,
                    report.step.lr,
                    report.step.grad_norm,
                    report.step.loss_scale,
                    tokens as f64 / secs.max(1e-9)
                ));
            }
            if args.save_steps > 0 && n % args.save_steps == 0 {
                let dir = args.output_dir.join(format!("checkpoint-{n}"));
                engine.save_checkpoint(&dir, None, json!({ "data": cursor.state() }))?;
                log(format!("saved {}", dir.display()));
            }
        }
        bar.finish_and_clear();
        let train_secs = t_train.elapsed().as_secs_f64();

        let final_dir = args.output_dir.join("final");
        save_pretrained(
            &final_dir,
            &self.source.config_json,
            engine.model(),
            T::DTYPE,
            self.source.hf_dir.as_deref(),
            MAX_SHARD_BYTES,
        )?;
        if self.source.hf_dir.is_none() {
            // A GGUF's tokenizer lives in its metadata; the HF directory needs it as a file.
            let text = self
                .source
                .tokenizer
                .inner()
                .to_string(false)
                .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
            std::fs::write(final_dir.join("tokenizer.json"), text)
                .with_context(|| format!("writing {}/tokenizer.json", final_dir.display()))?;
        }
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let bytes = engine.model_state_bytes();
        println!(
            "trained {} steps, {total_tokens} tokens in {train_secs:.1}s ({:.0} tokens/s); peak RSS {}; model states {:.3} GiB; exported {}",
            engine.global_steps(),
            total_tokens as f64 / train_secs.max(1e-9),
            rustspeed::rss::peak_rss_bytes()
                .map_or("unknown".into(), |b| format!("{:.3} GiB", gib(b))),
            gib(bytes.total),
            final_dir.display()
        );
        Ok(())
    }
}

/// A skipped step's norm is inf/NaN, which JSON cannot hold.
fn finite_or_null(x: f64) -> serde_json::Value {
    if x.is_finite() {
        json!(x)
    } else {
        serde_json::Value::Null
    }
}

/// The `checkpoint-N` directory of `out` with the largest N.
fn latest_checkpoint(out: &Path) -> anyhow::Result<PathBuf> {
    let entries = std::fs::read_dir(out)
        .map_err(|e| UsageError(format!("{}: cannot list checkpoints: {e}", out.display())))?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
        .ok_or_else(|| {
            UsageError(format!(
                "--resume-from-checkpoint: no checkpoint-N directory in {}",
                out.display()
            ))
            .into()
        })
}

/// Drops metric lines after the resumed step, so the file reads as one uninterrupted run.
fn truncate_metrics(path: &Path, step: u64) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).with_context(|| format!("rewriting {}", path.display()))
}
