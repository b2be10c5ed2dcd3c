//! Gradients averaged over ranks while backward still runs (what PyTorch DDP's `Reducer` does,
//! on the same libtorch hooks), and the step's vote carried in the last all-reduce.
//!
//! # Buckets
//!
//! The parameters a stage trains are laid out in flat buckets in the reverse of the order the
//! model created them, which is the order backward produces their gradients (head first, stem
//! last). A bucket is closed once it holds `dist.first_bucket_size_mb` (the first, so its
//! all-reduce starts early) or `dist.bucket_size_mb` (the others), PyTorch DDP's rule; one dtype
//! per bucket. Each parameter's `.grad` is a view into its bucket, with
//! the parameter's strides (PyTorch's `gradient_as_bucket_view`): backward accumulates into
//! bucket memory and the all-reduce works in place there, with no copy in or out.
//!
//! # Overlap (`dist.overlap = true`, the default)
//!
//! Every parameter gets libtorch's post-accumulate-grad hook (`csrc/grad_hooks.cpp`; the hook
//! `Tensor.register_post_accumulate_grad_hook` sets in Python), which tells a communication
//! thread that the parameter's gradient is complete. Once all of a bucket's gradients are
//! complete and every earlier bucket has started, the thread checks the bucket for non-finite
//! values (this rank's own gradients, before anything is mixed) and starts its all-reduce
//! ([`Collective::start`]): the `cpu` ring reduces it right there, on that thread, while backward
//! goes on on the training thread; `nccl` enqueues it on its own CUDA stream behind an event on
//! the compute stream. Buckets start in index order, the same sequence on every rank whatever
//! order the hooks fire in. A bucket with a gradient backward never produced (a parameter unused
//! in this step; its gradient stays zero) starts when backward returns. The optimizer step waits
//! only for what is still in flight ([`Collective::finish`]).
//!
//! `dist.overlap = false` performs the same operations in the same order after backward returns:
//! bit-identical results, nothing hidden. Why hooks rather than running backward module by
//! module: the hooks need no change to the model or the loss, and they fire per parameter, so a
//! bucket starts the moment its last gradient lands, also inside a module.
//!
//! # The vote
//!
//! Every step the ranks agree on the global batch's mean loss, on which ranks saw a non-finite
//! loss or gradient (checked on each rank's own values, so the error names the rank), and on
//! whether any rank was asked to stop. Those `3 + world_size` floats ride at the end of the last
//! bucket: no round trip of their own. Built with tensor operations on the device (no host sync
//! per bucket); read back once the last all-reduce is done.
//!
//! The BatchNorm running statistics, when the stage updates them, are broadcast from rank 0 as
//! the first operation of the sequence (they are final once the forward pass is done), hidden
//! behind backward too.
use anyhow::{anyhow, bail, Context, Result};
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

use super::{Collective, ReduceOp, Started};

extern "C" {
    fn devise_set_grad_ready_hook(
        param: *const c_void,
        ready: extern "C" fn(*mut c_void, i64),
        context: *mut c_void,
        index: i64,
    ) -> i32;
    fn devise_clear_grad_ready_hook(param: *const c_void) -> i32;
    fn devise_set_grad(param: *const c_void, grad: *const c_void) -> i32;
}

/// How gradients are bucketed and when they are averaged (`[dist]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Largest first bucket, bytes.
    pub first_bucket_bytes: usize,
    /// Largest other bucket, bytes.
    pub bucket_bytes: usize,
    /// Start each bucket's all-reduce during backward.
    pub overlap: bool,
}

/// One rank's loss and gradients before the all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Loss and every gradient finite.
    Finite,
    /// The loss is NaN or infinite.
    NonFiniteLoss,
    /// The loss is finite, some gradient element is not.
    NonFiniteGradients,
}

/// What the ranks agreed on after a step's backward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Votes {
    /// Mean of the ranks' losses (finite ones only; NaN when none is).
    pub mean_loss: f64,
    /// Some rank was asked to stop.
    pub stop: bool,
    /// `(rank, what)` of every rank whose loss or gradients were not finite.
    pub unhealthy: Vec<(usize, Health)>,
}

impl Votes {
    /// Length of the vote: `[sum of finite losses, ranks with a finite loss, stop votes, health
    /// code per rank]` (each divided by `world_size` after the mean all-reduce).
    fn len(world_size: usize) -> i64 {
        3 + world_size as i64
    }

    /// Reads a vote averaged over `world_size` ranks (module docs). Health codes: 0 finite, 1
    /// loss, 2 gradients; rounded after scaling back, exact for any world size below 2^22.
    fn decode(values: &[f32], world_size: usize) -> Votes {
        let w = world_size as f32;
        let unhealthy = values[3..]
            .iter()
            .enumerate()
            .filter_map(|(rank, &code)| match (code * w).round() as u8 {
                0 => None,
                1 => Some((rank, Health::NonFiniteLoss)),
                _ => Some((rank, Health::NonFiniteGradients)),
            })
            .collect();
        Votes {
            // The mean of the losses over the mean of the counts: both were divided by w.
            mean_loss: if values[1] > 0.0 {
                f64::from(values[0]) / f64::from(values[1])
            } else {
                f64::NAN
            },
            stop: values[2] > 0.0,
            unhealthy,
        }
    }

    /// `non-finite loss on rank(s) 1; non-finite gradients (finite loss) on rank(s) 0, 3`.
    pub fn describe_unhealthy(&self) -> String {
        let ranks = |h: Health| -> Vec<String> {
            self.unhealthy
                .iter()
                .filter(|(_, x)| *x == h)
                .map(|(r, _)| r.to_string())
                .collect()
        };
        let mut parts = Vec::new();
        for (h, what) in [
            (Health::NonFiniteLoss, "non-finite loss (NaN/inf)"),
            (
                Health::NonFiniteGradients,
                "non-finite gradients (finite loss)",
            ),
        ] {
            let r = ranks(h);
            if !r.is_empty() {
                parts.push(format!("{what} on rank(s) {}", r.join(", ")));
            }
        }
        parts.join("; ")
    }
}

/// What one step hands the reducer besides its gradients.
pub struct StepInput<'a> {
    /// This rank's loss, a 0-dim tensor on the device (read into the vote on the device).
    pub loss: &'a Tensor,
    /// Asked once, when the vote is cast (after this rank's backward produced its last bucket).
    pub want_stop: &'a (dyn Fn() -> bool + Sync),
    /// Variables every rank takes from rank 0 in this step (BatchNorm running statistics);
    /// empty when the stage does not change them.
    pub broadcast: &'a mut [Tensor],
    /// Test fault: an infinite gradient element on this rank (the first element of the first
    /// parameter), written before the check.
    pub inf_grad: bool,
}

/// A bucket: flat memory holding its parameters' gradients (and, in the last bucket, the vote).
struct Bucket {
    /// `[grads (+ vote)]`.
    flat: Tensor,
    /// Indices into the parameter list, in memory order.
    params: Vec<usize>,
    /// Elements that are gradients.
    grad_len: i64,
}

/// Hands a ready parameter's index to the step's communication thread, when one is armed.
struct HookShared {
    ready: Mutex<Option<mpsc::Sender<usize>>>,
}

/// The post-accumulate-grad hook (`csrc/grad_hooks.cpp`). Never panics (it runs inside
/// libtorch's autograd engine).
extern "C" fn grad_ready(context: *mut c_void, index: i64) {
    // SAFETY: `context` is the `HookShared` of a live `Reducer`, which clears every hook before
    // the box is freed (Drop).
    let shared = unsafe { &*(context as *const HookShared) };
    if let Ok(ready) = shared.ready.lock() {
        if let Some(tx) = ready.as_ref() {
            let _ = tx.send(index as usize);
        }
    }
}

/// Averages one stage's gradients across ranks (module docs). One per optimizer: the hooks and
/// the gradient views belong to its parameters until it is dropped.
pub struct Reducer {
    rank: usize,
    world_size: usize,
    /// The parameters (shallow), in the optimizer's order.
    params: Vec<Tensor>,
    buckets: Vec<Bucket>,
    /// Bucket of each parameter.
    param_bucket: Vec<usize>,
    /// Set when hooks are registered (overlap with more than one rank).
    hooks: Option<Box<HookShared>>,
    /// Buckets started in the current (or last) step.
    started: AtomicUsize,
    /// Of those, how many before backward returned (the last step's).
    started_in_backward: AtomicUsize,
    /// The last step's backward pass, nanoseconds.
    backward_ns: AtomicU64,
}

impl Reducer {
    /// Lays out `params` (the optimizer's, in its order) in buckets following `creation_order`
    /// (indices into `params`, in the order the model created them) and makes their `.grad`
    /// views into the buckets; with `plan.overlap`, registers the hooks. One rank: nothing to
    /// average, the gradients stay libtorch's own. Errors: libtorch refused a hook or a gradient.
    pub fn new(
        collective: &dyn Collective,
        plan: Plan,
        params: &[Tensor],
        creation_order: &[usize],
    ) -> Result<Reducer> {
        let (rank, world_size) = (collective.rank(), collective.world_size());
        let mut reducer = Reducer {
            rank,
            world_size,
            params: params.iter().map(|p| p.shallow_clone()).collect(),
            buckets: Vec::new(),
            param_bucket: vec![0; params.len()],
            hooks: None,
            started: AtomicUsize::new(0),
            started_in_backward: AtomicUsize::new(0),
            backward_ns: AtomicU64::new(0),
        };
        if world_size == 1 {
            return Ok(reducer);
        }
        if params.is_empty() {
            bail!("data-parallel training of a stage with no trained parameters");
        }
        let order: Vec<usize> = creation_order.iter().rev().copied().collect();
        let groups = bucket_layout(params, &order, plan.first_bucket_bytes, plan.bucket_bytes);
        let last = groups.len() - 1;
        if params[groups[last][0]].kind() != Kind::Float {
            bail!(
                "data-parallel training needs float32 parameters (the step's vote rides in the \
                 last gradient bucket); got {:?}",
                params[groups[last][0]].kind()
            );
        }
        for (b, group) in groups.into_iter().enumerate() {
            let first = &params[group[0]];
            let grad_len: i64 = group.iter().map(|&i| params[i].numel() as i64).sum();
            let vote = if b == last { Votes::len(world_size) } else { 0 };
            let flat = Tensor::zeros([grad_len + vote], (first.kind(), first.device()));
            let mut offset = 0;
            for &i in &group {
                let p = &params[i];
                let n = p.numel() as i64;
                // The parameter's own strides when they are dense (contiguous, channels-last),
                // so accumulation keeps its layout; else contiguous.
                let part = flat.narrow(0, offset, n);
                let view = if dense(&p.size(), &p.stride()) {
                    part.as_strided(p.size(), p.stride(), None::<i64>)
                } else {
                    part.view(p.size().as_slice())
                };
                // SAFETY: both are live tensors; the view has the parameter's shape, strides,
                // dtype and device.
                if unsafe { devise_set_grad(p.as_ptr() as *const c_void, view.as_ptr() as _) } != 0
                {
                    bail!("libtorch refused a gradient view for parameter {i}");
                }
                reducer.param_bucket[i] = b;
                offset += n;
            }
            reducer.buckets.push(Bucket {
                flat,
                params: group,
                grad_len,
            });
        }
        if plan.overlap {
            let shared = Box::new(HookShared {
                ready: Mutex::new(None),
            });
            let context = &*shared as *const HookShared as *mut c_void;
            reducer.hooks = Some(shared);
            for (i, p) in reducer.params.iter().enumerate() {
                // SAFETY: `p` is a live leaf tensor; `context` outlives the hook (Drop clears it
                // before the box is freed).
                let code = unsafe {
                    devise_set_grad_ready_hook(p.as_ptr() as _, grad_ready, context, i as i64)
                };
                if code != 0 {
                    bail!("libtorch refused a gradient hook on parameter {i}");
                }
            }
        }
        Ok(reducer)
    }

    /// Buckets started so far in the current step (all of them once a step returned).
    pub fn buckets_started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    /// Buckets of the last step started before its backward pass returned: how much the
    /// overlap had to work with (0 with `overlap = false`).
    pub fn buckets_started_in_backward(&self) -> usize {
        self.started_in_backward.load(Ordering::SeqCst)
    }

    /// How long the last step's backward pass took (with the overlap: while communicating).
    pub fn last_backward(&self) -> Duration {
        Duration::from_nanos(self.backward_ns.load(Ordering::SeqCst))
    }

    /// How many buckets, and the bytes of each (gradients only), in start order.
    pub fn bucket_bytes(&self) -> Vec<usize> {
        self.buckets
            .iter()
            .map(|b| b.grad_len as usize * b.flat.kind().elt_size_in_bytes())
            .collect()
    }

    /// Runs `backward` (which must accumulate the parameters' gradients, zeroed before), averages
    /// the gradients across ranks and casts the vote ([`Votes`]); afterwards every parameter's
    /// `.grad` holds the mean over ranks, and `input.broadcast` rank 0's values. Returns the
    /// votes and the time this thread waited for communication after backward returned (the
    /// exposed part). Errors: backward's, a rank gone or timed out (the group is then unusable).
    pub fn backward(
        &self,
        collective: &dyn Collective,
        input: StepInput<'_>,
        backward: impl FnOnce() -> Result<()>,
    ) -> Result<(Votes, Duration)> {
        let backward = || {
            let started = Instant::now();
            let result = backward();
            self.backward_ns
                .store(started.elapsed().as_nanos() as u64, Ordering::SeqCst);
            result
        };
        if self.world_size == 1 || self.buckets.is_empty() {
            backward()?;
            return Ok((self.local_votes(&input)?, Duration::ZERO));
        }
        // One flat copy per dtype of the variables taken from rank 0.
        let mut broadcast: Vec<(Vec<usize>, Tensor)> = Vec::new();
        let mut kinds: Vec<Kind> = Vec::new();
        for (i, t) in input.broadcast.iter().enumerate() {
            match kinds.iter().position(|&k| k == t.kind()) {
                Some(g) => broadcast[g].0.push(i),
                None => {
                    kinds.push(t.kind());
                    broadcast.push((vec![i], Tensor::new()));
                }
            }
        }
        for (indices, flat) in &mut broadcast {
            let parts: Vec<Tensor> = indices
                .iter()
                .map(|&i| input.broadcast[i].reshape([-1]))
                .collect();
            *flat = Tensor::cat(&parts, 0);
        }
        self.started.store(0, Ordering::SeqCst);
        let launcher = Launcher {
            collective,
            started: &self.started,
            buckets: self
                .buckets
                .iter()
                .map(|b| (b.flat.shallow_clone(), b.grad_len))
                .collect(),
            remaining: self.buckets.iter().map(|b| b.params.len()).collect(),
            param_bucket: self.param_bucket.clone(),
            next: 0,
            host_finite: true,
            device_extremes: None,
            loss: input.loss.detach(),
            want_stop: input.want_stop,
            inf_grad: input.inf_grad.then(|| self.param_bucket[0]),
            inf_param: self.params[0].grad(),
            rank: self.rank,
            world_size: self.world_size,
            broadcast: broadcast.iter().map(|(_, t)| t.shallow_clone()).collect(),
        };
        let abort = AtomicBool::new(false);
        let exposed = match &self.hooks {
            Some(hooks) => std::thread::scope(|scope| -> Result<Duration> {
                let (tx, rx) = mpsc::channel::<usize>();
                let armed = Armed::arm(hooks, &abort, tx)?;
                let abort = &abort;
                let worker = std::thread::Builder::new()
                    .name("devise-comm".into())
                    .spawn_scoped(scope, move || launcher.run(Some((rx, abort))))
                    .context("starting the communication thread")?;
                // A panic in backward drops `armed`: the thread's queue ends and it stops.
                let computed = backward();
                self.started_in_backward
                    .store(self.started.load(Ordering::SeqCst), Ordering::SeqCst);
                // Disarm: the thread starts what is left, unless backward failed.
                armed.disarm(computed.is_ok());
                let waiting = Instant::now();
                let communicated = worker.join().unwrap_or_else(|panic| {
                    Err(anyhow!(
                        "the communication thread panicked: {}",
                        panic_message(&panic)
                    ))
                });
                // Also after a failure: what was started completes (or fails) before the
                // buffers can be touched again.
                let finished = collective.finish();
                computed?;
                communicated?;
                finished?;
                Ok(waiting.elapsed())
            })?,
            None => {
                backward()?;
                self.started_in_backward.store(0, Ordering::SeqCst);
                let waiting = Instant::now();
                let communicated = launcher.run(None);
                let finished = collective.finish();
                communicated?;
                finished?;
                waiting.elapsed()
            }
        };
        for (indices, flat) in &broadcast {
            let mut offset = 0;
            for &i in indices {
                let t = &mut input.broadcast[i];
                let n = t.numel() as i64;
                let part = flat.narrow(0, offset, n).view_as(t);
                tch::no_grad(|| t.copy_(&part));
                offset += n;
            }
        }
        let last = self.buckets.last().expect("non-empty");
        let vote = last
            .flat
            .narrow(0, last.grad_len, Votes::len(self.world_size));
        let values = Vec::<f32>::try_from(vote.to_device(Device::Cpu))?;
        Ok((Votes::decode(&values, self.world_size), exposed))
    }

    /// One rank: this rank's loss and gradients are the vote.
    fn local_votes(&self, input: &StepInput<'_>) -> Result<Votes> {
        let grads: Vec<Tensor> = self.params.iter().map(|p| p.grad()).collect();
        if input.inf_grad {
            if let Some(g) = grads.first().filter(|g| g.defined()) {
                tch::no_grad(|| {
                    let _ = g.view([-1]).get(0).fill_(f64::INFINITY);
                });
            }
        }
        let loss = f64::try_from(input.loss)?;
        let health = if !loss.is_finite() {
            Health::NonFiniteLoss
        } else if !all_finite(grads.iter().filter(|g| g.defined()))? {
            Health::NonFiniteGradients
        } else {
            Health::Finite
        };
        Ok(Votes {
            mean_loss: if loss.is_finite() { loss } else { f64::NAN },
            stop: (input.want_stop)(),
            unhealthy: match health {
                Health::Finite => Vec::new(),
                other => vec![(0, other)],
            },
        })
    }
}

impl Drop for Reducer {
    fn drop(&mut self) {
        let mut cleared = true;
        for p in &self.params {
            // SAFETY: live leaf tensors; a null gradient resets `.grad` (the bucket memory is
            // freed with the buckets) and clearing the hook removes a use of `hooks`.
            unsafe {
                if self.hooks.is_some() {
                    cleared &= devise_clear_grad_ready_hook(p.as_ptr() as _) == 0;
                }
                if !self.buckets.is_empty() {
                    devise_set_grad(p.as_ptr() as _, std::ptr::null());
                }
            }
        }
        if !cleared {
            // A hook that could not be removed still points at `hooks`: it must outlive it.
            if let Some(hooks) = self.hooks.take() {
                Box::leak(hooks);
            }
        }
    }
}

/// The hooks armed for one backward pass. Dropped without [`Armed::disarm`] (a panic in
/// backward, a failed thread start), it disarms as after a failed pass: the communication
/// thread's queue ends and nothing more is started.
struct Armed<'a> {
    hooks: &'a HookShared,
    abort: &'a AtomicBool,
}

impl<'a> Armed<'a> {
    fn arm(
        hooks: &'a HookShared,
        abort: &'a AtomicBool,
        ready: mpsc::Sender<usize>,
    ) -> Result<Armed<'a>> {
        *hooks
            .ready
            .lock()
            .map_err(|_| anyhow!("gradient hook lock poisoned"))? = Some(ready);
        abort.store(true, Ordering::SeqCst);
        Ok(Armed { hooks, abort })
    }

    /// Ends the pass: after a successful backward (`succeeded`) the thread starts what is left.
    fn disarm(self, succeeded: bool) {
        self.abort.store(!succeeded, Ordering::SeqCst);
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        // The sender goes: the thread's `for` loop ends.
        let ready = match self.hooks.ready.lock() {
            Ok(mut ready) => ready.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(ready);
    }
}

/// A panic's message, when it has one.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Starts the buckets, in order, as their gradients complete (the communication thread's side).
struct Launcher<'a> {
    collective: &'a dyn Collective,
    /// Counts the buckets started.
    started: &'a AtomicUsize,
    /// `(flat buffer, gradient elements)` of each bucket.
    buckets: Vec<(Tensor, i64)>,
    /// Gradients each bucket still waits for.
    remaining: Vec<usize>,
    param_bucket: Vec<usize>,
    /// Next bucket to start.
    next: usize,
    /// Every CPU float32 bucket checked so far was finite.
    host_finite: bool,
    /// Sum of every other bucket's min and max (float64, on the device): finite iff they were.
    device_extremes: Option<Tensor>,
    loss: Tensor,
    want_stop: &'a (dyn Fn() -> bool + Sync),
    /// Test fault: the bucket of the first parameter, which gets an infinite element.
    inf_grad: Option<usize>,
    inf_param: Tensor,
    rank: usize,
    world_size: usize,
    /// The flat buffers broadcast first (one per dtype).
    broadcast: Vec<Tensor>,
}

impl Launcher<'_> {
    /// Starts buckets as the hooks report gradients (`ready`, until the sender is dropped), then
    /// whatever is left unless `abort` was set (backward failed); without `ready`, every bucket
    /// (after backward).
    fn run(mut self, ready: Option<(mpsc::Receiver<usize>, &AtomicBool)>) -> Result<()> {
        for flat in &self.broadcast {
            self.collective
                .start(flat, Started::Broadcast)
                .context("broadcasting the BatchNorm statistics")?;
        }
        if let Some((ready, abort)) = ready {
            for param in ready {
                let b = self.param_bucket[param];
                self.remaining[b] = self.remaining[b].saturating_sub(1);
                while self.next < self.buckets.len() && self.remaining[self.next] == 0 {
                    self.start(self.next)?;
                    self.next += 1;
                }
            }
            if abort.load(Ordering::SeqCst) {
                return Ok(());
            }
        }
        while self.next < self.buckets.len() {
            self.start(self.next)?;
            self.next += 1;
        }
        Ok(())
    }

    /// Checks bucket `b` for non-finite values, writes the vote into the last one, starts its
    /// all-reduce.
    fn start(&mut self, b: usize) -> Result<()> {
        let (flat, grad_len) = (&self.buckets[b].0, self.buckets[b].1);
        if self.inf_grad == Some(b) {
            // The parameter's first element in memory (its gradient may be channels-last).
            tch::no_grad(|| {
                let _ = self
                    .inf_param
                    .as_strided([1], [1], None::<i64>)
                    .fill_(f64::INFINITY);
            });
        }
        let grads = flat.narrow(0, 0, grad_len);
        if grads.device() == Device::Cpu && grads.kind() == Kind::Float {
            self.host_finite &= finite_f32(&grads);
        } else {
            let (min, max) = grads.aminmax(None::<i64>, false);
            let sum = min.to_kind(Kind::Double) + max.to_kind(Kind::Double);
            self.device_extremes = Some(match self.device_extremes.take() {
                Some(acc) => acc + sum,
                None => sum,
            });
        }
        if b + 1 == self.buckets.len() {
            let vote = self.vote(flat.device());
            let mut tail = flat.narrow(0, grad_len, Votes::len(self.world_size));
            tch::no_grad(|| tail.copy_(&vote));
        }
        self.collective
            .start(flat, Started::AllReduce(ReduceOp::Mean))
            .with_context(|| format!("gradient bucket {b}"))?;
        self.started.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// This rank's vote `[loss or 0, loss finite, stop, health code at 3 + rank]` on `device`,
    /// computed there (device kernels only: no copy from the host, which would wait for
    /// backward's queued work).
    fn vote(&self, device: Device) -> Tensor {
        let loss = self.loss.to_kind(Kind::Float).reshape([]);
        let loss_finite = loss.isfinite();
        let grads_finite = match &self.device_extremes {
            Some(acc) if self.host_finite => acc.isfinite(),
            _ => Tensor::full([], i64::from(self.host_finite), (Kind::Bool, device)),
        };
        // 0 finite, 1 non-finite loss, 2 non-finite gradients (finite loss).
        let code =
            Tensor::where_scalar(&grads_finite, 0.0, 2.0).where_scalarother(&loss_finite, 1.0);
        let stop = f64::from(u8::from((self.want_stop)()));
        let head = Tensor::stack(
            &[
                loss.where_scalarother(&loss_finite, 0.0),
                loss_finite.to_kind(Kind::Float),
                Tensor::full([], stop, (Kind::Float, device)),
            ],
            0,
        );
        let codes = Tensor::zeros([self.world_size as i64], (Kind::Float, device));
        let mut slot = codes.narrow(0, self.rank as i64, 1);
        slot.copy_(&code.to_kind(Kind::Float).reshape([1]));
        Tensor::cat(&[head, codes], 0)
    }
}

/// Whether `stride` lays out `size` densely: every element once, no gaps (any dimension order).
fn dense(size: &[i64], stride: &[i64]) -> bool {
    let mut dims: Vec<(i64, i64)> = size.iter().copied().zip(stride.iter().copied()).collect();
    dims.retain(|&(n, _)| n != 1);
    dims.sort_by_key(|&(_, s)| s);
    let mut expected = 1;
    for (n, s) in dims {
        if s != expected {
            return false;
        }
        expected *= n;
    }
    true
}

/// Whether every element of a CPU float32 tensor is finite: `x * 0` is 0 for finite `x` and NaN
/// otherwise; summed in 8 lanes the compiler vectorises (one pass at memory speed, on the
/// communication thread, without libtorch's thread pool).
fn finite_f32(t: &Tensor) -> bool {
    let t = t.contiguous();
    let n = t.numel();
    if n == 0 {
        return true;
    }
    // SAFETY: a contiguous CPU Float tensor of n elements owns n f32 at data_ptr; read only
    // while `t` lives, and nothing writes it meanwhile (the bucket is this thread's).
    let data = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, n) };
    let mut lanes = [0f32; 8];
    let chunks = data.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x * 0.0;
        }
    }
    let tail: f32 = rest.iter().map(|x| x * 0.0).sum();
    (lanes.iter().sum::<f32>() + tail).is_finite()
}

/// Whether every element of every tensor is finite (one host sync for all of them): one
/// `aminmax` pass per tensor (NaN propagates to both, an infinity shows in one), then the sum of
/// those extremes in float64 (finite float32 extremes cannot overflow it). 7x cheaper than
/// `isfinite().all()`, which writes and re-reads a bool tensor of every gradient's size
/// (BENCHMARKS.md, training step).
pub(crate) fn all_finite<'a>(tensors: impl Iterator<Item = &'a Tensor>) -> Result<bool> {
    let extremes: Vec<Tensor> = tensors
        .filter(|t| t.numel() > 0)
        .flat_map(|t| {
            let (min, max) = t.aminmax(None::<i64>, false);
            [min.to_kind(Kind::Double), max.to_kind(Kind::Double)]
        })
        .collect();
    if extremes.is_empty() {
        return Ok(true);
    }
    Ok(f64::try_from(Tensor::stack(&extremes, 0).sum(Kind::Double))?.is_finite())
}

/// Groups `params` taken in `order` (indices) into buckets of one dtype, PyTorch DDP's rule: a
/// bucket is closed once it holds at least its limit (`first_bytes` for the first, `bytes` for
/// the others), so it passes the limit by at most its last tensor, and small tensors never make
/// a bucket of their own between large ones. Returns index lists in start order.
pub fn bucket_layout(
    params: &[Tensor],
    order: &[usize],
    first_bytes: usize,
    bytes: usize,
) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let (mut filled, mut kind, mut open) = (0usize, None, false);
    for &i in order {
        let t = &params[i];
        if !open || kind != Some(t.kind()) {
            out.push(Vec::new());
            (filled, kind, open) = (0, Some(t.kind()), true);
        }
        out.last_mut().expect("pushed above").push(i);
        filled += t.numel() * t.kind().elt_size_in_bytes();
        let limit = if out.len() == 1 { first_bytes } else { bytes };
        if filled >= limit {
            open = false;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::ring::tests::with_ring;
    use crate::collective::SingleProcess;

    /// A 3-layer perceptron's parameters `[w1, b1, w2, b2, w3, b3]` (creation order) with fixed
    /// values, and rank `r`'s batch.
    fn mlp() -> Vec<Tensor> {
        let shapes: [&[i64]; 6] = [&[32, 16], &[32], &[64, 32], &[64], &[8, 64], &[8]];
        shapes
            .iter()
            .enumerate()
            .map(|(i, shape)| {
                let n: i64 = shape.iter().product();
                (Tensor::arange(n, (Kind::Float, Device::Cpu)) * (0.37 + i as f64))
                    .sin()
                    .g_mul_scalar(0.2)
                    .view(*shape)
                    .set_requires_grad(true)
            })
            .collect()
    }

    fn loss_of(params: &[Tensor], rank: usize) -> Tensor {
        let x = (Tensor::arange(4 * 16, (Kind::Float, Device::Cpu)) * (1.3 + rank as f64))
            .cos()
            .view([4, 16]);
        let h = x.linear(&params[0], Some(&params[1])).relu();
        let h = h.linear(&params[2], Some(&params[3])).tanh();
        let y = h.linear(&params[4], Some(&params[5]));
        (y - 0.5).square().mean(Kind::Float)
    }

    /// Buckets of ~2 KB: several, the first smaller.
    const PLAN: Plan = Plan {
        first_bucket_bytes: 600,
        bucket_bytes: 2200,
        overlap: true,
    };

    /// Three SGD steps on `params` through `reducer`; returns the first step's averaged
    /// gradients, the parameters after and every step's votes. With `wait_in_backward`, each
    /// backward pass returns only once a bucket has been started (so: reduced, on the ring)
    /// while it was still running.
    fn train(
        collective: &dyn Collective,
        reducer: &Reducer,
        params: &[Tensor],
        wait_in_backward: bool,
    ) -> (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Votes>) {
        let mut first_grads = Vec::new();
        let mut votes = Vec::new();
        for step in 0..3 {
            for p in params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let loss = loss_of(params, collective.rank());
            let input = StepInput {
                loss: &loss,
                want_stop: &|| false,
                broadcast: &mut [],
                inf_grad: false,
            };
            let (v, _) = reducer
                .backward(collective, input, || {
                    loss.f_backward()?;
                    let started = Instant::now();
                    while wait_in_backward && reducer.buckets_started() == 0 {
                        assert!(started.elapsed() < Duration::from_secs(20), "no overlap");
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Ok(())
                })
                .unwrap();
            assert_eq!(reducer.buckets_started(), reducer.buckets.len());
            if step == 0 {
                first_grads = params
                    .iter()
                    .map(|p| Vec::<f32>::try_from(p.grad().reshape([-1])).unwrap())
                    .collect();
            }
            tch::no_grad(|| {
                for p in params {
                    let _ = p.shallow_clone().g_sub_(&(p.grad() * 0.1));
                }
            });
            votes.push(v);
        }
        let after = params
            .iter()
            .map(|p| Vec::<f32>::try_from(p.reshape([-1])).unwrap())
            .collect();
        (first_grads, after, votes)
    }

    #[test]
    fn buckets_follow_creation_order_reversed_with_a_small_first_one() {
        let params = mlp(); // bytes: 2048, 128, 8192, 256, 2048, 32
        let order: Vec<usize> = (0..6).rev().collect();
        assert_eq!(
            bucket_layout(&params, &order, 600, 2200),
            vec![vec![5, 4], vec![3, 2], vec![1, 0]],
            "a bucket closes once it holds its limit: 2080 B >= 600, 8448 B >= 2200, then the rest"
        );
        assert_eq!(
            bucket_layout(&params, &order, 4096, 1 << 20),
            vec![vec![5, 4, 3, 2], vec![1, 0]],
            "w2 takes the first past 4096 B and closes it"
        );
        // Small tensors between large ones join a bucket, never make one of their own.
        let f = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        let mixed = vec![f(1000), f(2), f(1000), f(2), f(1000)];
        assert_eq!(
            bucket_layout(&mixed, &[0, 1, 2, 3, 4], 100, 100),
            vec![vec![0], vec![1, 2], vec![3, 4]]
        );
        let mixed = vec![
            Tensor::zeros([4], (Kind::Float, Device::Cpu)),
            Tensor::zeros([4], (Kind::BFloat16, Device::Cpu)),
            Tensor::zeros([4], (Kind::Float, Device::Cpu)),
        ];
        assert_eq!(
            bucket_layout(&mixed, &[0, 1, 2], 1 << 20, 1 << 20),
            vec![vec![0], vec![1], vec![2]],
            "one dtype per bucket"
        );
    }

    #[test]
    fn overlapped_and_sequential_reduction_are_bit_identical_and_exact_means() {
        let out = with_ring(2, |ring| {
            let order: Vec<usize> = (0..6).collect();
            let overlapped = mlp();
            let on = Reducer::new(&ring, PLAN, &overlapped, &order).unwrap();
            assert!(
                on.hooks.is_some() && on.buckets.len() >= 3,
                "several buckets"
            );
            let a = train(&ring, &on, &overlapped, true);
            let sequential = mlp();
            let plan = Plan {
                overlap: false,
                ..PLAN
            };
            let off = Reducer::new(&ring, plan, &sequential, &order).unwrap();
            let b = train(&ring, &off, &sequential, false);
            assert_eq!(off.buckets_started_in_backward(), 0);
            (a, b)
        });
        // Each rank's own first gradients, without communication.
        let local: Vec<Vec<Vec<f32>>> = (0..2)
            .map(|rank| {
                let params = mlp();
                let loss = loss_of(&params, rank);
                loss.backward();
                params
                    .iter()
                    .map(|p| Vec::<f32>::try_from(p.grad().reshape([-1])).unwrap())
                    .collect()
            })
            .collect();
        for ((grads_on, after_on, votes_on), (grads_off, after_off, votes_off)) in &out {
            assert_eq!(
                after_on, after_off,
                "overlap on and off: bit-identical parameters"
            );
            assert_eq!(grads_on, grads_off);
            assert_eq!(votes_on, votes_off);
            for (p, g) in grads_on.iter().enumerate() {
                for (i, &x) in g.iter().enumerate() {
                    assert_eq!(x, (local[0][p][i] + local[1][p][i]) * 0.5, "param {p}[{i}]");
                }
            }
            for v in votes_on {
                assert!(v.unhealthy.is_empty() && !v.stop);
            }
            // The vote's mean loss is the mean of the ranks' losses.
            let l0 = f64::try_from(loss_of(&mlp(), 0)).unwrap();
            let l1 = f64::try_from(loss_of(&mlp(), 1)).unwrap();
            assert!((votes_on[0].mean_loss - (l0 + l1) / 2.0).abs() < 1e-6);
        }
        assert_eq!(out[0].0 .1, out[1].0 .1, "ranks agree");
    }

    #[test]
    fn the_vote_names_the_rank_with_a_non_finite_value_and_carries_stop() {
        let out = with_ring(3, |ring| {
            let params = mlp();
            let order: Vec<usize> = (0..6).collect();
            let reducer = Reducer::new(&ring, PLAN, &params, &order).unwrap();
            let mut votes = Vec::new();
            for case in 0..3 {
                for p in &params {
                    let mut g = p.grad();
                    let _ = g.zero_();
                }
                let r = ring.rank();
                let loss = loss_of(&params, r);
                // Case 0: rank 1's loss is NaN; case 1: rank 2 gets an infinite gradient;
                // case 2: rank 0 is asked to stop.
                let loss = if case == 0 && r == 1 {
                    loss * f64::NAN
                } else {
                    loss
                };
                let stop = case == 2 && r == 0;
                let input = StepInput {
                    loss: &loss,
                    want_stop: &move || stop,
                    broadcast: &mut [],
                    inf_grad: case == 1 && r == 2,
                };
                let (v, _) = reducer
                    .backward(&ring, input, || Ok(loss.f_backward()?))
                    .unwrap();
                votes.push(v);
            }
            votes
        });
        for votes in &out {
            assert_eq!(votes[0].unhealthy, vec![(1, Health::NonFiniteLoss)]);
            assert!(votes[0].mean_loss.is_finite(), "the finite ranks' mean");
            assert_eq!(votes[1].unhealthy, vec![(2, Health::NonFiniteGradients)]);
            assert_eq!(
                votes[1].describe_unhealthy(),
                "non-finite gradients (finite loss) on rank(s) 2"
            );
            assert!(!votes[1].stop && votes[2].stop && votes[2].unhealthy.is_empty());
        }
    }

    #[test]
    fn a_rank_that_dies_during_the_overlap_fails_the_step_on_the_others() {
        let started = Instant::now();
        let out = with_ring(2, |ring| {
            let params = mlp();
            let reducer = Reducer::new(&ring, PLAN, &params, &[0, 1, 2, 3, 4, 5]).unwrap();
            let loss = loss_of(&params, ring.rank());
            if ring.rank() == 1 {
                // Dies once its backward has started the first buckets: its sockets close.
                loss.backward();
                drop(reducer);
                drop(ring);
                return None;
            }
            let input = StepInput {
                loss: &loss,
                want_stop: &|| false,
                broadcast: &mut [],
                inf_grad: false,
            };
            let e = reducer
                .backward(&ring, input, || Ok(loss.f_backward()?))
                .unwrap_err();
            Some(format!("{e:#}"))
        });
        let e = out[0].clone().unwrap();
        assert!(
            e.contains("gradient bucket") && e.contains("all-reduce failed"),
            "{e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "not after a timeout"
        );
    }

    #[test]
    fn a_panic_in_backward_propagates_instead_of_hanging() {
        let started = Instant::now();
        let out = with_ring(2, |ring| {
            let params = mlp();
            let reducer = Reducer::new(&ring, PLAN, &params, &[0, 1, 2, 3, 4, 5]).unwrap();
            let loss = loss_of(&params, ring.rank());
            let input = StepInput {
                loss: &loss,
                want_stop: &|| false,
                broadcast: &mut [],
                inf_grad: false,
            };
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                reducer.backward(&ring, input, || {
                    loss.f_backward()?;
                    panic!("a panic in backward");
                })
            }))
            .is_err()
        });
        assert_eq!(out, vec![true, true]);
        assert!(started.elapsed() < Duration::from_secs(15));
    }

    #[test]
    fn gradient_views_keep_dense_layouts_only() {
        assert!(dense(&[8, 3, 3, 3], &[27, 9, 3, 1]), "contiguous");
        assert!(dense(&[8, 3, 3, 3], &[27, 1, 9, 3]), "channels-last");
        assert!(
            dense(&[4, 1, 5], &[5, 7, 1]),
            "size-1 dimensions' strides do not matter"
        );
        assert!(!dense(&[4, 5], &[10, 1]), "gaps");
        assert!(!dense(&[4, 5], &[1, 1]), "overlap");
    }

    #[test]
    fn one_rank_keeps_libtorchs_gradients_and_votes_alone() {
        let params = mlp();
        let reducer = Reducer::new(&SingleProcess, PLAN, &params, &[0, 1, 2, 3, 4, 5]).unwrap();
        assert!(reducer.bucket_bytes().is_empty());
        let loss = loss_of(&params, 0);
        let input = StepInput {
            loss: &loss,
            want_stop: &|| true,
            broadcast: &mut [],
            inf_grad: true,
        };
        let (v, exposed) = reducer
            .backward(&SingleProcess, input, || Ok(loss.f_backward()?))
            .unwrap();
        assert_eq!(v.unhealthy, vec![(0, Health::NonFiniteGradients)]);
        assert!(v.stop && exposed == Duration::ZERO);
    }

    #[test]
    fn dropping_a_reducer_releases_hooks_and_gradient_views() {
        with_ring(2, |ring| {
            let params = mlp();
            let reducer = Reducer::new(&ring, PLAN, &params, &[0, 1, 2, 3, 4, 5]).unwrap();
            assert!(params.iter().all(|p| p.grad().defined()));
            drop(reducer);
            assert!(params.iter().all(|p| !p.grad().defined()));
            // Backward after the drop runs no hook (which would touch freed memory).
            loss_of(&params, 0).backward();
            assert!(params.iter().all(|p| p.grad().defined()));
        });
    }

    #[test]
    fn all_finite_sees_any_nan_or_infinity_and_nothing_else() {
        let t = |v: &[f32]| Tensor::from_slice(v);
        let big = f32::MAX;
        // Finite extremes of float32 in many tensors do not overflow the check.
        let finite: Vec<Tensor> = (0..64).map(|_| t(&[big, -big, 1.0])).collect();
        assert!(all_finite(finite.iter()).unwrap());
        assert!(all_finite([].iter()).unwrap());
        assert!(all_finite([t(&[]), t(&[0.0])].iter()).unwrap());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(
                !all_finite([t(&[1.0, 2.0]), t(&[0.5, bad, 3.0])].iter()).unwrap(),
                "{bad}"
            );
            // The host scan, at every position of the 8 lanes and the tail.
            for at in 0..19 {
                let mut v = vec![big; 19];
                v[at] = bad;
                assert!(!finite_f32(&t(&v)), "{bad} at {at}");
            }
        }
        assert!(finite_f32(&t(&[big; 19])) && finite_f32(&t(&[])));
        // +inf in one tensor and -inf in another do not cancel.
        assert!(!all_finite([t(&[f32::INFINITY]), t(&[f32::NEG_INFINITY])].iter()).unwrap());
    }
}
