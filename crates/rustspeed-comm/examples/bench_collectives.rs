//! Bandwidth of reduce_scatter / all_gather / all_reduce over the shm backend, next to the
//! machine's memcpy bandwidth measured in the same run.
//!
//!     cargo run --release -p rustspeed-comm --example bench_collectives -- [--ranks 2]
//!         [--sizes-mb 16,64,256] [--dtype f32|bf16] [--iters 10]
//!
//! Without RANK in the environment it starts `--ranks` copies of itself (as `rustspeed launch`
//! would) and prints rank 0's table. Figures follow nccl-tests: S = bytes of the full buffer
//! (reduce_scatter's input, all_gather's output, all_reduce's buffer), t = median time,
//! algbw = S / t, busbw = algbw * (n-1)/n for reduce_scatter and all_gather and
//! algbw * 2(n-1)/n for all_reduce (the bytes each rank must move over its link).
//! The `*_shared` rows run the same collectives over `Communicator::alloc_shared` buffers,
//! which peers read in place (all_gather_shared is in place: each rank's piece of its own buffer).

use std::process::Command;
use std::time::Instant;

use half::bf16;
use rustspeed_comm::{partition_len, Communicator, Elem, ReduceOp};

struct Opts {
    ranks: usize,
    sizes_mb: Vec<usize>,
    dtype: String,
    iters: usize,
}

fn parse() -> Opts {
    let mut o = Opts {
        ranks: 2,
        sizes_mb: vec![16, 64, 256],
        dtype: "f32".into(),
        iters: 10,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--ranks" => o.ranks = v.parse().expect("--ranks N"),
            "--sizes-mb" => {
                o.sizes_mb = v
                    .split(',')
                    .map(|s| s.parse().expect("--sizes-mb 16,64"))
                    .collect()
            }
            "--dtype" => o.dtype = v,
            "--iters" => o.iters = v.parse().expect("--iters N"),
            other => panic!("unknown argument {other}; see the file's header for usage"),
        }
        i += 2;
    }
    o
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn gbs(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// memcpy of `bytes` with `threads` threads copying disjoint halves at once (aggregate GB/s
/// of bytes copied, STREAM "copy" convention without the write-allocate read).
fn memcpy_bw(bytes: usize, threads: usize, iters: usize) -> f64 {
    let n = bytes / 4;
    let src = vec![1f32; n];
    let mut dst = vec![0f32; n];
    let mut times = Vec::new();
    for _ in 0..iters + 1 {
        let t0 = Instant::now();
        std::thread::scope(|s| {
            let per = n.div_ceil(threads);
            for (d, sc) in dst.chunks_mut(per).zip(src.chunks(per)) {
                s.spawn(move || d.copy_from_slice(sc));
            }
        });
        times.push(t0.elapsed().as_secs_f64());
    }
    times.remove(0);
    std::hint::black_box(&dst);
    gbs(bytes, median(times))
}

fn run_rank<T: Elem>(comm: &Communicator, o: &Opts) {
    let (ws, me) = (comm.world_size(), comm.rank());
    let esize = size_of::<T>();
    if me == 0 {
        println!(
            "# {} ranks, {}, median of {} iterations; busbw per nccl-tests; {}",
            ws,
            o.dtype,
            o.iters,
            if comm.single_copy() {
                "single copy (process_vm_readv)"
            } else {
                "two copies through shared memory"
            }
        );
        println!("| op | size | time | algbw GB/s | busbw GB/s |");
        println!("|---|---|---|---|---|");
    }
    for &mb in &o.sizes_mb {
        let bytes = mb << 20;
        let n = bytes / esize;
        let c = partition_len(n, ws);
        let mut x = vec![T::default(); n];
        let mut f = vec![0.5f32 + me as f32; n];
        f.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v += (i % 7) as f32);
        T::narrow(&f, &mut x);
        drop(f);
        let mut piece = vec![T::default(); c];
        let mut full = vec![T::default(); n];
        let iters = o.iters;
        let time = |name: &str, factor: f64, op: &mut dyn FnMut()| {
            let mut t = Vec::new();
            for _ in 0..iters + 1 {
                comm.barrier().unwrap();
                let t0 = Instant::now();
                op();
                t.push(t0.elapsed().as_secs_f64());
            }
            t.remove(0);
            // Every rank's time counts: the slowest defines the collective.
            let mut med = [median(t) as f32];
            comm.all_reduce(&mut med[..], ReduceOp::Max).unwrap();
            let med = [med[0] as f64];
            let alg = gbs(bytes, med[0]);
            if me == 0 {
                println!(
                    "| {name} | {mb} MiB | {:.2} ms | {alg:.2} | {:.2} |",
                    med[0] * 1e3,
                    alg * factor
                );
            }
        };
        let wsf = ws as f64;
        time("reduce_scatter", (wsf - 1.0) / wsf, &mut || {
            comm.reduce_scatter(&x, &mut piece, ReduceOp::Sum).unwrap()
        });
        time("all_gather", (wsf - 1.0) / wsf, &mut || {
            comm.all_gather(&piece, &mut full).unwrap()
        });
        time("all_reduce", 2.0 * (wsf - 1.0) / wsf, &mut || {
            comm.all_reduce(&mut full, ReduceOp::Sum).unwrap()
        });
        // The same over buffers every rank maps (`alloc_shared`): peers read in place.
        let mut shared = comm.alloc_shared::<T>(n).unwrap();
        shared.copy_from_slice(&x);
        time("reduce_scatter_shared", (wsf - 1.0) / wsf, &mut || {
            comm.reduce_scatter_shared(&shared, &mut piece, ReduceOp::Sum)
                .unwrap()
        });
        time("all_gather_shared", (wsf - 1.0) / wsf, &mut || {
            comm.all_gather_shared(&mut shared).unwrap()
        });
        time("all_reduce_shared", 2.0 * (wsf - 1.0) / wsf, &mut || {
            comm.all_reduce_shared(&mut shared, ReduceOp::Sum).unwrap()
        });
    }
    comm.barrier().unwrap();
    if me == 0 {
        let big = o.sizes_mb.iter().max().copied().unwrap_or(256) << 20;
        println!();
        println!(
            "memcpy {} MiB: 1 thread {:.2} GB/s, {ws} threads {:.2} GB/s aggregate",
            big >> 20,
            memcpy_bw(big, 1, o.iters),
            memcpy_bw(big, ws, o.iters)
        );
    }
}

fn main() {
    let o = parse();
    if std::env::var("RANK").is_err() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let exe = std::env::current_exe().unwrap();
        let children: Vec<_> = (0..o.ranks)
            .map(|r| {
                Command::new(&exe)
                    .args(std::env::args().skip(1))
                    .env("RANK", r.to_string())
                    .env("WORLD_SIZE", o.ranks.to_string())
                    .env("LOCAL_RANK", r.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut ok = true;
        for mut c in children {
            ok &= c.wait().unwrap().success();
        }
        std::process::exit(if ok { 0 } else { 1 });
    }
    let comm = Communicator::from_env().unwrap();
    match o.dtype.as_str() {
        "f32" => run_rank::<f32>(&comm, &o),
        "bf16" => run_rank::<bf16>(&comm, &o),
        other => panic!("--dtype {other}: expected f32 or bf16"),
    }
}
