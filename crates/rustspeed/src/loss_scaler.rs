//! Loss scaling for fp16: DeepSpeed's static `LossScaler`, its ZeRO-path
//! `DynamicLossScaler` (deepspeed/runtime/fp16/loss_scaler.py) and the non-ZeRO fused
//! FP16_Optimizer rule (fused_optimizer.py `_update_scale`).
//!
//! Differences between the two dynamic rules, both kept exactly:
//! - ZeRO: an overflow first spends hysteresis (the scale holds), and at the minimum scale
//!   the run aborts (`raise_error_at_min_scale`).
//! - Fused: every overflow halves the scale (clamped at the minimum), hysteresis is ignored
//!   and it never aborts.
//!
//! In both, after an overflow the scale doubles once `scale_window` clean iterations have
//! passed, and again every `scale_window` after that. Where DeepSpeed aborts we abort too,
//! but the error lists the recent updates and points at bf16 (DeepSpeed's users mostly hit
//! this message without knowing what led to it).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// DeepSpeed's sentence, kept verbatim so existing searches and scripts still match.
pub const MIN_SCALE_MESSAGE: &str =
    "Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.";

/// How many recent updates an abort message reports.
pub const HISTORY_LEN: usize = 20;

/// Which update rule a dynamic scaler follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DynamicRule {
    /// ZeRO 1/2/3 `DynamicLossScaler`: hysteresis, abort at the minimum.
    Zero,
    /// Non-ZeRO fused FP16_Optimizer: no hysteresis, clamps at the minimum, never aborts.
    Fused,
}

/// `fp16` block values, mapped as DeepSpeed's `dynamic_loss_scale_args`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DynamicLossScaleParams {
    /// `2 ** initial_scale_power`.
    pub init_scale: f64,
    /// `loss_scale_window`.
    pub scale_window: u64,
    /// `min_loss_scale`.
    pub min_scale: f64,
    /// `hysteresis` (DeepSpeed's `delayed_shift`).
    pub delayed_shift: u32,
    pub consecutive_hysteresis: bool,
    pub raise_error_at_min_scale: bool,
    pub scale_factor: f64,
}

impl Default for DynamicLossScaleParams {
    /// DeepSpeed's `fp16` defaults: initial_scale_power 16, window 1000, hysteresis 2,
    /// min 1, no consecutive hysteresis.
    fn default() -> Self {
        DynamicLossScaleParams {
            init_scale: 65536.0,
            scale_window: 1000,
            min_scale: 1.0,
            delayed_shift: 2,
            consecutive_hysteresis: false,
            raise_error_at_min_scale: true,
            scale_factor: 2.0,
        }
    }
}

/// One `update_scale` call, for the abort message.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScaleUpdate {
    pub iteration: u64,
    pub overflow: bool,
    pub scale_before: f64,
    pub scale_after: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LossScaleError {
    #[error("{}", min_scale_text(*.min_scale, .history))]
    AtMinimum {
        min_scale: f64,
        history: Vec<ScaleUpdate>,
    },
    #[error("invalid dynamic loss scaling: {key} = {value}, expected {expected}")]
    InvalidParam {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
}

fn min_scale_text(min_scale: f64, history: &[ScaleUpdate]) -> String {
    let overflows = history.iter().filter(|u| u.overflow).count();
    let mut s = format!(
        "{MIN_SCALE_MESSAGE}\nThe fp16 loss scale is at min_loss_scale = {min_scale} and the gradients \
         still overflow: {overflows} of the last {} updates overflowed.\n\
         iteration  overflow  scale before -> after\n",
        history.len()
    );
    for u in history {
        s.push_str(&format!(
            "{:>9}  {:>8}  {} -> {}\n",
            u.iteration,
            if u.overflow { "yes" } else { "no" },
            u.scale_before,
            u.scale_after
        ));
    }
    s.push_str(
        "fp16's range is too small for these gradients. Train in bf16 instead (same memory, \
         fp32's range, no loss scaling): set \"bf16\": {\"enabled\": true} and \"fp16\": \
         {\"enabled\": false} in the DeepSpeed config. Otherwise lower the learning rate, \
         check the data for extreme values, or lower min_loss_scale.",
    );
    s
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ScalerKind {
    /// Fixed scale: 1.0 for fp32/bf16, or fp16's `loss_scale` when it is non-zero.
    Static(f64),
    Dynamic {
        rule: DynamicRule,
        params: DynamicLossScaleParams,
    },
}

/// Serializable scaler state: everything needed to resume exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    kind: ScalerKind,
    cur_scale: f64,
    cur_iter: u64,
    /// -1 before any overflow, as DeepSpeed.
    last_overflow_iter: i64,
    cur_hysteresis: u32,
    history: VecDeque<ScaleUpdate>,
}

impl LossScaler {
    pub fn new_static(scale: f64) -> LossScaler {
        LossScaler {
            kind: ScalerKind::Static(scale),
            cur_scale: scale,
            cur_iter: 0,
            last_overflow_iter: -1,
            cur_hysteresis: 1,
            history: VecDeque::new(),
        }
    }

    /// Validates as DeepSpeed's precision config does (window > 0, min scale > 0) plus a
    /// positive finite initial scale, hysteresis >= 1 and a factor > 1.
    pub fn new_dynamic(
        rule: DynamicRule,
        params: DynamicLossScaleParams,
    ) -> Result<LossScaler, LossScaleError> {
        let bad = |key, value: String, expected| {
            Err(LossScaleError::InvalidParam {
                key,
                value,
                expected,
            })
        };
        if params.init_scale.is_nan() || params.init_scale <= 0.0 || params.init_scale.is_infinite()
        {
            return bad(
                "init_scale",
                params.init_scale.to_string(),
                "a finite number > 0",
            );
        }
        if params.scale_window == 0 {
            return bad("loss_scale_window", "0".into(), "an integer > 0");
        }
        if params.min_scale.is_nan() || params.min_scale <= 0.0 {
            return bad(
                "min_loss_scale",
                params.min_scale.to_string(),
                "a number > 0",
            );
        }
        if params.delayed_shift == 0 {
            return bad("hysteresis", "0".into(), "an integer >= 1");
        }
        if params.scale_factor.is_nan() || params.scale_factor <= 1.0 {
            return bad(
                "scale_factor",
                params.scale_factor.to_string(),
                "a number > 1",
            );
        }
        Ok(LossScaler {
            cur_scale: params.init_scale,
            cur_iter: 0,
            last_overflow_iter: -1,
            cur_hysteresis: params.delayed_shift,
            history: VecDeque::new(),
            kind: ScalerKind::Dynamic { rule, params },
        })
    }

    pub fn loss_scale(&self) -> f64 {
        self.cur_scale
    }

    pub fn is_dynamic(&self) -> bool {
        matches!(self.kind, ScalerKind::Dynamic { .. })
    }

    /// Number of `update_scale` calls so far (DeepSpeed's `cur_iter`).
    pub fn cur_iter(&self) -> u64 {
        self.cur_iter
    }

    pub fn cur_hysteresis(&self) -> u32 {
        self.cur_hysteresis
    }

    pub fn kind(&self) -> &ScalerKind {
        &self.kind
    }

    /// The last (up to [`HISTORY_LEN`]) updates, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &ScaleUpdate> {
        self.history.iter()
    }

    /// Called once per optimizer step with whether the gradients overflowed (the step is
    /// then skipped by the engine). Errors only for the ZeRO rule at the minimum scale.
    pub fn update_scale(&mut self, overflow: bool) -> Result<(), LossScaleError> {
        let before = self.cur_scale;
        let result = match self.kind.clone() {
            ScalerKind::Static(_) => Ok(()),
            ScalerKind::Dynamic { rule, params } => match rule {
                DynamicRule::Zero => self.update_zero(&params, overflow),
                DynamicRule::Fused => {
                    self.update_fused(&params, overflow);
                    Ok(())
                }
            },
        };
        self.record(overflow, before);
        match result {
            Ok(()) => {
                self.cur_iter += 1;
                Ok(())
            }
            Err(()) => Err(LossScaleError::AtMinimum {
                min_scale: self.cur_scale,
                history: self.history.iter().copied().collect(),
            }),
        }
    }

    fn record(&mut self, overflow: bool, before: f64) {
        if self.history.len() == HISTORY_LEN {
            self.history.pop_front();
        }
        self.history.push_back(ScaleUpdate {
            iteration: self.cur_iter,
            overflow,
            scale_before: before,
            scale_after: self.cur_scale,
        });
    }

    fn stable_interval_reached(&self, window: u64) -> bool {
        let stable = self.cur_iter as i64 - self.last_overflow_iter - 1;
        stable > 0 && stable % window as i64 == 0
    }

    fn update_zero(&mut self, p: &DynamicLossScaleParams, overflow: bool) -> Result<(), ()> {
        if overflow {
            if p.delayed_shift == 1 || self.cur_hysteresis == 1 {
                if self.cur_scale == p.min_scale && p.raise_error_at_min_scale {
                    return Err(());
                }
                let next = (self.cur_scale / p.scale_factor).max(p.min_scale);
                tracing::info!(
                    "OVERFLOW! Skipping step. Attempted loss scale: {}, reducing to {next}",
                    self.cur_scale
                );
                self.cur_scale = next;
            } else {
                tracing::info!(
                    "OVERFLOW! Skipping step. Attempted loss scale: {}, but hysteresis is {}. Reducing hysteresis to {}",
                    self.cur_scale,
                    self.cur_hysteresis,
                    self.cur_hysteresis - 1
                );
                self.cur_hysteresis -= 1;
            }
            self.last_overflow_iter = self.cur_iter as i64;
        } else {
            if p.consecutive_hysteresis {
                self.cur_hysteresis = p.delayed_shift;
            }
            if self.stable_interval_reached(p.scale_window) {
                if !p.consecutive_hysteresis {
                    self.cur_hysteresis = p.delayed_shift;
                }
                self.cur_scale *= p.scale_factor;
            }
        }
        Ok(())
    }

    fn update_fused(&mut self, p: &DynamicLossScaleParams, overflow: bool) {
        if overflow {
            let next = (self.cur_scale / p.scale_factor).max(p.min_scale);
            tracing::info!(
                "Grad overflow on iteration {}: reducing dynamic loss scale from {} to {next}",
                self.cur_iter,
                self.cur_scale
            );
            self.cur_scale = next;
            self.last_overflow_iter = self.cur_iter as i64;
        } else if self.stable_interval_reached(p.scale_window) {
            self.cur_scale *= p.scale_factor;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(rule: DynamicRule, init: f64, window: u64, hysteresis: u32) -> LossScaler {
        LossScaler::new_dynamic(
            rule,
            DynamicLossScaleParams {
                init_scale: init,
                scale_window: window,
                delayed_shift: hysteresis,
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn scales(s: &mut LossScaler, overflows: &[bool]) -> Vec<f64> {
        overflows
            .iter()
            .map(|&o| {
                s.update_scale(o).unwrap();
                s.loss_scale()
            })
            .collect()
    }

    /// T3 test_no_overflow (fused): power 8, window 2, 10 clean steps.
    #[test]
    fn fused_no_overflow() {
        let mut s = dynamic(DynamicRule::Fused, 256.0, 2, 2);
        for (i, want) in [
            256., 256., 512., 512., 1024., 1024., 2048., 2048., 4096., 4096.,
        ]
        .into_iter()
        .enumerate()
        {
            s.update_scale(false).unwrap();
            assert_eq!(s.loss_scale(), want, "step {i}");
            assert_eq!(s.cur_iter(), i as u64 + 1);
        }
    }

    /// T3 test_all_overflow: power 4, window 2, [inf, -inf, nan x 6]: clamps at 1, no error.
    #[test]
    fn fused_all_overflow() {
        let mut s = dynamic(DynamicRule::Fused, 16.0, 2, 2);
        assert_eq!(scales(&mut s, &[true; 8]), [8., 4., 2., 1., 1., 1., 1., 1.]);
    }

    /// T3 test_some_overflow: from 256, two overflows give 64, then 3 clean: 64, 64, 128.
    #[test]
    fn fused_some_overflow() {
        let mut s = dynamic(DynamicRule::Fused, 256.0, 2, 2);
        assert_eq!(scales(&mut s, &[true, true]), [128., 64.]);
        assert_eq!(scales(&mut s, &[false, false, false]), [64., 64., 128.]);
    }

    /// T4: init 16, window 2, hysteresis 2, min 1, 8 overflows: 16, 8, 4, 2, 1, then abort.
    #[test]
    fn zero_hysteresis_then_abort_at_minimum() {
        for (hysteresis, want) in [(2, vec![16., 8., 4., 2., 1.]), (1, vec![8., 4., 2., 1.])] {
            let mut s = dynamic(DynamicRule::Zero, 16.0, 2, hysteresis);
            assert_eq!(scales(&mut s, &vec![true; want.len()]), want);
            let err = s.update_scale(true).unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with(MIN_SCALE_MESSAGE), "{text}");
            assert!(text.contains("\"bf16\": {\"enabled\": true}"), "{text}");
            let LossScaleError::AtMinimum { history, .. } = err else {
                panic!()
            };
            assert_eq!(history.len(), want.len() + 1);
            let last = history.last().unwrap();
            assert!(last.overflow && last.scale_before == 1.0 && last.scale_after == 1.0);
            assert_eq!(history[0].scale_before, 16.0);
        }
    }

    /// T4: DeepSpeed defaults double first at iteration index 1000, then at 2000.
    #[test]
    fn zero_defaults_double_every_window() {
        let mut s = LossScaler::new_dynamic(DynamicRule::Zero, Default::default()).unwrap();
        let mut doublings = Vec::new();
        for i in 0..2001u64 {
            let before = s.loss_scale();
            s.update_scale(false).unwrap();
            if s.loss_scale() != before {
                doublings.push(i);
            }
        }
        assert_eq!(doublings, [1000, 2000]);
        assert_eq!(s.loss_scale(), 65536.0 * 4.0);
    }

    #[test]
    fn zero_hysteresis_restores_after_window_or_consecutively() {
        // Non-consecutive: a clean step between overflows does not restore hysteresis.
        let mut s = dynamic(DynamicRule::Zero, 64.0, 100, 2);
        assert_eq!(scales(&mut s, &[true, false, true]), [64., 64., 32.]);
        // Consecutive: every clean step restores it, so isolated overflows never cut.
        let mut s = LossScaler::new_dynamic(
            DynamicRule::Zero,
            DynamicLossScaleParams {
                init_scale: 64.0,
                scale_window: 100,
                consecutive_hysteresis: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            scales(&mut s, &[true, false, true, false, true, true]),
            [64., 64., 64., 64., 64., 32.]
        );
    }

    #[test]
    fn zero_without_raise_clamps() {
        let mut s = LossScaler::new_dynamic(
            DynamicRule::Zero,
            DynamicLossScaleParams {
                init_scale: 2.0,
                delayed_shift: 1,
                raise_error_at_min_scale: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(scales(&mut s, &[true, true, true]), [1., 1., 1.]);
    }

    #[test]
    fn static_scaler_never_changes() {
        let mut s = LossScaler::new_static(1.0);
        assert_eq!(scales(&mut s, &[true, false, true]), [1., 1., 1.]);
        assert!(!s.is_dynamic());
        let mut s = LossScaler::new_static(128.0);
        assert_eq!(scales(&mut s, &[true; 3]), [128.; 3]);
    }

    #[test]
    fn history_is_bounded_and_state_round_trips() {
        let mut s = dynamic(DynamicRule::Zero, 1024.0, 3, 2);
        for i in 0..30 {
            s.update_scale(i % 7 == 0).unwrap();
        }
        assert_eq!(s.history().count(), HISTORY_LEN);
        assert_eq!(s.history().next().unwrap().iteration, 10);
        let json = serde_json::to_string(&s).unwrap();
        let mut t: LossScaler = serde_json::from_str(&json).unwrap();
        assert_eq!(t, s);
        for i in 0..10 {
            let o = i % 3 == 0;
            assert_eq!(s.update_scale(o), t.update_scale(o));
            assert_eq!(s.loss_scale(), t.loss_scale());
        }
    }

    #[test]
    fn rejects_invalid_params() {
        let p = DynamicLossScaleParams {
            scale_window: 0,
            ..Default::default()
        };
        let err = LossScaler::new_dynamic(DynamicRule::Zero, p).unwrap_err();
        assert!(err.to_string().contains("loss_scale_window = 0"), "{err}");
        let p = DynamicLossScaleParams {
            min_scale: 0.0,
            ..Default::default()
        };
        assert!(LossScaler::new_dynamic(DynamicRule::Fused, p).is_err());
    }
}
