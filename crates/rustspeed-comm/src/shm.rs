//! The shared-memory backend: ranks are processes on one machine that map one file (in
//! /dev/shm) and move data through it.
//!
//! Layout of the file: a header (abort flag and message), one control block per rank (its
//! round counter, pid, the collective it is in), one control block per ordered pair of ranks
//! (point-to-point rings), then the data: per rank two "halves" of `half_bytes` (double
//! buffering), then one `p2p_bytes` ring per ordered pair.
//!
//! Collectives advance in rounds. In round k a rank writes into its own half `k % 2`, publishes
//! k in its round counter, waits until every peer has published k, then reads the peers'
//! halves `k % 2`. A rank writes half `k % 2` again only in round k+2, after every peer has
//! published k+1, which each does only after it finished reading round k: one all-to-all flag
//! exchange per round is the only synchronisation. Big buffers are pipelined through the
//! halves, so the shared region stays bounded (and mostly cache resident) whatever the size.
//!
//! reduce_scatter: each rank copies the pieces other ranks own into its half, and each rank
//! reduces only its own piece, reading its own contribution straight from its input.
//! all_gather: each rank copies its piece in and everybody copies all pieces out.
//! all_reduce: a reduce_scatter round then an all_gather round per chunk.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};

use crate::elem::{reduce_into, DType, Elem, ReduceOp};
use crate::error::{CommError, ErrorKind, Result};
use crate::futex;

const MAGIC: u64 = 0x4d4d_4f43_5350_5352; // "RSPSCOMM"
const VERSION: u32 = 1;
const PAGE: usize = 4096;
const ABORT_OFF: usize = 64;
const ABORT_MSG_OFF: usize = 128;
const ABORT_MSG_MAX: usize = 3968;
const RANK_CTL_OFF: usize = PAGE;
const RANK_CTL_BYTES: usize = 256;
const PAIR_CTL_BYTES: usize = 128;

/// Default bytes of one half (per rank, two halves each). 1 MiB keeps a round's data
/// (2 ranks x 2 halves = 4 MiB) in the last-level cache; RUSTSPEED_SHM_CHUNK_BYTES overrides.
pub const DEFAULT_HALF_BYTES: usize = 1 << 20;
/// Bytes of one point-to-point ring (a power of two: positions are wrapping u32 counters).
pub const DEFAULT_P2P_BYTES: usize = 1 << 18;

/// Sizes of the shared file, agreed by all ranks (rank 0 writes them into the header).
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub world: usize,
    pub half_bytes: usize,
    pub p2p_bytes: usize,
}

impl Layout {
    fn pair_ctl_off(&self) -> usize {
        RANK_CTL_OFF + self.world * RANK_CTL_BYTES
    }
    fn data_off(&self) -> usize {
        (self.pair_ctl_off() + self.world * self.world * PAIR_CTL_BYTES).next_multiple_of(PAGE)
    }
    fn ring_off(&self) -> usize {
        self.data_off() + self.world * 2 * self.half_bytes
    }
    pub fn total_bytes(&self) -> usize {
        self.ring_off() + self.world * self.world * self.p2p_bytes
    }
}

/// Identifies a collective in messages and in the cross-rank consistency check.
#[derive(Debug, Clone)]
pub struct OpCtx {
    pub name: String,
    pub code: u32,
    pub dtype: DType,
    pub count: usize,
    pub seq: u64,
    pub start: Instant,
}

impl OpCtx {
    pub fn describe(&self) -> String {
        let bytes = self.count * self.dtype.size();
        format!(
            "{} #{} of {} {} elements ({})",
            self.name,
            self.seq,
            self.count,
            self.dtype.name(),
            human_bytes(bytes)
        )
    }
}

pub fn human_bytes(b: usize) -> String {
    if b >= 1 << 20 {
        format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
    } else if b >= 1 << 10 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// Operation codes written into the control block (the low byte); the reduce op or root rank
/// go in the upper bits so that a mismatch in either is caught too.
pub mod opcode {
    pub const BARRIER: u32 = 1;
    pub const ALL_REDUCE: u32 = 2;
    pub const REDUCE_SCATTER: u32 = 3;
    pub const ALL_GATHER: u32 = 4;
    pub const BROADCAST: u32 = 5;
    pub const ALL_GATHER_SHARED: u32 = 6;
    pub const REDUCE_SCATTER_SHARED: u32 = 7;
    pub const ALL_REDUCE_SHARED: u32 = 8;
    pub fn name(code: u32) -> &'static str {
        match code & 0xff {
            BARRIER => "barrier",
            ALL_REDUCE => "all_reduce",
            REDUCE_SCATTER => "reduce_scatter",
            ALL_GATHER => "all_gather",
            BROADCAST => "broadcast",
            ALL_GATHER_SHARED => "all_gather_shared",
            REDUCE_SCATTER_SHARED => "reduce_scatter_shared",
            ALL_REDUCE_SHARED => "all_reduce_shared",
            _ => "?",
        }
    }
    /// "all_reduce(sum)", "broadcast(root 1)": the name a rank's OpCtx would carry.
    pub fn label(code: u32) -> String {
        let arg = code >> 8;
        match code & 0xff {
            ALL_REDUCE | REDUCE_SCATTER | ALL_REDUCE_SHARED | REDUCE_SCATTER_SHARED => {
                let op = ["sum", "mean", "max"].get(arg as usize).unwrap_or(&"?");
                format!("{}({op})", name(code))
            }
            BROADCAST => format!("broadcast(root {arg})"),
            _ => name(code).to_string(),
        }
    }
}

/// The mapped file, shared by the collective worker and point-to-point callers of one rank.
pub struct Region {
    _map: MmapRaw,
    base: *mut u8,
    pub rank: usize,
    pub world: usize,
    layout: Layout,
    pub timeout: Duration,
    /// Point-to-point sequence numbers, per peer: (sent, received).
    p2p_seq: Vec<Mutex<(u64, u64)>>,
}

// SAFETY: the mapping lives as long as the Region; all shared words are accessed as atomics and
// data areas are handed over through the round protocol (release/acquire on the counters).
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

/// A rank's control block, in shared memory.
struct RankCtl<'a> {
    round: &'a AtomicU32,
    sleepers: &'a AtomicU32,
    pid: &'a AtomicU32,
    closed: &'a AtomicU32,
}

/// A slot of the "which collective am I in" record (two per rank, indexed by seq % 2).
struct OpInfo<'a> {
    seq: &'a AtomicU64,
    code: &'a AtomicU32,
    dtype: &'a AtomicU32,
    count: &'a AtomicU64,
}

/// Where to create the shared file: /dev/shm when it exists (tmpfs, never touches a disk).
pub fn shm_dir() -> PathBuf {
    let dev = Path::new("/dev/shm");
    if dev.is_dir() {
        dev.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

impl Region {
    /// Rank 0: creates and sizes the file, writes the header. The caller publishes the path
    /// and unlinks the file once every rank has mapped it.
    pub fn create(path: &Path, layout: Layout, timeout: Duration) -> Result<Region> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| {
                CommError::setup(format!(
                    "shm backend: cannot create {}: {e}",
                    path.display()
                ))
            })?;
        file.set_len(layout.total_bytes() as u64).map_err(|e| {
            CommError::setup(format!(
                "shm backend: cannot size {} to {}: {e} (is /dev/shm full? `df -h /dev/shm`)",
                path.display(),
                human_bytes(layout.total_bytes())
            ))
        })?;
        // tmpfs allocates pages on first touch; a full /dev/shm (Docker's default is 64 MiB)
        // would then kill us with SIGBUS in the middle of a collective. Reserve them now.
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid fd and an in-range length.
            let r = unsafe {
                libc::posix_fallocate(file.as_raw_fd(), 0, layout.total_bytes() as libc::off_t)
            };
            if r != 0 {
                let _ = std::fs::remove_file(path);
                return Err(CommError::setup(format!(
                    "shm backend: cannot reserve {} in {}: {} (is /dev/shm too small? `df -h /dev/shm`; \
                     Docker: --shm-size=1g; or lower RUSTSPEED_SHM_CHUNK_BYTES)",
                    human_bytes(layout.total_bytes()),
                    path.display(),
                    std::io::Error::from_raw_os_error(r)
                )));
            }
        }
        let region = Self::map(&file, path, 0, layout, timeout)?;
        let h = region.base;
        // SAFETY: the header lies inside the mapping; nobody else has it yet.
        unsafe {
            (h.add(8) as *mut u32).write(VERSION);
            (h.add(12) as *mut u32).write(layout.world as u32);
            (h.add(16) as *mut u64).write(layout.half_bytes as u64);
            (h.add(24) as *mut u64).write(layout.p2p_bytes as u64);
        }
        region.u64_at(0).store(MAGIC, SeqCst);
        region.register();
        Ok(region)
    }

    /// Ranks 1..: maps the file rank 0 created and checks it was made for this world size.
    pub fn open(path: &Path, rank: usize, world: usize, timeout: Duration) -> Result<Region> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| {
                CommError::setup(format!(
                    "shm backend: rank {rank} cannot open {} (made by rank 0): {e}; the shm backend needs \
                     every rank on one machine; across machines build with --features mpi",
                    path.display()
                ))
            })?;
        let mut head = [0u8; 32];
        use std::io::Read;
        (&file).read_exact(&mut head).map_err(|e| {
            CommError::setup(format!("shm backend: cannot read {}: {e}", path.display()))
        })?;
        let magic = u64::from_le_bytes(head[0..8].try_into().unwrap());
        let file_world = u32::from_le_bytes(head[12..16].try_into().unwrap()) as usize;
        if magic != MAGIC || file_world != world {
            return Err(CommError::setup(format!(
                "shm backend: {} is not a rustspeed region for world size {world} (magic {magic:#x}, world {file_world}); \
                 do all ranks use the same WORLD_SIZE and MASTER_PORT?",
                path.display()
            )));
        }
        let layout = Layout {
            world,
            half_bytes: u64::from_le_bytes(head[16..24].try_into().unwrap()) as usize,
            p2p_bytes: u64::from_le_bytes(head[24..32].try_into().unwrap()) as usize,
        };
        let region = Self::map(&file, path, rank, layout, timeout)?;
        region.register();
        Ok(region)
    }

    fn map(
        file: &File,
        path: &Path,
        rank: usize,
        layout: Layout,
        timeout: Duration,
    ) -> Result<Region> {
        let map = MmapOptions::new()
            .len(layout.total_bytes())
            .map_raw(file)
            .map_err(|e| {
                CommError::setup(format!("shm backend: cannot map {}: {e}", path.display()))
            })?;
        let base = map.as_mut_ptr();
        Ok(Region {
            _map: map,
            base,
            rank,
            world: layout.world,
            layout,
            timeout,
            p2p_seq: (0..layout.world).map(|_| Mutex::new((0, 0))).collect(),
        })
    }

    fn register(&self) {
        let me = self.ctl(self.rank);
        me.pid.store(std::process::id(), SeqCst);
        me.closed.store(0, SeqCst);
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4) && off + 4 <= self.layout.total_bytes());
        // SAFETY: in bounds and aligned; the mapping outlives &self.
        unsafe { &*(self.base.add(off) as *const AtomicU32) }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= self.layout.total_bytes());
        // SAFETY: as above.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    fn ctl(&self, rank: usize) -> RankCtl<'_> {
        let o = RANK_CTL_OFF + rank * RANK_CTL_BYTES;
        RankCtl {
            round: self.u32_at(o),
            sleepers: self.u32_at(o + 4),
            pid: self.u32_at(o + 8),
            closed: self.u32_at(o + 12),
        }
    }

    /// Where `rank` publishes the address of the buffer peers read in single-copy mode.
    pub(crate) fn cma_addr(&self, rank: usize) -> &AtomicU64 {
        self.u64_at(RANK_CTL_OFF + rank * RANK_CTL_BYTES + 32)
    }

    pub(crate) fn pid_of(&self, rank: usize) -> u32 {
        self.ctl(rank).pid.load(SeqCst)
    }

    fn info(&self, rank: usize, seq: u64) -> OpInfo<'_> {
        let o = RANK_CTL_OFF + rank * RANK_CTL_BYTES + 64 + (seq % 2) as usize * 32;
        OpInfo {
            seq: self.u64_at(o),
            code: self.u32_at(o + 8),
            dtype: self.u32_at(o + 12),
            count: self.u64_at(o + 16),
        }
    }

    /// Byte pointer to `rank`'s half `half`.
    fn slot(&self, rank: usize, half: usize) -> *mut u8 {
        // SAFETY: in bounds by construction of Layout.
        unsafe {
            self.base
                .add(self.layout.data_off() + (rank * 2 + half) * self.layout.half_bytes)
        }
    }

    pub fn half_bytes(&self) -> usize {
        self.layout.half_bytes
    }

    // ---- abort: one rank's failure becomes every rank's error, at once -------------------

    /// Marks the group failed with `msg` (the first caller wins) and wakes everybody.
    pub fn abort(&self, msg: &str) {
        let state = self.u32_at(ABORT_OFF);
        if state.compare_exchange(0, 1, SeqCst, SeqCst).is_ok() {
            let bytes = &msg.as_bytes()[..msg.len().min(ABORT_MSG_MAX)];
            // SAFETY: the message area is in the header; only the CAS winner writes it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    self.base.add(ABORT_MSG_OFF),
                    bytes.len(),
                );
            }
            self.u32_at(ABORT_OFF + 4).store(self.rank as u32, SeqCst);
            self.u32_at(ABORT_OFF + 8).store(bytes.len() as u32, SeqCst);
            state.store(2, SeqCst);
        }
        self.wake_everyone();
    }

    fn wake_everyone(&self) {
        for r in 0..self.world {
            futex::wake_all(self.ctl(r).round);
            for d in 0..self.world {
                let (w, rd, _, _) = self.pair(r, d);
                futex::wake_all(w);
                futex::wake_all(rd);
            }
        }
    }

    /// The abort error, if some rank aborted the group.
    pub fn aborted(&self) -> Option<CommError> {
        let state = self.u32_at(ABORT_OFF);
        if state.load(SeqCst) == 0 {
            return None;
        }
        let t0 = Instant::now();
        while state.load(SeqCst) != 2 && t0.elapsed() < Duration::from_secs(1) {
            std::hint::spin_loop();
        }
        let rank = self.u32_at(ABORT_OFF + 4).load(SeqCst);
        let len = self.u32_at(ABORT_OFF + 8).load(SeqCst) as usize;
        // SAFETY: written before state became 2.
        let msg = unsafe {
            std::slice::from_raw_parts(self.base.add(ABORT_MSG_OFF), len.min(ABORT_MSG_MAX))
        };
        let msg = String::from_utf8_lossy(msg);
        if rank as usize == self.rank {
            Some(CommError::new(ErrorKind::Aborted, msg.into_owned()))
        } else {
            Some(CommError::new(
                ErrorKind::Aborted,
                format!("rank {rank} aborted the group: {msg}"),
            ))
        }
    }

    /// Why `rank` will never arrive, if it will not: its communicator was dropped, or its
    /// process is gone (killed, crashed, exited).
    fn gone(&self, rank: usize) -> Option<String> {
        let c = self.ctl(rank);
        let pid = c.pid.load(SeqCst);
        if c.closed.load(SeqCst) != 0 {
            return Some(format!(
                "rank {rank} (pid {pid}) closed its communicator (dropped it, or its process is exiting)"
            ));
        }
        if pid != 0 && !pid_alive(pid) {
            return Some(format!(
                "rank {rank} (pid {pid}) died (its process exited or was killed)"
            ));
        }
        None
    }

    /// What `rank` last said it was doing, for the watchdog message.
    fn doing(&self, rank: usize) -> String {
        let (a, b) = (self.info(rank, 0), self.info(rank, 1));
        let latest = if a.seq.load(SeqCst) >= b.seq.load(SeqCst) {
            a
        } else {
            b
        };
        let seq = latest.seq.load(SeqCst);
        if seq == 0 {
            return format!("rank {rank} has not entered any collective");
        }
        let code = latest.code.load(SeqCst);
        let dt = DType::from_code(latest.dtype.load(SeqCst)).map_or("?", |d| d.name());
        format!(
            "rank {rank} last entered {} #{seq} of {} {dt}",
            opcode::label(code),
            latest.count.load(SeqCst)
        )
    }

    /// Fails the group with a watchdog message naming the operation and the missing ranks.
    pub(crate) fn fail_wait(
        &self,
        what: &str,
        missing: &[usize],
        cause: Option<String>,
    ) -> CommError {
        if let Some(e) = self.aborted() {
            return e;
        }
        let doing: Vec<String> = missing.iter().map(|&r| self.doing(r)).collect();
        let (kind, msg) = match cause {
            Some(c) => (
                ErrorKind::PeerDied,
                format!(
                    "rustspeed-comm: {c} while rank {} of {} waited in {what}; ranks that did not arrive: {missing:?} ({})",
                    self.rank,
                    self.world,
                    doing.join("; ")
                ),
            ),
            None => (
                ErrorKind::Timeout,
                format!(
                    "rustspeed-comm watchdog: {what} did not finish within {:.1}s on rank {} of {}; ranks that did not arrive: {missing:?} ({}); \
                     a rank is stuck or skipped this collective; RUSTSPEED_COMM_TIMEOUT=<seconds> changes the limit",
                    self.timeout.as_secs_f64(),
                    self.rank,
                    self.world,
                    doing.join("; ")
                ),
            ),
        };
        self.abort(&msg);
        CommError::new(kind, msg)
    }

    /// Waits until `ready(word)`, sleeping on `word` after a short spin. Fails on abort, on the
    /// deadline and when one of `missing()` is gone.
    fn wait_word(
        &self,
        word: &AtomicU32,
        sleepers: &AtomicU32,
        ready: impl Fn(u32) -> bool,
        deadline: Instant,
        what: &dyn Fn() -> String,
        missing: &dyn Fn() -> Vec<usize>,
    ) -> Result<()> {
        let mut spins = 0u32;
        let spin_until = Instant::now() + Duration::from_micros(30);
        let mut next_check = Instant::now();
        loop {
            let v = word.load(Acquire);
            if ready(v) {
                return Ok(());
            }
            spins += 1;
            if !spins.is_multiple_of(64) || Instant::now() < spin_until {
                std::hint::spin_loop();
                continue;
            }
            if let Some(e) = self.aborted() {
                return Err(e);
            }
            let now = Instant::now();
            if now >= next_check {
                let miss = missing();
                for &r in &miss {
                    if let Some(cause) = self.gone(r) {
                        // `missing()` looked before `gone()` did: in between, `r` may have
                        // arrived, finished the collective and closed its communicator (the
                        // normal end of the last collective). Its last publish precedes its
                        // close, so now that the close is seen, a fresh look sees the publish:
                        // only a rank that is gone and still missing will never arrive.
                        if ready(word.load(SeqCst)) {
                            return Ok(());
                        }
                        let still = missing();
                        if still.contains(&r) {
                            return Err(self.fail_wait(&what(), &still, Some(cause)));
                        }
                    }
                }
                if now >= deadline {
                    return Err(self.fail_wait(&what(), &miss, None));
                }
                next_check = now + Duration::from_millis(20);
            }
            sleepers.fetch_add(1, SeqCst);
            if !ready(word.load(SeqCst)) {
                let left = deadline.saturating_duration_since(now);
                futex::wait(word, v, left.min(Duration::from_millis(20)));
            }
            sleepers.fetch_sub(1, SeqCst);
        }
    }

    // ---- point to point ------------------------------------------------------------------

    /// (written, read, writer_sleepers, reader_sleepers) of the ring src -> dst.
    fn pair(&self, src: usize, dst: usize) -> (&AtomicU32, &AtomicU32, &AtomicU32, &AtomicU32) {
        let o = self.layout.pair_ctl_off() + (src * self.world + dst) * PAIR_CTL_BYTES;
        (
            self.u32_at(o),
            self.u32_at(o + 4),
            self.u32_at(o + 8),
            self.u32_at(o + 12),
        )
    }

    fn ring(&self, src: usize, dst: usize) -> *mut u8 {
        // SAFETY: in bounds by construction of Layout.
        unsafe {
            self.base
                .add(self.layout.ring_off() + (src * self.world + dst) * self.layout.p2p_bytes)
        }
    }

    fn ring_send(
        &self,
        dst: usize,
        bytes: &[u8],
        deadline: Instant,
        what: &dyn Fn() -> String,
    ) -> Result<()> {
        let cap = self.layout.p2p_bytes as u32;
        let (written, read, wsleep, rsleep) = self.pair(self.rank, dst);
        let ring = self.ring(self.rank, dst);
        let mut done = 0;
        while done < bytes.len() {
            let w = written.load(Relaxed);
            let r = read.load(Acquire);
            let free = cap - w.wrapping_sub(r);
            if free == 0 {
                self.wait_word(read, wsleep, |v| v != r, deadline, what, &|| vec![dst])?;
                continue;
            }
            let pos = (w % cap) as usize;
            let n = (free as usize)
                .min(cap as usize - pos)
                .min(bytes.len() - done);
            // SAFETY: [pos, pos+n) is free ring space that only this sender writes.
            unsafe { std::ptr::copy_nonoverlapping(bytes[done..].as_ptr(), ring.add(pos), n) };
            written.store(w.wrapping_add(n as u32), SeqCst);
            if rsleep.load(SeqCst) > 0 {
                futex::wake_all(written);
            }
            done += n;
        }
        Ok(())
    }

    fn ring_recv(
        &self,
        src: usize,
        out: &mut [u8],
        deadline: Instant,
        what: &dyn Fn() -> String,
    ) -> Result<()> {
        let cap = self.layout.p2p_bytes as u32;
        let (written, read, wsleep, rsleep) = self.pair(src, self.rank);
        let ring = self.ring(src, self.rank);
        let mut done = 0;
        while done < out.len() {
            let r = read.load(Relaxed);
            let w = written.load(Acquire);
            let avail = w.wrapping_sub(r);
            if avail == 0 {
                self.wait_word(written, rsleep, |v| v != w, deadline, what, &|| vec![src])?;
                continue;
            }
            let pos = (r % cap) as usize;
            let n = (avail as usize)
                .min(cap as usize - pos)
                .min(out.len() - done);
            // SAFETY: [pos, pos+n) holds bytes the sender published.
            unsafe { std::ptr::copy_nonoverlapping(ring.add(pos), out[done..].as_mut_ptr(), n) };
            read.store(r.wrapping_add(n as u32), SeqCst);
            if wsleep.load(SeqCst) > 0 {
                futex::wake_all(read);
            }
            done += n;
        }
        Ok(())
    }

    /// Sends `buf` to `dst`; returns when it is all in the ring (the receiver may not have it yet).
    pub fn send<T: Elem>(&self, buf: &[T], dst: usize) -> Result<()> {
        self.check_peer(dst, "send to")?;
        let mut seq = self.p2p_seq[dst].lock().unwrap();
        seq.0 += 1;
        let s = seq.0;
        let deadline = Instant::now() + self.timeout;
        let what = || {
            format!(
                "send #{s} of {} {} elements to rank {dst}",
                buf.len(),
                T::DTYPE.name()
            )
        };
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&(buf.len() as u64).to_le_bytes());
        head[8..12].copy_from_slice(&(T::DTYPE as u32).to_le_bytes());
        self.ring_send(dst, &head, deadline, &what)?;
        // SAFETY: T is a plain number type; viewing it as bytes is fine.
        let bytes = unsafe {
            std::slice::from_raw_parts(buf.as_ptr() as *const u8, std::mem::size_of_val(buf))
        };
        self.ring_send(dst, bytes, deadline, &what)
    }

    /// Receives exactly `buf.len()` elements from `src`; the sender must send that many.
    pub fn recv<T: Elem>(&self, buf: &mut [T], src: usize) -> Result<()> {
        self.check_peer(src, "recv from")?;
        let mut seq = self.p2p_seq[src].lock().unwrap();
        seq.1 += 1;
        let s = seq.1;
        let deadline = Instant::now() + self.timeout;
        let n = buf.len();
        let what = || {
            format!(
                "recv #{s} of {n} {} elements from rank {src}",
                T::DTYPE.name()
            )
        };
        let mut head = [0u8; 16];
        self.ring_recv(src, &mut head, deadline, &what)?;
        let count = u64::from_le_bytes(head[..8].try_into().unwrap()) as usize;
        let dtype = DType::from_code(u32::from_le_bytes(head[8..12].try_into().unwrap()));
        if count != n || dtype != Some(T::DTYPE) {
            let msg = format!(
                "rustspeed-comm: rank {} posted recv #{s} of {n} {} elements from rank {src}, but rank {src} sent {count} {} elements",
                self.rank,
                T::DTYPE.name(),
                dtype.map_or("?", |d| d.name())
            );
            self.abort(&msg);
            return Err(CommError::new(ErrorKind::Mismatch, msg));
        }
        // SAFETY: as in send; every bit pattern is a valid f32/bf16/f16.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, std::mem::size_of_val(buf))
        };
        self.ring_recv(src, bytes, deadline, &what)
    }

    fn check_peer(&self, peer: usize, what: &str) -> Result<()> {
        if peer >= self.world || peer == self.rank {
            return Err(CommError::invalid(format!(
                "{what} rank {peer}: ranks are 0..{} and this is rank {}",
                self.world, self.rank
            )));
        }
        if let Some(e) = self.aborted() {
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.ctl(self.rank).closed.store(1, SeqCst);
        self.wake_everyone();
    }
}

/// Whether a process exists and is not a zombie (a killed child stays a zombie until its
/// parent reaps it, and must count as dead).
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks existence/permission.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold spaces.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z') | Some('X')
        ),
        Err(_) => r == 0,
    }
}

/// The collective state of one rank: owned by its communication thread.
pub struct ShmGroup {
    pub region: std::sync::Arc<Region>,
    round: u32,
    seq: u64,
    pub(crate) scratch: Vec<u8>,
    /// Single-copy mode: peers read each other's buffers with process_vm_readv (see
    /// `shm_cma`), when every rank may read every other's memory.
    pub(crate) cma: bool,
}

impl ShmGroup {
    pub fn new(region: std::sync::Arc<Region>, cma: bool) -> ShmGroup {
        ShmGroup {
            region,
            round: 0,
            seq: 0,
            scratch: Vec::new(),
            cma,
        }
    }

    pub fn reduce_scatter<T: Elem>(
        &mut self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        if self.cma {
            self.reduce_scatter_cma(input, output, op)
        } else {
            self.reduce_scatter_staged(input, output, op)
        }
    }

    pub fn all_gather<T: Elem>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        if self.cma {
            self.all_gather_cma(input, output)
        } else {
            self.all_gather_staged(input, output)
        }
    }

    pub fn all_reduce<T: Elem>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        if self.cma {
            self.all_reduce_cma(buf, op)
        } else {
            self.all_reduce_staged(buf, op)
        }
    }

    pub(crate) fn begin(
        &mut self,
        name: String,
        code: u32,
        dtype: DType,
        count: usize,
    ) -> Result<OpCtx> {
        if let Some(e) = self.region.aborted() {
            return Err(e);
        }
        self.seq += 1;
        let info = self.region.info(self.region.rank, self.seq);
        info.code.store(code, SeqCst);
        info.dtype.store(dtype as u32, SeqCst);
        info.count.store(count as u64, SeqCst);
        info.seq.store(self.seq, SeqCst);
        Ok(OpCtx {
            name,
            code,
            dtype,
            count,
            seq: self.seq,
            start: Instant::now(),
        })
    }

    /// The half the next round writes into.
    fn next_half(&self) -> usize {
        (self.round.wrapping_add(1) % 2) as usize
    }

    /// Publishes the next round and waits for every peer to publish it too.
    pub(crate) fn sync(&mut self, ctx: &OpCtx) -> Result<()> {
        self.publish();
        self.wait_peers(ctx)
    }

    /// Publishes the next round: my half for it is written.
    pub(crate) fn publish(&mut self) {
        let reg = &*self.region;
        self.round = self.round.wrapping_add(1);
        let me = reg.ctl(reg.rank);
        me.round.store(self.round, SeqCst);
        if me.sleepers.load(SeqCst) > 0 {
            futex::wake_all(me.round);
        }
    }

    /// Waits until every peer has published the round I published last.
    pub(crate) fn wait_peers(&self, ctx: &OpCtx) -> Result<()> {
        let reg = &*self.region;
        let target = self.round;
        let arrived = |v: u32| v.wrapping_sub(target) as i32 >= 0;
        let deadline = ctx.start + reg.timeout;
        for p in (0..reg.world).filter(|&p| p != reg.rank) {
            let c = reg.ctl(p);
            let missing = || {
                (0..reg.world)
                    .filter(|&q| q != reg.rank && !arrived(reg.ctl(q).round.load(SeqCst)))
                    .collect()
            };
            reg.wait_word(
                c.round,
                c.sleepers,
                arrived,
                deadline,
                &|| ctx.describe(),
                &missing,
            )?;
        }
        Ok(())
    }

    /// After the first round of a collective: every peer must be in the same one.
    pub(crate) fn check_match(&self, ctx: &OpCtx) -> Result<()> {
        let reg = &*self.region;
        for p in (0..reg.world).filter(|&p| p != reg.rank) {
            let info = reg.info(p, ctx.seq);
            let (seq, code) = (info.seq.load(SeqCst), info.code.load(SeqCst));
            let dtype = info.dtype.load(SeqCst);
            let count = info.count.load(SeqCst) as usize;
            if seq != ctx.seq || code != ctx.code || dtype != ctx.dtype as u32 || count != ctx.count
            {
                let theirs = format!(
                    "{} #{seq} of {count} {} elements",
                    opcode::label(code),
                    DType::from_code(dtype).map_or("?", |d| d.name()),
                );
                let msg = format!(
                    "rustspeed-comm: collective mismatch: rank {} called {} but rank {p} called {theirs}; \
                     every rank must call the same collectives, in the same order, with the same sizes",
                    reg.rank,
                    ctx.describe()
                );
                reg.abort(&msg);
                return Err(CommError::new(ErrorKind::Mismatch, msg));
            }
        }
        Ok(())
    }

    pub fn barrier(&mut self) -> Result<()> {
        let ctx = self.begin("barrier".into(), opcode::BARRIER, DType::F32, 0)?;
        self.sync(&ctx)?;
        self.check_match(&ctx)
    }

    /// `output` (len c) = rank's piece of op(inputs) (len n, ceil(n/world) == c).
    fn reduce_scatter_staged<T: Elem>(
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
        let (ws, me, n, c) = (
            self.region.world,
            self.region.rank,
            input.len(),
            output.len(),
        );
        let q = (self.region.half_bytes() / (ws * size_of::<T>())).max(1);
        let mut off = 0;
        let mut first = true;
        while first || off < c {
            let len = q.min(c - off);
            let half = self.next_half();
            // Copy the pieces the other ranks own into my half (zero past the end of input).
            let mine = self.region.slot(me, half) as *mut T;
            for d in (0..ws).filter(|&d| d != me) {
                // SAFETY: piece d of my half has q >= len elements; only I write my half.
                let dst = unsafe { std::slice::from_raw_parts_mut(mine.add(d * q), len) };
                copy_padded(input, d * c + off, dst);
            }
            self.sync(&ctx)?;
            if first {
                self.check_match(&ctx)?;
                first = false;
            }
            let local_lo = me * c + off;
            let local: &[T] = if local_lo + len <= n {
                &input[local_lo..local_lo + len]
            } else {
                let tmp = scratch_as::<T>(&mut self.scratch, len);
                copy_padded(input, local_lo, tmp);
                tmp
            };
            let srcs: Vec<&[T]> = (0..ws)
                .map(|p| {
                    if p == me {
                        local
                    } else {
                        // SAFETY: p published this round; its half stays untouched until the next.
                        unsafe {
                            std::slice::from_raw_parts(
                                (self.region.slot(p, half) as *const T).add(me * q),
                                len,
                            )
                        }
                    }
                })
                .collect();
            reduce_into(&srcs, &mut output[off..off + len], op, ws);
            off += len;
        }
        Ok(())
    }

    /// `output` (len n) = concatenation of every rank's `input` (len c = ceil(n/world)),
    /// the padding past n dropped.
    fn all_gather_staged<T: Elem>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let ctx = self.begin(
            "all_gather".into(),
            opcode::ALL_GATHER,
            T::DTYPE,
            output.len(),
        )?;
        let (ws, me, n, c) = (
            self.region.world,
            self.region.rank,
            output.len(),
            input.len(),
        );
        let q = (self.region.half_bytes() / size_of::<T>()).max(1);
        let mut off = 0;
        let mut first = true;
        while first || off < c {
            let len = q.min(c - off);
            let half = self.next_half();
            // SAFETY: my half holds q >= len elements.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    input[off..].as_ptr(),
                    self.region.slot(me, half) as *mut T,
                    len,
                )
            };
            self.publish();
            // My own piece needs no peer: copy it while they catch up.
            let (lo, hi) = ((me * c + off).min(n), (me * c + off + len).min(n));
            output[lo..hi].copy_from_slice(&input[off..off + (hi - lo)]);
            self.wait_peers(&ctx)?;
            if first {
                self.check_match(&ctx)?;
                first = false;
            }
            for p in (0..ws).filter(|&p| p != me) {
                let lo = (p * c + off).min(n);
                let hi = (p * c + off + len).min(n);
                let src = self.region.slot(p, half) as *const T;
                // SAFETY: hi - lo <= len elements are readable at src.
                unsafe { std::ptr::copy_nonoverlapping(src, output[lo..hi].as_mut_ptr(), hi - lo) };
            }
            off += len;
        }
        Ok(())
    }

    /// In place: `buf` = op over ranks of `buf`.
    fn all_reduce_staged<T: Elem>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let ctx = self.begin(
            format!("all_reduce({})", op.name()),
            opcode::ALL_REDUCE | op.code() << 8,
            T::DTYPE,
            buf.len(),
        )?;
        let (ws, me, n) = (self.region.world, self.region.rank, buf.len());
        // Per round each rank owns a piece of q elements of a chunk of q * ws.
        let q = (self.region.half_bytes() / (ws * size_of::<T>())).max(1);
        let mut base = 0;
        let mut first = true;
        while first || base < n {
            let chunk = (q * ws).min(n - base);
            let pc = chunk.div_ceil(ws);
            let piece = |p: usize| (base + (p * pc).min(chunk), base + ((p + 1) * pc).min(chunk));
            // Round 1: hand out the pieces others own; reduce mine into my next half.
            let half = self.next_half();
            let mine = self.region.slot(me, half) as *mut T;
            for d in (0..ws).filter(|&d| d != me) {
                let (lo, hi) = piece(d);
                // SAFETY: piece d of my half has q >= hi - lo elements.
                unsafe {
                    std::ptr::copy_nonoverlapping(buf[lo..].as_ptr(), mine.add(d * q), hi - lo)
                };
            }
            self.sync(&ctx)?;
            if first {
                self.check_match(&ctx)?;
                first = false;
            }
            let (lo, hi) = piece(me);
            let out_half = self.next_half();
            {
                let srcs: Vec<&[T]> = (0..ws)
                    .map(|p| {
                        if p == me {
                            &buf[lo..hi]
                        } else {
                            // SAFETY: p published this round.
                            unsafe {
                                std::slice::from_raw_parts(
                                    (self.region.slot(p, half) as *const T).add(me * q),
                                    hi - lo,
                                )
                            }
                        }
                    })
                    .collect();
                // SAFETY: my other half is free (peers finished reading it before this round).
                let out = unsafe {
                    std::slice::from_raw_parts_mut(
                        self.region.slot(me, out_half) as *mut T,
                        hi - lo,
                    )
                };
                reduce_into(&srcs, out, op, ws);
            }
            // Round 2: everybody copies every reduced piece out, mine while the others finish.
            self.publish();
            let (mlo, mhi) = piece(me);
            // SAFETY: my half out_half holds my reduced piece.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.region.slot(me, out_half) as *const T,
                    buf[mlo..].as_mut_ptr(),
                    mhi - mlo,
                )
            };
            self.wait_peers(&ctx)?;
            for p in (0..ws).filter(|&p| p != me) {
                let (lo, hi) = piece(p);
                // SAFETY: p's half out_half holds its reduced piece (hi - lo elements).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.region.slot(p, out_half) as *const T,
                        buf[lo..].as_mut_ptr(),
                        hi - lo,
                    )
                };
            }
            base += chunk;
        }
        Ok(())
    }

    /// `buf` on every rank = `buf` on `root`.
    pub fn broadcast<T: Elem>(&mut self, buf: &mut [T], root: usize) -> Result<()> {
        let ctx = self.begin(
            format!("broadcast(root {root})"),
            opcode::BROADCAST | (root as u32) << 8,
            T::DTYPE,
            buf.len(),
        )?;
        let me = self.region.rank;
        let q = (self.region.half_bytes() / size_of::<T>()).max(1);
        let mut off = 0;
        let mut first = true;
        while first || off < buf.len() {
            let len = q.min(buf.len() - off);
            let half = self.next_half();
            if me == root {
                // SAFETY: my half holds q >= len elements.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        buf[off..].as_ptr(),
                        self.region.slot(me, half) as *mut T,
                        len,
                    )
                };
            }
            self.sync(&ctx)?;
            if first {
                self.check_match(&ctx)?;
                first = false;
            }
            if me != root {
                // SAFETY: root published this round.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.region.slot(root, half) as *const T,
                        buf[off..].as_mut_ptr(),
                        len,
                    )
                };
            }
            off += len;
        }
        Ok(())
    }
}

/// dst = src[lo .. lo + dst.len()], zeros where that runs past the end of src.
fn copy_padded<T: Elem>(src: &[T], lo: usize, dst: &mut [T]) {
    let avail = src.len().saturating_sub(lo).min(dst.len());
    if avail > 0 {
        dst[..avail].copy_from_slice(&src[lo..lo + avail]);
    }
    dst[avail..].fill(T::default());
}

/// Reuses a byte buffer as `len` elements of T (T is a plain number; alignment from u8 Vec is
/// not guaranteed, so over-allocate and align).
pub(crate) fn scratch_as<T: Elem>(scratch: &mut Vec<u8>, len: usize) -> &mut [T] {
    let align = std::mem::align_of::<T>();
    let need = len * size_of::<T>() + align;
    if scratch.len() < need {
        scratch.resize(need, 0);
    }
    let off = scratch.as_ptr().align_offset(align);
    // SAFETY: aligned, in bounds, and every bit pattern is a valid T.
    unsafe { std::slice::from_raw_parts_mut(scratch.as_mut_ptr().add(off) as *mut T, len) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::sync::Arc;

    /// Rank 0 and rank 1 of a world of two, mapped in this process, as collective groups.
    fn pair(name: &str) -> (ShmGroup, ShmGroup) {
        let path = shm_dir().join(format!(
            "rustspeed-comm-test-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&path);
        let layout = Layout {
            world: 2,
            half_bytes: 4096,
            p2p_bytes: 4096,
        };
        let timeout = Duration::from_secs(20);
        let r0 = Region::create(&path, layout, timeout).unwrap();
        let r1 = Region::open(&path, 1, 2, timeout).unwrap();
        std::fs::remove_file(&path).unwrap();
        (
            ShmGroup::new(Arc::new(r0), false),
            ShmGroup::new(Arc::new(r1), false),
        )
    }

    /// Rank 0 waits for rank 1 in a barrier; the first time rank 0's watchdog lists the missing
    /// ranks, rank 1 is made to act right after the list is taken (`peer_acts`), as a peer
    /// running on another core or scheduled in between would.
    fn wait_with_interleaving(peer_acts: impl Fn(ShmGroup)) -> Result<()> {
        let (mut g0, g1) = pair("interleave");
        let ctx = g0
            .begin("barrier".into(), opcode::BARRIER, DType::F32, 0)
            .unwrap();
        g0.publish();
        let reg = g0.region.clone();
        let target = g0.round;
        let arrived = |v: u32| v.wrapping_sub(target) as i32 >= 0;
        let peer = RefCell::new(Some(g1));
        let looked = Cell::new(false);
        let missing = || {
            let miss: Vec<usize> = (!arrived(reg.ctl(1).round.load(SeqCst)))
                .then_some(1)
                .into_iter()
                .collect();
            if !looked.replace(true) {
                assert_eq!(miss, [1], "rank 1 has not published yet");
                peer_acts(peer.borrow_mut().take().unwrap());
            }
            miss
        };
        let c = reg.ctl(1);
        reg.wait_word(
            c.round,
            c.sleepers,
            arrived,
            ctx.start + reg.timeout,
            &|| ctx.describe(),
            &missing,
        )
    }

    /// The race seen in the ZeRO tests under load: the peer arrives, finishes the collective
    /// and drops its communicator between the watchdog's "who is missing" and "is it gone"
    /// looks. It arrived, so this is a success, not "rank 1 closed its communicator".
    #[test]
    fn peer_that_arrives_then_closes_between_the_watchdog_looks_has_arrived() {
        let r = wait_with_interleaving(|mut g1| {
            let ctx = g1
                .begin("barrier".into(), opcode::BARRIER, DType::F32, 0)
                .unwrap();
            g1.sync(&ctx).unwrap(); // rank 0 published already: returns at once
            drop(g1); // the last Arc of rank 1's region: marks it closed
        });
        r.unwrap();
    }

    /// The watchdog still fails at once for a peer that closes without arriving.
    #[test]
    fn peer_that_closes_without_arriving_is_reported() {
        let e = wait_with_interleaving(drop).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PeerDied, "{e}");
        assert!(e.message.contains("rank 1"), "{e}");
        assert!(e.message.contains("closed its communicator"), "{e}");
        assert!(e.message.contains("ranks that did not arrive: [1]"), "{e}");
    }
}
