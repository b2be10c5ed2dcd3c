//! Label embeddings from word vectors (paper appendix A.2).
//!
//! DeViSE's training target for an image of synset `s` is a fixed `label_embedding`: the unit
//! word vector of `s`'s first term that the vocabulary knows. This module turns
//!
//! - a word-vector file ([`vectors`]: word2vec binary / text, GloVe, fastText `.vec`), and
//! - a `words.txt`-format names file (`wnid TAB name, name, ...`)
//!
//! into one `[dim]` unit vector per requested wnid ([`labels`]), plus a report of how each label
//! mapped, which did not, and which share a vector. [`load_label_embeddings`] is the one entry
//! point the trainer calls; it reads only the words the requested labels can need.
//!
//! A model's training labels and their vectors are kept with each checkpoint in one file whose
//! format [`label_embedding`] defines (matrix, wnids, how it was made), so evaluation ranks them
//! with the vectors the model was trained against.

pub mod hierarchy;
pub mod label_embedding;
pub mod labels;
pub mod vectors;

use std::collections::HashSet;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use label_embedding::{EmbedderKind, LabelEmbeddingMatrix, Normalisation, Provenance};
pub use labels::{LabelEmbeddings, LabelEntry, Mapping, MatchKind};
pub use vectors::{Format, ReadReport, WordVectors};

/// Where the label embeddings come from (the `[text]` table of a run config).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Path (or file:// URL) of the word-vector file.
    pub vectors: String,
    /// Vector file format; `auto` detects and logs the choice.
    #[serde(default)]
    pub vectors_format: vectors::Format,
    /// words.txt-format file: `wnid TAB comma-separated names` (ImageNet's words.txt; also the
    /// synthetic dataset's names.tsv). Lines starting with '#' are comments.
    pub names: String,
    /// What to do with a label none of whose names maps to a vector: `skip` (report by name, leave
    /// it out of the DeViSE stages) or `error`.
    #[serde(default)]
    pub on_unmapped: OnUnmapped,
}

/// Policy for a label none of whose names maps to a word vector. Serialized `"skip"` / `"error"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnUnmapped {
    /// Warn naming the label (wnid and names) and leave it unmapped; the caller leaves it out of
    /// the DeViSE stages.
    #[default]
    Skip,
    /// Fail, listing every unmapped label.
    Error,
}

deserialize_by_name!(OnUnmapped);

/// Reads the names file and the word vectors (keeping only the [`labels::candidate_words`] of
/// the requested labels' names), maps each wnid (paper A.2, see [`labels`]) and L2-normalises.
///
/// Returns one entry per `wnids` element, in order, each with a unit `[dim]` vector or `None`,
/// and the vector file's [`ReadReport`]. Errors: unreadable / malformed names or vector file
/// (messages name the file and line), a wnid not in the names file (naming both), a wnid listed
/// twice, and, with [`OnUnmapped::Error`], any unmapped label.
pub fn load_label_embeddings(cfg: &Config, wnids: &[String]) -> Result<LabelEmbeddings> {
    let wanted: HashSet<&str> = wnids.iter().map(String::as_str).collect();
    let names = labels::read_names_of(&cfg.names, &wanted)?;
    let mut keep = HashSet::new();
    for wnid in wnids {
        let Some(label_names) = names.get(wnid) else {
            bail!("wnid {wnid} is not in the names file {}", cfg.names);
        };
        for name in label_names {
            keep.extend(labels::candidate_words(name));
        }
    }
    let (vectors, report) =
        vectors::read_vectors_file(&cfg.vectors, cfg.vectors_format, Some(&keep))?;
    let mut embeddings = labels::map_labels(wnids, &names, &vectors, cfg.on_unmapped)
        .with_context(|| {
            format!(
                "mapping labels of {} to vectors of {}",
                cfg.names, cfg.vectors
            )
        })?;
    embeddings.vectors_report = report;
    Ok(embeddings)
}

/// How label embeddings made from `cfg` are described in a [`label_embedding`] file: embedder
/// [`EmbedderKind::WordVectors`], [`Normalisation::L2`], params `vectors` and `names` (as
/// configured), `vectors_format` (the format `report` says was read) and `label_mapping`
/// ([`labels::MAPPING_RULE`]).
pub fn provenance(cfg: &Config, report: &ReadReport) -> Provenance {
    Provenance {
        embedder: EmbedderKind::WordVectors,
        normalisation: Normalisation::L2,
        params: [
            ("vectors", cfg.vectors.clone()),
            ("vectors_format", report.format.name().to_string()),
            ("names", cfg.names.clone()),
            ("label_mapping", labels::MAPPING_RULE.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    }
}
