//! The `nccl` backend (cargo feature `nccl`): NCCL collectives on this rank's GPU, in place on
//! libtorch's CUDA tensors.
//!
//! # Running it
//!
//! Build on (or for) the GPU node with `cargo build --release --features nccl` (the binary keeps
//! `libtorch.so` linked, see `build.rs`). Where PyTorch 2.11 (the CUDA 13 wheel) is pip-installed
//! and there is no separate CUDA toolkit, put the wheel's `torch/lib` and every `nvidia/*/lib`
//! directory (`nccl`, `cu13` or `cuda_runtime`, `cudnn`, ...) on `LD_LIBRARY_PATH`, then launch one
//! worker per GPU:
//!
//! ```sh
//! export LD_LIBRARY_PATH="$(python3 -c 'import torch, os, glob; t = os.path.dirname(torch.__file__); print(":".join([os.path.join(t, "lib")] + sorted(glob.glob(os.path.join(os.path.dirname(t), "nvidia", "*", "lib")))))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
//! devise-launch --nproc-per-node 8 -- devise train --config configs/tiny-imagenet.toml --set run.device='"cuda"'
//! ```
//!
//! `libcuda.so.1` comes with the NVIDIA driver (not with the wheel) and is normally already on
//! the loader's path; `NCCL_DEBUG=INFO` makes NCCL log its transport choices.
//!
//! # Libraries (looked up at run time, never linked)
//!
//! cudarc's dynamic loading *panics* when a library is missing, so [`Nccl::connect`] first opens
//! them itself with `libloading` and turns a miss into an error saying how to provide them:
//!
//! - libcuda: exactly the names cudarc 0.19's `driver::sys::culib` tries, in its order
//!   (`cudarc::get_lib_name_candidates` of `cuda` then `nvcuda`: `libcuda.so`, `libcuda64.so`, ...,
//!   `libcuda.so.13`, `libcuda.so.12`, ..., `libcuda.so.1`). cudarc then opens the same file.
//! - libnccl: `libnccl.so.2` first, then cudarc's candidates for `nccl` (`libnccl.so`, ...,
//!   `libnccl.so.13`, ..., `libnccl.so.1`). cudarc's own list lacks `libnccl.so.2`, NCCL's soname
//!   and the only file the `nvidia-nccl` wheels (and the `libnccl2` packages) ship, so cudarc's
//!   loader could not find the wheel's NCCL. NCCL is therefore called through function pointers
//!   resolved here (`NcclApi`), with cudarc providing only the C types; results are read as
//!   plain integers (a code newer than our bindings, like 2.30's `ncclTimeout`, stays defined).
//!   When libtorch_cuda already loaded `libnccl.so.2`, the dynamic loader hands back that copy.
//!
//! The CUDA driver calls (context, stream query) go through cudarc's `driver` module, inside
//! `catch_unwind` as a second line of defence.
//!
//! # Device, stream, synchronisation (state shared with libtorch)
//!
//! [`Nccl::connect`] makes the *primary* context of GPU `ordinal` (the worker's own, from
//! `devise_launch::world::cuda_ordinal`) current on the calling thread (cudarc's
//! `CudaContext::new`; every operation binds it again on its calling thread). The CUDA runtime that libtorch uses works in that same primary context, so the raw pointers
//! of `Tensor::data_ptr` on `cuda:ordinal` are valid in NCCL's calls. Every collective is enqueued on the **legacy default stream** (`NULL`): tch never
//! sets a current stream, so that is the stream libtorch queued the buffer's producers (the
//! backward pass, `Tensor::cat`) on and will queue its consumers on; stream order alone makes the
//! data dependencies right.
//!
//! After enqueueing, the call waits until the default stream is idle (polling `cuStreamQuery`
//! with sleeps growing from 10 µs to 1 ms, and NCCL's asynchronous error state), so that:
//! errors surface in the call that caused them, a peer that never joins fails the call after
//! `dist.timeout_secs` (the communicator is then aborted, which also frees the stuck kernel)
//! instead of hanging forever as `cuStreamSynchronize` would, and callers may read the result on
//! the CPU. Cost: the CPU thread blocks until all GPU work queued before the collective has run
//! (no CPU/GPU overlap across the call, and up to ~1 ms of polling latency on long operations);
//! the training loop reads the loss on the CPU every step anyway, so little is lost.
//!
//! The overlapped gradient all-reduce ([`Collective::start`] / [`Collective::finish`],
//! `super::reducer`) is the exception: it runs on a stream of its own, created with
//! `CU_STREAM_NON_BLOCKING` (a blocking stream would synchronise with the legacy default stream,
//! where backward runs). Each start records an event on the default stream (after the kernels
//! that produced the bucket) and makes the overlap stream wait for it before the NCCL call;
//! `finish` records an event on the overlap stream, makes the default stream wait for it (the
//! optimizer step is queued after the results) and polls it from the host with the same error and
//! timeout checks. The started buffers are kept alive until then.
//!
//! NCCL's all-reduce algorithms (ring, tree, NVLS) compute each element once and copy it to
//! every rank, so in practice the result is bit-identical on every rank (what
//! `ddp::check_identical` relies on; NCCL does not promise it in writing).
//!
//! # Set-up through the store
//!
//! Rank 0 creates NCCL's unique id (which holds its bootstrap address) and publishes its 128
//! bytes under [`UNIQUE_ID_KEY`]; the others `wait` for it. Every rank then calls
//! `ncclCommInitRank`, which blocks until all `world_size` ranks joined; it runs on a helper
//! thread so that a rank that never joins makes the others fail after `dist.timeout_secs` (the
//! helper is then left behind: the process is expected to exit on the error).
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{sys as cu, CudaContext};
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

use super::store::Rendezvous;
use super::{check_1d, check_flat, Collective, ReduceOp, Started};

/// Store key under which rank 0 publishes NCCL's unique id (128 bytes).
pub const UNIQUE_ID_KEY: &str = "nccl/unique_id";

/// Oldest NCCL accepted: 2.10 brought `ncclAvg` (and `ncclBfloat16` is 2.10 too).
const MIN_NCCL_VERSION: c_int = 21000;

/// `ncclResult_t` values, as plain integers (see the module docs).
const NCCL_SUCCESS: c_int = 0;
const NCCL_IN_PROGRESS: c_int = 7;

/// The legacy default stream (see the module docs).
const DEFAULT_STREAM: *mut c_void = std::ptr::null_mut();

/// `ncclAllReduce(sendbuff, recvbuff, count, datatype, op, comm, stream)`.
type AllReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    ncclComm_t,
    *mut c_void,
) -> c_int;
/// `ncclBroadcast(sendbuff, recvbuff, count, datatype, root, comm, stream)`.
type BroadcastFn = AllReduceFn;

/// The NCCL entry points this backend uses, with nccl.h's prototypes (enums as `c_int`).
struct NcclApi {
    /// The name the library was opened by.
    name: String,
    /// `ncclGetVersion`'s code.
    version: c_int,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int,
    comm_destroy: unsafe extern "C" fn(ncclComm_t) -> c_int,
    comm_abort: unsafe extern "C" fn(ncclComm_t) -> c_int,
    comm_get_async_error: unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    /// NCCL >= 2.13 only.
    get_last_error: Option<unsafe extern "C" fn(ncclComm_t) -> *const c_char>,
    all_reduce: AllReduceFn,
    broadcast: BroadcastFn,
    /// Keeps the function pointers above valid; never unloaded (lives in a static).
    _lib: libloading::Library,
}

/// The names cudarc 0.19 tries for libcuda, in its order (`driver::sys::culib`).
fn libcuda_candidates() -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for n in ["cuda", "nvcuda"]
        .iter()
        .flat_map(|l| cudarc::get_lib_name_candidates(l))
    {
        if !names.contains(&n) {
            names.push(n); // cudarc's list repeats a few names; trying them once is the same
        }
    }
    names
}

/// NCCL's soname first, then the names cudarc 0.19 tries (`nccl::sys::culib`).
fn libnccl_candidates() -> Vec<String> {
    let mut names = vec!["libnccl.so.2".to_string()];
    for n in cudarc::get_lib_name_candidates("nccl") {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

/// Opens the first of `names` the dynamic loader accepts. Err: a message listing the names
/// tried and any reason other than "not found" (a file that exists but cannot be loaded).
fn open_first(names: &[String]) -> std::result::Result<(String, libloading::Library), String> {
    let mut reasons = Vec::new();
    for name in names {
        // SAFETY: loading runs the library's initialisers; libcuda and libnccl are NVIDIA's
        // libraries, whose initialisers have no preconditions.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => return Ok((name.clone(), lib)),
            Err(e) => {
                let e = e.to_string();
                if !e.contains("No such file") {
                    reasons.push(e);
                }
            }
        }
    }
    let mut msg = format!("tried {}", names.join(", "));
    if !reasons.is_empty() {
        msg.push_str(&format!("; found but not loadable: {}", reasons.join("; ")));
    }
    Err(msg)
}

/// Whether libcuda can be loaded under one of cudarc's names (what cudarc would open).
fn check_libcuda() -> std::result::Result<String, String> {
    match open_first(&libcuda_candidates()) {
        Ok((name, _lib)) => Ok(name),
        Err(tried) => Err(format!(
            "the nccl backend needs libcuda (the CUDA driver library) and none could be loaded \
             ({tried}). It comes with the NVIDIA driver, not with PyTorch: run on a GPU node with \
             the driver installed (`nvidia-smi` works), or add the directory holding \
             libcuda.so.1 to LD_LIBRARY_PATH (in containers, start them with the GPU runtime); \
             or set dist.backend = \"cpu\""
        )),
    }
}

/// Resolves the NUL-terminated `sym` in `lib` (opened as `name`) as a `T`.
///
/// # Safety
/// `T` must be the function pointer type of `sym`'s C prototype.
unsafe fn symbol<T: Copy>(lib: &libloading::Library, name: &str, sym: &[u8]) -> Result<T, String> {
    // SAFETY: forwarded to the caller.
    let found = unsafe { lib.get::<T>(sym) };
    found.map(|s| *s).map_err(|e| {
        let sym = String::from_utf8_lossy(sym.strip_suffix(b"\0").unwrap_or(sym));
        format!("{name} lacks {sym}: {e}")
    })
}

impl NcclApi {
    /// Opens libnccl and resolves the entry points (see the module docs for the names).
    fn load() -> std::result::Result<NcclApi, String> {
        let (name, lib) = open_first(&libnccl_candidates()).map_err(|tried| {
            format!(
                "the nccl backend needs NCCL (libnccl.so.2) and none could be loaded ({tried}). \
                 With PyTorch pip-installed, add the wheel's nvidia/nccl/lib directory to \
                 LD_LIBRARY_PATH: export LD_LIBRARY_PATH=\"$(python3 -c 'import os, nvidia.nccl; \
                 print(os.path.join(list(nvidia.nccl.__path__)[0], \"lib\"))')${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}\" \
                 (or install the libnccl2 package); or set dist.backend = \"cpu\""
            )
        })?;
        // SAFETY: each type below is the prototype of the symbol in nccl.h (NCCL 2.10 to 2.30),
        // with C enums (ncclResult_t, ncclDataType_t, ncclRedOp_t) as `int`, their C type.
        let api = unsafe {
            let get_version: unsafe extern "C" fn(*mut c_int) -> c_int =
                symbol(&lib, &name, b"ncclGetVersion\0")?;
            let mut version: c_int = 0;
            let code = get_version(&mut version);
            if code != NCCL_SUCCESS {
                return Err(format!(
                    "{name}: ncclGetVersion failed: {}",
                    result_name(code)
                ));
            }
            NcclApi {
                version,
                get_unique_id: symbol(&lib, &name, b"ncclGetUniqueId\0")?,
                comm_init_rank: symbol(&lib, &name, b"ncclCommInitRank\0")?,
                comm_destroy: symbol(&lib, &name, b"ncclCommDestroy\0")?,
                comm_abort: symbol(&lib, &name, b"ncclCommAbort\0")?,
                comm_get_async_error: symbol(&lib, &name, b"ncclCommGetAsyncError\0")?,
                get_error_string: symbol(&lib, &name, b"ncclGetErrorString\0")?,
                get_last_error: symbol(&lib, &name, b"ncclGetLastError\0").ok(),
                all_reduce: symbol(&lib, &name, b"ncclAllReduce\0")?,
                broadcast: symbol(&lib, &name, b"ncclBroadcast\0")?,
                name,
                _lib: lib,
            }
        };
        if api.version < MIN_NCCL_VERSION {
            return Err(format!(
                "{} is NCCL {}, the nccl backend needs 2.10 or newer (ncclAvg, bfloat16): put a \
                 newer libnccl.so.2 (the PyTorch 2.11 wheel's nvidia/nccl/lib) first on LD_LIBRARY_PATH",
                api.name,
                version_string(api.version)
            ));
        }
        Ok(api)
    }

    /// The process-wide instance (loaded once; a failure is remembered).
    fn get() -> std::result::Result<&'static NcclApi, String> {
        static API: OnceLock<std::result::Result<NcclApi, String>> = OnceLock::new();
        API.get_or_init(NcclApi::load)
            .as_ref()
            .map_err(Clone::clone)
    }

    /// `Ok` for `ncclSuccess`, else an error naming `what`, the NCCL error and NCCL's detail.
    fn check(&self, code: c_int, what: &str) -> Result<()> {
        if code == NCCL_SUCCESS {
            return Ok(());
        }
        bail!("NCCL {what} failed: {}", self.describe(code))
    }

    /// "ncclSystemError (unhandled system error): <last error>" for `code`.
    fn describe(&self, code: c_int) -> String {
        // SAFETY: ncclGetErrorString returns a static string for any code (or NULL).
        let text = unsafe { cstr((self.get_error_string)(code)) };
        // SAFETY: ncclGetLastError ignores its argument ("can be NULL") and returns a
        // thread-local string (or NULL).
        let last = self
            .get_last_error
            .map(|f| unsafe { cstr(f(std::ptr::null_mut())) })
            .unwrap_or_default();
        let mut s = format!("{} ({text})", result_name(code));
        if !last.is_empty() {
            s.push_str(&format!(": {last}"));
        }
        s
    }

    /// A new unique id (rank 0 only).
    fn unique_id(&self) -> Result<ncclUniqueId> {
        let mut id = ncclUniqueId { internal: [0; 128] };
        // SAFETY: `id` is a valid ncclUniqueId to write.
        let code = unsafe { (self.get_unique_id)(&mut id) };
        self.check(code, "ncclGetUniqueId")?;
        Ok(id)
    }
}

/// The string at `p` (empty for NULL).
///
/// # Safety
/// `p` is NULL or a NUL-terminated string alive during the call.
unsafe fn cstr(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: forwarded to the caller.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// `ncclResult_t`'s name for `code`.
fn result_name(code: c_int) -> String {
    let name = match code {
        0 => "ncclSuccess",
        1 => "ncclUnhandledCudaError",
        2 => "ncclSystemError",
        3 => "ncclInternalError",
        4 => "ncclInvalidArgument",
        5 => "ncclInvalidUsage",
        6 => "ncclRemoteError",
        7 => "ncclInProgress",
        8 => "ncclTimeout",
        other => return format!("ncclResult {other}"),
    };
    name.to_string()
}

/// "2.28.9" for NCCL's version code (`X*10000 + Y*100 + Z` since 2.9, `X*1000 + Y*100 + Z`
/// before).
fn version_string(code: c_int) -> String {
    if code >= 10000 {
        format!("{}.{}.{}", code / 10000, code % 10000 / 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, code % 1000 / 100, code % 100)
    }
}

/// NCCL's data type for a buffer of `kind`.
fn nccl_dtype(kind: Kind) -> Result<c_int> {
    Ok(match kind {
        Kind::Float => ncclDataType_t::ncclFloat32 as c_int,
        Kind::BFloat16 => ncclDataType_t::ncclBfloat16 as c_int,
        Kind::Uint8 => ncclDataType_t::ncclUint8 as c_int,
        other => bail!("nccl backend: unsupported dtype {other:?}"),
    })
}

/// NCCL's reduction for `op` (`Mean` is NCCL's `ncclAvg`: sum, then divide by the world size).
fn nccl_op(op: ReduceOp) -> c_int {
    match op {
        ReduceOp::Sum => ncclRedOp_t::ncclSum as c_int,
        ReduceOp::Mean => ncclRedOp_t::ncclAvg as c_int,
    }
}

/// Runs `f`, turning a panic (cudarc's reaction to a missing library or symbol) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            Err(anyhow!("{what}: the CUDA bindings panicked: {msg}"))
        }
    }
}

/// GPU `ordinal`'s primary context, made current on this thread.
fn cuda_context(ordinal: usize) -> Result<Arc<CudaContext>> {
    let count = CudaContext::device_count().map_err(|e| {
        anyhow!(
            "the CUDA driver failed to initialise: {e} (no GPU visible? check `nvidia-smi` and \
             CUDA_VISIBLE_DEVICES)"
        )
    })?;
    if ordinal >= count.max(0) as usize {
        bail!(
            "cuda:{ordinal} does not exist: the CUDA driver sees {count} GPUs (check \
             CUDA_VISIBLE_DEVICES)"
        );
    }
    CudaContext::new(ordinal)
        .map_err(|e| anyhow!("making GPU {ordinal}'s primary context current: {e}"))
}

/// A communicator handle.
struct Comm(ncclComm_t);
// SAFETY: an NCCL communicator may be used from any thread, one call at a time: `Nccl` keeps it
// behind a Mutex, and the init thread hands it over through a channel without keeping a copy.
unsafe impl Send for Comm {}

/// The overlapped operations' side ([`Collective::start`]): a stream of their own, created on
/// first use with `CU_STREAM_NON_BLOCKING` (a blocking stream would synchronise with the legacy
/// default stream, where backward runs, and nothing would overlap), and the buffers of the
/// operations started and not yet finished, kept alive until then.
struct Overlap {
    stream: cu::CUstream,
    pending: Vec<Tensor>,
}
// SAFETY: a CUDA stream handle may be used from any thread (with its context current); it is
// only used behind the Mutex in `Nccl`.
unsafe impl Send for Overlap {}

/// A process group of `world_size` ranks, one GPU each, talking through NCCL.
pub struct Nccl {
    rank: usize,
    world_size: usize,
    /// The CUDA device ordinal of this rank's GPU.
    ordinal: usize,
    /// `dist.timeout_secs`: the longest any one operation waits.
    timeout: Duration,
    api: &'static NcclApi,
    /// This rank's GPU (primary context; released after the communicator, field order).
    ctx: Arc<CudaContext>,
    /// `None` once aborted after a failure. The lock also serialises operations.
    comm: Mutex<Option<Comm>>,
    /// Locked before `comm` when both are.
    overlap: Mutex<Overlap>,
    /// Kept alive: on rank 0 it hosts the store.
    _store: Rendezvous,
}

impl Nccl {
    /// Joins the NCCL group through `store`, on GPU `ordinal` (every rank calls it at the
    /// same time). Errors: libcuda or libnccl missing (the message says how to provide them),
    /// NCCL too old, no GPU `ordinal`, rank 0's id not published or a rank not joining
    /// within the store's timeout, an NCCL error (named).
    pub fn connect(store: Rendezvous, ordinal: usize) -> Result<Nccl> {
        let (rank, world) = (store.rank(), store.world_size());
        let timeout = store.timeout();
        let (api, ctx) = open(ordinal)
            .with_context(|| format!("rank {rank}: starting the nccl backend on cuda:{ordinal}"))?;
        tracing::info!(
            "rank {rank}: NCCL {} ({}) on cuda:{ordinal}, {world} ranks",
            version_string(api.version),
            api.name
        );

        let id = if rank == 0 {
            let id = api.unique_id()?;
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            store.set(UNIQUE_ID_KEY, &bytes)?;
            id
        } else {
            let bytes = store
                .wait(&[UNIQUE_ID_KEY.to_string()])
                .with_context(|| format!("rank {rank}: waiting for rank 0's NCCL unique id"))?
                .remove(0);
            let mut id = ncclUniqueId { internal: [0; 128] };
            if bytes.len() != id.internal.len() {
                bail!(
                    "rank {rank}: {UNIQUE_ID_KEY} in the store has {} bytes, expected {}",
                    bytes.len(),
                    id.internal.len()
                );
            }
            for (d, s) in id.internal.iter_mut().zip(bytes) {
                *d = s as c_char;
            }
            id
        };

        let comm = init_comm(api, &ctx, world, rank, id, timeout)?;
        Ok(Nccl {
            rank,
            world_size: world,
            ordinal,
            timeout,
            api,
            ctx,
            comm: Mutex::new(Some(comm)),
            overlap: Mutex::new(Overlap {
                stream: std::ptr::null_mut(),
                pending: Vec::new(),
            }),
            _store: store,
        })
    }

    /// The buffer must be on this rank's GPU.
    fn check_device(&self, buffer: &Tensor, what: &str) -> Result<()> {
        if buffer.device() != Device::Cuda(self.ordinal) {
            bail!(
                "nccl backend: {what} expects a buffer on cuda:{} (this rank's GPU), got {:?}",
                self.ordinal,
                buffer.device()
            );
        }
        Ok(())
    }

    /// Enqueues one collective with `enqueue` (given the communicator), then waits for it (see
    /// the module docs). Any failure aborts the communicator: the group is unusable afterwards.
    fn run(&self, what: &str, enqueue: impl FnOnce(&NcclApi, ncclComm_t) -> c_int) -> Result<()> {
        self.with_comm(what, |comm| {
            self.api.check(enqueue(self.api, comm), what)?;
            // SAFETY: querying the legacy default stream of the current context (bound by
            // `with_comm`) has no preconditions.
            self.wait_until_done(comm, what, || unsafe {
                cu::cuStreamQuery(std::ptr::null_mut())
            })
        })
    }

    /// Runs `body` with the communicator and this GPU's context current on the calling thread.
    /// Any failure aborts the communicator: the group is unusable afterwards.
    fn with_comm(&self, what: &str, body: impl FnOnce(ncclComm_t) -> Result<()>) -> Result<()> {
        let mut slot = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let Some(Comm(comm)) = slot.as_ref() else {
            bail!(
                "rank {}: NCCL {what}: the communicator was aborted after an earlier failure; the \
                 group is unusable",
                self.rank
            );
        };
        let comm = *comm;
        let result = guarded(what, || {
            self.ctx
                .bind_to_thread()
                .map_err(|e| anyhow!("making cuda:{}'s context current: {e}", self.ordinal))?;
            body(comm)
        });
        if let Err(e) = result {
            // The communicator's state is unknown (a kernel may still wait for peers): abort
            // it, which stops that kernel, so no later call and no Drop blocks on it.
            // SAFETY: `comm` is live (taken out of the slot right after, never used again).
            let _ = unsafe { (self.api.comm_abort)(comm) };
            *slot = None;
            return Err(e.context(format!(
                "rank {}: NCCL {what} failed; the communicator was aborted and the group is \
                 unusable",
                self.rank
            )));
        }
        Ok(())
    }

    /// Returns once `query` (`cuStreamQuery` or `cuEventQuery`) says the work is done; fails on
    /// a CUDA error, on an asynchronous NCCL error (a peer died, the network failed), or after
    /// `timeout`. Polls with sleeps growing from 10 us to 1 ms.
    fn wait_until_done(
        &self,
        comm: ncclComm_t,
        what: &str,
        query: impl Fn() -> cu::CUresult,
    ) -> Result<()> {
        let started = Instant::now();
        let mut pause = Duration::from_micros(10);
        loop {
            match query() {
                cu::CUresult::CUDA_SUCCESS => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                e => bail!(
                    "CUDA error while waiting for NCCL {what}: {}",
                    cudarc::driver::DriverError(e)
                ),
            }
            let mut state = NCCL_SUCCESS;
            // SAFETY: `comm` is live; `state` is a valid int to write.
            let code = unsafe { (self.api.comm_get_async_error)(comm, &mut state) };
            self.api.check(code, "ncclCommGetAsyncError")?;
            if state != NCCL_SUCCESS && state != NCCL_IN_PROGRESS {
                bail!(
                    "NCCL {what}: communicator error {} (a peer died or the network failed)",
                    self.api.describe(state)
                );
            }
            if started.elapsed() >= self.timeout {
                bail!(
                    "NCCL {what} did not complete within {} s (dist.timeout_secs): another rank \
                     did not call it (skipped it, hung, or died)",
                    self.timeout.as_secs()
                );
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// Rank 0's contents of `buffer` (flat, contiguous, on this GPU) to every rank, in place.
    fn broadcast_tensor(&self, buffer: &mut Tensor, what: &str) -> Result<()> {
        self.check_device(buffer, what)?;
        // A broadcast is a copy: any dtype goes as its bytes.
        let dtype = ncclDataType_t::ncclUint8 as c_int;
        let n = buffer.numel() * buffer.kind().elt_size_in_bytes();
        if n == 0 {
            return Ok(());
        }
        let ptr = buffer.data_ptr();
        self.run(what, |api, comm| {
            // SAFETY: `ptr` addresses `n` bytes on this rank's GPU (checked by
            // the callers), alive and not otherwise accessed until `run` returns, which waits
            // for the collective; in place (send == recv) is allowed by NCCL.
            unsafe { (api.broadcast)(ptr, ptr, n, dtype, 0, comm, DEFAULT_STREAM) }
        })
    }
}

/// Checks and opens the libraries and this rank's GPU (see the module docs).
fn open(ordinal: usize) -> Result<(&'static NcclApi, Arc<CudaContext>)> {
    // Both libraries are checked before any cudarc call, and both misses reported at once.
    let cuda = check_libcuda();
    let nccl = NcclApi::get();
    match (cuda, nccl) {
        (Ok(_), Ok(api)) => {
            let ctx = guarded("selecting the GPU", || cuda_context(ordinal))?;
            Ok((api, ctx))
        }
        (Err(a), Err(b)) => bail!("{a}\n{b}"),
        (Err(e), _) | (_, Err(e)) => bail!("{e}"),
    }
}

/// `ncclCommInitRank` on a helper thread with `ctx` current, given up after `timeout`.
fn init_comm(
    api: &'static NcclApi,
    ctx: &Arc<CudaContext>,
    world: usize,
    rank: usize,
    id: ncclUniqueId,
    timeout: Duration,
) -> Result<Comm> {
    let (tx, rx) = mpsc::channel::<Result<Comm>>();
    let ctx = ctx.clone();
    std::thread::Builder::new()
        .name("devise-nccl-init".into())
        .spawn(move || {
            let result = guarded("ncclCommInitRank", || {
                ctx.bind_to_thread()
                    .map_err(|e| anyhow!("making cuda:{}'s context current: {e}", ctx.ordinal()))?;
                let mut comm: ncclComm_t = std::ptr::null_mut();
                // SAFETY: `comm` is a valid pointer to write; `id` came from rank 0's
                // ncclGetUniqueId; NCCL picks the device of the current context (GPU
                // `ordinal`).
                let code =
                    unsafe { (api.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) };
                api.check(code, "ncclCommInitRank")?;
                Ok(Comm(comm))
            });
            if let Err(mpsc::SendError(Ok(Comm(comm)))) = tx.send(result) {
                // The caller gave up (timeout) and returned an error: nobody will use it.
                // SAFETY: `comm` was just created and is owned here alone.
                let _ = unsafe { (api.comm_abort)(comm) };
            }
        })
        .context("starting the NCCL init thread")?;
    match rx.recv_timeout(timeout) {
        Ok(result) => {
            result.with_context(|| format!("rank {rank}: joining the NCCL group of {world}"))
        }
        Err(mpsc::RecvTimeoutError::Timeout) => bail!(
            "rank {rank}: NCCL initialisation (ncclCommInitRank, {world} ranks) did not finish \
             within {} s (dist.timeout_secs): a rank did not join (died or never started), or the \
             nodes cannot reach each other on the interface NCCL chose (see NCCL_SOCKET_IFNAME, \
             NCCL_DEBUG=INFO)",
            timeout.as_secs()
        ),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            bail!("rank {rank}: the NCCL init thread ended without an answer")
        }
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        let overlap = self.overlap.get_mut().unwrap_or_else(|p| p.into_inner());
        // Operations started and never finished (an error or a panic on the way): their kernels
        // may wait for peers forever, so the communicator is aborted, not destroyed.
        let unfinished = !overlap.pending.is_empty();
        let comm = self
            .comm
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(Comm(comm)) = comm {
            let _ = guarded("ncclCommDestroy", || {
                let _ = self.ctx.bind_to_thread();
                // SAFETY: `comm` is live and taken out of the slot: never used again. Without
                // unfinished overlapped operations, every operation waited for its collective,
                // so none is pending.
                let _ = unsafe {
                    if unfinished {
                        (self.api.comm_abort)(comm)
                    } else {
                        (self.api.comm_destroy)(comm)
                    }
                };
                Ok(())
            });
        }
        if !overlap.stream.is_null() {
            let stream = overlap.stream;
            let _ = guarded("cuStreamDestroy", || {
                let _ = self.ctx.bind_to_thread();
                // SAFETY: our own stream, never used again; CUDA lets queued work finish first.
                let _ = unsafe { cu::cuStreamDestroy_v2(stream) };
                Ok(())
            });
        }
        overlap.pending.clear();
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    fn all_reduce(&self, buffer: &mut Tensor, op: ReduceOp) -> Result<()> {
        check_flat(buffer, "all_reduce")?;
        self.check_device(buffer, "all_reduce")?;
        let dtype = nccl_dtype(buffer.kind())?;
        let n = buffer.numel();
        if n == 0 {
            return Ok(());
        }
        let ptr = buffer.data_ptr();
        let red = nccl_op(op);
        self.run("all-reduce", |api, comm| {
            // SAFETY: `ptr` addresses `n` contiguous elements of `dtype` on this rank's GPU
            // (check_flat, check_device), borrowed mutably until `run` returns, which waits for
            // the collective; in place (send == recv) is allowed by NCCL.
            unsafe { (api.all_reduce)(ptr, ptr, n, dtype, red, comm, DEFAULT_STREAM) }
        })
    }

    fn broadcast(&self, buffer: &mut Tensor) -> Result<()> {
        check_1d(buffer, "broadcast")?;
        self.broadcast_tensor(buffer, "broadcast")
    }

    /// Through the GPU: the length (8 bytes), then the bytes, as `Uint8` tensors (no size limit,
    /// nothing left behind in the store).
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        let device = Device::Cuda(self.ordinal);
        let len = if self.rank == 0 {
            bytes.len() as u64
        } else {
            0
        };
        let mut len_t = Tensor::f_from_slice(&len.to_le_bytes())?.f_to_device(device)?;
        self.broadcast_tensor(&mut len_t, "broadcast_bytes (length)")?;
        let len_bytes: [u8; 8] = Vec::<u8>::try_from(&len_t.f_to_device(Device::Cpu)?)?
            .try_into()
            .map_err(|_| anyhow!("broadcast_bytes: the length is not 8 bytes"))?;
        let len = u64::from_le_bytes(len_bytes) as usize;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut data = if self.rank == 0 {
            Tensor::f_from_slice(&bytes)?.f_to_device(device)?
        } else {
            Tensor::f_zeros([len as i64], (Kind::Uint8, device))?
        };
        self.broadcast_tensor(&mut data, "broadcast_bytes")?;
        Ok(Vec::<u8>::try_from(&data.f_to_device(Device::Cpu)?)?)
    }

    fn barrier(&self) -> Result<()> {
        let mut one = Tensor::f_ones([1], (Kind::Float, Device::Cuda(self.ordinal)))?;
        self.all_reduce(&mut one, ReduceOp::Sum).context("barrier")
    }

    /// Enqueues `op` on the overlap stream behind an event recorded now on the legacy default
    /// stream (so it runs after the kernels that produced `buffer`, and backward's later kernels
    /// are not waited for), and returns.
    fn start(&self, buffer: &Tensor, op: Started) -> Result<()> {
        let what = match op {
            Started::AllReduce(_) => "all-reduce (overlapped)",
            Started::Broadcast => "broadcast (overlapped)",
        };
        match op {
            Started::AllReduce(_) => check_flat(buffer, what)?,
            Started::Broadcast => check_1d(buffer, what)?,
        }
        self.check_device(buffer, what)?;
        let (count, dtype, red) = match op {
            Started::AllReduce(op) => (buffer.numel(), nccl_dtype(buffer.kind())?, nccl_op(op)),
            Started::Broadcast => (
                buffer.numel() * buffer.kind().elt_size_in_bytes(),
                ncclDataType_t::ncclUint8 as c_int,
                0,
            ),
        };
        if count == 0 {
            return Ok(());
        }
        let ptr = buffer.data_ptr();
        let mut overlap = self.overlap.lock().unwrap_or_else(|p| p.into_inner());
        self.with_comm(what, |comm| {
            if overlap.stream.is_null() {
                let mut stream = std::ptr::null_mut();
                // SAFETY: writes a new stream handle of the current context.
                cuda_check(
                    unsafe {
                        cu::cuStreamCreate(
                            &mut stream,
                            cu::CUstream_flags_enum::CU_STREAM_NON_BLOCKING as u32,
                        )
                    },
                    "cuStreamCreate",
                )?;
                overlap.stream = stream;
            }
            let stream = overlap.stream;
            let event = new_event()?;
            // SAFETY: `event` is recorded on the legacy default stream, waited for by our stream
            // and released (CUDA keeps it until the wait is done).
            unsafe {
                let recorded = cu::cuEventRecord(event, std::ptr::null_mut());
                let waited = cu::cuStreamWaitEvent(stream, event, 0);
                cu::cuEventDestroy_v2(event);
                cuda_check(recorded, "cuEventRecord")?;
                cuda_check(waited, "cuStreamWaitEvent")?;
            }
            // SAFETY: `ptr` addresses `count` elements of `dtype` on this rank's GPU (checked
            // above), kept alive in `pending` and not accessed by the caller until `finish`
            // returns (the trait's contract); in place is allowed by NCCL.
            let code = unsafe {
                match op {
                    Started::AllReduce(_) => {
                        (self.api.all_reduce)(ptr, ptr, count, dtype, red, comm, stream.cast())
                    }
                    Started::Broadcast => {
                        (self.api.broadcast)(ptr, ptr, count, dtype, 0, comm, stream.cast())
                    }
                }
            };
            self.api.check(code, what)
        })?;
        overlap.pending.push(buffer.shallow_clone());
        Ok(())
    }

    /// Makes the legacy default stream wait for everything started (the optimizer step queued
    /// after it sees the results), and waits on the host too: errors and `dist.timeout_secs`
    /// surface here, and the vote can be read.
    fn finish(&self) -> Result<()> {
        let mut overlap = self.overlap.lock().unwrap_or_else(|p| p.into_inner());
        if overlap.pending.is_empty() {
            return Ok(());
        }
        let stream = overlap.stream;
        let what = "overlapped operations";
        let result = self.with_comm(what, |comm| {
            let event = new_event()?;
            let waited = (|| {
                // SAFETY: `event` is live until destroyed below; recorded on our stream, waited
                // for by the default stream and polled.
                unsafe {
                    cuda_check(cu::cuEventRecord(event, stream), "cuEventRecord")?;
                    cuda_check(
                        cu::cuStreamWaitEvent(std::ptr::null_mut(), event, 0),
                        "cuStreamWaitEvent",
                    )?;
                }
                // SAFETY: `event` is live until destroyed below.
                self.wait_until_done(comm, what, || unsafe { cu::cuEventQuery(event) })
            })();
            // SAFETY: the event is not used after this.
            unsafe { cu::cuEventDestroy_v2(event) };
            waited
        });
        overlap.pending.clear();
        result
    }
}

/// A new event of the current context, without timing (destroy it with `cuEventDestroy_v2`).
fn new_event() -> Result<cu::CUevent> {
    let mut event = std::ptr::null_mut();
    // SAFETY: writes a new event handle of the current context.
    cuda_check(
        unsafe {
            cu::cuEventCreate(
                &mut event,
                cu::CUevent_flags_enum::CU_EVENT_DISABLE_TIMING as u32,
            )
        },
        "cuEventCreate",
    )?;
    Ok(event)
}

/// A CUDA driver result as an error naming the call.
fn cuda_check(code: cu::CUresult, call: &str) -> Result<()> {
    if code != cu::CUresult::CUDA_SUCCESS {
        bail!("{call}: {}", cudarc::driver::DriverError(code));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::store::tests::env;

    #[test]
    fn names_versions_and_mappings() {
        assert_eq!(result_name(2), "ncclSystemError");
        assert_eq!(result_name(42), "ncclResult 42");
        assert_eq!(version_string(22809), "2.28.9");
        assert_eq!(version_string(2804), "2.8.4");
        assert_eq!(nccl_dtype(Kind::Float).unwrap(), 7);
        assert_eq!(nccl_dtype(Kind::BFloat16).unwrap(), 9);
        assert!(nccl_dtype(Kind::Double).is_err());
        assert_eq!((nccl_op(ReduceOp::Sum), nccl_op(ReduceOp::Mean)), (0, 4));
        // The names checked are cudarc's, plus NCCL's soname first.
        let cuda = libcuda_candidates();
        assert!(
            cuda.contains(&"libcuda.so".to_string()) && cuda.contains(&"libcuda.so.1".to_string())
        );
        let nccl = libnccl_candidates();
        assert_eq!(nccl[0], "libnccl.so.2");
        assert!(nccl.contains(&"libnccl.so".to_string()));
    }

    #[test]
    fn connect_fails_cleanly_without_the_libraries_or_runs_on_a_gpu() {
        let has_cuda = check_libcuda().is_ok();
        let has_nccl = NcclApi::get().is_ok();
        let gpus = tch::Cuda::device_count();
        let store = Rendezvous::join(&env(0, 1, 0, "tok"), Duration::from_secs(20)).unwrap();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| Nccl::connect(store, 0)))
            .expect("Nccl::connect panicked");
        if !(has_cuda && has_nccl && gpus > 0) {
            let e = format!(
                "{:#}",
                result
                    .err()
                    .expect("connect succeeded without GPU/libraries")
            );
            if !has_cuda {
                assert!(e.contains("libcuda") && e.contains("libcuda.so.1"), "{e}");
            }
            if !has_nccl {
                assert!(
                    e.contains("libnccl.so.2") && e.contains("nvidia/nccl/lib"),
                    "{e}"
                );
            }
            println!(
                "SKIP: 1-rank NCCL smoke test (libcuda {has_cuda}, libnccl {has_nccl}, libtorch \
                 GPUs {gpus}); connect failed as expected: {e}"
            );
            return;
        }
        let nccl = result.unwrap();
        let dev = Device::Cuda(0);
        let mut t = Tensor::arange(1000, (Kind::Float, dev));
        nccl.all_reduce(&mut t, ReduceOp::Sum).unwrap();
        nccl.all_reduce(&mut t, ReduceOp::Mean).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(&t.to_device(Device::Cpu)).unwrap(),
            (0..1000).map(|i| i as f32).collect::<Vec<_>>()
        );
        let mut h = Tensor::full([300], 3.0, (Kind::BFloat16, dev));
        nccl.all_reduce(&mut h, ReduceOp::Sum).unwrap();
        assert_eq!(
            h.to_kind(Kind::Float).sum(Kind::Float).double_value(&[]),
            900.0
        );
        let mut b = Tensor::full([70_000], 2.0, (Kind::Float, dev));
        nccl.broadcast(&mut b).unwrap();
        assert_eq!(b.sum(Kind::Float).double_value(&[]), 140_000.0);
        assert_eq!(nccl.broadcast_bytes(b"hello".to_vec()).unwrap(), b"hello");
        assert_eq!(nccl.broadcast_bytes(Vec::new()).unwrap(), Vec::<u8>::new());
        nccl.barrier().unwrap();
        // Wrong device and dtype are errors, and do not break the communicator.
        let mut cpu = Tensor::ones([4], (Kind::Float, Device::Cpu));
        assert!(nccl.all_reduce(&mut cpu, ReduceOp::Sum).is_err());
        let mut int = Tensor::ones([4], (Kind::Int64, dev));
        assert!(nccl.all_reduce(&mut int, ReduceOp::Sum).is_err());
        nccl.barrier().unwrap();
    }
}
