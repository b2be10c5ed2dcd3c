//! Scope: the whole pipeline in one process — ImageFolder tree -> shards -> label vectors ->
//! softmax / devise / finetune stages -> checkpoints -> evaluation -> report; and exact resume:
//! a run stopped mid-stage and resumed gives the same per-step losses and bit-identical final
//! weights as an uninterrupted run.
//!
//! On real data (`../shared`: 4 Tiny ImageNet classes, 3 seen and 1 unseen from the fixed split,
//! the real skip-gram word2vec file, WordNet): the plan, the evaluation rows and the smoke
//! configuration. The machinery (corrupt checkpoints, cached features, `init_from`, a changed
//! plan, channels-last and bf16) runs on the synthetic shapes (`common::synthetic`).
use crate::common::{synthetic, tiny, training_lock};
use devise::collective::SingleProcess;
use devise::config::plan::Plan;
use devise::config::RunConfig;
use devise::train::{train, Outcome, Resume, RunOptions};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// [`synthetic::config_toml`] over `shards` with `extra` overrides.
fn config(shards: &Path, run_dir: &Path, extra: &[&str]) -> RunConfig {
    let toml = synthetic::config_toml(shards, run_dir);
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    RunConfig::load(&toml, "it-train.toml", &extra).unwrap()
}

/// [`tiny::config_toml`] (real data) over `shards` with `extra` overrides.
fn real_config(shards: &Path, run_dir: &Path, extra: &[&str]) -> RunConfig {
    let toml = tiny::config_toml(shards, run_dir);
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    RunConfig::load(&toml, "it-train.toml", &extra).unwrap()
}

fn run(cfg: &RunConfig, resume: Resume, stop_after_step: Option<u64>) -> Outcome {
    let plan = Plan::build(cfg, 0, 1).unwrap();
    let opts = RunOptions {
        resume,
        stop: Arc::new(AtomicBool::new(false)),
        stop_after_step,
        local_rank: 0,
        local_world_size: 1,
    };
    train(&plan, &opts, &SingleProcess).unwrap()
}

/// (step, stage, loss) of every metrics line with a training loss.
fn losses(run_dir: &Path) -> Vec<(u64, String, f64)> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("train/loss").is_some())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["stage"].as_str().unwrap().to_string(),
                v["train/loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn plan_resolves_real_split_vectors_and_shards() {
    let (_dir, shards) = tiny::shards();
    let _serial = training_lock();
    let run_dir = tempfile::tempdir().unwrap();
    let cfg = real_config(shards, run_dir.path(), &[]);
    let plan = Plan::build(&cfg, 0, 1).unwrap();
    assert_eq!(plan.seen, vec!["n01443537", "n01629819", "n01641577"]);
    assert_eq!(plan.unseen, vec!["n01644900"]);
    assert_eq!(plan.embed_dim, 300);
    assert_eq!(plan.train_images, 1500);
    assert_eq!(plan.val_images_seen, 150);
    assert_eq!(plan.val_images_unseen, 50);
    assert_eq!(plan.total_steps, 9);
    // Unit label vectors.
    let norms = plan
        .seen_label_embedding()
        .norm_scalaropt_dim(2, [1], false);
    assert!(Vec::<f32>::try_from(norms)
        .unwrap()
        .iter()
        .all(|n| (n - 1.0).abs() < 1e-5));
    // A wrong world size is an error naming the key.
    let err = Plan::build(
        &real_config(shards, run_dir.path(), &["train.global_batch_size=15"]),
        0,
        2,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("train.global_batch_size"), "{err}");
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn trains_all_stages_checkpoints_evaluates_and_resumes_exactly() {
    let (_dir, shards) = tiny::shards();
    let _serial = training_lock();

    // Uninterrupted run.
    let full_dir = tempfile::tempdir().unwrap();
    let cfg = real_config(shards, full_dir.path(), &[]);
    let outcome = run(&cfg, Resume::Never, None);
    let Outcome::Completed { report } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(report.ends_with("report.md"));
    let md = std::fs::read_to_string(full_dir.path().join("report.md")).unwrap();
    assert!(
        md.contains("softmax baseline") && md.contains("DeViSE-0"),
        "{md}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(full_dir.path().join("report.json")).unwrap())
            .unwrap();
    let evals = report["evaluations"].as_array().unwrap();
    assert_eq!(evals.len(), 3);
    // ConSE rows come from the softmax stage (1 unseen candidate: trivially 1.0).
    assert_eq!(
        evals[0]["rows"]["zero_shot/conse_t5_0"]["hit_at_k"]["1"],
        1.0
    );
    assert_eq!(
        evals[0]["rows"]["zero_shot/conse_t5_plus_seen"]["candidates"],
        4
    );
    // hp@k over the real WordNet hierarchy on every row; hp@1 is hit@1 (the true label is a
    // candidate). The softmax baseline cannot name unseen labels: hit@k = 0 on unseen images,
    // while hp@k may credit seen labels near the true one.
    for e in evals {
        for (name, row) in e["rows"].as_object().unwrap() {
            let hp = &row["hp"];
            assert!(hp.is_object(), "{name}: no hp");
            assert_eq!(hp["hp_at_k"]["1"], row["hit_at_k"]["1"], "{name}");
        }
    }
    let softmax_zero = &evals[0]["rows"]["zero_shot/softmax_plus_seen"];
    assert_eq!(
        softmax_zero["hit_at_k"]["2"], 0.0,
        "3 seen labels rank above the unseen one"
    );
    // Tailed frog's k=2 correct set is {tailed frog, bullfrog} (3 hops; salamander is 4, goldfish
    // 11): the baseline can get at most bullfrog of it into its top 2.
    let hp2 = softmax_zero["hp"]["hp_at_k"]["2"].as_f64().unwrap();
    assert!((0.0..=0.5).contains(&hp2), "{hp2}");
    assert_eq!(softmax_zero["hp"]["mean_correct_set_size"]["2"], 2.0);
    assert!(
        md.contains("hp@2") && md.contains("Mean hCorrectSet size"),
        "{md}"
    );
    let finetune = &evals[2]["rows"];
    assert_eq!(finetune["seen/devise"]["images"], 150);
    assert_eq!(finetune["seen/devise"]["candidates"], 3);
    assert_eq!(finetune["zero_shot/devise_0"]["images"], 50);
    assert_eq!(finetune["zero_shot/devise_0"]["candidates"], 1);
    assert_eq!(finetune["zero_shot/devise_plus_seen"]["candidates"], 4);
    // One candidate: DeViSE-0 hit@1 is trivially 1, and chance says so too.
    assert_eq!(finetune["zero_shot/devise_0"]["hit_at_k"]["1"], 1.0);
    let full = losses(full_dir.path());
    assert_eq!(
        full.iter().map(|l| l.0).collect::<Vec<_>>(),
        (1..=9).collect::<Vec<_>>()
    );
    assert_eq!(full[0].1, "softmax");
    assert_eq!(full[4].1, "devise");
    assert_eq!(full[8].1, "finetune");
    // Retention kept the last 2 checkpoints; LATEST names the newest.
    let mut ckpts: Vec<String> = std::fs::read_dir(full_dir.path().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    // Newest 2 (8, 9) and the stage ends (3, 6, 9), plus LATEST.
    ckpts.sort();
    assert_eq!(
        ckpts,
        [
            "LATEST",
            "step-000000003",
            "step-000000006",
            "step-000000008",
            "step-000000009"
        ]
    );
    let latest = std::fs::read_to_string(full_dir.path().join("checkpoints/LATEST")).unwrap();
    assert_eq!(latest.trim(), "step-000000009");

    // Stopped after step 5 (inside the devise stage, between checkpoints), resumed to the end.
    let part_dir = tempfile::tempdir().unwrap();
    let cfg = real_config(shards, part_dir.path(), &[]);
    let Outcome::Preempted { checkpoint } = run(&cfg, Resume::Auto, Some(5)) else {
        panic!()
    };
    assert!(checkpoint.ends_with("step-000000005"), "{checkpoint}");
    let Outcome::Completed { .. } = run(&cfg, Resume::Auto, None) else {
        panic!()
    };
    let resumed = losses(part_dir.path());
    assert_eq!(full, resumed, "per-step losses of the resumed run differ");
    let weights =
        |d: &Path| std::fs::read(d.join("checkpoints/step-000000009/model.safetensors")).unwrap();
    assert!(
        weights(full_dir.path()) == weights(part_dir.path()),
        "final weights differ after resume"
    );
    // A completed run resumed again does no steps and keeps its results.
    let Outcome::Completed { .. } = run(&cfg, Resume::Auto, None) else {
        panic!()
    };
    assert_eq!(losses(part_dir.path()), full);
}

#[test]
fn resume_skips_a_corrupt_latest_checkpoint_and_never_reads_tmp() {
    let shards = &synthetic::shapes().shards;
    let _serial = training_lock();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(shards, dir.path(), &["checkpoint.keep_last=5"]);
    let Outcome::Preempted { .. } = run(&cfg, Resume::Auto, Some(4)) else {
        panic!()
    };
    let ck = dir.path().join("checkpoints");
    // Newest step corrupt (truncated weights), a leftover temporary folder, LATEST -> corrupt step.
    let model = ck.join("step-000000004/model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::create_dir_all(ck.join("step-000000006.tmp")).unwrap();
    std::fs::write(ck.join("step-000000006.tmp/model.safetensors"), b"partial").unwrap();
    let store = devise::storage::Store::open(dir.path().to_str().unwrap()).unwrap();
    // Steps 2 and 4 (every_steps) and 3 (end of the softmax stage); 4 is corrupt.
    assert_eq!(devise::checkpoint::find_latest(&store).unwrap(), Some(3));
    assert_eq!(
        devise::checkpoint::list_steps(&store).unwrap(),
        vec![2, 3, 4]
    );
    // Resuming continues from step 3 and completes.
    let Outcome::Completed { .. } = run(&cfg, Resume::Auto, None) else {
        panic!()
    };
    let steps: Vec<u64> = losses(dir.path()).iter().map(|l| l.0).collect();
    assert_eq!(steps, (1..=9).collect::<Vec<_>>());
}

#[test]
fn config_errors_name_the_key() {
    let toml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/tiny-imagenet-small.toml"
    ))
    .unwrap();
    // The shipped recipe parses.
    RunConfig::load(&toml, "tiny-imagenet-small.toml", &[]).unwrap();
    let bad = toml.replace("global_batch_size", "global_batch_sise");
    let err = format!("{:#}", RunConfig::load(&bad, "x.toml", &[]).unwrap_err());
    assert!(
        err.contains("global_batch_sise") && err.contains("x.toml"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        RunConfig::load(&toml, "x.toml", &["loss.margin=-1".into()]).unwrap_err()
    );
    assert!(err.contains("loss.margin"), "{err}");
}

/// Every recipe shipped in `configs/` parses and validates (unknown keys, ranges), so a typo in a
/// long-running recipe fails here rather than an hour into a run.
#[test]
fn every_shipped_config_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with("-eval.toml") {
                // An overlay for `devise eval --config`: valid over a run configuration.
                let overrides = devise::config::overlay_overrides(path.to_str().unwrap()).unwrap();
                assert!(!overrides.is_empty(), "{name}");
                RunConfig::load_file(dir.join("tiny-imagenet.toml").to_str().unwrap(), &overrides)
                    .unwrap_or_else(|e| {
                        panic!("{} over tiny-imagenet.toml: {e:#}", path.display())
                    });
            } else {
                let text = std::fs::read_to_string(&path).unwrap();
                RunConfig::load(&text, &path.display().to_string(), &[])
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            }
            names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    names.sort();
    assert_eq!(
        names,
        [
            "demo.toml",
            "imagenet-1k-resnet50.toml",
            "smoke.toml",
            "tiny-imagenet-small.toml",
            "tiny-imagenet.toml",
            "zero-shot-21k-eval.toml"
        ]
    );
}

#[test]
fn devise_stage_on_cached_features_resumes_exactly() {
    let shards = &synthetic::shapes().shards;
    let _serial = training_lock();
    let extra = ["train.devise.cache_features=true"];
    let full_dir = tempfile::tempdir().unwrap();
    let Outcome::Completed { .. } = run(
        &config(shards, full_dir.path(), &extra),
        Resume::Never,
        None,
    ) else {
        panic!()
    };
    let part_dir = tempfile::tempdir().unwrap();
    let cfg = config(shards, part_dir.path(), &extra);
    let Outcome::Preempted { .. } = run(&cfg, Resume::Auto, Some(5)) else {
        panic!()
    };
    let Outcome::Completed { .. } = run(&cfg, Resume::Auto, None) else {
        panic!()
    };
    let full = losses(full_dir.path());
    assert_eq!(full.len(), 9);
    assert_eq!(full, losses(part_dir.path()));
    // The devise steps differ from the image-decoding path (other inputs), but train.
    let uncached_dir = tempfile::tempdir().unwrap();
    let Outcome::Completed { .. } = run(
        &config(shards, uncached_dir.path(), &[]),
        Resume::Never,
        None,
    ) else {
        panic!()
    };
    assert_ne!(full[4].2, losses(uncached_dir.path())[4].2);
    // Only the devise stage may cache.
    let bad = RunConfig::load(
        &synthetic::config_toml(shards, full_dir.path()),
        "x.toml",
        &["train.softmax.cache_features=true".into()],
    );
    assert!(format!("{:#}", bad.unwrap_err()).contains("train.softmax.cache_features"));
}

#[test]
fn init_from_reuses_a_softmax_stage_and_evaluates_it_first() {
    let shards = &synthetic::shapes().shards;
    let _serial = training_lock();
    // Run A keeps its softmax-stage checkpoint (step 3).
    let a = tempfile::tempdir().unwrap();
    let cfg_a = config(shards, a.path(), &["checkpoint.keep_every_steps=3"]);
    let Outcome::Completed { .. } = run(&cfg_a, Resume::Never, None) else {
        panic!()
    };
    let ck = a.path().join("checkpoints/step-000000003");
    assert!(ck.join("manifest.json").exists());
    // Run B: no softmax stage, encoder + classifier from A's step 3; a vocabulary change is
    // allowed (only encoder/classifier are loaded), here the same vectors.
    let b = tempfile::tempdir().unwrap();
    let init = format!("train.init_from={:?}", ck.to_str().unwrap());
    let cfg_b = config(shards, b.path(), &["train.softmax.epochs=0", &init]);
    let Outcome::Completed { .. } = run(&cfg_b, Resume::Never, None) else {
        panic!()
    };
    let read = |d: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(d.join("eval/softmax.json")).unwrap()).unwrap()
    };
    // Same weights, same images: the softmax-stage rows (baseline, ConSE) are identical.
    assert_eq!(read(a.path())["rows"], read(b.path())["rows"]);
    assert_eq!(read(b.path())["step"], 0);
    assert_eq!(losses(b.path()).first().unwrap().1, "devise");
    // Excluding a class changes the classifier shape: a clear error.
    let cfg_c = config(
        shards,
        tempfile::tempdir().unwrap().path(),
        &[
            "train.softmax.epochs=0",
            &init,
            "labels.exclude=[\"blue_circle\"]",
        ],
    );
    let plan = Plan::build(&cfg_c, 0, 1).unwrap();
    assert!(plan
        .left_out
        .iter()
        .any(|(w, why)| w == "blue_circle" && why.contains("labels.exclude")));
    let opts = RunOptions {
        resume: Resume::Never,
        stop: Arc::new(AtomicBool::new(false)),
        stop_after_step: None,
        local_rank: 0,
        local_world_size: 1,
    };
    let err = format!("{:#}", train(&plan, &opts, &SingleProcess).unwrap_err());
    assert!(
        err.contains("classifier") && err.contains("train.init_from"),
        "{err}"
    );
}

#[test]
fn resume_refuses_a_changed_plan_and_a_run_dir_without_intact_checkpoints() {
    let shards = &synthetic::shapes().shards;
    let _serial = training_lock();
    let dir = tempfile::tempdir().unwrap();
    let Outcome::Preempted { .. } = run(&config(shards, dir.path(), &[]), Resume::Auto, Some(5))
    else {
        panic!()
    };
    let try_run = |extra: &[&str]| {
        let cfg = config(shards, dir.path(), extra);
        let plan = Plan::build(&cfg, 0, 1).unwrap();
        let opts = RunOptions {
            resume: Resume::Auto,
            stop: Arc::new(AtomicBool::new(false)),
            stop_after_step: None,
            local_rank: 0,
            local_world_size: 1,
        };
        train(&plan, &opts, &SingleProcess)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    };
    // Batch size, seed, and the length of a stage that had started all change what the steps were.
    let err = try_run(&["train.global_batch_size=8"]).unwrap_err();
    assert!(err.contains("train.global_batch_size was 16"), "{err}");
    let err = try_run(&["run.seed=4"]).unwrap_err();
    assert!(err.contains("run.seed"), "{err}");
    let err = try_run(&["train.devise.epochs=0.1"]).unwrap_err();
    assert!(err.contains("stage devise"), "{err}");
    // A later stage may change: more fine-tuning after the checkpoint is fine.
    try_run(&["train.finetune.epochs=0.05"]).unwrap();

    // A checkpoint whose data cursor is the earlier unpartitioned stream's `{epoch, position}`
    // (rewritten here, with its checksum) is refused, naming train.init_from for its weights.
    let store = devise::storage::Store::open(dir.path().to_str().unwrap()).unwrap();
    let last = *devise::checkpoint::list_steps(&store)
        .unwrap()
        .last()
        .unwrap();
    let ck = dir
        .path()
        .join("checkpoints")
        .join(devise::checkpoint::step_dir_name(last));
    let read_json = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(ck.join(name)).unwrap()).unwrap()
    };
    let mut state = read_json("train_state.json");
    state["cursor"] = serde_json::json!({"epoch": 0, "position": 80});
    let bytes = serde_json::to_vec(&state).unwrap();
    std::fs::write(ck.join("train_state.json"), &bytes).unwrap();
    let mut manifest = read_json("manifest.json");
    manifest["files"]["train_state.json"] = serde_json::json!({
        "bytes": bytes.len(),
        "sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
    });
    std::fs::write(
        ck.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let err = try_run(&["train.finetune.epochs=0.05"]).unwrap_err();
    assert!(
        err.contains("every rank") && err.contains("train.init_from"),
        "{err}"
    );
    // `devise demo` sets such a run directory aside, unchanged, and starts a new one.
    let demo_run = dir.path().join("demo/run");
    std::fs::create_dir_all(&demo_run).unwrap();
    std::fs::create_dir_all(demo_run.join("checkpoints")).unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&ck)
        .arg(demo_run.join("checkpoints"))
        .status()
        .unwrap();
    assert!(copied.success());
    devise::demo::set_aside_unresumable_run(&demo_run).unwrap();
    assert!(!demo_run.exists());
    assert!(dir
        .path()
        .join("demo/run.before-partitions/checkpoints")
        .join(devise::checkpoint::step_dir_name(last))
        .join("train_state.json")
        .is_file());

    // Every checkpoint broken: refuse to start over silently.
    for step in devise::checkpoint::list_steps(
        &devise::storage::Store::open(dir.path().to_str().unwrap()).unwrap(),
    )
    .unwrap()
    {
        std::fs::remove_file(dir.path().join(format!(
            "checkpoints/{}/manifest.json",
            devise::checkpoint::step_dir_name(step)
        )))
        .unwrap();
    }
    let err = try_run(&["train.finetune.epochs=0.05"]).unwrap_err();
    assert!(err.contains("none is intact"), "{err}");
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn the_smoke_config_runs_every_stage_on_real_data() {
    let (_dir, shards) = tiny::shards();
    let run = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_devise"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["train", "--config", "configs/smoke.toml"])
        .args(["--set", &format!("data.shards={}", shards.display())])
        .args(["--set", &format!("run.dir={}", run.path().display())])
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    let steps: Vec<u64> = losses(run.path()).iter().map(|l| l.0).collect();
    assert_eq!(steps, (1..=9).collect::<Vec<_>>());
    let md = std::fs::read_to_string(run.path().join("report.md")).unwrap();
    assert!(md.contains("hp@2") && md.contains("DeViSE-0"), "{md}");
    assert!(run.path().join("report.html").is_file());
}

/// The GPU path's options, run on the CPU through all three stages: `model.channels_last` (NHWC
/// weights and batches) computes the same function as NCHW (every logged loss within 1e-3
/// relative), and its checkpoint loads into an NCHW model that gives the same features;
/// `model.precision = "bf16"` (bfloat16 autocast of the encoder) trains every stage with finite
/// losses near float32's.
#[test]
fn channels_last_and_bf16_autocast_train_every_stage_on_the_cpu() {
    let shards = &synthetic::shapes().shards;
    let _serial = training_lock();
    let trained = |extra: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let Outcome::Completed { .. } =
            run(&config(shards, dir.path(), extra), Resume::Never, None)
        else {
            panic!("{extra:?} did not complete")
        };
        let l = losses(dir.path());
        (dir, l)
    };
    let (_base_dir, base) = trained(&[]);
    let (nhwc_dir, nhwc) = trained(&["model.channels_last=true"]);
    let (_bf16_dir, bf16) = trained(&["model.precision=\"bf16\""]);
    assert_eq!(base.len(), 9, "{base:?}");
    for (other, tolerance) in [(&nhwc, 1e-3), (&bf16, 0.1)] {
        assert_eq!(other.len(), base.len());
        for ((s, stage, a), (s2, stage2, b)) in base.iter().zip(other.iter()) {
            assert_eq!((s, stage), (s2, stage2));
            assert!(b.is_finite(), "step {s}: {b}");
            assert!(
                (a - b).abs() <= tolerance * a.abs().max(1.0),
                "step {s} ({stage}): {a} vs {b} (tolerance {tolerance})"
            );
        }
    }
    // bfloat16 did change the arithmetic.
    assert!(base.iter().zip(&bf16).any(|(a, b)| a.2 != b.2), "{bf16:?}");
    // The channels-last run's final checkpoint, loaded as NCHW and as NHWC: the same features.
    let checkpoint = nhwc_dir.path().join("checkpoints/step-000000009");
    let url = checkpoint.to_str().unwrap();
    let images = tch::Tensor::randn([4, 3, 32, 32], (tch::Kind::Float, tch::Device::Cpu));
    let features = |layout: &str| {
        let loaded =
            devise::eval::predict::load_model(url, tch::Device::Cpu, &[layout.to_string()])
                .unwrap();
        let conv_nhwc =
            loaded.model.vs.variables().values().any(|v| {
                v.dim() == 4 && devise::model::gpu::is_channels_last(v) && v.size()[2] > 1
            });
        assert_eq!(conv_nhwc, layout.ends_with("true"), "{layout}");
        tch::no_grad(|| loaded.model.features(&images, false))
    };
    let (nchw, nhwc) = (
        features("model.channels_last=false"),
        features("model.channels_last=true"),
    );
    let diff = f64::try_from((&nchw - &nhwc).abs().max()).unwrap();
    assert!(diff < 1e-4, "{diff}");
    assert!(f64::try_from(nchw.abs().max()).unwrap() > 0.0);
}
