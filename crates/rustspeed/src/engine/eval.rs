//! Evaluation through the engine: the model's loss without dropout, gradients or state change.

use rustspeed_kernels::Float;
use rustspeed_models::{Batch, LossSum};

use super::{Engine, EngineError};

impl<T: Float> Engine<T> {
    /// Summed token NLL of `batch` in evaluation mode (no dropout, nothing kept for backward).
    /// Gradients, counters and the optimizer are untouched. Not allowed between a training
    /// `forward` and its `backward`, whose saved activations it would overwrite.
    ///
    /// At ZeRO stage 3 over several ranks this gathers each layer: every rank must call it,
    /// with batches of the same shapes (the same batches, typically).
    pub fn eval_loss(&mut self, batch: &Batch) -> Result<LossSum, EngineError> {
        if self.pending.is_some() {
            return Err(EngineError::EvalDuringStep);
        }
        if let Some(z3) = &self.z3 {
            return Ok(super::zero3::eval_forward(&mut self.model, z3, batch)?);
        }
        let loss = self.model.forward(batch, false, 0);
        for layer in &mut self.model.layers {
            layer.clear();
        }
        Ok(loss)
    }
}
