//! NCCL over device buffers (cargo feature `cuda`), through cudarc with the CUDA libraries
//! loaded at run time, so this compiles on machines without a CUDA toolkit. The unique id
//! travels through the rendezvous store of a host `Communicator` (rank 0 makes it).
//!
//! Same conventions as the host collectives: reduce_scatter's output is this rank's
//! `ceil(n/ws)` piece, except that NCCL needs equal blocks, so the caller pads the input to
//! `ws * output.len()` (ZeRO's flat buffers already are).
//!
//! Watchdog: NCCL calls only queue work on the stream, so each collective is recorded with a
//! CUDA event, and `synchronize` polls the events (`async_watchdog`); one that does not finish
//! within the timeout fails naming the operation, its size and the ranks that never queued it,
//! and the communicator is aborted (ncclCommAbort), so every later call fails too instead of
//! hanging. Only compiled here (CI has no GPU): run `cargo test -p rustspeed-comm --features
//! cuda` on a machine with one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, NcclType, ReduceOp as NcclOp};

use crate::async_watchdog::{wait_all, Progress, QueuedOp};
use crate::communicator::Communicator;
use crate::elem::ReduceOp;
use crate::error::{CommError, ErrorKind, Result};
use crate::store::Store;

/// Whether the CUDA driver and NCCL libraries can be loaded on this machine.
pub fn nccl_available() -> bool {
    // SAFETY: these only try to dlopen the libraries.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

/// One rank's NCCL communicator on one GPU.
pub struct NcclComm {
    /// None once aborted by the watchdog (dropping a cudarc `Comm` calls ncclCommAbort).
    comm: Mutex<Option<Comm>>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    /// A store client of its own, where ranks publish how many collectives they queued.
    store: Store,
    prefix: String,
    timeout: Duration,
    watch: Mutex<Watch>,
}

/// Collectives queued since the last `synchronize`, and the count published so far.
#[derive(Default)]
struct Watch {
    queued: Vec<(QueuedOp, CudaEvent)>,
    seq: u64,
    published: u64,
    failed: Option<CommError>,
}

/// "f32", "bf16", ... from the Rust type name.
fn dtype_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> CommError {
    CommError::new(ErrorKind::Setup, format!("NCCL {what}: {e:?}"))
}

impl NcclComm {
    /// Joins the NCCL group of `host`'s ranks on GPU `ordinal` (usually LOCAL_RANK).
    pub fn from_communicator(host: &Communicator, ordinal: usize) -> Result<NcclComm> {
        let store = host.store().ok_or_else(|| {
            CommError::setup("NCCL needs the rendezvous store of a host communicator made by from_env/with_store")
        })?;
        Self::new(store, host.rank(), host.world_size(), ordinal)
    }

    /// Creates the communicator: rank 0 makes the unique id and publishes it in `store`.
    pub fn new(store: &Store, rank: usize, world: usize, ordinal: usize) -> Result<NcclComm> {
        if !nccl_available() {
            return Err(CommError::not_supported(
                "NCCL on this machine: the CUDA driver (libcuda.so) or NCCL (libnccl.so) could not be loaded; \
                 use the shm or mpi backend on CPU",
            ));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| nccl_err(&format!("opening GPU {ordinal}"), e))?;
        let stream = ctx.default_stream();
        let generation = store.add(&format!("rustspeed/nccl_generation/{rank}"), 1)?;
        let key = format!("rustspeed/nccl{generation}/id");
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            store.set(&key, &bytes)?;
            id
        } else {
            let bytes = store.get(&key)?;
            if bytes.len() != 128 {
                return Err(CommError::setup(format!(
                    "NCCL unique id from the store has {} bytes, expected 128",
                    bytes.len()
                )));
            }
            let mut raw = [0 as std::ffi::c_char; 128];
            for (r, b) in raw.iter_mut().zip(&bytes) {
                *r = *b as std::ffi::c_char;
            }
            Id::uninit(raw)
        };
        let comm = Comm::from_rank(stream.clone(), rank, world, id)
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(NcclComm {
            comm: Mutex::new(Some(comm)),
            stream,
            rank,
            world,
            store: store.reconnect()?,
            prefix: format!("rustspeed/nccl{generation}"),
            timeout: store.timeout(),
            watch: Mutex::new(Watch::default()),
        })
    }

    /// Queues `call` as collective `name` of `count` elements, recording its completion event.
    fn queue<T>(
        &self,
        name: &'static str,
        count: usize,
        call: impl FnOnce(&Comm) -> std::result::Result<(), cudarc::nccl::result::NcclError>,
    ) -> Result<()> {
        let mut w = self.watch.lock().unwrap();
        if let Some(e) = &w.failed {
            return Err(e.clone());
        }
        let guard = self.comm.lock().unwrap();
        let comm = guard
            .as_ref()
            .expect("an aborted communicator has `failed` set");
        call(comm).map_err(|e| nccl_err(name, e))?;
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| nccl_err("recording a completion event", e))?;
        w.seq += 1;
        let op = QueuedOp {
            name,
            seq: w.seq,
            count,
            elem_bytes: std::mem::size_of::<T>(),
            dtype: dtype_name::<T>(),
            queued_at: Instant::now(),
        };
        w.queued.push((op, event));
        Ok(())
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.world
    }
    /// The stream every collective is queued on (they are asynchronous to the host).
    pub fn stream(&self) -> Arc<CudaStream> {
        self.stream.clone()
    }

    /// Waits until every queued collective has finished, or fails (and aborts the
    /// communicator) when one does not finish within the watchdog timeout.
    pub fn synchronize(&self) -> Result<()> {
        let mut w = self.watch.lock().unwrap();
        if let Some(e) = &w.failed {
            return Err(e.clone());
        }
        let progress = Progress {
            store: &self.store,
            prefix: self.prefix.clone(),
            rank: self.rank,
            world: self.world,
        };
        let Watch {
            queued,
            seq,
            published,
            ..
        } = &mut *w;
        progress.publish(*seq, published)?;
        let ops: Vec<QueuedOp> = queued.iter().map(|(op, _)| op.clone()).collect();
        let r = wait_all(
            &ops,
            |i| {
                queued[i]
                    .1
                    .try_is_complete()
                    .map_err(|e| nccl_err("waiting for a collective", e))
            },
            self.timeout,
            &progress,
        );
        queued.clear();
        if let Err(e) = &r {
            w.failed = Some(e.clone());
            // ncclCommAbort: frees the peers' and our stuck kernels' resources.
            drop(self.comm.lock().unwrap().take());
        }
        r
    }

    fn op(op: ReduceOp) -> NcclOp {
        match op {
            ReduceOp::Sum => NcclOp::Sum,
            ReduceOp::Mean => NcclOp::Avg,
            ReduceOp::Max => NcclOp::Max,
        }
    }

    /// In place, queued on `stream()`.
    pub fn all_reduce<T: NcclType>(&self, buf: &mut CudaSlice<T>, op: ReduceOp) -> Result<()> {
        let n = buf.len();
        self.queue::<T>("all_reduce", n, |c| {
            c.all_reduce_in_place(buf, &Self::op(op)).map(|_| ())
        })
    }

    /// `input.len()` must be `world_size * output.len()` (pad the flat buffer).
    pub fn reduce_scatter<T: NcclType>(
        &self,
        input: &CudaSlice<T>,
        output: &mut CudaSlice<T>,
        op: ReduceOp,
    ) -> Result<()> {
        if input.len() != self.world * output.len() {
            return Err(CommError::invalid(format!(
                "NCCL reduce_scatter: input of {} elements must be world_size ({}) x output ({}); pad it",
                input.len(),
                self.world,
                output.len()
            )));
        }
        self.queue::<T>("reduce_scatter", input.len(), |c| {
            c.reduce_scatter(input, output, &Self::op(op)).map(|_| ())
        })
    }

    /// `output.len()` must be `world_size * input.len()`.
    pub fn all_gather<T: NcclType>(
        &self,
        input: &CudaSlice<T>,
        output: &mut CudaSlice<T>,
    ) -> Result<()> {
        if output.len() != self.world * input.len() {
            return Err(CommError::invalid(format!(
                "NCCL all_gather: output of {} elements must be world_size ({}) x input ({})",
                output.len(),
                self.world,
                input.len()
            )));
        }
        let n = output.len();
        self.queue::<T>("all_gather", n, |c| c.all_gather(input, output).map(|_| ()))
    }

    /// In place from `root`.
    pub fn broadcast<T: NcclType>(&self, buf: &mut CudaSlice<T>, root: usize) -> Result<()> {
        if root >= self.world {
            return Err(CommError::invalid(format!(
                "NCCL broadcast from root {root}: ranks are 0..{}",
                self.world
            )));
        }
        let n = buf.len();
        self.queue::<T>("broadcast", n, |c| {
            c.broadcast_in_place(buf, root as i32).map(|_| ())
        })
    }
}
