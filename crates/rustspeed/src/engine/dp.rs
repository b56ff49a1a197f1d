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

/// How gradients are combined over ranks, as DeepSpeed's `allreduce_bucket`: by default the
/// collective's own mean or sum (`gradient_allreduce_op`); with `prescale_gradients` each rank
/// divides by the world size first and the ranks sum; with `gradient_predivide_factor` f each
/// rank divides by f, the ranks sum, and a mean multiplies by f / world after. In exact
/// arithmetic all give the mean (or the sum / f); they differ in rounding and in the range the
/// values take on the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradReduce {
    pub op: ReduceOp,
    pub pre: f32,
    pub post: f32,
}

impl GradReduce {
    pub fn new(mean: bool, prescale: bool, predivide: f64, world: usize) -> GradReduce {
        let w = world as f64;
        if prescale {
            GradReduce {
                op: ReduceOp::Sum,
                pre: (1.0 / w) as f32,
                post: 1.0,
            }
        } else if predivide != 1.0 {
            GradReduce {
                op: ReduceOp::Sum,
                pre: (1.0 / predivide) as f32,
                post: if mean && predivide != w {
                    (predivide / w) as f32
                } else {
                    1.0
                },
            }
        } else {
            GradReduce {
                op: if mean { ReduceOp::Mean } else { ReduceOp::Sum },
                pre: 1.0,
                post: 1.0,
            }
        }
    }

    /// Before the collective, on this rank's contribution.
    pub fn scale_before(&self, g: &mut [f32]) {
        scale(g, self.pre);
    }

    /// After the collective, on the reduced values.
    pub fn scale_after(&self, g: &mut [f32]) {
        scale(g, self.post);
    }
}

fn scale(g: &mut [f32], by: f32) {
    if by != 1.0 {
        g.iter_mut().for_each(|x| *x *= by);
    }
}

/// DeepSpeed's `reduce_scatter`, `allgather_partitions` and `allgather_bucket_size`.
#[derive(Clone, Copy, Debug)]
pub struct Exchange {
    /// Gradients reduce-scattered to their owners (false: all-reduced, each rank keeping its
    /// part).
    pub reduce_scatter: bool,
    /// Updated partitions all-gathered (false: each owner broadcasts its own).
    pub allgather_partitions: bool,
    /// Elements of the full buffer gathered per round (`allgather_bucket_size`).
    pub allgather_bucket: usize,
}

impl Default for Exchange {
    fn default() -> Self {
        Exchange {
            reduce_scatter: true,
            allgather_partitions: true,
            allgather_bucket: 500_000_000,
        }
    }
}

pub struct DataParallel {
    pub comm: Arc<Communicator>,
    pub stage: u8,
    pub reduce: GradReduce,
    pub exchange: Exchange,
    /// The flat buffer's length after padding (the whole length at stage 0).
    pub padded: usize,
}

impl DataParallel {
    pub fn new(
        comm: Arc<Communicator>,
        stage: u8,
        reduce: GradReduce,
        exchange: Exchange,
        numel: usize,
    ) -> Self {
        let world = comm.world_size();
        let padded = if stage >= 1 {
            aligned_len(numel, 2 * world)
        } else {
            numel
        };
        DataParallel {
            comm,
            stage,
            reduce,
            exchange,
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
        let r = self.reduce;
        if self.stage == 0 {
            r.scale_before(&mut grads[..numel]);
            self.comm.all_reduce(&mut grads[..numel], r.op)?;
            r.scale_after(&mut grads[..numel]);
            return Ok(());
        }
        let piece = self.padded / self.world();
        let lo = self.rank() * piece;
        r.scale_before(&mut grads[..self.padded]);
        if self.exchange.reduce_scatter {
            let mut mine = vec![0f32; piece];
            self.comm
                .reduce_scatter(&grads[..self.padded], &mut mine, r.op)?;
            grads[lo..lo + piece].copy_from_slice(&mine);
        } else {
            self.comm.all_reduce(&mut grads[..self.padded], r.op)?;
        }
        r.scale_after(&mut grads[lo..lo + piece]);
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
        // Round by round, `allgather_bucket_size` elements of the whole buffer at a time
        // (a piece of `q` from every rank).
        let ws = self.world();
        let q = (self.exchange.allgather_bucket / ws).clamp(1, piece.max(1));
        let mut all = vec![0f32; q * ws];
        let mut off = 0;
        while off < piece {
            let len = q.min(piece - off);
            let round = &mut all[..len * ws];
            if self.exchange.allgather_partitions {
                self.comm.all_gather(&send[off..off + len], round)?;
            } else {
                for r in 0..ws {
                    let dst = &mut round[r * len..(r + 1) * len];
                    if r == self.rank() {
                        dst.copy_from_slice(&send[off..off + len]);
                    }
                    self.comm.broadcast(dst, r)?;
                }
            }
            // Rank r's elements [off, off + len) of its piece are flat [r·piece + off, ..).
            for r in 0..ws {
                let lo = r * piece + off;
                let window = lo.min(flat.numel)..(lo + len).min(flat.numel);
                for (_, f, m) in flat.pieces(window) {
                    let src = &round[r * len + f.start - lo..r * len + f.end - lo];
                    for (d, s) in params[m].iter_mut().zip(src) {
                        *d = T::from_f32(*s);
                    }
                }
            }
            off += len;
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
