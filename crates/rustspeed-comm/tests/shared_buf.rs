//! Collectives over shared buffers (`Communicator::alloc_shared`: peers read each other's
//! buffers in place) against the naive reference, ranks as threads, each with its own
//! communicator and mappings as processes would have: worlds 1-4, uneven sizes, sizes past
//! one reduction window, f32/bf16, reuse of one buffer over many calls, a buffer from another
//! communicator (falls back to the copying path), and a mismatch with the ordinary calls.

use std::time::Duration;

use half::bf16;
use rustspeed_comm::elem::reduce_reference;
use rustspeed_comm::{
    partition_len, partition_range, CommConfig, Communicator, Elem, ErrorKind, ReduceOp,
};

fn run<R: Send>(world: usize, f: impl Fn(&Communicator) -> R + Sync) -> Vec<R> {
    let cfg = CommConfig {
        timeout: Duration::from_secs(60),
        ..CommConfig::default()
    };
    let comms = Communicator::local_group(world, cfg).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = comms.iter().map(|c| s.spawn(|| f(c))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn data<T: Elem>(rank: usize, n: usize, salt: usize) -> Vec<T> {
    let f: Vec<f32> = (0..n)
        .map(|i| ((i * 2654435761 + rank * 97 + salt * 13) % 1000) as f32 * 0.0137 - 6.1)
        .collect();
    let mut out = vec![T::default(); n];
    T::narrow(&f, &mut out);
    out
}

const SIZES: &[usize] = &[0, 1, 3, 7, 1000, 4099, 200_003];

fn check<T: Elem + PartialEq + std::fmt::Debug>(world: usize) {
    run(world, |comm| {
        let (ws, me) = (comm.world_size(), comm.rank());
        for &n in SIZES {
            // One buffer serves every call below: the mapping is set up once.
            let mut buf = comm.alloc_shared::<T>(n).unwrap();
            assert_eq!(buf.is_mapped(), ws > 1);
            assert!(buf.iter().all(|x| *x == T::default()), "starts zeroed");
            for (salt, op) in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max]
                .into_iter()
                .enumerate()
            {
                let inputs: Vec<Vec<T>> = (0..ws).map(|r| data::<T>(r, n, salt)).collect();
                let want = reduce_reference(&inputs, op);
                buf.copy_from_slice(&inputs[me]);
                let c = partition_len(n, ws);
                let mut out = vec![T::default(); c];
                comm.reduce_scatter_shared(&buf, &mut out, op).unwrap();
                let mine = partition_range(n, ws, me);
                let mut piece = vec![T::default(); c];
                piece[..mine.len()].copy_from_slice(&want[mine.clone()]);
                assert_eq!(
                    out, piece,
                    "reduce_scatter_shared {op:?} n={n} ws={ws} rank={me}"
                );
                // Rewrite only my piece (as an optimizer step would), gather the rest.
                buf.fill(T::default());
                let len = mine.len();
                buf[mine].copy_from_slice(&out[..len]);
                comm.all_gather_shared(&mut buf).unwrap();
                assert_eq!(
                    &buf[..],
                    &want[..],
                    "all_gather_shared n={n} ws={ws} rank={me}"
                );
                buf.copy_from_slice(&inputs[me]);
                comm.all_reduce_shared(&mut buf, op).unwrap();
                assert_eq!(
                    &buf[..],
                    &want[..],
                    "all_reduce_shared {op:?} n={n} ws={ws}"
                );
            }
        }
    });
}

#[test]
fn f32_shared_collectives_world_1_to_4() {
    for world in 1..=4 {
        check::<f32>(world);
    }
}

#[test]
fn bf16_shared_collectives_world_3() {
    check::<bf16>(3);
}

#[test]
fn a_buffer_of_another_communicator_takes_the_copying_path() {
    // Two groups over the same ranks; buffers of group A used with group B still work.
    let a = Communicator::local_group(2, CommConfig::default()).unwrap();
    let b = Communicator::local_group(2, CommConfig::default()).unwrap();
    std::thread::scope(|s| {
        for (ca, cb) in a.iter().zip(&b) {
            s.spawn(move || {
                let me = ca.rank();
                let mut buf = ca.alloc_shared::<f32>(11).unwrap();
                let mine = partition_range(11, 2, me);
                buf[mine].fill(me as f32 + 1.0);
                cb.all_gather_shared(&mut buf).unwrap();
                let want: Vec<f32> = (0..11).map(|i| if i < 6 { 1.0 } else { 2.0 }).collect();
                assert_eq!(&buf[..], &want[..]);
            });
        }
    });
}

#[test]
fn shared_and_ordinary_calls_do_not_match() {
    let errs = run(2, |comm| {
        let mut buf = comm.alloc_shared::<f32>(100).unwrap();
        let r = if comm.rank() == 0 {
            comm.all_gather_shared(&mut buf)
        } else {
            comm.all_gather(&buf[50..], &mut vec![0f32; 100])
        };
        r.unwrap_err()
    });
    for e in &errs {
        assert!(
            matches!(e.kind, ErrorKind::Mismatch | ErrorKind::Aborted),
            "{e}"
        );
        assert!(e.message.contains("all_gather_shared #1 of 100 f32"), "{e}");
    }
}
