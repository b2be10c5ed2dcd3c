//! Label-matrix benchmark: the ImageNet label embedding matrix from a word-vector file.
//!
//! Purpose: time and peak memory of what the trainer does to get its label vectors
//! ([`devise::text::load_label_embeddings`], as `plan.rs` and `predict.rs` call it: read the
//! names file, stream the vector file keeping only the words the labels can need, map each wnid
//! to the unit vector of its first name that maps), then [`LabelEmbeddings::matrix`] over the
//! mapped wnids (`eval::predict::candidates` does exactly this, with `on_unmapped = skip`).
//! `bench/label_matrix.sh` runs it side by side with gensim (`bench/label_matrix_gensim.py`,
//! same task, same JSON line).
//!
//! Usage: `label_matrix_bench VECTORS FORMAT NAMES WNIDS [OUT]`
//! - `FORMAT`: `auto`, `word2vec-binary`, `word2vec-text`, `glove`, `fasttext`;
//! - `NAMES`: words.txt-format file (`wnid TAB name, name`);
//! - `WNIDS`: one wnid per line (blank lines skipped), e.g. ImageNet's `imagenet.synset.txt`;
//! - `OUT`: when given, the matrix is written to `OUT` as raw little-endian f32, row-major
//!   `[mapped, dim]`, and the mapped wnids, one a line, to `OUT.wnids` (after the timing).
//!
//! Prints one JSON line: `{"impl":"devise","vectors":..,"format":..,"wnids":..,"mapped":..,
//! "unmapped":..,"dim":..,"rows_read":..,"seconds":..,"cpu_seconds":..,"rss_before_bytes":..,
//! "peak_rss_bytes":..}`. `seconds` is wall-clock from before reading the wnid list to the
//! finished matrix (process start-up, i.e. loading libtorch, is not included); `cpu_seconds` is
//! the user + system CPU time over the same span (steadier on a shared machine);
//! `peak_rss_bytes` is `VmHWM` of /proc/self/status at the end (the whole process: it includes
//! the libtorch-linked binary's own pages; `rss_before_bytes` is `VmRSS` before the work
//! starts). No tracing subscriber is installed, so the per-label warnings are not printed (set
//! `RUST_LOG` to see them).
use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use devise::text::{load_label_embeddings, Config, Format, OnUnmapped};

/// A `kB` field of /proc/self/status (`VmHWM`, `VmRSS`) in bytes.
fn proc_status_bytes(field: &str) -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    let kib: u64 = line[field.len()..]
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("bad line {line:?}"))?;
    Ok(kib * 1024)
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn main() -> Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [vectors, format, names, wnid_file, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: label_matrix_bench VECTORS FORMAT NAMES WNIDS [OUT]");
    };
    let format: Format = serde_json::from_value(serde_json::Value::String(format.clone()))
        .with_context(|| format!("unknown format {format:?}"))?;
    let rss_before = proc_status_bytes("VmRSS")?;

    let started = Instant::now();
    let cpu_started = cpu_seconds();
    let wnids: Vec<String> = std::fs::read_to_string(wnid_file)
        .with_context(|| format!("reading {wnid_file}"))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    let cfg = Config {
        vectors: vectors.clone(),
        vectors_format: format,
        names: names.clone(),
        on_unmapped: OnUnmapped::Skip,
    };
    let emb = load_label_embeddings(&cfg, &wnids)?;
    let kept: Vec<String> = emb
        .entries
        .iter()
        .filter(|e| e.mapping.is_some())
        .map(|e| e.wnid.clone())
        .collect();
    let matrix = emb.matrix(&kept)?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_started;
    let peak = proc_status_bytes("VmHWM")?;

    if let Some(out) = rest.first() {
        let mut bytes = Vec::with_capacity(matrix.len() * 4);
        for x in &matrix {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        std::fs::write(out, bytes).with_context(|| format!("writing {out}"))?;
        let mut list = std::fs::File::create(format!("{out}.wnids"))?;
        for w in &kept {
            writeln!(list, "{w}")?;
        }
    }
    let line = serde_json::json!({
        "impl": "devise",
        "vectors": vectors,
        "format": emb.vectors_report.format.name(),
        "wnids": wnids.len(),
        "mapped": kept.len(),
        "unmapped": wnids.len() - kept.len(),
        "dim": emb.dim,
        "rows_read": emb.vectors_report.rows_read,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
    });
    println!("{line}");
    Ok(())
}
