//! Ranks as real processes: this test binary re-executes itself (the `child` test, which does
//! nothing unless RUSTSPEED_COMM_TEST_CHILD is set) with the environment a launcher sets.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use half::bf16;
use rustspeed_comm::elem::reduce_reference;
use rustspeed_comm::{partition_len, Communicator, ReduceOp};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_ranks(world: usize, mode: &str, timeout_s: &str) -> Vec<Child> {
    spawn_ranks_env(world, mode, timeout_s, "1")
}

fn spawn_ranks_env(world: usize, mode: &str, timeout_s: &str, single_copy: &str) -> Vec<Child> {
    let port = free_port().to_string();
    let exe = std::env::current_exe().unwrap();
    (0..world)
        .map(|rank| {
            Command::new(&exe)
                .args(["--exact", "child", "--nocapture", "--test-threads=1"])
                .env("RUSTSPEED_COMM_TEST_CHILD", mode)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("RUSTSPEED_COMM_TIMEOUT", timeout_s)
                .env("RUSTSPEED_SHM_SINGLE_COPY", single_copy)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

fn values(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 31 + rank * 7) % 101) as f32 * 0.25 - rank as f32)
        .collect()
}

/// The body each child process runs.
#[test]
fn child() {
    let Ok(mode) = std::env::var("RUSTSPEED_COMM_TEST_CHILD") else {
        return;
    };
    let comm = Communicator::from_env().unwrap();
    let (ws, me) = (comm.world_size(), comm.rank());
    assert_eq!(comm.backend_name(), "shm");
    if std::env::var("RUSTSPEED_SHM_SINGLE_COPY").as_deref() == Ok("0") {
        assert!(!comm.single_copy());
    }
    match mode.as_str() {
        "ops" => {
            let n = 1_000_003; // odd, several rounds of 1 MiB halves
            let inputs: Vec<Vec<f32>> = (0..ws).map(|r| values(r, n)).collect();
            let mut buf = inputs[me].clone();
            comm.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
            assert_eq!(buf, reduce_reference(&inputs, ReduceOp::Sum));
            let c = partition_len(n, ws);
            let mut piece = vec![0f32; c];
            comm.reduce_scatter(&inputs[me], &mut piece, ReduceOp::Mean)
                .unwrap();
            let mut full = vec![0f32; n];
            comm.all_gather(&piece, &mut full).unwrap();
            assert_eq!(full, reduce_reference(&inputs, ReduceOp::Mean));
            let mut b: Vec<bf16> = inputs[me].iter().map(|&x| bf16::from_f32(x)).collect();
            comm.broadcast(&mut b, ws - 1).unwrap();
            assert_eq!(b[12], bf16::from_f32(inputs[ws - 1][12]));
            if me == 0 {
                comm.send(&buf[..1000], 1).unwrap();
            } else if me == 1 {
                let mut got = vec![0f32; 1000];
                comm.recv(&mut got, 0).unwrap();
                assert_eq!(got, buf[..1000]);
            }
            // The same through buffers every process maps (peers read them in place).
            let mut sb = comm.alloc_shared::<f32>(n).unwrap();
            assert!(sb.is_mapped());
            sb.copy_from_slice(&inputs[me]);
            comm.reduce_scatter_shared(&sb, &mut piece, ReduceOp::Mean)
                .unwrap();
            let mine = rustspeed_comm::partition_range(n, ws, me);
            let len = mine.len();
            sb[mine].copy_from_slice(&piece[..len]);
            comm.all_gather_shared(&mut sb).unwrap();
            assert_eq!(&sb[..], &reduce_reference(&inputs, ReduceOp::Mean)[..]);
            sb.copy_from_slice(&inputs[me]);
            comm.all_reduce_shared(&mut sb, ReduceOp::Sum).unwrap();
            assert_eq!(&sb[..], &buf[..]);
            comm.barrier().unwrap();
            println!("rank {me} ok");
        }
        "killed" => {
            comm.barrier().unwrap();
            if me == ws - 1 {
                println!("ready");
                std::thread::sleep(Duration::from_secs(600)); // the parent kills us
            }
            let mut buf = vec![1f32; 4096];
            let e = comm.all_reduce(&mut buf, ReduceOp::Sum).unwrap_err();
            eprintln!("rank {me} error: {e}");
            std::process::exit(3);
        }
        other => panic!("unknown child mode {other}"),
    }
}

#[test]
fn three_processes_every_op() {
    for single_copy in ["1", "0"] {
        check_ops(spawn_ranks_env(3, "ops", "60", single_copy));
    }
}

fn check_ops(children: Vec<Child>) {
    for (rank, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(&format!("rank {rank} ok")),
            "rank {rank}: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn killed_rank_fails_the_others_fast() {
    // Timeout 120 s: the others must notice the death long before that.
    let mut children = spawn_ranks(3, "killed", "120");
    let mut victim = children.pop().unwrap();
    // The test harness prints its own lines first.
    let mut reader = BufReader::new(victim.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("ready") {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "rank 2 exited early"
        );
    }
    let t0 = Instant::now();
    victim.kill().unwrap();
    victim.wait().unwrap();
    for (rank, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "rank {rank}: {stderr}");
        assert!(
            stderr.contains("rank 2 (pid") && stderr.contains("died"),
            "rank {rank}: {stderr}"
        );
        assert!(
            stderr.contains("all_reduce(sum) #2 of 4096 f32"),
            "{stderr}"
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}
