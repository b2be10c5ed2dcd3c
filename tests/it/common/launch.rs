//! Runs of the `devise` binary and of `devise-launch` (built by `cargo test --workspace`; next
//! to `devise`) on the synthetic shapes, and what their run directories hold: per-step losses,
//! the sample trace of every rank, the final weights, the processes of a run.
use super::ports;
use super::synthetic::{config_toml, shapes};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn devise() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_devise"))
}

/// `devise-launch`, built by the same `cargo test --workspace` into the same directory.
pub fn launcher() -> PathBuf {
    let path = devise().with_file_name("devise-launch");
    assert!(
        path.exists(),
        "{} not found: run the tests with `cargo test --workspace` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// [`config_toml`] (the synthetic shapes) with GroupNorm, one thread per process, the sample
/// trace, a parameter check every step, `softmax_epochs` of the softmax stage, and `extra` TOML
/// appended (new sections only: TOML forbids repeating a key).
pub fn write_config(dir: &Path, name: &str, softmax_epochs: f64, extra: &str) -> PathBuf {
    let run = dir.join(name);
    let toml = config_toml(&shapes().shards, &run)
        .replace("threads = 2", "threads = 1")
        .replace("decode_threads = 2", "decode_threads = 1")
        // Partitions that 1, 2 and 4 ranks share, so runs on each see the same global batches.
        .replace("[data]\n", "[data]\npartitions = 4\n")
        .replace("widths = [8, 16]", "widths = [8, 16]\nnorm = \"group\"")
        .replace(
            "log_every_steps = 1",
            "log_every_steps = 1\ntrace_samples = true",
        )
        .replace(
            "softmax = { epochs = 0.032,",
            &format!("softmax = {{ epochs = {softmax_epochs},"),
        )
        // The devise stage on cached features (assembled across ranks).
        .replace(
            "lr = 0.05 } }\nfinetune",
            "lr = 0.05 }, cache_features = true }\nfinetune",
        );
    assert!(
        toml.contains("cache_features = true") && toml.contains("partitions = 4"),
        "the overrides applied"
    );
    // The paper's first-violation hinge: its random label order is drawn per sample of the
    // global batch, so it too must not depend on the world size.
    let toml = format!(
        "{toml}\n[loss]\nmargin = 0.1\nstop_at_first_violation = true\n\n\
         [dist]\ncheck_params_every_steps = 1\ntimeout_secs = 60\n{extra}"
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

pub fn run_dir(config: &Path) -> PathBuf {
    config.with_extension("")
}

/// `(step, train/loss)` of a run's metrics.
pub fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v["train/loss"].as_f64()?)))
        .collect()
}

/// Step -> the sorted sample ids (slots `[epoch, position]` or cache rows) of all ranks
/// together; the last line per (rank, step) wins (a resumed run re-traces steps after its
/// checkpoint).
pub fn trace(run: &Path, world: usize) -> BTreeMap<u64, Vec<String>> {
    let mut per_rank: Vec<BTreeMap<u64, Vec<String>>> = vec![BTreeMap::new(); world];
    for (r, steps) in per_rank.iter_mut().enumerate() {
        let text = std::fs::read_to_string(run.join(format!("trace/rank-{r}.jsonl"))).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let ids = v
                .get("slots")
                .or_else(|| v.get("rows"))
                .unwrap()
                .as_array()
                .unwrap()
                .iter()
                .map(|x| format!("{}:{x}", v["stage"]))
                .collect();
            steps.insert(v["step"].as_u64().unwrap(), ids);
        }
    }
    let mut all: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for steps in per_rank {
        for (step, ids) in steps {
            let entry = all.entry(step).or_default();
            let before = entry.len();
            entry.extend(ids);
            let unique: BTreeSet<&String> = entry.iter().collect();
            assert_eq!(
                unique.len(),
                entry.len(),
                "step {step}: two ranks used the same sample (had {before})"
            );
        }
    }
    for ids in all.values_mut() {
        ids.sort();
    }
    all
}

/// Runs the launcher command `build(port)` gives (`port`: for `--master-port`) to its end,
/// again with another port while rank 0 could not bind it (another program took it first).
pub fn run_launcher(mut build: impl FnMut(&str) -> Command) -> Output {
    ports::retry_on_port_in_use(
        |port| build(&port.to_string()).output().unwrap(),
        |out| !out.status.success() && text(out).contains("cannot host the rendezvous store"),
    )
}

/// `devise-launch --nproc-per-node 2 ARGS -- devise train --config CONFIG`, run to its end.
pub fn launch(args: &[&str], config: &Path) -> Output {
    run_launcher(|port| {
        let mut cmd = Command::new(launcher());
        cmd.args([
            "--nproc-per-node",
            "2",
            "--master-port",
            port,
            "--stop-timeout-secs",
            "10",
        ])
        .args(args)
        .arg("--")
        .arg(devise())
        .args(["train", "--config", config.to_str().unwrap()]);
        cmd
    })
}

pub fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn assert_close(a: &[(u64, f64)], b: &[(u64, f64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    for ((sa, la), (sb, lb)) in a.iter().zip(b) {
        assert_eq!(sa, sb);
        assert!(
            (la - lb).abs() <= 1e-4 * la.abs().max(1.0),
            "{what}: step {sa}: loss {la} vs {lb}"
        );
    }
}

/// Linux: the pid of the `devise train` worker with `RANK=rank` whose command line names
/// `config`.
pub fn worker_pid(config: &Path, rank: usize) -> Option<i32> {
    let want_env = format!("RANK={rank}");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.contains(config.to_str().unwrap()) || cmdline.contains("devise-launch") {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if environ
            .split(|b| *b == 0)
            .any(|kv| kv == want_env.as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

/// The newest checkpoint's `model.safetensors` bytes (by `LATEST`).
pub fn final_weights(run: &Path) -> Vec<u8> {
    let latest = std::fs::read_to_string(run.join("checkpoints/LATEST")).unwrap();
    std::fs::read(
        run.join("checkpoints")
            .join(latest.trim())
            .join("model.safetensors"),
    )
    .unwrap()
}

/// Pids of every process whose command line names `config` (launcher and workers).
pub fn processes_of(config: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if !zombie && String::from_utf8_lossy(&cmdline).contains(config.to_str().unwrap()) {
            pids.push(pid);
        }
    }
    pids
}
