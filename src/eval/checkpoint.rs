//! `devise eval`: evaluate a saved checkpoint, on the run's own label split or on any label
//! list, and write a report beside the checkpoints (`<run dir>/eval/<step>[-<labels>]/report.json`
//! and `report.md`, by rank 0). Data parallel like training: each rank evaluates its share of the
//! validation images and the counts are all-reduced.
//!
//! Without `--labels` the rows are those of a stage-end evaluation for the checkpoint's stage:
//! the softmax baseline (and ConSE) for a `softmax` checkpoint, DeViSE (seen, zero-shot
//! DeViSE-0, seen + unseen) otherwise. With `--labels FILE` (one wnid per line, e.g. ImageNet's
//! 2-hop / 3-hop / 21K lists) the candidates are the file's labels that have a word vector (the
//! rest are reported and left out), plus the training labels with `--plus-seen` (the paper's
//! DeViSE+1K mode); the images are the validation images whose class is a candidate, or, with
//! `eval.label_set_shards` / `eval.label_set_split`, those of another shard set (held-out images
//! of ImageNet-21K classes: `configs/zero-shot-21k-eval.toml`).
//!
//! The training labels are ranked with the vectors stored in the checkpoint (those the model was
//! trained against), the other labels with the current vector file's; a vector file of another
//! dimension is an error, one that gives the training labels other vectors a warning (an error
//! with `--strict`): [`predict::check_label_vectors`].
use crate::collective::{Collective, WorkerEnv};
use crate::config::plan::Plan;
use crate::eval::predict;
use crate::eval::{self, Heads, StageEval};

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;

/// `devise eval`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// A checkpoint step directory (.../checkpoints/step-NNNNNNNNN), or a run directory (its
    /// latest complete checkpoint, checkpoints/LATEST).
    #[arg(long)]
    pub checkpoint: String,
    /// Candidate labels: a file with one wnid per line, `seen` or `unseen`; default: the
    /// rows of a stage-end evaluation for the checkpoint's stage.
    #[arg(long)]
    pub labels: Option<String>,
    /// Rank the training labels too (the paper's DeViSE+1K mode).
    #[arg(long, requires = "labels")]
    pub plus_seen: bool,
    /// A configuration overlay (some sections' keys, e.g. configs/zero-shot-21k-eval.toml)
    /// layered over the checkpoint's configuration, before --set.
    #[arg(long, value_name = "FILE")]
    pub config: Option<String>,
    /// Override a key of the checkpoint's configuration (e.g. eval.hierarchy=FILE).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = crate::config::parse_set)]
    pub set: Vec<String>,
    /// Fail instead of warning when the word-vector file gives the training labels other
    /// vectors than the checkpoint was trained with (or it carries none to compare with).
    #[arg(long)]
    pub strict: bool,
    /// --device, --dry-run.
    #[command(flatten)]
    pub worker: crate::config::WorkerArgs,
}

/// `devise eval`: resolves the checkpoint (a run directory stands for its latest), layers
/// `--config` and `--set` (and `--device`) over its configuration, joins the process group of
/// the rank environment ([`crate::collective::init`]) and runs [`run`]. Returns the report URL
/// (rank 0) or an empty string (other ranks, and `--dry-run`).
pub fn run_command(args: &Args) -> Result<String> {
    let checkpoint = crate::checkpoint::resolve_step_url(&args.checkpoint)?;
    let mut overrides = match &args.config {
        Some(path) => crate::config::overlay_overrides(path)?,
        None => Vec::new(),
    };
    overrides.extend(args.set.iter().cloned());
    let overrides = args.worker.with_device(overrides);
    let env = WorkerEnv::from_env().context("reading the rank environment")?;
    let cfg = predict::checkpoint_config(&checkpoint, &overrides).with_context(|| {
        match &args.config {
            Some(path) => format!("layering {path} over the configuration of {checkpoint}"),
            None => format!("the configuration of {checkpoint}"),
        }
    })?;
    let device =
        crate::config::device::select_device(cfg.run.device, env.local_rank, env.local_world_size)
            .with_context(|| format!("choosing the GPU of {env}"))?;
    if args.worker.dry_run {
        println!("world: {env}");
        println!("checkpoint: {checkpoint}");
        println!("device: {} -> {device:?}", cfg.run.device);
        println!(
            "labels: {}{}",
            args.labels
                .as_deref()
                .unwrap_or("the checkpoint's stage-end rows"),
            if args.plus_seen {
                " + the training labels"
            } else {
                ""
            }
        );
        return Ok(String::new());
    }
    let collective = crate::collective::init(&env, &cfg.dist, device)?;
    run(
        &Request {
            checkpoint,
            overrides,
            labels: args.labels.clone(),
            plus_seen: args.plus_seen,
            strict: args.strict,
        },
        collective.as_ref(),
        env.local_rank,
        env.local_world_size,
    )
}

/// What to evaluate.
pub struct Request {
    /// Checkpoint step directory URL.
    pub checkpoint: String,
    /// `section.key=value` overrides of the checkpoint's configuration (e.g. `eval.hierarchy`).
    pub overrides: Vec<String>,
    /// A wnid list file, `seen` or `unseen`; None: the checkpoint's own rows.
    pub labels: Option<String>,
    /// Add the training labels to the candidates.
    pub plus_seen: bool,
    /// Fail, instead of warning, when the vector file gives the training labels other vectors
    /// than the checkpoint was trained with, or the checkpoint carries none to compare with
    /// ([`predict::check_label_vectors`]).
    pub strict: bool,
}

/// Runs the evaluation on the GPU of local worker `local_rank` of `local_world_size` (when
/// `run.device` asks for one); returns the report URL (rank 0) or an empty string (other ranks).
pub fn run(
    req: &Request,
    collective: &dyn Collective,
    local_rank: usize,
    local_world_size: usize,
) -> Result<String> {
    let started = std::time::Instant::now();
    let cfg = predict::checkpoint_config(&req.checkpoint, &req.overrides)?;
    let device =
        crate::config::device::select_device(cfg.run.device, local_rank, local_world_size)?;
    let loaded = predict::load_model(&req.checkpoint, device, &req.overrides)?;
    let mut plan = Plan::build(&loaded.cfg, collective.rank(), collective.world_size())?;
    crate::text::label_embedding::check_dim(
        &loaded.cfg.text.vectors,
        plan.embed_dim,
        &loaded.url,
        loaded.embed_dim,
    )?;
    if plan.seen != loaded.seen {
        bail!(
            "{}: its training labels differ from what its configuration resolves to now (the \
             split, names or vectors files changed?)",
            loaded.url
        );
    }
    if let Some(stored) = &loaded.label_embedding {
        // The training labels are ranked with the vectors the model was trained against.
        plan.seen_matrix = stored.values.clone();
    }
    let (stage, step) = (loaded.state.stage, loaded.state.step);
    let mut unmapped = Vec::new();
    let mut images = None;
    let (result, suffix) = match &req.labels {
        None => {
            predict::check_label_vectors(
                &loaded,
                &plan.labels,
                req.strict,
                collective.rank() == 0,
            )?;
            let r = eval::evaluate(
                &loaded.model,
                &plan,
                Heads::after(stage),
                collective,
                device,
                stage,
                step,
            )?;
            (r, String::new())
        }
        Some(labels) => {
            let (name, mut wnids) = match labels.as_str() {
                "seen" => ("seen".to_string(), plan.seen.clone()),
                "unseen" => ("unseen".to_string(), plan.unseen.clone()),
                path => (
                    std::path::Path::new(path)
                        .file_stem()
                        .map(|s| s.to_string_lossy().to_string())
                        .unwrap_or_else(|| "labels".into()),
                    predict::read_label_list(path)?,
                ),
            };
            let mut row = format!("labels/{name}/devise_0");
            if req.plus_seen {
                predict::add_seen(&mut wnids, &plan.seen);
                row = format!("labels/{name}/devise_plus_seen");
            }
            let cands = predict::candidates(&loaded, &wnids, req.strict, device)?;
            if !cands.unmapped.is_empty() {
                tracing::warn!(
                    "{} of {} labels have no word vector and are left out: {}",
                    cands.unmapped.len(),
                    wnids.len(),
                    cands.unmapped.join(" ")
                );
            }
            unmapped = cands.unmapped.clone();
            let source = eval::LabelSetImages::resolve(&plan, &loaded.cfg.eval)?;
            images = Some((source.shards.clone(), source.split.clone()));
            let hits = eval::evaluate_label_set(
                &loaded.model,
                &plan,
                &source,
                &cands.wnids,
                &cands.matrix,
                collective,
                device,
            )?;
            let suffix = format!("-{}", row.replace('/', "-").trim_start_matches("labels-"));
            let r = StageEval {
                stage,
                step,
                rows: BTreeMap::from([(row, hits)]),
                seconds: started.elapsed().as_secs_f64(),
                examples: Vec::new(),
            };
            (r, suffix)
        }
    };
    if collective.rank() != 0 {
        return Ok(String::new());
    }
    let (store, step_number) = crate::checkpoint::split_step_url(&loaded.url)?;
    let dir = format!(
        "eval/{}{suffix}",
        crate::checkpoint::step_dir_name(step_number)
    );
    let evals = [result];
    let json = serde_json::json!({
        "checkpoint": loaded.url,
        "labels": req.labels,
        "plus_seen": req.plus_seen,
        "unmapped_labels": unmapped,
        "hierarchy": loaded.cfg.eval.hierarchy,
        "images": images.as_ref().map(|(shards, split)| serde_json::json!({"shards": shards, "split": split})),
        "evaluations": evals,
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    store.put(
        &format!("{dir}/report.json"),
        serde_json::to_vec_pretty(&json)?.into(),
    )?;
    let mut md = format!(
        "# Evaluation of `{}`\n\n- stage `{stage}`, step {step}; {} seen / {} unseen labels in its \
         split; images: split `{}` of `{}`\n",
        loaded.url,
        plan.seen.len(),
        plan.unseen.len(),
        images.as_ref().map_or(&plan.data.val_split, |(_, split)| split),
        images.as_ref().map_or(&plan.data.shards, |(shards, _)| shards),
    );
    if let Some(labels) = &req.labels {
        md.push_str(&format!(
            "- candidates: `{labels}`{} ({} left out without a word vector{})\n",
            if req.plus_seen {
                " + the training labels"
            } else {
                ""
            },
            unmapped.len(),
            if unmapped.is_empty() {
                String::new()
            } else {
                format!(": {}", unmapped.join(" "))
            }
        ));
    }
    md.push_str(&crate::report::tables(&evals));
    store.put(&format!("{dir}/report.md"), md.into_bytes().into())?;
    println!("{}", crate::report::summary(&evals));
    Ok(store.child_url(&format!("{dir}/report.md")))
}
