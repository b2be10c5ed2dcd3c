//! What the loop reports as it goes: a metrics line (and a log line) per window of steps, and
//! each evaluation (logged, `eval/<stage>.json`, `eval/...` metrics), in `metrics.jsonl`.
use crate::config::plan::StageKind;
use crate::data::cache::CacheCounts;
use crate::eval::StageEval;
use crate::storage::Store;
use anyhow::{Context, Result};
use std::time::Duration;

/// Running totals between two metric lines.
#[derive(Default)]
pub(crate) struct Window {
    loss_sum: f64,
    steps: u64,
    /// Steps whose update was skipped (non-finite): not in `loss_sum`.
    skipped: u64,
    images: u64,
    data_wait: Duration,
    comm: Duration,
    elapsed: Duration,
    /// Store bytes and shard cache counters at the previous line (reported per window).
    last_data: (u64, CacheCounts),
}

impl Window {
    /// `loss` None: the step's update was skipped.
    pub(crate) fn add(
        &mut self,
        loss: Option<f64>,
        images: usize,
        data_wait: Duration,
        comm: Duration,
        elapsed: Duration,
    ) {
        self.comm += comm;
        match loss {
            Some(l) => self.loss_sum += l,
            None => self.skipped += 1,
        }
        self.steps += 1;
        self.images += images as u64;
        self.data_wait += data_wait;
        self.elapsed += elapsed;
    }

    pub(crate) fn take(
        &mut self,
        step: u64,
        kind: StageKind,
        lr: f64,
        stats: &crate::data::reader::DataStats,
        world_size: usize,
    ) -> serde_json::Value {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let line = serde_json::json!({
            "step": step,
            "stage": kind.name(),
            // Mean over the window's applied steps (null when every one was skipped).
            "train/loss": self.loss_sum / (self.steps - self.skipped) as f64,
            "train/skipped_steps": self.skipped,
            "train/lr": lr,
            // This rank's images, and all ranks' (every rank's batch is the same size).
            "throughput/images_per_sec": self.images as f64 / secs,
            "throughput/global_images_per_sec": (self.images * world_size as u64) as f64 / secs,
            "time/step_ms": 1000.0 * secs / self.steps.max(1) as f64,
            "time/data_wait_pct": 100.0 * self.data_wait.as_secs_f64() / secs,
            "time/allreduce_pct": 100.0 * self.comm.as_secs_f64() / secs,
            "data/decode_errors": stats.decode_errors,
            "data/shard_errors": stats.shard_errors,
            "data/buffered_mb": stats.buffered_bytes as f64 / 1e6,
            "data/peak_buffered_mb": stats.peak_buffered_bytes as f64 / 1e6,
            // Shard bytes this rank downloaded since the stream started (prefetch included).
            "data/shard_mb": stats.shard_bytes as f64 / 1e6,
        });
        // Per window: shard bytes from the store and the shard cache's work (data.cache_dir).
        let ((last_bytes, last), now) = (self.last_data, stats.cache);
        let mut line = line;
        for (key, n) in [
            (
                "data/store_mb",
                stats.shard_bytes.saturating_sub(last_bytes),
            ),
            (
                "data/cache/disk_mb",
                now.disk_bytes.saturating_sub(last.disk_bytes),
            ),
        ] {
            line[key] = (n as f64 / 1e6).into();
        }
        for (key, n, before) in [
            ("data/cache/hits", now.hits, last.hits),
            ("data/cache/misses", now.misses, last.misses),
            ("data/cache/bypassed", now.bypassed, last.bypassed),
            ("data/cache/evictions", now.evictions, last.evictions),
        ] {
            line[key] = n.saturating_sub(before).into();
        }
        for (reason, n) in stats.skipped_by_reason() {
            line[format!("data/skipped_samples/{reason}")] = n.into();
        }
        *self = Window {
            last_data: (stats.shard_bytes, stats.cache),
            ..Window::default()
        };
        line
    }
}

fn window_line(v: &serde_json::Value) -> String {
    format!(
        "step {:>6} {:<8} loss {:.4} lr {:.2e} {:.0} img/s (all ranks) data wait {:.0}% all-reduce {:.0}%",
        v["step"],
        v["stage"].as_str().unwrap_or(""),
        v["train/loss"].as_f64().unwrap_or(f64::NAN),
        v["train/lr"].as_f64().unwrap_or(f64::NAN),
        v["throughput/global_images_per_sec"].as_f64().unwrap_or(0.0),
        v["time/data_wait_pct"].as_f64().unwrap_or(0.0),
        v["time/allreduce_pct"].as_f64().unwrap_or(0.0)
    )
}

fn eval_line(e: &StageEval) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("step".into(), e.step.into());
    m.insert("stage".into(), e.stage.name().into());
    for (row, hits) in &e.rows {
        for (k, v) in &hits.hit_at_k {
            m.insert(format!("eval/{row}/hit_at_{k}"), (*v).into());
        }
    }
    serde_json::Value::Object(m)
}

fn log_eval(e: &StageEval) {
    for (row, hits) in &e.rows {
        let ks: Vec<String> = hits
            .hit_at_k
            .iter()
            .map(|(k, v)| format!("@{k} {:.3}", v))
            .collect();
        tracing::info!(
            "eval after {} (step {}): {row} ({} images, {} candidates) hit{}",
            e.stage,
            e.step,
            hits.images,
            hits.candidates,
            ks.join(" ")
        );
    }
}

/// `metrics.jsonl` in the run directory: one JSON object per line. On resume, lines past the
/// checkpoint's step are dropped, so the file reads as one uninterrupted run.
pub(crate) struct Metrics<'a> {
    run: &'a Store,
    /// Every line so far (the report's last training loss comes from them).
    pub(crate) lines: Vec<serde_json::Value>,
    enabled: bool,
    /// Local run directories append to the file (O(1) per line); object stores rewrite it.
    append: Option<std::fs::File>,
}

impl<'a> Metrics<'a> {
    pub(crate) fn open(run: &'a Store, resumed_step: u64, enabled: bool) -> Result<Self> {
        let mut lines = Vec::new();
        if enabled && run.exists("metrics.jsonl")? {
            let text = run.get("metrics.jsonl")?;
            for (i, line) in String::from_utf8_lossy(&text).lines().enumerate() {
                let v: serde_json::Value = serde_json::from_str(line).with_context(|| {
                    format!("{} line {}", run.child_url("metrics.jsonl"), i + 1)
                })?;
                if v["step"].as_u64().is_some_and(|s| s <= resumed_step) {
                    lines.push(v);
                }
            }
        }
        let mut metrics = Metrics {
            run,
            lines,
            enabled,
            append: None,
        };
        if enabled {
            metrics.rewrite()?;
            if let Some(dir) = run.local_path() {
                let path = dir.join("metrics.jsonl");
                let file = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening {} for appending", path.display()))?;
                metrics.append = Some(file);
            }
        }
        Ok(metrics)
    }

    /// Writes a window's metrics line; rank 0 also logs it.
    pub(crate) fn log(&mut self, line: serde_json::Value) -> Result<()> {
        if self.enabled {
            tracing::info!("{}", window_line(&line));
        }
        self.write(&line)
    }

    /// Logs an evaluation; rank 0 writes it to `eval/<stage>.json` and `metrics.jsonl`. It
    /// replaces the stage's earlier one in `evals`.
    pub(crate) fn record_eval(
        &mut self,
        result: StageEval,
        evals: &mut Vec<StageEval>,
    ) -> Result<()> {
        if self.enabled {
            log_eval(&result);
            self.run.put(
                &format!("eval/{}.json", result.stage),
                serde_json::to_vec_pretty(&result)?.into(),
            )?;
            self.write(&eval_line(&result))?;
        }
        evals.retain(|e| e.stage != result.stage);
        evals.push(result);
        Ok(())
    }

    fn rewrite(&self) -> Result<()> {
        let mut text = String::new();
        for l in &self.lines {
            text.push_str(&l.to_string());
            text.push('\n');
        }
        self.run.put("metrics.jsonl", text.into_bytes().into())
    }

    fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        self.lines.push(line.clone());
        match &mut self.append {
            Some(file) => {
                use std::io::Write;
                writeln!(file, "{line}").with_context(|| self.run.child_url("metrics.jsonl"))
            }
            None => self.rewrite(),
        }
    }
}

/// The evaluations of an earlier session of this run (`eval/<stage>.json`).
pub(crate) fn read_evals(run: &Store) -> Result<Vec<StageEval>> {
    let mut out = Vec::new();
    for kind in [StageKind::Softmax, StageKind::Devise, StageKind::Finetune] {
        let name = format!("eval/{}.json", kind.name());
        if run.exists(&name)? {
            let bytes = run.get(&name)?;
            out.push(serde_json::from_slice(&bytes).with_context(|| run.child_url(&name))?);
        }
    }
    Ok(out)
}
