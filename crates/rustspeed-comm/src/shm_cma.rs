//! Single-copy collectives: a rank reads its peers' buffers directly with
//! `process_vm_readv` (Linux cross-memory attach, what OpenMPI's vader uses for large
//! messages) instead of both sides copying through the shared halves. Per rank, a
//! reduce_scatter then moves 1.5·S bytes through memory instead of 2.5·S, an all_gather 2·S
//! instead of 3·S. The shared region still carries the flags, addresses and checks.
//! Off by default: measured on the 2-vCPU VM of docs/BENCHMARKS.md it was ~2x slower than
//! the two-copy path (the kernel pins the peer's pages on every call); RUSTSPEED_SHM_SINGLE_COPY=1
//! turns it on where the kernel makes it pay.
//!
//! Protocol per collective: publish the address of the buffer peers read, round 1 (all
//! published, same collective checked), read what is needed, round 2 (all done reading, so
//! every buffer may change again). all_reduce reduces its own piece in place between rounds
//! 1 and 2 and reads the others' reduced pieces before round 3.

use std::sync::atomic::Ordering::SeqCst;

use crate::elem::{reduce_into, Elem, ReduceOp};
use crate::error::Result;
use crate::shm::{opcode, OpCtx, Region, ShmGroup};

/// Elements per peer staged in L2 for a reduction (256 KiB of f32).
const STAGE: usize = 1 << 16;

/// Copies `dst.len()` elements from `addr` in `rank`'s address space.
fn read_peer<T: Elem>(
    reg: &Region,
    rank: usize,
    addr: u64,
    dst: &mut [T],
    ctx: &OpCtx,
) -> Result<()> {
    let bytes = std::mem::size_of_val(dst);
    let pid = reg.pid_of(rank);
    let mut done = 0usize;
    while done < bytes {
        let local = libc::iovec {
            // SAFETY: in bounds of dst.
            iov_base: unsafe { (dst.as_mut_ptr() as *mut u8).add(done) } as *mut libc::c_void,
            iov_len: bytes - done,
        };
        let remote = libc::iovec {
            iov_base: (addr as usize + done) as *mut libc::c_void,
            iov_len: bytes - done,
        };
        // SAFETY: the local iovec is our own writable memory; the kernel checks the remote one.
        let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n <= 0 {
            let err = std::io::Error::last_os_error();
            let cause = if err.raw_os_error() == Some(libc::ESRCH) {
                format!("rank {rank} (pid {pid}) died (its process exited or was killed)")
            } else {
                format!("reading {bytes} bytes from rank {rank} (pid {pid}) failed: {err}")
            };
            return Err(reg.fail_wait(&ctx.describe(), &[rank], Some(cause)));
        }
        done += n as usize;
    }
    Ok(())
}

/// Whether this rank may read every peer's memory: each rank published the address of a
/// probe word holding its rank + 1 (`Region::publish_probe`). Fails under a ptrace policy
/// that forbids it (Yama ptrace_scope 2-3, or containers without the permission).
pub(crate) fn probe_peers(reg: &Region) -> bool {
    (0..reg.world).filter(|&p| p != reg.rank).all(|p| {
        let mut word = [0u8; 8];
        let local = libc::iovec {
            iov_base: word.as_mut_ptr() as *mut libc::c_void,
            iov_len: 8,
        };
        let remote = libc::iovec {
            iov_base: reg.cma_addr(p).load(SeqCst) as usize as *mut libc::c_void,
            iov_len: 8,
        };
        // SAFETY: as in read_peer.
        let n = unsafe {
            libc::process_vm_readv(reg.pid_of(p) as libc::pid_t, &local, 1, &remote, 1, 0)
        };
        n == 8 && u64::from_ne_bytes(word) == p as u64 + 1
    })
}

/// `ws` staging buffers of `len` elements each, carved from the group's scratch bytes.
fn stages<T: Elem>(scratch: &mut Vec<u8>, ws: usize, len: usize) -> Vec<&mut [T]> {
    let align = std::mem::align_of::<T>();
    let per = len * size_of::<T>();
    let need = ws * per + align;
    if scratch.len() < need {
        scratch.resize(need, 0);
    }
    let off = scratch.as_ptr().align_offset(align);
    let base = &mut scratch[off..off + ws * per];
    base.chunks_mut(per.max(1))
        .take(ws)
        .map(|c| {
            // SAFETY: aligned (chunk sizes are multiples of size_of::<T>), in bounds, and every
            // bit pattern is a valid T.
            unsafe { std::slice::from_raw_parts_mut(c.as_mut_ptr() as *mut T, len) }
        })
        .collect()
}

/// Where a reduction reads this rank's contribution and writes its result.
enum Target<'a, T> {
    /// reduce_scatter: read `local`, write `out` (this rank's piece).
    Separate { local: &'a [T], out: &'a mut [T] },
    /// all_reduce: read and overwrite `buf[lo..hi]`.
    InPlace { buf: &'a mut [T], hi: usize },
}

impl ShmGroup {
    /// Publishes `addr`, runs round 1 and checks that every rank is in the same collective.
    fn cma_start(&mut self, ctx: &OpCtx, addr: u64) -> Result<()> {
        self.region.cma_addr(self.region.rank).store(addr, SeqCst);
        self.sync(ctx)?;
        self.check_match(ctx)
    }

    /// Reduces elements `[lo, lo + len)` of every rank's buffer (peers' at `addrs`, mine in
    /// `target`, `n` real elements, zero past them) into the target's output, staging each
    /// rank's block in L2 first (so an in-place output never overwrites unread input).
    fn reduce_window<T: Elem>(
        &mut self,
        ctx: &OpCtx,
        addrs: &[u64],
        mut target: Target<'_, T>,
        n: usize,
        lo: usize,
        op: ReduceOp,
    ) -> Result<()> {
        let (ws, me) = (self.region.world, self.region.rank);
        let total = match &target {
            Target::Separate { out, .. } => out.len(),
            Target::InPlace { hi, .. } => hi - lo,
        };
        let region = self.region.clone();
        let mut off = 0;
        while off < total {
            let len = STAGE.min(total - off);
            let start = lo + off;
            let real = n.saturating_sub(start).min(len);
            let mut st = stages::<T>(&mut self.scratch, ws, len);
            for (p, stage) in st.iter_mut().enumerate() {
                if p == me && real > 0 {
                    let local: &[T] = match &target {
                        Target::Separate { local, .. } => local,
                        Target::InPlace { buf, .. } => buf,
                    };
                    stage[..real].copy_from_slice(&local[start..start + real]);
                } else if real > 0 {
                    let addr = addrs[p] + (start * size_of::<T>()) as u64;
                    read_peer(&region, p, addr, &mut stage[..real], ctx)?;
                }
                stage[real..].fill(T::default());
            }
            let srcs: Vec<&[T]> = st.iter().map(|s| &s[..]).collect();
            let out: &mut [T] = match &mut target {
                Target::Separate { out, .. } => &mut out[off..off + len],
                Target::InPlace { buf, .. } => &mut buf[start..start + len],
            };
            reduce_into(&srcs, out, op, ws);
            off += len;
        }
        Ok(())
    }

    fn peer_addrs(&self) -> Vec<u64> {
        (0..self.region.world)
            .map(|p| self.region.cma_addr(p).load(SeqCst))
            .collect()
    }

    pub(crate) fn reduce_scatter_cma<T: Elem>(
        &mut self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let ctx = self.begin(
            format!("reduce_scatter({})", op.name()),
            opcode::REDUCE_SCATTER | op.code() << 8,
            T::DTYPE,
            input.len(),
        )?;
        self.cma_start(&ctx, input.as_ptr() as u64)?;
        let addrs = self.peer_addrs();
        let (me, c, n) = (self.region.rank, output.len(), input.len());
        let target = Target::Separate {
            local: input,
            out: output,
        };
        self.reduce_window(&ctx, &addrs, target, n, me * c, op)?;
        self.sync(&ctx) // everybody is done reading my input
    }

    pub(crate) fn all_gather_cma<T: Elem>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let ctx = self.begin(
            "all_gather".into(),
            opcode::ALL_GATHER,
            T::DTYPE,
            output.len(),
        )?;
        self.cma_start(&ctx, input.as_ptr() as u64)?;
        let addrs = self.peer_addrs();
        let (me, n, c) = (self.region.rank, output.len(), input.len());
        let region = self.region.clone();
        for (p, &addr) in addrs.iter().enumerate() {
            let (lo, hi) = ((p * c).min(n), ((p + 1) * c).min(n));
            if p == me {
                output[lo..hi].copy_from_slice(&input[..hi - lo]);
            } else if hi > lo {
                read_peer(&region, p, addr, &mut output[lo..hi], &ctx)?;
            }
        }
        self.sync(&ctx)
    }

    pub(crate) fn all_reduce_cma<T: Elem>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let ctx = self.begin(
            format!("all_reduce({})", op.name()),
            opcode::ALL_REDUCE | op.code() << 8,
            T::DTYPE,
            buf.len(),
        )?;
        self.cma_start(&ctx, buf.as_ptr() as u64)?;
        let addrs = self.peer_addrs();
        let (ws, me, n) = (self.region.world, self.region.rank, buf.len());
        let pc = n.div_ceil(ws);
        let piece = |p: usize| ((p * pc).min(n), ((p + 1) * pc).min(n));
        // Phase 1: reduce my piece in place. Peers read only their own pieces of my buffer
        // now, and my piece is staged before it is overwritten.
        let (lo, hi) = piece(me);
        self.reduce_window(&ctx, &addrs, Target::InPlace { buf, hi }, n, lo, op)?;
        self.sync(&ctx)?; // every piece is reduced, nobody reads unreduced data any more
        let region = self.region.clone();
        for p in (0..ws).filter(|&p| p != me) {
            let (lo, hi) = piece(p);
            if hi > lo {
                let addr = addrs[p] + (lo * size_of::<T>()) as u64;
                read_peer(&region, p, addr, &mut buf[lo..hi], &ctx)?;
            }
        }
        self.sync(&ctx) // everybody has my piece
    }
}

impl Region {
    /// Publishes the address of `probe` (which must hold rank + 1 and outlive the probing).
    pub(crate) fn publish_probe(&self, probe: &u64) {
        self.cma_addr(self.rank)
            .store(probe as *const u64 as u64, SeqCst);
    }
}
