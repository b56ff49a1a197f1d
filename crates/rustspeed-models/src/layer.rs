//! The layer protocol: what the engine drives.
//!
//! A model is an ordered list of layers (like DeepSpeed's `PipelineModule`). Each layer declares
//! its parameters, runs `forward` keeping what its `backward` needs, and runs `backward` given
//! the upstream gradient, accumulating parameter gradients into views of the flat f32 gradient
//! buffer and replacing the upstream gradient by the input gradient. Because the engine drives
//! layer by layer it can gather a ZeRO-3 layer just before use and release it after, recompute a
//! layer's activations (checkpointing), reduce a layer's gradients as soon as its backward ends,
//! and cut the list into pipeline stages.
//!
//! The data between layers is a [`Flow`]: the hidden states `[rows, width]` (rows = batch *
//! sequence, row-major, in the compute dtype `T`). The first layer (an embedding) reads the
//! batch's token ids instead of `hidden`; the last (the LM head) consumes `hidden` and the labels
//! and reports the loss.

use rustspeed_kernels::Float;

use crate::linear::QuantTarget;
use crate::params::ParamSpec;

/// One micro-batch: `batch_size` sequences of `seq_len` tokens, right-padded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    /// `[batch_size * seq_len]` token ids.
    pub input_ids: Vec<u32>,
    /// `[batch_size * seq_len]` next-token targets already shifted: `labels[t]` is the token
    /// that position `t` predicts; -100 (ignored) on padding, masked prompts and the last position.
    pub labels: Vec<i32>,
}

/// The value that marks a label as not counted (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

impl Batch {
    /// Builds a batch from unshifted HF-style `labels` (same positions as `input_ids`, as passed
    /// to `GPT2LMHeadModel(labels=...)`): shifts them left by one within each sequence.
    pub fn from_hf_labels(
        batch_size: usize,
        seq_len: usize,
        input_ids: Vec<u32>,
        hf_labels: &[i32],
    ) -> Self {
        assert_eq!(input_ids.len(), batch_size * seq_len, "input_ids length");
        assert_eq!(hf_labels.len(), batch_size * seq_len, "labels length");
        let mut labels = vec![IGNORE_INDEX; batch_size * seq_len];
        for b in 0..batch_size {
            let row = b * seq_len;
            labels[row..row + seq_len - 1].copy_from_slice(&hf_labels[row + 1..row + seq_len]);
        }
        Batch {
            batch_size,
            seq_len,
            input_ids,
            labels,
        }
    }

    pub fn rows(&self) -> usize {
        self.batch_size * self.seq_len
    }

    /// Number of labels that count towards the loss.
    pub fn label_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// The sum of token losses of a micro-batch and how many tokens it covers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossSum {
    pub nll: f64,
    pub tokens: usize,
}

impl LossSum {
    /// Mean negative log-likelihood per counted token (0 when nothing was counted).
    pub fn mean(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.nll / self.tokens as f64
        }
    }
}

/// What the layers pass along.
#[derive(Debug, Default)]
pub struct Flow<T> {
    /// Forward: the hidden states `[rows, width]`. Backward: their gradient.
    pub hidden: Vec<T>,
    /// Set by the last layer's forward.
    pub loss: Option<LossSum>,
}

/// Per-call settings a layer needs besides its parameters.
#[derive(Clone, Copy, Debug)]
pub struct Ctx<'a> {
    pub batch: &'a Batch,
    /// Training (dropout active, activations kept for backward) or evaluation.
    pub train: bool,
    /// Seed of this micro-batch's dropout masks; a layer mixes in its own index, so a
    /// recomputed forward (activation checkpointing) draws the same masks.
    pub dropout_seed: u64,
    /// The factor the loss gradient starts from (loss scale / counted tokens / GAS): read by the
    /// head's `backward`, and by its `forward_backward`, whose caller knows it before forward.
    pub grad_scale: f32,
}

impl<'a> Ctx<'a> {
    /// Evaluation of `batch`: no dropout, no activations kept, unit gradient scale.
    pub fn eval(batch: &'a Batch) -> Ctx<'a> {
        Ctx {
            batch,
            train: false,
            dropout_seed: 0,
            grad_scale: 1.0,
        }
    }
}

/// One layer of a model. `params` are views of the layer's declared parameters (own, then
/// tied) in declaration order; `grads` are the matching views of the f32 gradient buffer, into
/// which `backward` accumulates (`+=`), so gradient accumulation across micro-batches is free.
pub trait Layer<T: Float>: Send {
    /// A short name for logs and errors, e.g. `transformer.h.3`.
    fn name(&self) -> &str;

    /// The parameters this layer owns, in the order `params` gives them to forward/backward.
    fn own_params(&self) -> Vec<ParamSpec>;

    /// Names of parameters owned by earlier layers that this layer also uses (tied weights),
    /// appended after the own parameters in `params`/`grads`.
    fn tied_params(&self) -> Vec<String> {
        Vec::new()
    }

    /// Replaces `flow.hidden` by this layer's output (or sets `flow.loss`, for the head).
    fn forward(&mut self, params: &[&[T]], flow: &mut Flow<T>, ctx: &Ctx);

    /// The last layer's training forward fused with the first half of its backward, for callers
    /// that know `ctx.grad_scale` and can hand over the gradient views before forward. Sets
    /// `flow.loss` like `forward`, accumulates every parameter gradient into `grads` at once and
    /// keeps only the input gradient, which the following `backward` hands back in `flow.hidden`
    /// without touching `grads` again. The LM head needs this to compute its logits once per step:
    /// a loss-only forward would have to recompute them in backward. Returns false (having done
    /// nothing) when the layer has no fused path; the caller then runs `forward`.
    fn forward_backward(
        &mut self,
        _params: &[&[T]],
        _grads: &mut [&mut [f32]],
        _flow: &mut Flow<T>,
        _ctx: &Ctx,
    ) -> bool {
        false
    }

    /// Given the gradient of this layer's output in `flow.hidden` (ignored by the head, which
    /// starts from `ctx.grad_scale`), accumulates parameter gradients into `grads` and replaces
    /// `flow.hidden` by the gradient of this layer's input.
    fn backward(
        &mut self,
        params: &[&[T]],
        grads: &mut [&mut [f32]],
        flow: &mut Flow<T>,
        ctx: &Ctx,
    );

    /// Drops what forward saved for backward (after backward, or to recompute later).
    fn clear(&mut self);

    /// Frozen weights this layer holds quantized outside the parameter buffer (QLoRA), which
    /// loading fills.
    fn quantized(&self) -> Vec<QuantTarget> {
        Vec::new()
    }
}
