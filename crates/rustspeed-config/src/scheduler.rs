//! `scheduler {type, params}` with DeepSpeed's schedulers (deepspeed/runtime/lr_schedules.py).
//! DeepSpeed looks the type up by name (case-sensitive) and passes params to the constructor.

use serde::Serialize;

use crate::error::ConfigError;
use crate::reader::Block;

pub const SCHEDULER_TYPES: [&str; 5] = [
    "LRRangeTest",
    "OneCycle",
    "WarmupLR",
    "WarmupDecayLR",
    "WarmupCosineLR",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmupType {
    Log,
    Linear,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Warmup {
    pub warmup_min_lr: f64,
    /// `None`: the optimizer's lr of each param group.
    pub warmup_max_lr: Option<f64>,
    pub warmup_num_steps: u64,
    pub warmup_type: WarmupType,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum Scheduler {
    WarmupLR(Warmup),
    WarmupDecayLR {
        #[serde(flatten)]
        warmup: Warmup,
        total_num_steps: u64,
    },
    WarmupCosineLR {
        total_num_steps: u64,
        warmup_min_ratio: f64,
        warmup_num_steps: u64,
        cos_min_ratio: f64,
        warmup_type: WarmupType,
    },
    OneCycle {
        cycle_min_lr: f64,
        cycle_max_lr: f64,
        decay_lr_rate: f64,
        cycle_first_step_size: u64,
        cycle_second_step_size: Option<u64>,
        cycle_first_stair_count: u64,
        cycle_second_stair_count: Option<u64>,
        decay_step_size: u64,
        cycle_momentum: bool,
        cycle_min_mom: f64,
        cycle_max_mom: f64,
        decay_mom_rate: f64,
    },
    LRRangeTest {
        lr_range_test_min_lr: f64,
        lr_range_test_step_size: u64,
        lr_range_test_step_rate: f64,
        lr_range_test_staircase: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchedulerConfig {
    #[serde(flatten)]
    pub scheduler: Scheduler,
    /// Where a resumed schedule starts (-1: fresh).
    pub last_batch_iteration: i64,
}

impl SchedulerConfig {
    pub fn type_name(&self) -> &'static str {
        match self.scheduler {
            Scheduler::WarmupLR(_) => "WarmupLR",
            Scheduler::WarmupDecayLR { .. } => "WarmupDecayLR",
            Scheduler::WarmupCosineLR { .. } => "WarmupCosineLR",
            Scheduler::OneCycle { .. } => "OneCycle",
            Scheduler::LRRangeTest { .. } => "LRRangeTest",
        }
    }
}

pub(crate) fn read(mut b: Block<'_>) -> Result<SchedulerConfig, ConfigError> {
    let Some(type_m) = b.member("type") else {
        return Err(ConfigError::InvalidValue {
            at: b.location(),
            key: b.key_path("type"),
            message: format!("missing; expected one of {}", SCHEDULER_TYPES.join(", ")),
        });
    };
    let kind = b.as_choice(type_m, &SCHEDULER_TYPES, false)?;
    let params_m = b.member("params");
    let mut p = match params_m {
        Some(m) => b.as_block(m)?,
        None => Block::empty(b.ctx(), &b.key_path("params")),
    };
    let scheduler = match kind {
        "WarmupLR" => Scheduler::WarmupLR(warmup(&mut p, None)?),
        "WarmupDecayLR" => {
            let total = required_steps(&mut p, "total_num_steps")?;
            let warmup = warmup(&mut p, Some(0.001))?;
            if total < warmup.warmup_num_steps {
                p.ctx().warn(format!(
                    "{}: total_num_steps {total} is less than warmup_num_steps {}",
                    p.path(),
                    warmup.warmup_num_steps
                ));
            }
            Scheduler::WarmupDecayLR {
                warmup,
                total_num_steps: total,
            }
        }
        "WarmupCosineLR" => Scheduler::WarmupCosineLR {
            total_num_steps: required_steps(&mut p, "total_num_steps")?,
            warmup_min_ratio: p.f64("warmup_min_ratio", 0.0)?,
            warmup_num_steps: positive_steps(&mut p, "warmup_num_steps", 1000)?,
            cos_min_ratio: p.f64("cos_min_ratio", 0.0001)?,
            warmup_type: warmup_type(&mut p)?,
        },
        "OneCycle" => Scheduler::OneCycle {
            cycle_min_lr: required_f64(&mut p, "cycle_min_lr")?,
            cycle_max_lr: required_f64(&mut p, "cycle_max_lr")?,
            decay_lr_rate: p.f64("decay_lr_rate", 0.0)?,
            cycle_first_step_size: positive_steps(&mut p, "cycle_first_step_size", 2000)?,
            cycle_second_step_size: p.opt_u64("cycle_second_step_size")?,
            cycle_first_stair_count: p.u64("cycle_first_stair_count", 0)?,
            cycle_second_stair_count: p.opt_u64("cycle_second_stair_count")?,
            decay_step_size: p.u64("decay_step_size", 0)?,
            cycle_momentum: p.bool("cycle_momentum", true)?,
            cycle_min_mom: p.f64("cycle_min_mom", 0.8)?,
            cycle_max_mom: p.f64("cycle_max_mom", 0.9)?,
            decay_mom_rate: p.f64("decay_mom_rate", 0.0)?,
        },
        _ => Scheduler::LRRangeTest {
            lr_range_test_min_lr: p.f64("lr_range_test_min_lr", 1e-3)?,
            lr_range_test_step_size: positive_steps(&mut p, "lr_range_test_step_size", 2000)?,
            lr_range_test_step_rate: p.f64("lr_range_test_step_rate", 1.0)?,
            lr_range_test_staircase: p.bool("lr_range_test_staircase", false)?,
        },
    };
    let last_batch_iteration = p.i64("last_batch_iteration", -1)?;
    p.finish()?;
    b.finish()?;
    Ok(SchedulerConfig {
        scheduler,
        last_batch_iteration,
    })
}

fn warmup_type(p: &mut Block<'_>) -> Result<WarmupType, ConfigError> {
    Ok(
        match p.choice("warmup_type", &["log", "linear"], "log", false)? {
            "linear" => WarmupType::Linear,
            _ => WarmupType::Log,
        },
    )
}

fn warmup(p: &mut Block<'_>, default_max: Option<f64>) -> Result<Warmup, ConfigError> {
    Ok(Warmup {
        warmup_min_lr: p.f64("warmup_min_lr", 0.0)?,
        warmup_max_lr: p.opt_f64("warmup_max_lr")?.or(default_max),
        warmup_num_steps: positive_steps(p, "warmup_num_steps", 1000)?,
        warmup_type: warmup_type(p)?,
    })
}

/// DeepSpeed raises ValueError for a non-positive step count.
fn positive_steps(p: &mut Block<'_>, key: &'static str, default: u64) -> Result<u64, ConfigError> {
    let Some(m) = p.member(key) else {
        return Ok(default);
    };
    let v = p.as_i64(m)?;
    if v <= 0 {
        return Err(p.invalid(m, format!("must be a positive integer, got {v}")));
    }
    Ok(v as u64)
}

fn missing(p: &Block<'_>, key: &str, what: &str) -> ConfigError {
    ConfigError::InvalidValue {
        at: p.location(),
        key: p.key_path(key),
        message: format!("missing; this scheduler needs {what}"),
    }
}

fn required_steps(p: &mut Block<'_>, key: &'static str) -> Result<u64, ConfigError> {
    if !p.has(key) {
        p.member(key);
        return Err(missing(p, key, "the total number of training steps"));
    }
    positive_steps(p, key, 0)
}

fn required_f64(p: &mut Block<'_>, key: &'static str) -> Result<f64, ConfigError> {
    match p.opt_f64(key)? {
        Some(v) => Ok(v),
        None => Err(missing(p, key, "a learning rate")),
    }
}
