//! Fused AdamW throughput over flat fp32 buffers, next to a STREAM-style triad bandwidth
//! measured in the same run with the same threads (AdamW moves 28 bytes per parameter:
//! read p, g, m, v and write p, m, v, so the triad figure is its ceiling).
//!
//! Usage: cargo run --release -p rustspeed-kernels --example bench_adamw -- \
//!            [--params N] [--threads T] [--steps S]
//! Prints one JSON line per measurement, like tools/bench/adamw_torch.py.

use std::time::Instant;

use rayon::prelude::*;
use rustspeed_kernels::optim::{adam_step, AdamBuffers, AdamParams, HalfOut};

struct Args {
    params: usize,
    threads: usize,
    steps: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        params: 100_000_000,
        threads: 2,
        steps: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let n: usize = value
            .parse()
            .unwrap_or_else(|_| panic!("{flag}: expected a positive integer, got {value:?}"));
        match flag.as_str() {
            "--params" => a.params = n,
            "--threads" => a.threads = n,
            "--steps" => a.steps = n,
            _ => panic!("unknown flag {flag}; expected --params, --threads or --steps"),
        }
    }
    a
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let args = parse_args();
    let n = args.params;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()
        .expect("thread pool");
    let hp = AdamParams {
        weight_decay: 0.01,
        ..Default::default()
    };

    pool.install(|| {
        // First-touch the buffers from the pool's threads, as the optimizer will use them.
        let fill = |v: f32| {
            let mut b = vec![0.0f32; n];
            b.par_chunks_mut(1 << 16).for_each(|c| c.fill(v));
            b
        };
        let mut p = fill(0.5);
        let g = fill(1e-3);
        let mut m = fill(0.0);
        let mut v = fill(0.0);

        let mut times = Vec::new();
        for step in 1..=(args.steps + 2) as u64 {
            let t = Instant::now();
            let bufs = AdamBuffers {
                params: &mut p,
                grads: &g,
                exp_avg: &mut m,
                exp_avg_sq: &mut v,
                out: HalfOut::None,
            };
            adam_step(&hp, step, 1.0, bufs).expect("adam_step");
            // The first two steps are warm-up (page faults, frequency ramp).
            if step > 2 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let t = median(times);
        println!(
            "{{\"impl\":\"rustspeed_adamw\",\"params\":{n},\"threads\":{},\"median_s\":{t:.4},\"gparams_per_s\":{:.3},\"gb_per_s\":{:.2}}}",
            args.threads,
            n as f64 / t / 1e9,
            28.0 * n as f64 / t / 1e9
        );

        // STREAM triad a = b + s*c over the same memory (3 arrays, 12 bytes per element).
        let (a, b, c) = (&mut p, &g, &m);
        let mut times = Vec::new();
        for rep in 0..(args.steps + 2) {
            let t = Instant::now();
            a.par_chunks_mut(1 << 16)
                .zip(b.par_chunks(1 << 16))
                .zip(c.par_chunks(1 << 16))
                .for_each(|((a, b), c)| {
                    // Zipped iterators carry no bounds checks, so the loop vectorises like
                    // STREAM's C; an indexed loop here measured the scalar loop, not memory.
                    for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                        *a = b + 3.0 * c;
                    }
                });
            if rep >= 2 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let t = median(times);
        println!(
            "{{\"impl\":\"stream_triad\",\"elements\":{n},\"threads\":{},\"median_s\":{t:.4},\"gb_per_s\":{:.2}}}",
            args.threads,
            12.0 * n as f64 / t / 1e9
        );
        std::hint::black_box(&p);
    });
}
