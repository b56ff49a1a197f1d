//! The smaller top-level blocks: activation checkpointing, pipeline, sparse attention, aio,
//! checkpoint, data types, monitors, profilers. Most are not supported by the engine yet; they
//! are still read strictly so that a typo is caught and a set value is never silently dropped.

use serde::Serialize;

use crate::error::ConfigError;
use crate::reader::Block;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ActivationCheckpointingConfig {
    pub partition_activations: bool,
    pub contiguous_memory_optimization: bool,
    pub cpu_checkpointing: bool,
    pub number_checkpoints: Option<u64>,
    pub synchronize_checkpoint_boundary: bool,
    pub profile: bool,
}

pub(crate) fn activation_checkpointing(
    mut b: Block<'_>,
) -> Result<ActivationCheckpointingConfig, ConfigError> {
    let c = ActivationCheckpointingConfig {
        partition_activations: b.bool("partition_activations", false)?,
        contiguous_memory_optimization: b.bool("contiguous_memory_optimization", false)?,
        cpu_checkpointing: b.bool("cpu_checkpointing", false)?,
        number_checkpoints: b.opt_u64("number_checkpoints")?,
        synchronize_checkpoint_boundary: b.bool("synchronize_checkpoint_boundary", false)?,
        profile: b.bool("profile", false)?,
    };
    b.finish()?;
    Ok(c)
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineConfig {
    /// `"auto"` or a number of stages.
    pub stages: serde_json::Value,
    pub partition: String,
    pub seed_layers: bool,
    pub activation_checkpoint_interval: u64,
    pub pipe_partitioned: bool,
    pub grad_partitioned: bool,
}

pub(crate) fn pipeline(mut b: Block<'_>) -> Result<PipelineConfig, ConfigError> {
    let stages = match b.member("stages") {
        None => serde_json::json!("auto"),
        Some(m) => match &m.value.kind {
            crate::json::Kind::String(s) if s == "auto" => serde_json::json!("auto"),
            _ => serde_json::json!(b.as_u64(m)?),
        },
    };
    let c = PipelineConfig {
        stages,
        partition: b.string("partition", "best")?,
        seed_layers: b.bool("seed_layers", false)?,
        activation_checkpoint_interval: b.u64("activation_checkpoint_interval", 0)?,
        pipe_partitioned: b.bool("pipe_partitioned", true)?,
        grad_partitioned: b.bool("grad_partitioned", true)?,
    };
    b.finish()?;
    Ok(c)
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SparseAttentionConfig {
    pub mode: String,
    pub block: u64,
    pub different_layout_per_head: bool,
    pub num_local_blocks: u64,
    pub num_global_blocks: u64,
    pub attention: String,
    pub horizontal_global_attention: bool,
    pub num_different_global_patterns: u64,
    pub num_random_blocks: u64,
    pub local_window_blocks: serde_json::Value,
    pub global_block_indices: serde_json::Value,
    pub global_block_end_indices: serde_json::Value,
    pub num_sliding_window_blocks: u64,
}

pub(crate) fn sparse_attention(mut b: Block<'_>) -> Result<SparseAttentionConfig, ConfigError> {
    let raw = |b: &mut Block<'_>, key: &'static str, default: serde_json::Value| {
        b.member(key).map_or(default, |m| m.value.to_json())
    };
    let c = SparseAttentionConfig {
        mode: b
            .choice(
                "mode",
                &["dense", "fixed", "variable", "bigbird", "bslongformer"],
                "fixed",
                false,
            )?
            .to_string(),
        block: b.u64("block", 16)?,
        different_layout_per_head: b.bool("different_layout_per_head", false)?,
        num_local_blocks: b.u64("num_local_blocks", 4)?,
        num_global_blocks: b.u64("num_global_blocks", 1)?,
        attention: b
            .choice(
                "attention",
                &["bidirectional", "unidirectional"],
                "bidirectional",
                false,
            )?
            .to_string(),
        horizontal_global_attention: b.bool("horizontal_global_attention", false)?,
        num_different_global_patterns: b.u64("num_different_global_patterns", 1)?,
        num_random_blocks: b.u64("num_random_blocks", 0)?,
        local_window_blocks: raw(&mut b, "local_window_blocks", serde_json::json!([4])),
        global_block_indices: raw(&mut b, "global_block_indices", serde_json::json!([0])),
        global_block_end_indices: raw(&mut b, "global_block_end_indices", serde_json::Value::Null),
        num_sliding_window_blocks: b.u64("num_sliding_window_blocks", 3)?,
    };
    b.finish()?;
    Ok(c)
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AioConfig {
    pub block_size: u64,
    pub queue_depth: u64,
    pub intra_op_parallelism: u64,
    pub single_submit: bool,
    pub overlap_events: bool,
    pub use_gds: bool,
}

pub(crate) fn aio(mut b: Block<'_>) -> Result<AioConfig, ConfigError> {
    let threads = b.member_alias(&["intra_op_parallelism", "thread_count"])?;
    let c = AioConfig {
        intra_op_parallelism: threads.map_or(Ok(1), |m| b.as_u64(m))?,
        block_size: b.u64("block_size", 1_048_576)?,
        queue_depth: b.u64("queue_depth", 8)?,
        single_submit: b.bool("single_submit", false)?,
        overlap_events: b.bool("overlap_events", true)?,
        use_gds: b.bool("use_gds", false)?,
    };
    b.finish()?;
    Ok(c)
}

impl Default for AioConfig {
    fn default() -> Self {
        AioConfig {
            block_size: 1_048_576,
            queue_depth: 8,
            intra_op_parallelism: 1,
            single_submit: false,
            overlap_events: true,
            use_gds: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TagValidation {
    Ignore,
    Warn,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointConfig {
    pub tag_validation: TagValidation,
    pub load_universal: bool,
    pub use_node_local_storage: bool,
    pub parallel_write_pipeline_stage: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            tag_validation: TagValidation::Warn,
            load_universal: false,
            use_node_local_storage: false,
            parallel_write_pipeline_stage: false,
        }
    }
}

pub(crate) fn checkpoint(mut b: Block<'_>) -> Result<CheckpointConfig, ConfigError> {
    // DeepSpeed upper-cases the mode before checking it.
    let tag_validation =
        match b.choice("tag_validation", &["Ignore", "Warn", "Fail"], "Warn", true)? {
            "Ignore" => TagValidation::Ignore,
            "Fail" => TagValidation::Fail,
            _ => TagValidation::Warn,
        };
    let load_universal = b.bool("load_universal", false)?;
    let use_node_local_storage = b.bool("use_node_local_storage", false)?;
    let parallel_write_pipeline_stage = match b.block("parallel_write")? {
        None => false,
        Some(mut pw) => {
            let v = pw.bool("pipeline_stage", false)?;
            pw.finish()?;
            v
        }
    };
    b.finish()?;
    Ok(CheckpointConfig {
        tag_validation,
        load_universal,
        use_node_local_storage,
        parallel_write_pipeline_stage,
    })
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DataTypesConfig {
    /// `None`: the model's dtype (DeepSpeed's default).
    pub grad_accum_dtype: Option<String>,
    pub param_dtype: Option<String>,
}

const DTYPES: [&str; 3] = ["fp32", "fp16", "bf16"];

pub(crate) fn data_types(mut b: Block<'_>) -> Result<DataTypesConfig, ConfigError> {
    let mut dtype = |key: &'static str| -> Result<Option<String>, ConfigError> {
        match b.member(key) {
            Some(m) if !matches!(m.value.kind, crate::json::Kind::Null) => {
                Ok(Some(b.as_choice(m, &DTYPES, false)?.to_string()))
            }
            _ => Ok(None),
        }
    };
    let c = DataTypesConfig {
        grad_accum_dtype: dtype("grad_accum_dtype")?,
        param_dtype: dtype("param_dtype")?,
    };
    b.finish()?;
    Ok(c)
}

/// tensorboard / csv_monitor / wandb / comet: only `enabled` matters to the engine today.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MonitorConfig {
    pub enabled: bool,
    /// The remaining keys as written (output_path, job_name, project, team, group, ...).
    pub settings: serde_json::Map<String, serde_json::Value>,
}

pub(crate) fn monitor(
    mut b: Block<'_>,
    keys: &[&'static str],
) -> Result<MonitorConfig, ConfigError> {
    let enabled = b.bool("enabled", false)?;
    let mut settings = serde_json::Map::new();
    for key in keys {
        if let Some(m) = b.member(key) {
            settings.insert(key.to_string(), m.value.to_json());
        }
    }
    b.finish()?;
    Ok(MonitorConfig { enabled, settings })
}

pub const TENSORBOARD_KEYS: [&str; 2] = ["output_path", "job_name"];
pub const WANDB_KEYS: [&str; 3] = ["group", "team", "project"];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlopsProfilerConfig {
    pub enabled: bool,
    pub recompute_fwd_factor: f64,
    pub profile_step: u64,
    pub module_depth: i64,
    pub top_modules: u64,
    pub detailed: bool,
    pub output_file: Option<String>,
}

impl Default for FlopsProfilerConfig {
    fn default() -> Self {
        FlopsProfilerConfig {
            enabled: false,
            recompute_fwd_factor: 0.0,
            profile_step: 1,
            module_depth: -1,
            top_modules: 1,
            detailed: true,
            output_file: None,
        }
    }
}

pub(crate) fn flops_profiler(mut b: Block<'_>) -> Result<FlopsProfilerConfig, ConfigError> {
    let c = FlopsProfilerConfig {
        enabled: b.bool("enabled", false)?,
        recompute_fwd_factor: b.f64("recompute_fwd_factor", 0.0)?,
        profile_step: b.u64("profile_step", 1)?,
        module_depth: b.i64("module_depth", -1)?,
        top_modules: b.u64("top_modules", 1)?,
        detailed: b.bool("detailed", true)?,
        output_file: b.opt_string("output_file")?,
    };
    b.finish()?;
    Ok(c)
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommsLoggerConfig {
    pub enabled: bool,
    pub verbose: bool,
    pub prof_all: bool,
    pub debug: bool,
    pub prof_ops: serde_json::Value,
}

impl Default for CommsLoggerConfig {
    fn default() -> Self {
        CommsLoggerConfig {
            enabled: false,
            verbose: false,
            prof_all: true,
            debug: false,
            prof_ops: serde_json::json!([]),
        }
    }
}

pub(crate) fn comms_logger(mut b: Block<'_>) -> Result<CommsLoggerConfig, ConfigError> {
    let c = CommsLoggerConfig {
        enabled: b.bool("enabled", false)?,
        verbose: b.bool("verbose", false)?,
        prof_all: b.bool("prof_all", true)?,
        debug: b.bool("debug", false)?,
        prof_ops: b
            .member("prof_ops")
            .map_or(serde_json::json!([]), |m| m.value.to_json()),
    };
    b.finish()?;
    Ok(c)
}

/// compression_training's sub-blocks (deepspeed/compression/constants.py); their insides are
/// kept as written because the whole feature is not supported yet.
pub const COMPRESSION_BLOCKS: [&str; 7] = [
    "weight_quantization",
    "activation_quantization",
    "sparse_pruning",
    "row_pruning",
    "head_pruning",
    "channel_pruning",
    "layer_reduction",
];

pub(crate) fn compression_training(mut b: Block<'_>) -> Result<serde_json::Value, ConfigError> {
    let mut out = serde_json::Map::new();
    for key in COMPRESSION_BLOCKS {
        if let Some(sub) = b.block(key)? {
            let m = b.member(key).expect("block was just read");
            drop(sub);
            out.insert(key.to_string(), m.value.to_json());
        }
    }
    b.finish()?;
    Ok(out.into())
}
