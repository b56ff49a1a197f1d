//! GELU (tanh) forward+backward throughput: the kernels' vectorised version against the same
//! loop with libm's tanh (what it replaced), same run, same data.
//!
//!     cargo run --release -p rustspeed-kernels --example bench_gelu

use std::time::Instant;

use half::bf16;
use rustspeed_kernels::activation::{gelu_tanh_backward, gelu_tanh_forward};
use rustspeed_kernels::Float;

const SCALE: f32 = 0.797_884_6;
const CUBIC: f32 = 0.044_715;

fn libm_forward<T: Float>(out: &mut [T], x: &[T]) {
    for (o, x) in out.iter_mut().zip(x) {
        let x = x.to_f32();
        let t = (SCALE * (x + CUBIC * x * x * x)).tanh();
        *o = T::from_f32(0.5 * x * (1.0 + t));
    }
}

fn libm_backward<T: Float>(dx: &mut [T], x: &[T], dout: &[T]) {
    for ((d, x), g) in dx.iter_mut().zip(x).zip(dout) {
        let x = x.to_f32();
        let t = (SCALE * (x + CUBIC * x * x * x)).tanh();
        let du = SCALE * (1.0 + 3.0 * CUBIC * x * x);
        *d = T::from_f32(g.to_f32() * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du));
    }
}

fn best(mut f: impl FnMut()) -> f64 {
    (0..7)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn run<T: Float>(name: &str) {
    let n = 1 << 22;
    let x: Vec<T> = (0..n)
        .map(|i| T::from_f32(((i % 2001) as f32 - 1000.0) * 0.005))
        .collect();
    let g: Vec<T> = (0..n)
        .map(|i| T::from_f32(((i % 7) as f32 - 3.0) * 0.1))
        .collect();
    let (mut y, mut d) = (vec![T::default(); n], vec![T::default(); n]);
    // One thread each, so the comparison is of the loops, not of the thread pool.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let ours = pool.install(|| {
        best(|| {
            gelu_tanh_forward(&mut y, &x);
            gelu_tanh_backward(&mut d, &x, &g);
        })
    });
    let libm = best(|| {
        libm_forward(&mut y, &x);
        libm_backward(&mut d, &x, &g);
    });
    let gelems = |s: f64| n as f64 / s / 1e9;
    println!(
        "{name}: fwd+bwd {n} elements, 1 thread: vectorised {:.3} Gelem/s, libm tanh {:.3} Gelem/s, ratio {:.2}x",
        gelems(ours),
        gelems(libm),
        libm / ours
    );
}

fn main() {
    run::<f32>("f32");
    run::<bf16>("bf16");
}
