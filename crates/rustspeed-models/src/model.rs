//! A model: its layers, the layout of their parameters, and the flat parameter buffer.
//! `forward`/`backward` run the layers in order for the simple single-process case; the engine
//! drives the layers itself when it partitions or recomputes them.

use rustspeed_kernels::Float;

use crate::layer::{Batch, Ctx, Flow, Layer, LossSum};
use crate::linear::QuantTarget;
use crate::params::{LayoutError, ParamLayout};
use crate::recompute::Recomputed;
use crate::tuning::Tuning;

pub struct Model<T: Float> {
    pub layers: Vec<Box<dyn Layer<T>>>,
    pub layout: ParamLayout,
    /// Every parameter, layer after layer (see [`ParamLayout`]).
    pub params: Vec<T>,
    /// What trains (set by the builders): full fine-tuning or the LoRA plan.
    pub tuning: Tuning,
    /// Whether the blocks recompute their activations in backward.
    checkpointing: bool,
    /// Frozen weights the layers hold quantized (QLoRA), outside `params`.
    pub quantized: Vec<QuantTarget>,
}

impl<T: Float> Model<T> {
    /// Runs every layer but the head in evaluation mode (no dropout) and returns the flow the
    /// head would read: its final hidden states. For logits (parity tests, generation).
    pub fn forward_to_head(&mut self, batch: &Batch) -> Flow<T> {
        let ctx = Ctx::eval(batch);
        let mut flow = Flow::default();
        for i in 0..self.layers.len() - 1 {
            let views = self.layout.layer_views(i, &self.params);
            self.layers[i].forward(&views, &mut flow, &ctx);
        }
        flow
    }

    /// Lays out the layers' parameters in one zeroed buffer.
    pub fn new(layers: Vec<Box<dyn Layer<T>>>) -> Result<Self, LayoutError> {
        let own: Vec<_> = layers.iter().map(|l| l.own_params()).collect();
        let tied: Vec<_> = layers.iter().map(|l| l.tied_params()).collect();
        let layout = ParamLayout::new(&own, &tied)?;
        let params = vec![T::default(); layout.numel()];
        let quantized = layers.iter().flat_map(|l| l.quantized()).collect();
        Ok(Model {
            layers,
            layout,
            params,
            tuning: Tuning::full(),
            checkpointing: false,
            quantized,
        })
    }

    /// Activation checkpointing of every layer between the embedding (first) and the head
    /// (last): each keeps only its input in a training forward and recomputes its activations
    /// in backward (see [`Recomputed`]). Same gradients, bit for bit; far less activation memory.
    pub fn enable_gradient_checkpointing(&mut self) {
        if self.checkpointing || self.layers.len() < 3 {
            self.checkpointing = true;
            return;
        }
        let last = self.layers.len() - 1;
        let layers = std::mem::take(&mut self.layers);
        self.layers = layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                if i == 0 || i == last {
                    l
                } else {
                    Box::new(Recomputed::new(l)) as Box<dyn Layer<T>>
                }
            })
            .collect();
        self.checkpointing = true;
    }

    /// Elements of the weights held quantized (not in `params`).
    pub fn quantized_numel(&self) -> usize {
        self.quantized.iter().map(|q| q.inp * q.out).sum()
    }

    /// Bytes of the weights held quantized (those loaded so far).
    pub fn quantized_bytes(&self) -> usize {
        self.quantized
            .iter()
            .filter_map(|q| q.slot.get())
            .map(|m| m.bytes())
            .sum()
    }

    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// The named parameter's values.
    pub fn param(&self, name: &str) -> Option<&[T]> {
        self.layout.get(name).map(|s| &self.params[s.range()])
    }

    pub fn param_mut(&mut self, name: &str) -> Option<&mut [T]> {
        let range = self.layout.get(name)?.range();
        Some(&mut self.params[range])
    }

    /// Runs every layer forward and returns the loss the head reports.
    pub fn forward(&mut self, batch: &Batch, train: bool, dropout_seed: u64) -> LossSum {
        let ctx = Ctx {
            batch,
            train,
            dropout_seed,
            grad_scale: 1.0,
        };
        let mut flow = Flow::default();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let views = self.layout.layer_views(i, &self.params);
            layer.forward(&views, &mut flow, &ctx);
        }
        flow.loss
            .expect("the last layer of a model must report a loss (an LM head)")
    }

    /// Training forward that also accumulates the last layer's parameter gradients into `grads`
    /// (see [`Layer::forward_backward`]): the LM head computes its logits once, for the loss and
    /// the gradients. Follow it with [`Model::backward`] with the same `grad_scale` and seed,
    /// which completes the gradients; `grad_scale` multiplies the summed token loss, so it must
    /// be known before forward (e.g. 1 / `batch.label_tokens()`). Falls back to a plain training
    /// forward when the last layer has no fused path.
    pub fn train_forward(
        &mut self,
        grads: &mut [f32],
        batch: &Batch,
        grad_scale: f32,
        dropout_seed: u64,
    ) -> LossSum {
        assert_eq!(grads.len(), self.params.len(), "gradient buffer size");
        let ctx = Ctx {
            batch,
            train: true,
            dropout_seed,
            grad_scale,
        };
        let mut flow = Flow::default();
        let last = self
            .layers
            .len()
            .checked_sub(1)
            .expect("a model has at least its LM head");
        for i in 0..last {
            let views = self.layout.layer_views(i, &self.params);
            self.layers[i].forward(&views, &mut flow, &ctx);
        }
        let views = self.layout.layer_views(last, &self.params);
        let mut gviews = self.layout.layer_views_mut(last, grads);
        let head = &mut self.layers[last];
        if !head.forward_backward(&views, &mut gviews, &mut flow, &ctx) {
            head.forward(&views, &mut flow, &ctx);
        }
        flow.loss
            .expect("the last layer of a model must report a loss (an LM head)")
    }

    /// One training micro-step: [`Model::train_forward`] then [`Model::backward`]. Returns the
    /// loss; `grads` accumulates `grad_scale` times the gradient of the summed token loss.
    pub fn forward_backward(
        &mut self,
        grads: &mut [f32],
        batch: &Batch,
        grad_scale: f32,
        dropout_seed: u64,
    ) -> LossSum {
        let loss = self.train_forward(grads, batch, grad_scale, dropout_seed);
        self.backward(grads, batch, grad_scale, dropout_seed);
        loss
    }

    /// Runs every layer backward after `forward(.., train = true, ..)` or `train_forward`,
    /// accumulating parameter gradients into `grads` (one f32 per parameter, same layout as
    /// `params`). The loss gradient starts from `grad_scale` per summed token loss (e.g. 1 /
    /// counted tokens).
    pub fn backward(
        &mut self,
        grads: &mut [f32],
        batch: &Batch,
        grad_scale: f32,
        dropout_seed: u64,
    ) {
        assert_eq!(grads.len(), self.params.len(), "gradient buffer size");
        let ctx = Ctx {
            batch,
            train: true,
            dropout_seed,
            grad_scale,
        };
        let mut flow = Flow::default();
        for i in (0..self.layers.len()).rev() {
            let views = self.layout.layer_views(i, &self.params);
            let mut gviews = self.layout.layer_views_mut(i, grads);
            self.layers[i].backward(&views, &mut gviews, &mut flow, &ctx);
            self.layers[i].clear();
        }
    }
}

/// Test support shared by the architectures: the fused head against the unfused path.
#[cfg(test)]
pub(crate) mod fused_check {
    use super::Model;
    use crate::layer::Batch;

    /// `train_forward` + `backward` (the fused head) against `forward` + `backward` (logits
    /// recomputed in backward): same loss, same gradients, accumulated onto `start`, which the
    /// gradient buffer holds beforehand; and `forward_backward` equals the two calls.
    pub(crate) fn assert_fused_matches_unfused(
        model: &mut Model<f32>,
        batch: &Batch,
        start: &[f32],
        scale: f32,
        seed: u64,
    ) {
        let mut want = start.to_vec();
        let plain = model.forward(batch, true, seed);
        model.backward(&mut want, batch, scale, seed);

        let mut got = start.to_vec();
        let fused = model.train_forward(&mut got, batch, scale, seed);
        // The head's gradients (the tied embedding's included), and only those, exist already.
        let head = model.layers.len() - 1;
        for slot in model.layout.slots() {
            let range = slot.range();
            let in_head = model
                .layout
                .layer_slots(head)
                .any(|s| s.spec.name == slot.spec.name);
            let moved = got[range.clone()] != start[range.clone()];
            assert_eq!(moved, in_head, "{} after train_forward", slot.spec.name);
        }
        model.backward(&mut got, batch, scale, seed);
        assert_eq!(fused.tokens, plain.tokens);
        assert!(
            (fused.nll - plain.nll).abs() <= 1e-6 * plain.nll,
            "loss {} vs {}",
            fused.nll,
            plain.nll
        );
        let max = want.iter().fold(0f32, |m, g| m.max(g.abs()));
        for slot in model.layout.slots() {
            for i in slot.range() {
                assert!(
                    (got[i] - want[i]).abs() <= 1e-5 * max,
                    "{}[{}]: fused {} vs unfused {}",
                    slot.spec.name,
                    i - slot.range().start,
                    got[i],
                    want[i]
                );
            }
        }
        let mut both = start.to_vec();
        assert_eq!(model.forward_backward(&mut both, batch, scale, seed), fused);
        assert_eq!(both, got);
    }
}
