//! The `mpi` backend (cargo feature `mpi`): for ranks on several machines, under mpirun or
//! srun. MPI is initialised on the communication thread and only ever called from it
//! (MPI_THREAD_FUNNELED), so non-blocking calls overlap compute the same way as with shm.
//!
//! Differences from shm, all forced by MPI or the `mpi` crate: 16-bit reductions widen to f32
//! before MPI (MPI has no bf16; the wire carries f32), counts are 32-bit, and a collective
//! that misses the watchdog deadline cannot be cancelled, so the rank prints the watchdog
//! message and calls MPI_Abort, which ends every rank of the job (the launcher reports it).
//! One MPI communicator per process: MPI cannot be initialised twice.

use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::request::{Request, Scope as MpiScope};
use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::traits::*;

use crate::elem::{Elem, ReduceOp};
use crate::error::{CommError, Result};
use crate::shm::{human_bytes, opcode, OpCtx};

pub struct MpiGroup {
    world: SimpleCommunicator,
    pub rank: usize,
    pub size: usize,
    timeout: Duration,
    seq: u64,
    // Dropped last: MPI_Finalize.
    _universe: mpi::environment::Universe,
}

impl MpiGroup {
    /// Initialises MPI (call on the thread that will make every MPI call).
    pub fn init(timeout: Duration) -> Result<MpiGroup> {
        let (universe, _threading) =
            mpi::initialize_with_threading(mpi::Threading::Funneled).ok_or_else(|| {
                CommError::setup(
                    "mpi backend: MPI is already initialised in this process (one MPI communicator per process)",
                )
            })?;
        let world = universe.world();
        Ok(MpiGroup {
            rank: world.rank() as usize,
            size: world.size() as usize,
            world,
            timeout,
            seq: 0,
            _universe: universe,
        })
    }

    fn begin(
        &mut self,
        name: String,
        code: u32,
        dtype: crate::DType,
        count: usize,
    ) -> Result<OpCtx> {
        if count > i32::MAX as usize {
            return Err(CommError::not_supported(format!(
                "{name} of {count} elements with the mpi backend (MPI counts are 32-bit); split the buffer"
            )));
        }
        self.seq += 1;
        Ok(OpCtx {
            name,
            code,
            dtype,
            count,
            seq: self.seq,
            start: Instant::now(),
        })
    }

    /// Polls `req` until it completes; past the deadline, reports and aborts the job.
    fn finish<'a, D: ?Sized, S: MpiScope<'a>>(&self, mut req: Request<'a, D, S>, ctx: &OpCtx) {
        let deadline = ctx.start + self.timeout;
        let mut spins = 0u32;
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            spins += 1;
            if spins > 1000 {
                std::thread::sleep(Duration::from_micros(50));
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "rustspeed-comm watchdog (mpi): {} did not finish within {:.1}s on rank {} of {} ({}); \
                     MPI cannot cancel a collective, aborting the job; RUSTSPEED_COMM_TIMEOUT=<seconds> changes the limit",
                    ctx.describe(),
                    self.timeout.as_secs_f64(),
                    self.rank,
                    self.size,
                    opcode::name(ctx.code)
                );
                self.world.abort(3);
            }
        }
    }

    pub fn barrier(&mut self) -> Result<()> {
        let ctx = self.begin("barrier".into(), opcode::BARRIER, crate::DType::F32, 0)?;
        let req = self.world.immediate_barrier();
        self.finish(req, &ctx);
        Ok(())
    }

    fn reduce_f32(&self, send: &[f32], recv: &mut [f32], op: ReduceOp, scatter: bool, ctx: &OpCtx) {
        let mpi_op = match op {
            ReduceOp::Max => SystemOperation::max(),
            _ => SystemOperation::sum(),
        };
        mpi::request::scope(|scope| {
            let req = if scatter {
                self.world
                    .immediate_reduce_scatter_block_into(scope, send, recv, mpi_op)
            } else {
                self.world
                    .immediate_all_reduce_into(scope, send, recv, mpi_op)
            };
            self.finish(req, ctx);
        });
        if op == ReduceOp::Mean {
            let w = self.size as f32;
            recv.iter_mut().for_each(|x| *x /= w);
        }
    }

    pub fn all_reduce<T: Elem>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let ctx = self.begin(
            format!("all_reduce({})", op.name()),
            opcode::ALL_REDUCE | op.code() << 8,
            T::DTYPE,
            buf.len(),
        )?;
        let mut send = vec![0f32; buf.len()];
        T::widen(buf, &mut send);
        let mut recv = vec![0f32; buf.len()];
        self.reduce_f32(&send, &mut recv, op, false, &ctx);
        T::narrow(&recv, buf);
        Ok(())
    }

    pub fn reduce_scatter<T: Elem>(
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
        let c = output.len();
        // MPI wants equal blocks: pad the input to size * c with zeros.
        let mut send = vec![0f32; c * self.size];
        T::widen(input, &mut send[..input.len()]);
        let mut recv = vec![0f32; c];
        self.reduce_f32(&send, &mut recv, op, true, &ctx);
        T::narrow(&recv, output);
        Ok(())
    }

    pub fn all_gather<T: Elem>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let ctx = self.begin(
            "all_gather".into(),
            opcode::ALL_GATHER,
            T::DTYPE,
            output.len(),
        )?;
        let (padded, n) = (input.len() * self.size, output.len());
        let mut tmp = Vec::new();
        let out: &mut [T] = if padded == n {
            output
        } else {
            tmp.resize(padded, T::default());
            &mut tmp
        };
        mpi::request::scope(|scope| match T::DTYPE {
            crate::DType::F32 => {
                let req =
                    self.world
                        .immediate_all_gather_into(scope, as_f32(input), as_f32_mut(out));
                self.finish(req, &ctx);
            }
            _ => {
                let req =
                    self.world
                        .immediate_all_gather_into(scope, as_u16(input), as_u16_mut(out));
                self.finish(req, &ctx);
            }
        });
        if padded != n {
            output.copy_from_slice(&tmp[..n]);
        }
        Ok(())
    }

    pub fn broadcast<T: Elem>(&mut self, buf: &mut [T], root: usize) -> Result<()> {
        let ctx = self.begin(
            format!("broadcast(root {root})"),
            opcode::BROADCAST | (root as u32) << 8,
            T::DTYPE,
            buf.len(),
        )?;
        let root_proc = self.world.process_at_rank(root as i32);
        mpi::request::scope(|scope| match T::DTYPE {
            crate::DType::F32 => {
                let req = root_proc.immediate_broadcast_into(scope, as_f32_mut(buf));
                self.finish(req, &ctx);
            }
            _ => {
                let req = root_proc.immediate_broadcast_into(scope, as_u16_mut(buf));
                self.finish(req, &ctx);
            }
        });
        Ok(())
    }

    pub fn send<T: Elem>(&mut self, buf: &[T], dst: usize) -> Result<()> {
        self.check_peer(dst)?;
        let ctx = self.begin(format!("send to rank {dst}"), 0, T::DTYPE, buf.len())?;
        let p = self.world.process_at_rank(dst as i32);
        mpi::request::scope(|scope| match T::DTYPE {
            crate::DType::F32 => self.finish(p.immediate_send(scope, as_f32(buf)), &ctx),
            _ => self.finish(p.immediate_send(scope, as_u16(buf)), &ctx),
        });
        Ok(())
    }

    pub fn recv<T: Elem>(&mut self, buf: &mut [T], src: usize) -> Result<()> {
        self.check_peer(src)?;
        let ctx = self.begin(format!("recv from rank {src}"), 0, T::DTYPE, buf.len())?;
        let p = self.world.process_at_rank(src as i32);
        let n = buf.len();
        let status = mpi::request::scope(|scope| match T::DTYPE {
            crate::DType::F32 => {
                let req = p.immediate_receive_into(scope, as_f32_mut(buf));
                self.finish_status(req, &ctx)
            }
            _ => {
                let req = p.immediate_receive_into(scope, as_u16_mut(buf));
                self.finish_status(req, &ctx)
            }
        });
        let got = match T::DTYPE {
            crate::DType::F32 => status.count(f32::equivalent_datatype()),
            _ => status.count(u16::equivalent_datatype()),
        } as usize;
        if got != n {
            return Err(CommError::new(
                crate::ErrorKind::Mismatch,
                format!(
                    "rustspeed-comm (mpi): rank {} posted recv of {n} {} elements ({}) from rank {src}, which sent {got}",
                    self.rank,
                    T::DTYPE.name(),
                    human_bytes(n * T::DTYPE.size())
                ),
            ));
        }
        Ok(())
    }

    fn finish_status<'a, D: ?Sized, S: MpiScope<'a>>(
        &self,
        mut req: Request<'a, D, S>,
        ctx: &OpCtx,
    ) -> mpi::point_to_point::Status {
        let deadline = ctx.start + self.timeout;
        loop {
            match req.test() {
                Ok(status) => return status,
                Err(r) => req = r,
            }
            std::thread::sleep(Duration::from_micros(50));
            if Instant::now() >= deadline {
                eprintln!(
                    "rustspeed-comm watchdog (mpi): {} did not finish within {:.1}s on rank {}; aborting the job",
                    ctx.describe(),
                    self.timeout.as_secs_f64(),
                    self.rank
                );
                self.world.abort(3);
            }
        }
    }

    fn check_peer(&self, peer: usize) -> Result<()> {
        if peer >= self.size || peer == self.rank {
            return Err(CommError::invalid(format!(
                "peer rank {peer}: ranks are 0..{} and this is rank {}",
                self.size, self.rank
            )));
        }
        Ok(())
    }
}

// MPI has no bf16/f16 datatypes: 16-bit values move as u16 when nothing is computed on them.
// SAFETY (all four): T is f32 when DTYPE is F32 and a 2-byte repr(transparent) float otherwise.
fn as_f32<T: Elem>(s: &[T]) -> &[f32] {
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len()) }
}
fn as_f32_mut<T: Elem>(s: &mut [T]) -> &mut [f32] {
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut f32, s.len()) }
}
fn as_u16<T: Elem>(s: &[T]) -> &[u16] {
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u16, s.len()) }
}
fn as_u16_mut<T: Elem>(s: &mut [T]) -> &mut [u16] {
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut u16, s.len()) }
}
