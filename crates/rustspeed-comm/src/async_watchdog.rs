//! The watchdog for backends whose collectives run asynchronously on a device (NCCL): the host
//! queues a collective and goes on, so nothing blocks where a hang could be noticed. Each
//! queued collective is recorded with a completion probe (a CUDA event); `wait_all` polls the
//! probes and, past the timeout, fails with the message the shm watchdog gives: the operation,
//! its size and sequence number, and the ranks that did not arrive.
//!
//! Who did not arrive: every rank publishes, in the rendezvous store, how many collectives it
//! has queued (once per `wait_all`, a counter the store adds to, so reading it never blocks).
//! A rank whose count is below the stuck collective's sequence number never queued it.
//! Kept free of CUDA so that it is tested on every machine.

use std::time::{Duration, Instant};

use crate::error::{CommError, ErrorKind, Result};
use crate::shm::human_bytes;
use crate::store::Store;

/// One queued collective.
#[derive(Clone, Debug)]
pub struct QueuedOp {
    pub name: &'static str,
    /// 1-based position among this rank's collectives.
    pub seq: u64,
    pub count: usize,
    pub elem_bytes: usize,
    pub dtype: &'static str,
    pub queued_at: Instant,
}

impl QueuedOp {
    pub fn describe(&self) -> String {
        format!(
            "{} #{} of {} {} elements ({})",
            self.name,
            self.seq,
            self.count,
            self.dtype,
            human_bytes(self.count * self.elem_bytes)
        )
    }
}

/// Where ranks publish how many collectives they queued.
pub struct Progress<'a> {
    pub store: &'a Store,
    /// Distinguishes communicators (every rank uses the same prefix).
    pub prefix: String,
    pub rank: usize,
    pub world: usize,
}

impl Progress<'_> {
    fn key(&self, rank: usize) -> String {
        format!("{}/queued/{rank}", self.prefix)
    }

    /// Raises this rank's published count to `queued` (it only grows).
    pub fn publish(&self, queued: u64, published: &mut u64) -> Result<()> {
        if queued > *published {
            self.store
                .add(&self.key(self.rank), (queued - *published) as i64)?;
            *published = queued;
        }
        Ok(())
    }

    /// Every other rank's published count (without waiting).
    fn counts(&self) -> Vec<(usize, u64)> {
        (0..self.world)
            .filter(|&r| r != self.rank)
            .map(|r| {
                (
                    r,
                    self.store.add(&self.key(r), 0).unwrap_or(0).max(0) as u64,
                )
            })
            .collect()
    }
}

/// Polls `done(i)` for every op in `ops` until all finished. Past `timeout` from the oldest
/// unfinished op's queueing it returns the watchdog error (the caller then aborts the
/// communicator, so every later call fails too). `done` errors (a device fault) end the wait.
pub fn wait_all(
    ops: &[QueuedOp],
    mut done: impl FnMut(usize) -> Result<bool>,
    timeout: Duration,
    progress: &Progress<'_>,
) -> Result<()> {
    let mut first_open = 0;
    let mut nap = Duration::from_micros(20);
    while first_open < ops.len() {
        if done(first_open)? {
            first_open += 1;
            nap = Duration::from_micros(20);
            continue;
        }
        let op = &ops[first_open];
        if op.queued_at.elapsed() >= timeout {
            return Err(timed_out(op, timeout, progress));
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(5));
    }
    Ok(())
}

fn timed_out(op: &QueuedOp, timeout: Duration, progress: &Progress<'_>) -> CommError {
    let counts = progress.counts();
    let missing: Vec<usize> = counts
        .iter()
        .filter(|(_, n)| *n < op.seq)
        .map(|(r, _)| *r)
        .collect();
    let doing: Vec<String> = counts
        .iter()
        .filter(|(_, n)| *n < op.seq)
        .map(|(r, n)| format!("rank {r} queued {n} collectives"))
        .collect();
    let who = if missing.is_empty() {
        "every rank queued it; the collective itself is stuck (a device or network fault?)"
            .to_string()
    } else {
        format!(
            "ranks that did not arrive: {missing:?} ({})",
            doing.join("; ")
        )
    };
    CommError::new(
        ErrorKind::Timeout,
        format!(
            "rustspeed-comm watchdog: NCCL {} did not finish within {:.1}s on rank {} of {}; {who}; \
             the communicator is aborted; RUSTSPEED_COMM_TIMEOUT=<seconds> changes the limit",
            op.describe(),
            timeout.as_secs_f64(),
            progress.rank,
            progress.world
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(store: &Store, rank: usize, world: usize) -> Progress<'_> {
        Progress {
            store,
            prefix: "comm7".into(),
            rank,
            world,
        }
    }

    fn op(seq: u64) -> QueuedOp {
        QueuedOp {
            name: "all_reduce(sum)",
            seq,
            count: 1 << 20,
            elem_bytes: 4,
            dtype: "f32",
            queued_at: Instant::now(),
        }
    }

    #[test]
    fn finished_ops_return_at_once() {
        let store = Store::local_server(Duration::from_secs(5)).unwrap();
        let p = progress(&store, 0, 2);
        let mut polls = 0;
        let ops = [op(1), op(2)];
        wait_all(
            &ops,
            |_| {
                polls += 1;
                Ok(polls > 3)
            },
            Duration::from_secs(5),
            &p,
        )
        .unwrap();
    }

    /// Rank 0 queued 3 collectives, rank 1 only 2, rank 2 all 3: the third one times out on
    /// rank 0 naming it, its size, and rank 1 as missing.
    #[test]
    fn a_stuck_collective_names_op_size_and_missing_ranks() {
        let store = Store::local_server(Duration::from_secs(5)).unwrap();
        let progress = |rank| progress(&store, rank, 3);
        let (mut p0, mut p1, mut p2) = (0, 0, 0);
        progress(0).publish(3, &mut p0).unwrap();
        progress(1).publish(2, &mut p1).unwrap();
        progress(2).publish(1, &mut p2).unwrap();
        progress(2).publish(3, &mut p2).unwrap();
        assert_eq!(p2, 3);
        let ops = [op(2), op(3)];
        let t0 = Instant::now();
        let e = wait_all(
            &ops,
            |i| Ok(i == 0),
            Duration::from_millis(200),
            &progress(0),
        )
        .unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(200));
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "fails soon after the timeout"
        );
        assert_eq!(e.kind, ErrorKind::Timeout);
        assert!(
            e.message
                .contains("NCCL all_reduce(sum) #3 of 1048576 f32 elements (4.00 MiB)"),
            "{e}"
        );
        assert!(e.message.contains("rank 0 of 3"), "{e}");
        assert!(
            e.message
                .contains("ranks that did not arrive: [1] (rank 1 queued 2 collectives)"),
            "{e}"
        );
    }

    #[test]
    fn device_errors_end_the_wait() {
        let store = Store::local_server(Duration::from_secs(5)).unwrap();
        let p = progress(&store, 0, 2);
        let e = wait_all(
            &[op(1)],
            |_| {
                Err(CommError::new(
                    ErrorKind::Setup,
                    "CUDA error: illegal address",
                ))
            },
            Duration::from_secs(60),
            &p,
        )
        .unwrap_err();
        assert!(e.message.contains("illegal address"));
    }
}
