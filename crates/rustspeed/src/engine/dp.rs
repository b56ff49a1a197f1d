//! Data parallelism over ranks: what ZeRO stages 0-2 exchange at an optimizer step.
//!
//! At stages 0-1 every rank runs forward/backward on its share of the global batch into a
//! full-size fp32 gradient buffer. At the accumulation boundary:
//! - stage 0: the gradients are all-reduced; every rank steps the whole flat buffer;
//! - stages 1 and 2: the flat buffer is padded to a multiple of `2 * world` (DeepSpeed's
//!   `nccl_start_alignment_factor` rule, REFERENCE §1.7) and cut into equal pieces; gradients are
//!   reduce-scattered so each rank gets its piece, each rank steps only its piece (fp32 master and
//!   optimizer state are allocated for it alone), and the updated weights are all-gathered.
//!
//! Stages 2 and 3 reduce gradients layer by layer during backward instead (`zero2.rs`,
//! `zero3.rs`) and use this only for the partition rule and the scalar reductions (norm, loss,
//! counts).

use std::ops::Range;
use std::sync::Arc;

use rustspeed_comm::{aligned_len, Communicator, ReduceOp};
use rustspeed_kernels::Float;

use crate::optimizer::FlatLayout;

pub struct DataParallel {
    pub comm: Arc<Communicator>,
    pub stage: u8,
    /// `mean` or `sum` (`gradient_allreduce_op`).
    pub op: ReduceOp,
    /// The flat buffer's length after padding (the whole length at stage 0).
    pub padded: usize,
}

impl DataParallel {
    pub fn new(comm: Arc<Communicator>, stage: u8, op: ReduceOp, numel: usize) -> Self {
        let world = comm.world_size();
        let padded = if stage >= 1 {
            aligned_len(numel, 2 * world)
        } else {
            numel
        };
        DataParallel {
            comm,
            stage,
            op,
            padded,
        }
    }

    pub fn world(&self) -> usize {
        self.comm.world_size()
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// This rank's range of the flat buffer (without the padding).
    pub fn partition(&self, numel: usize) -> Range<usize> {
        if self.stage == 0 {
            return 0..numel;
        }
        let piece = self.padded / self.world();
        let lo = (self.rank() * piece).min(numel);
        lo..((self.rank() + 1) * piece).min(numel)
    }

    /// Reduces the gradients over ranks; afterwards `grads[partition]` holds the reduced
    /// values (the rest is stale at stages 1-2). `grads` has `padded` elements.
    pub fn reduce_grads(
        &self,
        grads: &mut [f32],
        numel: usize,
    ) -> Result<(), rustspeed_comm::CommError> {
        if self.stage == 0 {
            return self.comm.all_reduce(&mut grads[..numel], self.op);
        }
        let piece = self.padded / self.world();
        let mut mine = vec![0f32; piece];
        self.comm
            .reduce_scatter(&grads[..self.padded], &mut mine, self.op)?;
        let lo = self.rank() * piece;
        grads[lo..lo + piece].copy_from_slice(&mine);
        Ok(())
    }

    /// The global sum of squares from each rank's partial one, summed in rank order in f64
    /// so every rank gets the same value (each f64 travels as two f32s: high and low part).
    pub fn global_sum_sq(&self, local: f64) -> Result<f64, rustspeed_comm::CommError> {
        if self.stage == 0 {
            return Ok(local);
        }
        let hi = local as f32;
        let lo = (local - hi as f64) as f32;
        let mut all = vec![0f32; 2 * self.world()];
        self.comm.all_gather(&[hi, lo], &mut all)?;
        Ok(all.chunks(2).map(|p| p[0] as f64 + p[1] as f64).sum())
    }

    /// After each rank stepped its partition: every rank gets every partition's updated
    /// compute weights (in f32 on the wire, exact for bf16/f16 values).
    pub fn gather_params<T: Float>(
        &self,
        flat: &FlatLayout,
        params: &mut [T],
    ) -> Result<(), rustspeed_comm::CommError> {
        if self.stage == 0 {
            return Ok(());
        }
        let piece = self.padded / self.world();
        let mine = self.partition(flat.numel);
        let mut send = vec![0f32; piece];
        for (_, f, m) in flat.pieces(mine.clone()) {
            for (d, s) in send[f.start - mine.start..f.end - mine.start]
                .iter_mut()
                .zip(&params[m])
            {
                *d = s.to_f32();
            }
        }
        let mut all = vec![0f32; self.padded];
        self.comm.all_gather(&send, &mut all)?;
        for (_, f, m) in flat.pieces(0..flat.numel) {
            for (d, s) in params[m].iter_mut().zip(&all[f]) {
                *d = T::from_f32(*s);
            }
        }
        Ok(())
    }

    /// Mean over ranks of one value per rank (the step's loss).
    pub fn mean(&self, x: f64) -> Result<f64, rustspeed_comm::CommError> {
        let mut v = [x as f32];
        self.comm.all_reduce(&mut v, ReduceOp::Mean)?;
        Ok(v[0] as f64)
    }

    /// Maximum over ranks (micro-batches of a partial step).
    pub fn max(&self, x: u64) -> Result<u64, rustspeed_comm::CommError> {
        let mut v = [x as f32];
        self.comm.all_reduce(&mut v, ReduceOp::Max)?;
        Ok(v[0].round() as u64)
    }

    /// Sum over ranks (samples of a partial step).
    pub fn sum(&self, x: u64) -> Result<u64, rustspeed_comm::CommError> {
        let mut v = [x as f32];
        self.comm.all_reduce(&mut v, ReduceOp::Sum)?;
        Ok(v[0].round() as u64)
    }
}
