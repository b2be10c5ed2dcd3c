//! The run configuration: TOML through the `config` crate, then `DEVISE__SECTION__KEY`
//! environment overrides, then `--set section.key=value` flags (later wins). Each component owns
//! its section (`data::Config`, `text::Config`, ...); this file only nests them. Every section is
//! `deny_unknown_fields`, so a misspelt key is an error naming it. [`crate::config::plan::Plan`] is what
//! the rest of the program uses.
pub mod device;
pub mod plan;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;

/// `[run]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Run name (report titles, logs).
    pub name: String,
    /// Run directory URL: checkpoints, `metrics.jsonl`, `eval/`, `report.{json,md}`.
    pub dir: String,
    /// Seed of every random choice (weights init, data order, augmentation, loss sampling).
    #[serde(default)]
    pub seed: u64,
    /// libtorch intra-op threads (0: libtorch's default, usually the number of cores).
    #[serde(default)]
    pub threads: usize,
    /// `cpu`, `cuda` (the worker's own GPU: `devise_launch::world::cuda_ordinal`), or `auto`
    /// (CUDA when libtorch sees a GPU).
    #[serde(default)]
    pub device: DeviceKind,
    /// On CUDA, let cuDNN time its convolution algorithms on the first batches and keep the
    /// fastest (`torch.backends.cudnn.benchmark`, which torchvision's reference sets). Faster;
    /// the choice can differ between processes, so GPU runs (and a resume against an
    /// uninterrupted run) are no longer bit-identical. Default `false`.
    #[serde(default)]
    pub cudnn_benchmark: bool,
    /// The signal the site sends before it stops the job: `usr1` (`SIGUSR1`, the default),
    /// `usr2` (`SIGUSR2`) or `term` (`SIGTERM` only). It, SIGTERM and SIGINT make training
    /// finish its step, write a checkpoint and exit 75. Under `devise-launch`, give the
    /// launcher `--preempt-signal`: it sets `DEVISE__RUN__PREEMPT_SIGNAL` for its workers,
    /// which overrides this key (see `devise_launch::signal`).
    #[serde(default)]
    pub preempt_signal: devise_launch::signal::PreemptSignal,
}

/// `run.device`: where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The CPU.
    Cpu,
    /// The worker's own CUDA GPU; an error when it has none.
    Cuda,
    /// CUDA when libtorch sees a GPU, else the CPU.
    #[default]
    Auto,
}

deserialize_by_name!(DeviceKind);

impl DeviceKind {
    /// `cpu`, `cuda`, `auto`: as TOML and the command line spell it.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Auto => "auto",
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// The flags every worker command (`train`, `eval`, `predict`, `bench-step`) takes, so they
/// read the same everywhere and `devise-launch --dry-run` (which appends `--dry-run`) works
/// with any of them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WorkerArgs {
    /// Where the model runs. train and eval: the same as --set run.device=VALUE (default: the
    /// configuration's run.device); predict and bench-step: default auto.
    #[arg(long, value_enum)]
    pub device: Option<DeviceKind>,
    /// Print what would run (the world, the device choice, the plan or the request) and exit
    /// without running it.
    #[arg(long)]
    pub dry_run: bool,
}

impl WorkerArgs {
    /// `overrides` with `run.device=...` appended when `--device` was given (it wins over an
    /// earlier `--set run.device`).
    pub fn with_device(&self, mut overrides: Vec<String>) -> Vec<String> {
        if let Some(device) = self.device {
            overrides.push(format!("run.device={:?}", device.name()));
        }
        overrides
    }
}

/// A `--set` item's clap parser: it must look like `section.key=value` ([`split_override`]).
pub fn parse_set(s: &str) -> std::result::Result<String, String> {
    match split_override(s) {
        Ok(_) => Ok(s.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The values of a choice, as the command line and TOML spell them: `cpu, cuda, auto`.
pub fn choice_values<T: clap::ValueEnum>() -> String {
    T::value_variants()
        .iter()
        .filter_map(|v| v.to_possible_value())
        .map(|p| p.get_name().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The configuration keys that take one of a fixed set of values, with the values: the text
/// `devise --help` and `devise train --help` end with.
pub fn choices_help() -> String {
    use crate::config::plan;
    use crate::model::gpu;
    use crate::{collective, model, optim, text};
    let rows = [
        ("run.device", choice_values::<DeviceKind>()),
        (
            "run.preempt_signal",
            choice_values::<devise_launch::signal::PreemptSignal>(),
        ),
        ("dist.backend", choice_values::<collective::Backend>()),
        ("model.encoder", choice_values::<model::Encoder>()),
        ("model.norm", choice_values::<model::Norm>()),
        ("model.precision", choice_values::<gpu::Precision>()),
        ("text.vectors_format", choice_values::<text::Format>()),
        ("text.on_unmapped", choice_values::<text::OnUnmapped>()),
        (
            "train.non_finite",
            choice_values::<crate::optim::NonFinite>(),
        ),
        (
            "train.<stage>.optimizer.algorithm",
            choice_values::<optim::Algorithm>(),
        ),
        (
            "train.<stage>.optimizer.schedule",
            choice_values::<optim::Schedule>(),
        ),
        (
            "<stage> in [train.<stage>]",
            choice_values::<plan::StageKind>(),
        ),
    ];
    let mut s = String::from(
        "Configuration choices (in TOML, as --set KEY=VALUE or as DEVISE__SECTION__KEY=VALUE):\n",
    );
    for (key, values) in rows {
        s.push_str(&format!("  {key:<36} {values}\n"));
    }
    s
}

/// The environment variables `devise` reads, for `devise --help`.
pub const ENVIRONMENT_HELP: &str = "\
Environment:
  RUST_LOG                 log filter (default info), e.g. RUST_LOG=devise=debug
  DEVISE__SECTION__KEY     overrides a configuration key (DEVISE__TRAIN__LR=0.1 sets train.lr),
                           after the TOML file, before --set; DEVISE__RUN__PREEMPT_SIGNAL is how
                           devise-launch --preempt-signal reaches its workers
  RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
                           the rank environment (devise-launch, torchrun); without it, srun's
                           SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_NTASKS, SLURM_LOCALID,
                           SLURM_NODEID, SLURM_STEP_TASKS_PER_NODE, SLURM_GTIDS,
                           SLURM_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE, SLURM_STEP_NUM_NODES,
                           SLURM_STEP_ID, SLURM_JOB_ID and the node list (SLURM_STEP_NODELIST,
                           SLURM_JOB_NODELIST, SLURM_NODELIST); else one process (LOCAL_RANK,
                           LOCAL_WORLD_SIZE or GROUP_RANK alone is an error, never rank 0 of 1)
  TORCHELASTIC_USE_AGENT_STORE, TORCHELASTIC_RUN_ID, TORCHELASTIC_RESTART_COUNT
                           under torchrun: its store's port, the run id, the restart count
  DEVISE_RUN_ID, DEVISE_RDZV_TOKEN, DEVISE_RESTART_ATTEMPT, DEVISE_HEARTBEAT_FILE
                           set by devise-launch: run id, rendezvous token, restart attempt,
                           the worker's heartbeat file
  CUDA_VISIBLE_DEVICES     the GPUs a worker picks its own from (its local rank's entry)
  NCCL_PROXY_DUMP_SIGNAL   warned about when it names the preemption signal; NCCL_* are read
                           by NCCL itself
  AWS_*, GOOGLE_*, AZURE_* object-store credentials and client options (s3://, gs://, az://)
  DEVISE_FAULT             fault injection, for tests only
";

/// The whole run configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// `[run]`
    pub run: RunSection,
    /// `[data]`
    pub data: crate::data::Config,
    /// `[labels]`
    pub labels: crate::data::split::Config,
    /// `[text]`
    pub text: crate::text::Config,
    /// `[model]`
    pub model: crate::model::Config,
    /// `[loss]`
    #[serde(default = "default_loss")]
    pub loss: crate::loss::Config,
    /// `[train]`
    pub train: crate::train::Config,
    /// `[checkpoint]`
    #[serde(default)]
    pub checkpoint: crate::checkpoint::Config,
    /// `[eval]`
    #[serde(default)]
    pub eval: crate::eval::Config,
    /// `[dist]`: data-parallel communication (ignored by single-process runs).
    #[serde(default)]
    pub dist: crate::collective::Config,
}

fn default_loss() -> crate::loss::Config {
    crate::loss::Config {
        margin: 0.1,
        stop_at_first_violation: false,
    }
}

/// Prefix of the environment variables that override configuration keys:
/// `DEVISE__TRAIN__LR=0.1` sets `train.lr` (matched case-insensitively, as the `config` crate does).
pub const ENV_PREFIX: &str = "DEVISE__";

/// Whether `key` is a plain dotted key path (`run.name`, `train.softmax.epochs`): non-empty
/// segments of ASCII letters, digits, `_` and `-`, the only keys the run configuration has.
///
/// The `config` crate also reads `data.mean[3]` as an array index and grows the array to any
/// index it is given (`[9223372036854775807]` overflows and panics; a large negative index
/// exhausts memory), so indices and every other character are refused before it sees a key.
fn is_key_path(key: &str) -> bool {
    key.split('.').all(is_key_name)
}

/// One segment of a key path: non-empty, ASCII letters, digits, `_` and `-`.
fn is_key_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Splits a `--set` item `section.key=value` at its first `=` into the key (trimmed) and the
/// value. Errors (naming the item): no `=`, or a key that is not a dotted path of ASCII names.
pub fn split_override(item: &str) -> Result<(&str, &str)> {
    let Some((key, value)) = item.split_once('=') else {
        bail!("--set {item:?}: expected section.key=value");
    };
    let key = key.trim();
    if !is_key_path(key) {
        bail!(
            "--set {item:?}: the key {key:?} is not a section.key path (ASCII letters, digits, _ and -, separated by dots)"
        );
    }
    Ok((key, value))
}

/// The `DEVISE__*` variables of `env` (see [`ENV_PREFIX`]), checked: each must have a Unicode
/// value and name a plain key path (`DEVISE__TRAIN__SOFTMAX__EPOCHS`). Errors name the variable.
fn config_env_vars(
    env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<config::Map<String, String>> {
    let prefix = ENV_PREFIX.to_lowercase();
    let mut out = config::Map::new();
    for (name, value) in env {
        // The config crate skips names that are not Unicode; so do we (they cannot be ours).
        let Ok(name) = name.into_string() else {
            continue;
        };
        let lower = name.to_lowercase();
        let Some(path) = lower.strip_prefix(&prefix) else {
            continue;
        };
        let path = path.replace("__", ".");
        if !is_key_path(&path) {
            bail!(
                "environment variable {name:?}: {path:?} is not a section.key path (DEVISE__SECTION__KEY, ASCII letters, digits and _)"
            );
        }
        let value = value.into_string().map_err(|v| {
            anyhow::anyhow!("environment variable {name}: the value {v:?} is not Unicode")
        })?;
        out.insert(name, value);
    }
    Ok(out)
}

impl RunConfig {
    /// Layers TOML text (`source` names it in errors), `DEVISE__*` environment variables and
    /// `overrides` (`section.key=value`; the value is parsed as TOML, else taken as a string).
    pub fn load(toml_text: &str, source: &str, overrides: &[String]) -> Result<RunConfig> {
        Self::load_with_env(toml_text, source, overrides, std::env::vars_os())
    }

    /// [`RunConfig::load`] with `env` in place of the process environment (only its
    /// `DEVISE__*` variables are read, see [`ENV_PREFIX`]).
    ///
    /// Errors name the source, the `--set` item or the variable: TOML that does not parse, a
    /// top-level key that is not a plain name, a `--set` item or variable whose key is not a
    /// plain `section.key` path ([`split_override`]), a variable whose value is not Unicode, an
    /// unknown key, a value of the wrong type, a value [`RunConfig::validate`] refuses.
    pub fn load_with_env(
        toml_text: &str,
        source: &str,
        overrides: &[String],
        env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<RunConfig> {
        // The config crate reads top-level TOML keys as key paths too (see `is_key_path`).
        let table: toml::Table =
            toml::from_str(toml_text).with_context(|| format!("parsing {source}"))?;
        if let Some(key) = table.keys().find(|k| !is_key_name(k)) {
            bail!("{source}: {key:?} is not a section name (ASCII letters, digits, _ and -)");
        }
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(toml_text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("DEVISE")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(config_env_vars(env)?)),
            );
        for item in overrides {
            let (key, value) = split_override(item)?;
            let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.to_string()));
            builder = builder
                .set_override(key, toml_to_config(parsed))
                .with_context(|| format!("--set {item}"))?;
        }
        let merged = builder
            .build()
            .with_context(|| format!("reading {source}"))?;
        let cfg: RunConfig = merged
            .try_deserialize()
            .map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        cfg.validate()
            .with_context(|| format!("{source}: invalid configuration"))?;
        Ok(cfg)
    }

    /// Loads a TOML file (see [`RunConfig::load`]).
    pub fn load_file(path: &str, overrides: &[String]) -> Result<RunConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading config {path}"))?;
        Self::load(&text, path, overrides)
    }

    /// Per-section checks; errors name the key.
    pub fn validate(&self) -> Result<()> {
        self.data.validate()?;
        self.model.validate()?;
        self.loss.validate()?;
        self.train.validate()?;
        self.checkpoint.validate()?;
        self.eval.validate()?;
        self.dist.validate()?;
        Ok(())
    }

    /// The resolved configuration as TOML (stored in every checkpoint and the report).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot serialise config: {e}\n"))
    }
}

/// Reads a configuration overlay (a TOML file holding some sections' keys, e.g.
/// `configs/zero-shot-21k-eval.toml`) as `section.key=value` overrides, in file order, to be
/// layered over another configuration (`devise eval --config`). Errors name the file and, for a
/// key outside any section, the key. Unknown keys are caught when the layered configuration is
/// loaded.
pub fn overlay_overrides(path: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {path}"))?;
    let table: toml::Table = toml::from_str(&text).with_context(|| format!("parsing {path}"))?;
    fn flatten(prefix: &str, table: &toml::Table, path: &str, out: &mut Vec<String>) -> Result<()> {
        for (key, value) in table {
            if !is_key_name(key) {
                bail!("{path}: key {key:?} is not a plain name (ASCII letters, digits, _ and -)");
            }
            let name = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                toml::Value::Table(inner) => flatten(&name, inner, path, out)?,
                _ if prefix.is_empty() => {
                    bail!("{path}: key '{key}' is outside any [section]")
                }
                other => out.push(format!("{name}={other}")),
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    flatten("", &table, path, &mut out)?;
    Ok(out)
}

fn toml_to_config(v: toml::Value) -> config::Value {
    match v {
        toml::Value::String(s) => s.into(),
        toml::Value::Integer(i) => i.into(),
        toml::Value::Float(f) => f.into(),
        toml::Value::Boolean(b) => b.into(),
        toml::Value::Datetime(d) => d.to_string().into(),
        toml::Value::Array(a) => a.into_iter().map(toml_to_config).collect::<Vec<_>>().into(),
        toml::Value::Table(t) => t
            .into_iter()
            .map(|(k, v)| (k, toml_to_config(v)))
            .collect::<std::collections::HashMap<_, _>>()
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `run.device` and `run.preempt_signal` are choices: TOML spells them, a wrong value is an
    /// error naming the key, and the default is `auto` / `usr1`.
    #[test]
    fn device_and_preempt_signal_are_typed_choices() {
        use devise_launch::signal::PreemptSignal;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/smoke.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let load = |set: &[&str]| {
            let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
            RunConfig::load(&text, "smoke.toml", &set)
        };
        let cfg = load(&[]).unwrap();
        assert_eq!(cfg.run.device, DeviceKind::Cpu);
        assert_eq!(cfg.run.preempt_signal, PreemptSignal::Usr1);
        let cfg = load(&["run.preempt_signal=usr2", "run.device=auto"]).unwrap();
        assert_eq!(cfg.run.preempt_signal, PreemptSignal::Usr2);
        assert_eq!(cfg.run.device, DeviceKind::Auto);
        assert!(cfg.to_toml().contains("preempt_signal = \"usr2\""));
        let cfg = load(&["run.preempt_signal=\"term\""]).unwrap();
        assert_eq!(cfg.run.preempt_signal, PreemptSignal::Term);
        for (set, key) in [
            ("run.preempt_signal=SIGUSR2", "preempt_signal"),
            ("run.preempt_signal=hup", "preempt_signal"),
            ("run.device=gpu", "device"),
        ] {
            let e = format!("{:#}", load(&[set]).unwrap_err());
            assert!(e.contains(key), "{set}: {e}");
        }
    }

    /// Every choice is written (serde) as the command line spells it (clap), and read back.
    #[test]
    fn every_choice_is_spelt_the_same_in_files_and_on_the_command_line() {
        fn check<T>()
        where
            T: clap::ValueEnum
                + Serialize
                + serde::de::DeserializeOwned
                + PartialEq
                + std::fmt::Debug,
        {
            for v in T::value_variants() {
                let name = v.to_possible_value().unwrap().get_name().to_string();
                assert_eq!(serde_json::to_value(v).unwrap(), serde_json::json!(name));
                let back: T = serde_json::from_value(serde_json::json!(name)).unwrap();
                assert_eq!(&back, v);
            }
            let err = serde_json::from_value::<T>(serde_json::json!("nonesuch")).unwrap_err();
            assert!(err.to_string().contains(&choice_values::<T>()), "{err}");
        }
        check::<DeviceKind>();
        check::<crate::collective::Backend>();
        check::<crate::model::StageKind>();
        check::<crate::model::Encoder>();
        check::<crate::model::Norm>();
        check::<crate::model::gpu::Precision>();
        check::<crate::text::Format>();
        check::<crate::text::OnUnmapped>();
        check::<crate::optim::NonFinite>();
        check::<crate::optim::Algorithm>();
        check::<crate::optim::Schedule>();
        check::<devise_launch::signal::PreemptSignal>();
        // The names `Display` and `name()` give are the same.
        assert_eq!(DeviceKind::Cuda.to_string(), "cuda");
        assert_eq!(crate::collective::Backend::Nccl.to_string(), "nccl");
        assert_eq!(crate::model::StageKind::Finetune.to_string(), "finetune");
        assert_eq!(crate::text::Format::Word2vecText.name(), "word2vec-text");
    }

    #[test]
    fn an_overlay_becomes_overrides_and_names_a_stray_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.toml");
        std::fs::write(
            &path,
            "[eval]\nhierarchy = \"h.txt\"\nbatch_size = 64\n[train.softmax]\nepochs = 1.5\n\
             [data]\nmean = [0.5, 0.5, 0.5]\n",
        )
        .unwrap();
        let got = overlay_overrides(path.to_str().unwrap()).unwrap();
        assert_eq!(
            got,
            [
                "data.mean=[0.5, 0.5, 0.5]",
                "eval.batch_size=64",
                "eval.hierarchy=\"h.txt\"",
                "train.softmax.epochs=1.5",
            ]
        );
        std::fs::write(&path, "hierarchy = \"h.txt\"\n").unwrap();
        let err = format!(
            "{:#}",
            overlay_overrides(path.to_str().unwrap()).unwrap_err()
        );
        assert!(
            err.contains("o.toml") && err.contains("'hierarchy'"),
            "{err}"
        );
    }
}
