//! The run report, written by rank 0 into the run directory: `report.json` (everything),
//! `report.md` (the paper-style tables: softmax baseline vs DeViSE on seen classes, zero-shot
//! DeViSE-0 and seen+unseen, chance; hp@k with `eval.hierarchy`), `report.html` (the same tables
//! with plots and example images, [`crate::report::html`]), plus a terminal summary.
pub mod html;
pub mod results;
use crate::data::reader::DataStats;
use crate::model::StageKind;
use crate::storage::Store;
use crate::text::LabelEmbeddings;
use anyhow::Result;
use results::{FlatHits, StageEval, HIT_KS};
use std::fmt::Write;
use std::time::Duration;

/// What the report says about the run besides its evaluations; the run layer fills it in from
/// the configuration and the plan (`config::plan::Plan::report_facts`).
pub struct RunFacts<'a> {
    /// `run.name`.
    pub name: &'a str,
    /// The configuration as run (`report.json`'s `config`).
    pub config: serde_json::Value,
    /// The plan (`report.json`'s `plan`).
    pub plan: serde_json::Value,
    /// The image encoder, as the Markdown header names it.
    pub encoder: String,
    /// Dimension of the word space.
    pub embed_dim: usize,
    /// Images per optimizer step, all ranks together.
    pub global_batch_size: usize,
    /// Processes in the run.
    pub world_size: usize,
    /// Seen classes, and their training and validation images.
    pub seen: usize,
    /// Training images of the seen classes.
    pub train_images: u64,
    /// Validation images of the seen classes.
    pub val_images_seen: u64,
    /// Unseen (zero-shot) classes.
    pub unseen: usize,
    /// Validation images of the unseen classes.
    pub val_images_unseen: u64,
    /// `text.vectors`: the word-vector file.
    pub vectors: &'a str,
    /// Classes left out of every stage, with the reason.
    pub left_out: &'a [(String, String)],
    /// Groups of labels whose vectors are identical.
    pub coincident_labels: &'a [Vec<String>],
    /// One line per stage.
    pub stages: Vec<String>,
    /// How each label mapped to the word vectors (names, match kind, file format).
    pub labels: &'a LabelEmbeddings,
}

/// Writes `report.json` and `report.md`, prints the summary, returns the URL of `report.md`.
pub fn write(
    run: &Store,
    facts: &RunFacts,
    evals: &[StageEval],
    metrics: &[serde_json::Value],
    wall: Duration,
    data: &DataStats,
) -> Result<String> {
    let mapping: Vec<serde_json::Value> = facts
        .labels
        .entries
        .iter()
        .map(|e| {
            serde_json::json!({
                "wnid": e.wnid,
                "names": e.names,
                "mapped_name": e.mapping.as_ref().map(|m| m.name.clone()),
                "via": e.mapping.as_ref().map(|m| format!("{:?}", m.via)),
            })
        })
        .collect();
    let json = serde_json::json!({
        "run": facts.name,
        "run_dir": run.url(),
        "wall_seconds": wall.as_secs_f64(),
        "plan": facts.plan,
        "evaluations": evals,
        "label_mapping": mapping,
        "data_stats": data,
        "final_train": metrics.iter().rev().find(|m| m.get("train/loss").is_some()),
        "config": facts.config,
    });
    run.put("report.json", serde_json::to_vec_pretty(&json)?.into())?;
    let md = markdown(facts, evals, wall, data);
    run.put("report.md", md.clone().into_bytes().into())?;
    let names: std::collections::HashMap<&str, &str> = facts
        .labels
        .entries
        .iter()
        .filter_map(|e| Some((e.wnid.as_str(), e.names.first()?.as_str())))
        .collect();
    let name_of = |wnid: &str| -> String {
        names
            .get(wnid)
            .map_or_else(|| wnid.to_string(), |n| n.to_string())
    };
    let html = crate::report::html::html(
        &format!("DeViSE run {}", facts.name),
        &md,
        evals,
        metrics,
        &name_of,
    )?;
    run.put("report.html", html.into_bytes().into())?;
    println!("{}", summary(evals));
    Ok(run.child_url("report.md"))
}

/// The k of the hp@k columns (paper Tables 1 and 3; hp@1 equals hit@1).
const HP_KS: [usize; 4] = [2, 5, 10, 20];

fn row(out: &mut String, name: &str, hits: &FlatHits, with_hp: bool) {
    let mut cells: Vec<String> = HIT_KS
        .iter()
        .map(|k| format!("{:.1}", 100.0 * hits.hit_at_k[k]))
        .collect();
    if with_hp {
        cells.extend(HP_KS.iter().map(|k| match &hits.hp {
            Some(hp) => format!("{:.3}", hp.hp_at_k[k]),
            None => String::new(),
        }));
    }
    let _ = writeln!(
        out,
        "| {name} | {} | {} | {} |",
        hits.images,
        hits.candidates,
        cells.join(" | ")
    );
}

fn chance(out: &mut String, hits: &FlatHits, with_hp: bool) {
    let mut cells: Vec<String> = HIT_KS
        .iter()
        .map(|k| format!("{:.1}", 100.0 * hits.chance_at_k[k]))
        .collect();
    if with_hp {
        cells.extend(HP_KS.iter().map(|k| match &hits.hp {
            Some(hp) => format!("{:.3}", hp.chance_hp_at_k[k]),
            None => String::new(),
        }));
    }
    let _ = writeln!(
        out,
        "| chance | | {} | {} |",
        hits.candidates,
        cells.join(" | ")
    );
}

fn find<'a>(evals: &'a [StageEval], stage: StageKind, key: &str) -> Option<&'a FlatHits> {
    evals
        .iter()
        .find(|e| e.stage == stage)
        .and_then(|e| e.rows.get(key))
}

fn table(out: &mut String, title: &str, evals: &[StageEval], rows: &[(&str, StageKind, &str)]) {
    let present: Vec<(&str, &FlatHits)> = rows
        .iter()
        .filter_map(|(label, stage, key)| find(evals, *stage, key).map(|h| (*label, h)))
        .collect();
    if present.is_empty() {
        return;
    }
    let with_hp = present.iter().any(|(_, h)| h.hp.is_some());
    let _ = writeln!(out, "\n### {title}\n");
    let mut ks: Vec<String> = HIT_KS.iter().map(|k| format!("hit@{k}")).collect();
    if with_hp {
        ks.extend(HP_KS.iter().map(|k| format!("hp@{k}")));
    }
    let _ = writeln!(out, "| model | images | candidates | {} |", ks.join(" | "));
    let _ = writeln!(out, "|---|---|---|{}|", vec!["---"; ks.len()].join("|"));
    for (label, hits) in &present {
        row(out, label, hits, with_hp);
    }
    chance(out, present[0].1, with_hp);
    if let Some(hp) = present.iter().find_map(|(_, h)| h.hp.as_ref()) {
        let sizes: Vec<String> = HP_KS
            .iter()
            .map(|k| format!("{:.1}", hp.mean_correct_set_size[k]))
            .collect();
        let _ = writeln!(
            out,
            "\nMean hCorrectSet size for k = {}: {} (paper Table 5, 1K labels: 6.5 / 12.5 / 22.5 / 41.7).",
            HP_KS.map(|k| k.to_string()).join(" / "),
            sizes.join(" / ")
        );
    }
}

fn markdown(facts: &RunFacts, evals: &[StageEval], wall: Duration, data: &DataStats) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# DeViSE run `{}`\n", facts.name);
    let _ = writeln!(
        s,
        "- wall time: {:.1} min; encoder `{}`, embed_dim {}, global batch {}, world size {}",
        wall.as_secs_f64() / 60.0,
        facts.encoder,
        facts.embed_dim,
        facts.global_batch_size,
        facts.world_size
    );
    let _ = writeln!(
        s,
        "- classes: {} seen ({} train / {} val images), {} unseen ({} val images)",
        facts.seen,
        facts.train_images,
        facts.val_images_seen,
        facts.unseen,
        facts.val_images_unseen
    );
    let _ = writeln!(
        s,
        "- word vectors: `{}` ({:?})",
        facts.vectors, facts.labels.vectors_report.format
    );
    for (wnid, why) in facts.left_out {
        let _ = writeln!(s, "- left out: {wnid}: {why}");
    }
    for group in facts.coincident_labels {
        let _ = writeln!(s, "- identical label vectors: {}", group.join(", "));
    }
    let _ = writeln!(
        s,
        "- data: {} decode errors, {} shard errors, {} incomplete samples skipped",
        data.decode_errors, data.shard_errors, data.incomplete_samples
    );
    for st in &facts.stages {
        let _ = writeln!(s, "- stage {st}");
    }
    s.push_str(&tables(evals));
    s
}

/// The results tables of `evals` in Markdown: seen classes, zero-shot (unseen only, seen +
/// unseen), seen images among all labels, and any `labels/...` rows of `devise eval --labels`.
pub fn tables(evals: &[StageEval]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\nFlat hit@k in percent (paper Tables 1 and 2 shape); with `eval.hierarchy`, hierarchical precision hp@k as a fraction (paper appendix A.3, Tables 1 and 3; hp@1 = hit@1). Prediction ranks one unit vector per label by dot product (paper A.2, simpler variant).");
    table(
        &mut s,
        "Seen classes (validation images of the training labels)",
        evals,
        &[
            ("softmax baseline", StageKind::Softmax, "seen/softmax"),
            ("DeViSE (frozen CNN)", StageKind::Devise, "seen/devise"),
            ("DeViSE (fine-tuned)", StageKind::Finetune, "seen/devise"),
        ],
    );
    table(
        &mut s,
        "Zero-shot, DeViSE-0 (unseen images, unseen labels only)",
        evals,
        &[
            (
                "DeViSE (frozen CNN)",
                StageKind::Devise,
                "zero_shot/devise_0",
            ),
            (
                "DeViSE (fine-tuned)",
                StageKind::Finetune,
                "zero_shot/devise_0",
            ),
            (
                "ConSE T=1 (softmax stage)",
                StageKind::Softmax,
                "zero_shot/conse_t1_0",
            ),
            (
                "ConSE T=5 (softmax stage)",
                StageKind::Softmax,
                "zero_shot/conse_t5_0",
            ),
            (
                "ConSE T=10 (softmax stage)",
                StageKind::Softmax,
                "zero_shot/conse_t10_0",
            ),
        ],
    );
    table(
        &mut s,
        "Zero-shot, seen + unseen candidates (unseen images)",
        evals,
        &[
            (
                "softmax baseline (names seen labels only)",
                StageKind::Softmax,
                "zero_shot/softmax_plus_seen",
            ),
            (
                "DeViSE (frozen CNN)",
                StageKind::Devise,
                "zero_shot/devise_plus_seen",
            ),
            (
                "DeViSE (fine-tuned)",
                StageKind::Finetune,
                "zero_shot/devise_plus_seen",
            ),
            (
                "ConSE T=1 (softmax stage)",
                StageKind::Softmax,
                "zero_shot/conse_t1_plus_seen",
            ),
            (
                "ConSE T=5 (softmax stage)",
                StageKind::Softmax,
                "zero_shot/conse_t5_plus_seen",
            ),
            (
                "ConSE T=10 (softmax stage)",
                StageKind::Softmax,
                "zero_shot/conse_t10_plus_seen",
            ),
        ],
    );
    table(
        &mut s,
        "Seen images, seen + unseen candidates",
        evals,
        &[
            (
                "DeViSE (frozen CNN)",
                StageKind::Devise,
                "seen/devise_plus_unseen",
            ),
            (
                "DeViSE (fine-tuned)",
                StageKind::Finetune,
                "seen/devise_plus_unseen",
            ),
        ],
    );
    let custom: Vec<(String, StageKind, String)> = evals
        .iter()
        .flat_map(|e| {
            e.rows
                .keys()
                .filter(|k| k.starts_with("labels/"))
                .map(|k| (format!("{} ({})", k, e.stage), e.stage, k.clone()))
        })
        .collect();
    let custom: Vec<(&str, StageKind, &str)> = custom
        .iter()
        .map(|(a, b, c)| (a.as_str(), *b, c.as_str()))
        .collect();
    for row in &custom {
        table(
            &mut s,
            &format!("Label set {}", row.2.trim_start_matches("labels/")),
            evals,
            std::slice::from_ref(row),
        );
    }
    s
}

/// The short terminal summary printed at the end of every run.
pub fn summary(evals: &[StageEval]) -> String {
    let mut s = String::from("== results (hit@1 / hit@5, %) ==\n");
    for e in evals {
        for (row, hits) in &e.rows {
            let _ = writeln!(
                s,
                "{:<9} {:<28} {:5.1} / {:5.1}   (chance {:.1} / {:.1}, {} images)",
                e.stage,
                row,
                100.0 * hits.hit_at_k[&1],
                100.0 * hits.hit_at_k[&5],
                100.0 * hits.chance_at_k[&1],
                100.0 * hits.chance_at_k[&5],
                hits.images
            );
        }
    }
    s
}
