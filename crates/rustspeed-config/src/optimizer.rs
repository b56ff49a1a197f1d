//! `optimizer {type, params}`. DeepSpeed lower-cases the type and passes `params` to the
//! optimizer's constructor, so every type has its own set of accepted params and an unknown one
//! is an error. `"Adam"` means AdamW (decoupled weight decay) unless `adam_w_mode: false`.

use serde::Serialize;

use crate::error::ConfigError;
use crate::reader::Block;

/// Types DeepSpeed knows (constants `*_OPTIMIZER`), plus torch's SGD which it reaches through
/// `torch.optim`.
pub const OPTIMIZER_TYPES: [&str; 13] = [
    "adam",
    "adamw",
    "lamb",
    "lion",
    "adagrad",
    "sgd",
    "onebitadam",
    "zerooneadam",
    "onebitlamb",
    "muadam",
    "muadamw",
    "musgd",
    "muon",
];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdamParams {
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub bias_correction: bool,
    /// Effective mode: `type == "adamw"` or `params.adam_w_mode` (default true).
    pub adam_w_mode: bool,
    pub torch_adam: bool,
    pub amsgrad: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LambParams {
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub bias_correction: bool,
    pub eps_inside_sqrt: bool,
    pub max_grad_norm: f64,
    pub max_coeff: f64,
    pub min_coeff: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LionParams {
    pub lr: f64,
    pub betas: [f64; 2],
    pub weight_decay: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdagradParams {
    pub lr: f64,
    pub lr_decay: f64,
    pub weight_decay: f64,
    pub initial_accumulator_value: f64,
    pub eps: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SgdParams {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Optimizer {
    /// Both `adam` and `adamw`; see [`AdamParams::adam_w_mode`].
    Adam(AdamParams),
    Lamb(LambParams),
    Lion(LionParams),
    Adagrad(AdagradParams),
    Sgd(SgdParams),
    /// 1-bit and mu-P / Muon optimizers: kept as written, not supported yet.
    Other {
        params: serde_json::Value,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OptimizerConfig {
    /// The lower-cased type (`"adam"`, `"adamw"`, ...).
    #[serde(rename = "type")]
    pub type_name: String,
    pub optimizer: Optimizer,
    pub legacy_fusion: bool,
}

impl OptimizerConfig {
    pub fn lr(&self) -> Option<f64> {
        match &self.optimizer {
            Optimizer::Adam(p) => Some(p.lr),
            Optimizer::Lamb(p) => Some(p.lr),
            Optimizer::Lion(p) => Some(p.lr),
            Optimizer::Adagrad(p) => Some(p.lr),
            Optimizer::Sgd(p) => Some(p.lr),
            Optimizer::Other { params } => params.get("lr").and_then(|v| v.as_f64()),
        }
    }
}

pub(crate) fn read(mut b: Block<'_>) -> Result<OptimizerConfig, ConfigError> {
    let Some(type_m) = b.member("type") else {
        return Err(ConfigError::InvalidValue {
            at: b.location(),
            key: b.key_path("type"),
            message: format!("missing; expected one of {}", OPTIMIZER_TYPES.join(", ")),
        });
    };
    let type_name = b.as_choice(type_m, &OPTIMIZER_TYPES, true)?;
    let legacy_fusion = b.bool("legacy_fusion", false)?;
    let params_m = b.member("params");
    let params_block = match params_m {
        Some(m) => b.as_block(m)?,
        None => Block::empty(b.ctx(), &b.key_path("params")),
    };
    let optimizer = match type_name {
        "adam" | "adamw" => Optimizer::Adam(read_adam(params_block, type_name == "adamw")?),
        "lamb" => Optimizer::Lamb(read_lamb(params_block)?),
        "lion" => Optimizer::Lion(read_lion(params_block)?),
        "adagrad" => Optimizer::Adagrad(read_adagrad(params_block)?),
        "sgd" => Optimizer::Sgd(read_sgd(params_block)?),
        _ => Optimizer::Other {
            params: params_m.map_or(serde_json::json!({}), |m| m.value.to_json()),
        },
    };
    b.finish()?;
    Ok(OptimizerConfig {
        type_name: type_name.to_string(),
        optimizer,
        legacy_fusion,
    })
}

fn lr(b: &mut Block<'_>, default: f64) -> Result<f64, ConfigError> {
    non_negative(b, "lr", default)
}

fn non_negative(b: &mut Block<'_>, key: &'static str, default: f64) -> Result<f64, ConfigError> {
    let Some(m) = b.member(key) else {
        return Ok(default);
    };
    let v = b.as_f64(m)?;
    if v < 0.0 {
        return Err(b.invalid(m, format!("must be >= 0, got {v}")));
    }
    Ok(v)
}

fn betas(b: &mut Block<'_>) -> Result<[f64; 2], ConfigError> {
    let Some(list) = b.f64_list("betas")? else {
        return Ok([0.9, 0.999]);
    };
    let m = b.member("betas").expect("betas was just read");
    match list.as_slice() {
        [b1, b2] if (0.0..1.0).contains(b1) && (0.0..1.0).contains(b2) => Ok([*b1, *b2]),
        [_, _] => Err(b.invalid(m, format!("each beta must be in [0, 1), got {list:?}"))),
        _ => Err(b.invalid(
            m,
            format!("expected two numbers [beta1, beta2], got {list:?}"),
        )),
    }
}

fn read_adam(mut b: Block<'_>, is_adamw: bool) -> Result<AdamParams, ConfigError> {
    let p = AdamParams {
        lr: lr(&mut b, 1e-3)?,
        betas: betas(&mut b)?,
        eps: non_negative(&mut b, "eps", 1e-8)?,
        weight_decay: non_negative(&mut b, "weight_decay", 0.0)?,
        bias_correction: b.bool("bias_correction", true)?,
        adam_w_mode: b.bool("adam_w_mode", true)? || is_adamw,
        torch_adam: b.bool("torch_adam", false)?,
        amsgrad: b.bool("amsgrad", false)?,
    };
    if p.amsgrad && !p.torch_adam {
        let m = b.member("amsgrad").expect("amsgrad is set");
        return Err(b.invalid(
            m,
            "FusedAdam does not support the AMSGrad variant; set amsgrad: false, or torch_adam: true",
        ));
    }
    b.finish()?;
    Ok(p)
}

fn read_lamb(mut b: Block<'_>) -> Result<LambParams, ConfigError> {
    let p = LambParams {
        lr: lr(&mut b, 1e-3)?,
        betas: betas(&mut b)?,
        eps: non_negative(&mut b, "eps", 1e-8)?,
        weight_decay: non_negative(&mut b, "weight_decay", 0.0)?,
        bias_correction: b.bool("bias_correction", true)?,
        eps_inside_sqrt: b.bool("eps_inside_sqrt", false)?,
        max_grad_norm: non_negative(&mut b, "max_grad_norm", 0.0)?,
        max_coeff: non_negative(&mut b, "max_coeff", 10.0)?,
        min_coeff: non_negative(&mut b, "min_coeff", 0.01)?,
    };
    b.finish()?;
    Ok(p)
}

fn read_lion(mut b: Block<'_>) -> Result<LionParams, ConfigError> {
    let p = LionParams {
        lr: lr(&mut b, 1e-3)?,
        betas: betas(&mut b)?,
        weight_decay: non_negative(&mut b, "weight_decay", 0.0)?,
    };
    b.finish()?;
    Ok(p)
}

fn read_adagrad(mut b: Block<'_>) -> Result<AdagradParams, ConfigError> {
    let p = AdagradParams {
        lr: lr(&mut b, 1e-2)?,
        lr_decay: non_negative(&mut b, "lr_decay", 0.0)?,
        weight_decay: non_negative(&mut b, "weight_decay", 0.0)?,
        initial_accumulator_value: non_negative(&mut b, "initial_accumulator_value", 0.0)?,
        eps: non_negative(&mut b, "eps", 1e-10)?,
    };
    b.finish()?;
    Ok(p)
}

fn read_sgd(mut b: Block<'_>) -> Result<SgdParams, ConfigError> {
    let p = SgdParams {
        lr: lr(&mut b, 1e-3)?,
        momentum: non_negative(&mut b, "momentum", 0.0)?,
        dampening: b.f64("dampening", 0.0)?,
        weight_decay: non_negative(&mut b, "weight_decay", 0.0)?,
        nesterov: b.bool("nesterov", false)?,
    };
    if p.nesterov && (p.momentum <= 0.0 || p.dampening != 0.0) {
        let m = b.member("nesterov").expect("nesterov is set");
        return Err(b.invalid(
            m,
            "Nesterov momentum requires a momentum > 0 and zero dampening",
        ));
    }
    b.finish()?;
    Ok(p)
}
