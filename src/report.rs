//! The run report, written by rank 0 into the run directory: `report.json` (everything) and
//! `report.md` (the paper-style tables: softmax baseline vs DeViSE on seen classes, zero-shot
//! DeViSE-0 and seen+unseen, chance), plus a terminal summary.
use crate::config::RunConfig;
use crate::data::reader::DataStats;
use crate::eval::{FlatHits, StageEval, HIT_KS};
use crate::plan::Plan;
use crate::storage::Store;
use anyhow::Result;
use std::fmt::Write;
use std::time::Duration;

/// Writes `report.json` and `report.md`, prints the summary, returns the URL of `report.md`.
pub fn write(
    run: &Store,
    cfg: &RunConfig,
    plan: &Plan,
    evals: &[StageEval],
    metrics: &[serde_json::Value],
    wall: Duration,
    data: &DataStats,
) -> Result<String> {
    let mapping: Vec<serde_json::Value> = plan
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
        "run": cfg.run.name,
        "run_dir": run.url(),
        "wall_seconds": wall.as_secs_f64(),
        "plan": plan,
        "evaluations": evals,
        "label_mapping": mapping,
        "data_stats": data,
        "final_train": metrics.iter().rev().find(|m| m.get("train/loss").is_some()),
        "config": cfg,
    });
    run.put("report.json", serde_json::to_vec_pretty(&json)?.into())?;
    let md = markdown(cfg, plan, evals, wall, data);
    run.put("report.md", md.clone().into_bytes().into())?;
    println!("{}", summary(evals));
    Ok(run.child_url("report.md"))
}

fn row(out: &mut String, name: &str, hits: &FlatHits) {
    let cells: Vec<String> = HIT_KS
        .iter()
        .map(|k| format!("{:.1}", 100.0 * hits.hit_at_k[k]))
        .collect();
    let _ = writeln!(
        out,
        "| {name} | {} | {} | {} |",
        hits.images,
        hits.candidates,
        cells.join(" | ")
    );
}

fn chance(out: &mut String, hits: &FlatHits) {
    let cells: Vec<String> = HIT_KS
        .iter()
        .map(|k| format!("{:.1}", 100.0 * hits.chance_at_k[k]))
        .collect();
    let _ = writeln!(
        out,
        "| chance | | {} | {} |",
        hits.candidates,
        cells.join(" | ")
    );
}

fn find<'a>(evals: &'a [StageEval], stage: &str, key: &str) -> Option<&'a FlatHits> {
    evals
        .iter()
        .find(|e| e.stage == stage)
        .and_then(|e| e.rows.get(key))
}

fn table(out: &mut String, title: &str, evals: &[StageEval], rows: &[(&str, &str, &str)]) {
    let present: Vec<(&str, &FlatHits)> = rows
        .iter()
        .filter_map(|(label, stage, key)| find(evals, stage, key).map(|h| (*label, h)))
        .collect();
    if present.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n### {title}\n");
    let ks: Vec<String> = HIT_KS.iter().map(|k| format!("hit@{k}")).collect();
    let _ = writeln!(out, "| model | images | candidates | {} |", ks.join(" | "));
    let _ = writeln!(out, "|---|---|---|{}|", vec!["---"; HIT_KS.len()].join("|"));
    for (label, hits) in &present {
        row(out, label, hits);
    }
    chance(out, present[0].1);
}

fn markdown(
    cfg: &RunConfig,
    plan: &Plan,
    evals: &[StageEval],
    wall: Duration,
    data: &DataStats,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# DeViSE run `{}`\n", cfg.run.name);
    let _ = writeln!(
        s,
        "- wall time: {:.1} min; encoder `{:?}`, embed_dim {}, global batch {}, world size {}",
        wall.as_secs_f64() / 60.0,
        cfg.model.encoder,
        plan.embed_dim,
        plan.global_batch_size,
        plan.world_size
    );
    let _ = writeln!(
        s,
        "- classes: {} seen ({} train / {} val images), {} unseen ({} val images)",
        plan.seen.len(),
        plan.train_images,
        plan.val_images_seen,
        plan.unseen.len(),
        plan.val_images_unseen
    );
    let _ = writeln!(
        s,
        "- word vectors: `{}` ({:?})",
        cfg.text.vectors, plan.labels.vectors_report.format
    );
    for (wnid, why) in &plan.left_out {
        let _ = writeln!(s, "- left out: {wnid}: {why}");
    }
    for group in &plan.coincident_labels {
        let _ = writeln!(s, "- identical label vectors: {}", group.join(", "));
    }
    let _ = writeln!(
        s,
        "- data: {} decode errors, {} shard errors, {} incomplete samples skipped",
        data.decode_errors, data.shard_errors, data.incomplete_samples
    );
    for st in &plan.stages {
        let _ = writeln!(s, "- stage {}", st.describe());
    }
    let _ = writeln!(s, "\nFlat hit@k in percent (paper Tables 1 and 2 shape). Prediction ranks one unit vector per label by dot product (paper A.2, simpler variant).");
    table(
        &mut s,
        "Seen classes (validation images of the training labels)",
        evals,
        &[
            ("softmax baseline", "softmax", "seen/softmax"),
            ("DeViSE (frozen CNN)", "devise", "seen/devise"),
            ("DeViSE (fine-tuned)", "finetune", "seen/devise"),
        ],
    );
    table(
        &mut s,
        "Zero-shot, DeViSE-0 (unseen images, unseen labels only)",
        evals,
        &[
            ("DeViSE (frozen CNN)", "devise", "zero_shot/devise_0"),
            ("DeViSE (fine-tuned)", "finetune", "zero_shot/devise_0"),
            (
                "ConSE T=1 (softmax stage)",
                "softmax",
                "zero_shot/conse_t1_0",
            ),
            (
                "ConSE T=5 (softmax stage)",
                "softmax",
                "zero_shot/conse_t5_0",
            ),
            (
                "ConSE T=10 (softmax stage)",
                "softmax",
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
                "DeViSE (frozen CNN)",
                "devise",
                "zero_shot/devise_plus_seen",
            ),
            (
                "DeViSE (fine-tuned)",
                "finetune",
                "zero_shot/devise_plus_seen",
            ),
            (
                "ConSE T=1 (softmax stage)",
                "softmax",
                "zero_shot/conse_t1_plus_seen",
            ),
            (
                "ConSE T=5 (softmax stage)",
                "softmax",
                "zero_shot/conse_t5_plus_seen",
            ),
            (
                "ConSE T=10 (softmax stage)",
                "softmax",
                "zero_shot/conse_t10_plus_seen",
            ),
        ],
    );
    table(
        &mut s,
        "Seen images, seen + unseen candidates",
        evals,
        &[
            ("DeViSE (frozen CNN)", "devise", "seen/devise_plus_unseen"),
            ("DeViSE (fine-tuned)", "finetune", "seen/devise_plus_unseen"),
        ],
    );
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
