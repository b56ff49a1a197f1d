//! Bandwidth of reduce_scatter / all_gather / all_reduce over the shm backend, next to the
//! machine's copy bandwidth measured in the same run.
//!
//!     cargo run --release -p rustspeed-comm --example bench_collectives -- [--ranks 2]
//!         [--sizes-mb 16,64,256] [--dtype f32|bf16] [--iters 10]
//!         [--variant NAME:KEY=VAL,KEY=VAL ...]
//!
//! Without RANK in the environment it starts `--ranks` copies of itself (as `rustspeed launch`
//! would) and prints rank 0's table. Figures follow nccl-tests: S = bytes of the full buffer
//! (reduce_scatter's input, all_gather's output, all_reduce's buffer), t = median time of the
//! slowest rank, algbw = S / t, busbw = algbw * (n-1)/n for reduce_scatter and all_gather and
//! algbw * 2(n-1)/n for all_reduce (the bytes each rank must move over its link).
//!
//! A/B: each `--variant` is its own communicator (keys: `chunk` = bytes of a shared slot,
//! `slots` = slots per rank,
//! `stream` = RUSTSPEED_SHM_STREAM_BYTES or `off`, `single_copy` = 0/1; sizes take K/M
//! suffixes), all made over one rendezvous; iterations alternate between them, so a machine
//! shared with other work slows every variant alike. Without `--variant`, one communicator
//! configured from the environment.
//!
//! The copy ceiling: `copy(1t)` is one thread's glibc memcpy of the largest buffer (bytes
//! copied / time); `copy(nt)` is the best of `--ranks` threads copying disjoint parts at once
//! with glibc memcpy or with streaming stores: the machine's aggregate copy bandwidth. Both
//! are measured before and after the collectives and the higher figure is kept.

use std::process::Command;
use std::time::{Duration, Instant};

use half::bf16;
use rustspeed_comm::{
    partition_len, stream, CommConfig, Communicator, Elem, RankInfo, ReduceOp, Store,
};

struct Opts {
    ranks: usize,
    sizes_mb: Vec<usize>,
    dtype: String,
    iters: usize,
    variants: Vec<String>,
}

fn parse() -> Opts {
    let mut o = Opts {
        ranks: 2,
        sizes_mb: vec![16, 64, 256],
        dtype: "f32".into(),
        iters: 10,
        variants: Vec::new(),
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
            "--variant" => o.variants.push(v),
            other => panic!("unknown argument {other}; see the file's header for usage"),
        }
        i += 2;
    }
    o
}

fn parse_bytes(v: &str) -> usize {
    let (num, mul) = match v.chars().last() {
        Some('K') | Some('k') => (&v[..v.len() - 1], 1 << 10),
        Some('M') | Some('m') => (&v[..v.len() - 1], 1 << 20),
        _ => (v, 1),
    };
    num.parse::<usize>()
        .unwrap_or_else(|_| panic!("{v:?}: expected bytes, e.g. 4096, 512K, 2M"))
        * mul
}

/// "NAME:chunk=2M,stream=32M" -> (NAME, config over the environment's).
fn variant(spec: &str) -> (String, CommConfig) {
    let mut cfg = CommConfig::from_env().unwrap();
    let (name, kvs) = spec.split_once(':').unwrap_or((spec, ""));
    for kv in kvs.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .unwrap_or_else(|| panic!("--variant {spec}: expected KEY=VAL in {kv:?}"));
        match k {
            "chunk" => cfg.shm_half_bytes = parse_bytes(v).next_multiple_of(4096),
            "slots" => cfg.shm_slots = v.parse().expect("slots=N (a power of two >= 2)"),
            "stream" if v == "off" => cfg.shm_stream_min_bytes = usize::MAX,
            "stream" => cfg.shm_stream_min_bytes = parse_bytes(v),
            "single_copy" => cfg.shm_single_copy = v == "1",
            other => {
                panic!("--variant {spec}: unknown key {other} (chunk, slots, stream, single_copy)")
            }
        }
    }
    (name.to_string(), cfg)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn gbs(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// `bytes` copied by `threads` threads, each its own part, at once (aggregate GB/s of bytes
/// copied, STREAM "copy" convention: the write-allocate read is not counted).
fn copy_bw(bytes: usize, threads: usize, iters: usize, streaming: bool) -> f64 {
    let n = bytes / 4;
    let src = vec![1f32; n];
    let mut dst = vec![0f32; n];
    let mut times = Vec::new();
    for _ in 0..iters + 1 {
        let t0 = Instant::now();
        std::thread::scope(|s| {
            let per = n.div_ceil(threads);
            for (d, sc) in dst.chunks_mut(per).zip(src.chunks(per)) {
                s.spawn(move || stream::copy(d, sc, streaming));
            }
        });
        times.push(t0.elapsed().as_secs_f64());
    }
    times.remove(0);
    std::hint::black_box(&dst);
    gbs(bytes, median(times))
}

/// (1-thread memcpy, best `threads`-thread copy, which one).
fn copy_ceiling(bytes: usize, threads: usize, iters: usize) -> (f64, f64, &'static str) {
    let one = copy_bw(bytes, 1, iters, false);
    let plain = copy_bw(bytes, threads, iters, false);
    let streamed = copy_bw(bytes, threads, iters, true);
    if streamed > plain {
        (one, streamed, "streaming stores")
    } else {
        (one, plain, "memcpy")
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn run_rank<T: Elem>(comms: &[(String, Communicator)], o: &Opts) {
    let comm = &comms[0].1;
    let (ws, me) = (comm.world_size(), comm.rank());
    let esize = size_of::<T>();
    let big = o.sizes_mb.iter().max().copied().unwrap_or(256) << 20;
    let mut ceiling = (0f64, 0f64, "");
    let mut measure_ceiling = |comm: &Communicator| {
        comm.barrier().unwrap();
        if me == 0 {
            let c = copy_ceiling(big, ws, o.iters.max(5));
            ceiling = (ceiling.0.max(c.0), ceiling.1.max(c.1), c.2);
        }
        comm.barrier().unwrap();
    };
    measure_ceiling(comm);
    let load_before = loadavg();
    if me == 0 {
        println!(
            "# {ws} ranks, {}, median of {} iterations (variants alternate), load before: {load_before}",
            o.dtype, o.iters
        );
        let names: Vec<&str> = comms.iter().map(|(n, _)| n.as_str()).collect();
        println!(
            "| op | size | {} |",
            names
                .iter()
                .map(|n| format!("{n} algbw GB/s"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        println!("|---|---|{}", "---|".repeat(names.len()));
    }
    let mut rows = Vec::new();
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
        for op in ["reduce_scatter", "all_gather", "all_reduce"] {
            let mut t = vec![Vec::new(); comms.len()];
            for it in 0..o.iters + 1 {
                for (v, (_, comm)) in comms.iter().enumerate() {
                    comm.barrier().unwrap();
                    let t0 = Instant::now();
                    match op {
                        "reduce_scatter" => comm.reduce_scatter(&x, &mut piece, ReduceOp::Sum),
                        "all_gather" => comm.all_gather(&piece, &mut full),
                        _ => comm.all_reduce(&mut full, ReduceOp::Sum),
                    }
                    .unwrap();
                    if it > 0 {
                        t[v].push(t0.elapsed().as_secs_f64());
                    }
                }
            }
            // Every rank's time counts: the slowest defines the collective.
            let mut med: Vec<f32> = t.into_iter().map(|t| median(t) as f32).collect();
            comm.all_reduce(&mut med[..], ReduceOp::Max).unwrap();
            let alg: Vec<f64> = med.iter().map(|&m| gbs(bytes, m as f64)).collect();
            if me == 0 {
                println!(
                    "| {op} | {mb} MiB | {} |",
                    alg.iter()
                        .map(|a| format!("{a:.2}"))
                        .collect::<Vec<_>>()
                        .join(" | ")
                );
            }
            rows.push((op, mb, alg));
        }
    }
    measure_ceiling(comm);
    if me == 0 {
        let (one, all, how) = ceiling;
        println!(
            "\ncopy ceiling, {} MiB (best of before/after): 1 thread {one:.2} GB/s; {ws} threads {all:.2} GB/s ({how}); load after: {}",
            big >> 20,
            loadavg()
        );
        println!("ratios of algbw to the {ws}-thread copy ceiling:");
        for (op, mb, alg) in rows {
            let r: Vec<String> = alg.iter().map(|a| format!("{:.2}", a / all)).collect();
            println!("  {op} {mb} MiB: {}", r.join(" / "));
        }
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
                    .env("LOCAL_WORLD_SIZE", o.ranks.to_string())
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
    let comms: Vec<(String, Communicator)> = if o.variants.is_empty() {
        vec![("shm".into(), Communicator::from_env().unwrap())]
    } else {
        let info = RankInfo::from_env().unwrap();
        let (addr, port) = rustspeed_comm::env::master().unwrap();
        o.variants
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let (name, cfg) = variant(spec);
                // The first store of rank 0 serves the rendezvous; later ones are clients.
                let serve = i == 0 && info.rank == 0;
                let store = Store::connect(&addr, port, serve, Duration::from_secs(60)).unwrap();
                (
                    name,
                    Communicator::with_store(info.clone(), store, cfg).unwrap(),
                )
            })
            .collect()
    };
    match o.dtype.as_str() {
        "f32" => run_rank::<f32>(&comms, &o),
        "bf16" => run_rank::<bf16>(&comms, &o),
        other => panic!("--dtype {other}: expected f32 or bf16"),
    }
}
