//! ZeRO stage 3 specifics: REFERENCE §5 T7 (DeepSpeed's `TestZero3ParamPartitioningBase`: exact
//! pieces, activations and gradient partitions at world 2), and a tied-embedding GPT-2 with
//! activation checkpointing (the head's use of `wte`, recomputed layers) trained like one
//! process.

mod common;

use std::sync::Arc;

use common::{config_for_world, f32s, on_ranks};
use half::bf16;
use rustspeed::engine::Engine;
use rustspeed_kernels::Float;
use rustspeed_models::hf_config::ModelConfig;
use rustspeed_models::{gpt2, Batch, Ctx, Flow, Layer, LossSum, Model, ParamSpec};

const N: usize = 15;

/// x = ones(3, 5), whatever the batch.
struct Ones;

impl<T: Float> Layer<T> for Ones {
    fn name(&self) -> &str {
        "input"
    }
    fn own_params(&self) -> Vec<ParamSpec> {
        Vec::new()
    }
    fn forward(&mut self, _: &[&[T]], flow: &mut Flow<T>, _: &Ctx) {
        flow.hidden = vec![T::from_f32(1.0); N];
    }
    fn backward(&mut self, _: &[&[T]], _: &mut [&mut [f32]], flow: &mut Flow<T>, _: &Ctx) {
        flow.hidden.clear();
    }
    fn clear(&mut self) {}
}

/// `y = x * w` element-wise, w of shape (3, 5) (T7's `EltwiseMultiplicationModule`).
struct Eltwise {
    name: String,
    x: Vec<f32>,
    /// What forward computed, kept for the test to compare with T7's activations.
    out: std::sync::Arc<std::sync::Mutex<Vec<f32>>>,
}

impl<T: Float> Layer<T> for Eltwise {
    fn name(&self) -> &str {
        &self.name
    }
    fn own_params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::new(format!("{}.weight", self.name), &[3, 5])]
    }
    fn forward(&mut self, p: &[&[T]], flow: &mut Flow<T>, _: &Ctx) {
        self.x = f32s(&flow.hidden);
        for (h, w) in flow.hidden.iter_mut().zip(p[0]) {
            *h = T::from_f32(h.to_f32() * w.to_f32());
        }
        *self.out.lock().unwrap() = f32s(&flow.hidden);
    }
    fn backward(&mut self, p: &[&[T]], g: &mut [&mut [f32]], flow: &mut Flow<T>, _: &Ctx) {
        for (k, d) in flow.hidden.iter_mut().enumerate() {
            g[0][k] += d.to_f32() * self.x[k];
            *d = T::from_f32(d.to_f32() * p[0][k].to_f32());
        }
    }
    fn clear(&mut self) {
        self.x.clear();
    }
}

/// Summed L1 loss against y = ones (one "token", so the engine's gradient scale is 1).
struct L1 {
    y_hat: Vec<f32>,
}

impl<T: Float> Layer<T> for L1 {
    fn name(&self) -> &str {
        "loss"
    }
    fn own_params(&self) -> Vec<ParamSpec> {
        Vec::new()
    }
    fn forward(&mut self, _: &[&[T]], flow: &mut Flow<T>, _: &Ctx) {
        self.y_hat = f32s(&flow.hidden);
        let nll = self.y_hat.iter().map(|v| (v - 1.0).abs() as f64).sum();
        flow.loss = Some(LossSum { nll, tokens: 1 });
    }
    fn backward(&mut self, _: &[&[T]], _: &mut [&mut [f32]], flow: &mut Flow<T>, ctx: &Ctx) {
        flow.hidden = self
            .y_hat
            .iter()
            .map(|v| T::from_f32((v - 1.0).signum() * ctx.grad_scale))
            .collect();
    }
    fn clear(&mut self) {
        self.y_hat.clear();
    }
}

type Outs = Vec<Arc<std::sync::Mutex<Vec<f32>>>>;

/// T7's model with each weight's partitions filled with `(i + 1) * (1 + rank)`: whole, weight i
/// is `(i + 1)` on its first 8 elements and `2 (i + 1)` on the last 7.
fn t7_model<T: Float>() -> (Model<T>, Outs) {
    let outs: Outs = (0..3).map(|_| Default::default()).collect();
    let mut layers: Vec<Box<dyn Layer<T>>> = vec![Box::new(Ones)];
    for (i, out) in outs.iter().enumerate() {
        layers.push(Box::new(Eltwise {
            name: format!("w{}", i + 1),
            x: Vec::new(),
            out: out.clone(),
        }));
    }
    layers.push(Box::new(L1 { y_hat: Vec::new() }));
    let mut m = Model::new(layers).unwrap();
    for i in 0..3 {
        let w = m.param_mut(&format!("w{}.weight", i + 1)).unwrap();
        for (k, v) in w.iter_mut().enumerate() {
            let rank = if k < 8 { 1.0 } else { 2.0 };
            *v = T::from_f32((i + 1) as f32 * rank);
        }
    }
    (m, outs)
}

fn t7<T: Float>(zero: &str, extra: &str) {
    let json = format!(
        r#"{{"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
            "optimizer": {{"type": "SGD", "params": {{"lr": 0.01}}}}, "zero_allow_untested_optimizer": true,
            "zero_optimization": {{"stage": 3 {zero}}} {extra}}}"#
    );
    let cfg = config_for_world(&json, 2);
    // One labelled position: the loss's gradient scale is 1.
    let batch = Batch::from_hf_labels(1, 2, vec![1, 1], &[1, 1]);
    on_ranks(2, |rank, options| {
        let (model, outs) = t7_model::<T>();
        let mut e = Engine::initialize(model, &cfg, options).unwrap();
        let z = e.zero3_layout().unwrap();
        // ceil(15 / 2) = 8 per rank; rank 1 holds 7 and one zero pad.
        assert!(z.slots.iter().all(|p| p.len == 8 && p.numel == 15));
        assert_eq!(z.train_numel, 24);
        for iter in 0..2u32 {
            let loss = e.forward(&batch).unwrap();
            let row = |a: f32, b: f32| {
                let mut v = vec![a; 8];
                v.extend([b; 7]);
                v
            };
            assert_eq!(*outs[0].lock().unwrap(), row(1.0, 2.0), "hidden1");
            assert_eq!(*outs[1].lock().unwrap(), row(2.0, 8.0), "hidden2");
            assert_eq!(*outs[2].lock().unwrap(), row(6.0, 48.0), "y_hat");
            assert_eq!(loss, 5.0 * 8.0 + 47.0 * 7.0, "summed L1 loss");
            e.backward().unwrap();
            // Gradient partitions in model order (w1, w2, w3), accumulating over
            // iterations without a step (T7's x (iter + 1)).
            let k = (iter + 1) as f32;
            let piece = |v: f32| -> Vec<f32> {
                if rank == 0 {
                    vec![v * k; 8]
                } else {
                    let mut p = vec![v * k; 7];
                    p.push(0.0);
                    p
                }
            };
            let want: Vec<f32> = if rank == 0 {
                [piece(6.0), piece(3.0), piece(2.0)].concat()
            } else {
                [piece(24.0), piece(12.0), piece(8.0)].concat()
            };
            assert_eq!(e.grads(), &want[..], "rank {rank} iteration {iter}");
        }
        let out = e.step().unwrap().expect("gas 1: a boundary");
        assert!(out.grad_norm > 0.0);
        // After the step no rank holds a whole parameter.
        assert!(e.model().params.is_empty());
        assert!(e.grads().iter().all(|&g| g == 0.0));
    });
}

#[test]
fn t7_partitions_activations_and_gradients_f32() {
    t7::<f32>(r#", "stage3_param_persistence_threshold": 0"#, "");
}

#[test]
fn t7_without_prefetch_or_overlap_and_with_persistence() {
    t7::<f32>(
        r#", "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0, "overlap_comm": false"#,
        "",
    );
    // Every weight (15 elements) persistent: never gathered, gradients still partitioned.
    t7::<f32>(r#", "stage3_param_persistence_threshold": 15"#, "");
}

#[test]
fn t7_bf16() {
    t7::<bf16>(
        r#", "stage3_param_persistence_threshold": 0"#,
        r#", "bf16": {"enabled": true}"#,
    );
}

/// No dropout: its masks follow the micro-step, which differs between world sizes.
fn tiny_gpt2<T: Float>(checkpointing: bool) -> Model<T> {
    let json = r#"{"model_type": "gpt2", "vocab_size": 13, "n_embd": 8, "n_head": 2, "n_layer": 2,
        "n_positions": 8, "n_inner": 16, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
        "attn_pdrop": 0.0, "tie_word_embeddings": true}"#;
    let cfg = ModelConfig::from_json_str("tiny gpt2", json).unwrap();
    let mut model = gpt2::build::<T>(&cfg).unwrap();
    gpt2::init_weights(&mut model, &cfg, 3);
    for v in &mut model.params {
        *v = T::from_f32(v.to_f32() * 4.0);
    }
    if checkpointing {
        model.enable_gradient_checkpointing();
    }
    model
}

fn gpt2_batch(k: u32) -> Batch {
    let ids: Vec<u32> = (0..8).map(|i| (i * 5 + 2 + k * 3) % 13).collect();
    let labels: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    Batch::from_hf_labels(1, 8, ids, &labels)
}

/// (losses, grad norms, final weights) of 3 steps of 4 sequences on `world` ranks.
fn gpt2_run(world: usize, json: &str, checkpointing: bool) -> (Vec<f32>, Vec<f64>, Vec<f32>) {
    let cfg = config_for_world(json, world as u64);
    let results = on_ranks(world, |rank, options| {
        let mut e = Engine::initialize(tiny_gpt2::<f32>(checkpointing), &cfg, options).unwrap();
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        let per = 4 / world;
        for step in 0..3u32 {
            let mine: Vec<Batch> = (0..per)
                .map(|i| gpt2_batch(step * 4 + (rank * per + i) as u32))
                .collect();
            let r = e.train_partial_batch(mine).unwrap();
            losses.push(r.loss);
            norms.push(r.step.grad_norm);
        }
        // Evaluation gathers the layers on every rank.
        let eval = e.eval_loss(&gpt2_batch(99)).unwrap();
        losses.push(eval.mean() as f32);
        (losses, norms, f32s(&e.full_params().unwrap()))
    });
    results.into_iter().next().unwrap()
}

/// SGD, not Adam: attention's key bias has a gradient that is zero up to rounding, which
/// Adam's normalisation would blow up to a full lr step of noise in any two runs.
#[test]
fn tied_gpt2_with_checkpointing_at_stages_2_3_trains_like_one_process() {
    let json = |stage: u8, zero: &str| {
        format!(
            r#"{{"train_batch_size": 4, "train_micro_batch_size_per_gpu": 1,
                "optimizer": {{"type": "SGD", "params": {{"lr": 0.05, "momentum": 0.9}}}},
                "zero_allow_untested_optimizer": true,
                "gradient_clipping": 1.0,
                "zero_optimization": {{"stage": {stage}, "stage3_param_persistence_threshold": 0 {zero}}}}}"#
        )
    };
    let base = gpt2_run(1, &json(0, ""), false);
    for (world, stage, zero, ckpt) in [
        (2, 3, "", true),
        (
            2,
            3,
            r#", "stage3_prefetch_bucket_size": 0, "overlap_comm": false"#,
            false,
        ),
        (4, 3, "", true),
        // Stage 2's layer-by-layer reduction carries the head's wte gradient the same way.
        (2, 2, r#", "reduce_bucket_size": 50"#, true),
    ] {
        let got = gpt2_run(world, &json(stage, zero), ckpt);
        let what = format!("world {world} stage {stage} {zero} checkpointing {ckpt}");
        for (a, b) in got.0.iter().zip(&base.0) {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "{what}: loss {a} vs {b}");
        }
        for (a, b) in got.1.iter().zip(&base.1) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{what}: grad norm {a} vs {b}"
            );
        }
        let scale = base.2.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got
            .2
            .iter()
            .zip(&base.2)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-5 * scale, "{what}: weights differ by {diff}");
    }
}

/// One step of the tiny tied GPT-2 (embedding, 2 blocks, head) on 2 ranks: rank 0's loss,
/// fetch statistics and the gathered elements of each layer.
fn gpt2_fetch(zero: &str) -> (f32, rustspeed::engine::FetchStats, Vec<u64>) {
    let json = format!(
        r#"{{"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
            "optimizer": {{"type": "SGD", "params": {{"lr": 0.05}}}},
            "zero_allow_untested_optimizer": true,
            "zero_optimization": {{"stage": 3, "stage3_param_persistence_threshold": 0 {zero}}}}}"#
    );
    let cfg = config_for_world(&json, 2);
    let mut out = on_ranks(2, |rank, options| {
        let mut e = Engine::initialize(tiny_gpt2::<f32>(false), &cfg, options).unwrap();
        let r = e
            .train_partial_batch(vec![gpt2_batch(rank as u32)])
            .unwrap();
        let z = e.zero3_layout().unwrap();
        let numel = (0..z.layer_slots.len())
            .map(|l| z.gathered_numel(l))
            .collect();
        (r.loss, e.zero3_fetch_stats().unwrap(), numel)
    });
    out.swap_remove(0)
}

/// DeepSpeed's stage-3 fetch rules, at the granularity of a layer (engine/fetch.rs): with its
/// defaults every layer gathered in forward stays until its backward (one gather per layer);
/// `stage3_max_reuse_distance` 0 re-gathers every layer below the head in backward; a distance
/// just past the head's size keeps only the last block; `stage3_max_live_parameters` caps what
/// prefetch may add. The loss never changes.
#[test]
fn stage3_fetch_follows_prefetch_live_and_reuse_rules() {
    let (loss, stats, numel) = gpt2_fetch("");
    let [emb, b0, b1, head] = numel[..] else {
        panic!("embedding, 2 blocks, head: {numel:?}")
    };
    assert_eq!(b0, b1);
    let total = emb + b0 + b1 + head;
    assert_eq!(stats.gathers, 4, "{stats:?}");
    assert_eq!(stats.peak_live, total);

    let no_prefetch = r#", "stage3_prefetch_bucket_size": 0"#;
    let (l, s, _) = gpt2_fetch(no_prefetch);
    assert_eq!((l, s.gathers, s.peak_live), (loss, 4, total));

    let (l, s, _) = gpt2_fetch(&format!(r#"{no_prefetch}, "stage3_max_reuse_distance": 0"#));
    assert_eq!((l, s.gathers), (loss, 7));
    assert_eq!(s.peak_live, emb.max(b0).max(head), "one layer at a time");

    let just_past_head = format!(
        r#"{no_prefetch}, "stage3_max_reuse_distance": {}"#,
        head + 1
    );
    let (l, s, _) = gpt2_fetch(&just_past_head);
    assert_eq!((l, s.gathers), (loss, 6), "only the last block is kept");
    assert_eq!(s.peak_live, (b1 + head).max(emb));

    let capped = format!(r#", "stage3_max_live_parameters": {b0}, "stage3_max_reuse_distance": 0"#);
    let (l, s, _) = gpt2_fetch(&capped);
    assert_eq!((l, s.gathers), (loss, 7));
    assert!(s.peak_live <= 2 * b0, "{s:?}");

    // Prefetching everything ahead keeps what it walked past, whatever the reuse distance.
    let (l, s, _) = gpt2_fetch(r#", "stage3_max_reuse_distance": 0"#);
    assert_eq!((l, s.gathers, s.peak_live), (loss, 4, total));
}
