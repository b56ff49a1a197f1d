//! The single-process training engine, in the spirit of `deepspeed.initialize`.
//!
//! ```text
//! let mut engine = Engine::initialize(model, &config, EngineOptions::default())?;
//! for batch in data {               // or: engine.train_batch(&mut data)?
//!     let loss = engine.forward(&batch)?;
//!     engine.backward()?;
//!     engine.step()?;               // acts at the gradient-accumulation boundary only
//! }
//! ```
//!
//! Order of events at a boundary, as DeepSpeed's ZeRO 1/2 optimizer: global gradient norm of
//! the (loss-scaled) fp32 gradients; if it is not finite and the precision checks overflow,
//! the step is skipped (`skipped_steps` and `global_steps` advance, the loss scaler updates,
//! the scheduler does not); otherwise the clip coefficient, one fused optimizer pass per
//! segment reading `grad / (loss_scale * clip)` and rewriting the 16-bit weights, the loss
//! scaler update, the scheduler step. Gradients are zeroed in both cases.
//!
//! Buffers are laid out for ZeRO: the fp32 gradient, master and optimizer buffers cover the
//! trainable parameters' flat layout ([`FlatLayout`]), and the optimizer steps the partition
//! `[lo, hi)` (everything with one process). At stage 3 over several ranks (`zero3.rs`) they
//! cover this rank's pieces of each parameter instead, the model's parameter buffer is freed,
//! and forward/backward gather each layer when it runs.

mod dp;
mod eval;
mod fetch;
mod grads;
mod resume;
mod schedule;
mod zero2;
mod zero3;

use std::ops::Range;
use std::sync::Arc;

use rustspeed_comm::{CommError, Communicator};
use rustspeed_config::{AllreduceOp, DsConfig, Precision};
use rustspeed_kernels::optim::{clip_coefficient, grad_norm, GradNorm};
use rustspeed_kernels::Float;
use rustspeed_models::{Batch, Ctx, Flow, Model};

use crate::checkpoint::CheckpointError;
use crate::loss_scaler::{LossScaleError, LossScaler};
use crate::lr_schedule::{LrScheduleError, LrScheduleParams, LrScheduler};
use crate::memory::{self, MemorySetup, ModelStateBytes};
use crate::optimizer::{
    DecayRule, FlatLayout, OptimizerError, OptimizerSpec, OptimizerState, StepHyper,
};
use crate::precision::{self, PrecisionError};

pub use fetch::FetchStats;
pub use resume::LoadOptions;
pub use schedule::schedule_params;
pub use zero3::{ShardSlot, Zero3Layout};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Precision(#[from] PrecisionError),
    #[error(transparent)]
    Optimizer(#[from] OptimizerError),
    #[error("scheduler: {0}")]
    Schedule(#[from] LrScheduleError),
    #[error(transparent)]
    LossScale(#[from] LossScaleError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("communication: {0}")]
    Comm(#[from] CommError),
    #[error("the config resolved the data-parallel world size to {config}, but {comm} ranks are running")]
    WorldMismatch { config: u64, comm: usize },
    #[error("not supported yet: {0}")]
    NotSupported(String),
    #[error("model parameters are {0}; the engine trains f32, bf16 or f16 parameters")]
    UnsupportedDtype(&'static str),
    #[error("the data-parallel world size is {0}; this engine runs one process (world size 1)")]
    WorldSize(u64),
    #[error("the last layer `{layer}` reported no loss after forward; a model must end with a layer that sets `flow.loss` (an LM head)")]
    NoLoss { layer: String },
    #[error("checkpoint tag `{ours}` on rank {rank} differs from rank 0's `{root}`; every rank must save under the same tag (checkpoint.tag_validation is \"Fail\")")]
    TagMismatch {
        rank: usize,
        ours: String,
        root: String,
    },
    #[error("backward() was called without a forward() before it")]
    BackwardWithoutForward,
    #[error("forward() was called again before backward(); the LM head accumulates its gradients during forward, so every forward() must be followed by its backward()")]
    ForwardWithoutBackward,
    #[error("eval_loss() was called between a training forward() and its backward(); evaluate before forward() or after backward()")]
    EvalDuringStep,
    #[error("train_batch needs gradient_accumulation_steps = {gas} micro-batches per step, but the data ended after {got}")]
    DataExhausted { gas: u64, got: u64 },
    #[error("train_partial_batch takes 1 to gradient_accumulation_steps = {gas} micro-batches, got {got}")]
    PartialStep { gas: u64, got: u64 },
    #[error("train_batch must start at a gradient-accumulation boundary, but {pending} of {gas} micro-batches of the current step were already run with forward/backward/step")]
    MidAccumulation { pending: u64, gas: u64 },
}

/// Choices that are not in the DeepSpeed config.
pub struct EngineOptions {
    /// Which trainable parameters get weight decay (HF Trainer's rule by default).
    pub decay_rule: DecayRule,
    /// Base seed of the dropout masks; micro-step `k` uses a seed derived from it and `k`.
    pub seed: u64,
    /// The schedule when the config has no `scheduler` block (HF Trainer builds its own
    /// then); `None` keeps the optimizer's lr constant, as DeepSpeed does.
    pub fallback_schedule: Option<LrScheduleParams>,
    /// The data-parallel group; `None` (or a world of one) trains in this process alone.
    pub comm: Option<Arc<Communicator>>,
}

impl std::fmt::Debug for EngineOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineOptions")
            .field("decay_rule", &self.decay_rule)
            .field("seed", &self.seed)
            .field("fallback_schedule", &self.fallback_schedule)
            .field("world", &self.comm.as_ref().map(|c| c.world_size()))
            .finish()
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            decay_rule: DecayRule::HfTrainer,
            seed: 42,
            fallback_schedule: None,
            comm: None,
        }
    }
}

/// What one optimizer step (at a boundary) did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// `global_steps` after this step.
    pub global_step: u64,
    /// Skipped because the gradients overflowed.
    pub skipped: bool,
    /// Global L2 norm of the unscaled gradients before clipping (not finite when skipped).
    pub grad_norm: f64,
    /// The clip coefficient applied (DeepSpeed's `clip >= 1`, 1 when not clipped).
    pub clip_coef: f64,
    /// Group 0's lr this step used.
    pub lr: f64,
    /// The loss scale the gradients carried.
    pub loss_scale: f64,
}

/// [`Engine::train_batch`]'s result.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Mean of the micro-batch losses.
    pub loss: f32,
    pub step: StepOutcome,
}

/// What forward kept for backward.
struct Pending {
    batch: Batch,
    dropout_seed: u64,
    /// The loss gradient's scale, fixed at forward: the LM head has used it already.
    grad_scale: f32,
}

pub struct Engine<T: Float> {
    model: Model<T>,
    config: DsConfig,
    flat: FlatLayout,
    /// fp32 gradients over the flat trainable layout (stage 0: all of it), loss-scaled.
    grads: Vec<f32>,
    /// fp32 master weights of the partition; empty with f32 compute (the model's are master).
    master: Vec<f32>,
    optimizer: OptimizerState,
    scheduler: Option<LrScheduler>,
    scaler: LossScaler,
    check_overflow: bool,
    gas: u64,
    /// What each micro-batch's gradient is divided by: `gas`, or the step's micro-batch count
    /// per rank for an epoch's last, partial step (see [`Engine::train_partial_batch`]).
    step_divisor: f64,
    clipping: f64,
    micro_steps: u64,
    global_steps: u64,
    skipped_steps: u64,
    global_samples: u64,
    seed: u64,
    pending: Option<Pending>,
    last_grad_norm: Option<f64>,
    /// Set when training over several ranks.
    dp: Option<dp::DataParallel>,
    /// Set at ZeRO stage 3 over several ranks: the parameters' pieces; `model.params` is then
    /// empty (see [`Engine::materialize_params`]).
    z3: Option<zero3::Zero3<T>>,
    /// Set at ZeRO stage 2 over several ranks: gradients reduced layer by layer into the
    /// partition-sized `grads`.
    z2: Option<zero2::Zero2>,
}

/// fp32 master weights of `partition` (in a buffer of `len`, the tail zero padding) read from
/// the compute weights: stage 3's pieces, or the whole parameters otherwise.
fn master_from_weights<T: Float>(
    z3: Option<&zero3::Zero3<T>>,
    flat: &FlatLayout,
    params: &[T],
    partition: Range<usize>,
    len: usize,
) -> Vec<f32> {
    let mut m = vec![0.0f32; len];
    let (flat, weights) = match z3 {
        Some(z) => (&z.layout.flat, &z.shards[..]),
        None => (flat, params),
    };
    for (_, f, range) in flat.pieces(partition.clone()) {
        let dst = &mut m[f.start - partition.start..f.end - partition.start];
        for (d, s) in dst.iter_mut().zip(&weights[range]) {
            *d = s.to_f32();
        }
    }
    m
}

/// splitmix64 of the base seed and the micro-step: independent masks per micro-batch, and
/// the same masks again when a run resumes at that micro-step.
fn dropout_seed(seed: u64, micro_step: u64) -> u64 {
    let mut z = seed ^ micro_step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<T: Float> Engine<T> {
    /// Builds the engine: checks the model's dtype against the config's precision, lays out
    /// the trainable parameters, allocates gradients, master weights and optimizer state,
    /// builds the scheduler (which already sets the first step's lr) and the loss scaler.
    pub fn initialize(
        model: Model<T>,
        config: &DsConfig,
        options: EngineOptions,
    ) -> Result<Engine<T>, EngineError> {
        if !precision::is_supported::<T>() {
            return Err(EngineError::UnsupportedDtype(std::any::type_name::<T>()));
        }
        precision::check_dtype(config.precision, T::DTYPE)?;
        let world = config.batch.world_size.value;
        let comm = options.comm.clone().filter(|c| c.world_size() > 1);
        if comm.is_none() && world != 1 {
            return Err(EngineError::WorldSize(world));
        }
        if let Some(c) = &comm {
            if c.world_size() as u64 != world {
                return Err(EngineError::WorldMismatch {
                    config: world,
                    comm: c.world_size(),
                });
            }
        }
        if comm.is_none() && config.zero_stage() > 0 {
            tracing::warn!(
                "ZeRO stage {} partitions nothing with one process; the single-process engine keeps every state whole (stage 0)",
                config.zero_stage()
            );
        }
        let spec = OptimizerSpec::from_config(config.optimizer.as_ref())?;
        let flat = FlatLayout::new(&model.layout, &options.decay_rule);
        let dp = comm.map(|c| {
            let zc = &config.zero_optimization;
            let reduce = dp::GradReduce::new(
                config.gradient_allreduce_op == AllreduceOp::Mean,
                config.prescale_gradients,
                config.gradient_predivide_factor,
                c.world_size(),
            );
            let exchange = dp::Exchange {
                reduce_scatter: zc.reduce_scatter,
                allgather_partitions: zc.allgather_partitions,
                allgather_bucket: usize::try_from(zc.allgather_bucket_size).unwrap_or(usize::MAX),
            };
            dp::DataParallel::new(c, config.zero_stage(), reduce, exchange, flat.numel)
        });
        if dp.as_ref().is_some_and(|d| d.stage >= 1) && matches!(spec, OptimizerSpec::Lamb(_)) {
            return Err(EngineError::NotSupported(
                "LAMB with ZeRO stage 1-2 over several ranks (its per-tensor trust ratio needs norms across partitions)".into(),
            ));
        }
        let mut model = model;
        let z3 = match &dp {
            Some(d) if d.stage >= 3 => {
                let zc = &config.zero_optimization;
                let layout = zero3::Zero3Layout::new(
                    &model.layout,
                    &flat,
                    d.world(),
                    d.rank(),
                    zc.param_persistence_threshold,
                    zc.model_persistence_threshold,
                );
                let (shards, resident) = layout.split(&model.layout, &model.params);
                // The point of stage 3: the whole buffer goes; layers are gathered on demand.
                model.params = Vec::new();
                Some(zero3::Zero3::new(
                    d.comm.clone(),
                    d.reduce,
                    layout,
                    shards,
                    resident,
                    fetch::FetchConfig {
                        prefetch_bucket: zc.prefetch_bucket_size,
                        max_live: zc.max_live_parameters,
                        max_reuse_distance: zc.max_reuse_distance,
                    },
                    zc.overlap_comm,
                ))
            }
            _ => None,
        };
        let z2 = match &dp {
            Some(d) if d.stage == 2 => {
                let zc = &config.zero_optimization;
                let layout =
                    zero3::Zero3Layout::new(&model.layout, &flat, d.world(), d.rank(), 0, 0);
                Some(zero2::Zero2::new(
                    d.comm.clone(),
                    d.reduce,
                    d.exchange.reduce_scatter,
                    layout,
                    d.padded / d.world(),
                    zc.reduce_bucket_size,
                    zc.overlap_comm,
                ))
            }
            _ => None,
        };
        let partition: Range<usize> = match (&dp, &z3) {
            (_, Some(z)) => 0..z.layout.train_numel,
            (Some(d), None) => d.partition(flat.numel),
            (None, None) => 0..flat.numel,
        };
        // DeepSpeed's partitions are equal after alignment: the last rank's carries the zero
        // padding in its fp32 buffers too.
        let buffer_len = match (&dp, &z3) {
            (Some(d), None) if d.stage >= 1 => d.padded / d.world(),
            _ => partition.len(),
        };
        let master = if config.precision == Precision::Fp32 {
            Vec::new()
        } else {
            master_from_weights(
                z3.as_ref(),
                &flat,
                &model.params,
                partition.clone(),
                buffer_len,
            )
        };
        let has_betas = spec.has_betas();
        let optimizer = OptimizerState::padded(spec, partition, buffer_len);
        let base_lrs: Vec<f64> = optimizer.groups.iter().map(|g| g.lr).collect();
        let scheduler = match (&config.scheduler, &options.fallback_schedule) {
            (Some(s), _) => Some(schedule::build(s, &base_lrs, has_betas)?),
            (None, Some(p)) => Some(LrScheduler::new(p, &base_lrs, has_betas)?),
            (None, None) => None,
        };
        let engine = Engine {
            grads: vec![
                0.0;
                match (&z3, &z2, &dp) {
                    (Some(z), _, _) => z.layout.train_numel,
                    (None, Some(z), _) => z.piece,
                    (None, None, Some(d)) => d.padded,
                    (None, None, None) => flat.numel,
                }
            ],
            master,
            optimizer,
            scheduler,
            scaler: precision::loss_scaler(config)?,
            check_overflow: precision::checks_overflow(config),
            gas: config.gradient_accumulation_steps(),
            step_divisor: config.gradient_accumulation_steps() as f64,
            clipping: config.gradient_clipping,
            micro_steps: 0,
            global_steps: 0,
            skipped_steps: 0,
            global_samples: 0,
            seed: options.seed,
            pending: None,
            last_grad_norm: None,
            dp,
            z3,
            z2,
            flat,
            model,
            config: config.clone(),
        };
        let bytes = engine.model_state_bytes();
        tracing::info!(
            "model states: {} params ({} trainable), {} bytes = weights {} + grads {} + fp32 master {} + optimizer {} ({})",
            engine.model.layout.numel(),
            engine.flat.numel,
            bytes.total,
            bytes.weights,
            bytes.grads,
            bytes.master,
            bytes.optimizer,
            engine.optimizer.spec.name()
        );
        Ok(engine)
    }

    /// Runs the model forward on one micro-batch (training mode) and returns the mean NLL over
    /// its label tokens (0 when it has none). The loss gradient's scale is known before forward
    /// (see [`Engine::backward`]), so the LM head computes its logits once, for the loss and its
    /// gradients together, which land in the gradient buffer now; `backward` must follow.
    pub fn forward(&mut self, batch: &Batch) -> Result<f32, EngineError> {
        if self.pending.is_some() {
            return Err(EngineError::ForwardWithoutBackward);
        }
        let seed = dropout_seed(self.seed, self.micro_steps);
        let tokens = batch.label_tokens();
        let grad_scale = if tokens == 0 {
            0.0
        } else {
            (self.scaler.loss_scale() / (tokens as f64 * self.step_divisor)) as f32
        };
        let ctx = Ctx {
            batch,
            train: true,
            dropout_seed: seed,
            grad_scale,
        };
        let model = &mut self.model;
        let Some(last) = model.layers.len().checked_sub(1) else {
            return Err(EngineError::NoLoss {
                layer: String::new(),
            });
        };
        let loss = if let Some(z3) = &mut self.z3 {
            // A materialized copy (exports) is stale once training goes on.
            model.params = Vec::new();
            zero3::forward(model, z3, Some(&ctx))?
        } else if let Some(z2) = &mut self.z2 {
            zero2::forward(model, z2, Some(&ctx))
        } else {
            let mut flow = Flow::default();
            for i in 0..last {
                let views = model.layout.layer_views(i, &model.params);
                model.layers[i].forward(&views, &mut flow, &ctx);
            }
            let fused =
                grads::with_grad_views(model, &self.flat, &mut self.grads, last, |head, p, g| {
                    head.forward_backward(p, g, &mut flow, &ctx)
                });
            if !fused {
                let views = model.layout.layer_views(last, &model.params);
                model.layers[last].forward(&views, &mut flow, &ctx);
            }
            flow.loss
        };
        let loss = loss.ok_or_else(|| EngineError::NoLoss {
            layer: model.layers[last].name().to_string(),
        })?;
        debug_assert_eq!(
            loss.tokens, tokens,
            "the head counts the labels that are not IGNORE_INDEX"
        );
        self.pending = Some(Pending {
            batch: batch.clone(),
            dropout_seed: seed,
            grad_scale,
        });
        Ok(loss.mean() as f32)
    }

    /// Backward of the last forward: the loss gradient starts at
    /// `loss_scale / (label_tokens * gradient_accumulation_steps)`, so the accumulated
    /// gradient is that of the mean of the micro-batch means, scaled by the loss scale.
    pub fn backward(&mut self) -> Result<(), EngineError> {
        let pending = self
            .pending
            .take()
            .ok_or(EngineError::BackwardWithoutForward)?;
        let ctx = Ctx {
            batch: &pending.batch,
            train: true,
            dropout_seed: pending.dropout_seed,
            grad_scale: pending.grad_scale,
        };
        match (&mut self.z3, &mut self.z2) {
            (Some(z3), _) => zero3::backward(&mut self.model, z3, &mut self.grads, Some(&ctx))?,
            (None, Some(z2)) => zero2::backward(&mut self.model, z2, &mut self.grads, Some(&ctx))?,
            (None, None) => grads::backward(&mut self.model, &self.flat, &mut self.grads, &ctx),
        }
        Ok(())
    }

    /// DeepSpeed's rule: the micro-step that completes `gradient_accumulation_steps`.
    pub fn is_gradient_accumulation_boundary(&self) -> bool {
        (self.micro_steps + 1).is_multiple_of(self.gas)
    }

    /// Call after every backward; steps the optimizer at the accumulation boundary only
    /// (returns what it did then, `None` otherwise).
    pub fn step(&mut self) -> Result<Option<StepOutcome>, EngineError> {
        let outcome = if self.is_gradient_accumulation_boundary() {
            Some(self.take_model_step()?)
        } else {
            None
        };
        self.micro_steps += 1;
        Ok(outcome)
    }

    fn take_model_step(&mut self) -> Result<StepOutcome, EngineError> {
        let part = self.optimizer.partition.clone();
        let loss_scale = self.scaler.loss_scale();
        let lr = self.lr();
        // Stages 2-3 reduced each layer as its backward ended; `grads` is the partition.
        let layerwise = self.z3.is_some() || self.z2.is_some();
        if let (Some(dp), false) = (&self.dp, layerwise) {
            dp.reduce_grads(&mut self.grads, self.flat.numel)?;
        }
        let local_grads = if layerwise {
            &self.grads[..part.len()]
        } else {
            &self.grads[part]
        };
        let local = grad_norm(local_grads);
        let norm = match &self.dp {
            Some(dp) => GradNorm {
                sum_sq: dp.global_sum_sq(local.sum_sq)?,
            },
            None => local,
        };
        let overflow = self.check_overflow && !norm.is_finite();
        let grad_norm = norm.norm() / loss_scale;
        self.last_grad_norm = Some(grad_norm);
        let mut clip_coef = 1.0;
        if overflow {
            self.scaler.update_scale(true)?;
            self.skipped_steps += 1;
            tracing::warn!(
                "step {}: gradient overflow (norm {grad_norm}) at loss scale {loss_scale}; skipping the step, loss scale now {} ({} skipped so far); the LR scheduler does not advance",
                self.global_steps + 1,
                self.scaler.loss_scale(),
                self.skipped_steps
            );
        } else {
            clip_coef = clip_coefficient(norm.norm(), loss_scale, self.clipping);
            let grad_scale = (1.0 / (loss_scale * clip_coef)) as f32;
            let hyper = self.step_hyper();
            if let Some(z3) = &mut self.z3 {
                let weights = precision::weights_view(&mut z3.shards, &mut self.master);
                self.optimizer
                    .apply(&z3.layout.flat, weights, &self.grads, grad_scale, &hyper)?;
                z3.refresh_resident()?;
            } else {
                let weights = precision::weights_view(&mut self.model.params, &mut self.master);
                let part = self.optimizer.partition.clone();
                let grads = if self.z2.is_some() {
                    &self.grads[..part.len()]
                } else {
                    &self.grads[part]
                };
                self.optimizer
                    .apply(&self.flat, weights, grads, grad_scale, &hyper)?;
                if let Some(dp) = &self.dp {
                    dp.gather_params(&self.flat, &mut self.model.params)?;
                }
            }
            self.scaler.update_scale(false)?;
            if let Some(s) = &mut self.scheduler {
                s.step();
            }
        }
        self.grads.fill(0.0);
        self.global_steps += 1;
        self.global_samples += self.config.train_batch_size();
        if let Some(every) = self.config.steps_per_print.filter(|&n| n > 0) {
            if self.global_steps.is_multiple_of(every) {
                tracing::info!(
                    "step={}, skipped={}, lr={:?}, grad_norm={grad_norm}, loss_scale={loss_scale}",
                    self.global_steps,
                    self.skipped_steps,
                    self.lrs()
                );
            }
        }
        Ok(StepOutcome {
            global_step: self.global_steps,
            skipped: overflow,
            grad_norm,
            clip_coef,
            lr,
            loss_scale,
        })
    }

    /// The mean over ranks of a per-rank value (the value itself in one process).
    fn global_mean(&self, x: f64) -> Result<f32, EngineError> {
        Ok(match &self.dp {
            Some(dp) => dp.mean(x)?,
            None => x,
        } as f32)
    }

    /// This rank's index and the number of data-parallel ranks.
    pub fn rank_and_world(&self) -> (usize, usize) {
        self.dp.as_ref().map_or((0, 1), |d| (d.rank(), d.world()))
    }

    fn step_hyper(&self) -> StepHyper {
        StepHyper {
            lrs: self.lrs(),
            betas: self.scheduler.as_ref().and_then(|s| s.momentum()),
        }
    }

    /// Runs `gradient_accumulation_steps` micro-batches from `data` and the optimizer step.
    pub fn train_batch<I>(&mut self, data: &mut I) -> Result<StepReport, EngineError>
    where
        I: Iterator<Item = Batch>,
    {
        let pending = self.micro_steps % self.gas;
        if pending != 0 {
            return Err(EngineError::MidAccumulation {
                pending,
                gas: self.gas,
            });
        }
        let mut sum = 0.0f64;
        for got in 0..self.gas {
            let batch = data
                .next()
                .ok_or(EngineError::DataExhausted { gas: self.gas, got })?;
            sum += self.forward(&batch)? as f64;
            self.backward()?;
            if let Some(step) = self.step()? {
                return Ok(StepReport {
                    loss: self.global_mean(sum / self.gas as f64)?,
                    step,
                });
            }
        }
        unreachable!("the gas-th micro-step is a boundary")
    }

    /// An optimizer step over `batches.len()` micro-batches, which may be fewer than
    /// `gradient_accumulation_steps`: an epoch's last step when the data does not fill it
    /// (HF Trainer steps on it, `dataloader_drop_last` being false by default). The step's loss
    /// and gradient are the mean over all the micro-batches it has (on every rank); the
    /// micro-step counter then jumps to the next boundary, so later steps keep DeepSpeed's
    /// accounting. Over several ranks every rank must call this (a rank may have no
    /// micro-batch at all in a short last step).
    pub fn train_partial_batch(&mut self, batches: Vec<Batch>) -> Result<StepReport, EngineError> {
        let n = batches.len() as u64;
        if self.dp.is_none() && n == self.gas {
            return self.train_batch(&mut batches.into_iter());
        }
        let pending = self.micro_steps % self.gas;
        if pending != 0 {
            return Err(EngineError::MidAccumulation {
                pending,
                gas: self.gas,
            });
        }
        if n > self.gas || (n == 0 && self.dp.is_none()) {
            return Err(EngineError::PartialStep {
                gas: self.gas,
                got: n,
            });
        }
        let (total, world) = match &self.dp {
            Some(dp) => (dp.sum(n)?, dp.world() as u64),
            None => (n, 1),
        };
        // Stage 3 communicates during every micro-step: a rank with fewer micro-batches joins
        // the others' collectives with nothing to add.
        let most = match &self.dp {
            Some(dp) if self.z3.is_some() || self.z2.is_some() => dp.max(n)?,
            _ => n,
        };
        if total == 0 {
            return Err(EngineError::PartialStep {
                gas: self.gas,
                got: 0,
            });
        }
        // Each rank's gradient is divided by total/world, so the mean over ranks is the mean
        // over all micro-batches (the sum, `gradient_allreduce_op: sum`, is world times it).
        self.step_divisor = total as f64 / world as f64;
        let start = self.micro_steps;
        let result = (|| {
            let mut sum = 0.0f64;
            let samples: u64 = batches.iter().map(|b| b.batch_size as u64).sum();
            for (i, batch) in batches.iter().enumerate() {
                sum += self.forward(batch)? as f64;
                self.backward()?;
                self.micro_steps = start + i as u64 + 1;
            }
            for _ in n..most {
                self.idle_micro_step()?;
            }
            self.micro_steps = start + self.gas - 1;
            let mut step = self.take_model_step()?;
            self.micro_steps += 1;
            let (sum, samples) = match &self.dp {
                Some(dp) => (dp.mean(sum)? * world as f64, dp.sum(samples)?),
                None => (sum, samples),
            };
            self.global_samples = self.global_samples - self.config.train_batch_size() + samples;
            step.global_step = self.global_steps;
            Ok(StepReport {
                loss: (sum / total as f64) as f32,
                step,
            })
        })();
        self.step_divisor = self.gas as f64;
        result
    }

    pub fn global_steps(&self) -> u64 {
        self.global_steps
    }

    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    pub fn global_samples(&self) -> u64 {
        self.global_samples
    }

    pub fn micro_steps(&self) -> u64 {
        self.micro_steps
    }

    /// Group 0's lr for the next step.
    pub fn lr(&self) -> f64 {
        self.lrs()[0]
    }

    /// Every group's lr for the next step (the scheduler's, else the optimizer's).
    pub fn lrs(&self) -> Vec<f64> {
        match &self.scheduler {
            Some(s) => s.lr(),
            None => self.optimizer.groups.iter().map(|g| g.lr).collect(),
        }
    }

    pub fn loss_scale(&self) -> f64 {
        self.scaler.loss_scale()
    }

    pub fn loss_scaler(&self) -> &LossScaler {
        &self.scaler
    }

    /// The unscaled pre-clip gradient norm of the last boundary step.
    pub fn last_grad_norm(&self) -> Option<f64> {
        self.last_grad_norm
    }

    pub fn model(&self) -> &Model<T> {
        &self.model
    }

    pub fn config(&self) -> &DsConfig {
        &self.config
    }

    pub fn flat_layout(&self) -> &FlatLayout {
        &self.flat
    }

    pub fn optimizer(&self) -> &OptimizerState {
        &self.optimizer
    }

    /// The accumulated (loss-scaled) fp32 gradients in flat coordinates (at stage 3: this
    /// rank's pieces, [`Zero3Layout::train_ranges`]).
    pub fn grads(&self) -> &[f32] {
        &self.grads
    }

    /// fp32 master weights of the partition (empty in fp32 mode: the model's are the master).
    pub fn master_weights(&self) -> &[f32] {
        &self.master
    }

    /// Bytes this engine holds for model states, counted from its allocations.
    pub fn model_state_bytes(&self) -> ModelStateBytes {
        let weights = match &self.z3 {
            Some(z3) => z3.state_bytes(),
            None => (self.model.params.len() * std::mem::size_of::<T>()) as u64,
        };
        let grads = 4 * self.grads.len() as u64;
        let master = 4 * self.master.len() as u64;
        let optimizer = self.optimizer.state_bytes();
        ModelStateBytes {
            weights,
            grads,
            master,
            optimizer,
            total: weights + grads + master + optimizer,
        }
    }

    /// `rustspeed::memory`'s per-rank figure for this model, config, stage and world size
    /// (what [`Engine::model_state_bytes`] must equal).
    pub fn expected_model_state_bytes(&self) -> Result<ModelStateBytes, memory::MemoryError> {
        let (mut trainable, mut frozen, mut all) = (Vec::new(), Vec::new(), Vec::new());
        for s in self.model.layout.slots() {
            let n = s.spec.numel() as u64;
            all.push(n);
            if s.spec.trainable {
                trainable.push(n)
            } else {
                frozen.push(n)
            }
        }
        let (_, world) = self.rank_and_world();
        let stage = self.dp.as_ref().map_or(0, |d| d.stage);
        let zc = &self.config.zero_optimization;
        memory::model_state_bytes(
            &trainable,
            &frozen,
            &MemorySetup {
                world_size: world as u64,
                stage,
                compute_dtype: T::DTYPE,
                optimizer_states: self.optimizer.spec.memory_kind().fp32_states_per_param(),
                stage3_persistent: memory::zero3_persistent_numel(
                    &all,
                    zc.param_persistence_threshold,
                    zc.model_persistence_threshold,
                ),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;
    use rustspeed_config::{parse, resolve, ResolveOptions};
    use rustspeed_models::gpt2;
    use rustspeed_models::hf_config::ModelConfig;

    fn tiny_gpt2<T: Float>(tied: bool) -> Model<T> {
        let json = format!(
            r#"{{"model_type": "gpt2", "vocab_size": 13, "n_embd": 8, "n_head": 2, "n_layer": 1,
                "n_positions": 8, "n_inner": 16, "embd_pdrop": 0.1, "resid_pdrop": 0.0,
                "attn_pdrop": 0.0, "tie_word_embeddings": {tied}}}"#
        );
        let cfg = ModelConfig::from_json_str("tiny gpt2", &json).unwrap();
        let mut model = gpt2::build::<T>(&cfg).unwrap();
        gpt2::init_weights(&mut model, &cfg, 3);
        // Larger than GPT-2's 0.02 so every gradient is well above rounding.
        for v in &mut model.params {
            *v = T::from_f32(v.to_f32() * 20.0);
        }
        model
    }

    fn batch() -> Batch {
        let ids: Vec<u32> = (0..12).map(|i| (i * 5 + 2) % 13).collect();
        let mut labels: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        labels[3] = rustspeed_models::IGNORE_INDEX;
        Batch::from_hf_labels(2, 6, ids, &labels)
    }

    /// The engine's gradients (fused head in forward, the rest in backward) against the model's
    /// unfused forward + backward with the engine's scale `loss_scale / (tokens * gas)`.
    fn check_engine_matches_unfused<T: Float>(
        tied: bool,
        precision: &str,
        loss_scale: f64,
        tol: f32,
    ) {
        let json = format!(
            r#"{{"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                "optimizer": {{"type": "SGD", "params": {{"lr": 0.1}}}} {precision}}}"#
        );
        let config = resolve(&parse(&json, "test").unwrap(), &ResolveOptions::default()).unwrap();
        let mut reference = tiny_gpt2::<T>(tied);
        let mut engine =
            Engine::initialize(tiny_gpt2::<T>(tied), &config, EngineOptions::default()).unwrap();
        assert_eq!(engine.loss_scale(), loss_scale);
        let b = batch();
        let loss = engine.forward(&b).unwrap();
        assert!(matches!(
            engine.forward(&b),
            Err(EngineError::ForwardWithoutBackward)
        ));
        engine.backward().unwrap();

        let seed = dropout_seed(EngineOptions::default().seed, 0);
        let want_loss = reference.forward(&b, true, seed);
        let scale = loss_scale / (2.0 * b.label_tokens() as f64);
        let mut want = vec![0f32; reference.params.len()];
        reference.backward(&mut want, &b, scale as f32, seed);
        assert!((loss as f64 - want_loss.mean()).abs() < 1e-3 * want_loss.mean());
        // Every parameter is trainable, so the flat layout is the model's.
        let got = engine.grads();
        assert_eq!(got.len(), want.len());
        let max = want.iter().fold(0f32, |m, g| m.max(g.abs()));
        assert!(max > 0.0);
        for slot in engine.model().layout.slots() {
            for i in slot.range() {
                assert!(
                    (got[i] - want[i]).abs() <= tol * max,
                    "{}[{}]: engine {} vs unfused {}",
                    slot.spec.name,
                    i - slot.range().start,
                    got[i],
                    want[i]
                );
            }
        }
    }

    #[test]
    fn fused_head_in_forward_gives_the_unfused_gradients_tied_fp32() {
        check_engine_matches_unfused::<f32>(true, "", 1.0, 1e-5);
    }

    #[test]
    fn fused_head_in_forward_gives_the_unfused_gradients_untied_fp32() {
        check_engine_matches_unfused::<f32>(false, "", 1.0, 1e-5);
    }

    #[test]
    fn fused_head_in_forward_carries_the_fp16_loss_scale() {
        check_engine_matches_unfused::<f16>(
            true,
            r#", "fp16": {"enabled": true, "loss_scale": 256}"#,
            256.0,
            1e-3,
        );
    }
}
