//! The data order: which sample each optimizer step consumes, per epoch, resumable.
//!
//! Epoch e visits the samples in `permutation(n, SplitMix64::for_stream(seed, e))` order when
//! shuffling, in file order otherwise. A step of global batch B takes the next B positions of
//! the epoch order, so step s of an epoch consumes positions [s*B, (s+1)*B); the last step of an
//! epoch is shorter unless `drop_last` skips it. The cursor's state is saved with the
//! checkpoint, so a resumed run continues with exactly the samples the uninterrupted run would
//! have used.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::rng::{permutation, SplitMix64};
use crate::shard::rank_share;
use crate::DataError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataOrder {
    pub num_samples: usize,
    pub seed: u64,
    pub shuffle: bool,
    /// Skip an epoch's last step when it has fewer than B samples (DeepSpeed's
    /// `dataloader_drop_last`, default false).
    pub drop_last: bool,
}

impl DataOrder {
    /// Sample indices in the order epoch `epoch` visits them.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        if self.shuffle {
            permutation(
                self.num_samples,
                &mut SplitMix64::for_stream(self.seed, epoch),
            )
        } else {
            (0..self.num_samples).collect()
        }
    }

    /// Optimizer steps in one epoch at global batch `global_batch`.
    pub fn steps_per_epoch(&self, global_batch: usize) -> usize {
        assert!(global_batch > 0, "global batch must be positive");
        if self.drop_last {
            self.num_samples / global_batch
        } else {
            self.num_samples.div_ceil(global_batch)
        }
    }
}

/// Where the cursor is: the next step starts at position `index` of epoch `epoch`'s order.
/// This, with the order's parameters, is what a checkpoint stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataState {
    pub order: DataOrder,
    pub epoch: u64,
    pub index: usize,
}

/// The samples of one optimizer step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub epoch: u64,
    /// Positions in the epoch order.
    pub positions: Range<usize>,
    /// Sample indices, in order.
    pub samples: Vec<usize>,
}

impl Step {
    /// The contiguous part of this step's samples that rank `rank` of `world` trains on.
    pub fn for_rank(&self, rank: usize, world: usize) -> &[usize] {
        &self.samples[rank_share(self.samples.len(), rank, world)]
    }
}

#[derive(Debug, Clone)]
pub struct DataCursor {
    order: DataOrder,
    epoch: u64,
    index: usize,
    epoch_order: Vec<usize>,
}

impl DataCursor {
    pub fn new(order: DataOrder) -> DataCursor {
        DataCursor {
            order,
            epoch: 0,
            index: 0,
            epoch_order: order.epoch_order(0),
        }
    }

    /// Continues from a saved state. The data and its order must be the ones the state was
    /// saved with; anything else would silently train on different samples.
    pub fn resume(order: DataOrder, state: DataState) -> Result<DataCursor, DataError> {
        let mismatch = |field: &'static str, saved: String, now: String| {
            DataError::ResumeMismatch { field, saved, now }
        };
        let saved = state.order;
        if saved.num_samples != order.num_samples {
            return Err(mismatch(
                "num_samples",
                saved.num_samples.to_string(),
                order.num_samples.to_string(),
            ));
        }
        if saved.seed != order.seed {
            return Err(mismatch(
                "seed",
                saved.seed.to_string(),
                order.seed.to_string(),
            ));
        }
        if saved.shuffle != order.shuffle {
            return Err(mismatch(
                "shuffle",
                saved.shuffle.to_string(),
                order.shuffle.to_string(),
            ));
        }
        if saved.drop_last != order.drop_last {
            return Err(mismatch(
                "drop_last",
                saved.drop_last.to_string(),
                order.drop_last.to_string(),
            ));
        }
        if state.index > order.num_samples {
            return Err(mismatch(
                "index",
                state.index.to_string(),
                format!("at most {}", order.num_samples),
            ));
        }
        Ok(DataCursor {
            order,
            epoch: state.epoch,
            index: state.index,
            epoch_order: order.epoch_order(state.epoch),
        })
    }

    pub fn state(&self) -> DataState {
        DataState {
            order: self.order,
            epoch: self.epoch,
            index: self.index,
        }
    }

    /// The samples of the next optimizer step; moves to the next epoch when this one is used up.
    pub fn next_step(&mut self, global_batch: usize) -> Step {
        assert!(global_batch > 0, "global batch must be positive");
        assert!(self.order.num_samples > 0, "no samples to iterate");
        let remaining = self.order.num_samples - self.index;
        if remaining == 0 || (self.order.drop_last && remaining < global_batch) {
            self.epoch += 1;
            self.index = 0;
            self.epoch_order = self.order.epoch_order(self.epoch);
            assert!(
                !self.order.drop_last || self.order.num_samples >= global_batch,
                "drop_last with fewer samples ({}) than one global batch ({global_batch})",
                self.order.num_samples
            );
        }
        let start = self.index;
        let end = (start + global_batch).min(self.order.num_samples);
        self.index = end;
        Step {
            epoch: self.epoch,
            positions: start..end,
            samples: self.epoch_order[start..end].to_vec(),
        }
    }
}
