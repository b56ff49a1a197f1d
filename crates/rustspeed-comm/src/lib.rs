//! Communication for data-parallel training: a `Communicator` with all_reduce,
//! reduce_scatter, all_gather, broadcast, barrier and send/recv over f32/bf16/f16 slices
//! (f32 accumulation), non-blocking variants through `Communicator::scope`, a rank-0 TCP
//! rendezvous store, a watchdog that turns a stuck or dead peer into an error on every rank,
//! and the launcher core (`launch`: DeepSpeed hostfiles, --include/--exclude, local and
//! multi-node launchers).
//!
//! Backends: `shm` (built in, one machine: processes exchanging through a mapped file in
//! /dev/shm). Uneven sizes follow one rule, documented in `partition`.

pub mod async_watchdog;
pub mod communicator;
pub mod elem;
pub mod env;
pub mod error;
mod futex;
pub mod launch;
#[cfg(feature = "mpi")]
pub mod mpi_backend;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod partition;
pub mod shared_buf;
pub mod shm;
mod shm_cma;
mod shm_mapped;
pub mod store;

pub use communicator::{CommConfig, Communicator, Handle, Pending, Scope, DEFAULT_TIMEOUT};
pub use elem::{DType, Elem, ReduceOp};
pub use env::RankInfo;
pub use error::{CommError, ErrorKind, Result};
pub use partition::{aligned_len, partition_len, partition_range};
pub use shared_buf::SharedBuf;
pub use store::Store;
