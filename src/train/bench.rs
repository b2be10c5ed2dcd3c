//! `devise bench-step`: the training loop's own step (`train::step::train_step`, the per-step vote,
//! the optimizer) timed on one synthetic batch kept on the device, so GPU throughput is measured
//! without a data pipeline, as the PyTorch reference loop in `bench/gpu_torch.py` is
//! (`bench/gpu.sh`, BENCHMARKS.md). With a collective (`--nccl` under a one-rank environment)
//! it also all-reduces a gradient-sized buffer and checks the result: the NCCL smoke test.
use super::batches::Input;
use super::step::{stage_parameters, train_step, StepVotes};
use crate::collective::{ddp, Collective, ReduceOp};
use crate::config::plan::StageKind;
use crate::model::gpu::Precision;
use crate::model::{self, DeviseModel, Encoder};
use crate::optim::{self, Algorithm, Optimizer};
use anyhow::{bail, Result};
use std::time::Instant;
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
    /// All-reduce smoke test, when a collective was given: (bytes, milliseconds per call,
    /// calls) with the result checked against the input.
    pub all_reduce: Option<(usize, f64, usize)>,
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
    let reducer = ddp::GradientBuckets {
        bucket_bytes: 25 << 20,
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
    for step in 1..=b.warmup + b.steps {
        if step == b.warmup + 1 {
            synchronize(device);
            started = Instant::now();
        }
        let input = Input::Images(images.shallow_clone(), labels.shallow_clone());
        let (loss, health, _) = train_step(
            &model,
            &mut opt,
            collective,
            &reducer,
            b.stage,
            input,
            &seen_labels,
            &loss_cfg,
            step,
        )?;
        let votes = StepVotes::all_reduce(collective, loss, health, false, device)?;
        if !votes.unhealthy.is_empty() {
            bail!("step {step}: non-finite loss or gradients");
        }
        opt.step(opt_cfg.lr);
        last_loss = votes.mean_loss;
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
