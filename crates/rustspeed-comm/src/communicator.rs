//! `Communicator`: the one handle the engine uses. Collectives run on a communication thread
//! in the order they were issued (every rank must issue the same sequence), so a non-blocking
//! call returns at once and the caller keeps computing; blocking calls are a non-blocking call
//! plus `wait`. Send/recv run on the calling thread through their own rings.

use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::elem::{Elem, ReduceOp};
use crate::env::{self, RankInfo};
use crate::error::{CommError, ErrorKind, Result};
use crate::partition::{partition_len, partition_range};
use crate::shared_buf::SharedBuf;
use crate::shm::{self, Layout, Region, ShmGroup};
use crate::store::Store;

/// Default watchdog limit (DeepSpeed/torch's NCCL default is 30 min; 10 min is the issue's).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Knobs that are not part of the rank's identity.
#[derive(Debug, Clone)]
pub struct CommConfig {
    /// Watchdog: a collective or send/recv not finished within this fails on every rank.
    pub timeout: Duration,
    /// Bytes of one shared-memory half (two per rank); bigger buffers are pipelined.
    pub shm_half_bytes: usize,
    /// Bytes of one point-to-point ring (power of two).
    pub shm_p2p_bytes: usize,
    /// Let ranks read each other's buffers directly (process_vm_readv) when the system
    /// allows it: one copy instead of two, but each call pins the peer's pages, and on the
    /// machine in docs/BENCHMARKS.md that made it about 2x slower than two plain copies, so
    /// it is off by default. RUSTSPEED_SHM_SINGLE_COPY=1 turns it on.
    pub shm_single_copy: bool,
}

impl Default for CommConfig {
    fn default() -> Self {
        CommConfig {
            timeout: DEFAULT_TIMEOUT,
            shm_half_bytes: shm::DEFAULT_HALF_BYTES,
            shm_p2p_bytes: shm::DEFAULT_P2P_BYTES,
            shm_single_copy: false,
        }
    }
}

impl CommConfig {
    /// Defaults overridden by RUSTSPEED_COMM_TIMEOUT (seconds) and RUSTSPEED_SHM_CHUNK_BYTES.
    pub fn from_env() -> Result<CommConfig> {
        let mut cfg = CommConfig::default();
        if let Some(t) = env::var_f64("RUSTSPEED_COMM_TIMEOUT")? {
            if t <= 0.0 || !t.is_finite() {
                return Err(CommError::setup(format!(
                    "RUSTSPEED_COMM_TIMEOUT={t}: expected a positive number of seconds"
                )));
            }
            cfg.timeout = Duration::from_secs_f64(t);
        }
        if let Some(b) = env::var_usize("RUSTSPEED_SHM_CHUNK_BYTES")? {
            if b < 4096 {
                return Err(CommError::setup(format!(
                    "RUSTSPEED_SHM_CHUNK_BYTES={b}: expected at least 4096"
                )));
            }
            cfg.shm_half_bytes = b.next_multiple_of(4096);
        }
        match std::env::var("RUSTSPEED_SHM_SINGLE_COPY").as_deref() {
            Err(_) => {}
            Ok("0") => cfg.shm_single_copy = false,
            Ok("1") => cfg.shm_single_copy = true,
            Ok(v) => {
                return Err(CommError::setup(format!(
                    "RUSTSPEED_SHM_SINGLE_COPY={v:?}: expected 0 or 1"
                )))
            }
        }
        Ok(cfg)
    }
}

/// Completion of one queued operation.
struct Done {
    result: Mutex<Option<Result<()>>>,
    cv: Condvar,
}

impl Done {
    fn new() -> Arc<Done> {
        Arc::new(Done {
            result: Mutex::new(None),
            cv: Condvar::new(),
        })
    }
    fn set(&self, r: Result<()>) {
        *self.result.lock().unwrap() = Some(r);
        self.cv.notify_all();
    }
    fn wait(&self) -> Result<()> {
        let mut g = self.result.lock().unwrap();
        while g.is_none() {
            g = self.cv.wait(g).unwrap();
        }
        g.clone().unwrap()
    }
    fn is_set(&self) -> bool {
        self.result.lock().unwrap().is_some()
    }
}

/// The collective state a communication thread owns: one per backend.
pub(crate) enum Worker {
    Shm(ShmGroup),
    #[cfg(feature = "mpi")]
    Mpi(crate::mpi_backend::MpiGroup),
}

macro_rules! dispatch {
    ($self:ident, $g:ident => $call:expr) => {
        match $self {
            Worker::Shm($g) => $call,
            #[cfg(feature = "mpi")]
            Worker::Mpi($g) => $call,
        }
    };
}

impl Worker {
    fn all_reduce<T: Elem>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        dispatch!(self, g => g.all_reduce(buf, op))
    }
    fn reduce_scatter<T: Elem>(&mut self, i: &[T], o: &mut [T], op: ReduceOp) -> Result<()> {
        dispatch!(self, g => g.reduce_scatter(i, o, op))
    }
    fn all_gather<T: Elem>(&mut self, i: &[T], o: &mut [T]) -> Result<()> {
        dispatch!(self, g => g.all_gather(i, o))
    }
    fn broadcast<T: Elem>(&mut self, buf: &mut [T], root: usize) -> Result<()> {
        dispatch!(self, g => g.broadcast(buf, root))
    }
    fn barrier(&mut self) -> Result<()> {
        dispatch!(self, g => g.barrier())
    }
    /// The shm group; only shm groups map shared buffers, so only they get mapped jobs.
    fn shm(&mut self) -> &mut ShmGroup {
        match self {
            Worker::Shm(g) => g,
            #[cfg(feature = "mpi")]
            Worker::Mpi(_) => unreachable!("shared buffers are mapped only by shm groups"),
        }
    }
}

/// Every rank's copy of a shared buffer, moved to the communication thread (the caller waits
/// for the job, so the mappings outlive it).
struct Mapped<T>(Vec<*mut T>);
unsafe impl<T> Send for Mapped<T> {}
impl<T> Mapped<T> {
    /// (A method, so closures capture the whole `Mapped`, which is Send, not its field.)
    fn ptrs(&self) -> &[*mut T] {
        &self.0
    }
}

type Job = Box<dyn FnOnce(&mut Worker) -> Result<()> + Send>;
type JobSender = mpsc::Sender<(Job, Arc<Done>)>;

/// Raw slice pointers moved to the communication thread. Whoever makes one guarantees the
/// memory outlives the job (blocking calls wait; scopes wait before returning).
struct Ptr<T>(*mut T, usize);
unsafe impl<T> Send for Ptr<T> {}
impl<T> Ptr<T> {
    fn of(s: &[T]) -> Self {
        Ptr(s.as_ptr() as *mut T, s.len())
    }
    fn of_mut(s: &mut [T]) -> Self {
        Ptr(s.as_mut_ptr(), s.len())
    }
    /// SAFETY: see the type's comment.
    unsafe fn get<'a>(&self) -> &'a [T] {
        std::slice::from_raw_parts(self.0, self.1)
    }
    /// SAFETY: see the type's comment; the caller handed over exclusive access.
    unsafe fn get_mut<'a>(&self) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0, self.1)
    }
}

struct Shared {
    /// The shared-memory region (send/recv use it directly); None for MPI, where every call
    /// goes through the communication thread.
    region: Option<Arc<Region>>,
    name: &'static str,
    tx: Mutex<Option<JobSender>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

enum Backend {
    /// World size 1: every collective is a copy (or nothing), no thread, no shared memory.
    Single,
    Threaded(Shared),
}

/// Starts the communication thread; `make` builds its state on that thread (MPI must be
/// initialised by the thread that calls it). Returns once `make` succeeded or failed.
fn spawn_worker(
    rank_hint: usize,
    make: impl FnOnce() -> Result<Worker> + Send + 'static,
) -> Result<(JobSender, JoinHandle<()>, Worker0)> {
    let (tx, rx) = mpsc::channel::<(Job, Arc<Done>)>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Worker0>>();
    let handle = std::thread::Builder::new()
        .name(format!("rustspeed-comm-{rank_hint}"))
        .spawn(move || {
            let mut worker = match make() {
                Ok(w) => w,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(worker0(&worker)));
            // After one failure every later job gets the same error: the protocol state
            // is unknown, and continuing could hang or exchange wrong data.
            let mut broken: Option<CommError> = None;
            for (job, done) in rx {
                let r = match &broken {
                    Some(e) => Err(e.clone()),
                    // A panic here must not leave the caller waiting forever on `done`: it
                    // becomes this rank's error and aborts the group for the others.
                    None => {
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut worker)))
                            .unwrap_or_else(|p| {
                                let what = p
                                    .downcast_ref::<String>()
                                    .map(String::as_str)
                                    .or_else(|| p.downcast_ref::<&str>().copied())
                                    .unwrap_or("unknown panic");
                                let msg = format!(
                                    "rustspeed-comm: the communication thread panicked: {what}"
                                );
                                match &worker {
                                    Worker::Shm(g) => g.region.abort(&msg),
                                    #[cfg(feature = "mpi")]
                                    Worker::Mpi(_) => {}
                                }
                                Err(CommError::new(ErrorKind::Aborted, msg))
                            })
                    }
                };
                if let Err(e) = &r {
                    if e.kind != ErrorKind::InvalidArgument {
                        broken.get_or_insert_with(|| e.clone());
                    }
                }
                done.set(r);
            }
        })
        .map_err(|e| CommError::setup(format!("cannot spawn the communication thread: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok(w0)) => Ok((tx, handle, w0)),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => Err(CommError::setup(
            "the communication thread died during setup",
        )),
    }
}

/// What the caller learns from a freshly built worker: (rank, world size).
type Worker0 = (usize, usize);

fn worker0(w: &Worker) -> Worker0 {
    match w {
        Worker::Shm(g) => (g.region.rank, g.region.world),
        #[cfg(feature = "mpi")]
        Worker::Mpi(g) => (g.rank, g.size),
    }
}

/// A group of ranks and the collectives between them.
pub struct Communicator {
    info: RankInfo,
    single_copy: bool,
    timeout: Duration,
    backend: Backend,
    store: Option<Store>,
    /// Store-key prefix of this communicator (same on every rank) and the count of shared
    /// buffers it allocated, which names the next one.
    key_prefix: String,
    shared_bufs: std::sync::atomic::AtomicU64,
}

impl Communicator {
    /// A world of one: collectives are identities; no store, no shared memory.
    pub fn single() -> Communicator {
        Communicator {
            info: RankInfo::single(),
            single_copy: false,
            timeout: DEFAULT_TIMEOUT,
            backend: Backend::Single,
            store: None,
            key_prefix: String::new(),
            shared_bufs: Default::default(),
        }
    }

    /// Reads the rank from the environment (RANK/WORLD_SIZE/LOCAL_RANK as torchrun and
    /// `rustspeed launch` set them; OMPI_COMM_WORLD_*, PMI_*, SLURM_* as fallbacks),
    /// rendezvous through MASTER_ADDR:MASTER_PORT, and sets up the backend named by
    /// RUSTSPEED_COMM_BACKEND (default `shm`).
    pub fn from_env() -> Result<Communicator> {
        let info = RankInfo::from_env()?;
        let cfg = CommConfig::from_env()?;
        if info.world_size == 1 {
            let mut c = Communicator::single();
            c.timeout = cfg.timeout;
            return Ok(c);
        }
        let one_node = info.local_world_size == info.world_size;
        match std::env::var("RUSTSPEED_COMM_BACKEND").as_deref() {
            Ok("shm") => {}
            Err(_) if one_node => {}
            Ok("mpi") | Err(_) => return Self::mpi(info, cfg),
            Ok("nccl") => return Err(CommError::not_supported("RUSTSPEED_COMM_BACKEND=nccl for host buffers (NCCL works on device buffers: rustspeed_comm::nccl with the cuda feature); unset it to use the shm backend")),
            Ok(other) => {
                return Err(CommError::setup(format!(
                    "RUSTSPEED_COMM_BACKEND={other}: expected shm, mpi or nccl"
                )))
            }
        }
        if !one_node {
            return Err(CommError::not_supported(format!(
                "the shm backend across machines (WORLD_SIZE={}, LOCAL_WORLD_SIZE={}); shm needs every rank on one machine, \
                 multi-node runs need the mpi backend",
                info.world_size, info.local_world_size
            )));
        }
        let (addr, port) = env::master()?;
        let store = Store::connect(&addr, port, info.rank == 0, cfg.timeout)?;
        Self::with_store(info, store, cfg)
    }

    /// Sets up the shared-memory backend for `info.rank` of `info.world_size` through `store`
    /// (rank 0 creates the region). Every rank of the group must call this.
    pub fn with_store(info: RankInfo, store: Store, cfg: CommConfig) -> Result<Communicator> {
        let (rank, world) = (info.rank, info.world_size);
        if rank >= world {
            return Err(CommError::setup(format!(
                "RANK={rank} is not below WORLD_SIZE={world}"
            )));
        }
        if world == 1 {
            let mut c = Communicator::single();
            c.timeout = cfg.timeout;
            c.store = Some(store);
            return Ok(c);
        }
        // Each rank counts the communicators it made, so a second one on the same store uses
        // fresh keys (ranks make them in the same order).
        let generation = store.add(&format!("rustspeed/generation/{rank}"), 1)?;
        let key = |k: &str| format!("rustspeed/comm{generation}/{k}");
        let host = hostname();
        // Peers read this word to find out whether they may read our memory (single copy).
        let probe = Box::new(rank as u64 + 1);
        let region = if rank == 0 {
            let path = shm::shm_dir().join(format!(
                "rustspeed-comm-{}-{:x}-{generation}",
                std::process::id(),
                nanos_now()
            ));
            let layout = Layout {
                world,
                half_bytes: cfg.shm_half_bytes,
                p2p_bytes: cfg.shm_p2p_bytes.next_power_of_two(),
            };
            let region = Region::create(&path, layout, cfg.timeout)?;
            region.publish_probe(&probe);
            store.set(&key("host"), host.as_bytes())?;
            store.set(&key("path"), path.to_string_lossy().as_bytes())?;
            let joined = store.add(&key("joined"), 1);
            let all = joined.and_then(|_| {
                store.wait_ge(
                    &key("joined"),
                    world as i64,
                    "ranks mapping the shared-memory region",
                )
            });
            // Every rank has it mapped (or setup failed): the name is no longer needed, and
            // unlinking now means a crash leaves nothing behind in /dev/shm.
            let _ = std::fs::remove_file(&path);
            all?;
            region
        } else {
            let root_host = String::from_utf8_lossy(&store.get(&key("host"))?).into_owned();
            if root_host != host {
                return Err(CommError::setup(format!(
                    "shm backend: rank {rank} runs on '{host}' but rank 0 on '{root_host}'; shared memory needs one machine \
                     (multi-node runs need the mpi backend)"
                )));
            }
            let path =
                PathBuf::from(String::from_utf8_lossy(&store.get(&key("path"))?).into_owned());
            let region = Region::open(&path, rank, world, cfg.timeout)?;
            region.publish_probe(&probe);
            store.add(&key("joined"), 1)?;
            store.wait_ge(
                &key("joined"),
                world as i64,
                "ranks mapping the shared-memory region",
            )?;
            region
        };
        // Single copy only if every rank may read every other rank (all agree, or none uses it).
        let single_copy = if cfg.shm_single_copy {
            if !crate::shm_cma::probe_peers(&region) {
                store.add(&key("single_copy_denied"), 1)?;
            }
            store.add(&key("single_copy_checked"), 1)?;
            store.wait_ge(
                &key("single_copy_checked"),
                world as i64,
                "ranks checking single-copy access",
            )?;
            store.add(&key("single_copy_denied"), 0)? == 0
        } else {
            false
        };
        drop(probe);
        tracing::debug!(rank, world, single_copy, "shm backend ready");
        let region = Arc::new(region);
        let r2 = region.clone();
        let (tx, worker, _) = spawn_worker(rank, move || {
            Ok(Worker::Shm(ShmGroup::new(r2, single_copy)))
        })?;
        Ok(Communicator {
            info,
            single_copy,
            timeout: cfg.timeout,
            backend: Backend::Threaded(Shared {
                region: Some(region),
                name: "shm",
                tx: Mutex::new(Some(tx)),
                worker: Mutex::new(Some(worker)),
            }),
            store: Some(store),
            key_prefix: key(""),
            shared_bufs: Default::default(),
        })
    }

    /// The MPI backend (cargo feature `mpi`): rank and size come from MPI (run under mpirun
    /// or srun); LOCAL_RANK from the launcher's variables.
    #[cfg(feature = "mpi")]
    pub fn mpi(info: RankInfo, cfg: CommConfig) -> Result<Communicator> {
        let timeout = cfg.timeout;
        let (tx, worker, (rank, size)) = spawn_worker(info.rank, move || {
            crate::mpi_backend::MpiGroup::init(timeout).map(Worker::Mpi)
        })?;
        Ok(Communicator {
            info: RankInfo {
                rank,
                world_size: size,
                ..info
            },
            single_copy: false,
            timeout,
            backend: Backend::Threaded(Shared {
                region: None,
                name: "mpi",
                tx: Mutex::new(Some(tx)),
                worker: Mutex::new(Some(worker)),
            }),
            store: None,
            key_prefix: String::new(),
            shared_bufs: Default::default(),
        })
    }

    #[cfg(not(feature = "mpi"))]
    pub fn mpi(info: RankInfo, _cfg: CommConfig) -> Result<Communicator> {
        Err(CommError::not_supported(format!(
            "the mpi backend (needed for WORLD_SIZE={} over several machines, or RUSTSPEED_COMM_BACKEND=mpi): \
             rebuild with `--features rustspeed-comm/mpi` (needs libopenmpi-dev, openmpi-bin, libclang-dev)",
            info.world_size
        )))
    }

    /// Threads-as-ranks helper (tests, tools): `world` communicators on one store.
    pub fn local_group(world: usize, cfg: CommConfig) -> Result<Vec<Communicator>> {
        let root = Store::local_server(cfg.timeout)?;
        let port = root.port();
        let handles: Vec<_> = (1..world)
            .map(|rank| {
                let cfg = cfg.clone();
                std::thread::spawn(move || {
                    let store = Store::connect("127.0.0.1", port, false, cfg.timeout)?;
                    Communicator::with_store(RankInfo::local(rank, world), store, cfg)
                })
            })
            .collect();
        let mut all = vec![Communicator::with_store(
            RankInfo::local(0, world),
            root,
            cfg,
        )?];
        for h in handles {
            all.push(h.join().expect("rank setup thread panicked")?);
        }
        Ok(all)
    }

    pub fn rank(&self) -> usize {
        self.info.rank
    }
    pub fn world_size(&self) -> usize {
        self.info.world_size
    }
    pub fn local_rank(&self) -> usize {
        self.info.local_rank
    }
    pub fn info(&self) -> &RankInfo {
        &self.info
    }
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// The rendezvous store (absent for a world of one made by `single`), e.g. for NCCL ids.
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }
    /// Whether the shm backend reads peers' buffers directly (one copy) rather than through
    /// the shared halves (two copies); see `CommConfig::shm_single_copy`.
    pub fn single_copy(&self) -> bool {
        self.single_copy
    }

    /// Name of the backend in use.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Single => "single",
            Backend::Threaded(s) => s.name,
        }
    }

    fn submit(&self, job: Job) -> Arc<Done> {
        let done = Done::new();
        match &self.backend {
            Backend::Single => unreachable!("world size 1 runs inline"),
            Backend::Threaded(s) => {
                let tx = s.tx.lock().unwrap();
                let sent = tx.as_ref().map(|tx| tx.send((job, done.clone())).is_ok());
                if sent != Some(true) {
                    done.set(Err(CommError::new(
                        ErrorKind::Aborted,
                        "the communication thread has stopped",
                    )));
                }
            }
        }
        done
    }

    // ---- blocking collectives --------------------------------------------------------------

    /// In place: every rank's `buf` becomes op over all ranks' `buf` (same length everywhere).
    pub fn all_reduce<T: Elem>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.scope(|s| s.all_reduce(buf, op)?.wait().map(|_| ()))
    }

    /// `output` = this rank's piece of op over all ranks' `input`. Pieces follow
    /// `partition`'s rule: `output.len()` must be `ceil(input.len() / world_size)`, rank r gets
    /// `input[r*c .. (r+1)*c]` reduced, zero-padded past the end.
    pub fn reduce_scatter<T: Elem>(
        &self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        self.scope(|s| s.reduce_scatter(input, output, op)?.wait().map(|_| ()))
    }

    /// `output` = every rank's `input` concatenated in rank order, padding past
    /// `output.len()` dropped; `input.len()` must be `ceil(output.len() / world_size)`.
    pub fn all_gather<T: Elem>(&self, input: &[T], output: &mut [T]) -> Result<()> {
        self.scope(|s| s.all_gather(input, output)?.wait().map(|_| ()))
    }

    /// Every rank's `buf` becomes `root`'s.
    pub fn broadcast<T: Elem>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.scope(|s| s.broadcast(buf, root)?.wait().map(|_| ()))
    }

    /// Returns when every rank has entered the barrier.
    pub fn barrier(&self) -> Result<()> {
        match &self.backend {
            Backend::Single => Ok(()),
            Backend::Threaded(_) => self.submit(Box::new(|g| g.barrier())).wait(),
        }
    }

    // ---- shared buffers: peers read them in place -------------------------------------------

    /// A zeroed buffer of `len` elements that the other ranks read in place in the `*_shared`
    /// collectives, so each byte is copied once instead of twice (three times for all_gather).
    /// Collective: every rank calls it with the same `len`, in the same order. With no shared
    /// region (world of one, MPI) it is plain memory and the `*_shared` calls fall back to the
    /// ordinary collectives.
    pub fn alloc_shared<T: Elem>(&self, len: usize) -> Result<SharedBuf<T>> {
        match (&self.backend, &self.store) {
            (
                Backend::Threaded(Shared {
                    region: Some(r), ..
                }),
                Some(store),
            ) => {
                let k = self
                    .shared_bufs
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                SharedBuf::alloc_mapped(
                    store,
                    &format!("{}buf{k}", self.key_prefix),
                    self.rank(),
                    self.world_size(),
                    Arc::as_ptr(r) as usize,
                    len,
                )
            }
            _ => Ok(SharedBuf::local(len)),
        }
    }

    /// Every rank's copy of `buf`, if this communicator's group mapped it.
    fn mapped<T: Elem>(&self, buf: &SharedBuf<T>) -> Option<Mapped<T>> {
        match &self.backend {
            Backend::Threaded(Shared {
                region: Some(r), ..
            }) => buf.peers(Arc::as_ptr(r) as usize).map(Mapped),
            _ => None,
        }
    }

    /// In-place all_gather over a shared buffer: each rank's piece of its own `buf`
    /// (`partition_range(buf.len(), world, rank)`) is copied into every other rank's `buf`
    /// at the same place. Same length on every rank.
    pub fn all_gather_shared<T: Elem>(&self, buf: &mut SharedBuf<T>) -> Result<()> {
        if !self.is_threaded() {
            return Ok(());
        }
        let n = buf.len();
        if let Some(m) = self.mapped(buf) {
            return self
                .submit(Box::new(move |w| w.shm().all_gather_mapped(m.ptrs(), n)))
                .wait();
        }
        let (ws, me) = (self.world_size(), self.rank());
        let mine = partition_range(n, ws, me);
        let mut input = vec![T::default(); partition_len(n, ws)];
        input[..mine.len()].copy_from_slice(&buf[mine]);
        self.all_gather(&input, buf)
    }

    /// `output` = this rank's piece of op over every rank's shared `input`, as
    /// `reduce_scatter` (output.len() = ceil(input.len() / world), zero-padded).
    pub fn reduce_scatter_shared<T: Elem>(
        &self,
        input: &SharedBuf<T>,
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        check_scatter(input.len(), output.len(), self.world_size())?;
        let Some(m) = self.mapped(input) else {
            return self.reduce_scatter(input, output, op);
        };
        let (n, o) = (input.len(), Ptr::of_mut(output));
        // SAFETY: we wait for the job before `output`'s borrow ends.
        self.submit(Box::new(move |w| {
            w.shm()
                .reduce_scatter_mapped(m.ptrs(), n, unsafe { o.get_mut() }, op)
        }))
        .wait()
    }

    /// In place: every rank's shared `buf` becomes op over all ranks' `buf`.
    pub fn all_reduce_shared<T: Elem>(&self, buf: &mut SharedBuf<T>, op: ReduceOp) -> Result<()> {
        let Some(m) = self.mapped(buf) else {
            return self.all_reduce(buf, op);
        };
        let n = buf.len();
        self.submit(Box::new(move |w| {
            w.shm().all_reduce_mapped(m.ptrs(), n, op)
        }))
        .wait()
    }

    /// Sends `buf` to rank `dst` (returns once it is buffered or received; the matching
    /// `recv` must ask for the same number of elements of the same type).
    pub fn send<T: Elem>(&self, buf: &[T], dst: usize) -> Result<()> {
        match &self.backend {
            Backend::Single => Err(CommError::invalid(format!(
                "send to rank {dst} in a world of one"
            ))),
            Backend::Threaded(Shared {
                region: Some(r), ..
            }) => r.send(buf, dst),
            #[cfg(feature = "mpi")]
            Backend::Threaded(_) => {
                let p = Ptr::of(buf);
                // SAFETY: we wait for the job before `buf`'s borrow ends.
                self.submit(Box::new(move |w| match w {
                    Worker::Mpi(g) => g.send(unsafe { p.get() }, dst),
                    _ => unreachable!("shm sends go through the region"),
                }))
                .wait()
            }
            #[cfg(not(feature = "mpi"))]
            Backend::Threaded(_) => unreachable!("without MPI every threaded backend has a region"),
        }
    }

    /// Receives exactly `buf.len()` elements from rank `src`.
    pub fn recv<T: Elem>(&self, buf: &mut [T], src: usize) -> Result<()> {
        match &self.backend {
            Backend::Single => Err(CommError::invalid(format!(
                "recv from rank {src} in a world of one"
            ))),
            Backend::Threaded(Shared {
                region: Some(r), ..
            }) => r.recv(buf, src),
            #[cfg(feature = "mpi")]
            Backend::Threaded(_) => {
                let p = Ptr::of_mut(buf);
                // SAFETY: we wait for the job before `buf`'s borrow ends.
                self.submit(Box::new(move |w| match w {
                    Worker::Mpi(g) => g.recv(unsafe { p.get_mut() }, src),
                    _ => unreachable!("shm receives go through the region"),
                }))
                .wait()
            }
            #[cfg(not(feature = "mpi"))]
            Backend::Threaded(_) => unreachable!("without MPI every threaded backend has a region"),
        }
    }

    /// Runs `f` with a scope in which collectives can be started without waiting for them
    /// (like `std::thread::scope`): each returns a `Handle` to `wait` on, and the scope waits
    /// for every operation it started before returning, so buffers lent to it stay valid.
    ///
    /// ```no_run
    /// # use rustspeed_comm::{Communicator, ReduceOp};
    /// # let comm = Communicator::single();
    /// # let (mut grads_l, mut grads_l1) = (vec![0f32; 8], vec![0f32; 8]);
    /// comm.scope(|s| {
    ///     let h = s.all_reduce(&mut grads_l, ReduceOp::Mean)?; // layer L's gradients...
    ///     grads_l1.fill(1.0); // ...travel while layer L-1's backward runs
    ///     let reduced = h.wait()?;
    ///     Ok::<_, rustspeed_comm::CommError>(reduced[0])
    /// }).unwrap();
    /// ```
    pub fn scope<'env, F, R>(&'env self, f: F) -> R
    where
        F: for<'s> FnOnce(&'s Scope<'s, 'env>) -> R,
    {
        let scope = Scope {
            comm: self,
            pending: Mutex::new(Vec::new()),
            _marker: PhantomData,
        };
        // Waits for everything started, even if `f` panics, before the borrows end.
        struct WaitAll<'a, 's, 'env>(&'a Scope<'s, 'env>);
        impl Drop for WaitAll<'_, '_, '_> {
            fn drop(&mut self) {
                for d in self.0.pending.lock().unwrap().drain(..) {
                    let _ = d.wait();
                }
            }
        }
        let _guard = WaitAll(&scope);
        f(&scope)
    }
}

/// Unscoped non-blocking collectives, for callers whose buffers the borrow checker cannot
/// lend to a `scope` (the engine writes layer L-1's gradients through a view of the same flat
/// buffer whose layer-L range is being reduced).
///
/// # Safety (every `start_*`)
/// The buffers must stay allocated, inputs unwritten and outputs untouched until the returned
/// `Pending` is waited on or dropped (dropping waits). Leaking it (`mem::forget`) while the
/// buffers are freed or used is undefined behaviour.
impl Communicator {
    /// Non-blocking `all_reduce` without a scope.
    ///
    /// # Safety
    /// See the impl block: `buf` stays valid and untouched until the `Pending` is done.
    pub unsafe fn start_all_reduce<T: Elem>(&self, buf: &mut [T], op: ReduceOp) -> Result<Pending> {
        if !self.is_threaded() {
            return Ok(Pending { done: None });
        }
        let p = Ptr::of_mut(buf);
        Ok(self.pending(Box::new(move |g| g.all_reduce(unsafe { p.get_mut() }, op))))
    }

    /// Non-blocking `reduce_scatter` without a scope.
    ///
    /// # Safety
    /// See the impl block: `input` unwritten and `output` untouched until the `Pending` is done.
    pub unsafe fn start_reduce_scatter<T: Elem>(
        &self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<Pending> {
        check_scatter(input.len(), output.len(), self.world_size())?;
        if !self.is_threaded() {
            output.copy_from_slice(&input[..output.len()]);
            return Ok(Pending { done: None });
        }
        let (i, o) = (Ptr::of(input), Ptr::of_mut(output));
        Ok(self.pending(Box::new(move |g| {
            g.reduce_scatter(unsafe { i.get() }, unsafe { o.get_mut() }, op)
        })))
    }

    /// Non-blocking `all_gather` without a scope.
    ///
    /// # Safety
    /// See the impl block: `input` unwritten and `output` untouched until the `Pending` is done.
    pub unsafe fn start_all_gather<T: Elem>(
        &self,
        input: &[T],
        output: &mut [T],
    ) -> Result<Pending> {
        check_gather(input.len(), output.len(), self.world_size())?;
        if !self.is_threaded() {
            output.copy_from_slice(input);
            return Ok(Pending { done: None });
        }
        let (i, o) = (Ptr::of(input), Ptr::of_mut(output));
        Ok(self.pending(Box::new(move |g| {
            g.all_gather(unsafe { i.get() }, unsafe { o.get_mut() })
        })))
    }

    fn is_threaded(&self) -> bool {
        matches!(self.backend, Backend::Threaded(_))
    }

    fn pending(&self, job: Job) -> Pending {
        Pending {
            done: Some(self.submit(job)),
        }
    }
}

/// A collective started by an unsafe `start_*` call. Dropping it waits for completion.
#[must_use = "dropping a Pending blocks until the collective is done"]
pub struct Pending {
    done: Option<Arc<Done>>,
}

impl Pending {
    /// Blocks until the collective finished on this rank.
    pub fn wait(mut self) -> Result<()> {
        self.done.take().map_or(Ok(()), |d| d.wait())
    }
    /// Whether `wait` would return at once.
    pub fn is_done(&self) -> bool {
        self.done.as_ref().is_none_or(|d| d.is_set())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            let _ = d.wait();
        }
    }
}

fn check_scatter(n: usize, out: usize, ws: usize) -> Result<()> {
    let c = partition_len(n, ws);
    if out != c {
        return Err(CommError::invalid(format!(
            "reduce_scatter of {n} elements over {ws} ranks: output holds {out} elements, expected ceil({n}/{ws}) = {c} \
             (see rustspeed_comm::partition_len)"
        )));
    }
    Ok(())
}

fn check_gather(input: usize, n: usize, ws: usize) -> Result<()> {
    let c = partition_len(n, ws);
    if input != c {
        return Err(CommError::invalid(format!(
            "all_gather into {n} elements over {ws} ranks: each rank's input must hold ceil({n}/{ws}) = {c} elements, got {input}"
        )));
    }
    Ok(())
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if let Backend::Threaded(s) = &self.backend {
            s.tx.lock().unwrap().take(); // ends the worker's loop once queued jobs ran
            if let Some(w) = s.worker.lock().unwrap().take() {
                let _ = w.join();
            }
        }
    }
}

/// Lends buffers to non-blocking collectives; see `Communicator::scope`.
pub struct Scope<'s, 'env: 's> {
    comm: &'env Communicator,
    pending: Mutex<Vec<Arc<Done>>>,
    _marker: PhantomData<&'s mut &'env ()>,
}

/// A collective in flight. `wait` returns the output buffer once it is complete.
#[must_use = "a collective's output is not ready until wait() returns"]
pub struct Handle<'s, B: ?Sized> {
    done: Option<Arc<Done>>,
    out: &'s mut B,
}

impl<'s, B: ?Sized> Handle<'s, B> {
    /// Blocks until the collective finished on this rank; gives the output buffer back.
    pub fn wait(self) -> Result<&'s mut B> {
        if let Some(d) = &self.done {
            d.wait()?;
        }
        Ok(self.out)
    }
    /// Whether `wait` would return at once.
    pub fn is_done(&self) -> bool {
        self.done.as_ref().is_none_or(|d| d.is_set())
    }
}

impl<'s, 'env> Scope<'s, 'env> {
    fn start<B: ?Sized>(&'s self, out: &'s mut B, job: Option<Job>) -> Handle<'s, B> {
        let done = job.map(|job| {
            let d = self.comm.submit(job);
            self.pending.lock().unwrap().push(d.clone());
            d
        });
        Handle { done, out }
    }

    fn threaded(&self) -> bool {
        matches!(self.comm.backend, Backend::Threaded(_))
    }

    /// Non-blocking `Communicator::all_reduce`.
    pub fn all_reduce<T: Elem>(
        &'s self,
        buf: &'s mut [T],
        op: ReduceOp,
    ) -> Result<Handle<'s, [T]>> {
        if !self.threaded() {
            return Ok(self.start(buf, None));
        }
        let p = Ptr::of_mut(buf);
        // SAFETY: the scope keeps `buf` borrowed until this job is done.
        let job: Job = Box::new(move |g| g.all_reduce(unsafe { p.get_mut() }, op));
        Ok(self.start(buf, Some(job)))
    }

    /// Non-blocking `Communicator::reduce_scatter`.
    pub fn reduce_scatter<T: Elem>(
        &'s self,
        input: &'s [T],
        output: &'s mut [T],
        op: ReduceOp,
    ) -> Result<Handle<'s, [T]>> {
        check_scatter(input.len(), output.len(), self.comm.world_size())?;
        let c = output.len();
        if !self.threaded() {
            output.copy_from_slice(&input[..c]);
            return Ok(self.start(output, None));
        }
        let (i, o) = (Ptr::of(input), Ptr::of_mut(output));
        // SAFETY: the scope keeps both buffers borrowed until this job is done.
        let job: Job =
            Box::new(move |g| g.reduce_scatter(unsafe { i.get() }, unsafe { o.get_mut() }, op));
        Ok(self.start(output, Some(job)))
    }

    /// Non-blocking `Communicator::all_gather`.
    pub fn all_gather<T: Elem>(
        &'s self,
        input: &'s [T],
        output: &'s mut [T],
    ) -> Result<Handle<'s, [T]>> {
        check_gather(input.len(), output.len(), self.comm.world_size())?;
        if !self.threaded() {
            output.copy_from_slice(input);
            return Ok(self.start(output, None));
        }
        let (i, o) = (Ptr::of(input), Ptr::of_mut(output));
        // SAFETY: the scope keeps both buffers borrowed until this job is done.
        let job: Job = Box::new(move |g| g.all_gather(unsafe { i.get() }, unsafe { o.get_mut() }));
        Ok(self.start(output, Some(job)))
    }

    /// Non-blocking `Communicator::broadcast`.
    pub fn broadcast<T: Elem>(&'s self, buf: &'s mut [T], root: usize) -> Result<Handle<'s, [T]>> {
        let ws = self.comm.world_size();
        if root >= ws {
            return Err(CommError::invalid(format!(
                "broadcast from root {root}: ranks are 0..{ws}"
            )));
        }
        if !self.threaded() {
            return Ok(self.start(buf, None));
        }
        let p = Ptr::of_mut(buf);
        // SAFETY: the scope keeps `buf` borrowed until this job is done.
        let job: Job = Box::new(move |g| g.broadcast(unsafe { p.get_mut() }, root));
        Ok(self.start(buf, Some(job)))
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn nanos_now() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
