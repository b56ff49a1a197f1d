//! Collectives over `SharedBuf`s: every rank's buffer is mapped in every rank, so a rank reads
//! its peers' pieces in place and each byte is copied once (all_gather) or read once and
//! reduced (reduce_scatter, all_reduce). The shared halves are not used; the round counters
//! still carry the synchronisation, the same-collective check and the watchdog.
//!
//! Protocol: round 1 (every rank's buffer holds its input), the reads, round 2 (nobody reads
//! any more, so every buffer may change again). all_reduce reduces each rank's own piece
//! between rounds 1 and 2 and copies the others' reduced pieces before round 3.
//!
//! Pieces follow `partition`: with c = ceil(n / world), rank p owns [p·c, min(n, (p+1)·c)).

use crate::elem::{reduce_into, Elem, ReduceOp};
use crate::error::Result;
use crate::shm::{opcode, ShmGroup};

/// Elements of one reduction window (256 KiB of f32): the sources of a window stay in L2.
const WINDOW: usize = 1 << 16;

/// Raw view of `len` elements at `base + lo`. SAFETY: the caller guarantees the range is inside
/// a live mapping and that no one writes it while the view is used.
unsafe fn view<'a, T>(base: *mut T, lo: usize, len: usize) -> &'a [T] {
    std::slice::from_raw_parts(base.add(lo), len)
}

impl ShmGroup {
    /// `bufs[p]`: rank p's buffer of `n` elements as mapped here (`bufs[me]` is this rank's).
    /// Every rank's buffer ends up holding every rank's own piece.
    pub(crate) fn all_gather_mapped<T: Elem>(&mut self, bufs: &[*mut T], n: usize) -> Result<()> {
        let ctx = self.begin(
            "all_gather_shared".into(),
            opcode::ALL_GATHER_SHARED,
            T::DTYPE,
            n,
        )?;
        let (ws, me) = (self.region.world, self.region.rank);
        let c = n.div_ceil(ws);
        self.sync(&ctx)?;
        self.check_match(&ctx)?;
        for p in (0..ws).filter(|&p| p != me) {
            let (lo, hi) = ((p * c).min(n), ((p + 1) * c).min(n));
            // SAFETY: rank p published round 1 after writing its piece and writes nothing
            // until round 2; my buffer's piece p is mine alone to write (the caller lent it).
            unsafe { std::ptr::copy_nonoverlapping(bufs[p].add(lo), bufs[me].add(lo), hi - lo) };
        }
        self.sync(&ctx)
    }

    /// `out` (len ceil(n/world)) = op over every rank's buffer of this rank's piece, zero
    /// past `n`.
    pub(crate) fn reduce_scatter_mapped<T: Elem>(
        &mut self,
        bufs: &[*mut T],
        n: usize,
        out: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let ctx = self.begin(
            format!("reduce_scatter_shared({})", op.name()),
            opcode::REDUCE_SCATTER_SHARED | op.code() << 8,
            T::DTYPE,
            n,
        )?;
        let (ws, me) = (self.region.world, self.region.rank);
        let c = out.len();
        self.sync(&ctx)?;
        self.check_match(&ctx)?;
        let (lo, hi) = ((me * c).min(n), ((me + 1) * c).min(n));
        reduce_windows(bufs, lo, &mut out[..hi - lo], op, ws);
        out[hi - lo..].fill(T::default());
        self.sync(&ctx)
    }

    /// Every rank's buffer (n elements) = op over all ranks' buffers.
    pub(crate) fn all_reduce_mapped<T: Elem>(
        &mut self,
        bufs: &[*mut T],
        n: usize,
        op: ReduceOp,
    ) -> Result<()> {
        let ctx = self.begin(
            format!("all_reduce_shared({})", op.name()),
            opcode::ALL_REDUCE_SHARED | op.code() << 8,
            T::DTYPE,
            n,
        )?;
        let (ws, me) = (self.region.world, self.region.rank);
        let c = n.div_ceil(ws);
        let piece = |p: usize| ((p * c).min(n), ((p + 1) * c).min(n));
        self.sync(&ctx)?;
        self.check_match(&ctx)?;
        // Reduce my piece, window by window, into scratch then back over my own piece: peers
        // read only their own pieces of my buffer now, and I read my piece of theirs.
        let (lo, hi) = piece(me);
        let mut off = lo;
        while off < hi {
            let len = WINDOW.min(hi - off);
            let tmp = crate::shm::scratch_as::<T>(&mut self.scratch, len);
            reduce_windows(bufs, off, tmp, op, ws);
            // SAFETY: my piece of my buffer; no peer reads it before round 2.
            unsafe { std::ptr::copy_nonoverlapping(tmp.as_ptr(), bufs[me].add(off), len) };
            off += len;
        }
        self.sync(&ctx)?; // every piece is reduced
        for p in (0..ws).filter(|&p| p != me) {
            let (lo, hi) = piece(p);
            // SAFETY: p's piece of p's buffer is final and nobody writes it before round 3.
            unsafe { std::ptr::copy_nonoverlapping(bufs[p].add(lo), bufs[me].add(lo), hi - lo) };
        }
        self.sync(&ctx)
    }
}

/// out = op over ranks of bufs[p][lo .. lo + out.len()], a window at a time.
fn reduce_windows<T: Elem>(bufs: &[*mut T], lo: usize, out: &mut [T], op: ReduceOp, ws: usize) {
    for (w, chunk) in out.chunks_mut(WINDOW).enumerate() {
        let at = lo + w * WINDOW;
        // SAFETY: every rank published its buffer (round 1) and writes nothing until round 2;
        // `out` is not part of any buffer read here (callers pass their own memory or scratch).
        let srcs: Vec<&[T]> = bufs
            .iter()
            .map(|&b| unsafe { view(b, at, chunk.len()) })
            .collect();
        reduce_into(&srcs, chunk, op, ws);
    }
}
