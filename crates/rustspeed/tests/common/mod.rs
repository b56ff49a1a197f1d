//! A tiny language model built from the layer protocol with the kernels, for engine tests:
//! token embedding -> linear + GELU -> elementwise scale ("ln_f") -> LM head + cross-entropy.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustspeed_config::{parse, resolve, DsConfig, ResolveOptions};
use rustspeed_kernels::activation::{gelu_tanh_backward, gelu_tanh_forward};
use rustspeed_kernels::cross_entropy::{lm_head_cross_entropy, lm_head_cross_entropy_loss};
use rustspeed_kernels::embedding::{embedding_backward, embedding_forward};
use rustspeed_kernels::matmul::{linear_backward, linear_forward, LinearShape, WeightLayout};
use rustspeed_kernels::Float;
use rustspeed_models::{Batch, Ctx, Flow, Layer, LossSum, Model, ParamSpec};

pub const VOCAB: usize = 32;
pub const WIDTH: usize = 16;
pub const SEQ: usize = 8;

pub struct Embed {
    ids: Vec<u32>,
}

impl<T: Float> Layer<T> for Embed {
    fn name(&self) -> &str {
        "wte"
    }
    fn own_params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::new("wte.weight", &[VOCAB, WIDTH])]
    }
    fn forward(&mut self, params: &[&[T]], flow: &mut Flow<T>, ctx: &Ctx) {
        let ids = &ctx.batch.input_ids;
        flow.hidden = vec![T::default(); ids.len() * WIDTH];
        embedding_forward(&mut flow.hidden, ids, params[0], None, WIDTH).unwrap();
        self.ids = ids.clone();
    }
    fn backward(&mut self, _: &[&[T]], grads: &mut [&mut [f32]], flow: &mut Flow<T>, _: &Ctx) {
        embedding_backward(grads[0], &self.ids, &flow.hidden, WIDTH).unwrap();
        flow.hidden.clear();
    }
    fn clear(&mut self) {
        self.ids.clear();
    }
}

/// `gelu(x W^T + b)`. `poison`, when set, adds +inf to the bias gradient once (an fp16
/// overflow on demand).
pub struct Mlp {
    x: Vec<f32>,
    pre: Vec<f32>,
    pub poison: Arc<AtomicBool>,
}

fn shape(rows: usize) -> LinearShape {
    LinearShape {
        rows,
        in_features: WIDTH,
        out_features: WIDTH,
        layout: WeightLayout::OutIn,
    }
}

impl<T: Float> Layer<T> for Mlp {
    fn name(&self) -> &str {
        "fc"
    }
    fn own_params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::new("fc.weight", &[WIDTH, WIDTH]),
            ParamSpec::new("fc.bias", &[WIDTH]),
        ]
    }
    fn forward(&mut self, params: &[&[T]], flow: &mut Flow<T>, _: &Ctx) {
        let rows = flow.hidden.len() / WIDTH;
        let mut pre = vec![T::default(); rows * WIDTH];
        linear_forward(
            &mut pre,
            &flow.hidden,
            params[0],
            Some(params[1]),
            shape(rows),
        );
        let mut out = vec![T::default(); rows * WIDTH];
        gelu_tanh_forward(&mut out, &pre);
        self.x = flow.hidden.iter().map(|v| v.to_f32()).collect();
        self.pre = pre.iter().map(|v| v.to_f32()).collect();
        flow.hidden = out;
    }
    fn backward(&mut self, params: &[&[T]], grads: &mut [&mut [f32]], flow: &mut Flow<T>, _: &Ctx) {
        let rows = self.x.len() / WIDTH;
        let x: Vec<T> = self.x.iter().map(|v| T::from_f32(*v)).collect();
        let pre: Vec<T> = self.pre.iter().map(|v| T::from_f32(*v)).collect();
        let mut dpre = vec![T::default(); rows * WIDTH];
        gelu_tanh_backward(&mut dpre, &pre, &flow.hidden);
        let mut dx = vec![T::default(); rows * WIDTH];
        let (dw, db) = grads.split_at_mut(1);
        linear_backward(
            Some(&mut dx),
            false,
            Some(&mut *dw[0]),
            Some(&mut *db[0]),
            &dpre,
            &x,
            params[0],
            shape(rows),
        );
        if self.poison.swap(false, Ordering::SeqCst) {
            db[0][0] += f32::INFINITY;
        }
        flow.hidden = dx;
    }
    fn clear(&mut self) {
        self.x.clear();
        self.pre.clear();
    }
}

/// `y = x * g` per channel: a norm-like weight (no weight decay under HF's rule).
pub struct Scale {
    x: Vec<f32>,
    pub trainable: bool,
}

impl<T: Float> Layer<T> for Scale {
    fn name(&self) -> &str {
        "ln_f"
    }
    fn own_params(&self) -> Vec<ParamSpec> {
        let mut p = ParamSpec::new("ln_f.weight", &[WIDTH]);
        p.trainable = self.trainable;
        vec![p]
    }
    fn forward(&mut self, params: &[&[T]], flow: &mut Flow<T>, _: &Ctx) {
        self.x = flow.hidden.iter().map(|v| v.to_f32()).collect();
        for (i, h) in flow.hidden.iter_mut().enumerate() {
            *h = T::from_f32(h.to_f32() * params[0][i % WIDTH].to_f32());
        }
    }
    fn backward(&mut self, params: &[&[T]], grads: &mut [&mut [f32]], flow: &mut Flow<T>, _: &Ctx) {
        for (i, d) in flow.hidden.iter_mut().enumerate() {
            let c = i % WIDTH;
            grads[0][c] += d.to_f32() * self.x[i];
            *d = T::from_f32(d.to_f32() * params[0][c].to_f32());
        }
    }
    fn clear(&mut self) {
        self.x.clear();
    }
}

pub struct Head {
    h: Vec<f32>,
    scratch: Vec<f32>,
}

impl<T: Float> Layer<T> for Head {
    fn name(&self) -> &str {
        "lm_head"
    }
    fn own_params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::new("lm_head.weight", &[VOCAB, WIDTH])]
    }
    fn forward(&mut self, params: &[&[T]], flow: &mut Flow<T>, ctx: &Ctx) {
        let n = flow.hidden.len() / WIDTH;
        let stats = lm_head_cross_entropy_loss(
            &flow.hidden,
            params[0],
            &ctx.batch.labels,
            n,
            WIDTH,
            VOCAB,
            &mut self.scratch,
        )
        .unwrap();
        self.h = flow.hidden.iter().map(|v| v.to_f32()).collect();
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
        let n = self.h.len() / WIDTH;
        let h: Vec<T> = self.h.iter().map(|v| T::from_f32(*v)).collect();
        let mut dh = vec![T::default(); n * WIDTH];
        lm_head_cross_entropy(
            &mut dh,
            Some(&mut *grads[0]),
            &h,
            params[0],
            &ctx.batch.labels,
            n,
            WIDTH,
            VOCAB,
            ctx.grad_scale,
            &mut self.scratch,
        )
        .unwrap();
        flow.hidden = dh;
    }
    fn clear(&mut self) {
        self.h.clear();
    }
}

/// A small deterministic generator (splitmix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-scale, scale), rounded to bf16 so every dtype starts from equal weights.
    pub fn weight(&mut self, scale: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        half::bf16::from_f32((2.0 * u - 1.0) * scale).to_f32()
    }
}

pub struct Built<T: Float> {
    pub model: Model<T>,
    pub poison: Arc<AtomicBool>,
}

/// The tiny model with seeded weights (identical values for every dtype).
pub fn tiny_model<T: Float>(seed: u64, ln_trainable: bool) -> Built<T> {
    let poison = Arc::new(AtomicBool::new(false));
    let layers: Vec<Box<dyn Layer<T>>> = vec![
        Box::new(Embed { ids: Vec::new() }),
        Box::new(Mlp {
            x: Vec::new(),
            pre: Vec::new(),
            poison: poison.clone(),
        }),
        Box::new(Scale {
            x: Vec::new(),
            trainable: ln_trainable,
        }),
        Box::new(Head {
            h: Vec::new(),
            scratch: Vec::new(),
        }),
    ];
    let mut model = Model::new(layers).unwrap();
    let mut rng = Rng::new(seed);
    let names: Vec<String> = model
        .layout
        .slots()
        .iter()
        .map(|s| s.spec.name.clone())
        .collect();
    for name in names {
        let p = model.param_mut(&name).unwrap();
        for v in p.iter_mut() {
            let x = if name == "ln_f.weight" {
                1.0 + rng.weight(0.1)
            } else {
                rng.weight(0.5)
            };
            *v = T::from_f32(half::bf16::from_f32(x).to_f32());
        }
    }
    Built { model, poison }
}

/// A batch of `b` random sequences; every position but the last has a label, so each
/// sequence counts `SEQ - 1` tokens.
pub fn batch(rng: &mut Rng, b: usize) -> Batch {
    let ids: Vec<u32> = (0..b * SEQ)
        .map(|_| (rng.next_u64() % VOCAB as u64) as u32)
        .collect();
    let hf: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    Batch::from_hf_labels(b, SEQ, ids, &hf)
}

/// Concatenates batches of equal sequence length into one.
pub fn concat(parts: &[Batch]) -> Batch {
    Batch {
        batch_size: parts.iter().map(|b| b.batch_size).sum(),
        seq_len: parts[0].seq_len,
        input_ids: parts.iter().flat_map(|b| b.input_ids.clone()).collect(),
        labels: parts.iter().flat_map(|b| b.labels.clone()).collect(),
    }
}

pub fn config(json: &str) -> DsConfig {
    resolve(
        &parse(json, "test config").unwrap(),
        &ResolveOptions::default(),
    )
    .unwrap()
}

/// The config resolved for `world` data-parallel ranks.
#[allow(dead_code)]
pub fn config_for_world(json: &str, world: u64) -> DsConfig {
    resolve(
        &parse(json, "test config").unwrap(),
        &ResolveOptions {
            world_size: rustspeed_config::WorldSize::flag(world),
            training_args: None,
        },
    )
    .unwrap()
}

pub fn f32s<T: Float>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("rustspeed-engine-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Runs `f(rank, options)` on `world` ranks: threads, each with its own shared-memory
/// communicator in `options` (world 1: none), as processes would have. Returns the results in
/// rank order.
pub fn on_ranks<R: Send>(
    world: usize,
    f: impl Fn(usize, rustspeed::engine::EngineOptions) -> R + Sync,
) -> Vec<R> {
    use rustspeed_comm::{CommConfig, Communicator};
    let comms: Vec<Option<Arc<Communicator>>> = if world == 1 {
        vec![None]
    } else {
        Communicator::local_group(world, CommConfig::default())
            .unwrap()
            .into_iter()
            .map(|c| Some(Arc::new(c)))
            .collect()
    };
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                s.spawn(move || {
                    let options = rustspeed::engine::EngineOptions {
                        comm,
                        ..Default::default()
                    };
                    f(rank, options)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
