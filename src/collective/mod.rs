//! Cross-process communication: the one place ranks talk to each other (the model and the loss
//! never know their rank).
//!
//! - [`store`]: the rendezvous key-value store over TCP (rank 0 hosts it, every rank connects
//!   with the run's token). It carries the CPU backend's peer addresses and NCCL's unique id.
//! - [`ring`]: the `cpu` backend, ring all-reduce over TCP (tests, development, CPU clusters).
//! - `nccl`: the `nccl` backend (cargo feature `nccl`; without it a twin that compiles
//!   everywhere and returns a clear error).
//! - [`ddp`]: what the training step builds on top: parameters broadcast from rank 0 at start,
//!   gradients averaged in buckets, the cross-rank parameter checksum.
//!
//! # Contract every backend keeps (read before calling anything here)
//!
//! Every rank must call the same operations in the same order with buffers of the same length
//! and dtype. A rank that skips one leaves the others waiting until `dist.timeout_secs`, after
//! which they fail with an error naming the operation; a rank whose process dies makes its ring
//! neighbours fail at once (the connection closes), and the launcher stops the rest. No
//! operation retries: after an error the group is unusable and the process should exit.
//!
//! DeViSE's hinge rank loss compares each image against the fixed label-embedding table (§3.3),
//! never against other images, so data parallelism needs no cross-rank gather of embeddings:
//! averaging gradients is the whole story.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

pub mod ddp;
pub mod reducer;
pub mod ring;
pub mod store;

#[cfg(feature = "nccl")]
#[path = "nccl.rs"]
pub mod nccl;
#[cfg(not(feature = "nccl"))]
#[path = "nccl_disabled.rs"]
pub mod nccl;

pub use devise_launch::world::{EnvSource, WorkerEnv};

/// `[dist]` section: how ranks talk to each other. Every field has a default; single-process
/// runs ignore the section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `auto` (NCCL when `run.device` is CUDA, else `cpu`), `cpu`, or `nccl`.
    #[serde(default)]
    pub backend: Backend,
    /// Gradients are averaged in flat buckets of about this many MiB, one all-reduce each (a
    /// bucket is closed once it holds this much, PyTorch DDP's rule); also the size of the
    /// broadcasts when the replicas start.
    #[serde(default = "default_bucket_mb")]
    pub bucket_size_mb: f64,
    /// The first gradient bucket (the gradients backward produces first: the head's, the last
    /// layers') is closed once it holds this many MiB, so its all-reduce starts early in
    /// backward (PyTorch DDP's 1 MiB first bucket).
    #[serde(default = "default_first_bucket_mb")]
    pub first_bucket_size_mb: f64,
    /// Average each bucket of gradients while backward still computes the rest (`true`,
    /// default), or after the whole backward pass (`false`). Both give bit-identical results;
    /// `false` is there to measure what the overlap hides.
    #[serde(default = "default_true")]
    pub overlap: bool,
    /// Every this many steps the ranks compare a checksum of their parameters (and their data
    /// cursors) and stop with an error naming the step when they differ (0: never).
    #[serde(default = "default_check_every")]
    pub check_params_every_steps: u64,
    /// How long a rank waits for the others in any one operation (rendezvous, all-reduce,
    /// barrier) before failing, seconds. Must cover the longest single-rank pause (rank 0
    /// writing a checkpoint or the report while the others wait at a barrier).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// `cpu` backend: ring neighbours on the same host talk over Unix domain sockets (faster than
    /// TCP loopback; TCP is still the fallback). `false`: TCP only.
    #[serde(default = "default_true")]
    pub unix_sockets: bool,
}

fn default_true() -> bool {
    true
}

/// `dist.backend`: how ranks exchange tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `nccl` when this process runs on a CUDA device, else `cpu`.
    #[default]
    Auto,
    /// Ring all-reduce over TCP and Unix sockets ([`ring`]); buffers on the CPU.
    Cpu,
    /// NCCL on this process's GPU (cargo feature `nccl`).
    Nccl,
}

deserialize_by_name!(Backend);

impl Backend {
    /// `auto`, `cpu`, `nccl`: as TOML and the command line spell it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Cpu => "cpu",
            Backend::Nccl => "nccl",
        }
    }

    /// The backend `auto` stands for on `device` (others stand for themselves).
    pub fn resolve(self, device: Device) -> Backend {
        match self {
            Backend::Auto if device.is_cuda() => Backend::Nccl,
            Backend::Auto => Backend::Cpu,
            other => other,
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}
fn default_bucket_mb() -> f64 {
    25.0
}
fn default_first_bucket_mb() -> f64 {
    1.0
}
fn default_check_every() -> u64 {
    100
}
fn default_timeout() -> u64 {
    600
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: Backend::Auto,
            bucket_size_mb: default_bucket_mb(),
            first_bucket_size_mb: default_first_bucket_mb(),
            overlap: true,
            check_params_every_steps: default_check_every(),
            timeout_secs: default_timeout(),
            unix_sockets: true,
        }
    }
}

impl Config {
    /// Checks the section; errors name the key.
    pub fn validate(&self) -> Result<()> {
        for (key, mb) in [
            ("bucket_size_mb", self.bucket_size_mb),
            ("first_bucket_size_mb", self.first_bucket_size_mb),
        ] {
            if !(mb.is_finite() && mb > 0.0) {
                bail!("dist.{key} must be > 0, got {mb}");
            }
        }
        if self.timeout_secs == 0 {
            bail!("dist.timeout_secs must be > 0");
        }
        Ok(())
    }

    /// Bucket size in bytes.
    pub fn bucket_bytes(&self) -> usize {
        (self.bucket_size_mb * (1 << 20) as f64) as usize
    }

    /// How gradients are bucketed and when they are averaged.
    pub fn reduce_plan(&self) -> reducer::Plan {
        reducer::Plan {
            first_bucket_bytes: (self.first_bucket_size_mb * (1 << 20) as f64) as usize,
            bucket_bytes: self.bucket_bytes(),
            overlap: self.overlap,
        }
    }
}

/// Sum or mean over ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise sum divided by `world_size`.
    Mean,
}

/// What [`Collective::start`] starts on a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// In place, the buffer becomes its sum or mean over ranks ([`Collective::all_reduce`]).
    AllReduce(ReduceOp),
    /// In place, rank 0's contents are copied to every rank ([`Collective::broadcast`]).
    Broadcast,
}

/// The operations the training loop needs from a process group. `Sync`: the overlapped gradient
/// reduction starts operations from a communication thread ([`reducer`]).
pub trait Collective: Send + Sync {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of processes in the group.
    fn world_size(&self) -> usize;
    /// Where this backend's buffers live: `Cpu` for `cpu` and the single process, this rank's
    /// GPU for `nccl`.
    fn device(&self) -> Device;
    /// In place, over a flat contiguous buffer (`[n]`, `Float` or `BFloat16`, on the backend's
    /// device: CPU for `cpu`, this rank's GPU for `nccl`): every element becomes the sum (or
    /// mean) over ranks. Afterwards the buffer is bit-identical on every rank.
    /// Errors: wrong dtype/layout/device, a peer gone, `dist.timeout_secs` exceeded.
    fn all_reduce(&self, buffer: &mut Tensor, op: ReduceOp) -> Result<()>;
    /// In place, rank 0's contents of a flat contiguous buffer (`[n]`, any dtype: a byte copy)
    /// are copied to every rank.
    fn broadcast(&self, buffer: &mut Tensor) -> Result<()>;
    /// Rank 0's `bytes` are returned on every rank (others pass anything; it is ignored).
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// Starts `op` on `buffer` (the checks of [`Collective::all_reduce`] /
    /// [`Collective::broadcast`]), ordered after the work already queued that produced the
    /// buffer (on a GPU: libtorch's work on the legacy default stream, where it runs backward); [`Collective::finish`] waits for everything started. What the overlapped
    /// gradient reduction calls, from one thread, while backward runs.
    ///
    /// Until `finish` returns: operations run in the order started (the same on every rank), the
    /// caller must not read or write `buffer` (this call keeps its storage alive), and no other
    /// operation of this collective may be called. The default performs `op` at once on the
    /// calling thread (the `cpu` ring: the caller is the communication thread); `nccl` enqueues
    /// it on its own CUDA stream and returns.
    fn start(&self, buffer: &Tensor, op: Started) -> Result<()> {
        let mut buffer = buffer.shallow_clone();
        match op {
            Started::AllReduce(op) => self.all_reduce(&mut buffer, op),
            Started::Broadcast => self.broadcast(&mut buffer),
        }
    }

    /// Waits until every operation [`Collective::start`]ed has completed (the device's compute
    /// stream is ordered after them); the first error of any. The default has nothing to wait
    /// for.
    fn finish(&self) -> Result<()> {
        Ok(())
    }

    /// Every tensor (any shape, dtype and device) becomes its sum or mean over ranks, computed
    /// in f32 in one flat buffer on [`Collective::device`]: meant for small lists (metrics,
    /// counts: integers are exact below 2^24); gradients go through [`reducer::Reducer`].
    fn all_reduce_tensors(&self, tensors: &mut [Tensor], op: ReduceOp) -> Result<()> {
        if self.world_size() == 1 || tensors.is_empty() {
            return Ok(());
        }
        let mut flat = Tensor::cat(
            &tensors
                .iter()
                .map(|t| {
                    t.to_kind(Kind::Float)
                        .to_device(self.device())
                        .reshape([-1])
                })
                .collect::<Vec<_>>(),
            0,
        );
        self.all_reduce(&mut flat, op)?;
        let mut offset = 0;
        for t in tensors.iter_mut() {
            let n = t.numel() as i64;
            let part = flat
                .narrow(0, offset, n)
                .view_as(t)
                .to_device(t.device())
                .to_kind(t.kind());
            tch::no_grad(|| t.copy_(&part));
            offset += n;
        }
        Ok(())
    }
}

/// `world_size == 1`: no communication at all.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn all_reduce(&self, _buffer: &mut Tensor, _op: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buffer: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        Ok(bytes)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// Joins the process group the environment describes ([`WorkerEnv`]): a single process needs
/// nothing; otherwise rank 0 starts the rendezvous store, every rank connects, and the backend
/// `dist.backend` (resolved against `device`, this process's device from
/// `config::device::select_device`) is set up through it; NCCL on `device`'s GPU.
///
/// Every rank of the job must call this, with the same configuration. Errors: the store cannot
/// be reached or refuses the token within `dist.timeout_secs`, the backend cannot start
/// (missing libnccl, `nccl` on a CPU device, ...).
pub fn init(env: &WorkerEnv, cfg: &Config, device: Device) -> Result<Box<dyn Collective>> {
    init_with(env, cfg, device, Join::WhenSeveral)
}

/// Whether [`init_with`] sets up a backend for a world of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// Only when the world has several processes; one process gets [`SingleProcess`].
    WhenSeveral,
    /// Always, even for one process (`devise bench-step --collective`: a one-rank smoke test
    /// of the backend itself).
    Always,
}

/// [`init`], with the choice of joining a one-process world through the backend (`join`).
pub fn init_with(
    env: &WorkerEnv,
    cfg: &Config,
    device: Device,
    join: Join,
) -> Result<Box<dyn Collective>> {
    cfg.validate()?;
    if env.world_size == 1 && join == Join::WhenSeveral {
        return Ok(Box::new(SingleProcess));
    }
    let timeout = std::time::Duration::from_secs(cfg.timeout_secs);
    let store = store::Rendezvous::join(env, timeout)?;
    let backend = cfg.backend.resolve(device);
    tracing::info!("{env}, backend {backend}");
    // `resolve` turned `auto` into `cpu` or `nccl`.
    match (backend, device) {
        (Backend::Cpu, _) => Ok(Box::new(ring::Ring::connect(
            store,
            timeout,
            cfg.unix_sockets,
        )?)),
        (_, Device::Cuda(ordinal)) => Ok(Box::new(nccl::Nccl::connect(store, ordinal)?)),
        (_, other) => bail!(
            "dist.backend = \"nccl\" needs a CUDA device, but this process runs on {other:?} \
             (run.device)"
        ),
    }
}

/// `[n]` and dense: what every backend's broadcast checks.
pub(crate) fn check_1d(buffer: &Tensor, what: &str) -> Result<()> {
    if buffer.dim() != 1 || !buffer.is_contiguous() {
        bail!(
            "{what}: expected a flat contiguous buffer, got shape {:?}",
            buffer.size()
        );
    }
    Ok(())
}

/// The flat buffer checks every backend's all-reduce makes: `[n]`, dense, `Float` or `BFloat16`.
pub(crate) fn check_flat(buffer: &Tensor, what: &str) -> Result<()> {
    check_1d(buffer, what)?;
    if !matches!(buffer.kind(), Kind::Float | Kind::BFloat16) {
        bail!(
            "{what}: expected Float or BFloat16, got {:?}",
            buffer.kind()
        );
    }
    Ok(())
}
