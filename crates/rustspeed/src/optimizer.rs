//! The optimizer side of the engine: the config's optimizer mapped onto the fused kernels,
//! parameter groups, and the flat fp32 layout of the trainable parameters.
//!
//! Trainable parameters form one flat buffer in model order (frozen ones are skipped: they get
//! no gradient, no master copy and no optimizer state). Gradients, fp32 master weights and
//! optimizer states use that buffer's coordinates. A parameter group is the set of trainable
//! parameters stepped with one set of hyper-parameters; the flat buffer is cut into
//! [`Segment`]s, maximal runs of parameters of one group that are contiguous both in the flat
//! buffer and in the model's parameter buffer, and each kernel call steps one segment. A ZeRO
//! partition `[lo, hi)` of the flat buffer only intersects those segments: master and state
//! buffers hold `hi - lo` elements, so the distributed engine changes the range and adds the
//! collectives, nothing else.

use std::ops::Range;

use rustspeed_config::{Optimizer as OptimizerBlock, OptimizerConfig};
use rustspeed_kernels::optim::{self, HalfOut, OptimError};
use rustspeed_models::{ParamLayout, ParamSpec};

use crate::memory::OptimizerKind;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptimizerError {
    #[error("optimizer.type `{0}` is not supported by rustspeed yet; use Adam, AdamW, Lamb, Lion, Adagrad or SGD")]
    Unsupported(String),
    #[error("optimizer.params.{key} = {value} is not supported: expected {expected}")]
    UnsupportedParam {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("the config has no `optimizer` block; the engine needs one (e.g. {{\"type\": \"AdamW\", \"params\": {{\"lr\": 1e-4}}}})")]
    Missing,
    #[error(transparent)]
    Kernel(#[from] OptimError),
}

/// The optimizer and its config hyper-parameters (group 0's; groups override lr and decay).
#[derive(Clone, Debug, PartialEq)]
pub enum OptimizerSpec {
    Adam(optim::AdamParams),
    Lamb(optim::LambParams),
    Lion(optim::LionParams),
    Adagrad {
        params: optim::AdagradParams,
        /// torch's `initial_accumulator_value`: the state starts at it instead of 0.
        initial_accumulator_value: f32,
    },
    Sgd(optim::SgdParams),
}

impl OptimizerSpec {
    /// Maps the config's `optimizer` block. `"type": "Adam"` is AdamW unless
    /// `adam_w_mode: false` (DeepSpeed's rule, already applied by the config reader);
    /// `torch_adam` selects the same kernel (it follows torch's operation order anyway).
    pub fn from_config(cfg: Option<&OptimizerConfig>) -> Result<Self, OptimizerError> {
        let cfg = cfg.ok_or(OptimizerError::Missing)?;
        Ok(match &cfg.optimizer {
            OptimizerBlock::Adam(p) => {
                if p.amsgrad {
                    return Err(OptimizerError::UnsupportedParam {
                        key: "amsgrad",
                        value: "true".into(),
                        expected: "false (rustspeed's fused Adam has no AMSGrad variant)",
                    });
                }
                OptimizerSpec::Adam(optim::AdamParams {
                    lr: p.lr,
                    betas: (p.betas[0], p.betas[1]),
                    eps: p.eps,
                    weight_decay: p.weight_decay,
                    bias_correction: p.bias_correction,
                    adam_w_mode: p.adam_w_mode,
                })
            }
            OptimizerBlock::Lamb(p) => {
                // FusedLamb's own clipping is not implemented; silently skipping it would train
                // with different gradients than asked for.
                if p.max_grad_norm != 0.0 {
                    return Err(OptimizerError::UnsupportedParam {
                        key: "max_grad_norm",
                        value: p.max_grad_norm.to_string(),
                        expected: "0 (use the top-level gradient_clipping instead)",
                    });
                }
                OptimizerSpec::Lamb(optim::LambParams {
                    lr: p.lr,
                    bias_correction: p.bias_correction,
                    betas: (p.betas[0], p.betas[1]),
                    eps: p.eps,
                    eps_inside_sqrt: p.eps_inside_sqrt,
                    weight_decay: p.weight_decay,
                    max_coeff: p.max_coeff,
                    min_coeff: p.min_coeff,
                })
            }
            OptimizerBlock::Lion(p) => OptimizerSpec::Lion(optim::LionParams {
                lr: p.lr,
                betas: (p.betas[0], p.betas[1]),
                weight_decay: p.weight_decay,
            }),
            OptimizerBlock::Adagrad(p) => {
                if p.lr_decay != 0.0 {
                    return Err(OptimizerError::UnsupportedParam {
                        key: "lr_decay",
                        value: p.lr_decay.to_string(),
                        expected: "0 (use a scheduler instead)",
                    });
                }
                OptimizerSpec::Adagrad {
                    params: optim::AdagradParams {
                        lr: p.lr,
                        eps: p.eps,
                        weight_decay: p.weight_decay,
                    },
                    initial_accumulator_value: p.initial_accumulator_value as f32,
                }
            }
            OptimizerBlock::Sgd(p) => OptimizerSpec::Sgd(optim::SgdParams {
                lr: p.lr,
                momentum: p.momentum,
                dampening: p.dampening,
                weight_decay: p.weight_decay,
                nesterov: p.nesterov,
            }),
            OptimizerBlock::Other { .. } => {
                return Err(OptimizerError::Unsupported(cfg.type_name.clone()))
            }
        })
    }

    /// The name recorded in checkpoints; a checkpoint only loads into the same optimizer.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerSpec::Adam(p) if p.adam_w_mode => "adamw",
            OptimizerSpec::Adam(_) => "adam",
            OptimizerSpec::Lamb(_) => "lamb",
            OptimizerSpec::Lion(_) => "lion",
            OptimizerSpec::Adagrad { .. } => "adagrad",
            OptimizerSpec::Sgd(p) if p.momentum != 0.0 => "sgd_momentum",
            OptimizerSpec::Sgd(_) => "sgd",
        }
    }

    pub fn memory_kind(&self) -> OptimizerKind {
        match self {
            OptimizerSpec::Adam(_) => OptimizerKind::AdamW,
            OptimizerSpec::Lamb(_) => OptimizerKind::Lamb,
            OptimizerSpec::Lion(_) => OptimizerKind::Lion,
            OptimizerSpec::Adagrad { .. } => OptimizerKind::Adagrad,
            OptimizerSpec::Sgd(p) if p.momentum != 0.0 => OptimizerKind::SgdMomentum,
            OptimizerSpec::Sgd(_) => OptimizerKind::Sgd,
        }
    }

    /// Names of the fp32 state buffers, as torch names them in `optimizer.state`.
    pub fn state_names(&self) -> &'static [&'static str] {
        match self.memory_kind() {
            OptimizerKind::AdamW | OptimizerKind::Lamb => &["exp_avg", "exp_avg_sq"],
            OptimizerKind::SgdMomentum => &["momentum_buffer"],
            OptimizerKind::Lion => &["exp_avg"],
            OptimizerKind::Adagrad => &["sum"],
            OptimizerKind::Sgd => &[],
        }
    }

    fn initial_state_value(&self) -> f32 {
        match self {
            OptimizerSpec::Adagrad {
                initial_accumulator_value,
                ..
            } => *initial_accumulator_value,
            _ => 0.0,
        }
    }

    pub fn lr(&self) -> f64 {
        match self {
            OptimizerSpec::Adam(p) => p.lr,
            OptimizerSpec::Lamb(p) => p.lr,
            OptimizerSpec::Lion(p) => p.lr,
            OptimizerSpec::Adagrad { params, .. } => params.lr,
            OptimizerSpec::Sgd(p) => p.lr,
        }
    }

    pub fn weight_decay(&self) -> f64 {
        match self {
            OptimizerSpec::Adam(p) => p.weight_decay,
            OptimizerSpec::Lamb(p) => p.weight_decay,
            OptimizerSpec::Lion(p) => p.weight_decay,
            OptimizerSpec::Adagrad { params, .. } => params.weight_decay,
            OptimizerSpec::Sgd(p) => p.weight_decay,
        }
    }

    /// Whether OneCycle may cycle beta1 (DeepSpeed checks for `betas` in the param groups).
    pub fn has_betas(&self) -> bool {
        matches!(
            self,
            OptimizerSpec::Adam(_) | OptimizerSpec::Lamb(_) | OptimizerSpec::Lion(_)
        )
    }
}

/// Which trainable parameters get weight decay.
pub enum DecayRule {
    /// HF Trainer's default: no decay for biases and normalisation weights ([`hf_no_decay`]).
    HfTrainer,
    /// DeepSpeed's own default (one group): every parameter decays.
    All,
    /// `true` means the parameter decays.
    Custom(Box<dyn Fn(&ParamSpec) -> bool + Send + Sync>),
}

impl DecayRule {
    pub fn decays(&self, spec: &ParamSpec) -> bool {
        match self {
            DecayRule::HfTrainer => !hf_no_decay(&spec.name),
            DecayRule::All => true,
            DecayRule::Custom(f) => f(spec),
        }
    }
}

impl std::fmt::Debug for DecayRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecayRule::HfTrainer => f.write_str("HfTrainer"),
            DecayRule::All => f.write_str("All"),
            DecayRule::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// HF Trainer's `get_decay_parameter_names` by name (our layers are not torch modules, so
/// the module-type test becomes a name test): biases, and the weights of LayerNorm/RMSNorm
/// modules (`ln_1`, `ln_f`, `input_layernorm`, `model.norm`, `q_norm`, ...).
pub fn hf_no_decay(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let mut parts = lower.split('.');
    let last = parts.next_back().unwrap_or_default();
    if last.contains("bias") {
        return true;
    }
    lower
        .split('.')
        .any(|c| c.starts_with("ln_") || c == "ln" || c.contains("norm"))
}

/// One parameter group's hyper-parameters (the config's, overridden per group).
#[derive(Clone, Debug, PartialEq)]
pub struct ParamGroup {
    pub name: &'static str,
    /// The base lr schedulers start from (the config's lr).
    pub lr: f64,
    pub weight_decay: f64,
}

/// A trainable parameter in the flat buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct FlatParam {
    /// Index into `ParamLayout::slots()`.
    pub slot: usize,
    pub flat: Range<usize>,
    /// Offset in the model's parameter buffer.
    pub model_offset: usize,
    pub group: usize,
}

/// A maximal run of parameters of one group, contiguous in both buffers.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub group: usize,
    pub flat: Range<usize>,
    pub model_offset: usize,
    /// Lengths of the whole tensors in the run (Lamb's trust ratio is per tensor).
    pub tensor_lens: Vec<usize>,
}

/// The trainable parameters' flat layout and their groups.
#[derive(Clone, Debug, PartialEq)]
pub struct FlatLayout {
    pub params: Vec<FlatParam>,
    pub segments: Vec<Segment>,
    /// For each slot of the model layout, its flat range (None when frozen).
    pub slot_flat: Vec<Option<Range<usize>>>,
    pub numel: usize,
}

/// Group 0 decays, group 1 does not (HF Trainer's two groups, in its order).
pub const DECAY_GROUP: usize = 0;
pub const NO_DECAY_GROUP: usize = 1;

impl FlatLayout {
    /// The pieces of flat range `range` that the segments cover, each as (segment, flat range,
    /// model range): where a partition's values live in the model's parameter buffer.
    pub fn pieces(
        &self,
        range: Range<usize>,
    ) -> impl Iterator<Item = (&Segment, Range<usize>, Range<usize>)> + '_ {
        self.segments.iter().filter_map(move |seg| {
            let start = seg.flat.start.max(range.start);
            let end = seg.flat.end.min(range.end);
            (start < end).then(|| {
                let m = seg.model_offset + (start - seg.flat.start);
                (seg, start..end, m..m + (end - start))
            })
        })
    }

    pub fn new(layout: &ParamLayout, rule: &DecayRule) -> FlatLayout {
        let mut params: Vec<FlatParam> = Vec::new();
        let mut segments: Vec<Segment> = Vec::new();
        let mut slot_flat = Vec::with_capacity(layout.slots().len());
        let mut numel = 0;
        for (i, slot) in layout.slots().iter().enumerate() {
            if !slot.spec.trainable {
                slot_flat.push(None);
                continue;
            }
            let n = slot.spec.numel();
            let group = if rule.decays(&slot.spec) {
                DECAY_GROUP
            } else {
                NO_DECAY_GROUP
            };
            let flat = numel..numel + n;
            numel += n;
            slot_flat.push(Some(flat.clone()));
            let extends = segments.last().is_some_and(|s| {
                s.group == group
                    && s.flat.end == flat.start
                    && s.model_offset + s.flat.len() == slot.offset
            });
            match segments.last_mut() {
                Some(s) if extends => {
                    s.flat.end = flat.end;
                    s.tensor_lens.push(n);
                }
                _ => segments.push(Segment {
                    group,
                    flat: flat.clone(),
                    model_offset: slot.offset,
                    tensor_lens: vec![n],
                }),
            }
            params.push(FlatParam {
                slot: i,
                flat,
                model_offset: slot.offset,
                group,
            });
        }
        FlatLayout {
            params,
            segments,
            slot_flat,
            numel,
        }
    }
}

/// Where the updated fp32 values live and where the compute copy goes.
pub enum Weights<'a> {
    /// fp32 training: the model's own parameters are the master weights (model coordinates).
    F32(&'a mut [f32]),
    /// 16-bit training: fp32 master of the partition (partition coordinates) and the model's
    /// 16-bit parameters (model coordinates), rewritten in the same pass.
    Bf16 {
        master: &'a mut [f32],
        model: &'a mut [half::bf16],
    },
    F16 {
        master: &'a mut [f32],
        model: &'a mut [half::f16],
    },
}

/// The hyper-parameters one step uses, per group (from the scheduler).
#[derive(Clone, Debug, PartialEq)]
pub struct StepHyper {
    pub lrs: Vec<f64>,
    /// OneCycle's (beta1, beta2) per group, when it cycles momentum.
    pub betas: Option<Vec<(f64, f64)>>,
}

/// Optimizer state for one partition `[lo, hi)` of the flat buffer.
#[derive(Clone, Debug)]
pub struct OptimizerState {
    pub spec: OptimizerSpec,
    pub groups: Vec<ParamGroup>,
    pub partition: Range<usize>,
    /// Elements of each buffer: `hi - lo`, or more when the partition carries DeepSpeed's
    /// zero padding (the last ZeRO 1-2 rank; stage-3 pieces).
    pub len: usize,
    /// One buffer per [`OptimizerSpec::state_names`], each `len` elements.
    pub states: Vec<Vec<f32>>,
    /// Applied optimizer steps (torch's `state['step']`; skipped steps do not count).
    pub step: u64,
}

impl OptimizerState {
    pub fn new(spec: OptimizerSpec, partition: Range<usize>) -> Self {
        let len = partition.len();
        Self::padded(spec, partition, len)
    }

    /// State for `partition` in buffers of `len >= hi - lo` elements (the tail is padding).
    pub fn padded(spec: OptimizerSpec, partition: Range<usize>, len: usize) -> Self {
        assert!(
            len >= partition.len(),
            "padding cannot shrink the partition"
        );
        let wd = spec.weight_decay();
        let groups = vec![
            ParamGroup {
                name: "decay",
                lr: spec.lr(),
                weight_decay: wd,
            },
            ParamGroup {
                name: "no_decay",
                lr: spec.lr(),
                weight_decay: 0.0,
            },
        ];
        let init = spec.initial_state_value();
        let states = spec.state_names().iter().map(|_| vec![init; len]).collect();
        OptimizerState {
            spec,
            groups,
            partition,
            len,
            states,
            step: 0,
        }
    }

    pub fn state_bytes(&self) -> u64 {
        self.states.iter().map(|s| 4 * s.len() as u64).sum()
    }

    /// One fused step over every segment's part of the partition. `grads` holds the
    /// partition's gradients (`grads[0]` is flat element `lo`); it is read as
    /// `grad * grad_scale`.
    pub fn apply(
        &mut self,
        flat: &FlatLayout,
        mut weights: Weights<'_>,
        grads: &[f32],
        grad_scale: f32,
        hyper: &StepHyper,
    ) -> Result<(), OptimizerError> {
        self.step += 1;
        let (lo, hi) = (self.partition.start, self.partition.end);
        for (seg, piece, model) in flat.pieces(lo..hi) {
            let (start, end) = (piece.start, piece.end);
            let local = start - lo..end - lo;
            let tensor_lens = cut_tensors(&seg.tensor_lens, start - seg.flat.start, end - start);
            let (params, out) = match &mut weights {
                Weights::F32(p) => (&mut p[model], HalfOut::None),
                Weights::Bf16 { master, model: m } => {
                    (&mut master[local.clone()], HalfOut::Bf16(&mut m[model]))
                }
                Weights::F16 { master, model: m } => {
                    (&mut master[local.clone()], HalfOut::F16(&mut m[model]))
                }
            };
            let mut states: Vec<&mut [f32]> = self
                .states
                .iter_mut()
                .map(|s| &mut s[local.clone()])
                .collect();
            let group = &self.groups[seg.group];
            let lr = hyper.lrs[seg.group];
            let betas = hyper.betas.as_ref().map(|b| b[seg.group]);
            step_range(
                &self.spec,
                group.weight_decay,
                lr,
                betas,
                self.step,
                grad_scale,
                params,
                &grads[local.clone()],
                &mut states,
                out,
                &tensor_lens,
            )?;
        }
        Ok(())
    }
}

/// The tensor lengths of `offset..offset + len` within a run of tensors `lens` (a partition
/// may cut the first and last tensor; Lamb then sees partial tensors, see the module docs of
/// the kernels: the distributed engine all-reduces those norms).
fn cut_tensors(lens: &[usize], offset: usize, len: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let (mut pos, end) = (0, offset + len);
    for &n in lens {
        let (a, b) = (pos.max(offset), (pos + n).min(end));
        if a < b {
            out.push(b - a);
        }
        pos += n;
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn step_range(
    spec: &OptimizerSpec,
    weight_decay: f64,
    lr: f64,
    betas: Option<(f64, f64)>,
    step: u64,
    grad_scale: f32,
    params: &mut [f32],
    grads: &[f32],
    states: &mut [&mut [f32]],
    out: HalfOut<'_>,
    tensor_lens: &[usize],
) -> Result<(), OptimError> {
    match spec {
        OptimizerSpec::Adam(p) => {
            let hp = optim::AdamParams {
                lr,
                weight_decay,
                betas: betas.unwrap_or(p.betas),
                ..p.clone()
            };
            let [m, v] = states else {
                unreachable!("Adam has two states")
            };
            let bufs = optim::AdamBuffers {
                params,
                grads,
                exp_avg: m,
                exp_avg_sq: v,
                out,
            };
            optim::adam_step(&hp, step, grad_scale, bufs)
        }
        OptimizerSpec::Lamb(p) => {
            let hp = optim::LambParams {
                lr,
                weight_decay,
                betas: betas.unwrap_or(p.betas),
                ..p.clone()
            };
            let [m, v] = states else {
                unreachable!("Lamb has two states")
            };
            let bufs = optim::LambBuffers {
                params,
                grads,
                exp_avg: m,
                exp_avg_sq: v,
                out,
            };
            optim::lamb_step(&hp, step, grad_scale, bufs, tensor_lens).map(|_| ())
        }
        OptimizerSpec::Lion(p) => {
            let hp = optim::LionParams {
                lr,
                weight_decay,
                betas: betas.unwrap_or(p.betas),
            };
            let [m] = states else {
                unreachable!("Lion has one state")
            };
            let bufs = optim::LionBuffers {
                params,
                grads,
                exp_avg: m,
                out,
            };
            optim::lion_step(&hp, grad_scale, bufs)
        }
        OptimizerSpec::Adagrad { params: p, .. } => {
            let hp = optim::AdagradParams {
                lr,
                weight_decay,
                eps: p.eps,
            };
            let [v] = states else {
                unreachable!("Adagrad has one state")
            };
            let bufs = optim::AdagradBuffers {
                params,
                grads,
                exp_avg_sq: v,
                out,
            };
            optim::adagrad_step(&hp, grad_scale, bufs)
        }
        OptimizerSpec::Sgd(p) => {
            let hp = optim::SgdParams {
                lr,
                weight_decay,
                ..p.clone()
            };
            let mut empty: [f32; 0] = [];
            let momentum_buffer: &mut [f32] = match states {
                [b] => b,
                _ => &mut empty,
            };
            let bufs = optim::SgdBuffers {
                params,
                grads,
                momentum_buffer,
                out,
            };
            optim::sgd_step(&hp, step, grad_scale, bufs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_rule_exempts_biases_and_norms() {
        for name in [
            "transformer.h.0.attn.c_attn.bias",
            "transformer.h.0.ln_1.weight",
            "transformer.ln_f.weight",
            "model.layers.3.input_layernorm.weight",
            "model.layers.3.post_attention_layernorm.weight",
            "model.norm.weight",
            "model.layers.0.self_attn.q_norm.weight",
        ] {
            assert!(hf_no_decay(name), "{name} must not decay");
        }
        for name in [
            "transformer.wte.weight",
            "transformer.h.0.attn.c_attn.weight",
            "model.layers.3.mlp.down_proj.weight",
            "lm_head.weight",
        ] {
            assert!(!hf_no_decay(name), "{name} must decay");
        }
    }

    #[test]
    fn segments_merge_runs_and_skip_frozen() {
        let mut frozen = ParamSpec::new("b.weight", &[3]);
        frozen.trainable = false;
        let own = vec![
            vec![
                ParamSpec::new("a.weight", &[2, 2]),
                ParamSpec::new("a.bias", &[2]),
            ],
            vec![frozen, ParamSpec::new("c.weight", &[5])],
            vec![ParamSpec::new("d.weight", &[1])],
        ];
        let layout = ParamLayout::new(&own, &[]).unwrap();
        let flat = FlatLayout::new(&layout, &DecayRule::HfTrainer);
        assert_eq!(flat.numel, 4 + 2 + 5 + 1);
        let segs: Vec<(usize, Range<usize>, usize)> = flat
            .segments
            .iter()
            .map(|s| (s.group, s.flat.clone(), s.model_offset))
            .collect();
        // a.bias breaks the decay run; the frozen b.weight breaks model contiguity; c and d
        // are contiguous in both buffers and merge.
        assert_eq!(segs, vec![(0, 0..4, 0), (1, 4..6, 4), (0, 6..12, 9)]);
        assert_eq!(flat.slot_flat[2], None);
        assert_eq!(flat.slot_flat[3], Some(6..11));
    }

    #[test]
    fn partition_cuts_tensor_lengths() {
        assert_eq!(cut_tensors(&[4, 2, 5], 0, 11), vec![4, 2, 5]);
        assert_eq!(cut_tensors(&[4, 2, 5], 3, 5), vec![1, 2, 2]);
        assert_eq!(cut_tensors(&[4, 2, 5], 6, 5), vec![5]);
    }
}
