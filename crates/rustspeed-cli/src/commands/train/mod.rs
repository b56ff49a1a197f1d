//! `rustspeed train`: fine-tunes a model (HF directory or .gguf) on a data file with a DeepSpeed
//! config, HF Trainer style. The flags fill the config's `"auto"` values; what the config leaves
//! out (optimizer, scheduler) is what HF Trainer would build; the data crate turns the files into
//! samples; every optimizer step takes the next global batch of the seeded data order, split into
//! `gradient_accumulation_steps` micro-batches (fewer for an epoch's short last step unless
//! `dataloader_drop_last`). Checkpoints carry the data cursor, so a resumed run trains on
//! exactly the samples an uninterrupted run would.
//!
//! Several ranks: `--nproc-per-node N` relaunches this command through `rustspeed launch`;
//! under a launcher (RANK/WORLD_SIZE set) each rank trains on its share of every global batch
//! with ZeRO stages 0-2, and rank 0 alone writes logs, metrics, plots and the export.

mod checkpoints;
mod peft;
mod plot;
mod run_loop;
mod source;

use std::path::PathBuf;
use std::sync::Arc;

use half::{bf16, f16};
use rustspeed::lr_schedule::{HfScheduleParams, HfScheduleType, LrScheduleParams};
use rustspeed_comm::Communicator;
use rustspeed_config::{
    load, resolve, AdamParams, DsConfig, OffloadDevice, Optimizer, OptimizerConfig, Precision,
    ResolveOptions, TrainingArgs, WorldSize, WorldSizeSource,
};

use crate::exit::UsageError;
pub use run_loop::Interrupted;
use run_loop::Run;
use rustspeed_models::hf_config::{Architecture, ModelConfig};
use rustspeed_models::Tuning;

/// HF's default `max_shard_size` ("5GB").
const MAX_SHARD_BYTES: usize = 5_000_000_000;

/// HF TrainingArguments defaults for what the config may leave out.
const HF_LEARNING_RATE: f64 = 5e-5;
const HF_ADAM_BETAS: (f64, f64) = (0.9, 0.999);
const HF_ADAM_EPSILON: f64 = 1e-8;

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
    /// Where metrics.jsonl, loss.png, checkpoint-N/ and final/ go.
    #[arg(long)]
    pub output_dir: PathBuf,
    #[arg(long)]
    pub per_device_train_batch_size: Option<u64>,
    /// Eval micro-batch size (HF default 8).
    #[arg(long, default_value_t = 8)]
    pub per_device_eval_batch_size: usize,
    #[arg(long)]
    pub gradient_accumulation_steps: Option<u64>,
    /// Fills "auto" lrs; the lr of HF's AdamW when the config has no optimizer (default 5e-5).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    #[arg(long)]
    pub adam_epsilon: Option<f64>,
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Warmup as a fraction of the total steps (ceil), when --warmup-steps is not given.
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// HF's schedule when the config has no scheduler block: linear (default), cosine,
    /// constant, constant_with_warmup.
    #[arg(long)]
    pub lr_scheduler_type: Option<String>,
    /// Epochs to train when --max-steps is not given (HF default 3).
    #[arg(long, default_value_t = 3.0)]
    pub num_train_epochs: f64,
    /// Total optimizer steps; overrides --num-train-epochs.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// A log line every N steps.
    #[arg(long, default_value_t = 500)]
    pub logging_steps: u64,
    /// Evaluate every N steps (default: --logging-steps, as HF) and at the end, when there is
    /// eval data (--eval-data or --eval-split).
    #[arg(long)]
    pub eval_steps: Option<u64>,
    /// Also evaluate before the first step (metrics line with step 0), as HF's eval_on_start.
    #[arg(long)]
    pub eval_on_start: bool,
    /// A checkpoint every N steps into OUTPUT_DIR/checkpoint-N (0: none).
    #[arg(long, default_value_t = 500)]
    pub save_steps: u64,
    /// Keep only the N newest checkpoints, deleting older ones.
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Seed of the data order and the dropout masks.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, conflicts_with = "fp16")]
    pub bf16: bool,
    #[arg(long)]
    pub fp16: bool,
    /// Data-parallel ranks on this machine: relaunches this command under `rustspeed launch`.
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Train from random weights (HF's `from_config` and `_init_weights`, seeded by --seed):
    /// only config.json and the tokenizer of --model are read.
    #[arg(long)]
    pub from_scratch: bool,
    /// LoRA rank: train low-rank adapters instead of the whole model (PEFT's LoRA).
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA scale numerator (scale = alpha / r; PEFT default 8).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    /// Modules to adapt: comma-separated names or suffixes (q_proj,v_proj), or "all-linear"
    /// (default: PEFT's choice for the architecture).
    #[arg(long)]
    pub lora_target_modules: Option<String>,
    /// Prompt tuning with N virtual tokens (PEFT's PROMPT_TUNING with its defaults: RANDOM
    /// init); other methods and options through --peft-config.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub num_virtual_tokens: Option<u64>,
    /// A PEFT adapter_config.json (or a directory holding one): LORA, PROMPT_TUNING, P_TUNING
    /// or PREFIX_TUNING.
    #[arg(long)]
    pub peft_config: Option<PathBuf>,
    /// Continue training an existing PEFT adapter directory.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Hold the frozen base quantized: nf4, fp4 or int8 (QLoRA; needs LoRA).
    #[arg(long)]
    pub quantize: Option<String>,
    /// Quantize the 4-bit absmax values too (bitsandbytes' double quantization).
    #[arg(long)]
    pub double_quant: bool,
    /// The quantized layers' compute dtype (bnb_4bit_compute_dtype): f32, bf16 or f16.
    /// Default: the model's dtype (the config's bf16/fp16 section, else f32).
    #[arg(long)]
    pub compute_dtype: Option<String>,
    /// Also write OUTPUT_DIR/merged: the base with the adapter merged in.
    #[arg(long)]
    pub merge: bool,
    /// Recompute each block's activations in backward instead of keeping them.
    #[arg(long)]
    pub gradient_checkpointing: bool,
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
    /// Evaluation data file(s), in the training data's format.
    #[arg(long, num_args = 1..)]
    pub eval_data: Vec<PathBuf>,
    /// Hold out this fraction (0-1) of the training records for evaluation, chosen by --seed.
    #[arg(long, conflicts_with = "eval_data")]
    pub eval_split: Option<f64>,
    /// Skip malformed records with a counted warning instead of stopping.
    #[arg(long)]
    pub skip_bad_records: bool,
    /// Field or CSV column of the text format (default "text").
    #[arg(long)]
    pub text_column: Option<String>,
    /// Field or CSV column of the alpaca instruction (default "instruction").
    #[arg(long)]
    pub instruction_column: Option<String>,
    /// Field or CSV column of the alpaca input (default "input").
    #[arg(long)]
    pub input_column: Option<String>,
    /// Field or CSV column of the alpaca output (default "output").
    #[arg(long)]
    pub output_column: Option<String>,
    /// Field of the chat format's message list (default "messages").
    #[arg(long)]
    pub messages_column: Option<String>,
    /// Alpaca prompt template file (docs/TRAIN.md) instead of the standard Alpaca prompt.
    #[arg(long)]
    pub prompt_template: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    check_flags(&args)?;
    if let Some(n) = args.nproc_per_node.filter(|&n| n > 1) {
        if std::env::var_os("RANK").is_none() {
            return relaunch(n);
        }
    }
    let comm =
        Communicator::from_env().map_err(|e| UsageError(format!("launcher environment: {e}")))?;
    let comm = (comm.world_size() > 1).then(|| Arc::new(comm));
    let world = comm.as_ref().map_or(1, |c| c.world_size() as u64);
    let source = source::open_source(&args.model)?;
    let tuning = peft::tuning_from_args(&args)?;
    let max_pos = max_token_positions(&source.config, tuning.as_ref());
    let block_size = args.block_size.unwrap_or(max_pos.min(1024));
    for (flag, v) in [
        ("--block-size", Some(block_size)),
        ("--max-length", args.max_length),
    ] {
        if let Some(v) = v.filter(|&v| v > max_pos) {
            return Err(UsageError(format!(
                "{flag} {v} exceeds the model's maximum positions ({max_pos}, after the prompt's virtual tokens)"
            ))
            .into());
        }
    }
    let data = source::prepare_data(&args, &source, block_size, max_pos)?;
    let num_samples = data.train.samples.len();

    let raw = load(&args.deepspeed_config)?;
    let mut targs = TrainingArgs {
        per_device_train_batch_size: args.per_device_train_batch_size,
        gradient_accumulation_steps: args.gradient_accumulation_steps,
        learning_rate: args.learning_rate,
        adam_beta1: args.adam_beta1,
        adam_beta2: args.adam_beta2,
        adam_epsilon: args.adam_epsilon,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        warmup_steps: args.warmup_steps,
        warmup_ratio: args.warmup_ratio,
        max_steps: args.max_steps,
        fp16: args.fp16.then_some(true),
        bf16: args.bf16.then_some(true),
        hidden_size: Some(source.config.hidden_size as u64),
        hf_defaults: true,
    };
    let resolve_with = |targs: &TrainingArgs| {
        let opts = ResolveOptions {
            world_size: WorldSize {
                value: world,
                source: if world > 1 {
                    WorldSizeSource::LauncherEnv("WORLD_SIZE".into())
                } else {
                    WorldSizeSource::Default
                },
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
        // HF's `len(dataloader) // GAS`, rounded up unless the short last batch is dropped:
        // the data order's own count (shuffling does not change it).
        let per_epoch = rustspeed_data::DataOrder {
            num_samples,
            seed: args.seed,
            shuffle: false,
            drop_last: probe.dataloader_drop_last,
        }
        .steps_per_epoch(probe.train_batch_size() as usize);
        targs.max_steps = Some(((per_epoch as f64 * args.num_train_epochs).ceil() as u64).max(1));
    }
    let mut config = resolve_with(&targs)?;
    check_config(&args, &config)?;
    let max_steps = targs.max_steps.expect("set above");
    if config.optimizer.is_none() {
        config.optimizer = Some(hf_default_optimizer(&args));
        tracing::info!(
            "the config has no optimizer block: HF Trainer's default AdamW (lr {}, weight_decay {})",
            args.learning_rate.unwrap_or(HF_LEARNING_RATE),
            args.weight_decay.unwrap_or(0.0)
        );
    }
    let fallback_schedule = hf_schedule(&args, &config, max_steps)?;
    let run = Run {
        args: &args,
        source: &source,
        data: &data,
        config: &config,
        max_steps,
        fallback_schedule,
        comm,
        tuning,
    };
    match config.precision {
        Precision::Fp32 => run.train::<f32>(),
        Precision::Bf16 => run.train::<bf16>(),
        Precision::Fp16 => run.train::<f16>(),
    }
}

/// `rustspeed train --nproc-per-node N ARGS` = `rustspeed launch --nproc-per-node N --
/// rustspeed train ARGS`: the same arguments, minus the rank count, in every rank.
fn relaunch(n: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe().map_err(|e| anyhow::anyhow!("locating rustspeed: {e}"))?;
    let mut rest: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--nproc-per-node" {
            args.next();
        } else if !a.starts_with("--nproc-per-node=") {
            rest.push(a);
        }
    }
    let status = std::process::Command::new(&exe)
        .args(["launch", "--nproc-per-node", &n.to_string(), "--"])
        .arg(&exe)
        .args(&rest)
        .status()
        .map_err(|e| anyhow::anyhow!("starting rustspeed launch: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        // The launcher has already said which rank failed and why.
        std::process::exit(status.code().unwrap_or(1));
    }
}

/// Positions left for the tokens: GPT-2's learned position embeddings end at n_positions, and
/// prompt learning's virtual tokens (or prefix) take the first ones. RoPE models have no such
/// end, so their maximum positions stay as the config says.
fn max_token_positions(cfg: &ModelConfig, tuning: Option<&Tuning>) -> usize {
    let max = cfg.max_position_embeddings;
    match (cfg.architecture, tuning) {
        (Architecture::Gpt2, Some(t)) => max.saturating_sub(t.virtual_tokens() + t.prefix_tokens()),
        _ => max,
    }
}

fn check_flags(args: &Args) -> anyhow::Result<()> {
    let usage = |m: &str| Err(UsageError(m.to_string()).into());
    if args.logging_steps == 0 {
        return usage("--logging-steps must be at least 1");
    }
    if args.eval_steps == Some(0) {
        return usage("--eval-steps must be at least 1");
    }
    if args.max_steps == Some(0) {
        return usage("--max-steps must be at least 1");
    }
    if args.num_train_epochs.is_nan() || args.num_train_epochs <= 0.0 {
        return usage("--num-train-epochs must be positive");
    }
    if args.per_device_eval_batch_size == 0 {
        return usage("--per-device-eval-batch-size must be at least 1");
    }
    if args.save_total_limit == Some(0) {
        return usage(
            "--save-total-limit must be at least 1 (leave it out to keep every checkpoint)",
        );
    }
    if let Some(r) = args.warmup_ratio {
        if !(0.0..=1.0).contains(&r) {
            return usage(&format!(
                "--warmup-ratio {r}: expected a fraction in [0, 1]"
            ));
        }
    }
    if let Some(f) = args.eval_split {
        if !(f > 0.0 && f < 1.0) {
            return usage(&format!(
                "--eval-split {f}: expected a fraction between 0 and 1"
            ));
        }
    }
    if let Some(t) = &args.lr_scheduler_type {
        if HfScheduleType::parse(t).is_none() {
            return usage(&format!(
                "--lr-scheduler-type {t}: expected one of {}",
                HfScheduleType::NAMES.join(", ")
            ));
        }
    }
    Ok(())
}

/// What the config asks for that this engine cannot do, refused before any work; and the
/// offload settings, which on the CPU backend describe what already happens.
fn check_config(args: &Args, config: &DsConfig) -> anyhow::Result<()> {
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
    if let Some(key) = config.unsupported_keys().first() {
        return Err(UsageError(format!("not supported yet: {key}")).into());
    }
    let zero = &config.zero_optimization;
    for (key, device) in [
        (
            "zero_optimization.offload_optimizer.device",
            zero.offload_optimizer_device(),
        ),
        (
            "zero_optimization.offload_param.device",
            zero.offload_param_device(),
        ),
    ] {
        match device {
            OffloadDevice::Nvme => {
                return Err(UsageError(format!(
                    "not supported yet: {key} \"nvme\" (ZeRO-Infinity); use \"cpu\" or \"none\""
                ))
                .into())
            }
            OffloadDevice::Cpu => tracing::info!(
                "{key} \"cpu\": on the CPU backend this state already lives in host memory; nothing moves"
            ),
            OffloadDevice::None => {}
        }
    }
    if args.lr_scheduler_type.is_some() && config.scheduler.is_some() {
        return Err(UsageError(format!(
            "--lr-scheduler-type contradicts the scheduler block of {}; HF Trainer uses the config's scheduler, so drop one of them",
            args.deepspeed_config.display()
        ))
        .into());
    }
    Ok(())
}

/// HF Trainer's optimizer when the DeepSpeed config has none: torch AdamW from the
/// TrainingArguments.
fn hf_default_optimizer(args: &Args) -> OptimizerConfig {
    OptimizerConfig {
        type_name: "adamw".to_string(),
        optimizer: Optimizer::Adam(AdamParams {
            lr: args.learning_rate.unwrap_or(HF_LEARNING_RATE),
            betas: [
                args.adam_beta1.unwrap_or(HF_ADAM_BETAS.0),
                args.adam_beta2.unwrap_or(HF_ADAM_BETAS.1),
            ],
            eps: args.adam_epsilon.unwrap_or(HF_ADAM_EPSILON),
            weight_decay: args.weight_decay.unwrap_or(0.0),
            bias_correction: true,
            adam_w_mode: true,
            torch_adam: true,
            amsgrad: false,
        }),
        legacy_fusion: false,
    }
}

/// HF Trainer's own schedule, used when the config has no scheduler block.
fn hf_schedule(
    args: &Args,
    config: &DsConfig,
    max_steps: u64,
) -> anyhow::Result<Option<LrScheduleParams>> {
    if config.scheduler.is_some() {
        return Ok(None);
    }
    let name = args.lr_scheduler_type.as_deref().unwrap_or("linear");
    let kind = HfScheduleType::parse(name).expect("checked with the flags");
    // TrainingArguments.get_warmup_steps.
    let warmup_steps = match (args.warmup_steps, args.warmup_ratio) {
        (Some(w), _) if w > 0 => w,
        (_, Some(r)) => (max_steps as f64 * r).ceil() as u64,
        _ => 0,
    };
    tracing::info!(
        "the config has no scheduler block: HF Trainer's {name} schedule, {warmup_steps} warmup steps of {max_steps}"
    );
    Ok(Some(LrScheduleParams::Hf(HfScheduleParams {
        kind,
        warmup_steps,
        total_steps: max_steps,
    })))
}
