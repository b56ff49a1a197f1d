//! Full fine-tuning of a pretrained causal LM on a plain-text file with a DeepSpeed config,
//! through the engine: the job the README's setup command runs until `rustspeed train`
//! (issue 5) replaces it.
//!
//!     cargo run --release -p rustspeed --example finetune_text -- \
//!         MODEL(.gguf or HF dir) TEXT.txt ds_config.json [STEPS] [BLOCK_SIZE]
//!
//! The text is tokenized as one stream and cut into blocks (HF run_clm's `group_texts`); the
//! last 4 blocks are held out and scored before and after training.

use std::path::Path;
use std::time::Instant;

use half::bf16;
use rustspeed::engine::{Engine, EngineOptions};
use rustspeed_config::{load, resolve, Precision, ResolveOptions, WorldSize, WorldSizeSource};
use rustspeed_kernels::Float;
use rustspeed_models::loader::load_model;
use rustspeed_models::Batch;

const HELD_OUT: usize = 4;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: finetune_text MODEL TEXT ds_config.json [STEPS] [BLOCK_SIZE]");
        std::process::exit(2);
    }
    let steps: u64 = args.get(3).map_or(10, |s| s.parse().expect("STEPS"));
    let block: usize = args.get(4).map_or(128, |s| s.parse().expect("BLOCK_SIZE"));
    let raw = load(Path::new(&args[2])).unwrap_or_else(|e| fail(e));
    let opts = ResolveOptions {
        world_size: WorldSize {
            value: 1,
            source: WorldSizeSource::Default,
        },
        training_args: None,
    };
    let config = resolve(&raw, &opts).unwrap_or_else(|e| fail(e));
    match config.precision {
        Precision::Bf16 => run::<bf16>(&args, config, steps, block),
        Precision::Fp32 => run::<f32>(&args, config, steps, block),
        Precision::Fp16 => run::<half::f16>(&args, config, steps, block),
    }
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("error: {e}");
    std::process::exit(2)
}

fn run<T: Float>(args: &[String], config: rustspeed_config::DsConfig, steps: u64, block: usize) {
    let t0 = Instant::now();
    let loaded = load_model::<T>(Path::new(&args[0])).unwrap_or_else(|e| fail(e));
    let tokenizer = loaded
        .tokenizer
        .unwrap_or_else(|| fail("the model has no tokenizer"));
    let text =
        std::fs::read_to_string(&args[1]).unwrap_or_else(|e| fail(format!("{}: {e}", args[1])));
    let ids = tokenizer.encode(&text, false).unwrap_or_else(|e| fail(e));
    let blocks: Vec<Vec<u32>> = ids.chunks_exact(block).map(|c| c.to_vec()).collect();
    if blocks.len() <= HELD_OUT {
        fail(format!(
            "{}: {} tokens make only {} blocks of {block}",
            args[1],
            ids.len(),
            blocks.len()
        ));
    }
    let (train, held_out) = blocks.split_at(blocks.len() - HELD_OUT);
    let micro = config.micro_batch_size() as usize;
    eprintln!(
        "model {} ({} params, {}), {} tokens -> {} training blocks of {block}; micro batch {micro} x accumulation {}; loaded in {:.1}s",
        args[0],
        loaded.model.layout.numel(),
        T::DTYPE,
        ids.len(),
        train.len(),
        config.gradient_accumulation_steps(),
        t0.elapsed().as_secs_f64()
    );
    let to_batch = |rows: &[Vec<u32>]| {
        let flat: Vec<u32> = rows.concat();
        let labels: Vec<i32> = flat.iter().map(|&t| t as i32).collect();
        Batch::from_hf_labels(rows.len(), block, flat, &labels)
    };
    let mut engine = Engine::initialize(loaded.model, &config, EngineOptions::default())
        .unwrap_or_else(|e| fail(e));
    let held: Vec<Batch> = held_out
        .iter()
        .map(|b| to_batch(std::slice::from_ref(b)))
        .collect();
    let eval = |engine: &mut Engine<T>| {
        let (mut nll, mut n) = (0.0, 0);
        for b in &held {
            let l = engine.eval_loss(b).unwrap_or_else(|e| fail(e));
            nll += l.nll;
            n += l.tokens;
        }
        nll / n as f64
    };
    let before = eval(&mut engine);
    println!("held-out loss before: {before:.4}");
    let mut data = train.chunks(micro).cycle().map(to_batch);
    let tokens_per_step = micro * block * config.gradient_accumulation_steps() as usize;
    for _ in 0..steps {
        let t = Instant::now();
        let report = engine.train_batch(&mut data).unwrap_or_else(|e| fail(e));
        let secs = t.elapsed().as_secs_f64();
        println!(
            "step {:3}  loss {:.4}  grad_norm {:.3}  lr {:.2e}  {:.0} tokens/s",
            report.step.global_step,
            report.loss,
            report.step.grad_norm,
            report.step.lr,
            tokens_per_step as f64 / secs
        );
    }
    let after = eval(&mut engine);
    let bytes = engine.model_state_bytes();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "held-out loss after {steps} steps: {after:.4} (before {before:.4}); total {:.0}s; model states {:.2} GiB (weights {:.2} + grads {:.2} + master {:.2} + optimizer {:.2}); peak RSS {}",
        t0.elapsed().as_secs_f64(),
        gib(bytes.total),
        gib(bytes.weights),
        gib(bytes.grads),
        gib(bytes.master),
        gib(bytes.optimizer),
        rustspeed::rss::peak_rss_bytes().map_or("unknown".into(), |b| format!("{:.2} GiB", gib(b)))
    );
}
