//! `devise` command line: parse, install signal handlers that set a stop flag, call the library,
//! map the result to an exit code.
//!
//! Exit codes: 0 done; 1 error; 2 usage error; 75 preempted (SIGTERM, SIGINT or the
//! preemption signal `run.preempt_signal`, SIGUSR1 by default: the current step finished and a
//! checkpoint was written — requeue the job and it resumes); 130 a second stop signal more
//! than 5 s after the first (no checkpoint).
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use devise::collective::WorkerEnv;
use devise::config::plan::Plan;
use devise::config::RunConfig;
use devise::train::{Outcome, Resume, RunOptions};
use devise_launch::signal::{signal_name, PreemptSignal, REPEAT_WINDOW};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Exit code meaning "preempted, checkpoint saved, requeue me".
const EXIT_PREEMPTED: u8 = 75;

#[derive(Parser)]
#[command(
    name = "devise",
    version,
    about = "DeViSE trainer: CNN + projection into word-vector space, zero-shot evaluation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train all stages of a run configuration, evaluate, write the report.
    Train {
        /// TOML run configuration (configs/*.toml).
        #[arg(long)]
        config: String,
        /// Override a key: --set section.key=value (after DEVISE__SECTION__KEY variables).
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
        set: Vec<String>,
        /// auto (latest complete checkpoint, else start), never, or a checkpoint step URL.
        #[arg(long, default_value = "auto")]
        resume: Resume,
        /// Print the resolved plan and exit.
        #[arg(long)]
        dry_run: bool,
        /// Stop as if preempted after this step (checkpoint, exit 75).
        #[arg(long)]
        stop_after_step: Option<u64>,
        /// Word-vector file format: auto, word2vec-binary, word2vec-text, glove, fasttext
        /// (same as --set text.vectors_format=...).
        #[arg(long, value_parser = ["auto", "word2vec-binary", "word2vec-text", "glove", "fasttext"])]
        vectors_format: Option<String>,
    },
    /// The embedded default: generate a shapes dataset, train, evaluate zero-shot, report.
    Demo {
        /// Output directory (data and run).
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// Override a key of configs/demo.toml.
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
        set: Vec<String>,
    },
    /// Evaluate a checkpoint (hit@k, and hp@k with eval.hierarchy) on its run's label split or
    /// on any label list; writes <run dir>/eval/<step>[-<labels>]/report.{json,md}.
    Eval {
        /// Checkpoint step directory (.../checkpoints/step-NNNNNNNNN).
        #[arg(long)]
        checkpoint: String,
        /// Candidate labels: a file with one wnid per line, `seen` or `unseen`; default: the
        /// rows of a stage-end evaluation for the checkpoint's stage.
        #[arg(long)]
        labels: Option<String>,
        /// Rank the training labels too (the paper's DeViSE+1K mode).
        #[arg(long, requires = "labels")]
        plus_seen: bool,
        /// A configuration overlay (some sections' keys, e.g. configs/zero-shot-21k-eval.toml)
        /// layered over the checkpoint's configuration, before --set.
        #[arg(long, value_name = "FILE")]
        config: Option<String>,
        /// Override a key of the checkpoint's configuration (e.g. eval.hierarchy=FILE).
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
        set: Vec<String>,
        /// Fail instead of warning when the word-vector file gives the training labels other
        /// vectors than the checkpoint was trained with (or it carries none to compare with).
        #[arg(long)]
        strict: bool,
    },
    /// Zero-shot labelling: rank any label list for images (local paths or object-store URLs)
    /// with a checkpoint's model; print the top-k labels with cosine scores. Images whose file
    /// name holds a candidate wnid (ImageNet naming) are scored: hit@1 and hit@5.
    Predict {
        /// Checkpoint step directory (.../checkpoints/step-NNNNNNNNN). Its config's relative
        /// paths (word vectors, names) are read from the working directory.
        #[arg(long)]
        checkpoint: String,
        /// Label list: a file with one wnid per line (e.g. ImageNet's 1K, 2-hop, 3-hop or 21K
        /// list), or `seen` for the checkpoint's training labels.
        #[arg(long)]
        labels: String,
        /// Rank the checkpoint's training labels too (the paper's DeViSE+1K mode).
        #[arg(long)]
        plus_seen: bool,
        /// Labels printed per image.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// `cpu`, `cuda` or `auto`.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Fail instead of warning when the word-vector file gives the training labels other
        /// vectors than the checkpoint was trained with (or it carries none to compare with).
        #[arg(long)]
        strict: bool,
        /// Image files or URLs.
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<String>,
    },
    /// Dataset tools.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Benchmark: time the training loop's step on one synthetic batch kept on the device (no
    /// data pipeline); prints one JSON line (bench/gpu.sh, bench/train_step.sh).
    BenchStep {
        /// convnet, resnet18, resnet34 or resnet50.
        #[arg(long, default_value = "resnet50")]
        encoder: String,
        /// Input side, pixels.
        #[arg(long, default_value_t = 224)]
        image_size: i64,
        /// Images per step.
        #[arg(long, default_value_t = 128)]
        batch_size: i64,
        /// softmax, devise or finetune.
        #[arg(long, default_value = "softmax")]
        stage: String,
        /// fp32 or bf16.
        #[arg(long, default_value = "fp32")]
        precision: String,
        /// NHWC layout.
        #[arg(long)]
        channels_last: bool,
        /// Softmax classes / seen labels.
        #[arg(long, default_value_t = 1000)]
        classes: i64,
        /// Timed steps.
        #[arg(long, default_value_t = 30)]
        steps: u64,
        /// Untimed steps first.
        #[arg(long, default_value_t = 10)]
        warmup: u64,
        /// `cpu`, `cuda` or `auto`.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Intra-op threads (0: libtorch's default).
        #[arg(long, default_value_t = 0)]
        threads: i32,
        /// Join a collective from the rank environment (RANK, WORLD_SIZE, MASTER_ADDR,
        /// MASTER_PORT; one rank is fine) with this backend (cpu or nccl) and check an all-reduce.
        #[arg(long)]
        collective: Option<String>,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Images -> WebDataset tar shards + manifest.json (written last). Sources: an ImageFolder
    /// tree (--src: <split>/<wnid>/*.JPEG) and/or the ILSVRC-2012 validation folder with Kaggle's
    /// LOC_val_solution.csv (split val).
    BuildShards {
        /// ImageFolder root holding <split>/<wnid>/ folders.
        #[arg(long, required_unless_present = "ilsvrc_val_dir")]
        src: Option<PathBuf>,
        /// Destination URL (path, file://, s3://, gs://, az://, http(s)://).
        #[arg(long)]
        dst: String,
        /// Splits of --src to convert (comma-separated). Default train,val; train when
        /// --ilsvrc-val-dir provides val.
        #[arg(long, value_delimiter = ',', requires = "src")]
        splits: Option<Vec<String>>,
        /// Flat folder of ILSVRC-2012 validation images (ILSVRC2012_val_00000001.JPEG, ...):
        /// becomes the split val.
        #[arg(long, requires = "ilsvrc_val_solution")]
        ilsvrc_val_dir: Option<PathBuf>,
        /// Kaggle's LOC_val_solution.csv (ImageId,PredictionString; the label is the first
        /// token) for --ilsvrc-val-dir.
        #[arg(long, requires = "ilsvrc_val_dir")]
        ilsvrc_val_solution: Option<PathBuf>,
        /// Only these classes: a file whose first column is the wnid (e.g. a split .tsv). An
        /// ILSVRC validation row naming a wnid not in the file is an error.
        #[arg(long)]
        classes: Option<PathBuf>,
        /// Only the first N classes of --classes.
        #[arg(long, requires = "classes")]
        limit_classes: Option<usize>,
        /// Target shard size in bytes.
        #[arg(long, default_value_t = 64 << 20)]
        shard_size_bytes: u64,
        /// Seed of the sample shuffle before sharding.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Threads building shards (default: one per core). The output is the same for any.
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Check every shard against the manifest (bytes, sha256, samples, .cls, class counts, every
    /// image decodes); print a summary and the problems; exit 1 if there is any.
    Verify {
        /// Shard directory URL (holding manifest.json).
        url: String,
        /// Only this split.
        #[arg(long)]
        split: Option<String>,
        /// Decompression-bomb guard for decoding, pixels.
        #[arg(long, default_value_t = devise::data::DEFAULT_MAX_PIXELS)]
        max_pixels: u64,
        /// Threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Write manifest.json for WebDataset shards made by other tools (<split>-*.tar with
    /// .jpg/.cls, e.g. Python webdataset's TarWriter), so `train` and `verify` can use them.
    Index {
        /// Shard directory URL.
        url: String,
        /// Class file whose first column lists the wnids that .cls values index, sorted (e.g.
        /// imagenet-meta/ilsvrc2012_wnids_names.tsv, the standard ILSVRC-2012 order).
        #[arg(long)]
        classes: PathBuf,
        /// A split and its shards as a brace pattern, e.g. train=train-{000000..000146}.tar
        /// (repeatable). Default: every <split>-*.tar object of URL.
        #[arg(long = "shards", value_name = "SPLIT=PATTERN", value_parser = devise::data::index::parse_split_pattern)]
        shards: Vec<(String, String)>,
        /// Replace an existing manifest.json.
        #[arg(long)]
        overwrite: bool,
        /// Threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
}

/// One line per split of a freshly written manifest: samples and shards.
fn print_splits(manifest: &devise::data::shards::Manifest) {
    for (name, split) in &manifest.splits {
        println!(
            "{name}: {} samples in {} shards",
            split.samples,
            split.shards.len()
        );
    }
}

/// `--set` values must look like `section.key=value` ([`devise::config::split_override`]).
fn parse_set(s: &str) -> Result<String, String> {
    match devise::config::split_override(s) {
        Ok(_) => Ok(s.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Training commands turn SIGTERM and SIGINT (from the start) and the preemption signal (once
/// the configuration names it: [`catch_preempt_signal`]) into the stop flag (finish the step,
/// checkpoint, exit 75). A repeat within [`REPEAT_WINDOW`] of the first counts as the same
/// event: under SLURM one preemption can reach a worker twice (slurmstepd signals every process
/// of the step, and `devise-launch` forwards the signal it got too). A signal after that window
/// exits at once with 130. Other commands keep the default handlers: they are killed, and
/// write nothing that looks complete (build-shards writes its manifest last).
fn install_stop_handlers(stop: &Arc<AtomicBool>) -> std::io::Result<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    let handle = signals.handle();
    let stop = stop.clone();
    std::thread::Builder::new()
        .name("devise-signals".into())
        .spawn(move || {
            let mut first: Option<std::time::Instant> = None;
            for sig in signals.forever() {
                let name = signal_name(sig);
                match first {
                    None => {
                        first = Some(std::time::Instant::now());
                        stop.store(true, std::sync::atomic::Ordering::SeqCst);
                        eprintln!("{name}: finishing the current step, then checkpoint and exit 75 (a stop signal again after {} s exits at once)", REPEAT_WINDOW.as_secs());
                    }
                    Some(t) if t.elapsed() < REPEAT_WINDOW => {}
                    Some(_) => {
                        eprintln!("{name} again: exiting at once (130), no checkpoint");
                        std::process::exit(130);
                    }
                }
            }
        })?;
    Ok(handle)
}

/// Adds the preemption signal (`run.preempt_signal`) to the stop handlers; `term` adds none
/// (SIGTERM is always one), leaving SIGUSR1 and SIGUSR2 their default action. Warns when
/// `NCCL_PROXY_DUMP_SIGNAL` names a stop signal (NCCL would take it over).
fn catch_preempt_signal(
    handle: &signal_hook::iterator::Handle,
    preempt: PreemptSignal,
) -> Result<()> {
    if preempt != PreemptSignal::Term {
        handle
            .add_signal(preempt.number())
            .with_context(|| format!("cannot install a handler for {}", preempt.name()))?;
    }
    if let Some(warning) =
        devise_launch::signal::nccl_dump_signal_clash(preempt, |k| std::env::var(k).ok())
    {
        tracing::warn!("{warning}");
    }
    Ok(())
}

fn main() -> ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let stop = Arc::new(AtomicBool::new(false));
    let mut signals = None;
    if matches!(cli.command, Command::Train { .. } | Command::Demo { .. }) {
        match install_stop_handlers(&stop) {
            Ok(handle) => signals = Some(handle),
            Err(e) => {
                eprintln!("error: cannot install signal handlers: {e}");
                return ExitCode::from(1);
            }
        }
    }
    match run(cli, stop, signals.as_ref()) {
        Ok(Some(Outcome::Preempted { checkpoint })) => {
            if checkpoint.is_empty() {
                eprintln!("preempted: rank 0 wrote the checkpoint; requeue to resume");
            } else {
                eprintln!("preempted: checkpoint {checkpoint} written; requeue to resume");
            }
            ExitCode::from(EXIT_PREEMPTED)
        }
        Ok(Some(Outcome::Completed { report })) => {
            if !report.is_empty() {
                println!("report: {report}"); // rank 0 only: the others write none
            }
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Runs a command; `signals`: the stop handlers of training commands, which learn the
/// preemption signal from the configuration.
fn run(
    cli: Cli,
    stop: Arc<AtomicBool>,
    signals: Option<&signal_hook::iterator::Handle>,
) -> Result<Option<Outcome>> {
    match cli.command {
        Command::Train {
            config,
            mut set,
            resume,
            dry_run,
            stop_after_step,
            vectors_format,
        } => {
            if let Some(format) = vectors_format {
                set.push(format!("text.vectors_format={format:?}"));
            }
            let cfg = RunConfig::load_file(&config, &set)?;
            if let Some(handle) = signals {
                catch_preempt_signal(handle, cfg.run.preempt_signal)?;
            }
            // The one place the rank environment is read (see devise_launch::world).
            let env = WorkerEnv::from_env().context("reading the rank environment")?;
            let plan = Plan::build(&cfg, env.rank, env.world_size)?;
            if dry_run {
                println!("world: {env}");
                println!("{}", plan.summary());
                return Ok(None);
            }
            // Before any work: a worker without a GPU of its own stops here.
            let device = devise::config::device::select_device(
                cfg.run.device,
                env.local_rank,
                env.local_world_size,
            )
            .with_context(|| format!("choosing the GPU of {env}"))?;
            tracing::info!(
                "world: {env}; device {device:?}; preemption signal {}",
                cfg.run.preempt_signal.name()
            );
            let collective = devise::collective::init(&env, &cfg.dist, device)?;
            let opts = RunOptions {
                resume,
                stop,
                stop_after_step,
                local_rank: env.local_rank,
                local_world_size: env.local_world_size,
            };
            Ok(Some(devise::train::train(
                &plan,
                &opts,
                collective.as_ref(),
            )?))
        }
        Command::Demo { out, set } => {
            // The demo's configuration is assembled inside; its preemption signal comes from
            // DEVISE__RUN__PREEMPT_SIGNAL, else the default.
            if let Some(handle) = signals {
                let preempt = PreemptSignal::from_vars(|k| std::env::var(k).ok())?;
                catch_preempt_signal(handle, preempt.unwrap_or_default())?;
            }
            Ok(Some(devise::demo::run(&out, &set, stop)?))
        }
        Command::Eval {
            checkpoint,
            labels,
            plus_seen,
            config,
            set,
            strict,
        } => {
            let set = match &config {
                Some(path) => {
                    let mut layered = devise::config::overlay_overrides(path)?;
                    layered.extend(set);
                    layered
                }
                None => set,
            };
            let env = WorkerEnv::from_env().context("reading the rank environment")?;
            let cfg =
                devise::eval::predict::checkpoint_config(&checkpoint, &set).with_context(|| {
                    match &config {
                        Some(path) => {
                            format!("layering {path} over the configuration of {checkpoint}")
                        }
                        None => format!("the configuration of {checkpoint}"),
                    }
                })?;
            let device = devise::config::device::select_device(
                cfg.run.device,
                env.local_rank,
                env.local_world_size,
            )
            .with_context(|| format!("choosing the GPU of {env}"))?;
            let collective = devise::collective::init(&env, &cfg.dist, device)?;
            let report = devise::eval::checkpoint::run(
                &devise::eval::checkpoint::Request {
                    checkpoint,
                    overrides: set,
                    labels,
                    plus_seen,
                    strict,
                },
                collective.as_ref(),
                env.local_rank,
                env.local_world_size,
            )?;
            if !report.is_empty() {
                println!("report: {report}");
            }
            Ok(None)
        }
        Command::BenchStep {
            encoder,
            image_size,
            batch_size,
            stage,
            precision,
            channels_last,
            classes,
            steps,
            warmup,
            device,
            threads,
            collective,
        } => {
            use devise::config::plan::StageKind;
            use devise::model::Encoder;
            let encoder = match encoder.as_str() {
                "convnet" => Encoder::Convnet,
                "resnet18" => Encoder::Resnet18,
                "resnet34" => Encoder::Resnet34,
                "resnet50" => Encoder::Resnet50,
                other => anyhow::bail!(
                    "--encoder {other}: expected convnet, resnet18, resnet34 or resnet50"
                ),
            };
            let stage = match stage.as_str() {
                "softmax" => StageKind::Softmax,
                "devise" => StageKind::Devise,
                "finetune" => StageKind::Finetune,
                other => anyhow::bail!("--stage {other}: expected softmax, devise or finetune"),
            };
            let precision = match precision.as_str() {
                "fp32" => devise::model::gpu::Precision::Fp32,
                "bf16" => devise::model::gpu::Precision::Bf16,
                other => anyhow::bail!("--precision {other}: expected fp32 or bf16"),
            };
            let device = match device.as_str() {
                "cpu" => tch::Device::Cpu,
                "cuda" => tch::Device::Cuda(0),
                "auto" => tch::Device::cuda_if_available(),
                other => anyhow::bail!("--device {other}: expected cpu, cuda or auto"),
            };
            if threads > 0 {
                tch::set_num_threads(threads);
            }
            let bench = devise::train::bench::BenchStep {
                encoder,
                image_size,
                batch_size,
                stage,
                precision,
                channels_last,
                classes,
                steps,
                warmup,
            };
            let (collective, smoke): (Box<dyn devise::collective::Collective>, bool) =
                match collective {
                    None => (Box::new(devise::collective::SingleProcess), false),
                    Some(backend) => {
                        let env = WorkerEnv::from_env().context("reading the rank environment")?;
                        let store = devise::collective::store::Rendezvous::join(
                            &env,
                            std::time::Duration::from_secs(120),
                        )?;
                        let c: Box<dyn devise::collective::Collective> = match backend.as_str() {
                            "nccl" => Box::new(devise::collective::nccl::Nccl::connect(
                                store,
                                env.local_rank,
                            )?),
                            "cpu" => Box::new(devise::collective::ring::Ring::connect(
                                store,
                                std::time::Duration::from_secs(120),
                                true,
                            )?),
                            other => anyhow::bail!("--collective {other}: expected cpu or nccl"),
                        };
                        (c, true)
                    }
                };
            let result = devise::train::bench::run(&bench, device, collective.as_ref(), smoke)?;
            println!(
                "{}",
                serde_json::json!({
                    "encoder": format!("{encoder:?}").to_lowercase(),
                    "image_size": image_size,
                    "batch_size": batch_size,
                    "stage": stage.name(),
                    "precision": format!("{precision:?}").to_lowercase(),
                    "channels_last": channels_last,
                    "device": format!("{device:?}"),
                    "threads": tch::get_num_threads(),
                    "result": result,
                })
            );
            Ok(None)
        }
        Command::Predict {
            checkpoint,
            labels,
            plus_seen,
            top_k,
            json,
            device,
            strict,
            images,
        } => {
            run_predict(
                &checkpoint,
                &labels,
                plus_seen,
                top_k,
                json,
                &device,
                strict,
                &images,
            )?;
            Ok(None)
        }
        Command::Data { command } => {
            run_data(command)?;
            Ok(None)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_predict(
    checkpoint: &str,
    labels: &str,
    plus_seen: bool,
    top_k: usize,
    json: bool,
    device: &str,
    strict: bool,
    images: &[String],
) -> Result<()> {
    use devise::eval::predict;
    let device = match device {
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        "auto" => tch::Device::cuda_if_available(),
        other => anyhow::bail!("--device {other}: expected cpu, cuda or auto"),
    };
    let loaded = predict::load_model(checkpoint, device, &[])?;
    let mut wnids = if labels == "seen" {
        loaded.seen.clone()
    } else {
        predict::read_label_list(labels)?
    };
    if plus_seen {
        for w in &loaded.seen {
            if !wnids.contains(w) {
                wnids.push(w.clone());
            }
        }
    }
    let cands = predict::candidates(&loaded, &wnids, strict, device)?;
    if !cands.unmapped.is_empty() {
        eprintln!(
            "{} of {} labels have no word vector for any of their names and are left out: {}",
            cands.unmapped.len(),
            wnids.len(),
            cands.unmapped.join(" ")
        );
    }
    let preds = predict::predict(&loaded, &cands, images, top_k, device)?;
    let (n, hit1, hit5) = predict::hits(&preds);
    if json {
        let doc = serde_json::json!({
            "checkpoint": loaded.url,
            "labels": labels,
            "plus_seen": plus_seen,
            "candidates": cands.wnids.len(),
            "unmapped": cands.unmapped,
            "predictions": preds,
            "scored_images": n,
            "hit_at_1": (n > 0).then_some(hit1),
            "hit_at_5": (n > 0).then_some(hit5),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    for p in &preds {
        let truth = match (&p.label_from_name, p.true_rank) {
            (Some(w), Some(r)) => format!("  (file name: {w}, ranked {r})"),
            (Some(w), None) => format!("  (file name: {w}, not a candidate)"),
            _ => String::new(),
        };
        println!("{}{truth}", p.image);
        for (i, (wnid, name, score)) in p.top.iter().enumerate() {
            println!("  {:>2}. {wnid}  {score:.3}  {name}", i + 1);
        }
    }
    println!(
        "{} candidate labels ({} left out without a word vector), {} images",
        cands.wnids.len(),
        cands.unmapped.len(),
        preds.len()
    );
    if n > 0 {
        println!(
            "hit@1 {:.1}%  hit@5 {:.1}%  over the {n} images whose file name names a candidate",
            100.0 * hit1,
            100.0 * hit5
        );
    }
    Ok(())
}

fn run_data(command: DataCommand) -> Result<()> {
    use devise::data::{ilsvrc, index, shards, verify};
    match command {
        DataCommand::BuildShards {
            src,
            dst,
            splits,
            ilsvrc_val_dir,
            ilsvrc_val_solution,
            classes,
            limit_classes,
            shard_size_bytes,
            seed,
            threads,
        } => {
            let class_file = match &classes {
                Some(path) => Some(read_class_list(path)?),
                None => None,
            };
            let selected = class_file.as_ref().map(|all| match limit_classes {
                Some(n) => all[..n.min(all.len())].to_vec(),
                None => all.clone(),
            });
            let ilsvrc_val = match (ilsvrc_val_dir, ilsvrc_val_solution) {
                (Some(images_dir), Some(solution_csv)) => Some(ilsvrc::IlsvrcVal {
                    images_dir,
                    solution_csv,
                    known_wnids: class_file,
                }),
                _ => None, // clap requires both or neither
            };
            let splits = match (&src, splits) {
                (None, _) => Vec::new(),
                (Some(_), Some(splits)) => splits,
                (Some(_), None) if ilsvrc_val.is_some() => vec!["train".to_string()],
                (Some(_), None) => vec!["train".to_string(), "val".to_string()],
            };
            let sources = shards::Sources {
                image_folder: src,
                ilsvrc_val,
            };
            let opts = shards::BuildOptions {
                splits,
                classes: selected,
                shard_size_bytes,
                seed,
                progress: true,
            };
            let start = std::time::Instant::now();
            let manifest = on_pool(threads, || shards::build_shards_from(&sources, &dst, &opts))?;
            print_splits(&manifest);
            println!(
                "manifest: {}/manifest.json ({} classes), {:.1} s",
                dst.trim_end_matches('/'),
                manifest.classes.len(),
                start.elapsed().as_secs_f64()
            );
        }
        DataCommand::Verify {
            url,
            split,
            max_pixels,
            threads,
        } => {
            let opts = verify::VerifyOptions { split, max_pixels };
            let report = on_pool(threads, || verify::verify_shards(&url, &opts))?;
            println!("{report}");
            if !report.is_ok() {
                anyhow::bail!("{url}: {} problems", report.problems.len());
            }
        }
        DataCommand::Index {
            url,
            classes,
            shards,
            overwrite,
            threads,
        } => {
            let opts = index::IndexOptions {
                classes: index::read_sorted_classes(&classes)?,
                classes_source: classes.display().to_string(),
                shards,
                overwrite,
            };
            let manifest = on_pool(threads, || index::index_shards(&url, &opts))?;
            print_splits(&manifest);
            println!(
                "manifest: {}/manifest.json ({} classes)",
                url.trim_end_matches('/'),
                manifest.classes.len()
            );
        }
    }
    Ok(())
}

/// Runs `f` on a rayon pool of `threads` threads (`None`: rayon's global pool, one per core).
fn on_pool<T: Send>(threads: Option<usize>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    match threads {
        None => f(),
        Some(0) => anyhow::bail!("--threads must be > 0"),
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .context("starting the thread pool")?
            .install(f),
    }
}

/// The wnids of a class file (first column of each non-blank, non-`#` line), in file order.
fn read_class_list(path: &std::path::Path) -> Result<Vec<String>> {
    let column = devise::data::shards::read_class_column(path)
        .with_context(|| format!("--classes {}", path.display()))?;
    Ok(column.into_iter().map(|(_, wnid)| wnid).collect())
}
