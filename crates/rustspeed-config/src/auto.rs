//! HF Trainer's `"auto"` values (transformers `HfTrainerDeepSpeedConfig.trainer_config_process`
//! and `trainer_config_finalize`): filled from the training arguments; an explicit value that
//! contradicts a given argument is an error naming both.

use serde::Serialize;

use crate::error::{ConfigError, Location};
use crate::json::{Kind, Member, Number, Value};

/// The training arguments that can fill `"auto"`; `None` means "not given on the command line".
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TrainingArgs {
    pub per_device_train_batch_size: Option<u64>,
    pub gradient_accumulation_steps: Option<u64>,
    pub learning_rate: Option<f64>,
    pub adam_beta1: Option<f64>,
    pub adam_beta2: Option<f64>,
    pub adam_epsilon: Option<f64>,
    pub weight_decay: Option<f64>,
    pub max_grad_norm: Option<f64>,
    pub warmup_steps: Option<u64>,
    pub warmup_ratio: Option<f64>,
    /// Total optimizer steps of the run (HF's `num_training_steps`).
    pub max_steps: Option<u64>,
    pub fp16: Option<bool>,
    pub bf16: Option<bool>,
    /// The model's hidden size, for the ZeRO bucket sizes HF derives from it.
    pub hidden_size: Option<u64>,
    /// Fill the `"auto"` values no argument was given for with TrainingArguments' defaults,
    /// as HF Trainer does (its arguments always have values). Only given arguments are checked
    /// against explicit config values: a default never contradicts the config.
    pub hf_defaults: bool,
}

impl TrainingArgs {
    /// Unset arguments at transformers' TrainingArguments defaults (fp16/bf16 off), except
    /// the warmup.
    fn with_hf_defaults(&self, micro_in_config: Option<u64>) -> TrainingArgs {
        TrainingArgs {
            per_device_train_batch_size: self
                .per_device_train_batch_size
                .or(micro_in_config)
                .or(Some(8)),
            gradient_accumulation_steps: self.gradient_accumulation_steps.or(Some(1)),
            learning_rate: self.learning_rate.or(Some(5e-5)),
            adam_beta1: self.adam_beta1.or(Some(0.9)),
            adam_beta2: self.adam_beta2.or(Some(0.999)),
            adam_epsilon: self.adam_epsilon.or(Some(1e-8)),
            weight_decay: self.weight_decay.or(Some(0.0)),
            max_grad_norm: self.max_grad_norm.or(Some(1.0)),
            // HF's default 0 would fill warmup_num_steps with 0, which DeepSpeed's schedulers
            // reject; leaving it unresolved gives an error that names --warmup-steps instead.
            fp16: self.fp16.or(Some(false)),
            bf16: self.bf16.or(Some(false)),
            hf_defaults: false,
            ..self.clone()
        }
    }
}

/// The `rustspeed train` flag that fills each `"auto"` key.
const FLAGS: &[(&str, &str)] = &[
    (
        "train_micro_batch_size_per_gpu",
        "--per-device-train-batch-size",
    ),
    (
        "gradient_accumulation_steps",
        "--gradient-accumulation-steps",
    ),
    (
        "train_batch_size",
        "--per-device-train-batch-size (times --gradient-accumulation-steps and the world size)",
    ),
    ("gradient_clipping", "--max-grad-norm"),
    ("optimizer.params.lr", "--learning-rate"),
    ("optimizer.params.betas", "--adam-beta1 and --adam-beta2"),
    ("optimizer.params.eps", "--adam-epsilon"),
    ("optimizer.params.weight_decay", "--weight-decay"),
    ("scheduler.params.warmup_min_lr", "(always 0)"),
    ("scheduler.params.warmup_max_lr", "--learning-rate"),
    (
        "scheduler.params.total_num_steps",
        "--max-steps (or --num-train-epochs)",
    ),
    (
        "scheduler.params.warmup_num_steps",
        "--warmup-steps (or --warmup-ratio with --max-steps)",
    ),
    ("fp16.enabled", "--fp16"),
    ("bf16.enabled", "--bf16"),
    ("bfloat16.enabled", "--bf16"),
    (
        "zero_optimization.reduce_bucket_size",
        "the model's hidden_size (--model)",
    ),
    (
        "zero_optimization.stage3_prefetch_bucket_size",
        "the model's hidden_size (--model)",
    ),
    (
        "zero_optimization.stage3_param_persistence_threshold",
        "the model's hidden_size (--model)",
    ),
];

/// Which flag fills `key`, if HF fills it at all.
pub fn flag_for(key: &str) -> Option<&'static str> {
    FLAGS.iter().find(|(k, _)| *k == key).map(|(_, f)| *f)
}

/// The explanation of an `"auto"` that nothing filled.
pub fn unresolved_hint(key: &str) -> String {
    match flag_for(key) {
        Some(flag) => format!(
            "it is filled by `rustspeed train` from {flag}: give that flag, or write a value \
             here (`rustspeed config check` has no training arguments to fill it from)"
        ),
        None => format!(
            "HF Trainer fills \"auto\" only for {}; write a value",
            FLAGS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
        ),
    }
}

enum Fill {
    Int(u64),
    Float(f64),
    Bool(bool),
    Floats(Vec<f64>),
}

impl Fill {
    fn kind(&self) -> Kind {
        let num = |v: f64, text: String| Kind::Number(Number { text, value: v });
        match self {
            Fill::Int(i) => num(*i as f64, i.to_string()),
            Fill::Float(f) => num(*f, format!("{f:?}")),
            Fill::Bool(b) => Kind::Bool(*b),
            Fill::Floats(v) => Kind::Array(
                v.iter()
                    .map(|f| Value::new(num(*f, format!("{f:?}")), 0, 0))
                    .collect(),
            ),
        }
    }

    fn show(&self) -> String {
        match self {
            Fill::Int(i) => i.to_string(),
            Fill::Float(f) => format!("{f}"),
            Fill::Bool(b) => b.to_string(),
            Fill::Floats(v) => format!("{v:?}"),
        }
    }

    fn matches(&self, v: &Value) -> bool {
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * a.abs().max(b.abs());
        match (self, &v.kind) {
            (Fill::Int(i), Kind::Number(n)) => close(*i as f64, n.value),
            (Fill::Float(f), Kind::Number(n)) => close(*f, n.value),
            (Fill::Bool(b), Kind::Bool(c)) => b == c,
            (Fill::Floats(a), Kind::Array(items)) => {
                a.len() == items.len()
                    && a.iter()
                        .zip(items)
                        .all(|(x, y)| matches!(&y.kind, Kind::Number(n) if close(*x, n.value)))
            }
            _ => false,
        }
    }
}

fn member_mut<'v>(root: &'v mut Value, path: &str) -> Option<&'v mut Member> {
    let mut parts = path.split('.').peekable();
    let mut cur = root;
    while let Some(part) = parts.next() {
        let Kind::Object(members) = &mut cur.kind else {
            return None;
        };
        let m = members.iter_mut().find(|m| m.key == part)?;
        if parts.peek().is_none() {
            return Some(m);
        }
        cur = &mut m.value;
    }
    None
}

fn explicit_u64(root: &Value, key: &str) -> Option<u64> {
    match &root.get(key)?.kind {
        Kind::Number(n) if n.value >= 0.0 && n.value.fract() == 0.0 => Some(n.value as u64),
        _ => None,
    }
}

/// Fills `"auto"` values in place from `args`. `hf_match`: HF checks explicit values against
/// the arguments for these keys; the hidden-size ones and warmup_min_lr are fill-only.
pub(crate) fn fill(
    root: &mut Value,
    args: &TrainingArgs,
    world: u64,
    source: &str,
) -> Result<(), ConfigError> {
    apply(root, args, world, source, true)?;
    if args.hf_defaults {
        let micro = explicit_u64(root, "train_micro_batch_size_per_gpu");
        apply(root, &args.with_hf_defaults(micro), world, source, false)?;
    }
    Ok(())
}

/// One filling pass; `check`: explicit values must agree with the arguments (where HF checks).
fn apply(
    root: &mut Value,
    args: &TrainingArgs,
    world: u64,
    source: &str,
    check: bool,
) -> Result<(), ConfigError> {
    let gas = args
        .gradient_accumulation_steps
        .or_else(|| explicit_u64(root, "gradient_accumulation_steps"))
        .unwrap_or(1);
    let betas = match (args.adam_beta1, args.adam_beta2) {
        (None, None) => None,
        (b1, b2) => Some(Fill::Floats(vec![b1.unwrap_or(0.9), b2.unwrap_or(0.999)])),
    };
    let warmup = match (args.warmup_steps, args.warmup_ratio, args.max_steps) {
        (Some(w), _, _) if w > 0 => Some(w),
        (_, Some(r), Some(total)) => Some((total as f64 * r).ceil() as u64),
        (Some(w), _, _) => Some(w),
        _ => None,
    };
    let h = args.hidden_size;
    let fills: Vec<(&str, Option<Fill>, bool)> = vec![
        (
            "train_micro_batch_size_per_gpu",
            args.per_device_train_batch_size.map(Fill::Int),
            true,
        ),
        (
            "gradient_accumulation_steps",
            args.gradient_accumulation_steps.map(Fill::Int),
            true,
        ),
        (
            "train_batch_size",
            args.per_device_train_batch_size
                .map(|mb| Fill::Int(world * mb * gas)),
            true,
        ),
        (
            "gradient_clipping",
            args.max_grad_norm.map(Fill::Float),
            true,
        ),
        (
            "optimizer.params.lr",
            args.learning_rate.map(Fill::Float),
            true,
        ),
        ("optimizer.params.betas", betas, true),
        (
            "optimizer.params.eps",
            args.adam_epsilon.map(Fill::Float),
            true,
        ),
        (
            "optimizer.params.weight_decay",
            args.weight_decay.map(Fill::Float),
            true,
        ),
        (
            "scheduler.params.warmup_min_lr",
            Some(Fill::Float(0.0)),
            false,
        ),
        (
            "scheduler.params.warmup_max_lr",
            args.learning_rate.map(Fill::Float),
            true,
        ),
        (
            "scheduler.params.total_num_steps",
            args.max_steps.map(Fill::Int),
            true,
        ),
        (
            "scheduler.params.warmup_num_steps",
            warmup.map(Fill::Int),
            true,
        ),
        ("fp16.enabled", args.fp16.map(Fill::Bool), true),
        ("bf16.enabled", args.bf16.map(Fill::Bool), true),
        ("bfloat16.enabled", args.bf16.map(Fill::Bool), true),
        (
            "zero_optimization.reduce_bucket_size",
            h.map(|h| Fill::Int(h * h)),
            false,
        ),
        (
            "zero_optimization.stage3_prefetch_bucket_size",
            h.map(|h| Fill::Int((0.9 * (h * h) as f64) as u64)),
            false,
        ),
        (
            "zero_optimization.stage3_param_persistence_threshold",
            h.map(|h| Fill::Int(10 * h)),
            false,
        ),
    ];
    for (key, value, must_match) in fills {
        let Some(value) = value else { continue };
        let Some(m) = member_mut(root, key) else {
            continue;
        };
        if m.value.is_auto() {
            m.value.kind = value.kind();
        } else if check && must_match && !value.matches(&m.value) {
            return Err(ConfigError::AutoMismatch {
                at: Location {
                    source: source.into(),
                    line: m.line,
                    column: m.column,
                },
                key: key.to_string(),
                config_value: m.value.describe(),
                arg: flag_for(key)
                    .unwrap_or("the training arguments")
                    .to_string(),
                arg_value: value.show(),
            });
        }
    }
    Ok(())
}
