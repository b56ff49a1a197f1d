//! Activation checkpointing (`--gradient-checkpointing`, DeepSpeed's `checkpoint_activations`,
//! HF's `gradient_checkpointing_enable`): a wrapped layer's training forward keeps only its
//! input and drops everything else it computed; its backward first runs the forward again from
//! that input, then the real backward. Dropout masks are keyed by (micro-batch seed, layer,
//! site), so the recomputed forward draws exactly the masks of the first one and the gradients
//! are bit-identical to the plain ones.
//!
//! Memory: the activations of all wrapped layers shrink to one `[rows, hidden]` input each,
//! plus one layer's full activations at a time; time: one more forward per wrapped layer.

use rustspeed_kernels::Float;

use crate::layer::{Ctx, Flow, Layer};
use crate::params::ParamSpec;

pub struct Recomputed<T> {
    inner: Box<dyn Layer<T>>,
    /// The input of the last training forward, for backward to recompute from.
    input: Option<Vec<T>>,
}

impl<T: Float> Recomputed<T> {
    pub fn new(inner: Box<dyn Layer<T>>) -> Self {
        Recomputed { inner, input: None }
    }
}

impl<T: Float> Layer<T> for Recomputed<T> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn own_params(&self) -> Vec<ParamSpec> {
        self.inner.own_params()
    }

    fn tied_params(&self) -> Vec<String> {
        self.inner.tied_params()
    }

    fn quantized(&self) -> Vec<crate::linear::QuantTarget> {
        self.inner.quantized()
    }

    fn forward(&mut self, params: &[&[T]], flow: &mut Flow<T>, ctx: &Ctx) {
        if ctx.train {
            self.input = Some(flow.hidden.clone());
            self.inner.forward(params, flow, ctx);
            self.inner.clear();
        } else {
            self.inner.forward(params, flow, ctx);
        }
    }

    fn backward(
        &mut self,
        params: &[&[T]],
        grads: &mut [&mut [f32]],
        flow: &mut Flow<T>,
        ctx: &Ctx,
    ) {
        let input = self.input.take().unwrap_or_else(|| {
            panic!(
                "{}: backward without a training forward (activation checkpointing keeps the input of the last one)",
                self.inner.name()
            )
        });
        let mut again = Flow {
            hidden: input,
            loss: None,
        };
        // The same ctx (seed, batch, training mode) as the first forward: the same masks.
        self.inner.forward(params, &mut again, ctx);
        drop(again);
        self.inner.backward(params, grads, flow, ctx);
    }

    fn clear(&mut self) {
        self.input = None;
        self.inner.clear();
    }
}

#[cfg(test)]
mod tests {
    use crate::hf_config::ModelConfig;
    use crate::layer::Batch;
    use crate::model::Model;
    use crate::peft::tests::{batch, gpt2_cfg, llama_cfg, lora, random_model};
    use crate::tuning::Tuning;

    /// Loss and every gradient (through the fused head, as the engine runs it) with and without
    /// checkpointing: identical bits.
    fn check_identical(cfg: &ModelConfig, tuning: &Tuning, seed: u64) {
        let b: Batch = batch(cfg.vocab_size, seed);
        let run = |m: &mut Model<f32>| {
            let mut g = vec![0f32; m.params.len()];
            let loss = m.forward_backward(&mut g, &b, 0.1, seed);
            // A second micro-batch accumulating onto the first, with other masks.
            let loss2 = m.forward_backward(&mut g, &b, 0.1, seed + 1);
            (loss, loss2, g)
        };
        let mut plain = random_model(cfg, tuning, seed);
        let mut ckpt = random_model(cfg, tuning, seed);
        ckpt.enable_gradient_checkpointing();
        ckpt.enable_gradient_checkpointing();
        assert!(ckpt.gradient_checkpointing());
        let want = run(&mut plain);
        let got = run(&mut ckpt);
        assert_eq!(got.0, want.0);
        assert_eq!(got.1, want.1);
        assert!(want.2.iter().any(|&g| g != 0.0));
        assert!(got.2 == want.2, "checkpointed gradients differ");
        // Evaluation is unaffected.
        assert_eq!(ckpt.forward(&b, false, 0), plain.forward(&b, false, 0));
    }

    #[test]
    fn gpt2_checkpointing_gives_identical_gradients_with_and_without_dropout() {
        let mut json: serde_json::Value = serde_json::json!({
            "model_type": "gpt2", "vocab_size": 11, "n_embd": 8, "n_head": 2, "n_layer": 3,
            "n_positions": 8, "n_inner": 16, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
            "attn_pdrop": 0.0});
        let cfg = ModelConfig::from_json_str("gpt2", &json.to_string()).unwrap();
        check_identical(&cfg, &Tuning::full(), 1);
        for k in ["embd_pdrop", "resid_pdrop", "attn_pdrop"] {
            json[k] = 0.2.into();
        }
        let cfg = ModelConfig::from_json_str("gpt2", &json.to_string()).unwrap();
        check_identical(&cfg, &Tuning::full(), 2);
        let t = lora(
            r#"{"peft_type": "LORA", "target_modules": "all-linear", "lora_dropout": 0.3, "r": 2}"#,
            &cfg,
        );
        check_identical(&cfg, &t, 3);
        check_identical(&gpt2_cfg(), &Tuning::full(), 4);
    }

    #[test]
    fn llama_checkpointing_gives_identical_gradients_with_and_without_dropout() {
        let cfg = llama_cfg();
        check_identical(&cfg, &Tuning::full(), 5);
        let t = lora(
            r#"{"peft_type": "LORA", "target_modules": ["q_proj", "down_proj"], "lora_dropout": 0.25}"#,
            &cfg,
        );
        check_identical(&cfg, &t, 6);
    }
}
