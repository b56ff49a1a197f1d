//! `rustspeed launch` end to end: the program it starts is this test binary again (the `child`
//! test, which does nothing unless RUSTSPEED_LAUNCH_TEST_CHILD is set), using
//! `Communicator::from_env()` the way a training script would.

use std::path::PathBuf;
use std::process::{Command, Output};

use rustspeed_comm::{Communicator, ReduceOp};

fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string()
}

fn launch(flags: &[&str], child_mode: &str) -> Output {
    let exe = std::env::current_exe().unwrap();
    Command::new(env!("CARGO_BIN_EXE_rustspeed"))
        .arg("launch")
        .args(flags)
        .arg("--")
        .arg(exe)
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env("RUSTSPEED_LAUNCH_TEST_CHILD", child_mode)
        .env("RUSTSPEED_COMM_TIMEOUT", "60")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn child() {
    let Ok(mode) = std::env::var("RUSTSPEED_LAUNCH_TEST_CHILD") else {
        return;
    };
    let comm = Communicator::from_env().unwrap();
    let (me, ws) = (comm.rank(), comm.world_size());
    assert_eq!(std::env::var("LOCAL_RANK").unwrap(), me.to_string());
    let mut buf = vec![(me + 1) as f32; 1000];
    match mode.as_str() {
        "sum" => {
            comm.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
            println!("rank {me} of {ws}: sum {}", buf[999]);
            eprintln!("rank {me} says bye on stderr");
        }
        "fail" => {
            comm.barrier().unwrap();
            if me == 1 {
                eprintln!("rank 1 fails on purpose");
                std::process::exit(7);
            }
            // Rank 0 waits for rank 1, which never comes: it fails on the dead peer while
            // the launcher gives it a moment before SIGTERM.
            let r = comm.all_reduce(&mut buf, ReduceOp::Sum);
            eprintln!("rank 0: {r:?}");
            std::process::exit(1);
        }
        other => panic!("unknown mode {other}"),
    }
}

#[test]
fn two_ranks_all_reduce_with_prefixed_logs() {
    let port = free_port();
    let out = launch(&["--nproc-per-node", "2", "--master-port", &port], "sum");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // (The test harness prints "test child ... " before the child's own words.)
    for r in 0..2 {
        let want = format!("rank {r} of 2: sum 3");
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("[rank {r}] ")) && l.ends_with(&want)),
            "{stdout}"
        );
    }
    assert!(
        stderr.contains("[rank 1] rank 1 says bye on stderr"),
        "{stderr}"
    );
    // Every line the ranks wrote carries a prefix.
    for line in stdout.lines().filter(|l| !l.is_empty()) {
        assert!(line.starts_with("[rank "), "unprefixed line: {line:?}");
    }
}

#[test]
fn failing_rank_stops_the_job_and_is_named() {
    let port = free_port();
    let out = launch(
        &[
            "--nproc-per-node",
            "2",
            "--master-port",
            &port,
            "--grace-period",
            "2",
        ],
        "fail",
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains("[rank 1] rank 1 fails on purpose"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "error: rank 1 exited with code 7; the other 1 process(es) exited on their own"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("[rank 0] rank 0: Err")
            && stderr.contains("ranks that did not arrive: [1]"),
        "{stderr}"
    );
}

fn hostfile(name: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "rustspeed-cli-hostfile-{}-{name}",
        std::process::id()
    ));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn usage_errors_exit_2() {
    let h = hostfile("bad", "worker-0 slots=2\nworker-0 slots=4\n");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--hostfile".into(),
                h.to_string_lossy().into(),
                "--dry-run".into(),
            ],
            "multiple entries for worker-0",
        ),
        (
            vec![
                "--nproc-per-node".into(),
                "2".into(),
                "--include".into(),
                "localhost".into(),
            ],
            "cannot be combined with --include/--exclude",
        ),
        (
            vec!["--include".into(), "localhost:3".into(), "--dry-run".into()],
            "no slot '3' on host 'localhost'",
        ),
    ];
    for (flags, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_rustspeed"))
            .arg("launch")
            .args(&flags)
            .args(["--", "true"])
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(want), "{flags:?}: {stderr}");
    }
    std::fs::remove_file(h).unwrap();
}

#[test]
fn dry_run_shows_ranks_and_multinode_command_lines() {
    let run = |flags: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_rustspeed"))
            .arg("launch")
            .args(flags)
            .args(["--", "train.sh", "--lr", "1e-4"])
            .env_remove("RUSTSPEED_COMM_TIMEOUT")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let local = run(&[
        "--nproc-per-node",
        "2",
        "--master-port",
        "29999",
        "--dry-run",
    ]);
    assert_eq!(
        local.lines().nth(1).unwrap(),
        "RANK=1 LOCAL_RANK=1 WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 LOCAL_SIZE=2 CROSS_RANK=0 CROSS_SIZE=1 \
         MASTER_ADDR=127.0.0.1 MASTER_PORT=29999 train.sh --lr 1e-4"
    );
    let h = hostfile("two", "worker-0 slots=4\nworker-1 slots=4\n");
    let hf = h.to_string_lossy().to_string();
    let mpi = run(&[
        "--hostfile",
        &hf,
        "--exclude",
        "worker-1:3",
        "--launcher",
        "mpi",
        "--dry-run",
    ]);
    assert_eq!(
        mpi.trim(),
        "mpirun -np 7 -host worker-0:4,worker-1:3 --bind-to none -x MASTER_ADDR=worker-0 \
         -x MASTER_PORT=29500 train.sh --lr 1e-4"
    );
    let slurm = run(&["--hostfile", &hf, "--launcher", "slurm", "--dry-run"]);
    assert!(
        slurm.starts_with("srun -n 8 --nodes 2 --ntasks-per-node 4 --nodelist worker-0,worker-1"),
        "{slurm}"
    );
    let ssh = run(&[
        "--hostfile",
        &hf,
        "--num-nodes",
        "2",
        "--nproc-per-node",
        "2",
        "--dry-run",
    ]);
    let lines: Vec<&str> = ssh.lines().collect();
    assert_eq!(lines.len(), 2, "{ssh}");
    assert!(lines[1].starts_with("ssh worker-1 '"), "{ssh}");
    assert!(
        lines[1].contains(
            "launch --launcher local --node-rank 1 --node-slots 2,2 --master-addr worker-0"
        ),
        "{ssh}"
    );
    std::fs::remove_file(h).unwrap();
}

#[test]
fn node_side_of_ssh_launch_numbers_ranks_after_earlier_nodes() {
    let out = Command::new(env!("CARGO_BIN_EXE_rustspeed"))
        .args([
            "launch",
            "--node-rank",
            "1",
            "--node-slots",
            "2,3",
            "--master-addr",
            "host0",
            "--master-port",
            "29501",
            "--dry-run",
            "--",
            "prog",
        ])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.lines().nth(2).unwrap().starts_with(
            "RANK=4 LOCAL_RANK=2 WORLD_SIZE=5 LOCAL_WORLD_SIZE=3 LOCAL_SIZE=3 CROSS_RANK=1 CROSS_SIZE=2 MASTER_ADDR=host0"
        ),
        "{stdout}"
    );
}
