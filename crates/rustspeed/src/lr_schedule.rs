//! DeepSpeed's learning-rate schedules (deepspeed/runtime/lr_schedules.py): WarmupLR,
//! WarmupDecayLR, WarmupCosineLR, OneCycle (with beta1 cycling) and LRRangeTest; plus HF
//! Trainer's own schedules (`--lr-scheduler-type`), which HF uses when the DeepSpeed config has
//! no `scheduler` block.
//!
//! Order of events, as in DeepSpeed: `last_batch_iteration` starts at -1 and construction
//! already sets the minimum LR, so the first optimizer step runs at it; the engine calls
//! [`LrScheduler::step`] after each applied optimizer step (not after an overflow-skipped
//! one). Every value is a pure function of `last_batch_iteration`, which is the whole
//! serialisable state, so a resumed schedule continues exactly.

use serde::{Deserialize, Serialize};

/// A scalar for every parameter group, or one value per group.
#[derive(Clone, Debug, PartialEq)]
pub enum GroupValue {
    All(f64),
    PerGroup(Vec<f64>),
}

impl From<f64> for GroupValue {
    fn from(v: f64) -> Self {
        GroupValue::All(v)
    }
}

impl GroupValue {
    fn resolve(&self, groups: usize, name: &'static str) -> Result<Vec<f64>, LrScheduleError> {
        match self {
            GroupValue::All(v) => Ok(vec![*v; groups]),
            GroupValue::PerGroup(vs) if vs.len() == groups => Ok(vs.clone()),
            GroupValue::PerGroup(vs) => Err(LrScheduleError::GroupCount {
                name,
                expected: groups,
                got: vs.len(),
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WarmupType {
    #[default]
    Log,
    Linear,
}

impl WarmupType {
    /// DeepSpeed's rule: an unknown name logs a warning and falls back to `log`.
    pub fn parse(name: &str) -> WarmupType {
        match name {
            "log" => WarmupType::Log,
            "linear" => WarmupType::Linear,
            other => {
                tracing::warn!(
                    "Using unknown warmup_type: {other}. The increasing function is set to default (log)"
                );
                WarmupType::Log
            }
        }
    }
}

/// `WarmupLR`: min → max over `warmup_num_steps`, then constant.
#[derive(Clone, Debug, PartialEq)]
pub struct WarmupLrParams {
    pub warmup_min_lr: GroupValue,
    /// `None`: each group's optimizer lr.
    pub warmup_max_lr: Option<GroupValue>,
    /// `None` mirrors a JSON null, which DeepSpeed rejects.
    pub warmup_num_steps: Option<i64>,
    pub warmup_type: WarmupType,
}

impl Default for WarmupLrParams {
    fn default() -> Self {
        WarmupLrParams {
            warmup_min_lr: GroupValue::All(0.0),
            warmup_max_lr: None,
            warmup_num_steps: Some(1000),
            warmup_type: WarmupType::Log,
        }
    }
}

/// `WarmupDecayLR`: WarmupLR, then linear decay to 0 at `total_num_steps`.
#[derive(Clone, Debug, PartialEq)]
pub struct WarmupDecayLrParams {
    pub total_num_steps: i64,
    pub warmup: WarmupLrParams,
}

impl WarmupDecayLrParams {
    /// DeepSpeed's defaults; unlike WarmupLR, `warmup_max_lr` defaults to 0.001.
    pub fn new(total_num_steps: i64) -> Self {
        WarmupDecayLrParams {
            total_num_steps,
            warmup: WarmupLrParams {
                warmup_max_lr: Some(GroupValue::All(0.001)),
                ..Default::default()
            },
        }
    }
}

/// `WarmupCosineLR`: a ratio of each group's optimizer lr.
#[derive(Clone, Debug, PartialEq)]
pub struct WarmupCosineLrParams {
    pub total_num_steps: i64,
    pub warmup_min_ratio: f64,
    pub warmup_num_steps: Option<i64>,
    pub cos_min_ratio: f64,
    pub warmup_type: WarmupType,
}

impl WarmupCosineLrParams {
    pub fn new(total_num_steps: i64) -> Self {
        WarmupCosineLrParams {
            total_num_steps,
            warmup_min_ratio: 0.0,
            warmup_num_steps: Some(1000),
            cos_min_ratio: 0.0001,
            warmup_type: WarmupType::Log,
        }
    }
}

/// `OneCycle`: a triangular lr cycle with inverse beta1 cycling, then optional decay.
#[derive(Clone, Debug, PartialEq)]
pub struct OneCycleParams {
    pub cycle_min_lr: GroupValue,
    pub cycle_max_lr: GroupValue,
    pub decay_lr_rate: f64,
    pub cycle_first_step_size: f64,
    /// `None`: same as the first.
    pub cycle_second_step_size: Option<f64>,
    pub cycle_first_stair_count: i64,
    /// `None`: same as the first.
    pub cycle_second_stair_count: Option<i64>,
    pub decay_step_size: f64,
    pub cycle_momentum: bool,
    pub cycle_min_mom: GroupValue,
    pub cycle_max_mom: GroupValue,
    pub decay_mom_rate: f64,
}

impl OneCycleParams {
    pub fn new(cycle_min_lr: impl Into<GroupValue>, cycle_max_lr: impl Into<GroupValue>) -> Self {
        OneCycleParams {
            cycle_min_lr: cycle_min_lr.into(),
            cycle_max_lr: cycle_max_lr.into(),
            decay_lr_rate: 0.0,
            cycle_first_step_size: 2000.0,
            cycle_second_step_size: None,
            cycle_first_stair_count: 0,
            cycle_second_stair_count: None,
            decay_step_size: 0.0,
            cycle_momentum: true,
            cycle_min_mom: GroupValue::All(0.8),
            cycle_max_mom: GroupValue::All(0.9),
            decay_mom_rate: 0.0,
        }
    }
}

/// `LRRangeTest`: lr grows linearly (or in stairs) from the minimum.
#[derive(Clone, Debug, PartialEq)]
pub struct LrRangeTestParams {
    pub lr_range_test_min_lr: GroupValue,
    pub lr_range_test_step_size: i64,
    pub lr_range_test_step_rate: f64,
    pub lr_range_test_staircase: bool,
}

impl Default for LrRangeTestParams {
    fn default() -> Self {
        LrRangeTestParams {
            lr_range_test_min_lr: GroupValue::All(1e-3),
            lr_range_test_step_size: 2000,
            lr_range_test_step_rate: 1.0,
            lr_range_test_staircase: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum LrScheduleParams {
    WarmupLr(WarmupLrParams),
    WarmupDecayLr(WarmupDecayLrParams),
    WarmupCosineLr(WarmupCosineLrParams),
    OneCycle(OneCycleParams),
    LrRangeTest(LrRangeTestParams),
    /// HF Trainer's `get_scheduler(name, num_warmup_steps, num_training_steps)`.
    Hf(HfScheduleParams),
}

/// HF Trainer's `lr_scheduler_type` values that rustspeed implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfScheduleType {
    /// Linear warmup from 0, then linear decay to 0 at the last step (HF's default).
    Linear,
    /// Linear warmup, then half a cosine wave down to 0.
    Cosine,
    Constant,
    ConstantWithWarmup,
}

impl HfScheduleType {
    pub const NAMES: [&'static str; 4] = ["linear", "cosine", "constant", "constant_with_warmup"];

    pub fn parse(name: &str) -> Option<HfScheduleType> {
        Some(match name {
            "linear" => HfScheduleType::Linear,
            "cosine" => HfScheduleType::Cosine,
            "constant" => HfScheduleType::Constant,
            "constant_with_warmup" => HfScheduleType::ConstantWithWarmup,
            _ => return None,
        })
    }

    /// The factor on the base lr at optimizer step `step` (0-based), transformers'
    /// `optimization.py` lambdas.
    pub fn factor(self, step: u64, warmup: u64, total: u64) -> f64 {
        let warming = step < warmup && self != HfScheduleType::Constant;
        if warming {
            return step as f64 / warmup.max(1) as f64;
        }
        match self {
            HfScheduleType::Constant | HfScheduleType::ConstantWithWarmup => 1.0,
            HfScheduleType::Linear => (total.saturating_sub(step) as f64
                / total.saturating_sub(warmup).max(1) as f64)
                .max(0.0),
            HfScheduleType::Cosine => {
                let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HfScheduleParams {
    pub kind: HfScheduleType,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

/// DeepSpeed raises `ValueError` for these; the messages keep its wording.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LrScheduleError {
    #[error("{scheduler}: warmup_num_steps must be a positive integer, got {got}")]
    WarmupNumSteps {
        scheduler: &'static str,
        got: String,
    },
    #[error("expected {expected} value for {name}, got {got} (one per optimizer parameter group)")]
    GroupCount {
        name: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("OneCycle: cycle_first_step_size must be positive, got {0}")]
    CycleFirstStepSize(f64),
    #[error("OneCycle: cycle_second_step_size must be non-negative, got {0}")]
    CycleSecondStepSize(f64),
    #[error("LRRangeTest: lr_range_test_step_size must be a positive integer, got {0}")]
    RangeTestStepSize(i64),
    #[error("{scheduler}: the optimizer has no parameter groups (expected at least one base lr)")]
    NoGroups { scheduler: &'static str },
}

/// The scheduler's checkpointed state, DeepSpeed's `state_dict()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LrSchedulerState {
    pub last_batch_iteration: i64,
}

#[derive(Clone, Debug)]
enum Kind {
    Warmup {
        min: Vec<f64>,
        delta: Vec<f64>,
        w: i64,
        inverse_log: f64,
        ty: WarmupType,
        /// Some(total) for WarmupDecayLR.
        decay_total: Option<i64>,
    },
    Cosine {
        org_lrs: Vec<f64>,
        total: i64,
        w: i64,
        inverse_log: f64,
        ty: WarmupType,
        warmup_min_ratio: f64,
        cos_min_ratio: f64,
    },
    OneCycle(Box<OneCycle>),
    RangeTest {
        min: Vec<f64>,
        step_size: i64,
        step_rate: f64,
        staircase: bool,
    },
    Hf {
        base: Vec<f64>,
        params: HfScheduleParams,
    },
}

#[derive(Clone, Debug)]
struct OneCycle {
    min_lrs: Vec<f64>,
    max_lrs: Vec<f64>,
    decay_lr_rate: f64,
    total_size: f64,
    step_ratio: f64,
    first_step_size: f64,
    second_step_size: f64,
    first_stair_count: i64,
    second_stair_count: i64,
    decay_step_size: f64,
    skip_lr_decay: bool,
    skip_mom_decay: bool,
    /// None when momentum cycling is off or the optimizer has no betas.
    moms: Option<(Vec<f64>, Vec<f64>)>,
    decay_mom_rate: f64,
}

/// beta2 that OneCycle writes with every beta1 (DeepSpeed hard-codes it, overriding the
/// optimizer's own beta2).
pub const ONE_CYCLE_BETA2: f64 = 0.99;

#[derive(Clone, Debug)]
pub struct LrScheduler {
    kind: Kind,
    last_batch_iteration: i64,
}

fn warmup_steps(scheduler: &'static str, w: Option<i64>) -> Result<i64, LrScheduleError> {
    match w {
        Some(w) if w > 0 => Ok(w.max(2)),
        Some(w) => Err(LrScheduleError::WarmupNumSteps {
            scheduler,
            got: w.to_string(),
        }),
        None => Err(LrScheduleError::WarmupNumSteps {
            scheduler,
            got: "None".into(),
        }),
    }
}

impl LrScheduler {
    /// `base_lrs`: each parameter group's optimizer lr. `optimizer_has_betas`: whether
    /// OneCycle may cycle beta1 (DeepSpeed disables it, with a warning, otherwise).
    pub fn new(
        params: &LrScheduleParams,
        base_lrs: &[f64],
        optimizer_has_betas: bool,
    ) -> Result<LrScheduler, LrScheduleError> {
        let groups = base_lrs.len();
        let kind = match params {
            LrScheduleParams::WarmupLr(p) => Self::warmup("WarmupLR", p, base_lrs, None)?,
            LrScheduleParams::WarmupDecayLr(p) => {
                let k = Self::warmup(
                    "WarmupDecayLR",
                    &p.warmup,
                    base_lrs,
                    Some(p.total_num_steps),
                )?;
                if let Kind::Warmup { w, .. } = k {
                    if p.total_num_steps < w {
                        tracing::warn!(
                            "total_num_steps {} is less than warmup_num_steps {w}",
                            p.total_num_steps
                        );
                    }
                }
                k
            }
            LrScheduleParams::WarmupCosineLr(p) => {
                let w = warmup_steps("WarmupCosineLR", p.warmup_num_steps)?;
                if groups == 0 {
                    return Err(LrScheduleError::NoGroups {
                        scheduler: "WarmupCosineLR",
                    });
                }
                if p.total_num_steps < w {
                    tracing::warn!(
                        "total_num_steps {} is less than warmup_num_steps {w}",
                        p.total_num_steps
                    );
                }
                Kind::Cosine {
                    org_lrs: base_lrs.to_vec(),
                    total: p.total_num_steps,
                    w,
                    inverse_log: 1.0 / (w as f64).ln(),
                    ty: p.warmup_type,
                    warmup_min_ratio: p.warmup_min_ratio,
                    cos_min_ratio: p.cos_min_ratio,
                }
            }
            LrScheduleParams::OneCycle(p) => Self::one_cycle(p, groups, optimizer_has_betas)?,
            LrScheduleParams::Hf(p) => Kind::Hf {
                base: base_lrs.to_vec(),
                params: *p,
            },
            LrScheduleParams::LrRangeTest(p) => {
                if groups == 0 {
                    return Err(LrScheduleError::NoGroups {
                        scheduler: "LRRangeTest",
                    });
                }
                if p.lr_range_test_step_size <= 0 {
                    return Err(LrScheduleError::RangeTestStepSize(
                        p.lr_range_test_step_size,
                    ));
                }
                Kind::RangeTest {
                    min: p
                        .lr_range_test_min_lr
                        .resolve(groups, "lr_range_test_min_lr")?,
                    step_size: p.lr_range_test_step_size,
                    step_rate: p.lr_range_test_step_rate,
                    staircase: p.lr_range_test_staircase,
                }
            }
        };
        Ok(LrScheduler {
            kind,
            last_batch_iteration: -1,
        })
    }

    fn warmup(
        name: &'static str,
        p: &WarmupLrParams,
        base_lrs: &[f64],
        decay_total: Option<i64>,
    ) -> Result<Kind, LrScheduleError> {
        let w = warmup_steps(name, p.warmup_num_steps)?;
        let groups = base_lrs.len();
        if groups == 0 {
            return Err(LrScheduleError::NoGroups { scheduler: name });
        }
        let max = match &p.warmup_max_lr {
            Some(v) => v.resolve(groups, "max_lr")?,
            None => base_lrs.to_vec(),
        };
        let min = p.warmup_min_lr.resolve(groups, "min_lr")?;
        let delta = max.iter().zip(&min).map(|(a, b)| a - b).collect();
        Ok(Kind::Warmup {
            min,
            delta,
            w,
            inverse_log: 1.0 / (w as f64).ln(),
            ty: p.warmup_type,
            decay_total,
        })
    }

    fn one_cycle(
        p: &OneCycleParams,
        groups: usize,
        has_betas: bool,
    ) -> Result<Kind, LrScheduleError> {
        let first = p.cycle_first_step_size;
        let second = p.cycle_second_step_size.unwrap_or(first);
        if first.is_nan() || first <= 0.0 {
            return Err(LrScheduleError::CycleFirstStepSize(first));
        }
        if second.is_nan() || second < 0.0 {
            return Err(LrScheduleError::CycleSecondStepSize(second));
        }
        if groups == 0 {
            return Err(LrScheduleError::NoGroups {
                scheduler: "OneCycle",
            });
        }
        let total_size = first + second;
        let no_decay_steps = p.decay_step_size == 0.0;
        let moms = if p.cycle_momentum && has_betas {
            Some((
                p.cycle_min_mom.resolve(groups, "cycle_min_mom")?,
                p.cycle_max_mom.resolve(groups, "cycle_max_mom")?,
            ))
        } else {
            if p.cycle_momentum {
                tracing::warn!(
                    "cycle_momentum is disabled because the optimizer does not support momentum (no betas)"
                );
            }
            None
        };
        Ok(Kind::OneCycle(Box::new(OneCycle {
            min_lrs: p.cycle_min_lr.resolve(groups, "cycle_min_lr")?,
            max_lrs: p.cycle_max_lr.resolve(groups, "cycle_max_lr")?,
            decay_lr_rate: p.decay_lr_rate,
            total_size,
            step_ratio: first / total_size,
            first_step_size: first,
            second_step_size: second,
            first_stair_count: p.cycle_first_stair_count,
            second_stair_count: p
                .cycle_second_stair_count
                .unwrap_or(p.cycle_first_stair_count),
            decay_step_size: p.decay_step_size,
            skip_lr_decay: no_decay_steps || p.decay_lr_rate == 0.0,
            skip_mom_decay: no_decay_steps || p.decay_mom_rate == 0.0,
            moms,
            decay_mom_rate: p.decay_mom_rate,
        })))
    }

    /// Advances one batch (call after each applied optimizer step).
    pub fn step(&mut self) {
        self.last_batch_iteration += 1;
    }

    /// DeepSpeed's `step(batch_iteration)`: jumps to an iteration.
    pub fn step_to(&mut self, last_batch_iteration: i64) {
        self.last_batch_iteration = last_batch_iteration;
    }

    pub fn last_batch_iteration(&self) -> i64 {
        self.last_batch_iteration
    }

    pub fn state(&self) -> LrSchedulerState {
        LrSchedulerState {
            last_batch_iteration: self.last_batch_iteration,
        }
    }

    pub fn load_state(&mut self, state: LrSchedulerState) {
        self.last_batch_iteration = state.last_batch_iteration;
    }

    /// The per-group lr the next optimizer step uses (DeepSpeed's `get_lr()`, which at
    /// iteration -1 equals what construction wrote into the param groups).
    pub fn lr(&self) -> Vec<f64> {
        let i = self.last_batch_iteration;
        match &self.kind {
            Kind::Warmup {
                min,
                delta,
                w,
                inverse_log,
                ty,
                decay_total,
            } => {
                if i < 0 {
                    return min.clone();
                }
                let gamma = if i < *w {
                    warmup_fraction(*ty, i, *w, *inverse_log)
                } else if let Some(total) = decay_total {
                    ((total - i) as f64 / 1f64.max((total - w) as f64)).max(0.0)
                } else {
                    1.0
                };
                min.iter().zip(delta).map(|(m, d)| m + d * gamma).collect()
            }
            Kind::Cosine { org_lrs, .. } => {
                let ratio = self.cosine_ratio();
                org_lrs.iter().map(|lr| lr * ratio).collect()
            }
            Kind::OneCycle(c) => {
                if (i as f64) < c.total_size {
                    let scale = c.scale_factor(i);
                    c.min_lrs
                        .iter()
                        .zip(&c.max_lrs)
                        .map(|(lo, hi)| lo + (hi - lo) * scale)
                        .collect()
                } else if c.skip_lr_decay {
                    c.min_lrs.clone()
                } else {
                    let n = (i as f64 - c.total_size + 1.0) / c.decay_step_size;
                    let factor = 1.0 + c.decay_lr_rate * n;
                    c.min_lrs.iter().map(|lo| lo / factor).collect()
                }
            }
            Kind::RangeTest {
                min,
                step_size,
                step_rate,
                staircase,
            } => {
                let x = (i + 1) as f64 / *step_size as f64;
                let interval = if *staircase { x.floor() } else { x };
                let increase = 1.0 + step_rate * interval;
                min.iter().map(|m| m * increase).collect()
            }
            // HF's LambdaLR gives step k (0-based) the factor at k; the next step here is
            // k = last_batch_iteration + 1.
            Kind::Hf { base, params } => {
                let f = params
                    .kind
                    .factor((i + 1) as u64, params.warmup_steps, params.total_steps);
                base.iter().map(|b| b * f).collect()
            }
        }
    }

    /// WarmupCosineLR's `get_lr_ratio()`; 1.0 for the other schedules.
    pub fn lr_ratio(&self) -> f64 {
        match self.kind {
            Kind::Cosine { .. } => self.cosine_ratio(),
            _ => 1.0,
        }
    }

    fn cosine_ratio(&self) -> f64 {
        let Kind::Cosine {
            total,
            w,
            inverse_log,
            ty,
            warmup_min_ratio,
            cos_min_ratio,
            ..
        } = &self.kind
        else {
            return 1.0;
        };
        let i = self.last_batch_iteration;
        if i < 0 {
            return 0.0;
        }
        if i < *w {
            let r = warmup_fraction(*ty, i, *w, *inverse_log);
            return warmup_min_ratio + r * (1.0 - warmup_min_ratio);
        }
        let real_last_step = (i - w + 1) as f64;
        let real_total_steps = 1f64.max((total - w) as f64);
        let progress = (real_last_step / real_total_steps).min(1.0);
        let ratio = (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0;
        (cos_min_ratio + (1.0 - cos_min_ratio) * ratio).max(0.0)
    }

    /// The (beta1, beta2) the next optimizer step uses, for OneCycle with momentum cycling;
    /// `None` otherwise. At iteration -1 this is `(cycle_min_mom, 0.99)`: DeepSpeed writes the
    /// minimum momentum at construction, even though its `get_mom()` formula gives the
    /// maximum there (see [`LrScheduler::get_mom`]).
    pub fn momentum(&self) -> Option<Vec<(f64, f64)>> {
        let Kind::OneCycle(c) = &self.kind else {
            return None;
        };
        let (min_moms, _) = c.moms.as_ref()?;
        if self.last_batch_iteration == -1 {
            return Some(min_moms.iter().map(|m| (*m, ONE_CYCLE_BETA2)).collect());
        }
        self.get_mom()
    }

    /// DeepSpeed's `OneCycle.get_mom()` at the current iteration: beta1 moves opposite to
    /// the lr during the cycle, then decays (grows by `1 + rate * n`) if configured.
    pub fn get_mom(&self) -> Option<Vec<(f64, f64)>> {
        let Kind::OneCycle(c) = &self.kind else {
            return None;
        };
        let (min_moms, max_moms) = c.moms.as_ref()?;
        let i = self.last_batch_iteration;
        let beta1: Vec<f64> = if (i as f64) < c.total_size {
            let scale = c.scale_factor(i);
            min_moms
                .iter()
                .zip(max_moms)
                .map(|(lo, hi)| hi - (hi - lo) * scale)
                .collect()
        } else if c.skip_mom_decay {
            max_moms.clone()
        } else {
            let n = (i as f64 - c.total_size + 1.0) / c.decay_step_size;
            let factor = 1.0 + c.decay_mom_rate * n;
            max_moms.iter().map(|m| m * factor).collect()
        };
        Some(beta1.into_iter().map(|b| (b, ONE_CYCLE_BETA2)).collect())
    }
}

fn warmup_fraction(ty: WarmupType, i: i64, w: i64, inverse_log: f64) -> f64 {
    match ty {
        WarmupType::Log => inverse_log * ((i + 1) as f64).ln(),
        WarmupType::Linear => i as f64 / w as f64,
    }
}

impl OneCycle {
    fn scale_factor(&self, last_batch_iteration: i64) -> f64 {
        let b = (last_batch_iteration + 1) as f64;
        let cycle = (1.0 + b / self.total_size).floor();
        let x = 1.0 + b / self.total_size - cycle;
        let (scale, stairs) = if x <= self.step_ratio {
            (x / self.step_ratio, self.first_stair_count)
        } else {
            ((x - 1.0) / (self.step_ratio - 1.0), self.second_stair_count)
        };
        if stairs <= 0 {
            return scale;
        }
        // Quantise from the integer batch offset, not from `scale`, whose rounding can land
        // just under a stair (DeepSpeed does the same).
        let stairs = stairs as f64;
        let ci = b % self.total_size;
        let position = if ci <= self.first_step_size {
            ci * stairs / self.first_step_size
        } else {
            (self.total_size - ci) * stairs / self.second_step_size
        };
        position.floor() / stairs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lrs_at(s: &mut LrScheduler, iters: &[i64]) -> Vec<f64> {
        iters
            .iter()
            .map(|&i| {
                s.step_to(i);
                s.lr()[0]
            })
            .collect()
    }

    fn close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol, "[{k}]: got {g}, want {w} (±{tol})");
        }
    }

    /// transformers 5.24 `get_scheduler(name, opt, num_warmup_steps=3, num_training_steps=10)`
    /// with lr 1e-3: the lr of optimizer steps 0..12.
    #[test]
    fn hf_schedules_match_transformers() {
        let cases: [(&str, [f64; 12]); 4] = [
            (
                "linear",
                [
                    0.0,
                    3.333333333e-4,
                    6.666666667e-4,
                    1e-3,
                    8.571428571e-4,
                    7.142857143e-4,
                    5.714285714e-4,
                    4.285714286e-4,
                    2.857142857e-4,
                    1.428571429e-4,
                    0.0,
                    0.0,
                ],
            ),
            (
                "cosine",
                [
                    0.0,
                    3.333333333e-4,
                    6.666666667e-4,
                    1e-3,
                    9.50484434e-4,
                    8.117449009e-4,
                    6.11260467e-4,
                    3.88739533e-4,
                    1.882550991e-4,
                    4.951556605e-5,
                    0.0,
                    4.951556605e-5,
                ],
            ),
            ("constant", [1e-3; 12]),
            (
                "constant_with_warmup",
                [
                    0.0,
                    3.333333333e-4,
                    6.666666667e-4,
                    1e-3,
                    1e-3,
                    1e-3,
                    1e-3,
                    1e-3,
                    1e-3,
                    1e-3,
                    1e-3,
                    1e-3,
                ],
            ),
        ];
        for (name, want) in cases {
            let kind = HfScheduleType::parse(name).unwrap();
            let params = HfScheduleParams {
                kind,
                warmup_steps: 3,
                total_steps: 10,
            };
            let mut s = LrScheduler::new(&LrScheduleParams::Hf(params), &[1e-3], true).unwrap();
            let mut got = Vec::new();
            for _ in 0..12 {
                got.push(s.lr()[0]);
                s.step();
            }
            close(&got, &want, 1e-12);
        }
        assert_eq!(HfScheduleType::parse("polynomial"), None);
    }

    fn warmup(min: f64, max: Option<f64>, w: i64, ty: WarmupType) -> LrScheduleParams {
        LrScheduleParams::WarmupLr(WarmupLrParams {
            warmup_min_lr: GroupValue::All(min),
            warmup_max_lr: max.map(GroupValue::All),
            warmup_num_steps: Some(w),
            warmup_type: ty,
        })
    }

    /// T5: test_lr_warmup_schedule. lr[i] is read after i steps (i.e. at iteration i).
    #[test]
    fn warmup_lr_reaches_max_at_w_then_stays() {
        for w in [10, 15, 19, 33] {
            for ty in [WarmupType::Log, WarmupType::Linear] {
                let mut s = LrScheduler::new(&warmup(0.1, Some(0.2), w, ty), &[1.0], true).unwrap();
                assert_eq!(s.lr(), [0.1], "construction sets the minimum");
                let mut lrs = Vec::new();
                for _ in 0..(w + 10) {
                    s.step();
                    lrs.push(s.lr()[0]);
                }
                // step_lrs[i] = lr at iteration i.
                assert_eq!(lrs[0], 0.1, "w={w} {ty:?}");
                assert_eq!(lrs[w as usize], 0.2, "w={w} {ty:?}");
                assert!(lrs[w as usize..].iter().all(|&x| x == 0.2));
                assert!(lrs[..w as usize].windows(2).all(|p| p[0] < p[1]));
            }
        }
    }

    #[test]
    fn warmup_lr_values() {
        let mut s =
            LrScheduler::new(&warmup(0.0, Some(1e-3), 10, WarmupType::Log), &[1.0], true).unwrap();
        close(
            &lrs_at(&mut s, &[0, 1, 5, 9, 10]),
            &[0.0, 3.0103e-4, 7.7815e-4, 1e-3, 1e-3],
            1e-8,
        );
        let mut s = LrScheduler::new(
            &warmup(0.0, Some(1e-3), 10, WarmupType::Linear),
            &[1.0],
            true,
        )
        .unwrap();
        close(
            &lrs_at(&mut s, &[0, 1, 5, 9, 10]),
            &[0.0, 1e-4, 5e-4, 9e-4, 1e-3],
            1e-15,
        );
    }

    #[test]
    fn warmup_decay_lr_values() {
        let mut p = WarmupDecayLrParams::new(100);
        p.warmup.warmup_num_steps = Some(10);
        let mut s = LrScheduler::new(&LrScheduleParams::WarmupDecayLr(p), &[1.0], true).unwrap();
        close(
            &lrs_at(&mut s, &[9, 10, 55, 99, 100, 120]),
            &[1e-3, 1e-3, 5e-4, 1.111e-5, 0.0, 0.0],
            1e-8,
        );
    }

    fn cosine(total: i64, w: i64, cos_min: f64, warm_min: f64) -> LrScheduleParams {
        LrScheduleParams::WarmupCosineLr(WarmupCosineLrParams {
            total_num_steps: total,
            warmup_min_ratio: warm_min,
            warmup_num_steps: Some(w),
            cos_min_ratio: cos_min,
            warmup_type: WarmupType::Log,
        })
    }

    #[test]
    fn warmup_cosine_lr_endpoints() {
        for (total, w, cos_min, warm_min) in [
            (100, 10, 0.1, 0.2),
            (200, 20, 0.1, 0.2),
            (500, 30, 0.0, 0.2),
            (600, 300, 0.1, 0.0),
            (600, 550, 0.0, 0.0),
        ] {
            let mut s =
                LrScheduler::new(&cosine(total, w, cos_min, warm_min), &[0.0015], true).unwrap();
            let mut lrs = Vec::new();
            for _ in 0..total {
                s.step();
                lrs.push(s.lr()[0]);
            }
            let case = format!("({total},{w},{cos_min},{warm_min})");
            assert!((lrs[0] - 0.0015 * warm_min).abs() < 1e-7, "{case} first");
            assert!((lrs[w as usize - 1] - 0.0015).abs() < 1e-7, "{case} peak");
            assert!(
                (lrs[total as usize - 1] - 0.0015 * cos_min).abs() < 1e-7,
                "{case} end"
            );
            assert!(
                lrs[..w as usize].windows(2).all(|p| p[0] < p[1]),
                "{case} increase"
            );
            assert!(
                lrs[w as usize..].windows(2).all(|p| p[0] > p[1]),
                "{case} decrease"
            );
        }
    }

    #[test]
    #[allow(clippy::approx_constant)] // REFERENCE T5 lists 0.30103 (log 2 / log 10) literally
    fn warmup_cosine_ratios() {
        let mut s = LrScheduler::new(&cosine(100, 10, 1e-4, 0.0), &[1.0], true).unwrap();
        let ratios: Vec<f64> = [0, 1, 9, 10, 55, 99, 150]
            .iter()
            .map(|&i| {
                s.step_to(i);
                s.lr_ratio()
            })
            .collect();
        close(
            &ratios,
            &[0.0, 0.30103, 1.0, 0.999695, 0.482602, 1e-4, 1e-4],
            1e-6,
        );
    }

    #[test]
    fn warmup_cosine_at_init_then_step_1() {
        let mut s = LrScheduler::new(&cosine(100, 10, 1e-4, 0.0), &[0.1, 0.2], true).unwrap();
        assert_eq!(s.lr(), [0.0, 0.0]);
        assert_eq!(s.lr_ratio(), 0.0);
        s.step_to(1);
        let r = 2f64.ln() / 10f64.ln();
        assert!((s.lr_ratio() - r).abs() < 1e-12);
        close(&s.lr(), &[0.1 * r, 0.2 * r], 1e-12);
    }

    #[test]
    fn warmup_lr_inherits_group_lrs() {
        let p = LrScheduleParams::WarmupLr(WarmupLrParams {
            warmup_num_steps: Some(10),
            ..Default::default()
        });
        let mut s = LrScheduler::new(&p, &[0.1, 0.2], true).unwrap();
        s.step_to(10);
        close(&s.lr(), &[0.1, 0.2], 1e-15);
    }

    #[test]
    fn invalid_warmup_num_steps_rejected() {
        for bad in [None, Some(-5), Some(0)] {
            let p = LrScheduleParams::WarmupLr(WarmupLrParams {
                warmup_num_steps: bad,
                ..Default::default()
            });
            let err = LrScheduler::new(&p, &[0.1], true).unwrap_err();
            assert!(
                err.to_string()
                    .contains("warmup_num_steps must be a positive integer"),
                "{err}"
            );
            let mut d = WarmupDecayLrParams::new(100);
            d.warmup.warmup_num_steps = bad;
            assert!(LrScheduler::new(&LrScheduleParams::WarmupDecayLr(d), &[0.1], true).is_err());
            let mut c = WarmupCosineLrParams::new(100);
            c.warmup_num_steps = bad;
            assert!(LrScheduler::new(&LrScheduleParams::WarmupCosineLr(c), &[0.1], true).is_err());
        }
        let p = LrScheduleParams::WarmupLr(WarmupLrParams {
            warmup_num_steps: Some(-5),
            ..Default::default()
        });
        assert_eq!(
            LrScheduler::new(&p, &[0.1], true).unwrap_err().to_string(),
            "WarmupLR: warmup_num_steps must be a positive integer, got -5"
        );
    }

    fn one_cycle(step: f64) -> OneCycleParams {
        let mut p = OneCycleParams::new(1e-5, 1e-2);
        p.cycle_first_step_size = step;
        p
    }

    #[test]
    fn one_cycle_lr_values() {
        let mut s =
            LrScheduler::new(&LrScheduleParams::OneCycle(one_cycle(10.0)), &[1.0], true).unwrap();
        close(
            &lrs_at(&mut s, &[-1, 4, 9, 14, 18]),
            &[1e-5, 5.005e-3, 1e-2, 5.005e-3, 1.009e-3],
            1e-12,
        );
        // get_lr() read before each step: lr[0] = min, lr[10] = max, up then down.
        let mut s =
            LrScheduler::new(&LrScheduleParams::OneCycle(one_cycle(10.0)), &[1.0], true).unwrap();
        let mut lrs = Vec::new();
        for _ in 0..20 {
            lrs.push(s.lr()[0]);
            s.step();
        }
        assert_eq!(lrs[0], 1e-5);
        assert!((lrs[10] - 1e-2).abs() < 1e-15);
        assert!(lrs[..=10].windows(2).all(|p| p[0] < p[1]));
        assert!(lrs[10..].windows(2).all(|p| p[0] > p[1]));
    }

    /// test_mom: get_mom() before each step starts at max_mom and reaches min_mom at the
    /// peak lr; the betas written at construction are (min_mom, 0.99).
    #[test]
    fn one_cycle_momentum_cycles_inversely() {
        let mut s =
            LrScheduler::new(&LrScheduleParams::OneCycle(one_cycle(10.0)), &[1.0], true).unwrap();
        assert_eq!(s.momentum().unwrap(), [(0.8, 0.99)]);
        let mut moms = Vec::new();
        for _ in 0..20 {
            moms.push(s.get_mom().unwrap()[0].0);
            s.step();
        }
        assert_eq!(moms[0], 0.9);
        assert!((moms[10] - 0.8).abs() < 1e-15);
        assert!(moms[..=10].windows(2).all(|p| p[0] > p[1]));
        assert_eq!(s.momentum(), s.get_mom(), "after a step both agree");
        // No betas in the optimizer: cycling is off.
        let s =
            LrScheduler::new(&LrScheduleParams::OneCycle(one_cycle(10.0)), &[1.0], false).unwrap();
        assert_eq!(s.momentum(), None);
    }

    #[test]
    fn one_cycle_decay_after_cycle() {
        let mut p = one_cycle(10.0);
        p.decay_lr_rate = 0.5;
        p.decay_step_size = 2.0;
        p.decay_mom_rate = 0.1;
        let mut s = LrScheduler::new(&LrScheduleParams::OneCycle(p), &[1.0], true).unwrap();
        // Iteration 23: 4 batches after the cycle, 2 decay intervals.
        s.step_to(23);
        close(&s.lr(), &[1e-5 / 2.0], 1e-18);
        close(&[s.get_mom().unwrap()[0].0], &[0.9 * 1.2], 1e-15);
    }

    #[test]
    fn one_cycle_stairs() {
        let run = |stairs: i64| {
            let mut p = OneCycleParams::new(0.001, 0.01);
            p.cycle_first_step_size = 8.0;
            p.cycle_first_stair_count = stairs;
            let mut s = LrScheduler::new(&LrScheduleParams::OneCycle(p), &[0.001], true).unwrap();
            (0..16)
                .map(|_| {
                    s.step();
                    s.lr()[0]
                })
                .collect::<Vec<f64>>()
        };
        let continuous = run(0);
        let stairs = run(2);
        assert_ne!(stairs, continuous);
        assert_eq!(stairs[0], stairs[1], "flat within a stair");
        assert_eq!(
            run(8),
            continuous,
            "one stair per batch is the continuous schedule"
        );
    }

    #[test]
    fn one_cycle_rejects_bad_step_sizes() {
        for bad in [0.0, -1.0] {
            let err = LrScheduler::new(&LrScheduleParams::OneCycle(one_cycle(bad)), &[1.0], true)
                .unwrap_err();
            assert_eq!(err, LrScheduleError::CycleFirstStepSize(bad));
        }
        let mut p = one_cycle(10.0);
        p.cycle_second_step_size = Some(-1.0);
        assert_eq!(
            LrScheduler::new(&LrScheduleParams::OneCycle(p), &[1.0], true).unwrap_err(),
            LrScheduleError::CycleSecondStepSize(-1.0)
        );
    }

    #[test]
    fn lr_range_test_continuous_and_staircase() {
        let p = LrRangeTestParams {
            lr_range_test_step_size: 10,
            ..Default::default()
        };
        let mut s =
            LrScheduler::new(&LrScheduleParams::LrRangeTest(p.clone()), &[0.5], true).unwrap();
        assert_eq!(s.lr(), [1e-3], "construction sets the minimum");
        close(
            &lrs_at(&mut s, &[0, 9, 19]),
            &[1e-3 * 1.1, 2e-3, 3e-3],
            1e-15,
        );
        let st = LrRangeTestParams {
            lr_range_test_staircase: true,
            ..p
        };
        let mut s = LrScheduler::new(&LrScheduleParams::LrRangeTest(st), &[0.5], true).unwrap();
        close(
            &lrs_at(&mut s, &[0, 8, 9, 18, 19]),
            &[1e-3, 1e-3, 2e-3, 2e-3, 3e-3],
            1e-15,
        );
        let bad = LrRangeTestParams {
            lr_range_test_step_size: 0,
            ..Default::default()
        };
        assert!(LrScheduler::new(&LrScheduleParams::LrRangeTest(bad), &[0.5], true).is_err());
    }

    #[test]
    fn per_group_values_and_state_round_trip() {
        let p = LrScheduleParams::WarmupLr(WarmupLrParams {
            warmup_min_lr: GroupValue::PerGroup(vec![0.0, 0.1]),
            warmup_num_steps: Some(4),
            warmup_type: WarmupType::Linear,
            ..Default::default()
        });
        let mut s = LrScheduler::new(&p, &[1.0, 2.0], true).unwrap();
        s.step();
        s.step();
        s.step();
        let json = serde_json::to_string(&s.state()).unwrap();
        assert_eq!(json, r#"{"last_batch_iteration":2}"#);
        let mut t = LrScheduler::new(&p, &[1.0, 2.0], true).unwrap();
        t.load_state(serde_json::from_str(&json).unwrap());
        assert_eq!(t.lr(), s.lr());
        close(&s.lr(), &[0.5, 0.1 + 1.9 * 0.5], 1e-15);
        let err = LrScheduler::new(&p, &[1.0, 2.0, 3.0], true).unwrap_err();
        assert_eq!(
            err,
            LrScheduleError::GroupCount {
                name: "min_lr",
                expected: 3,
                got: 2
            }
        );
    }
}
