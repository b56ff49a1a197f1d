//! Mixed precision: which compute dtype a config asks for, the loss scaler it implies, when a
//! step checks for overflow, and how the optimizer reaches the model's parameters.
//!
//! - fp32: the model's f32 parameters are the master weights; no loss scaling; no overflow
//!   check (DeepSpeed's fp32 path has none either).
//! - bf16: bf16 compute weights, fp32 master and optimizer state, fp32 gradients; the scaler
//!   is the static 1.0; overflow is checked when `bf16.check_grad_overflow` (default true).
//! - fp16: f16 compute weights, fp32 master/state/gradients, static `loss_scale` or dynamic
//!   scaling with DeepSpeed's ZeRO-path rule (hysteresis, abort at the minimum).

use std::any::Any;

use half::{bf16, f16};
use rustspeed_config::{DsConfig, Precision};
use rustspeed_kernels::{DType, Float};

use crate::loss_scaler::{DynamicLossScaleParams, DynamicRule, LossScaleError, LossScaler};
use crate::optimizer::Weights;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PrecisionError {
    #[error("the config selects {precision} but the model's parameters are {dtype}; build the model as {expected} (or change the config's fp16/bf16 blocks)")]
    Mismatch {
        precision: &'static str,
        dtype: DType,
        expected: DType,
    },
    #[error(transparent)]
    LossScale(#[from] LossScaleError),
}

/// The compute dtype a precision mode trains in.
pub fn compute_dtype(precision: Precision) -> DType {
    match precision {
        Precision::Fp32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::Fp16 => DType::F16,
    }
}

pub fn check_dtype(precision: Precision, dtype: DType) -> Result<(), PrecisionError> {
    let expected = compute_dtype(precision);
    if expected == dtype {
        Ok(())
    } else {
        Err(PrecisionError::Mismatch {
            precision: precision.as_str(),
            dtype,
            expected,
        })
    }
}

/// DeepSpeed's `CreateLossScaler`: static 1.0 unless fp16, then static `loss_scale` or
/// dynamic (ZeRO rule) when it is 0.
pub fn loss_scaler(cfg: &DsConfig) -> Result<LossScaler, PrecisionError> {
    if cfg.precision != Precision::Fp16 {
        return Ok(LossScaler::new_static(1.0));
    }
    let f = &cfg.fp16;
    if !f.dynamic_loss_scale() {
        return Ok(LossScaler::new_static(f.loss_scale));
    }
    let params = DynamicLossScaleParams {
        init_scale: f.initial_loss_scale(),
        scale_window: f.loss_scale_window,
        min_scale: f.min_loss_scale,
        delayed_shift: u32::try_from(f.hysteresis).unwrap_or(u32::MAX),
        consecutive_hysteresis: f.consecutive_hysteresis,
        ..DynamicLossScaleParams::default()
    };
    Ok(LossScaler::new_dynamic(DynamicRule::Zero, params)?)
}

/// Whether a non-finite gradient skips the step.
pub fn checks_overflow(cfg: &DsConfig) -> bool {
    match cfg.precision {
        Precision::Fp16 => true,
        Precision::Bf16 => cfg.bf16.check_grad_overflow,
        Precision::Fp32 => false,
    }
}

/// The optimizer's view of the weights: the model's own f32 parameters, or the fp32 master
/// partition plus the 16-bit parameters to rewrite. `T` is one of the kernels' three storage
/// types, checked at engine construction.
// `&mut Vec<T>`, not a slice: `Any` downcasting needs a sized type, and this keeps it safe.
#[allow(clippy::ptr_arg)]
pub fn weights_view<'a, T: Float>(params: &'a mut Vec<T>, master: &'a mut [f32]) -> Weights<'a> {
    let any = params as &mut dyn Any;
    if any.is::<Vec<f32>>() {
        Weights::F32(any.downcast_mut::<Vec<f32>>().expect("checked"))
    } else if any.is::<Vec<bf16>>() {
        Weights::Bf16 {
            master,
            model: any.downcast_mut::<Vec<bf16>>().expect("checked"),
        }
    } else if any.is::<Vec<f16>>() {
        Weights::F16 {
            master,
            model: any.downcast_mut::<Vec<f16>>().expect("checked"),
        }
    } else {
        unreachable!("the engine only accepts f32, bf16 and f16 parameters")
    }
}

/// True when `T` is one of f32, bf16, f16 (the kernels' storage types).
pub fn is_supported<T: Float>() -> bool {
    let id = std::any::TypeId::of::<T>();
    id == std::any::TypeId::of::<f32>()
        || id == std::any::TypeId::of::<bf16>()
        || id == std::any::TypeId::of::<f16>()
}
