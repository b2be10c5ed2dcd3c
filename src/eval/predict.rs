//! `devise predict`: zero-shot labelling of images with any label list (paper §4.2, A.2).
//!
//! A checkpoint's model encodes each image (the evaluation transform of its `[data]` section:
//! resize the short side to `eval_resize`, centre crop `image_size`), projects it into the word
//! space, and ranks the candidate labels by cosine similarity with their unit label vectors
//! (one vector per label: the paper's simpler variant). Candidates are any list of wnids, e.g.
//! ImageNet's 1K, 2-hop, 3-hop or 21K lists; labels with no word vector are left out and
//! reported. Images are local paths or object-store URLs (`s3://...`, read with
//! [`crate::storage`]).
//!
//! The checkpoint's training labels are ranked with the vectors it was trained against (stored
//! with it, [`crate::text::label_embedding`]); the other candidates with the vector file its
//! configuration names, which is first checked against the checkpoint ([`check_label_vectors`]).
//!
//! When an image's file name contains a wnid (`n01440764_...JPEG`, as ImageNet files are named)
//! that is a candidate, it counts towards the hit@1 / hit@5 summary.
use crate::checkpoint;
use crate::config::RunConfig;
use crate::model::DeviseModel;
use crate::storage::Store;
use crate::text::label_embedding::{self, LabelEmbeddingMatrix};
use crate::text::LabelEmbeddings;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// A checkpoint ready to embed images.
pub struct Loaded {
    /// Its resolved run configuration (`config.toml` of the checkpoint).
    pub cfg: RunConfig,
    /// The model with the checkpoint's weights.
    pub model: DeviseModel,
    /// The training (seen) labels, in classifier order.
    pub seen: Vec<String>,
    /// Step directory URL.
    pub url: String,
    /// The checkpoint's train state (step, stage, ...).
    pub state: checkpoint::TrainState,
    /// Dimension of the word space the model projects into.
    pub embed_dim: usize,
    /// The training labels' vectors the model was trained against (rows = `seen`); `None` for a
    /// checkpoint written without them.
    pub label_embedding: Option<LabelEmbeddingMatrix>,
}

/// The resolved configuration of the checkpoint at step directory `url` with `overrides`
/// (`section.key=value`) applied; reads only `config.toml` (checked against the manifest).
pub fn checkpoint_config(url: &str, overrides: &[String]) -> Result<RunConfig> {
    let toml = checkpoint::config_at(url)?;
    RunConfig::load(&toml, &format!("{url}/config.toml"), overrides)
}

/// Loads the checkpoint at step directory `url` (`.../checkpoints/step-N`) onto `device`, with
/// `overrides` (`section.key=value`) applied to its configuration. Errors: a checkpoint that does
/// not verify, a config it cannot parse, weights that do not fit (a tensor missing, or of
/// another shape or dtype than the model's: named with the file).
pub fn load_model(url: &str, device: Device, overrides: &[String]) -> Result<Loaded> {
    let ck = checkpoint::load_url(url)?;
    let cfg = RunConfig::load(&ck.config_toml, &format!("{url}/config.toml"), overrides)?;
    let seen = ck.state.resume_key.seen.clone();
    let embed_dim = ck.embed_dim()?;
    let mut model = DeviseModel::new(&cfg.model, seen.len() as i64, embed_dim as i64, device)?;
    model
        .load_state_dict(&ck.model)
        .with_context(|| format!("loading the weights of {}/model.safetensors", ck.url))?;
    Ok(Loaded {
        cfg,
        model,
        seen,
        url: ck.url,
        state: ck.state,
        embed_dim,
        label_embedding: ck.label_embedding,
    })
}

/// Checks the label vectors `current` (from the checkpoint's `[text]` section as it resolves
/// now, holding at least the training labels that map) against the checkpoint `loaded`:
///
/// - a vector file of another dimension than the model's: an error naming the file, both
///   dimensions and the checkpoint (before any tensor math);
/// - training labels whose vectors differ from those the model was trained with (after
///   L2-normalising both, beyond [`label_embedding::SAME_VECTOR_TOLERANCE`]), or that have no
///   vector now: a warning naming the file, the checkpoint, how many differ and by how much; an
///   error with `strict`;
/// - a checkpoint that carries no label vectors: a warning that the training labels come from
///   the current vector file unchecked; an error with `strict`.
///
/// `warn` false silences the warnings (ranks other than 0 of a data-parallel eval).
pub fn check_label_vectors(
    loaded: &Loaded,
    current: &LabelEmbeddings,
    strict: bool,
    warn: bool,
) -> Result<()> {
    let vectors = &loaded.cfg.text.vectors;
    label_embedding::check_dim(vectors, current.dim, &loaded.url, loaded.embed_dim)?;
    let problem = match &loaded.label_embedding {
        Some(stored) => {
            let drift = stored.drift(
                |wnid| current.vector(wnid),
                label_embedding::SAME_VECTOR_TOLERANCE,
            );
            if drift.is_same() {
                return Ok(());
            }
            format!(
                "the word-vector file {vectors} does not give the training labels of the \
                 checkpoint {} the vectors it was trained with ({}): {}. The training labels are \
                 ranked with the checkpoint's vectors, other labels with this file's, which may \
                 not fit the model: use the vector file it was trained with",
                loaded.url,
                label_embedding::FILE_NAME,
                drift.describe()
            )
        }
        None => format!(
            "the checkpoint {} carries no {}: its training labels are ranked with vectors from \
             the current word-vector file {vectors}, which cannot be checked against those it \
             was trained with",
            loaded.url,
            label_embedding::FILE_NAME
        ),
    };
    if strict {
        bail!("{problem} (--strict)");
    }
    if warn {
        tracing::warn!("{problem} (--strict makes this an error)");
    }
    Ok(())
}

/// Reads a label list: one wnid per line (the first whitespace-separated field; blank lines and
/// `#` comments skipped). Errors name the file and line of a field that is not a wnid, and a
/// wnid listed twice.
pub fn read_label_list(path: &str) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading label list {path}"))?;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let wnid = line.split_whitespace().next().unwrap_or_default();
        if !is_wnid(wnid) {
            bail!("{path}:{}: '{wnid}' is not a wnid (n + 8 digits)", i + 1);
        }
        if !seen.insert(wnid.to_string()) {
            bail!("{path}:{}: {wnid} listed twice", i + 1);
        }
        out.push(wnid.to_string());
    }
    if out.is_empty() {
        bail!("{path}: no wnids");
    }
    Ok(out)
}

fn is_wnid(s: &str) -> bool {
    s.len() == 9 && s.starts_with('n') && s[1..].bytes().all(|b| b.is_ascii_digit())
}

/// The first wnid-shaped part of the file name of a path or URL (`n01440764_10026.JPEG` ->
/// `n01440764`): `n` and 8 ASCII digits, not preceded by a letter or digit of any script
/// (`xn01440764`, `ßn01440764` are not wnids) nor followed by a digit. Any Unicode name works
/// (`Straße_01.jpg` -> `None`, `n01440764_ü.JPEG` -> `n01440764`).
pub fn wnid_in_name(path: &str) -> Option<String> {
    let name = path.rsplit('/').next()?;
    // Candidates start at an `n`; `get` refuses a window that ends inside a character.
    name.match_indices('n').find_map(|(i, _)| {
        let cand = name.get(i..i + 9)?;
        let (before, after) = (name.get(..i)?, name.get(i + 9..)?);
        let boundary_before = !before
            .chars()
            .next_back()
            .is_some_and(char::is_alphanumeric);
        let boundary_after = !after.starts_with(|c: char| c.is_ascii_digit());
        (is_wnid(cand) && boundary_before && boundary_after).then(|| cand.to_string())
    })
}

/// Candidate labels with unit vectors (the training labels' from the checkpoint when it carries
/// them, see [`candidates`]).
pub struct Candidates {
    /// Candidate wnids, in order (the rows of `matrix`).
    pub wnids: Vec<String>,
    /// Their first names (for printing).
    pub names: Vec<String>,
    /// `[candidates, dim]` unit label vectors.
    pub matrix: Tensor,
    /// Requested wnids left out: no word vector for any of their names.
    pub unmapped: Vec<String>,
}

/// Label vectors of `wnids` for ranking with the checkpoint `loaded`: its training labels get
/// the vectors it was trained with (when it carries them), the other labels their vectors from
/// the checkpoint's `[text]` section; labels with no vector are left out (listed in
/// [`Candidates::unmapped`]). The vector file is first checked against the checkpoint with
/// [`check_label_vectors`] (`strict` as there). Errors: those of the check, an unreadable names
/// or vector file, no candidate with a vector.
pub fn candidates(
    loaded: &Loaded,
    wnids: &[String],
    strict: bool,
    device: Device,
) -> Result<Candidates> {
    let mut text = loaded.cfg.text.clone();
    text.on_unmapped = crate::text::OnUnmapped::Skip;
    // The training labels too: they are compared with the checkpoint's vectors.
    let mut wanted = wnids.to_vec();
    let listed: std::collections::HashSet<&String> = wnids.iter().collect();
    wanted.extend(loaded.seen.iter().filter(|w| !listed.contains(w)).cloned());
    let emb = crate::text::load_label_embeddings(&text, &wanted)?;
    check_label_vectors(loaded, &emb, strict, true)?;
    let stored = loaded.label_embedding.as_ref();
    let mut kept = Vec::new();
    let mut names = Vec::new();
    let mut rows: Vec<f32> = Vec::new();
    let mut unmapped = Vec::new();
    for e in emb.entries.iter().take(wnids.len()) {
        let vector = stored
            .and_then(|m| m.row(&e.wnid))
            .or(e.mapping.as_ref().map(|m| m.vector.as_slice()));
        match vector {
            Some(v) => {
                kept.push(e.wnid.clone());
                names.push(e.names.first().cloned().unwrap_or_default());
                rows.extend_from_slice(v);
            }
            None => unmapped.push(e.wnid.clone()),
        }
    }
    if kept.is_empty() {
        bail!("none of the {} labels has a word vector", wnids.len());
    }
    let matrix = Tensor::from_slice(&rows)
        .view([kept.len() as i64, emb.dim as i64])
        .to(device); // [candidates, dim]
    Ok(Candidates {
        wnids: kept,
        names,
        matrix,
        unmapped,
    })
}

/// One image's top labels.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    /// The image path or URL.
    pub image: String,
    /// The wnid in its file name, when there is one.
    pub label_from_name: Option<String>,
    /// `(wnid, name, cosine)`, best first.
    pub top: Vec<(String, String, f32)>,
    /// Rank (1-based) of `label_from_name` among all candidates, when it is one.
    pub true_rank: Option<usize>,
}

/// Reads, decodes and ranks each image. An image that cannot be read or decoded is an error
/// naming it (nothing is skipped silently).
pub fn predict(
    loaded: &Loaded,
    cands: &Candidates,
    images: &[String],
    top_k: usize,
    device: Device,
) -> Result<Vec<Prediction>> {
    let data = &loaded.cfg.data;
    let s = data.image_size as i64;
    let mut out = Vec::new();
    for image in images {
        let bytes = read_image(image)?;
        let mut pixels = vec![0f32; (3 * s * s) as usize];
        crate::data::image::decode_eval(&bytes, data, &mut pixels)
            .with_context(|| format!("decoding {image}"))?;
        let x = Tensor::from_slice(&pixels).view([1, 3, s, s]).to(device);
        let scores = tch::no_grad(|| {
            let emb = loaded
                .model
                .image_embedding(&loaded.model.features(&x, false)); // [1, dim]
            let emb = &emb / emb.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
            emb.matmul(&cands.matrix.tr()).squeeze_dim(0) // [candidates]
        });
        let scores: Vec<f32> = Vec::try_from(scores.to_kind(Kind::Float).to(Device::Cpu))?;
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        let label_from_name = wnid_in_name(image);
        let true_rank = label_from_name
            .as_ref()
            .and_then(|w| cands.wnids.iter().position(|c| c == w))
            .map(|t| order.iter().position(|&i| i == t).unwrap() + 1);
        out.push(Prediction {
            image: image.clone(),
            label_from_name,
            top: order
                .iter()
                .take(top_k)
                .map(|&i| (cands.wnids[i].clone(), cands.names[i].clone(), scores[i]))
                .collect(),
            true_rank,
        });
    }
    Ok(out)
}

fn read_image(image: &str) -> Result<Vec<u8>> {
    if image.contains("://") && !image.starts_with("file://") {
        let (dir, name) = image
            .rsplit_once('/')
            .with_context(|| format!("{image}: not a URL to an object"))?;
        Ok(Store::open(dir)?.get(name)?.to_vec())
    } else {
        let path = image.strip_prefix("file://").unwrap_or(image);
        std::fs::read(path).with_context(|| format!("reading image {path}"))
    }
}

/// Appends the training labels `seen` that `wnids` lacks, in their order: the candidates of the
/// paper's DeViSE+1K mode (`--plus-seen`).
pub fn add_seen(wnids: &mut Vec<String>, seen: &[String]) {
    let have: std::collections::HashSet<String> = wnids.iter().cloned().collect();
    wnids.extend(seen.iter().filter(|w| !have.contains(*w)).cloned());
}

/// `devise predict`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// A checkpoint step directory (.../checkpoints/step-NNNNNNNNN), or a run directory (its
    /// latest complete checkpoint, checkpoints/LATEST). Its config's relative paths (word
    /// vectors, names) are read from the working directory.
    #[arg(long)]
    pub checkpoint: String,
    /// Label list: a file with one wnid per line (e.g. ImageNet's 1K, 2-hop, 3-hop or 21K
    /// list), or `seen` for the checkpoint's training labels.
    #[arg(long)]
    pub labels: String,
    /// Rank the checkpoint's training labels too (the paper's DeViSE+1K mode).
    #[arg(long)]
    pub plus_seen: bool,
    /// Labels printed per image.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Fail instead of warning when the word-vector file gives the training labels other
    /// vectors than the checkpoint was trained with (or it carries none to compare with).
    #[arg(long)]
    pub strict: bool,
    /// --device, --dry-run.
    #[command(flatten)]
    pub worker: crate::config::WorkerArgs,
    /// Image files or URLs.
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<String>,
}

/// `devise predict`: loads the checkpoint, ranks the labels for every image and prints the top
/// `--top-k` per image (a table, or JSON with `--json`), then hit@1 / hit@5 over the images
/// whose file name names a candidate. One process: the device is the first GPU this process
/// sees (`--device`, default `auto`).
pub fn run_command(args: &Args) -> Result<()> {
    let checkpoint = checkpoint::resolve_step_url(&args.checkpoint)?;
    let device_kind = args.worker.device.unwrap_or_default();
    let device = crate::config::device::select_device(device_kind, 0, 1)?;
    if args.worker.dry_run {
        println!("checkpoint: {checkpoint}");
        println!("device: {device_kind} -> {device:?}");
        println!(
            "labels: {}{}",
            args.labels,
            if args.plus_seen {
                " + the training labels"
            } else {
                ""
            }
        );
        println!("images: {}", args.images.len());
        return Ok(());
    }
    let loaded = load_model(&checkpoint, device, &[])?;
    let mut wnids = if args.labels == "seen" {
        loaded.seen.clone()
    } else {
        read_label_list(&args.labels)?
    };
    if args.plus_seen {
        add_seen(&mut wnids, &loaded.seen);
    }
    let cands = candidates(&loaded, &wnids, args.strict, device)?;
    if !cands.unmapped.is_empty() {
        eprintln!(
            "{} of {} labels have no word vector for any of their names and are left out: {}",
            cands.unmapped.len(),
            wnids.len(),
            cands.unmapped.join(" ")
        );
    }
    let preds = predict(&loaded, &cands, &args.images, args.top_k, device)?;
    let (n, hit1, hit5) = hits(&preds);
    if args.json {
        let doc = serde_json::json!({
            "checkpoint": loaded.url,
            "labels": args.labels,
            "plus_seen": args.plus_seen,
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

/// hit@1 and hit@5 over the predictions whose file-name label is a candidate:
/// `(images counted, hit@1, hit@5)`.
pub fn hits(preds: &[Prediction]) -> (usize, f64, f64) {
    let ranks: Vec<usize> = preds.iter().filter_map(|p| p.true_rank).collect();
    let n = ranks.len();
    let frac = |k: usize| ranks.iter().filter(|&&r| r <= k).count() as f64 / n.max(1) as f64;
    (n, frac(1), frac(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wnids_in_file_names() {
        assert_eq!(
            wnid_in_name("a/b/n01440764_10026.JPEG").as_deref(),
            Some("n01440764")
        );
        assert_eq!(
            wnid_in_name("s3://bucket/ILSVRC2012_val_00000001_n01751748.JPEG").as_deref(),
            Some("n01751748")
        );
        assert_eq!(wnid_in_name("photo.jpg"), None);
        assert_eq!(wnid_in_name("n0144076_short.jpg"), None);
        assert_eq!(wnid_in_name("xn01440764.jpg"), None);
    }

    #[test]
    fn wnids_in_non_ascii_file_names() {
        // Each of these panicked with "byte index N is not a char boundary".
        assert_eq!(wnid_in_name("Straße_01.jpg"), None);
        assert_eq!(wnid_in_name("s3://bucket/Bilder/Müller_ü.JPEG"), None);
        assert_eq!(
            wnid_in_name("n01440764_ü.JPEG").as_deref(),
            Some("n01440764")
        );
        assert_eq!(
            wnid_in_name("日本語/n01440764_1.jpg").as_deref(),
            Some("n01440764")
        );
        assert_eq!(
            wnid_in_name("s3://bucket/Straße_n01751748.JPEG").as_deref(),
            Some("n01751748")
        );
        assert_eq!(wnid_in_name("ßn01440764.jpg"), None, "a letter before");
        assert_eq!(
            wnid_in_name("😀n01440764.jpg").as_deref(),
            Some("n01440764")
        );
    }
}
