//! Stage 3's parameter fetching over one forward + backward, as DeepSpeed's
//! `PartitionedParameterCoordinator`, at the granularity of a layer.
//!
//! The trace of a step is known in advance: layers 0..last in forward, the head (forward and
//! backward fused), then layers last-1..0 in backward. At each position:
//! - the layer is taken from the live set (kept from an earlier use), from the prefetch queue,
//!   or gathered on the spot;
//! - prefetch (`stage3_prefetch_bucket_size` > 0) starts the gathers of the next layers of the
//!   trace that are not live, while the elements started in this call stay below
//!   min(prefetch_bucket_size, max_live_parameters - live elements) — DeepSpeed's rule, so at
//!   least one layer is prefetched when the budget is positive;
//! - after the layer ran it is released unless it is used again within
//!   `stage3_max_reuse_distance` elements of the trace (counting every layer's gathered
//!   elements walked over from the next position), or prefetch already walked past its next
//!   use (DeepSpeed keeps those too, or the use would find nothing).
//!
//! With DeepSpeed's defaults (1e9 each) a model under a billion parameters keeps every layer it
//! gathered in forward until its backward, exactly as DeepSpeed does; lower
//! `stage3_max_reuse_distance` / `stage3_max_live_parameters` trade re-gathering for memory.
//! Every rank takes the same decisions (they depend on sizes only), so the collectives match.

use std::collections::VecDeque;

use rustspeed_comm::CommError;
use rustspeed_kernels::Float;

use super::zero3::{Gathered, InFlight, Zero3};

/// The knobs, in elements.
#[derive(Clone, Copy, Debug)]
pub struct FetchConfig {
    pub prefetch_bucket: u64,
    pub max_live: u64,
    pub max_reuse_distance: u64,
}

/// What fetching did, for tests and reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Layer gathers started (each one all-gather).
    pub gathers: u64,
    /// The most elements gathered whole at once (live, in use and in flight).
    pub peak_live: u64,
}

/// State of one step's trace; lives from the forward's start to the backward's end.
pub(super) struct Fetcher<T> {
    cfg: FetchConfig,
    /// Layer of each trace position.
    trace: Vec<usize>,
    /// Gathered elements of each layer.
    numel: Vec<u64>,
    live: Vec<Option<Gathered<T>>>,
    queue: VecDeque<InFlight<T>>,
    /// The next trace position prefetch looks at.
    cursor: usize,
    /// Elements live, in use or in flight.
    held: u64,
    pub stats: FetchStats,
}

impl<T: Float> Fetcher<T> {
    pub fn new(cfg: FetchConfig, numel: Vec<u64>) -> Self {
        let n = numel.len();
        let last = n - 1;
        let trace = (0..=last).chain((0..last).rev()).collect();
        Fetcher {
            cfg,
            trace,
            numel,
            live: (0..n).map(|_| None).collect(),
            queue: VecDeque::new(),
            cursor: 0,
            held: 0,
            stats: FetchStats::default(),
        }
    }

    fn start(&mut self, z3: &Zero3<T>, l: usize) -> Result<InFlight<T>, CommError> {
        self.stats.gathers += 1;
        self.held += self.numel[l];
        self.stats.peak_live = self.stats.peak_live.max(self.held);
        z3.start_gather(l)
    }

    /// The parameters of trace position `t`'s layer, gathered whole; then prefetches.
    pub fn take(&mut self, z3: &Zero3<T>, t: usize) -> Result<Gathered<T>, CommError> {
        let l = self.trace[t];
        let g = if let Some(g) = self.live[l].take() {
            g
        } else if self.queue.front().is_some_and(|f| f.layer() == l) {
            let f = self.queue.pop_front().expect("checked");
            z3.finish_gather(f)?
        } else {
            debug_assert!(
                self.queue.iter().all(|f| f.layer() != l),
                "prefetches are consumed in trace order"
            );
            let f = self.start(z3, l)?;
            z3.finish_gather(f)?
        };
        self.cursor = self.cursor.max(t + 1);
        self.prefetch(z3, l)?;
        Ok(g)
    }

    fn prefetch(&mut self, z3: &Zero3<T>, current: usize) -> Result<(), CommError> {
        if self.cfg.prefetch_bucket == 0 {
            return Ok(());
        }
        let budget = self
            .cfg
            .prefetch_bucket
            .min(self.cfg.max_live.saturating_sub(self.held));
        let mut started = 0;
        while self.cursor < self.trace.len() && started < budget {
            let m = self.trace[self.cursor];
            let pending = self.queue.iter().any(|f| f.layer() == m);
            if m != current && self.live[m].is_none() && !pending {
                let f = self.start(z3, m)?;
                self.queue.push_back(f);
                started += self.numel[m];
            }
            self.cursor += 1;
        }
        Ok(())
    }

    /// After trace position `t` used `g`: keep it for a near reuse, or free it.
    pub fn release(&mut self, t: usize, g: Gathered<T>) {
        let l = self.trace[t];
        let next_use = (t + 1..self.trace.len()).find(|&u| self.trace[u] == l);
        let keep = next_use.is_some_and(|u| {
            // Prefetch walked past that use (it saw the layer in use and skipped it).
            if u < self.cursor {
                return true;
            }
            // DeepSpeed: walk the trace from the next position until the elements walked over
            // reach the reuse distance; a use seen before that keeps the parameters.
            let mut walked = 0u64;
            for v in t + 1..self.trace.len() {
                if walked >= self.cfg.max_reuse_distance {
                    return false;
                }
                if self.trace[v] == l {
                    return true;
                }
                walked += self.numel[self.trace[v]];
            }
            false
        });
        if keep {
            self.live[l] = Some(g);
        } else {
            self.held -= self.numel[l];
            drop(g);
        }
    }

    /// The step is over: nothing may stay gathered (a forward without its backward, e.g. an
    /// error, also ends here).
    pub fn finish(self) -> FetchStats {
        debug_assert!(self.queue.is_empty(), "every prefetch was used");
        self.stats
    }
}
