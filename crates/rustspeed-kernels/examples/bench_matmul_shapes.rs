//! The matmuls of a GPT-2 124M step (B=4, T=128: 512 rows), each timed alone: best of `reps`
//! runs, so that A/B comparisons of the matmul code survive a busy machine. With
//! RAYON_NUM_THREADS=1 the time is the thread's CPU time, which other jobs sharing the cores
//! disturb far less than wall-clock time.
//!
//!     cargo run --release -p rustspeed-kernels --example bench_matmul_shapes -- bf16 20

use std::time::Instant;

use half::bf16;
use rustspeed_kernels::matmul::matmul;
use rustspeed_kernels::Float;

/// (name, m, k, n, trans_a, trans_b, accumulate, f32 destination)
type Shape = (&'static str, usize, usize, usize, bool, bool, bool, bool);

const SHAPES: [Shape; 12] = [
    ("c_attn fwd", 512, 768, 2304, false, false, false, false),
    ("c_fc fwd", 512, 768, 3072, false, false, false, false),
    ("mlp_proj fwd", 512, 3072, 768, false, false, false, false),
    ("c_attn dx", 512, 2304, 768, false, true, false, false),
    ("c_fc dx", 512, 3072, 768, false, true, false, false),
    ("mlp_proj dx", 512, 768, 3072, false, true, false, false),
    ("c_attn dW", 768, 512, 2304, true, false, true, true),
    ("c_fc dW", 768, 512, 3072, true, false, true, true),
    ("mlp_proj dW", 3072, 512, 768, true, false, true, true),
    ("head logits", 512, 768, 50257, false, true, false, true),
    ("head dh", 512, 50257, 768, false, false, false, false),
    ("head dW", 50257, 512, 768, true, false, true, true),
];

fn fill<T: Float>(n: usize, seed: u64) -> Vec<T> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            T::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
        })
        .collect()
}

fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn best<T: Float, D: Float>(shape: &Shape, reps: usize) -> f64 {
    let &(_, m, k, n, ta, tb, acc, _) = shape;
    let (a, b) = (fill::<T>(m * k, 1), fill::<T>(k * n, 2));
    let mut dst = fill::<D>(m * n, 3);
    (0..reps)
        .map(|_| {
            let (t, c) = (Instant::now(), thread_cpu_secs());
            matmul(&mut dst, &a, &b, m, k, n, ta, tb, acc);
            if rayon::current_num_threads() == 1 {
                thread_cpu_secs() - c
            } else {
                t.elapsed().as_secs_f64()
            }
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    // As the training binary does: packing buffers are reused, not faulted in per call.
    rustspeed_kernels::alloc::retain_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dtype = args.first().map(String::as_str).unwrap_or("bf16");
    let reps: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(20);
    let mut total = 0.0;
    for s in &SHAPES {
        let secs = match (dtype, s.7) {
            ("bf16", true) => best::<bf16, f32>(s, reps),
            ("bf16", false) => best::<bf16, bf16>(s, reps),
            ("f32", _) => best::<f32, f32>(s, reps),
            (other, _) => panic!("unknown dtype {other}: use f32 or bf16"),
        };
        total += secs;
        let gflops = 2.0 * (s.1 * s.2 * s.3) as f64 / secs / 1e9;
        println!("{:14} {:8.2} ms {:7.1} GFLOP/s", s.0, secs * 1e3, gflops);
    }
    println!("{:14} {:8.2} ms", "total", total * 1e3);
}
