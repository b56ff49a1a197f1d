//! `zero_optimization` with its offload blocks (deepspeed/runtime/zero/config.py,
//! offload_config.py), including the legacy `"zero_optimization": true` (stage 1).

use serde::Serialize;

use crate::error::ConfigError;
use crate::json::{Kind, Member};
use crate::reader::Block;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OffloadDevice {
    None,
    Cpu,
    Nvme,
}

const DEVICES: [&str; 3] = ["none", "cpu", "nvme"];

fn device(s: &str) -> OffloadDevice {
    match s {
        "cpu" => OffloadDevice::Cpu,
        "nvme" => OffloadDevice::Nvme,
        _ => OffloadDevice::None,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OffloadOptimizerConfig {
    pub device: OffloadDevice,
    pub nvme_path: Option<String>,
    pub buffer_count: u64,
    pub pin_memory: bool,
    pub pipeline_read: bool,
    pub pipeline_write: bool,
    pub fast_init: bool,
    pub ratio: f64,
    pub super_offload: bool,
    pub cpuadam_cores_perc: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OffloadParamConfig {
    pub device: OffloadDevice,
    pub nvme_path: Option<String>,
    pub buffer_count: u64,
    pub buffer_size: u64,
    pub max_in_cpu: u64,
    pub pin_memory: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZeroConfig {
    pub stage: u8,
    pub contiguous_gradients: bool,
    pub reduce_scatter: bool,
    pub reduce_bucket_size: u64,
    pub use_multi_rank_bucket_allreduce: bool,
    pub allgather_partitions: bool,
    pub allgather_bucket_size: u64,
    /// Resolved: when unset, true only for stage 3.
    pub overlap_comm: bool,
    pub load_from_fp32_weights: bool,
    pub elastic_checkpoint: bool,
    pub offload_optimizer: Option<OffloadOptimizerConfig>,
    pub offload_param: Option<OffloadParamConfig>,
    pub sub_group_size: u64,
    pub prefetch_bucket_size: u64,
    pub param_persistence_threshold: u64,
    pub model_persistence_threshold: u64,
    pub max_live_parameters: u64,
    pub max_reuse_distance: u64,
    pub gather_16bit_weights_on_model_save: bool,
    pub module_granularity_threshold: u64,
    pub use_all_reduce_for_fetch_params: bool,
    pub allgather_sequential: bool,
    pub ignore_unused_parameters: bool,
    pub legacy_stage1: bool,
    pub round_robin_gradients: bool,
    pub zero_hpz_partition_size: u64,
    pub zero_quantized_weights: bool,
    pub zero_quantized_nontrainable_weights: bool,
    pub zero_quantized_gradients: bool,
    pub mics_shard_size: i64,
    pub mics_hierarchical_params_gather: bool,
    pub memory_efficient_linear: bool,
    pub pipeline_loading_checkpoint: bool,
    pub override_module_apply: bool,
    pub log_trace_cache_warnings: bool,
    pub enable_sanity_checks: bool,
}

/// DeepSpeed's `nccl_start_alignment_factor` ("4-byte alignment / sizeof(fp16)").
pub const NCCL_START_ALIGNMENT_FACTOR: u64 = 2;

impl ZeroConfig {
    pub fn disabled() -> ZeroConfig {
        ZeroConfig::defaults(0, None)
    }

    fn defaults(stage: u8, overlap_comm: Option<bool>) -> ZeroConfig {
        ZeroConfig {
            stage,
            contiguous_gradients: true,
            reduce_scatter: true,
            reduce_bucket_size: 500_000_000,
            use_multi_rank_bucket_allreduce: true,
            allgather_partitions: true,
            allgather_bucket_size: 500_000_000,
            overlap_comm: overlap_comm.unwrap_or(stage == 3),
            load_from_fp32_weights: true,
            elastic_checkpoint: false,
            offload_optimizer: None,
            offload_param: None,
            sub_group_size: 1_000_000_000,
            prefetch_bucket_size: 50_000_000,
            param_persistence_threshold: 100_000,
            model_persistence_threshold: i64::MAX as u64,
            max_live_parameters: 1_000_000_000,
            max_reuse_distance: 1_000_000_000,
            gather_16bit_weights_on_model_save: false,
            module_granularity_threshold: 0,
            use_all_reduce_for_fetch_params: false,
            allgather_sequential: false,
            ignore_unused_parameters: true,
            legacy_stage1: false,
            round_robin_gradients: false,
            zero_hpz_partition_size: 1,
            zero_quantized_weights: false,
            zero_quantized_nontrainable_weights: false,
            zero_quantized_gradients: false,
            mics_shard_size: -1,
            mics_hierarchical_params_gather: false,
            memory_efficient_linear: true,
            pipeline_loading_checkpoint: false,
            override_module_apply: true,
            log_trace_cache_warnings: false,
            enable_sanity_checks: false,
        }
    }

    pub fn offload_optimizer_device(&self) -> OffloadDevice {
        self.offload_optimizer
            .as_ref()
            .map_or(OffloadDevice::None, |o| o.device)
    }

    pub fn offload_param_device(&self) -> OffloadDevice {
        self.offload_param
            .as_ref()
            .map_or(OffloadDevice::None, |o| o.device)
    }
}

/// Reads `zero_optimization` from the top-level block. `allgather_size` is the legacy top-level
/// bucket size used with `"zero_optimization": true`.
pub(crate) fn read(top: &mut Block<'_>) -> Result<ZeroConfig, ConfigError> {
    let legacy_size = top.member("allgather_size");
    let Some(m) = top.member("zero_optimization") else {
        return Ok(ZeroConfig::disabled());
    };
    match &m.value.kind {
        Kind::Bool(on) => {
            let mut z = ZeroConfig::defaults(u8::from(*on), None);
            if let Some(size) = legacy_size {
                z.allgather_bucket_size = top.as_u64(size)?;
            }
            Ok(z)
        }
        Kind::Null => Ok(ZeroConfig::disabled()),
        _ => read_block(top.as_block(m)?),
    }
}

fn stage3_alias(
    b: &mut Block<'_>,
    names: &[&'static str],
    default: u64,
) -> Result<u64, ConfigError> {
    b.member_alias(names)?.map_or(Ok(default), |m| b.as_u64(m))
}

fn read_block(mut b: Block<'_>) -> Result<ZeroConfig, ConfigError> {
    let stage_m = b.member("stage");
    let stage = match stage_m {
        None => 0,
        Some(m) => {
            let s = b.as_u64(m)?;
            if s > 3 {
                return Err(b.invalid(
                    m,
                    format!("Maximum supported ZeRO stage is 3, got {s}; use 0, 1, 2 or 3"),
                ));
            }
            s as u8
        }
    };
    let overlap = b.member("overlap_comm");
    let overlap = overlap.map(|m| b.as_bool(m)).transpose()?;
    let mut z = ZeroConfig::defaults(stage, overlap);
    z.contiguous_gradients = b.bool("contiguous_gradients", z.contiguous_gradients)?;
    z.reduce_scatter = b.bool("reduce_scatter", z.reduce_scatter)?;
    z.reduce_bucket_size = b.u64("reduce_bucket_size", z.reduce_bucket_size)?;
    z.use_multi_rank_bucket_allreduce = b.bool(
        "use_multi_rank_bucket_allreduce",
        z.use_multi_rank_bucket_allreduce,
    )?;
    z.allgather_partitions = b.bool("allgather_partitions", z.allgather_partitions)?;
    let ag = b.member("allgather_bucket_size");
    if let Some(m) = ag {
        z.allgather_bucket_size = b.as_u64(m)?;
        // ZeRO 1/2 assert this in their optimizer (stage_1_and_2.py); stage 3 never reads it.
        if matches!(stage, 1 | 2)
            && !z
                .allgather_bucket_size
                .is_multiple_of(NCCL_START_ALIGNMENT_FACTOR)
        {
            return Err(b.invalid(
                m,
                format!(
                    "allgather_bucket_size must be a multiple of nccl_start_alignment_factor, {} \
                     (got {}); use {}",
                    NCCL_START_ALIGNMENT_FACTOR,
                    z.allgather_bucket_size,
                    z.allgather_bucket_size + 1
                ),
            ));
        }
    }
    z.load_from_fp32_weights = b.bool("load_from_fp32_weights", z.load_from_fp32_weights)?;
    z.elastic_checkpoint = b.bool("elastic_checkpoint", z.elastic_checkpoint)?;
    z.sub_group_size = b.u64("sub_group_size", z.sub_group_size)?;
    z.prefetch_bucket_size = stage3_alias(
        &mut b,
        &["stage3_prefetch_bucket_size", "prefetch_bucket_size"],
        z.prefetch_bucket_size,
    )?;
    z.param_persistence_threshold = stage3_alias(
        &mut b,
        &[
            "stage3_param_persistence_threshold",
            "param_persistence_threshold",
        ],
        z.param_persistence_threshold,
    )?;
    z.model_persistence_threshold = stage3_alias(
        &mut b,
        &[
            "stage3_model_persistence_threshold",
            "model_persistence_threshold",
        ],
        z.model_persistence_threshold,
    )?;
    z.max_live_parameters = stage3_alias(
        &mut b,
        &["stage3_max_live_parameters", "max_live_parameters"],
        z.max_live_parameters,
    )?;
    z.max_reuse_distance = stage3_alias(
        &mut b,
        &["stage3_max_reuse_distance", "max_reuse_distance"],
        z.max_reuse_distance,
    )?;
    z.module_granularity_threshold = stage3_alias(
        &mut b,
        &[
            "stage3_module_granularity_threshold",
            "module_granularity_threshold",
        ],
        z.module_granularity_threshold,
    )?;
    // The fp16 spelling is DeepSpeed's deprecated name; either one turns the 16-bit gather on.
    let gather = b.member_alias(&[
        "stage3_gather_16bit_weights_on_model_save",
        "gather_16bit_weights_on_model_save",
    ])?;
    let gather = gather.map(|m| b.as_bool(m)).transpose()?.unwrap_or(false);
    let gather_fp16 = b.bool("stage3_gather_fp16_weights_on_model_save", false)?;
    z.gather_16bit_weights_on_model_save = gather || gather_fp16;
    let fetch = b.member_alias(&[
        "stage3_use_all_reduce_for_fetch_params",
        "use_all_reduce_for_fetch_params",
    ])?;
    z.use_all_reduce_for_fetch_params = fetch.map(|m| b.as_bool(m)).transpose()?.unwrap_or(false);
    let seq = b.member_alias(&["stage3_allgather_sequential", "allgather_sequential"])?;
    z.allgather_sequential = seq.map(|m| b.as_bool(m)).transpose()?.unwrap_or(false);
    z.ignore_unused_parameters = b.bool("ignore_unused_parameters", z.ignore_unused_parameters)?;
    z.legacy_stage1 = b.bool("legacy_stage1", z.legacy_stage1)?;
    z.round_robin_gradients = b.bool("round_robin_gradients", z.round_robin_gradients)?;
    z.zero_hpz_partition_size = b.u64("zero_hpz_partition_size", z.zero_hpz_partition_size)?;
    z.zero_quantized_weights = b.bool("zero_quantized_weights", z.zero_quantized_weights)?;
    z.zero_quantized_nontrainable_weights = b.bool(
        "zero_quantized_nontrainable_weights",
        z.zero_quantized_nontrainable_weights,
    )?;
    z.zero_quantized_gradients = b.bool("zero_quantized_gradients", z.zero_quantized_gradients)?;
    z.mics_shard_size = b.i64("mics_shard_size", z.mics_shard_size)?;
    z.mics_hierarchical_params_gather = b.bool(
        "mics_hierarchical_params_gather",
        z.mics_hierarchical_params_gather,
    )?;
    z.memory_efficient_linear = b.bool("memory_efficient_linear", z.memory_efficient_linear)?;
    z.pipeline_loading_checkpoint =
        b.bool("pipeline_loading_checkpoint", z.pipeline_loading_checkpoint)?;
    z.override_module_apply = b.bool("override_module_apply", z.override_module_apply)?;
    z.log_trace_cache_warnings = b.bool("log_trace_cache_warnings", z.log_trace_cache_warnings)?;
    z.enable_sanity_checks = b.bool("enable_sanity_checks", z.enable_sanity_checks)?;

    // Deprecated booleans that DeepSpeed still maps onto the offload blocks.
    let cpu_offload = b.member("cpu_offload");
    let cpu_offload_param = b.member("cpu_offload_param");
    let cpu_pin = b.member("cpu_offload_use_pin_memory");
    let pin = cpu_pin.map(|m| b.as_bool(m)).transpose()?;

    let opt_block = b.block("offload_optimizer")?;
    z.offload_optimizer = match opt_block {
        Some(ob) => Some(read_offload_optimizer(ob)?),
        None => legacy_offload(&b, cpu_offload)?.then(|| OffloadOptimizerConfig {
            device: OffloadDevice::Cpu,
            pin_memory: pin.unwrap_or(true),
            ..default_offload_optimizer()
        }),
    };
    let param_block = b.block("offload_param")?;
    z.offload_param = match param_block {
        Some(pb) => Some(read_offload_param(pb)?),
        None => legacy_offload(&b, cpu_offload_param)?.then(|| OffloadParamConfig {
            device: OffloadDevice::Cpu,
            pin_memory: pin.unwrap_or(true),
            ..default_offload_param()
        }),
    };
    let stage_at = |b: &Block<'_>| stage_m.map_or_else(|| b.location(), |m| b.at(m));
    if z.stage < 3 {
        if let Some(p) = z
            .offload_param
            .as_ref()
            .filter(|p| p.device != OffloadDevice::None)
        {
            return Err(ConfigError::Conflict {
                at: stage_at(&b),
                key: b.key_path("offload_param.device"),
                message: format!(
                    "parameter offload (device \"{}\") needs ZeRO stage 3, but stage is {}; set \
                     \"stage\": 3 or remove offload_param",
                    serde_json::to_value(p.device)
                        .unwrap_or_default()
                        .as_str()
                        .unwrap_or("?"),
                    z.stage
                ),
            });
        }
        if let Some(o) = z.offload_optimizer.as_ref().filter(|o| o.ratio < 1.0) {
            return Err(ConfigError::Conflict {
                at: stage_at(&b),
                key: b.key_path("offload_optimizer.ratio"),
                message: format!(
                    "Partial offloading only supported for ZeRO Stage 3 (ratio {} < 1 with stage \
                     {}); set ratio to 1.0 or use stage 3",
                    o.ratio, z.stage
                ),
            });
        }
    }
    b.finish()?;
    Ok(z)
}

fn legacy_offload(b: &Block<'_>, m: Option<&Member>) -> Result<bool, ConfigError> {
    m.map(|m| b.as_bool(m))
        .transpose()
        .map(|v| v.unwrap_or(false))
}

fn default_offload_optimizer() -> OffloadOptimizerConfig {
    OffloadOptimizerConfig {
        device: OffloadDevice::None,
        nvme_path: None,
        buffer_count: 4,
        pin_memory: true,
        pipeline_read: false,
        pipeline_write: false,
        fast_init: false,
        ratio: 1.0,
        super_offload: false,
        cpuadam_cores_perc: 0.8,
    }
}

fn default_offload_param() -> OffloadParamConfig {
    OffloadParamConfig {
        device: OffloadDevice::None,
        nvme_path: None,
        buffer_count: 5,
        buffer_size: 100_000_000,
        max_in_cpu: 1_000_000_000,
        pin_memory: true,
    }
}

fn nvme_needs_path(
    b: &Block<'_>,
    dev: OffloadDevice,
    path: &Option<String>,
) -> Result<(), ConfigError> {
    if dev == OffloadDevice::Nvme && path.is_none() {
        return Err(ConfigError::Conflict {
            at: b.location(),
            key: b.key_path("nvme_path"),
            message: "device \"nvme\" needs nvme_path (a directory on the NVMe drive)".into(),
        });
    }
    Ok(())
}

fn read_offload_optimizer(mut b: Block<'_>) -> Result<OffloadOptimizerConfig, ConfigError> {
    let d = default_offload_optimizer();
    let c = OffloadOptimizerConfig {
        device: device(b.choice("device", &DEVICES, "none", false)?),
        nvme_path: b.opt_string("nvme_path")?,
        buffer_count: b.u64("buffer_count", d.buffer_count)?,
        pin_memory: b.bool("pin_memory", d.pin_memory)?,
        pipeline_read: b.bool("pipeline_read", d.pipeline_read)?,
        pipeline_write: b.bool("pipeline_write", d.pipeline_write)?,
        fast_init: b.bool("fast_init", d.fast_init)?,
        ratio: b.f64_in("ratio", d.ratio, 0.0, 1.0)?,
        super_offload: b.bool("super_offload", d.super_offload)?,
        cpuadam_cores_perc: b.f64_in("cpuadam_cores_perc", d.cpuadam_cores_perc, 0.0, 1.0)?,
    };
    nvme_needs_path(&b, c.device, &c.nvme_path)?;
    b.finish()?;
    Ok(c)
}

fn read_offload_param(mut b: Block<'_>) -> Result<OffloadParamConfig, ConfigError> {
    let d = default_offload_param();
    let c = OffloadParamConfig {
        device: device(b.choice("device", &DEVICES, "none", false)?),
        nvme_path: b.opt_string("nvme_path")?,
        buffer_count: b.u64("buffer_count", d.buffer_count)?,
        buffer_size: b.u64("buffer_size", d.buffer_size)?,
        max_in_cpu: b.u64("max_in_cpu", d.max_in_cpu)?,
        pin_memory: b.bool("pin_memory", d.pin_memory)?,
    };
    nvme_needs_path(&b, c.device, &c.nvme_path)?;
    b.finish()?;
    Ok(c)
}
