//! Memory and speed of QLoRA (and, for comparison, LoRA over dense bases and full fine-tuning)
//! on a TinyLlama-1.1B-shaped model with random weights: 22 layers, d=2048, ffn 5632, 32 heads /
//! 4 KV heads, vocab 32000. Gradient checkpointing, micro-batch 1. Prints one JSON line with
//! peak RSS, seconds per step and the memory breakdown (docs/BENCHMARKS.md, issue 7).
//!
//!     cargo run --release -p rustspeed --example bench_qlora -- nf4 [STEPS] [SEQ]
//!
//! BASE: nf4 | fp4 | int8 (quantized frozen base, bf16 compute, LoRA r=16 on all linears),
//! bf16 | f32 (dense frozen base, LoRA), full-bf16 | full-f32 (every parameter trains).
//!
//! The quantized weights are drawn and quantized one tensor at a time, as loading a checkpoint
//! does, so no dense copy of the base ever exists.

use std::time::Instant;

use half::bf16;
use rustspeed::engine::{Engine, EngineOptions};
use rustspeed::rss::peak_rss_bytes;
use rustspeed_config::{parse, resolve, ResolveOptions, WorldSize, WorldSizeSource};
use rustspeed_kernels::quant::QuantConfig;
use rustspeed_kernels::Float;
use rustspeed_models::hf_config::ModelConfig;
use rustspeed_models::peft::adapter::init_lora;
use rustspeed_models::peft::{LoraConfig, TargetModules};
use rustspeed_models::{llama, Batch, Tuning};

const TINYLLAMA: &str = r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"],
    "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": false, "initializer_range": 0.02, "hidden_act": "silu"}"#;

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

fn current_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A splitmix64 stream of normals (Box-Muller) for the quantized weights.
struct Normals(u64);

impl Normals {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

fn run<T: Float>(base: &str, quant: Option<QuantConfig>, full: bool, steps: usize, seq: usize) {
    let t0 = Instant::now();
    let cfg = ModelConfig::from_json_str("tinyllama-shaped", TINYLLAMA).expect("config");
    let tuning = if full {
        Tuning::full()
    } else {
        let lora = LoraConfig {
            r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            target_modules: Some(TargetModules::AllLinear),
            ..LoraConfig::default()
        };
        let t = Tuning::lora(lora, &cfg).expect("LoRA plan");
        match quant {
            Some(q) => t.with_quantization(q).expect("quantization"),
            None => t,
        }
    };
    let mut model = llama::build_tuned::<T>(&cfg, &tuning).expect("model");
    llama::init_weights(&mut model, &cfg, 0);
    if let Some(q) = &quant {
        let mut rng = Normals(7);
        for target in &model.quantized {
            let w: Vec<f32> = (0..target.inp * target.out)
                .map(|_| rng.normal() * cfg.initializer_range as f32)
                .collect();
            target.fill(&w, q).expect("quantize");
        }
    }
    if !full {
        init_lora(&mut model, 0).expect("LoRA init");
    }
    model.enable_gradient_checkpointing();
    let quantized_bytes = model.quantized_bytes() as u64;
    let precision = if T::DTYPE == rustspeed_kernels::DType::BF16 {
        r#", "bf16": {"enabled": true}"#
    } else {
        ""
    };
    let ds = format!(
        r#"{{"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-4}}}},
            "gradient_clipping": 1.0{precision}}}"#
    );
    let opts = ResolveOptions {
        world_size: WorldSize {
            value: 1,
            source: WorldSizeSource::Default,
        },
        training_args: None,
    };
    let config = resolve(&parse(&ds, "bench").expect("ds"), &opts).expect("resolve");
    let mut engine = Engine::initialize(model, &config, EngineOptions::default()).expect("engine");
    let states = engine.model_state_bytes();
    let rss_ready = current_rss();
    let setup_s = t0.elapsed().as_secs_f64();

    let mut state = 42u64;
    let ids: Vec<u32> = (0..seq)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % cfg.vocab_size as u64) as u32
        })
        .collect();
    let labels: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let batch = Batch::from_hf_labels(1, seq, ids, &labels);
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for _ in 0..steps {
        let t = Instant::now();
        let mut data = std::iter::repeat_with(|| batch.clone());
        let report = engine.train_batch(&mut data).expect("step");
        times.push(t.elapsed().as_secs_f64());
        losses.push(report.loss);
        eprintln!(
            "{base}: step {} loss {:.4} {:.1}s, peak RSS so far {:.2} GiB",
            times.len(),
            report.loss,
            times.last().unwrap(),
            gib(peak_rss_bytes().unwrap_or(0))
        );
    }
    // The first step pays for first-touch page faults of the gradient and optimizer buffers.
    let steady: Vec<f64> = if times.len() > 1 {
        times[1..].to_vec()
    } else {
        times.clone()
    };
    let step_s = steady.iter().sum::<f64>() / steady.len() as f64;
    let peak = peak_rss_bytes().unwrap_or(0);
    println!(
        "{{\"base\": \"{base}\", \"compute\": \"{}\", \"tuning\": \"{}\", \"seq\": {seq}, \"steps\": {steps}, \"threads\": {}, \
\"setup_s\": {setup_s:.1}, \"step_s\": {step_s:.2}, \"step_times\": {times:?}, \"losses\": {losses:?}, \
\"peak_rss_gib\": {:.3}, \"rss_before_training_gib\": {:.3}, \"quantized_weights_gib\": {:.3}, \
\"dense_weights_gib\": {:.3}, \"grads_gib\": {:.3}, \"master_gib\": {:.3}, \"optimizer_gib\": {:.3}, \
\"peak_minus_ready_gib\": {:.3}}}",
        T::DTYPE,
        if full { "full" } else { "lora-r16-all-linear" },
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        gib(peak),
        gib(rss_ready),
        gib(quantized_bytes),
        gib(states.weights),
        gib(states.grads),
        gib(states.master),
        gib(states.optimizer),
        gib(peak.saturating_sub(rss_ready)),
    );
}

fn main() {
    // As the `rustspeed` binary does: step buffers are reused, not faulted in again every step.
    rustspeed_kernels::alloc::retain_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let base = args.first().map_or("nf4", String::as_str);
    let steps: usize = args.get(1).map_or(3, |s| s.parse().expect("STEPS"));
    let seq: usize = args.get(2).map_or(512, |s| s.parse().expect("SEQ"));
    match base {
        "nf4" => run::<bf16>(base, Some(QuantConfig::nf4(true)), false, steps, seq),
        "fp4" => run::<bf16>(base, Some(QuantConfig::fp4(true)), false, steps, seq),
        "int8" => run::<bf16>(base, Some(QuantConfig::int8()), false, steps, seq),
        "bf16" => run::<bf16>(base, None, false, steps, seq),
        "f32" => run::<f32>(base, None, false, steps, seq),
        "full-bf16" => run::<bf16>(base, None, true, steps, seq),
        "full-f32" => run::<f32>(base, None, true, steps, seq),
        other => {
            eprintln!("unknown BASE {other}: nf4, fp4, int8, bf16, f32, full-bf16 or full-f32");
            std::process::exit(2);
        }
    }
}
