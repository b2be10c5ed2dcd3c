//! `train.trace_samples`: which samples each step trained on, for tests and debugging of the
//! sample order.
use crate::config::plan::StageKind;
use crate::storage::Store;
use anyhow::{bail, Context, Result};

/// `train.trace_samples`: this rank's sample ids per step, one JSON line each, appended to
/// `run.dir/trace/rank-<R>.jsonl` (a resumed run appends after the checkpoint's step; lines
/// past it from the interrupted session stay: readers keep the last line per step).
pub(crate) struct SampleTrace {
    file: Option<std::fs::File>,
}

impl SampleTrace {
    pub(crate) fn open(run: &Store, enabled: bool, rank: usize) -> Result<Self> {
        if !enabled {
            return Ok(SampleTrace { file: None });
        }
        let Some(dir) = run.local_path() else {
            bail!(
                "train.trace_samples needs a local run.dir, got {}",
                run.url()
            );
        };
        let dir = dir.join("trace");
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        let path = dir.join(format!("rank-{rank}.jsonl"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| path.display().to_string())?;
        Ok(SampleTrace { file: Some(file) })
    }

    fn write(&mut self, line: serde_json::Value) -> Result<()> {
        if let Some(f) = &mut self.file {
            use std::io::Write;
            writeln!(f, "{line}").context("writing the sample trace")?;
        }
        Ok(())
    }

    /// An image batch: its samples' global positions in the training stream, and their keys.
    pub(crate) fn positions(
        &mut self,
        step: u64,
        kind: StageKind,
        positions: &[u64],
        keys: &[String],
    ) -> Result<()> {
        if self.file.is_none() {
            return Ok(());
        }
        self.write(
            serde_json::json!({"step": step, "stage": kind.name(), "slots": positions, "keys": keys}),
        )
    }

    pub(crate) fn rows(&mut self, step: u64, kind: StageKind, rows: &[i64]) -> Result<()> {
        if self.file.is_none() {
            return Ok(());
        }
        self.write(serde_json::json!({"step": step, "stage": kind.name(), "rows": rows}))
    }
}
