//! rustspeed side of the GPT-2 forward+backward benchmark (tools/bench/gpt2_step.sh runs it next
//! to tools/bench/gpt2_step_torch.py). Prints one JSON line like the PyTorch script.
//!
//!     cargo run --release -p rustspeed-models --example bench_gpt2_step -- 124m f32 4 128 5

use std::time::Instant;

use half::bf16;
use rustspeed_kernels::Float;
use rustspeed_models::hf_config::ModelConfig;
use rustspeed_models::{gpt2, Batch, Model};

fn config(shape: &str) -> ModelConfig {
    let (d, layers, heads) = match shape {
        "124m" => (768, 12, 12),
        "23m" => (384, 4, 6),
        other => panic!("unknown shape {other}: use 124m or 23m"),
    };
    let json = format!(
        r#"{{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257,
            "n_positions": 1024, "n_embd": {d}, "n_layer": {layers}, "n_head": {heads},
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}}"#
    );
    ModelConfig::from_json_str("bench", &json).expect("valid GPT-2 config")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn run<T: Float>(shape: &str, dtype: &str, b: usize, t: usize, steps: usize) {
    let cfg = config(shape);
    let mut model: Model<T> = gpt2::build(&cfg).expect("model");
    gpt2::init_weights(&mut model, &cfg, 0);
    let mut grads = vec![0f32; model.params.len()];
    let mut state = 42u64;
    let ids: Vec<u32> = (0..b * t)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % cfg.vocab_size as u64) as u32
        })
        .collect();
    let labels: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let batch = Batch::from_hf_labels(b, t, ids, &labels);
    let scale = 1.0 / batch.label_tokens() as f32;
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for i in 0..=steps {
        let t0 = Instant::now();
        // The training driver: the LM head's loss and gradients come from one pass in forward.
        let loss = model.train_forward(&mut grads, &batch, scale, 0);
        let t1 = Instant::now();
        model.backward(&mut grads, &batch, scale, 0);
        let t2 = Instant::now();
        assert!(loss.mean().is_finite());
        if i > 0 {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
        }
    }
    let (f, bw) = (median(fwd), median(bwd));
    println!(
        "{{\"impl\": \"rustspeed\", \"model\": \"{shape}\", \"dtype\": \"{dtype}\", \"B\": {b}, \"T\": {t}, \"threads\": {}, \"forward_s\": {:.4}, \"backward_s\": {:.4}, \"step_s\": {:.4}, \"tokens_per_s\": {:.1}}}",
        rayon::current_num_threads(),
        f,
        bw,
        f + bw,
        (b * t) as f64 / (f + bw)
    );
}

fn main() {
    // As the `rustspeed` binary does: step buffers are reused, not faulted in again every step.
    rustspeed_kernels::alloc::retain_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let shape = arg(0, "124m");
    let dtype = arg(1, "f32");
    let b: usize = arg(2, "4").parse().expect("batch size");
    let t: usize = arg(3, "128").parse().expect("sequence length");
    let steps: usize = arg(4, "5").parse().expect("steps");
    match dtype.as_str() {
        "f32" => run::<f32>(&shape, &dtype, b, t, steps),
        "bf16" => run::<bf16>(&shape, &dtype, b, t, steps),
        other => panic!("unknown dtype {other}: use f32 or bf16"),
    }
}
