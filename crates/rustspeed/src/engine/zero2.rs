//! ZeRO stage 2 over ranks: gradients partitioned as DeepSpeed's `stage_1_and_2.py` does.
//!
//! The flat trainable buffer is padded to a multiple of `2 * world` and cut into equal
//! partitions (as at stage 1, see `dp.rs`), but no rank keeps a full-size gradient buffer: each
//! layer's own gradients are computed into a transient scratch and, as soon as its backward
//! ends, reduced into the owners' partitions in buckets of `reduce_bucket_size` elements —
//! started without waiting when `overlap_comm`, so the next layer's backward runs meanwhile —
//! and accumulated into a partition-sized fp32 buffer across micro-batches (DeepSpeed stage 2
//! reduces every micro-batch). A tied parameter's gradient from a later layer (the LM head's
//! `wte`) waits in a full-size buffer until its owner's backward, as at stage 3.
//!
//! A bucket `[a, b)` of the flat buffer may span several partitions; it travels as one
//! reduce-scatter whose rank-r piece is the bucket's part inside partition r, zero-padded to
//! the largest such part.

use std::ops::Range;
use std::sync::Arc;

use rustspeed_comm::{CommError, Communicator};
use rustspeed_kernels::Float;
use rustspeed_models::{Ctx, Flow, LossSum, Model};

use super::dp::GradReduce;
use super::zero3::{
    finish_reduce, scratch_len, take_scratch, with_grad_views, ReduceInFlight, Zero3Layout,
};

pub(super) struct Zero2 {
    pub comm: Arc<Communicator>,
    pub reduce: GradReduce,
    /// `reduce_scatter`: false all-reduces each bucket whole, every rank keeping its part.
    pub reduce_scatter: bool,
    /// Only its slot bookkeeping (sizes, flat offsets, layers' own and tied slots) is used.
    pub layout: Zero3Layout,
    /// Elements per partition (padding included).
    pub piece: usize,
    pub bucket: usize,
    pub overlap: bool,
    tied: Vec<Option<Vec<f32>>>,
    head: Option<Vec<f32>>,
}

impl Zero2 {
    pub fn new(
        comm: Arc<Communicator>,
        reduce: GradReduce,
        reduce_scatter: bool,
        layout: Zero3Layout,
        piece: usize,
        bucket: u64,
        overlap: bool,
    ) -> Self {
        let n = layout.slots.len();
        Zero2 {
            comm,
            reduce,
            reduce_scatter,
            layout,
            piece,
            bucket: usize::try_from(bucket).unwrap_or(usize::MAX).max(1),
            overlap,
            tied: vec![None; n],
            head: None,
        }
    }

    /// Layer `l`'s own trainable parameters' range of the flat buffer (contiguous: the flat
    /// buffer is the trainable parameters in model order).
    fn layer_flat(&self, l: usize) -> Option<Range<usize>> {
        let z = &self.layout;
        let own = &z.layer_train[l];
        let first = z.slots[*own.first()?].flat_start?;
        let last = &z.slots[*own.last()?];
        Some(first..last.flat_start? + last.numel)
    }

    /// Starts reducing flat range `bucket` (its values at `scratch[..]`, `scratch` starting at
    /// flat `base`) into the owners' partitions.
    fn start_bucket(
        &self,
        bucket: Range<usize>,
        scratch: &[f32],
        base: usize,
    ) -> Result<ReduceInFlight, CommError> {
        let world = self.comm.world_size();
        let part = |r: usize| {
            let lo = bucket.start.max(r * self.piece);
            lo..bucket.end.min((r + 1) * self.piece).max(lo)
        };
        let mine = part(self.comm.rank());
        let at = if mine.is_empty() {
            0
        } else {
            mine.start - self.comm.rank() * self.piece
        };
        if !self.reduce_scatter {
            let mut out = scratch[bucket.start - base..bucket.end - base].to_vec();
            self.reduce.scale_before(&mut out);
            // SAFETY: `out` moves with the Pending into the ReduceInFlight, which waits before
            // dropping or reading it; moving a Vec does not move its heap buffer.
            let pending = unsafe { self.comm.start_all_reduce(&mut out, self.reduce.op)? };
            return Ok(ReduceInFlight {
                pending: Some(pending),
                _send: Vec::new(),
                from: if mine.is_empty() {
                    0
                } else {
                    mine.start - bucket.start
                },
                out,
                at,
                keep: mine.len(),
                scale: self.reduce.post,
            });
        }
        let m = (0..world).map(|r| part(r).len()).max().unwrap_or(0);
        let mut send = vec![0f32; m * world];
        for r in 0..world {
            let p = part(r);
            if p.is_empty() {
                continue;
            }
            send[r * m..r * m + p.len()].copy_from_slice(&scratch[p.start - base..p.end - base]);
        }
        self.reduce.scale_before(&mut send);
        let mut out = vec![0f32; m];
        // SAFETY: `send` and `out` move with the Pending into the ReduceInFlight, which waits
        // before dropping them (field order) and before reading `out`.
        let pending = unsafe {
            self.comm
                .start_reduce_scatter(&send, &mut out, self.reduce.op)?
        };
        Ok(ReduceInFlight {
            pending: Some(pending),
            _send: send,
            out,
            from: 0,
            at,
            keep: mine.len(),
            scale: self.reduce.post,
        })
    }

    /// Every bucket of layer `l`'s gradients, started.
    fn start_reduce(&self, l: usize, scratch: &[f32]) -> Result<Vec<ReduceInFlight>, CommError> {
        let Some(range) = self.layer_flat(l) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut a = range.start;
        while a < range.end {
            let b = (a + self.bucket).min(range.end);
            out.push(self.start_bucket(a..b, scratch, range.start)?);
            a = b;
        }
        Ok(out)
    }
}

/// One training forward at stage 2 (`ctx: None`: a rank without a micro-batch). The fused head
/// writes its gradients into a scratch kept for [`backward`].
pub(super) fn forward<T: Float>(
    model: &mut Model<T>,
    z2: &mut Zero2,
    ctx: Option<&Ctx>,
) -> Option<LossSum> {
    let last = model.layers.len() - 1;
    let mut scratch = vec![0.0; scratch_len(&z2.layout, last)];
    let mut flow = Flow::default();
    if let Some(ctx) = ctx {
        for i in 0..last {
            let views = model.layout.layer_views(i, &model.params);
            model.layers[i].forward(&views, &mut flow, ctx);
        }
        let views = model.layout.layer_views(last, &model.params);
        let head = &mut model.layers[last];
        let fused = with_grad_views(&z2.layout, &mut z2.tied, last, &mut scratch, |gv| {
            head.forward_backward(&views, gv, &mut flow, ctx)
        });
        if !fused {
            head.forward(&views, &mut flow, ctx);
        }
    }
    z2.head = Some(scratch);
    flow.loss
}

/// The backward matching [`forward`]: each layer's gradients reduced into `grads` (this rank's
/// partition) as soon as its backward ends.
pub(super) fn backward<T: Float>(
    model: &mut Model<T>,
    z2: &mut Zero2,
    grads: &mut [f32],
    ctx: Option<&Ctx>,
) -> Result<(), CommError> {
    let last = model.layers.len() - 1;
    let mut head = Some(z2.head.take().expect("backward follows forward"));
    let mut flow = Flow::default();
    let mut reducing: Vec<ReduceInFlight> = Vec::new();
    for i in (0..=last).rev() {
        let mut scratch = match head.take() {
            Some(s) => s,
            None => take_scratch(&z2.layout, &mut z2.tied, i),
        };
        if let Some(ctx) = ctx {
            let views = model.layout.layer_views(i, &model.params);
            let layer = &mut model.layers[i];
            with_grad_views(&z2.layout, &mut z2.tied, i, &mut scratch, |gv| {
                layer.backward(&views, gv, &mut flow, ctx)
            });
            layer.clear();
        } else {
            with_grad_views(&z2.layout, &mut z2.tied, i, &mut scratch, |_| {});
        }
        for r in reducing.drain(..) {
            r.finish(grads)?;
        }
        reducing = z2.start_reduce(i, &scratch)?;
        if !z2.overlap {
            for r in reducing.drain(..) {
                r.finish(grads)?;
            }
        }
    }
    for r in reducing {
        finish_reduce(Some(r), grads)?;
    }
    Ok(())
}
