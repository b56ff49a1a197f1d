//! Buffers that every rank of a shared-memory group can read in place (`Communicator::
//! alloc_shared`), as MPI_Win_allocate_shared or NCCL's registered buffers.
//!
//! Why: through the shared halves a collective copies every byte twice (into the half, out of
//! it), and all_gather three times (the rank's own piece too). When the caller's buffer itself
//! lives in shared memory, a rank copies a peer's piece straight out of the peer's buffer: one
//! copy per byte, the least any copying collective can do (docs/BENCHMARKS.md, issue 6).
//!
//! Allocation is collective: each rank creates a file in /dev/shm, maps it, publishes its name
//! through the rendezvous store, maps every peer's file, and once all ranks have mapped all
//! files each unlinks its own (a crash leaves nothing behind). The mappings live as long as the
//! `SharedBuf`. Without a shared-memory group (world of one, MPI) the buffer is plain memory
//! and the `*_shared` collectives fall back to the ordinary ones.

use std::fs::OpenOptions;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};

use crate::elem::Elem;
use crate::error::{CommError, Result};
use crate::shm::{human_bytes, shm_dir};
use crate::store::Store;

/// `len` elements of T that the other ranks of the group that made it can read in place.
pub struct SharedBuf<T: Elem> {
    ptr: *mut T,
    len: usize,
    storage: Storage<T>,
}

enum Storage<T> {
    /// Plain memory: the group has no shared region (world of one, MPI).
    Local { _owner: Vec<T> },
    /// Every rank's mapping, in rank order (this rank's included), and the group's id.
    Mapped {
        maps: Arc<Vec<MmapRaw>>,
        group: usize,
    },
}

// SAFETY: the buffer owns its memory (a Vec or mappings kept alive by the Arc); peers' pieces
// are only read inside collectives, which synchronise through the group's round counters.
unsafe impl<T: Elem> Send for SharedBuf<T> {}
unsafe impl<T: Elem> Sync for SharedBuf<T> {}

impl<T: Elem> Deref for SharedBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr/len describe this rank's own buffer, alive as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T: Elem> DerefMut for SharedBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as above; &mut self is exclusive on this rank, and peers read it only
        // inside a collective this rank is also in (which borrows the buffer).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Elem> SharedBuf<T> {
    /// A buffer no peer can see (world of one, MPI).
    pub(crate) fn local(len: usize) -> SharedBuf<T> {
        let mut v = vec![T::default(); len];
        SharedBuf {
            ptr: v.as_mut_ptr(),
            len,
            storage: Storage::Local { _owner: v },
        }
    }

    /// Base pointers of every rank's copy, in rank order, if `group` made this buffer.
    pub(crate) fn peers(&self, group: usize) -> Option<Vec<*mut T>> {
        match &self.storage {
            Storage::Mapped { maps, group: g } if *g == group => {
                Some(maps.iter().map(|m| m.as_mut_ptr() as *mut T).collect())
            }
            _ => None,
        }
    }

    /// Whether peers read this buffer in place (false: the collectives copy as usual).
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    /// Collective: every rank of the group calls it with the same `len`, in the same order
    /// relative to other allocations. `key` is unique to this allocation on every rank.
    pub(crate) fn alloc_mapped(
        store: &Store,
        key: &str,
        rank: usize,
        world: usize,
        group: usize,
        len: usize,
    ) -> Result<SharedBuf<T>> {
        let bytes = (len * size_of::<T>()).max(1);
        // Unique on the machine: ranks may be threads of one process, and groups come and go.
        static MADE: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = shm_dir().join(format!(
            "rustspeed-buf-{}-{rank}-{nanos:x}-{}",
            std::process::id(),
            MADE.fetch_add(1, Ordering::Relaxed)
        ));
        let setup = |what: &str, e: &dyn std::fmt::Display| {
            CommError::setup(format!(
                "shared buffer of {}: cannot {what} {}: {e} (is /dev/shm large enough? `df -h /dev/shm`; Docker: --shm-size)",
                human_bytes(bytes),
                path.display()
            ))
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| setup("create", &e))?;
        let own = (|| {
            file.set_len(bytes as u64).map_err(|e| setup("size", &e))?;
            #[cfg(target_os = "linux")]
            {
                use std::os::fd::AsRawFd;
                // SAFETY: a valid fd and an in-range length. Reserving the pages now turns a
                // full /dev/shm into this error instead of a SIGBUS mid-collective.
                let r = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, bytes as libc::off_t) };
                if r != 0 {
                    return Err(setup("reserve", &std::io::Error::from_raw_os_error(r)));
                }
            }
            MmapOptions::new()
                .len(bytes)
                .populate()
                .map_raw(&file)
                .map_err(|e| setup("map", &e))
        })();
        let own = match own {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let exchanged = (|| {
            store.set(
                &format!("{key}/path/{rank}"),
                path.to_string_lossy().as_bytes(),
            )?;
            let mut maps = Vec::with_capacity(world);
            for p in 0..world {
                if p == rank {
                    maps.push(None);
                    continue;
                }
                let peer =
                    String::from_utf8_lossy(&store.get(&format!("{key}/path/{p}"))?).into_owned();
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&peer)
                    .map_err(|e| {
                        CommError::setup(format!(
                            "shared buffer: rank {rank} cannot open rank {p}'s {peer}: {e}"
                        ))
                    })?;
                // Not populated: a rank touches only the pieces it reads, and its RSS should
                // count only those.
                let m = MmapOptions::new().len(bytes).map_raw(&f).map_err(|e| {
                    CommError::setup(format!(
                        "shared buffer: rank {rank} cannot map rank {p}'s {peer}: {e}"
                    ))
                })?;
                maps.push(Some(m));
            }
            store.add(&format!("{key}/mapped"), 1)?;
            store.wait_ge(
                &format!("{key}/mapped"),
                world as i64,
                "ranks mapping a shared buffer",
            )?;
            Ok(maps)
        })();
        // Every rank mapped every file (or setup failed): the name is no longer needed.
        let _ = std::fs::remove_file(&path);
        let mut own = Some(own);
        let maps: Vec<MmapRaw> = exchanged?
            .into_iter()
            .map(|m| m.unwrap_or_else(|| own.take().unwrap()))
            .collect();
        let ptr = maps[rank].as_mut_ptr() as *mut T;
        Ok(SharedBuf {
            ptr,
            len,
            storage: Storage::Mapped {
                maps: Arc::new(maps),
                group,
            },
        })
    }
}
