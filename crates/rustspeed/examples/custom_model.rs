//! A user-defined model trained by the engine: two layers written here with the layer
//! protocol (an embedding and a tied LM head over a learned per-channel gain), a DeepSpeed
//! config written inline, and a loop that prints the loss falling.
//!
//! cargo run -p rustspeed --example custom_model --release

use rustspeed::engine::{Engine, EngineOptions};
use rustspeed_config::{parse, resolve, ResolveOptions};
use rustspeed_kernels::cross_entropy::{lm_head_cross_entropy, lm_head_cross_entropy_loss};
use rustspeed_kernels::embedding::{embedding_backward, embedding_forward};
use rustspeed_kernels::Float;
use rustspeed_models::{Batch, Ctx, Flow, Layer, LossSum, Model, ParamSpec};

const VOCAB: usize = 64;
const WIDTH: usize = 32;
const SEQ: usize = 16;

/// Token embedding; its table is reused by the head (tied weights).
struct Embedding {
    ids: Vec<u32>,
}

impl<T: Float> Layer<T> for Embedding {
    fn name(&self) -> &str {
        "embed"
    }
    fn own_params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::new("embed.weight", &[VOCAB, WIDTH])]
    }
    fn forward(&mut self, params: &[&[T]], flow: &mut Flow<T>, ctx: &Ctx) {
        self.ids = ctx.batch.input_ids.clone();
        flow.hidden = vec![T::default(); self.ids.len() * WIDTH];
        embedding_forward(&mut flow.hidden, &self.ids, params[0], None, WIDTH).unwrap();
    }
    fn backward(&mut self, _: &[&[T]], grads: &mut [&mut [f32]], flow: &mut Flow<T>, _: &Ctx) {
        embedding_backward(grads[0], &self.ids, &flow.hidden, WIDTH).unwrap();
    }
    fn clear(&mut self) {
        self.ids.clear();
    }
}

/// `logits = (h * gain) · E^T`, then cross-entropy against the labels.
struct GainHead {
    h: Vec<f32>,
    scratch: Vec<f32>,
}

impl<T: Float> Layer<T> for GainHead {
    fn name(&self) -> &str {
        "head"
    }
    fn own_params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::new("head.gain", &[WIDTH])]
    }
    fn tied_params(&self) -> Vec<String> {
        vec!["embed.weight".into()]
    }
    fn forward(&mut self, params: &[&[T]], flow: &mut Flow<T>, ctx: &Ctx) {
        self.h = flow.hidden.iter().map(|v| v.to_f32()).collect();
        let scaled = self.scaled(params[0]);
        let n = scaled.len() / WIDTH;
        let stats = lm_head_cross_entropy_loss(
            &scaled,
            params[1],
            &ctx.batch.labels,
            n,
            WIDTH,
            VOCAB,
            &mut self.scratch,
        )
        .unwrap();
        flow.loss = Some(LossSum {
            nll: stats.nll_sum,
            tokens: stats.count,
        });
    }
    fn backward(
        &mut self,
        params: &[&[T]],
        grads: &mut [&mut [f32]],
        flow: &mut Flow<T>,
        ctx: &Ctx,
    ) {
        let scaled = self.scaled(params[0]);
        let n = scaled.len() / WIDTH;
        let mut dscaled = vec![T::default(); n * WIDTH];
        let (dgain, dembed) = grads.split_at_mut(1);
        lm_head_cross_entropy(
            &mut dscaled,
            Some(&mut *dembed[0]),
            &scaled,
            params[1],
            &ctx.batch.labels,
            n,
            WIDTH,
            VOCAB,
            ctx.grad_scale,
            &mut self.scratch,
        )
        .unwrap();
        flow.hidden = dscaled
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let c = i % WIDTH;
                dgain[0][c] += d.to_f32() * self.h[i];
                T::from_f32(d.to_f32() * params[0][c].to_f32())
            })
            .collect();
    }
    fn clear(&mut self) {
        self.h.clear();
    }
}

impl GainHead {
    fn scaled<T: Float>(&self, gain: &[T]) -> Vec<T> {
        self.h
            .iter()
            .enumerate()
            .map(|(i, h)| T::from_f32(h * gain[i % WIDTH].to_f32()))
            .collect()
    }
}

/// Sequences that count up modulo the vocabulary from a random start: learnable.
fn batches(seed: u64, count: usize, batch_size: usize) -> Vec<Batch> {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    (0..count)
        .map(|_| {
            let ids: Vec<u32> = (0..batch_size)
                .flat_map(|_| {
                    let start = next() % VOCAB as u32;
                    (0..SEQ as u32).map(move |t| (start + t) % VOCAB as u32)
                })
                .collect();
            let labels: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
            Batch::from_hf_labels(batch_size, SEQ, ids, &labels)
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ds_config = r#"{
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": true},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.05, "warmup_num_steps": 10, "warmup_type": "linear"}}
    }"#;
    let config = resolve(
        &parse(ds_config, "inline ds_config")?,
        &ResolveOptions::default(),
    )?;

    let layers: Vec<Box<dyn Layer<half::bf16>>> = vec![
        Box::new(Embedding { ids: Vec::new() }),
        Box::new(GainHead {
            h: Vec::new(),
            scratch: Vec::new(),
        }),
    ];
    let mut model = Model::new(layers)?;
    let mut state = 7u64;
    for (i, p) in model.params.iter_mut().enumerate() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
        let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        // The gain starts at 1, the embedding small and random.
        let gain = i >= VOCAB * WIDTH;
        *p = half::bf16::from_f32(if gain { 1.0 } else { 0.2 * u });
    }

    let mut engine = Engine::initialize(model, &config, EngineOptions::default())?;
    let bytes = engine.model_state_bytes();
    println!(
        "model states: {} bytes (weights {}, fp32 grads {}, fp32 master {}, optimizer {})",
        bytes.total, bytes.weights, bytes.grads, bytes.master, bytes.optimizer
    );
    let data = batches(1, 60 * 2, 4);
    let mut it = data.into_iter();
    for _ in 0..60 {
        let r = engine.train_batch(&mut it)?;
        if r.step.global_step % 5 == 0 || r.step.global_step == 1 {
            println!(
                "step {:>3}  loss {:.4}  grad_norm {:.4}  lr {:.4}",
                r.step.global_step, r.loss, r.step.grad_norm, r.step.lr
            );
        }
    }
    Ok(())
}
