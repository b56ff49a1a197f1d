//! Dequantizing linear layers (NF4 + double quant, int8) against the plain dense linear layer
//! on TinyLlama's shapes (d 2048, ffn 5632), forward `x W^T` and backward `dy W`, f32 and bf16.
//!
//! Usage: cargo run --release -p rustspeed-kernels --example bench_quant_matmul -- \
//!            [--rows N] [--threads T] [--reps R]
//! Prints one line per measurement: best and median of R runs (best-of is the figure to
//! compare on a shared machine), GFLOP/s counted as 2 * rows * in * out.

use std::time::Instant;

use half::bf16;
use rustspeed_kernels::matmul::{linear_backward, linear_forward, LinearShape, WeightLayout};
use rustspeed_kernels::quant::{
    quant_linear_backward_input, quant_linear_forward, QuantConfig, QuantMatrix,
};
use rustspeed_kernels::Float;

struct Args {
    rows: usize,
    threads: usize,
    reps: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        rows: 512,
        threads: 2,
        reps: 7,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let n: usize = value
            .parse()
            .unwrap_or_else(|_| panic!("{flag}: expected a positive integer, got {value:?}"));
        match flag.as_str() {
            "--rows" => a.rows = n,
            "--threads" => a.threads = n,
            "--reps" => a.reps = n,
            _ => panic!("unknown flag {flag}; expected --rows, --threads or --reps"),
        }
    }
    a
}

/// (best, median) seconds of `reps` runs after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[0], t[t.len() / 2])
}

/// Deterministic bell-shaped weights, like a trained layer's (a sum of uniforms).
fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut uniform = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..n)
        .map(|_| (uniform() + uniform() + uniform() + uniform()) * 0.04)
        .collect()
}

fn report(what: &str, flops: f64, (best, median): (f64, f64), dense_best: f64) {
    println!(
        "{what:<34} best {:>7.2} ms ({:>5.0} GFLOP/s)  median {:>7.2} ms  vs dense {:.2}x",
        best * 1e3,
        flops / best / 1e9,
        median * 1e3,
        dense_best / best
    );
}

fn bench<T: Float>(args: &Args, fi: usize, fo: usize) {
    let rows = args.rows;
    let flops = 2.0 * (rows * fi * fo) as f64;
    let w32 = weights(fo * fi, 1);
    let w: Vec<T> = w32.iter().map(|&v| T::from_f32(v)).collect();
    let x: Vec<T> = weights(rows * fi, 2).into_iter().map(T::from_f32).collect();
    let dy: Vec<T> = weights(rows * fo, 3).into_iter().map(T::from_f32).collect();
    let mut y = vec![T::default(); rows * fo];
    let mut dx = vec![T::default(); rows * fi];
    let shape = LinearShape {
        rows,
        in_features: fi,
        out_features: fo,
        layout: WeightLayout::OutIn,
    };
    let dt = T::DTYPE;
    println!("-- {dt}, rows {rows}, in {fi} -> out {fo}");

    let dense_fwd = time(args.reps, || linear_forward(&mut y, &x, &w, None, shape));
    report(&format!("dense fwd {dt}"), flops, dense_fwd, dense_fwd.0);
    let dense_bwd = time(args.reps, || {
        linear_backward::<T, f32>(Some(&mut dx), false, None, None, &dy, &x, &w, shape)
    });
    report(&format!("dense bwd dx {dt}"), flops, dense_bwd, dense_bwd.0);

    for (name, cfg) in [
        ("nf4+dq", QuantConfig::nf4(true)),
        ("int8", QuantConfig::int8()),
    ] {
        let q = QuantMatrix::quantize(&w, fo, fi, &cfg);
        let fwd = time(args.reps, || {
            quant_linear_forward(&mut y, &x, &q, None, rows, false)
        });
        report(&format!("{name} fwd {dt}"), flops, fwd, dense_fwd.0);
        let bwd = time(args.reps, || {
            quant_linear_backward_input(&mut dx, &dy, &q, rows, false)
        });
        report(&format!("{name} bwd dx {dt}"), flops, bwd, dense_bwd.0);
        let mut whole = vec![T::default(); fo * fi];
        let (best, _) = time(args.reps, || q.dequantize_into(&mut whole));
        println!(
            "{:<34} best {:>7.2} ms ({:.2} G weights/s); {:.1} MB stored vs {:.1} MB {dt}",
            format!("{name} dequantize whole {dt}"),
            best * 1e3,
            (fo * fi) as f64 / best / 1e9,
            q.bytes() as f64 / 1e6,
            (fo * fi * dt.size_in_bytes()) as f64 / 1e6
        );
    }
}

fn main() {
    let args = parse_args();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()
        .expect("rayon pool");
    println!(
        "bench_quant_matmul: {} threads, best/median of {} runs, avx512bf16 {}",
        args.threads,
        args.reps,
        rustspeed_kernels::bf16_gemm::available()
    );
    pool.install(|| {
        for (fi, fo) in [(2048, 2048), (2048, 5632), (5632, 2048)] {
            bench::<f32>(&args, fi, fo);
            bench::<bf16>(&args, fi, fo);
        }
    });
}
