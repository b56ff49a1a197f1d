//! The resolved config: every block read, cross-checked the way DeepSpeed does, the batch triple
//! resolved for the world size, and `"auto"` filled from training arguments.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::auto::{self, TrainingArgs};
use crate::batch::{self, BatchSizes, GivenBatch, WorldSize};
use crate::blocks::{self, *};
use crate::error::ConfigError;
use crate::json::{Kind, Value};
use crate::optimizer::{self, Optimizer, OptimizerConfig};
use crate::precision::{self, Bf16Config, Fp16Config, Precision};
use crate::reader::{Block, Ctx, SetKey};
use crate::scheduler::{self, SchedulerConfig};
use crate::table::{self, Status, RAW_BLOCKS};
use crate::zero::{self, OffloadDevice, ZeroConfig};

/// A parsed but not yet resolved config.
#[derive(Debug, Clone, PartialEq)]
pub struct RawConfig {
    /// The name errors use (the path as given, or `<base64>`).
    pub source: String,
    pub root: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResolveOptions {
    pub world_size: WorldSize,
    /// HF-style arguments that fill `"auto"`; `None` (config check): any `"auto"` is an error.
    pub training_args: Option<TrainingArgs>,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        ResolveOptions {
            world_size: WorldSize::default_one(),
            training_args: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AllreduceOp {
    Mean,
    Sum,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DsConfig {
    pub batch: BatchSizes,
    pub precision: Precision,
    pub optimizer: Option<OptimizerConfig>,
    pub scheduler: Option<SchedulerConfig>,
    pub fp16: Fp16Config,
    pub bf16: Bf16Config,
    pub zero_optimization: ZeroConfig,
    pub gradient_clipping: f64,
    pub steps_per_print: Option<u64>,
    pub wall_clock_breakdown: bool,
    pub memory_breakdown: bool,
    pub dump_state: bool,
    pub prescale_gradients: bool,
    pub gradient_predivide_factor: f64,
    pub gradient_allreduce_op: AllreduceOp,
    pub communication_data_type: Option<String>,
    pub seq_parallel_communication_data_type: String,
    pub sparse_gradients: bool,
    pub zero_allow_untested_optimizer: bool,
    pub zero_force_ds_cpu_optimizer: bool,
    pub dataloader_drop_last: bool,
    pub managed_gradient_accumulation: bool,
    pub sequence_parallel_size: u64,
    pub disable_allgather: bool,
    pub use_data_before_expert_parallelism: bool,
    pub activation_checkpointing: ActivationCheckpointingConfig,
    pub pipeline: Option<PipelineConfig>,
    pub sparse_attention: Option<SparseAttentionConfig>,
    pub aio: AioConfig,
    pub checkpoint: CheckpointConfig,
    pub data_types: DataTypesConfig,
    pub tensorboard: MonitorConfig,
    pub csv_monitor: MonitorConfig,
    pub wandb: MonitorConfig,
    pub flops_profiler: FlopsProfilerConfig,
    pub comms_logger: CommsLoggerConfig,
    pub compression_training: Option<serde_json::Value>,
    /// Blocks that nothing supports yet, kept as written (see `table::RAW_BLOCKS`).
    pub other_blocks: BTreeMap<String, serde_json::Value>,
    /// Unknown top-level keys and other non-fatal findings (also logged).
    #[serde(skip)]
    pub warnings: Vec<String>,
    /// Every key the user wrote, with its value.
    #[serde(skip)]
    pub set_keys: Vec<SetKey>,
}

impl DsConfig {
    pub fn zero_stage(&self) -> u8 {
        self.zero_optimization.stage
    }

    pub fn train_batch_size(&self) -> u64 {
        self.batch.train_batch_size
    }

    pub fn micro_batch_size(&self) -> u64 {
        self.batch.train_micro_batch_size_per_gpu
    }

    pub fn gradient_accumulation_steps(&self) -> u64 {
        self.batch.gradient_accumulation_steps
    }

    /// The resolved config as JSON (stored in checkpoints).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("the resolved config is plain data")
    }

    /// Keys the user set to a non-default value that the engine cannot honour yet; the train
    /// command refuses each with "not supported yet: <key>".
    pub fn unsupported_keys(&self) -> Vec<String> {
        self.keys_with(|info, value| match info.status {
            Status::NotSupported => true,
            _ => value.as_str().is_some_and(|s| {
                info.unsupported_values
                    .iter()
                    .any(|u| u.eq_ignore_ascii_case(s))
            }),
        })
    }

    /// Keys set to a non-default value whose engine support is planned in a later issue.
    pub fn planned_keys(&self) -> Vec<(String, u32)> {
        self.keys_with(|info, _| matches!(info.status, Status::Planned(_)))
            .into_iter()
            .filter_map(|path| match table::lookup(&path)?.status {
                Status::Planned(issue) => Some((path, issue)),
                _ => None,
            })
            .collect()
    }

    fn keys_with(&self, pick: impl Fn(&table::KeyInfo, &serde_json::Value) -> bool) -> Vec<String> {
        let set_value = |path: &str| {
            self.set_keys
                .iter()
                .find(|s| table::canonical(&s.path) == path)
                .map(|s| &s.value)
        };
        // A disabled monitor/profiler's other settings do nothing, so they are not reported.
        let disabled = |path: &str| {
            let canon = table::canonical(path);
            let mut prefix = canon.as_str();
            while let Some(dot) = prefix.rfind('.') {
                prefix = &prefix[..dot];
                let enabled = format!("{prefix}.enabled");
                if table::lookup(&enabled).is_some() && enabled != canon {
                    return set_value(&enabled) != Some(&serde_json::Value::Bool(true));
                }
            }
            false
        };
        let mut out = Vec::new();
        for s in &self.set_keys {
            let Some(info) = table::lookup(&s.path) else {
                continue;
            };
            if disabled(&s.path) || is_default(info, &s.value) || !pick(info, &s.value) {
                continue;
            }
            if s.value.is_object() {
                // A block is reported through its keys when the table lists them.
                let prefix = format!("{}.", info.path);
                let has_leaves = table::KEYS.iter().any(|k| k.path.starts_with(&prefix));
                let off = s.value.get("enabled") == Some(&serde_json::Value::Bool(false));
                if has_leaves || off {
                    continue;
                }
            }
            out.push(s.path.clone());
        }
        out
    }
}

fn is_default(info: &table::KeyInfo, value: &serde_json::Value) -> bool {
    let Ok(default) = serde_json::from_str::<serde_json::Value>(info.default) else {
        return false;
    };
    match (&default, value) {
        (serde_json::Value::Number(a), serde_json::Value::Number(b)) => a.as_f64() == b.as_f64(),
        (serde_json::Value::String(a), serde_json::Value::String(b)) => a.eq_ignore_ascii_case(b),
        _ => default == *value,
    }
}

/// Resolves a parsed config for `opts`.
pub fn resolve(raw: &RawConfig, opts: &ResolveOptions) -> Result<DsConfig, ConfigError> {
    let mut root = raw.root.clone();
    if let Some(args) = &opts.training_args {
        auto::fill(&mut root, args, opts.world_size.value, &raw.source)?;
    }
    let ctx = Ctx::new(&raw.source);
    let mut top = Block::root(&ctx, &root);

    let given = GivenBatch {
        train_batch_size: top.opt_u64("train_batch_size")?,
        train_micro_batch_size_per_gpu: top.opt_u64("train_micro_batch_size_per_gpu")?,
        gradient_accumulation_steps: top.opt_u64("gradient_accumulation_steps")?,
    };
    let optimizer = top.block("optimizer")?.map(optimizer::read).transpose()?;
    let scheduler = top.block("scheduler")?.map(scheduler::read).transpose()?;
    let fp16 = precision::read_fp16(top.block_or_empty("fp16")?)?;
    let bf16_new = top.block("bf16")?;
    let bf16_old = top.block("bfloat16")?;
    let bf16 = match (bf16_new, bf16_old) {
        (Some(b), Some(_)) => {
            return Err(ConfigError::Conflict {
                at: b.location(),
                key: "bf16".into(),
                message: "both `bf16` and its legacy name `bfloat16` are given; keep `bf16`".into(),
            })
        }
        (Some(b), None) | (None, Some(b)) => precision::read_bf16(b)?,
        (None, None) => Bf16Config::default(),
    };
    let zero = zero::read(&mut top)?;

    let clip_m = top.member("gradient_clipping");
    let gradient_clipping = clip_m.map_or(Ok(1.0), |m| top.as_f64(m))?;
    if let Some(m) = clip_m.filter(|_| gradient_clipping < 0.0) {
        return Err(top.invalid(
            m,
            format!("must be >= 0 (0 disables clipping), got {gradient_clipping}"),
        ));
    }
    let spp_m = top.member("steps_per_print");
    let steps_per_print = match spp_m {
        Some(m) if !matches!(m.value.kind, Kind::Null) => {
            let v = top.as_u64(m)?;
            if v == 0 {
                return Err(top.invalid(
                    m,
                    "must be a positive number of steps, or null to never print",
                ));
            }
            Some(v)
        }
        _ => None,
    };
    let pdf_m = top.member("gradient_predivide_factor");
    let gradient_predivide_factor = pdf_m.map_or(Ok(1.0), |m| top.as_f64(m))?;
    if let Some(m) = pdf_m.filter(|_| gradient_predivide_factor <= 0.0) {
        return Err(top.invalid(m, format!("must be > 0, got {gradient_predivide_factor}")));
    }
    let op_m = top.member("gradient_allreduce_op");
    let gradient_allreduce_op = match op_m {
        None => AllreduceOp::Mean,
        Some(m) => match top.as_str(m)?.to_ascii_lowercase().as_str() {
            "mean" => AllreduceOp::Mean,
            "sum" => AllreduceOp::Sum,
            other => {
                return Err(top.invalid(
                    m,
                    format!("Invalid gradient_allreduce_op \"{other}\"; expected \"mean\" or \"sum\" (case-insensitive)"),
                ))
            }
        },
    };
    let communication_data_type = match top.member("communication_data_type") {
        Some(m) if !matches!(m.value.kind, Kind::Null) => Some(
            top.as_choice(m, &["fp32", "fp16", "bf16"], false)?
                .to_string(),
        ),
        _ => None,
    };
    let seq_parallel_communication_data_type = top
        .choice(
            "seq_parallel_communication_data_type",
            &["fp32", "fp16", "bf16"],
            "fp32",
            false,
        )?
        .to_string();

    let pipeline_m = top.member("pipeline");
    let sparse_attention = top
        .block("sparse_attention")?
        .map(blocks::sparse_attention)
        .transpose()?;
    let compression_training = top
        .block("compression_training")?
        .map(blocks::compression_training)
        .transpose()?;
    let mut other_blocks = BTreeMap::new();
    for name in RAW_BLOCKS {
        if let Some(m) = top.member(name) {
            if name == "elasticity"
                && m.value
                    .get("enabled")
                    .is_some_and(|e| e.kind == Kind::Bool(true))
            {
                return Err(ConfigError::Unsupported {
                    at: top.at(m),
                    key: "elasticity".into(),
                    message: "elastic training; remove the block or set \"enabled\": false and give the batch triple".into(),
                });
            }
            other_blocks.insert(name.to_string(), m.value.to_json());
        }
    }

    let mut cfg = DsConfig {
        batch: BatchSizes {
            train_batch_size: 0,
            train_micro_batch_size_per_gpu: 0,
            gradient_accumulation_steps: 0,
            world_size: opts.world_size.clone(),
            derived: Vec::new(),
        },
        precision: if fp16.enabled {
            Precision::Fp16
        } else if bf16.enabled {
            Precision::Bf16
        } else {
            Precision::Fp32
        },
        optimizer,
        scheduler,
        fp16,
        bf16,
        zero_optimization: zero,
        gradient_clipping,
        steps_per_print,
        wall_clock_breakdown: top.bool("wall_clock_breakdown", false)?,
        memory_breakdown: top.bool("memory_breakdown", false)?,
        dump_state: top.bool("dump_state", false)?,
        prescale_gradients: top.bool("prescale_gradients", false)?,
        gradient_predivide_factor,
        gradient_allreduce_op,
        communication_data_type,
        seq_parallel_communication_data_type,
        sparse_gradients: top.bool("sparse_gradients", false)?,
        zero_allow_untested_optimizer: top.bool("zero_allow_untested_optimizer", false)?,
        zero_force_ds_cpu_optimizer: top.bool("zero_force_ds_cpu_optimizer", true)?,
        dataloader_drop_last: top.bool("dataloader_drop_last", false)?,
        managed_gradient_accumulation: top.bool("managed_gradient_accumulation", true)?,
        sequence_parallel_size: top.u64("sequence_parallel_size", 1)?,
        disable_allgather: top.bool("disable_allgather", false)?,
        use_data_before_expert_parallelism: top
            .bool("use_data_before_expert_parallelism", false)?,
        activation_checkpointing: top
            .block("activation_checkpointing")?
            .map(blocks::activation_checkpointing)
            .transpose()?
            .unwrap_or_default(),
        pipeline: pipeline_m
            .map(|m| top.as_block(m).and_then(blocks::pipeline))
            .transpose()?,
        sparse_attention,
        aio: top
            .block("aio")?
            .map(blocks::aio)
            .transpose()?
            .unwrap_or_default(),
        checkpoint: top
            .block("checkpoint")?
            .map(blocks::checkpoint)
            .transpose()?
            .unwrap_or_default(),
        data_types: top
            .block("data_types")?
            .map(blocks::data_types)
            .transpose()?
            .unwrap_or_default(),
        tensorboard: monitor(&mut top, "tensorboard", &TENSORBOARD_KEYS)?,
        csv_monitor: monitor(&mut top, "csv_monitor", &TENSORBOARD_KEYS)?,
        wandb: monitor(&mut top, "wandb", &WANDB_KEYS)?,
        flops_profiler: top
            .block("flops_profiler")?
            .map(blocks::flops_profiler)
            .transpose()?
            .unwrap_or_default(),
        comms_logger: top
            .block("comms_logger")?
            .map(blocks::comms_logger)
            .transpose()?
            .unwrap_or_default(),
        compression_training,
        other_blocks,
        warnings: Vec::new(),
        set_keys: Vec::new(),
    };

    cross_check(&top, &cfg)?;
    top.finish_with_warnings();

    cfg.batch = batch::resolve(given, &opts.world_size)?;
    cfg.warnings = ctx.warnings.borrow().clone();
    cfg.set_keys = ctx.set.borrow().clone();
    Ok(cfg)
}

fn monitor(
    top: &mut Block<'_>,
    key: &'static str,
    keys: &[&'static str],
) -> Result<MonitorConfig, ConfigError> {
    match top.block(key)? {
        Some(b) => blocks::monitor(b, keys),
        None => Ok(MonitorConfig::default()),
    }
}

/// Checks that span blocks, with DeepSpeed's wording where it has one.
fn cross_check(top: &Block<'_>, cfg: &DsConfig) -> Result<(), ConfigError> {
    let root_value = |path: &str| -> Option<(crate::error::Location, String)> {
        let s = top.ctx().set.borrow();
        let found = s.iter().find(|k| k.path == path)?;
        Some((top.ctx().loc(found.line, 0), found.path.clone()))
    };
    let conflict = |path: &str, message: String| {
        let (at, key) = root_value(path).unwrap_or((top.location(), path.to_string()));
        ConfigError::Conflict { at, key, message }
    };
    let stage = cfg.zero_optimization.stage;
    if cfg.fp16.enabled && cfg.bf16.enabled {
        let key = if root_value("bf16.enabled").is_some() {
            "bf16.enabled"
        } else {
            "bfloat16.enabled"
        };
        return Err(conflict(
            key,
            "fp16 and bf16 are both enabled; enable only one of them (bf16 needs no loss scaling)"
                .into(),
        ));
    }
    if cfg.gradient_allreduce_op == AllreduceOp::Sum && stage == 3 {
        return Err(conflict(
            "gradient_allreduce_op",
            "gradient_allreduce_op \"sum\" is not supported with ZeRO stage 3; use \"mean\" or stage <= 2".into(),
        ));
    }
    if cfg.pipeline.is_some() && stage >= 2 {
        return Err(conflict(
            "zero_optimization.stage",
            format!("ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism (stage {stage} with a `pipeline` block); use stage 0 or 1"),
        ));
    }
    let b = &cfg.bf16;
    if (b.bf16_master_weights_and_grads || b.bf16_optimizer_states) && stage == 0 {
        return Err(conflict(
            "bf16.bf16_master_weights_and_grads",
            "bf16 master weights and optimizer states need ZeRO stage 1, 2 or 3".into(),
        ));
    }
    if let Some(opt) = &cfg.optimizer {
        let cpu = cfg.zero_optimization.offload_optimizer_device() == OffloadDevice::Cpu;
        let untested = match &opt.optimizer {
            Optimizer::Sgd(_) => true,
            Optimizer::Adagrad(_) => !cpu,
            _ => false,
        };
        if stage > 0 && untested && !cfg.zero_allow_untested_optimizer {
            return Err(conflict(
                "optimizer.type",
                format!(
                    "You are using an untested ZeRO Optimizer ({}). Please add \
                     <\"zero_allow_untested_optimizer\": true> in the configuration file to use it.",
                    opt.type_name
                ),
            ));
        }
    }
    Ok(())
}
