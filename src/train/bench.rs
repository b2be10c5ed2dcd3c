//! `devise bench-step`: the training loop's own step (`train::step::train_step`, the per-step vote,
//! the optimizer) timed on one synthetic batch kept on the device, so GPU throughput is measured
//! without a data pipeline, as the PyTorch reference loop in `bench/gpu_torch.py` is
//! (`bench/gpu.sh`, BENCHMARKS.md). With a collective (`--collective nccl`, even in a one-rank world)
//! it also all-reduces a gradient-sized buffer and checks the result: the NCCL smoke test.
use super::batches::Input;
use super::step::{stage_parameters, train_step};
use crate::collective::reducer::{self, Reducer};
use crate::collective::{Collective, ReduceOp};
use crate::config::plan::StageKind;
use crate::model::gpu::Precision;
use crate::model::{self, DeviseModel, Encoder};
use crate::optim::{self, Algorithm, Optimizer};
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// What to time.
#[derive(Debug, Clone)]
pub struct BenchStep {
    /// Encoder architecture.
    pub encoder: Encoder,
    /// Input side, pixels.
    pub image_size: i64,
    /// Images per step.
    pub batch_size: i64,
    /// Which stage's step: softmax (SGD), devise (frozen encoder, Adagrad), finetune (SGD).
    pub stage: StageKind,
    /// fp32 or bf16 autocast.
    pub precision: Precision,
    /// NHWC layout.
    pub channels_last: bool,
    /// Softmax classes / seen labels.
    pub classes: i64,
    /// Timed steps, after `warmup` untimed ones.
    pub steps: u64,
    /// Untimed steps first (cuDNN autotuning, allocator warm-up).
    pub warmup: u64,
    /// Gradient buckets and overlap (with more than one rank).
    pub reduce: reducer::Plan,
}

/// What was measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    /// Training images per second over the timed steps.
    pub images_per_sec: f64,
    /// Mean wall milliseconds per timed step.
    pub step_ms: f64,
    /// The last step's loss (finite, or the run fails).
    pub last_loss: f64,
    /// Mean milliseconds per timed step spent waiting for communication after backward (the
    /// exposed part of the gradient all-reduce; 0 with one rank).
    pub exposed_comm_ms: f64,
    /// Mean milliseconds per timed step of the backward pass (with the overlap, while the
    /// buckets are being all-reduced).
    pub backward_ms: f64,
    /// Bytes of each gradient bucket, in start order (empty with one rank).
    pub buckets: Vec<usize>,
    /// Of those, how many the last step started before its backward pass returned.
    pub buckets_started_in_backward: usize,
    /// All-reduce smoke test, when a collective was given: (bytes, milliseconds per call,
    /// calls) with the result checked against the input: a sum of every trained parameter's
    /// size in one buffer, so with several ranks the time of the whole gradient all-reduce done
    /// after backward.
    pub all_reduce: Option<(usize, f64, usize)>,
}

/// `devise bench-step`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Encoder architecture.
    #[arg(long, value_enum, default_value_t = Encoder::Resnet50)]
    pub encoder: Encoder,
    /// Input side, pixels.
    #[arg(long, default_value_t = 224)]
    pub image_size: i64,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    pub batch_size: i64,
    /// Which stage's step.
    #[arg(long, value_enum, default_value_t = StageKind::Softmax)]
    pub stage: StageKind,
    /// Arithmetic of the encoder's forward pass.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// NHWC layout.
    #[arg(long)]
    pub channels_last: bool,
    /// Softmax classes / seen labels.
    #[arg(long, default_value_t = 1000)]
    pub classes: i64,
    /// Timed steps.
    #[arg(long, default_value_t = 30)]
    pub steps: u64,
    /// Untimed steps first.
    #[arg(long, default_value_t = 10)]
    pub warmup: u64,
    /// Intra-op threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Join the process group of the rank environment (RANK, WORLD_SIZE, MASTER_ADDR,
    /// MASTER_PORT; one rank is fine) with this backend and check an all-reduce. Without it each
    /// process steps alone (no communication), also under `devise-launch`.
    #[arg(long, value_enum, value_name = "BACKEND")]
    pub collective: Option<crate::collective::Backend>,
    /// `dist.overlap`: all-reduce gradient buckets during backward.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub overlap: bool,
    /// `dist.bucket_size_mb`.
    #[arg(long, default_value_t = 25.0)]
    pub bucket_size_mb: f64,
    /// `dist.first_bucket_size_mb`.
    #[arg(long, default_value_t = 1.0)]
    pub first_bucket_size_mb: f64,
    /// `dist.unix_sockets`: `false` sends same-host traffic over TCP too (through a shaped link).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub unix_sockets: bool,
    /// --device, --dry-run.
    #[command(flatten)]
    pub worker: crate::config::WorkerArgs,
}

/// `devise bench-step`: times the step and prints one JSON line (the flags and the
/// [`BenchResult`]). With `--collective` the process joins its process group through
/// [`crate::collective::init_with`] (even a one-rank world) and runs the all-reduce check.
pub fn run_command(args: &Args) -> Result<()> {
    use crate::collective::{self, Join, SingleProcess, WorkerEnv};
    let env = WorkerEnv::from_env().context("reading the rank environment")?;
    let dist = collective::Config {
        backend: args.collective.unwrap_or_default(),
        bucket_size_mb: args.bucket_size_mb,
        first_bucket_size_mb: args.first_bucket_size_mb,
        overlap: args.overlap,
        unix_sockets: args.unix_sockets,
        ..Default::default()
    };
    dist.validate()?;
    let device_kind = args.worker.device.unwrap_or_default();
    let device = crate::train::select_device(device_kind, env.local_rank, env.local_world_size)
        .with_context(|| format!("choosing the GPU of {env}"))?;
    let bench = BenchStep {
        encoder: args.encoder,
        image_size: args.image_size,
        batch_size: args.batch_size,
        stage: args.stage,
        precision: args.precision,
        channels_last: args.channels_last,
        classes: args.classes,
        steps: args.steps,
        warmup: args.warmup,
        reduce: dist.reduce_plan(),
    };
    if args.worker.dry_run {
        println!("world: {env}");
        println!("device: {device_kind} -> {device:?}");
        println!("{bench:?}");
        if let Some(backend) = args.collective {
            println!("collective: {}", backend.resolve(device));
        }
        return Ok(());
    }
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let group: Box<dyn Collective> = match args.collective {
        None => Box::new(SingleProcess),
        Some(_) => collective::init_with(&env, &dist, device, Join::Always)?,
    };
    let result = run(&bench, device, group.as_ref(), args.collective.is_some())?;
    println!(
        "{}",
        serde_json::json!({
            "encoder": args.encoder,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "stage": args.stage,
            "precision": args.precision,
            "channels_last": args.channels_last,
            "world_size": group.world_size(),
            "overlap": args.overlap,
            "bucket_size_mb": args.bucket_size_mb,
            "first_bucket_size_mb": args.first_bucket_size_mb,
            "device": format!("{device:?}"),
            "threads": tch::get_num_threads(),
            "result": result,
        })
    );
    Ok(())
}

fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Times `b` on `device`; `collective` is the step's collective (one rank), `smoke` adds the
/// all-reduce check. Errors: a non-finite loss or gradient, a wrong all-reduce result, anything
/// the model or collective reports.
pub fn run(
    b: &BenchStep,
    device: Device,
    collective: &dyn Collective,
    smoke: bool,
) -> Result<BenchResult> {
    tch::manual_seed(0);
    if device.is_cuda() {
        // As torchvision's reference loop (and `run.cudnn_benchmark = true`).
        tch::Cuda::cudnn_set_benchmark(true);
    }
    let cfg = model::Config {
        encoder: b.encoder,
        widths: vec![32, 64, 128, 256],
        projection_bias: false,
        norm: Default::default(),
        precision: b.precision,
        channels_last: b.channels_last,
    };
    let model = DeviseModel::new(&cfg, b.classes, 300, device)?;
    let labels_matrix = Tensor::randn([b.classes, 300], (Kind::Float, device));
    let norms = labels_matrix.norm_scalaropt_dim(2.0, [1], true);
    let seen_labels = labels_matrix / norms;
    let opt_cfg = optim::Config {
        algorithm: if b.stage == StageKind::Devise {
            Algorithm::Adagrad
        } else {
            Algorithm::Sgd
        },
        lr: if b.stage == StageKind::Devise {
            0.003
        } else {
            0.1
        },
        momentum: 0.9,
        weight_decay: if b.stage == StageKind::Devise {
            0.0
        } else {
            5e-4
        },
        eps: 1e-10,
        warmup_steps: 0,
        schedule: Default::default(),
        final_lr_fraction: 0.0,
    };
    let mut opt = Optimizer::new(&opt_cfg, model.parameters(stage_parameters(b.stage)));
    let params: Vec<Tensor> = opt
        .params()
        .iter()
        .map(|(_, p)| p.shallow_clone())
        .collect();
    let reducer = Reducer::new(
        collective,
        b.reduce,
        &params,
        &model.creation_order(&params),
    )?;
    // As the training loop: BatchNorm statistics from rank 0 in the stages that change them.
    let mut buffers: Vec<Tensor> = match b.stage {
        StageKind::Devise => Vec::new(),
        _ => model
            .state_dict()
            .into_iter()
            .filter(|(_, t)| !t.requires_grad())
            .map(|(_, t)| t)
            .collect(),
    };
    let s = b.image_size;
    let images = Tensor::randn([b.batch_size, 3, s, s], (Kind::Float, device));
    let labels = Tensor::randint(b.classes, [b.batch_size], (Kind::Int64, device));
    let loss_cfg = crate::loss::Config {
        margin: 0.1,
        stop_at_first_violation: false,
    };
    let mut started = Instant::now();
    let mut last_loss = f64::NAN;
    let (mut exposed, mut backward) = (Duration::ZERO, Duration::ZERO);
    for step in 1..=b.warmup + b.steps {
        if step == b.warmup + 1 {
            synchronize(device);
            collective.barrier()?;
            started = Instant::now();
            (exposed, backward) = (Duration::ZERO, Duration::ZERO);
        }
        let input = Input::Images(images.shallow_clone(), labels.shallow_clone());
        let (votes, comm) = train_step(
            &model,
            &mut opt,
            &reducer,
            collective,
            b.stage,
            input,
            &seen_labels,
            &loss_cfg,
            step,
            &|| false,
            &mut buffers,
        )?;
        if !votes.unhealthy.is_empty() {
            bail!("step {step}: non-finite loss or gradients");
        }
        opt.step(opt_cfg.lr);
        last_loss = votes.mean_loss;
        exposed += comm;
        backward += reducer.last_backward();
    }
    synchronize(device);
    let seconds = started.elapsed().as_secs_f64();
    let all_reduce = if smoke {
        Some(all_reduce_smoke(&opt, collective, device)?)
    } else {
        None
    };
    Ok(BenchResult {
        images_per_sec: (b.steps as i64 * b.batch_size) as f64 / seconds,
        step_ms: 1000.0 * seconds / b.steps as f64,
        last_loss,
        exposed_comm_ms: 1000.0 * exposed.as_secs_f64() / b.steps as f64,
        backward_ms: 1000.0 * backward.as_secs_f64() / b.steps as f64,
        buckets: reducer.bucket_bytes(),
        buckets_started_in_backward: reducer.buckets_started_in_backward(),
        all_reduce,
    })
}

/// All-reduces (sum) a buffer the size of the trained parameters 10 times; with one rank the
/// result must equal the input exactly.
fn all_reduce_smoke(
    opt: &Optimizer,
    collective: &dyn Collective,
    device: Device,
) -> Result<(usize, f64, usize)> {
    let numel: i64 = opt.params().iter().map(|(_, p)| p.numel() as i64).sum();
    let input = Tensor::randn([numel], (Kind::Float, device));
    let expected = input.shallow_clone() * collective.world_size() as f64;
    let calls = 10;
    let mut buffer = input.copy();
    collective.all_reduce(&mut buffer, ReduceOp::Sum)?; // warm-up
    synchronize(device);
    let started = Instant::now();
    for _ in 0..calls {
        buffer.copy_(&input);
        collective.all_reduce(&mut buffer, ReduceOp::Sum)?;
    }
    synchronize(device);
    let ms = 1000.0 * started.elapsed().as_secs_f64() / calls as f64;
    if !buffer.equal(&expected) {
        bail!(
            "all-reduce of {numel} floats over {} rank(s): wrong result",
            collective.world_size()
        );
    }
    Ok((numel as usize * 4, ms, calls))
}
