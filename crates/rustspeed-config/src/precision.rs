//! `fp16` and `bf16` (legacy `bfloat16`) blocks (deepspeed/runtime/precision_config.py).

use serde::Serialize;

use crate::error::ConfigError;
use crate::json::Kind;
use crate::reader::Block;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fp16Config {
    pub enabled: bool,
    pub auto_cast: bool,
    /// 0 means dynamic loss scaling starting at `2**initial_scale_power`.
    pub loss_scale: f64,
    pub initial_scale_power: u32,
    pub loss_scale_window: u64,
    pub hysteresis: u64,
    pub consecutive_hysteresis: bool,
    pub min_loss_scale: f64,
    pub fp16_master_weights_and_grads: bool,
}

impl Default for Fp16Config {
    fn default() -> Self {
        Fp16Config {
            enabled: false,
            auto_cast: false,
            loss_scale: 0.0,
            initial_scale_power: 16,
            loss_scale_window: 1000,
            hysteresis: 2,
            consecutive_hysteresis: false,
            min_loss_scale: 1.0,
            fp16_master_weights_and_grads: false,
        }
    }
}

impl Fp16Config {
    pub fn dynamic_loss_scale(&self) -> bool {
        self.loss_scale == 0.0
    }

    /// The loss scale the first step uses.
    pub fn initial_loss_scale(&self) -> f64 {
        if self.dynamic_loss_scale() {
            2f64.powi(self.initial_scale_power as i32)
        } else {
            self.loss_scale
        }
    }
}

pub(crate) fn read_fp16(mut b: Block<'_>) -> Result<Fp16Config, ConfigError> {
    let d = Fp16Config::default();
    let enabled = b.bool("enabled", d.enabled)?;
    let auto_cast = b.bool("auto_cast", d.auto_cast)?;
    let loss_scale = match b.member("loss_scale") {
        None => d.loss_scale,
        Some(m) => {
            // DeepSpeed: a finite number >= 0, and explicitly not a bool.
            if matches!(m.value.kind, Kind::Bool(_)) {
                return Err(b.wrong_type(m, "a number >= 0 (0 = dynamic), not a boolean"));
            }
            let v = b.as_f64(m)?;
            if v < 0.0 {
                return Err(b.invalid(
                    m,
                    format!("must be >= 0 (0 selects dynamic loss scaling), got {v}"),
                ));
            }
            v
        }
    };
    let power_member = b.member("initial_scale_power");
    let initial_scale_power = match power_member {
        None => d.initial_scale_power,
        Some(m) => {
            let p = b.as_u64(m)?;
            if p > 127 {
                return Err(b.invalid(m, format!("2**{p} overflows; use at most 127")));
            }
            p as u32
        }
    };
    let window = b.member("loss_scale_window");
    let loss_scale_window = window.map_or(Ok(d.loss_scale_window), |m| b.as_u64(m))?;
    let hysteresis_m = b.member("hysteresis");
    let hysteresis = hysteresis_m.map_or(Ok(d.hysteresis), |m| b.as_u64(m))?;
    let consecutive_hysteresis = b.bool("consecutive_hysteresis", d.consecutive_hysteresis)?;
    let min_m = b.member("min_loss_scale");
    let min_loss_scale = min_m.map_or(Ok(d.min_loss_scale), |m| b.as_f64(m))?;
    let fp16_master_weights_and_grads = b.bool(
        "fp16_master_weights_and_grads",
        d.fp16_master_weights_and_grads,
    )?;
    if loss_scale == 0.0 {
        if let (Some(m), 0) = (window, loss_scale_window) {
            return Err(b.invalid(m, "must be > 0 with dynamic loss scaling (loss_scale 0)"));
        }
        if let Some(m) = min_m.filter(|_| min_loss_scale <= 0.0) {
            return Err(b.invalid(
                m,
                format!(
                    "must be > 0 with dynamic loss scaling (loss_scale 0), got {min_loss_scale}"
                ),
            ));
        }
    }
    if let (Some(m), 0) = (hysteresis_m, hysteresis) {
        return Err(b.invalid(m, "must be >= 1 (1 = halve the scale on every overflow)"));
    }
    b.finish()?;
    Ok(Fp16Config {
        enabled,
        auto_cast,
        loss_scale,
        initial_scale_power,
        loss_scale_window,
        hysteresis,
        consecutive_hysteresis,
        min_loss_scale,
        fp16_master_weights_and_grads,
    })
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bf16Config {
    pub enabled: bool,
    pub immediate_grad_update: bool,
    pub check_grad_overflow: bool,
    pub bf16_master_weights_and_grads: bool,
    pub bf16_optimizer_states: bool,
}

impl Default for Bf16Config {
    fn default() -> Self {
        Bf16Config {
            enabled: false,
            immediate_grad_update: false,
            check_grad_overflow: true,
            bf16_master_weights_and_grads: false,
            bf16_optimizer_states: false,
        }
    }
}

pub(crate) fn read_bf16(mut b: Block<'_>) -> Result<Bf16Config, ConfigError> {
    let d = Bf16Config::default();
    let c = Bf16Config {
        enabled: b.bool("enabled", d.enabled)?,
        immediate_grad_update: b.bool("immediate_grad_update", d.immediate_grad_update)?,
        check_grad_overflow: b.bool("check_grad_overflow", d.check_grad_overflow)?,
        bf16_master_weights_and_grads: b.bool(
            "bf16_master_weights_and_grads",
            d.bf16_master_weights_and_grads,
        )?,
        bf16_optimizer_states: b.bool("bf16_optimizer_states", d.bf16_optimizer_states)?,
    };
    if c.bf16_optimizer_states && !c.bf16_master_weights_and_grads {
        let key = b.key_path("bf16_optimizer_states");
        return Err(crate::error::ConfigError::Conflict {
            at: b.location(),
            key,
            message: "requires bf16_master_weights_and_grads: true".into(),
        });
    }
    b.finish()?;
    Ok(c)
}
