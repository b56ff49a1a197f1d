//! The config's `scheduler` block mapped onto [`crate::lr_schedule`].

use rustspeed_config::{Scheduler, SchedulerConfig, Warmup, WarmupType as CfgWarmupType};

use crate::lr_schedule::{
    GroupValue, LrRangeTestParams, LrScheduleError, LrScheduleParams, LrScheduler, OneCycleParams,
    WarmupCosineLrParams, WarmupDecayLrParams, WarmupLrParams, WarmupType,
};

fn warmup_type(t: CfgWarmupType) -> WarmupType {
    match t {
        CfgWarmupType::Log => WarmupType::Log,
        CfgWarmupType::Linear => WarmupType::Linear,
    }
}

fn warmup(w: &Warmup) -> WarmupLrParams {
    WarmupLrParams {
        warmup_min_lr: GroupValue::All(w.warmup_min_lr),
        warmup_max_lr: w.warmup_max_lr.map(GroupValue::All),
        warmup_num_steps: Some(w.warmup_num_steps as i64),
        warmup_type: warmup_type(w.warmup_type),
    }
}

pub fn schedule_params(cfg: &SchedulerConfig) -> LrScheduleParams {
    match &cfg.scheduler {
        Scheduler::WarmupLR(w) => LrScheduleParams::WarmupLr(warmup(w)),
        Scheduler::WarmupDecayLR {
            warmup: w,
            total_num_steps,
        } => LrScheduleParams::WarmupDecayLr(WarmupDecayLrParams {
            total_num_steps: *total_num_steps as i64,
            warmup: warmup(w),
        }),
        Scheduler::WarmupCosineLR {
            total_num_steps,
            warmup_min_ratio,
            warmup_num_steps,
            cos_min_ratio,
            warmup_type: t,
        } => LrScheduleParams::WarmupCosineLr(WarmupCosineLrParams {
            total_num_steps: *total_num_steps as i64,
            warmup_min_ratio: *warmup_min_ratio,
            warmup_num_steps: Some(*warmup_num_steps as i64),
            cos_min_ratio: *cos_min_ratio,
            warmup_type: warmup_type(*t),
        }),
        Scheduler::OneCycle {
            cycle_min_lr,
            cycle_max_lr,
            decay_lr_rate,
            cycle_first_step_size,
            cycle_second_step_size,
            cycle_first_stair_count,
            cycle_second_stair_count,
            decay_step_size,
            cycle_momentum,
            cycle_min_mom,
            cycle_max_mom,
            decay_mom_rate,
        } => LrScheduleParams::OneCycle(OneCycleParams {
            decay_lr_rate: *decay_lr_rate,
            cycle_first_step_size: *cycle_first_step_size as f64,
            cycle_second_step_size: cycle_second_step_size.map(|s| s as f64),
            cycle_first_stair_count: *cycle_first_stair_count as i64,
            cycle_second_stair_count: cycle_second_stair_count.map(|s| s as i64),
            decay_step_size: *decay_step_size as f64,
            cycle_momentum: *cycle_momentum,
            cycle_min_mom: GroupValue::All(*cycle_min_mom),
            cycle_max_mom: GroupValue::All(*cycle_max_mom),
            decay_mom_rate: *decay_mom_rate,
            ..OneCycleParams::new(*cycle_min_lr, *cycle_max_lr)
        }),
        Scheduler::LRRangeTest {
            lr_range_test_min_lr,
            lr_range_test_step_size,
            lr_range_test_step_rate,
            lr_range_test_staircase,
        } => LrScheduleParams::LrRangeTest(LrRangeTestParams {
            lr_range_test_min_lr: GroupValue::All(*lr_range_test_min_lr),
            lr_range_test_step_size: *lr_range_test_step_size as i64,
            lr_range_test_step_rate: *lr_range_test_step_rate,
            lr_range_test_staircase: *lr_range_test_staircase,
        }),
    }
}

/// Builds the scheduler at `last_batch_iteration` (DeepSpeed's constructor argument, -1 for a
/// fresh run), so construction already sets the first step's (minimum) lr.
pub fn build(
    cfg: &SchedulerConfig,
    base_lrs: &[f64],
    optimizer_has_betas: bool,
) -> Result<LrScheduler, LrScheduleError> {
    let mut s = LrScheduler::new(&schedule_params(cfg), base_lrs, optimizer_has_betas)?;
    s.step_to(cfg.last_batch_iteration);
    Ok(s)
}
