//! The mpi backend under a real mpirun (feature `mpi`; needs openmpi-bin): this test binary
//! re-executes itself as 3 MPI ranks and checks every collective against the reference.
#![cfg(feature = "mpi")]

use std::process::Command;

use half::bf16;
use rustspeed_comm::elem::reduce_reference;
use rustspeed_comm::{partition_len, Communicator, Elem, ReduceOp};

fn values<T: Elem>(rank: usize, n: usize) -> Vec<T> {
    let f: Vec<f32> = (0..n)
        .map(|i| ((i * 31 + rank * 7) % 101) as f32 * 0.25 - rank as f32)
        .collect();
    let mut out = vec![T::default(); n];
    T::narrow(&f, &mut out);
    out
}

fn check<T: Elem + PartialEq + std::fmt::Debug>(comm: &Communicator, n: usize) {
    let (ws, me) = (comm.world_size(), comm.rank());
    let inputs: Vec<Vec<T>> = (0..ws).map(|r| values(r, n)).collect();
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
        let want = reduce_reference(&inputs, op);
        let mut buf = inputs[me].clone();
        comm.all_reduce(&mut buf, op).unwrap();
        assert_eq!(buf, want, "all_reduce {op:?} n={n}");
        let c = partition_len(n, ws);
        let mut piece = vec![T::default(); c];
        comm.reduce_scatter(&inputs[me], &mut piece, op).unwrap();
        let mut full = vec![T::default(); n];
        comm.all_gather(&piece, &mut full).unwrap();
        assert_eq!(full, want, "reduce_scatter + all_gather {op:?} n={n}");
    }
    let mut b = inputs[me].clone();
    comm.broadcast(&mut b, ws - 1).unwrap();
    assert_eq!(b, inputs[ws - 1]);
    // Shared buffers are plain memory under MPI: the calls fall back to the ordinary ones.
    let mut sb = comm.alloc_shared::<T>(n).unwrap();
    assert!(!sb.is_mapped());
    sb.copy_from_slice(&inputs[me]);
    comm.all_reduce_shared(&mut sb, ReduceOp::Sum).unwrap();
    assert_eq!(&sb[..], &reduce_reference(&inputs, ReduceOp::Sum)[..]);
    let mine = rustspeed_comm::partition_range(n, ws, me);
    sb.fill(T::default());
    sb[mine.clone()].copy_from_slice(&inputs[me][mine]);
    comm.all_gather_shared(&mut sb).unwrap();
    let c = partition_len(n, ws);
    let want: Vec<T> = (0..n).map(|i| inputs[i / c][i]).collect();
    assert_eq!(&sb[..], &want[..], "all_gather_shared n={n}");
}

#[test]
fn mpi_child() {
    if std::env::var("RUSTSPEED_MPI_TEST_CHILD").is_err() {
        return;
    }
    let comm = Communicator::from_env().unwrap();
    assert_eq!(comm.backend_name(), "mpi");
    assert_eq!(comm.world_size(), 3);
    for n in [1, 5, 1000, 100_003] {
        check::<f32>(&comm, n);
        check::<bf16>(&comm, n);
    }
    let me = comm.rank();
    if me == 0 {
        comm.send(&[1f32, 2.0, 3.0], 2).unwrap();
    } else if me == 2 {
        let mut got = [0f32; 3];
        comm.recv(&mut got, 0).unwrap();
        assert_eq!(got, [1.0, 2.0, 3.0]);
    }
    comm.barrier().unwrap();
    println!("mpi rank {me} ok");
}

#[test]
fn three_mpi_ranks_every_op() {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "3"])
        .arg(exe)
        .args(["--exact", "mpi_child", "--nocapture", "--test-threads=1"])
        .env("RUSTSPEED_MPI_TEST_CHILD", "1")
        .env("RUSTSPEED_COMM_BACKEND", "mpi")
        .output()
        .expect("mpirun (apt install openmpi-bin) must be on PATH for the mpi feature's tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for r in 0..3 {
        assert!(stdout.contains(&format!("mpi rank {r} ok")), "{stdout}");
    }
}
