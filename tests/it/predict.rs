//! Scope: `devise predict` and `devise eval` for real. A checkpoint trained here on 4 Tiny ImageNet
//! classes is evaluated again (the same numbers as the training-time evaluation, bit for bit; on
//! the 1K label list with hp@k), and ranks
//! ImageNet's 1K label list (real skip-gram vectors; labels without a vector left out and
//! reported) for the 100 full-size ImageNet JPEGs of `../shared/data/imagenet-sample-100/`
//! (the wnid is in each file name), as a table and as JSON, with hit@1 / hit@5 against the
//! file-name labels; bad inputs are errors naming the file or line.
use crate::common::launch::{devise, text};
use crate::common::shared_dir;
use crate::common::tiny::trained_run;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The report URL a successful `devise eval` prints (`report: URL`); panics with its log
/// otherwise.
fn report_path(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{}", text(out));
    let log = text(out);
    log.lines()
        .find_map(|l| l.strip_prefix("report: "))
        .unwrap_or_else(|| panic!("{log}"))
        .trim()
        .to_string()
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn predict_ranks_the_1k_labels_for_the_100_full_size_images() {
    let shared = shared_dir();
    let (dir, run) = trained_run();
    let checkpoint = run.join("checkpoints/step-000000009");
    let one_k = shared.join("data/imagenet-meta/zero-shot-splits/1k.txt");
    let mut images: Vec<String> = std::fs::read_dir(shared.join("data/imagenet-sample-100"))
        .unwrap()
        .map(|e| e.unwrap().path().to_str().unwrap().to_string())
        .collect();
    images.sort();
    assert_eq!(images.len(), 100);
    let predict = |extra: &[&str]| {
        Command::new(devise())
            .args(["predict", "--checkpoint", checkpoint.to_str().unwrap()])
            .args(["--labels", one_k.to_str().unwrap(), "--device", "cpu"])
            .args(extra)
            .args(&images)
            .output()
            .unwrap()
    };

    let out = predict(&["--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let unmapped: BTreeSet<String> = doc["unmapped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect();
    let candidates = doc["candidates"].as_u64().unwrap() as usize;
    assert_eq!(
        candidates + unmapped.len(),
        1000,
        "every 1K label is ranked or reported"
    );
    assert!(candidates > 900, "{candidates}");
    let preds = doc["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 100);
    // Scored: the images whose file-name wnid has a vector (a 1K label with no vector cannot
    // be named).
    let scorable = images
        .iter()
        .filter(|p| {
            let name = Path::new(p).file_name().unwrap().to_str().unwrap();
            !unmapped.contains(&name[..9])
        })
        .count();
    assert_eq!(doc["scored_images"].as_u64().unwrap() as usize, scorable);
    for p in preds {
        let top = p["top"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        let scores: Vec<f64> = top.iter().map(|t| t[2].as_f64().unwrap()).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
        assert!(scores.iter().all(|s| (-1.0..=1.0).contains(s)), "cosines");
        if let Some(rank) = p["true_rank"].as_u64() {
            assert!((1..=candidates as u64).contains(&rank));
            let top1 = top[0][0].as_str().unwrap();
            assert_eq!(rank == 1, top1 == p["label_from_name"].as_str().unwrap());
        }
    }
    let ranks: Vec<u64> = preds
        .iter()
        .filter_map(|p| p["true_rank"].as_u64())
        .collect();
    let hit = |k: u64| ranks.iter().filter(|&&r| r <= k).count() as f64 / ranks.len() as f64;
    assert_eq!(doc["hit_at_1"].as_f64().unwrap(), hit(1));
    assert_eq!(doc["hit_at_5"].as_f64().unwrap(), hit(5));

    // The table: a block per image and the summary line.
    let out = predict(&["--top-k", "3"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        table.contains("n01491361_tiger_shark.JPEG  (file name: n01491361"),
        "{table}"
    );
    assert!(table.contains("   3. n"), "{table}");
    assert!(!table.contains("   4. n"), "{table}");
    assert!(
        table.contains(&format!("over the {scorable} images")),
        "{table}"
    );

    // Bad inputs name what is wrong.
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "n01440764\nnot-a-wnid\n").unwrap();
    let out = Command::new(devise())
        .args(["predict", "--checkpoint", checkpoint.to_str().unwrap()])
        .args(["--labels", bad.to_str().unwrap(), &images[0]])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("bad.txt:2: 'not-a-wnid' is not a wnid"),
        "{}",
        text(&out)
    );
    let out = Command::new(devise())
        .args(["predict", "--checkpoint", checkpoint.to_str().unwrap()])
        .args(["--labels", "seen", "/nonexistent/x.jpg"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("/nonexistent/x.jpg"), "{}", text(&out));
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn eval_reproduces_the_training_time_numbers_and_ranks_any_label_list() {
    let shared = shared_dir();
    let (_, run) = trained_run();
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("report.json")).unwrap()).unwrap();
    let at_training = report["evaluations"].as_array().unwrap();
    // eval.every_steps = 2: evaluations at steps 2, 4, 6, 8 besides the stage ends 3, 6, 9, each
    // logged as eval/... metrics; the report keeps each stage's last.
    let eval_steps: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| {
            v.as_object()
                .unwrap()
                .keys()
                .any(|k| k.starts_with("eval/"))
        })
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(eval_steps, [2, 3, 4, 6, 8, 9]);
    assert_eq!(at_training.len(), 3);
    assert_eq!(
        at_training
            .iter()
            .map(|e| e["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [3, 6, 9]
    );
    let eval = |step: &str, extra: &[&str]| {
        let out = Command::new(devise())
            .args(["eval", "--checkpoint"])
            .arg(run.join("checkpoints").join(step))
            .args(extra)
            .output()
            .unwrap();
        let path = report_path(&out);
        let json = Path::new(&path).with_file_name("report.json");
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
        (doc, std::fs::read_to_string(path).unwrap())
    };
    // The softmax stage's end (step 3) and the final checkpoint (step 9), evaluated again: the
    // same rows and numbers as during training (hit@k and hp@k alike).
    for (step, index) in [("step-000000003", 0), ("step-000000009", 2)] {
        let (doc, md) = eval(step, &[]);
        assert_eq!(
            doc["evaluations"][0]["rows"], at_training[index]["rows"],
            "{step}"
        );
        assert!(md.contains("hp@5"), "{md}");
    }
    // The 1K list: the 200 validation images of the 4 classes (all in 1K) among every 1K label
    // with a word vector, with hp@k; --plus-seen adds nothing new (the seen labels are in 1K).
    let one_k = shared.join("data/imagenet-meta/zero-shot-splits/1k.txt");
    let (doc, md) = eval("step-000000009", &["--labels", one_k.to_str().unwrap()]);
    let row = &doc["evaluations"][0]["rows"]["labels/1k/devise_0"];
    let unmapped = doc["unmapped_labels"].as_array().unwrap().len();
    assert_eq!(
        row["candidates"].as_u64().unwrap() as usize,
        1000 - unmapped
    );
    assert_eq!(row["images"], 200);
    assert_eq!(row["hp"]["hp_at_k"]["1"], row["hit_at_k"]["1"]);
    assert!(md.contains("### Label set 1k/devise_0"), "{md}");
    assert!(md.contains("left out without a word vector"), "{md}");
    let (doc, _) = eval(
        "step-000000009",
        &["--labels", one_k.to_str().unwrap(), "--plus-seen"],
    );
    let plus = &doc["evaluations"][0]["rows"]["labels/1k/devise_plus_seen"];
    assert_eq!(plus["candidates"], row["candidates"]);
    assert_eq!(plus["hit_at_k"], row["hit_at_k"]);
    // A label list with no validation class: a clear error.
    let two_hop = shared.join("data/imagenet-meta/zero-shot-splits/2-hops.txt");
    let out = Command::new(devise())
        .args(["eval", "--checkpoint"])
        .arg(run.join("checkpoints/step-000000009"))
        .args(["--labels", two_hop.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("nothing to evaluate"), "{}", text(&out));
}

/// The zero-shot recipe end to end, at the scale ../shared allows: the 100 full-size ImageNet
/// JPEGs packed as per-synset tars (ImageNet-21K's layout), taken by
/// `scripts/imagenet-21k-eval-split.sh`, sharded by `devise data build-shards`, and ranked by
/// `devise eval --config configs/zero-shot-21k-eval.toml` (its shards and hierarchy pointed here
/// with --set) among the 1K labels. The eval must score exactly the images `predict` scores and
/// give the same hit@1 / hit@5 (same decoder, transform and model; a different path through the
/// shards). A key the overlay does not know is an error naming the overlay.
#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn the_zero_shot_21k_eval_recipe_ranks_images_from_its_own_shards() {
    let shared = shared_dir();
    let (_, run) = trained_run();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let sample = shared.join("data/imagenet-sample-100");
    let tars = tmp.path().join("in21k");
    std::fs::create_dir_all(&tars).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(&sample)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().to_string())
        .collect();
    files.sort();
    for name in &files {
        let status = Command::new("tar")
            .arg("-C")
            .arg(&sample)
            .arg("-cf")
            .arg(tars.join(format!("{}.tar", &name[..9])))
            .arg(name)
            .status()
            .unwrap();
        assert!(status.success());
    }
    // A label list named apart from the other test's 1k.txt evaluation (separate report dir).
    let labels = tmp.path().join("recipe-1k.txt");
    std::fs::copy(
        shared.join("data/imagenet-meta/zero-shot-splits/1k.txt"),
        &labels,
    )
    .unwrap();
    let folder = tmp.path().join("folder");
    let out = Command::new("bash")
        .arg(root.join("scripts/imagenet-21k-eval-split.sh"))
        .args([&tars, &labels, &folder])
        .arg("50")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("100 classes, 100 images; 900 labels"),
        "{}",
        text(&out)
    );
    let shards = tmp.path().join("shards");
    let out = Command::new(devise())
        .args(["data", "build-shards", "--src"])
        .arg(&folder)
        .args(["--splits", "val", "--dst"])
        .arg(&shards)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let checkpoint = run.join("checkpoints/step-000000009");
    let recipe = root.join("configs/zero-shot-21k-eval.toml");
    let out = Command::new(devise())
        .args(["eval", "--checkpoint"])
        .arg(&checkpoint)
        .arg("--config")
        .arg(&recipe)
        .arg("--set")
        .arg(format!("eval.label_set_shards={}", shards.display()))
        .arg("--set")
        .arg(format!(
            "eval.hierarchy={}",
            shared.join("data/imagenet-meta/wordnet.is_a.txt").display()
        ))
        .arg("--labels")
        .arg(&labels)
        .output()
        .unwrap();
    let report = report_path(&out);
    assert!(
        report.ends_with("eval/step-000000009-recipe-1k-devise_0/report.md"),
        "{report}"
    );
    let md = std::fs::read_to_string(&report).unwrap();
    assert!(
        md.contains(&format!("images: split `val` of `{}`", shards.display())),
        "{md}"
    );
    let doc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(&report).with_file_name("report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(doc["images"]["split"], "val");
    let row = &doc["evaluations"][0]["rows"]["labels/recipe-1k/devise_0"];
    assert_eq!(row["hp"]["hp_at_k"]["1"], row["hit_at_k"]["1"]);

    // The same images through `devise predict`.
    let images: Vec<PathBuf> = files.iter().map(|f| sample.join(f)).collect();
    let out = Command::new(devise())
        .args(["predict", "--checkpoint"])
        .arg(&checkpoint)
        .arg("--labels")
        .arg(&labels)
        .args(["--device", "cpu", "--json"])
        .args(&images)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let predicted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row["images"], predicted["scored_images"]);
    assert_eq!(row["candidates"], predicted["candidates"]);
    let scored = predicted["scored_images"].as_f64().unwrap();
    for (k, key) in [("1", "hit_at_1"), ("5", "hit_at_5")] {
        let (ours, theirs) = (
            row["hit_at_k"][k].as_f64().unwrap(),
            predicted[key].as_f64().unwrap(),
        );
        assert!(
            ((ours - theirs) * scored).abs() < 0.5,
            "hit@{k}: eval {ours} vs predict {theirs}"
        );
    }

    // An unknown key in an overlay names the overlay.
    let bad = tmp.path().join("bad-eval.toml");
    std::fs::write(&bad, "[eval]\nlabel_set_shard = \"x\"\n").unwrap();
    let out = Command::new(devise())
        .args(["eval", "--checkpoint"])
        .arg(&checkpoint)
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = text(&out);
    assert!(
        err.contains("bad-eval.toml") && err.contains("label_set_shard"),
        "{err}"
    );
}
