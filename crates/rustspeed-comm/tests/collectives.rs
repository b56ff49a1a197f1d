//! Every collective against a naive reference, ranks as threads (each with its own
//! communicator, store connection and mapping, exactly as processes would have), for world
//! sizes 1-4, uneven sizes, f32/bf16/f16, tiny shared halves (many pipelined rounds), the
//! non-blocking scope, mismatches and the watchdog.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use half::{bf16, f16};
use rustspeed_comm::elem::reduce_reference;
use rustspeed_comm::{partition_len, CommConfig, Communicator, Elem, ErrorKind, ReduceOp, Store};

/// Runs `f(rank, comm)` on `world` threads; returns their results in rank order.
fn run<R: Send>(world: usize, cfg: CommConfig, f: impl Fn(&Communicator) -> R + Sync) -> Vec<R> {
    let comms = Communicator::local_group(world, cfg).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = comms.iter().map(|c| s.spawn(|| f(c))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn small(half_bytes: usize) -> CommConfig {
    CommConfig {
        timeout: Duration::from_secs(60),
        shm_half_bytes: half_bytes,
        ..CommConfig::default()
    }
}

/// The same with the single-copy path (process_vm_readv; off by default).
fn single_copy(half_bytes: usize) -> CommConfig {
    CommConfig {
        shm_single_copy: true,
        ..small(half_bytes)
    }
}

/// Deterministic, rank-dependent values with fractional parts (so summation order matters
/// in 16-bit types and the test would see a different order).
fn data<T: Elem>(rank: usize, n: usize, salt: usize) -> Vec<T> {
    let f: Vec<f32> = (0..n)
        .map(|i| {
            let x = ((i * 2654435761 + rank * 97 + salt * 13) % 1000) as f32;
            x * 0.0137 - 6.1 + rank as f32 * 0.5
        })
        .collect();
    let mut out = vec![T::default(); n];
    T::narrow(&f, &mut out);
    out
}

fn check_all<T: Elem + PartialEq + std::fmt::Debug>(
    world: usize,
    half_bytes: usize,
    sizes: &[usize],
) {
    check_all_cfg::<T>(world, small(half_bytes), sizes);
    check_all_cfg::<T>(world, single_copy(half_bytes), sizes);
}

fn check_all_cfg<T: Elem + PartialEq + std::fmt::Debug>(
    world: usize,
    cfg: CommConfig,
    sizes: &[usize],
) {
    run(world, cfg, |comm| {
        let (ws, me) = (comm.world_size(), comm.rank());
        for (salt, &n) in sizes.iter().enumerate() {
            let inputs: Vec<Vec<T>> = (0..ws).map(|r| data::<T>(r, n, salt)).collect();
            for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
                let want = reduce_reference(&inputs, op);
                // all_reduce
                let mut buf = inputs[me].clone();
                comm.all_reduce(&mut buf, op).unwrap();
                assert_eq!(buf, want, "all_reduce {op:?} n={n} ws={ws} rank={me}");
                // reduce_scatter: my padded piece of the reduced buffer
                let c = partition_len(n, ws);
                let mut out = vec![T::default(); c];
                comm.reduce_scatter(&inputs[me], &mut out, op).unwrap();
                let mut piece = vec![T::default(); c];
                for (j, p) in piece.iter_mut().enumerate() {
                    if me * c + j < n {
                        *p = want[me * c + j];
                    }
                }
                assert_eq!(out, piece, "reduce_scatter {op:?} n={n} ws={ws} rank={me}");
            }
            // all_gather: every rank contributes its piece of inputs[rank]
            let c = partition_len(n, ws);
            let mine: Vec<T> = (0..c)
                .map(|j| inputs[me].get(me * c + j).copied().unwrap_or_default())
                .collect();
            let mut out = vec![T::default(); n];
            comm.all_gather(&mine, &mut out).unwrap();
            let want: Vec<T> = (0..n).map(|i| inputs[i / c.max(1)][i]).collect();
            assert_eq!(out, want, "all_gather n={n} ws={ws} rank={me}");
            // broadcast from every root
            for root in 0..ws {
                let mut buf = inputs[me].clone();
                comm.broadcast(&mut buf, root).unwrap();
                assert_eq!(buf, inputs[root], "broadcast root={root} n={n} ws={ws}");
            }
            comm.barrier().unwrap();
        }
    });
}

const SIZES: &[usize] = &[0, 1, 3, 5, 7, 64, 1000, 4099, 30_011];

#[test]
fn f32_every_op_world_1_to_4() {
    for world in 1..=4 {
        check_all::<f32>(world, 4096, SIZES);
    }
}

#[test]
fn bf16_every_op_world_1_to_4() {
    for world in 1..=4 {
        check_all::<bf16>(world, 4096, SIZES);
    }
}

#[test]
fn f16_world_3() {
    check_all::<f16>(3, 4096, &[0, 5, 1000, 9001]);
}

#[test]
fn large_buffers_default_halves() {
    // Several pipelined rounds with the default 1 MiB halves.
    check_all::<f32>(
        2,
        rustspeed_comm::shm::DEFAULT_HALF_BYTES,
        &[1 << 20, (3 << 19) + 7],
    );
    check_all::<bf16>(3, rustspeed_comm::shm::DEFAULT_HALF_BYTES, &[(1 << 20) + 1]);
}

#[test]
fn bf16_sums_in_f32_not_in_bf16() {
    // 256 + 1 + 1 (+ 1): bf16 has 8 bits of mantissa, so a bf16 running sum would stay at 256.
    let got = run(4, small(4096), |comm| {
        let v = if comm.rank() == 0 { 256.0 } else { 1.0 };
        let mut buf = vec![bf16::from_f32(v); 3];
        comm.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
        buf[0].to_f32()
    });
    assert_eq!(got, vec![260.0; 4]);
}

#[test]
fn send_recv_pairs_and_large_messages() {
    run(3, small(4096), |comm| {
        let me = comm.rank();
        // A ring: each rank sends to the next and receives from the previous, 3 messages,
        // one larger than the p2p ring so it streams.
        for (k, n) in [0usize, 17, 300_000].into_iter().enumerate() {
            let next = (me + 1) % 3;
            let prev = (me + 2) % 3;
            let out = data::<f32>(me, n, k);
            std::thread::scope(|s| {
                s.spawn(|| comm.send(&out, next).unwrap());
                let mut got = vec![0f32; n];
                comm.recv(&mut got, prev).unwrap();
                assert_eq!(got, data::<f32>(prev, n, k));
            });
        }
        let e = comm.send(&[1f32], me).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
    });
}

#[test]
fn recv_of_wrong_size_is_a_mismatch() {
    let errs = run(2, small(4096), |comm| {
        if comm.rank() == 0 {
            comm.send(&[1f32; 10], 1).map(|_| ())
        } else {
            let mut b = [0f32; 12];
            comm.recv(&mut b, 0)
        }
    });
    let e = errs[1].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Mismatch);
    assert!(
        e.message.contains("12 f32") && e.message.contains("sent 10 f32"),
        "{e}"
    );
}

#[test]
fn non_blocking_calls_return_at_once_and_overlap() {
    let n = 1 << 20;
    run(2, CommConfig::default(), |comm| {
        let me = comm.rank();
        let mut a = data::<f32>(me, n, 1);
        let mut b = data::<bf16>(me, n, 2);
        let (wa, wb) = (
            reduce_reference(&[data::<f32>(0, n, 1), data::<f32>(1, n, 1)], ReduceOp::Sum),
            reduce_reference(
                &[data::<bf16>(0, n, 2), data::<bf16>(1, n, 2)],
                ReduceOp::Mean,
            ),
        );
        if me == 1 {
            // Rank 0's collectives cannot complete before rank 1 joins.
            std::thread::sleep(Duration::from_millis(700));
        }
        let mut busy = 0u64;
        comm.scope(|s| {
            let t0 = Instant::now();
            let ha = s.all_reduce(&mut a, ReduceOp::Sum).unwrap();
            let hb = s.all_reduce(&mut b, ReduceOp::Mean).unwrap();
            let issued = t0.elapsed();
            assert!(
                issued < Duration::from_millis(100),
                "issuing took {issued:?}"
            );
            if me == 0 {
                assert!(!ha.is_done(), "finished without rank 1");
            }
            // "Backward of the next layer": compute while the reductions travel.
            while !hb.is_done() {
                busy = busy.wrapping_add(1);
                std::hint::spin_loop();
            }
            assert_eq!(ha.wait().unwrap(), &wa[..]);
            assert_eq!(hb.wait().unwrap(), &wb[..]);
        });
        if me == 0 {
            assert!(busy > 0, "rank 0 never computed while waiting");
        }
    });
}

#[test]
fn non_blocking_reduce_scatter_then_all_gather_is_all_reduce() {
    // ZeRO-2's pattern: reduce-scatter buckets as layers finish, then all-gather updated params.
    run(3, small(8192), |comm| {
        let (ws, me) = (3, comm.rank());
        let buckets: Vec<Vec<f32>> = (0..4).map(|k| data::<f32>(me, 1000 + k * 333, k)).collect();
        let mut outs: Vec<Vec<f32>> = buckets
            .iter()
            .map(|b| vec![0f32; partition_len(b.len(), ws)])
            .collect();
        comm.scope(|s| {
            let hs: Vec<_> = buckets
                .iter()
                .zip(outs.iter_mut())
                .map(|(b, o)| s.reduce_scatter(b, o, ReduceOp::Sum).unwrap())
                .collect();
            for h in hs {
                h.wait().unwrap();
            }
        });
        for (k, (b, o)) in buckets.iter().zip(&outs).enumerate() {
            let mut full = vec![0f32; b.len()];
            comm.all_gather(o, &mut full).unwrap();
            let inputs: Vec<Vec<f32>> = (0..ws).map(|r| data::<f32>(r, b.len(), k)).collect();
            assert_eq!(full, reduce_reference(&inputs, ReduceOp::Sum));
        }
    });
}

#[test]
fn wrong_lengths_are_rejected_before_communicating() {
    run(2, small(4096), |comm| {
        let mut out = vec![0f32; 3];
        let e = comm
            .reduce_scatter(&[0f32; 10], &mut out, ReduceOp::Sum)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("expected ceil(10/2) = 5"), "{e}");
        let e = comm.all_gather(&[0f32; 4], &mut [0f32; 10]).unwrap_err();
        assert!(e.message.contains("ceil(10/2) = 5"), "{e}");
        // The communicator still works afterwards.
        let mut x = [comm.rank() as f32];
        comm.all_reduce(&mut x, ReduceOp::Sum).unwrap();
        assert_eq!(x, [1.0]);
    });
}

#[test]
fn mismatched_collectives_fail_on_every_rank() {
    let errs = run(2, small(4096), |comm| {
        let mut buf = vec![1f32; 100];
        comm.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
        let r = if comm.rank() == 0 {
            comm.all_reduce(&mut buf, ReduceOp::Sum)
        } else {
            comm.all_gather(&buf[..50], &mut vec![0f32; 100])
        };
        // Broken for good: later calls give the same error instead of hanging.
        let again = comm.barrier();
        (r.unwrap_err(), again.unwrap_err())
    });
    for (e, again) in &errs {
        assert!(
            matches!(e.kind, ErrorKind::Mismatch | ErrorKind::Aborted),
            "{e}"
        );
        assert!(e.message.contains("collective mismatch"), "{e}");
        assert!(e.message.contains("all_reduce(sum) #2 of 100 f32"), "{e}");
        assert!(e.message.contains("all_gather #2 of 100 f32"), "{e}");
        assert_eq!(again.message, e.message);
    }
}

#[test]
fn watchdog_names_op_size_seq_and_missing_rank() {
    let cfg = CommConfig {
        timeout: Duration::from_millis(1500),
        shm_half_bytes: 4096,
        ..CommConfig::default()
    };
    let t0 = Instant::now();
    let errs = run(3, cfg, |comm| {
        comm.barrier().unwrap();
        if comm.rank() == 2 {
            // Never calls the collective, but stays alive well past the others' deadline (no
            // dead-peer shortcut even on a loaded machine).
            std::thread::sleep(Duration::from_millis(4000));
            return None;
        }
        let mut buf = vec![bf16::ONE; 2048];
        Some(comm.all_reduce(&mut buf, ReduceOp::Sum).unwrap_err())
    });
    let elapsed = t0.elapsed();
    for e in errs.iter().take(2).map(|e| e.as_ref().unwrap()) {
        assert!(
            matches!(e.kind, ErrorKind::Timeout | ErrorKind::Aborted),
            "{e}"
        );
        let m = &e.message;
        assert!(
            m.contains("all_reduce(sum) #2 of 2048 bf16 elements (4.0 KiB)"),
            "{m}"
        );
        assert!(m.contains("did not finish within 1.5s"), "{m}");
        assert!(m.contains("ranks that did not arrive: [2]"), "{m}");
        assert!(m.contains("rank 2 last entered barrier #1"), "{m}");
    }
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}

#[test]
fn dropped_rank_is_detected_before_the_timeout() {
    let cfg = CommConfig {
        timeout: Duration::from_secs(60),
        ..small(4096)
    };
    let comms = Communicator::local_group(2, cfg).unwrap();
    let mut it = comms.into_iter();
    let (c0, c1) = (it.next().unwrap(), it.next().unwrap());
    let t0 = Instant::now();
    let gate = Arc::new(Barrier::new(2));
    let g = gate.clone();
    let h = std::thread::spawn(move || {
        g.wait();
        std::thread::sleep(Duration::from_millis(200));
        drop(c1); // e.g. a rank that returned from main early
    });
    gate.wait();
    let e = c0.all_reduce(&mut [1f32; 8], ReduceOp::Sum).unwrap_err();
    h.join().unwrap();
    assert_eq!(e.kind, ErrorKind::PeerDied, "{e}");
    assert!(
        e.message.contains("rank 1") && e.message.contains("closed its communicator"),
        "{e}"
    );
    assert!(e.message.contains("all_reduce(sum) #1 of 8 f32"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn store_set_get_add_wait() {
    let server = Store::local_server(Duration::from_secs(5)).unwrap();
    let port = server.port();
    let client = Store::connect("127.0.0.1", port, false, Duration::from_millis(300)).unwrap();
    server.set("a", b"hello").unwrap();
    assert_eq!(client.get("a").unwrap(), b"hello");
    assert!(client.check("a").unwrap());
    assert!(!client.check("b").unwrap());
    assert_eq!(client.add("n", 2).unwrap(), 2);
    assert_eq!(server.add("n", 3).unwrap(), 5);
    // A get that blocks until another client sets the key.
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        server.set("late", b"x").unwrap();
        server.add("count", 1).unwrap();
        server
    });
    client.wait(&["a", "late"]).unwrap();
    assert_eq!(client.get("late").unwrap(), b"x");
    assert_eq!(client.wait_ge("count", 1, "test").unwrap(), 1);
    let server = t.join().unwrap();
    let e = client.get("never").unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout);
    assert!(e.message.contains("key 'never' was not set within"), "{e}");
    let e = client.wait_ge("count", 3, "ranks joining").unwrap_err();
    assert!(
        e.message
            .contains("ranks joining: only 1 of 3 ranks arrived"),
        "{e}"
    );
    drop(server);
    // Nobody listening: the error names the address and the variables.
    let e = Store::connect("127.0.0.1", port, false, Duration::from_millis(200)).err();
    if let Some(e) = e {
        assert!(e.message.contains("MASTER_ADDR:MASTER_PORT"), "{e}");
    }
}

#[test]
fn different_reduce_ops_are_a_mismatch() {
    let errs = run(2, small(4096), |comm| {
        let op = if comm.rank() == 0 {
            ReduceOp::Sum
        } else {
            ReduceOp::Mean
        };
        comm.all_reduce(&mut [1f32; 4], op).unwrap_err()
    });
    for e in errs {
        assert!(
            e.message.contains("all_reduce(sum) #1") && e.message.contains("all_reduce(mean) #1"),
            "{e}"
        );
    }
}

#[test]
fn communicator_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Communicator>();
    // Two threads of one rank issuing blocking collectives in a fixed order through a mutex
    // would be the caller's job; here: a world of one is usable from anywhere.
    let c = Communicator::single();
    std::thread::scope(|s| {
        s.spawn(|| c.all_reduce(&mut [1f32], ReduceOp::Sum).unwrap());
    });
}

#[test]
fn unscoped_pending_reduce_scatter_over_one_flat_buffer() {
    // The engine's shape: layer ranges of one flat gradient buffer; layer 1's range is reduced
    // while "backward" keeps writing layer 0's range through a raw view of the same buffer.
    run(2, small(4096), |comm| {
        let (ws, me) = (2, comm.rank());
        let (l0, l1) = (3000usize, 5000usize);
        let mut grads: Vec<f32> = data::<f32>(me, l0 + l1, 7);
        let mut part1 = vec![0f32; partition_len(l1, ws)];
        let base = grads.as_mut_ptr();
        // SAFETY: the two views are disjoint; layer 1's view is not touched until wait().
        let (g0, g1) = unsafe {
            (
                std::slice::from_raw_parts_mut(base, l0),
                std::slice::from_raw_parts_mut(base.add(l0), l1),
            )
        };
        let pending = unsafe { comm.start_reduce_scatter(g1, &mut part1, ReduceOp::Sum) }.unwrap();
        g0.iter_mut().for_each(|g| *g *= 2.0); // backward of layer 0
        pending.wait().unwrap();
        let inputs: Vec<Vec<f32>> = (0..ws)
            .map(|r| data::<f32>(r, l0 + l1, 7)[l0..].to_vec())
            .collect();
        let want = reduce_reference(&inputs, ReduceOp::Sum);
        let c = part1.len();
        assert_eq!(part1, want[me * c..(me * c + c).min(l1)]);
        assert_eq!(grads[0], data::<f32>(me, 1, 7)[0] * 2.0);
        // A dropped Pending still completes before the buffers can go away.
        let mut x = [me as f32 + 1.0; 3];
        drop(unsafe { comm.start_all_reduce(&mut x, ReduceOp::Sum) }.unwrap());
        assert_eq!(x, [3.0; 3]);
    });
}
