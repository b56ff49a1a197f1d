//! NCCL over device buffers (cargo feature `cuda`), through cudarc with the CUDA libraries
//! loaded at run time, so this compiles on machines without a CUDA toolkit. The unique id
//! travels through the rendezvous store of a host `Communicator` (rank 0 makes it).
//!
//! Same conventions as the host collectives: reduce_scatter's output is this rank's
//! `ceil(n/ws)` piece, except that NCCL needs equal blocks, so the caller pads the input to
//! `ws * output.len()` (ZeRO's flat buffers already are). Not done yet: the watchdog (NCCL
//! calls are asynchronous on the stream; a stuck one needs ncclCommAbort from a monitor).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, NcclType, ReduceOp as NcclOp};

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
    comm: Comm,
    rank: usize,
    world: usize,
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
        let comm = Comm::from_rank(stream, rank, world, id)
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(NcclComm { comm, rank, world })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.world
    }
    /// The stream every collective is queued on (they are asynchronous to the host).
    pub fn stream(&self) -> Arc<CudaStream> {
        self.comm.stream()
    }
    /// Waits until every queued collective has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.comm
            .stream()
            .synchronize()
            .map_err(|e| nccl_err("stream synchronize", e))
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
        self.comm
            .all_reduce_in_place(buf, &Self::op(op))
            .map(|_| ())
            .map_err(|e| nccl_err("all_reduce", e))
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
        self.comm
            .reduce_scatter(input, output, &Self::op(op))
            .map(|_| ())
            .map_err(|e| nccl_err("reduce_scatter", e))
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
        self.comm
            .all_gather(input, output)
            .map(|_| ())
            .map_err(|e| nccl_err("all_gather", e))
    }

    /// In place from `root`.
    pub fn broadcast<T: NcclType>(&self, buf: &mut CudaSlice<T>, root: usize) -> Result<()> {
        if root >= self.world {
            return Err(CommError::invalid(format!(
                "NCCL broadcast from root {root}: ranks are 0..{}",
                self.world
            )));
        }
        self.comm
            .broadcast_in_place(buf, root as i32)
            .map(|_| ())
            .map_err(|e| nccl_err("broadcast", e))
    }
}
