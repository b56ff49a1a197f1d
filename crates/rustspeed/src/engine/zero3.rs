//! ZeRO stage 3 over ranks: parameters partitioned too.
//!
//! Every parameter (trainable or frozen) is cut on its own as DeepSpeed's `ds_tensor`
//! (REFERENCE §1.7): rank r holds elements `[r*c, (r+1)*c)` of it, `c = ceil(numel / world)`,
//! the last ranks zero-padded. A rank keeps only those pieces (`shards`), concatenated in model
//! order; the model's full parameter buffer is freed. The fp32 gradient partition, master
//! weights and optimizer states are the trainable pieces concatenated the same way (pads
//! included: they stay zero), so the optimizer steps `[0, train_numel)` of that buffer through
//! a [`FlatLayout`] whose "model" coordinates are the shard buffer's.
//!
//! Forward: before each layer, one all-gather of the pieces of every parameter the layer uses
//! (its tied ones too) into a transient buffer, released after the layer; with
//! `stage3_prefetch_bucket_size > 0` the next layer's all-gather is started (non-blocking)
//! before this layer computes. Backward: the same gathers in reverse order (a recomputing
//! layer's second forward uses them too), then the layer's own gradients, computed into a
//! transient scratch, are reduce-scattered into the owners' partitions — started without
//! waiting when `overlap_comm`, so the next layer's backward runs meanwhile. A tied parameter's
//! gradient from a later layer (the LM head's use of `wte`) waits in a full-size buffer until
//! its owner's backward adds to it. The head's gathered parameters and gradient scratch are
//! kept from its fused forward to its backward, which follows at once (DeepSpeed's
//! `max_reuse_distance` idea).
//!
//! Parameters with at most `stage3_param_persistence_threshold` elements (within
//! `stage3_model_persistence_threshold` in total, DeepSpeed's `mark_persistent_parameters`)
//! stay whole on every rank (`resident`) and are never gathered; their gradients and optimizer
//! state are partitioned like the others, and the step's updated pieces are all-gathered into
//! the whole copies.

use std::any::TypeId;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use half::{bf16, f16};
use rustspeed_comm::{CommError, Communicator, Pending};
use rustspeed_kernels::Float;
use rustspeed_models::params::disjoint_mut;
use rustspeed_models::{Batch, Ctx, Flow, LossSum, Model, ParamLayout};

use super::dp::GradReduce;
use super::fetch::{FetchConfig, FetchStats, Fetcher};
use crate::optimizer::{DecayRule, FlatLayout, DECAY_GROUP};

/// One parameter's piece on this rank.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardSlot {
    pub name: String,
    pub numel: usize,
    /// `ceil(numel / world)`: the piece's length, zero padding included.
    pub len: usize,
    /// Where the piece starts in the shard buffer.
    pub offset: usize,
    /// Where the piece starts in the fp32 partition (gradients, master, optimizer); trainable
    /// parameters only.
    pub train_offset: Option<usize>,
    /// Where the whole parameter starts in the resident buffer, when persistent.
    pub resident: Option<usize>,
    /// Start of the flat (trainable) coordinates of the parameter (trainable only).
    pub flat_start: Option<usize>,
}

impl ShardSlot {
    /// The parameter's elements this rank holds, as a range of the whole parameter.
    pub fn owned(&self, rank: usize) -> Range<usize> {
        let lo = (rank * self.len).min(self.numel);
        lo..((rank + 1) * self.len).min(self.numel)
    }
}

/// Where every piece lives on one rank; pure bookkeeping, no communication.
#[derive(Clone, Debug)]
pub struct Zero3Layout {
    pub world: usize,
    pub rank: usize,
    /// One per slot of the model's [`ParamLayout`], same order.
    pub slots: Vec<ShardSlot>,
    pub shard_numel: usize,
    pub train_numel: usize,
    pub resident_numel: usize,
    /// The optimizer's layout: flat coordinates are the fp32 partition's, model coordinates
    /// the shard buffer's.
    pub flat: FlatLayout,
    /// For each layer, the slots it uses (own, then tied), as its forward expects them.
    pub layer_slots: Vec<Vec<usize>>,
    /// For each layer, its own trainable slots (model order).
    pub layer_train: Vec<Vec<usize>>,
}

impl Zero3Layout {
    /// `global` is the trainable flat layout of the whole model (its groups are kept).
    pub fn new(
        layout: &ParamLayout,
        global: &FlatLayout,
        world: usize,
        rank: usize,
        persistence_threshold: u64,
        model_persistence_threshold: u64,
    ) -> Zero3Layout {
        let index: HashMap<&str, usize> = layout
            .slots()
            .iter()
            .enumerate()
            .map(|(i, s)| (s.spec.name.as_str(), i))
            .collect();
        let (mut shard_numel, mut train_numel, mut resident_numel) = (0, 0, 0);
        let mut persistent_total = 0u64;
        let mut slots = Vec::new();
        let mut shard_specs = Vec::new();
        let mut decays = std::collections::HashSet::new();
        for (i, s) in layout.slots().iter().enumerate() {
            let numel = s.spec.numel();
            let len = numel.div_ceil(world);
            let flat_start = global.slot_flat[i].as_ref().map(|r| r.start);
            // DeepSpeed: `ds_numel <= param_threshold`, skipping any that would take the
            // persistent total past the model threshold.
            let persistent = numel as u64 <= persistence_threshold
                && persistent_total + numel as u64 <= model_persistence_threshold;
            let resident = persistent.then(|| {
                persistent_total += numel as u64;
                resident_numel += numel;
                resident_numel - numel
            });
            let train_offset = flat_start.map(|_| {
                train_numel += len;
                train_numel - len
            });
            if let Some(p) = global.params.iter().find(|p| p.slot == i) {
                if p.group == DECAY_GROUP {
                    decays.insert(s.spec.name.clone());
                }
            }
            slots.push(ShardSlot {
                name: s.spec.name.clone(),
                numel,
                len,
                offset: shard_numel,
                train_offset,
                resident,
                flat_start,
            });
            shard_specs.push(
                rustspeed_models::ParamSpec::new(s.spec.name.clone(), &[len])
                    .with_trainable(s.spec.trainable),
            );
            shard_numel += len;
        }
        let shard_layout =
            ParamLayout::new(&[shard_specs], &[]).expect("names are unique in the model layout");
        let flat = FlatLayout::new(
            &shard_layout,
            &DecayRule::Custom(Box::new(move |s| decays.contains(&s.name))),
        );
        let layer_slots: Vec<Vec<usize>> = (0..layout.num_layers())
            .map(|l| {
                layout
                    .layer_slots(l)
                    .map(|s| index[s.spec.name.as_str()])
                    .collect()
            })
            .collect();
        let layer_train = (0..layout.num_layers())
            .map(|l| {
                (0..slots.len())
                    .filter(|&i| layout.slots()[i].layer == l && slots[i].train_offset.is_some())
                    .collect()
            })
            .collect();
        Zero3Layout {
            world,
            rank,
            slots,
            shard_numel,
            train_numel,
            resident_numel,
            flat,
            layer_slots,
            layer_train,
        }
    }

    /// This rank's pieces of `params` (the model's whole buffer, in `layout` coordinates)
    /// and the persistent parameters whole.
    pub fn split<T: Float>(&self, layout: &ParamLayout, params: &[T]) -> (Vec<T>, Vec<T>) {
        let mut shards = vec![T::default(); self.shard_numel];
        let mut resident = vec![T::default(); self.resident_numel];
        for (z, s) in self.slots.iter().zip(layout.slots()) {
            let whole = &params[s.range()];
            let own = z.owned(self.rank);
            shards[z.offset..z.offset + own.len()].copy_from_slice(&whole[own]);
            if let Some(r) = z.resident {
                resident[r..r + z.numel].copy_from_slice(whole);
            }
        }
        (shards, resident)
    }

    /// The trainable pieces as (flat range of the whole model's trainable layout, offset in
    /// the fp32 partition), padding excluded: what a checkpoint records and resharding reads.
    pub fn train_ranges(&self) -> Vec<(Range<usize>, usize)> {
        self.slots
            .iter()
            .filter_map(|z| {
                let (f, t) = (z.flat_start?, z.train_offset?);
                let own = z.owned(self.rank);
                (!own.is_empty()).then(|| (f + own.start..f + own.end, t))
            })
            .collect()
    }

    /// Elements of layer `l`'s parameters that are gathered (not persistent), whole.
    pub fn gathered_numel(&self, l: usize) -> u64 {
        self.gathered(l)
            .iter()
            .map(|&s| self.slots[s].numel as u64)
            .sum()
    }

    /// Layer `l`'s gathered (non-persistent) slots.
    fn gathered(&self, l: usize) -> Vec<usize> {
        self.layer_slots[l]
            .iter()
            .copied()
            .filter(|&s| self.slots[s].resident.is_none())
            .collect()
    }
}

/// `comm`'s element type for `T` (f32, bf16 or f16; the engine checked `T` is one of them).
fn as_elem<T: Float, U: 'static>(s: &[T]) -> Option<&[U]> {
    (TypeId::of::<T>() == TypeId::of::<U>())
        // SAFETY: T and U are the same type.
        .then(|| unsafe { std::slice::from_raw_parts(s.as_ptr() as *const U, s.len()) })
}

fn as_elem_mut<T: Float, U: 'static>(s: &mut [T]) -> Option<&mut [U]> {
    (TypeId::of::<T>() == TypeId::of::<U>())
        // SAFETY: T and U are the same type.
        .then(|| unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut U, s.len()) })
}

/// Non-blocking all-gather of compute-dtype values in their own dtype.
///
/// # Safety
/// As `Communicator::start_all_gather`: the buffers outlive the returned `Pending`.
unsafe fn start_all_gather<T: Float>(
    comm: &Communicator,
    send: &[T],
    recv: &mut [T],
) -> Result<Pending, CommError> {
    if let (Some(s), Some(r)) = (as_elem::<T, f32>(send), as_elem_mut::<T, f32>(recv)) {
        return comm.start_all_gather(s, r);
    }
    if let (Some(s), Some(r)) = (as_elem::<T, bf16>(send), as_elem_mut::<T, bf16>(recv)) {
        return comm.start_all_gather(s, r);
    }
    if let (Some(s), Some(r)) = (as_elem::<T, f16>(send), as_elem_mut::<T, f16>(recv)) {
        return comm.start_all_gather(s, r);
    }
    unreachable!("the engine trains f32, bf16 or f16 parameters")
}

/// An all-gather in flight with the buffers it reads and writes. Field order matters: the
/// `Pending` drops (waits) before the buffers are freed.
pub(super) struct InFlight<T> {
    pending: Option<Pending>,
    send: Vec<T>,
    recv: Vec<T>,
    layer: usize,
}

impl<T> InFlight<T> {
    pub fn layer(&self) -> usize {
        self.layer
    }
}

/// A layer's parameters gathered whole: `at[k]` is where the layer's k-th used slot lies in
/// `buf` (`None`: it is resident).
pub(super) struct Gathered<T> {
    buf: Vec<T>,
    at: Vec<Option<Range<usize>>>,
    layer: usize,
}

/// A gradient reduction in flight: `out[from..from + keep]`, times `scale`, is added to the
/// partition at `at`. Field order matters: the `Pending` drops (waits) before the buffers are
/// freed.
pub(super) struct ReduceInFlight {
    pub pending: Option<Pending>,
    /// Read by the collective while it runs; kept alive until then.
    pub _send: Vec<f32>,
    pub out: Vec<f32>,
    pub from: usize,
    pub at: usize,
    pub keep: usize,
    /// `GradReduce::post`.
    pub scale: f32,
}

impl ReduceInFlight {
    pub fn finish(mut self, grads: &mut [f32]) -> Result<(), CommError> {
        if let Some(p) = self.pending.take() {
            p.wait()?;
        }
        // `v * 1.0` is exactly `v`: the default (unscaled) reduction adds the same bits.
        let reduced = &self.out[self.from..self.from + self.keep];
        let k = self.scale;
        for (g, v) in grads[self.at..self.at + self.keep].iter_mut().zip(reduced) {
            *g += v * k;
        }
        Ok(())
    }
}

/// What the fused head's forward leaves for its backward.
struct HeadCarry<T> {
    gathered: Gathered<T>,
    scratch: Vec<f32>,
}

/// Stage 3's state on one rank.
pub(super) struct Zero3<T: Float> {
    pub comm: Arc<Communicator>,
    pub reduce: GradReduce,
    pub layout: Zero3Layout,
    /// This rank's piece of every parameter, in the compute dtype.
    pub shards: Vec<T>,
    /// Persistent parameters, whole.
    pub resident: Vec<T>,
    pub fetch: FetchConfig,
    pub overlap: bool,
    /// Per slot: a tied parameter's gradient from later layers, until its owner's backward.
    tied: Vec<Option<Vec<f32>>>,
    head: Option<HeadCarry<T>>,
    /// The step's fetch state, from forward to the end of backward.
    fetcher: Option<Fetcher<T>>,
    /// What the last finished step's fetching did.
    pub fetch_stats: FetchStats,
}

impl<T: Float> Zero3<T> {
    pub fn new(
        comm: Arc<Communicator>,
        reduce: GradReduce,
        layout: Zero3Layout,
        shards: Vec<T>,
        resident: Vec<T>,
        fetch: FetchConfig,
        overlap: bool,
    ) -> Self {
        let n = layout.slots.len();
        Zero3 {
            comm,
            reduce,
            layout,
            shards,
            resident,
            fetch,
            overlap,
            tied: vec![None; n],
            head: None,
            fetcher: None,
            fetch_stats: FetchStats::default(),
        }
    }

    /// Starts gathering layer `l`'s parameters (nothing to do when all are resident).
    pub fn start_gather(&self, l: usize) -> Result<InFlight<T>, CommError> {
        let z = &self.layout;
        let slots = z.gathered(l);
        let piece: usize = slots.iter().map(|&s| z.slots[s].len).sum();
        let mut send = Vec::with_capacity(piece);
        for &s in &slots {
            let p = &z.slots[s];
            send.extend_from_slice(&self.shards[p.offset..p.offset + p.len]);
        }
        let mut recv = vec![T::default(); piece * z.world];
        let pending = if piece == 0 {
            None
        } else {
            // SAFETY: `send` and `recv` move into the InFlight with the Pending, which waits
            // before they are dropped (field order) and before they are read (`finish_gather`).
            // Moving a Vec does not move its heap buffer.
            Some(unsafe { start_all_gather(&self.comm, &send, &mut recv)? })
        };
        Ok(InFlight {
            pending,
            send,
            recv,
            layer: l,
        })
    }

    /// Waits for a gather and lays the pieces out whole.
    pub fn finish_gather(&self, mut f: InFlight<T>) -> Result<Gathered<T>, CommError> {
        if let Some(p) = f.pending.take() {
            p.wait()?;
        }
        let z = &self.layout;
        let piece = f.send.len();
        let mut buf = Vec::new();
        let mut at = Vec::new();
        let mut off = 0;
        for &s in &z.layer_slots[f.layer] {
            let p = &z.slots[s];
            if p.resident.is_some() {
                at.push(None);
                continue;
            }
            let start = buf.len();
            buf.resize(start + p.numel, T::default());
            for r in 0..z.world {
                let own = p.owned(r);
                let src = &f.recv[r * piece + off..r * piece + off + own.len()];
                buf[start + own.start..start + own.end].copy_from_slice(src);
            }
            off += p.len;
            at.push(Some(start..start + p.numel));
        }
        Ok(Gathered {
            buf,
            at,
            layer: f.layer,
        })
    }

    fn gather(&self, l: usize) -> Result<Gathered<T>, CommError> {
        let f = self.start_gather(l)?;
        self.finish_gather(f)
    }

    /// Starts reduce-scattering layer `l`'s own gradients (whole, in `scratch`) into the
    /// owners' pieces.
    fn start_reduce(&self, l: usize, scratch: &[f32]) -> Result<Option<ReduceInFlight>, CommError> {
        let z = &self.layout;
        let own = &z.layer_train[l];
        let Some(&first) = own.first() else {
            return Ok(None);
        };
        let piece: usize = own.iter().map(|&s| z.slots[s].len).sum();
        let at = z.slots[first].train_offset.expect("trainable");
        let mut send = vec![0f32; piece * z.world];
        let (mut src, mut dst) = (0, 0);
        for &s in own {
            let p = &z.slots[s];
            for r in 0..z.world {
                let o = p.owned(r);
                let base = r * piece + dst;
                send[base..base + o.len()].copy_from_slice(&scratch[src + o.start..src + o.end]);
            }
            src += p.numel;
            dst += p.len;
        }
        self.reduce.scale_before(&mut send);
        let mut out = vec![0f32; piece];
        // SAFETY: `send` and `out` move with the Pending into the ReduceInFlight, which waits
        // before dropping them (field order) and before reading `out` (`finish_reduce`).
        let pending = unsafe {
            self.comm
                .start_reduce_scatter(&send, &mut out, self.reduce.op)?
        };
        Ok(Some(ReduceInFlight {
            pending: Some(pending),
            _send: send,
            keep: out.len(),
            out,
            from: 0,
            at,
            scale: self.reduce.post,
        }))
    }

    /// After the optimizer rewrote the pieces: every rank's persistent parameters whole again.
    pub fn refresh_resident(&mut self) -> Result<(), CommError> {
        let z = &self.layout;
        let persistent: Vec<usize> = (0..z.slots.len())
            .filter(|&s| z.slots[s].resident.is_some() && z.slots[s].train_offset.is_some())
            .collect();
        let piece: usize = persistent.iter().map(|&s| z.slots[s].len).sum();
        if piece == 0 {
            return Ok(());
        }
        let mut send = Vec::with_capacity(piece);
        for &s in &persistent {
            let p = &z.slots[s];
            send.extend_from_slice(&self.shards[p.offset..p.offset + p.len]);
        }
        let mut recv = vec![T::default(); piece * z.world];
        // SAFETY: both buffers outlive the wait right below.
        unsafe { start_all_gather(&self.comm, &send, &mut recv)? }.wait()?;
        let mut off = 0;
        for &s in &persistent {
            let p = &z.slots[s];
            let at = p.resident.expect("persistent");
            for r in 0..z.world {
                let own = p.owned(r);
                let src = &recv[r * piece + off..r * piece + off + own.len()];
                self.resident[at + own.start..at + own.end].copy_from_slice(src);
            }
            off += p.len;
        }
        Ok(())
    }

    /// Every parameter whole, in the model layout (a collective: every rank calls it).
    pub fn gather_all(&self, layout: &ParamLayout) -> Result<Vec<T>, CommError> {
        let mut params = vec![T::default(); layout.numel()];
        for l in 0..layout.num_layers() {
            let g = self.gather(l)?;
            let vs = views(&self.layout, &self.resident, &g);
            for (v, s) in vs.iter().zip(layout.layer_slots(l)) {
                if s.layer == l {
                    params[s.range()].copy_from_slice(v);
                }
            }
        }
        Ok(params)
    }

    pub fn state_bytes(&self) -> u64 {
        ((self.shards.len() + self.resident.len()) * std::mem::size_of::<T>()) as u64
    }
}

/// The views a layer's forward/backward expects, from a gathered buffer and the resident
/// parameters.
fn views<'a, T>(z: &Zero3Layout, resident: &'a [T], g: &'a Gathered<T>) -> Vec<&'a [T]> {
    z.layer_slots[g.layer]
        .iter()
        .zip(&g.at)
        .map(|(&s, at)| match at {
            Some(r) => &g.buf[r.clone()],
            None => {
                let r = z.slots[s].resident.expect("not gathered means resident");
                &resident[r..r + z.slots[s].numel]
            }
        })
        .collect()
}

/// Length of layer `l`'s own trainable gradients, whole.
pub(super) fn scratch_len(z: &Zero3Layout, l: usize) -> usize {
    z.layer_train[l].iter().map(|&s| z.slots[s].numel).sum()
}

/// Layer `l`'s own gradient scratch, starting from what later layers left in `tied` for its
/// tied parameters.
pub(super) fn take_scratch(z: &Zero3Layout, tied: &mut [Option<Vec<f32>>], l: usize) -> Vec<f32> {
    let mut scratch = vec![0.0; scratch_len(z, l)];
    let mut off = 0;
    for &s in &z.layer_train[l] {
        let n = z.slots[s].numel;
        if let Some(v) = tied[s].take() {
            scratch[off..off + n].copy_from_slice(&v);
        }
        off += n;
    }
    scratch
}

/// Finishes a reduction, if one is in flight.
pub(super) fn finish_reduce(r: Option<ReduceInFlight>, grads: &mut [f32]) -> Result<(), CommError> {
    r.map_or(Ok(()), |r| r.finish(grads))
}

/// Calls `f` with mutable gradient views for layer `l`'s used slots: own trainable ones in
/// `scratch` (laid out whole, in `layer_train` order), tied trainable ones in their waiting
/// buffers `tied` (created zeroed), frozen ones in zeroed throw-away buffers.
pub(super) fn with_grad_views<R>(
    z: &Zero3Layout,
    tied: &mut [Option<Vec<f32>>],
    l: usize,
    scratch: &mut [f32],
    f: impl FnOnce(&mut [&mut [f32]]) -> R,
) -> R {
    let mut own_ranges = Vec::new();
    let mut off = 0;
    for &s in &z.layer_train[l] {
        own_ranges.push(off..off + z.slots[s].numel);
        off += z.slots[s].numel;
    }
    let mut own = disjoint_mut(scratch, &own_ranges).into_iter();
    let used = &z.layer_slots[l];
    let is_own = |s: usize| z.layer_train[l].contains(&s);
    let mut borrowed: Vec<(usize, Vec<f32>)> = Vec::new();
    let mut frozen: Vec<Vec<f32>> = Vec::new();
    for &s in used {
        let p = &z.slots[s];
        if p.train_offset.is_none() {
            frozen.push(vec![0.0; p.numel]);
        } else if !is_own(s) {
            let v = tied[s].take().unwrap_or_else(|| vec![0.0; p.numel]);
            borrowed.push((s, v));
        }
    }
    let result = {
        let mut tied_views = borrowed.iter_mut();
        let mut frozen_views = frozen.iter_mut();
        let mut views: Vec<&mut [f32]> = used
            .iter()
            .map(|&s| {
                if z.slots[s].train_offset.is_none() {
                    frozen_views
                        .next()
                        .expect("one per frozen slot")
                        .as_mut_slice()
                } else if is_own(s) {
                    own.next().expect("one per own trainable slot")
                } else {
                    tied_views
                        .next()
                        .expect("one per tied slot")
                        .1
                        .as_mut_slice()
                }
            })
            .collect();
        f(&mut views)
    };
    for (s, v) in borrowed {
        tied[s] = Some(v);
    }
    result
}

/// One training forward at stage 3 (`ctx: None`: a rank without a micro-batch joining the
/// collectives). Returns the head's loss. Keeps the head's gathered parameters and gradient
/// scratch for [`backward`].
pub(super) fn forward<T: Float>(
    model: &mut Model<T>,
    z3: &mut Zero3<T>,
    ctx: Option<&Ctx>,
) -> Result<Option<LossSum>, CommError> {
    let last = model.layers.len() - 1;
    let numel = (0..=last).map(|l| z3.layout.gathered_numel(l)).collect();
    let mut fetch = Fetcher::new(z3.fetch, numel);
    let mut flow = Flow::default();
    for i in 0..=last {
        let g = fetch.take(z3, i)?;
        if i < last {
            if let Some(ctx) = ctx {
                let refs = views(&z3.layout, &z3.resident, &g);
                model.layers[i].forward(&refs, &mut flow, ctx);
            }
            fetch.release(i, g);
            continue;
        }
        let mut scratch = vec![0.0; scratch_len(&z3.layout, last)];
        if let Some(ctx) = ctx {
            let refs = views(&z3.layout, &z3.resident, &g);
            let head = &mut model.layers[last];
            let fused = with_grad_views(&z3.layout, &mut z3.tied, last, &mut scratch, |gv| {
                head.forward_backward(&refs, gv, &mut flow, ctx)
            });
            if !fused {
                head.forward(&refs, &mut flow, ctx);
            }
        }
        z3.head = Some(HeadCarry {
            gathered: g,
            scratch,
        });
    }
    z3.fetcher = Some(fetch);
    Ok(flow.loss)
}

/// The backward matching [`forward`]: gathers each layer again (the head's are still there),
/// runs its backward, reduce-scatters its own gradients into `grads` (the fp32 partition).
pub(super) fn backward<T: Float>(
    model: &mut Model<T>,
    z3: &mut Zero3<T>,
    grads: &mut [f32],
    ctx: Option<&Ctx>,
) -> Result<(), CommError> {
    let last = model.layers.len() - 1;
    let mut carry = Some(z3.head.take().expect("backward follows forward"));
    let mut fetch = z3.fetcher.take().expect("backward follows forward");
    let mut flow = Flow::default();
    let mut reducing: Option<ReduceInFlight> = None;
    for i in (0..=last).rev() {
        // Trace position: the head's is `last`, then the layers below it in reverse.
        let t = 2 * last - i;
        let (g, mut scratch) = match carry.take() {
            Some(c) => (c.gathered, c.scratch),
            None => (
                fetch.take(z3, t)?,
                take_scratch(&z3.layout, &mut z3.tied, i),
            ),
        };
        if let Some(ctx) = ctx {
            let refs = views(&z3.layout, &z3.resident, &g);
            let layer = &mut model.layers[i];
            with_grad_views(&z3.layout, &mut z3.tied, i, &mut scratch, |gv| {
                layer.backward(&refs, gv, &mut flow, ctx)
            });
            layer.clear();
        } else {
            // Keep the tied buffers' life cycle identical: a rank without data still hands
            // its (zero) tied gradients to their owners.
            with_grad_views(&z3.layout, &mut z3.tied, i, &mut scratch, |_| {});
        }
        fetch.release(t, g);
        finish_reduce(reducing.take(), grads)?;
        reducing = z3.start_reduce(i, &scratch)?;
        if !z3.overlap {
            finish_reduce(reducing.take(), grads)?;
        }
    }
    finish_reduce(reducing.take(), grads)?;
    z3.fetch_stats = fetch.finish();
    debug_assert!(
        z3.tied.iter().all(Option::is_none),
        "every tied gradient reached its owner"
    );
    Ok(())
}

/// Evaluation forward at stage 3 (every rank calls it: the layers are gathered).
pub(super) fn eval_forward<T: Float>(
    model: &mut Model<T>,
    z3: &Zero3<T>,
    batch: &Batch,
) -> Result<LossSum, CommError> {
    let ctx = Ctx::eval(batch);
    let mut flow = Flow::default();
    let n = model.layers.len();
    let mut next = Some(z3.start_gather(0)?);
    for i in 0..n {
        let g = z3.finish_gather(next.take().expect("started"))?;
        if i + 1 < n {
            next = Some(z3.start_gather(i + 1)?);
        }
        let refs = views(&z3.layout, &z3.resident, &g);
        model.layers[i].forward(&refs, &mut flow, &ctx);
        model.layers[i].clear();
    }
    Ok(flow.loss.expect("the last layer reports the loss"))
}

impl<T: Float> super::Engine<T> {
    /// A micro-step without data: a rank that has fewer micro-batches than the others in a
    /// partial step joins their gathers and reductions, adding zeros.
    pub(super) fn idle_micro_step(&mut self) -> Result<(), super::EngineError> {
        if let Some(z3) = &mut self.z3 {
            forward(&mut self.model, z3, None)?;
            backward(&mut self.model, z3, &mut self.grads, None)?;
        }
        if let Some(z2) = &mut self.z2 {
            super::zero2::forward(&mut self.model, z2, None);
            super::zero2::backward(&mut self.model, z2, &mut self.grads, None)?;
        }
        Ok(())
    }

    /// Whether the parameters are partitioned (ZeRO stage 3 over several ranks), so that
    /// `model().params` is empty until [`Engine::materialize_params`].
    pub fn params_partitioned(&self) -> bool {
        self.z3.is_some()
    }

    /// Fills `model().params` with every parameter whole, for exports and inspection. At
    /// stage 3 this gathers every layer (a collective: every rank calls it) and the buffer
    /// stays until the next training forward frees it again; otherwise it is already whole.
    pub fn materialize_params(&mut self) -> Result<(), super::EngineError> {
        if let Some(z3) = &self.z3 {
            self.model.params = z3.gather_all(&self.model.layout)?;
        }
        Ok(())
    }

    /// Every parameter whole in the model layout, without keeping it (a collective at stage 3).
    pub fn full_params(&self) -> Result<Vec<T>, super::EngineError> {
        match &self.z3 {
            Some(z3) => Ok(z3.gather_all(&self.model.layout)?),
            None => Ok(self.model.params.clone()),
        }
    }

    /// What stage 3's parameter fetching did in the last step (`None` below stage 3).
    pub fn zero3_fetch_stats(&self) -> Option<FetchStats> {
        self.z3.as_ref().map(|z| z.fetch_stats)
    }

    /// The stage-3 layout of this rank's pieces (`None` below stage 3).
    pub fn zero3_layout(&self) -> Option<&Zero3Layout> {
        self.z3.as_ref().map(|z| &z.layout)
    }
}
