//! The label-embedding file: the `[labels, dim]` matrix of unit label vectors a model was trained
//! against, with the wnids of its rows and how it was made, in one
//! [safetensors](https://github.com/huggingface/safetensors) file. Checkpoints carry one
//! ([`FILE_NAME`] in the step directory, listed in its manifest); `devise eval` and `devise
//! predict` rank the training labels with it, whatever the vector file holds today.
//!
//! # Layout (format version 1)
//!
//! One tensor, [`TENSOR`] = `label_embedding`: dtype `F32`, shape `[labels, dim]` (`labels >= 1`,
//! `dim >= 1`), row-major, row `i` the label vector of `wnids[i]`, every value finite. With
//! [`Normalisation::L2`] every row has unit L2 norm.
//!
//! The safetensors `__metadata__` (string keys, string values):
//!
//! | key | value |
//! |---|---|
//! | `format` | `devise.label_embedding` ([`FORMAT`]) |
//! | `format_version` | `1` ([`FORMAT_VERSION`]); a reader refuses any other |
//! | `wnids` | JSON array of the rows' labels, in row order, distinct and non-empty |
//! | `dim` | the second dimension, decimal (checked against the tensor's shape) |
//! | `embedder` | how the rows were made: an [`EmbedderKind`] (`word-vectors`) |
//! | `normalisation` | a [`Normalisation`] (`l2`) |
//! | `embedder.<key>` | free key/values describing the embedder's inputs ([`Provenance::params`]) |
//!
//! For [`EmbedderKind::WordVectors`] (paper appendix A.2, [`super::labels`]) the params are
//! `vectors` (the vector file's path or URL as configured), `vectors_format` (the format it was
//! read as), `names` (the `words.txt`-format names file) and `label_mapping` (the rule that
//! turns a label's names into one vector, [`super::labels::MAPPING_RULE`]).
//!
//! Other tensors and other metadata keys are rejected: a later version that needs them raises
//! `format_version`.
use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// File name of the label-embedding file inside a checkpoint's step directory.
pub const FILE_NAME: &str = "label_embedding.safetensors";
/// Name of the one tensor in the file.
pub const TENSOR: &str = "label_embedding";
/// Value of the `format` metadata key.
pub const FORMAT: &str = "devise.label_embedding";
/// The format version this module writes and reads (`format_version` metadata key).
pub const FORMAT_VERSION: u32 = 1;
/// Prefix of the free `embedder.<key>` metadata keys.
const PARAM_PREFIX: &str = "embedder.";

/// Two unit label vectors closer than this (L2 distance, after both were L2-normalised) count
/// as the same. A vector file re-saved as text with 6 significant digits moves a 300-d unit
/// vector by about 1e-6; any real change of the vectors moves it by far more than 1e-4.
pub const SAME_VECTOR_TOLERANCE: f32 = 1e-4;

/// What turned labels into vectors. Serialized in kebab-case (`"word-vectors"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EmbedderKind {
    /// A word-vector file and a names file (paper appendix A.2, [`super::labels`]).
    WordVectors,
}

/// How each row was normalised. Serialized in kebab-case (`"l2"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Normalisation {
    /// Divided by its L2 norm (computed in f64): every row is a unit vector.
    L2,
}

/// How a label-embedding matrix was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    /// The embedder.
    pub embedder: EmbedderKind,
    /// The rows' normalisation.
    pub normalisation: Normalisation,
    /// The embedder's inputs and settings (stored as `embedder.<key>` metadata), e.g. `vectors`,
    /// `vectors_format`, `names`, `label_mapping` for [`EmbedderKind::WordVectors`].
    pub params: BTreeMap<String, String>,
}

/// A label-embedding matrix with its row labels and provenance (module docs: the file layout).
#[derive(Debug, Clone, PartialEq)]
pub struct LabelEmbeddingMatrix {
    /// The rows' labels, in row order, distinct.
    pub wnids: Vec<String>,
    /// Vector dimension.
    pub dim: usize,
    /// Row-major `[wnids.len(), dim]` values.
    pub values: Vec<f32>,
    /// How the rows were made.
    pub made_by: Provenance,
}

/// How a matrix's rows compare with another source's vectors for the same labels
/// ([`LabelEmbeddingMatrix::drift`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Drift {
    /// Labels compared (the matrix's rows).
    pub compared: usize,
    /// Labels whose vectors differ by more than the tolerance, in row order.
    pub differing: Vec<String>,
    /// Labels the other source has no vector for, in row order.
    pub missing: Vec<String>,
    /// Largest L2 distance between a row and the other source's unit vector, over the labels
    /// both have (0 when none).
    pub max_distance: f32,
    /// The tolerance used.
    pub tolerance: f32,
}

impl Drift {
    /// True when every label is present and within the tolerance.
    pub fn is_same(&self) -> bool {
        self.differing.is_empty() && self.missing.is_empty()
    }

    /// One phrase for messages, e.g. `the vectors of 3 of 4 training labels differ (largest L2
    /// distance between the unit vectors 0.4121, tolerance 0.0001): n01, n02, n03; 1 has no
    /// vector: n04` (at most 5 wnids listed per group).
    pub fn describe(&self) -> String {
        fn list(wnids: &[String]) -> String {
            let mut s = wnids.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
            if wnids.len() > 5 {
                s.push_str(&format!(", ... ({} more)", wnids.len() - 5));
            }
            s
        }
        let mut s = format!(
            "the vectors of {} of {} training labels differ (largest L2 distance between the unit \
             vectors {:.4}, tolerance {})",
            self.differing.len(),
            self.compared,
            self.max_distance,
            self.tolerance
        );
        if !self.differing.is_empty() {
            s.push_str(&format!(": {}", list(&self.differing)));
        }
        if !self.missing.is_empty() {
            s.push_str(&format!(
                "; {} {} no vector: {}",
                self.missing.len(),
                if self.missing.len() == 1 {
                    "has"
                } else {
                    "have"
                },
                list(&self.missing)
            ));
        }
        s
    }
}

impl LabelEmbeddingMatrix {
    /// A checked matrix. Errors: no rows, `dim == 0`, `values.len() != wnids.len() * dim`, an
    /// empty or repeated wnid, a non-finite value (each naming the row's wnid).
    pub fn new(
        wnids: Vec<String>,
        dim: usize,
        values: Vec<f32>,
        made_by: Provenance,
    ) -> Result<Self> {
        let m = LabelEmbeddingMatrix {
            wnids,
            dim,
            values,
            made_by,
        };
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<()> {
        if self.wnids.is_empty() {
            bail!("label embedding: no labels");
        }
        if self.dim == 0 {
            bail!("label embedding: dimension 0");
        }
        if Some(self.values.len()) != self.wnids.len().checked_mul(self.dim) {
            bail!(
                "label embedding: {} values for {} labels of dimension {}",
                self.values.len(),
                self.wnids.len(),
                self.dim
            );
        }
        let mut seen = HashSet::new();
        for (wnid, row) in self.wnids.iter().zip(self.values.chunks_exact(self.dim)) {
            if wnid.is_empty() {
                bail!("label embedding: an empty wnid");
            }
            if !seen.insert(wnid.as_str()) {
                bail!("label embedding: wnid {wnid} listed twice");
            }
            if !row.iter().all(|x| x.is_finite()) {
                bail!("label embedding: the vector of {wnid} is not finite");
            }
        }
        Ok(())
    }

    /// Number of labels (rows).
    pub fn len(&self) -> usize {
        self.wnids.len()
    }

    /// True when there are no rows (never for a checked matrix).
    pub fn is_empty(&self) -> bool {
        self.wnids.is_empty()
    }

    /// The `[dim]` row of `wnid`, if it is a row.
    pub fn row(&self, wnid: &str) -> Option<&[f32]> {
        let i = self.wnids.iter().position(|w| w == wnid)?;
        self.values.get(i * self.dim..(i + 1) * self.dim)
    }

    /// The matrix as a CPU tensor `[labels, dim]` f32.
    pub fn tensor(&self) -> tch::Tensor {
        tch::Tensor::from_slice(&self.values).view([self.wnids.len() as i64, self.dim as i64])
    }

    /// Compares each row with `current(wnid)` after L2-normalising both (in f64; a zero or
    /// non-finite current vector counts as missing): rows farther apart than `tolerance` (L2
    /// distance of the unit vectors; [`SAME_VECTOR_TOLERANCE`] is the usual choice) differ.
    /// A current vector of another dimension than the matrix's counts as differing.
    pub fn drift<'a>(&self, current: impl Fn(&str) -> Option<&'a [f32]>, tolerance: f32) -> Drift {
        let mut drift = Drift {
            compared: self.wnids.len(),
            differing: Vec::new(),
            missing: Vec::new(),
            max_distance: 0.0,
            tolerance,
        };
        for (wnid, row) in self.wnids.iter().zip(self.values.chunks_exact(self.dim)) {
            let Some(now) = current(wnid).and_then(unit) else {
                drift.missing.push(wnid.clone());
                continue;
            };
            if now.len() != row.len() {
                drift.differing.push(wnid.clone());
                continue;
            }
            let Some(then) = unit(row) else {
                drift.differing.push(wnid.clone());
                continue;
            };
            let distance = then
                .iter()
                .zip(&now)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt() as f32;
            drift.max_distance = drift.max_distance.max(distance);
            if distance > tolerance {
                drift.differing.push(wnid.clone());
            }
        }
        drift
    }

    /// Serialises to the file format (module docs). Errors: the checks of [`Self::new`].
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        self.check()?;
        let mut metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("format_version".to_string(), FORMAT_VERSION.to_string()),
            ("wnids".to_string(), serde_json::to_string(&self.wnids)?),
            ("dim".to_string(), self.dim.to_string()),
            ("embedder".to_string(), enum_name(&self.made_by.embedder)?),
            (
                "normalisation".to_string(),
                enum_name(&self.made_by.normalisation)?,
            ),
        ]);
        for (key, value) in &self.made_by.params {
            if key.is_empty() {
                bail!("label embedding: an empty embedder parameter name");
            }
            metadata.insert(format!("{PARAM_PREFIX}{key}"), value.clone());
        }
        let data: Vec<u8> = self.values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![self.wnids.len(), self.dim],
            &data,
        )?;
        Ok(safetensors::serialize([(TENSOR, view)], Some(metadata))?)
    }

    /// Parses the file format (module docs); `source` names the file in errors.
    ///
    /// Errors (each naming `source`): not a safetensors file; no metadata; a `format` other than
    /// [`FORMAT`] or a `format_version` other than [`FORMAT_VERSION`]; a missing, non-JSON or
    /// repeated-entry `wnids` list; a `dim`, `embedder` or `normalisation` that does not parse;
    /// an unknown metadata key; no `label_embedding` tensor, or another tensor besides it; a
    /// dtype other than F32; a shape other than `[wnids, dim]`; a non-finite value.
    pub fn from_safetensors(bytes: &[u8], source: &str) -> Result<Self> {
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .with_context(|| format!("{source}: not a valid safetensors file"))?;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .with_context(|| format!("{source}: not a valid safetensors file"))?;
        let Some(meta) = header.metadata() else {
            bail!("{source}: no metadata (not a label-embedding file)");
        };
        let get = |key: &str| {
            meta.get(key)
                .map(String::as_str)
                .with_context(|| format!("{source}: metadata has no '{key}'"))
        };
        let format = get("format")?;
        if format != FORMAT {
            bail!("{source}: metadata 'format' is {format:?}, expected {FORMAT:?}");
        }
        let version = get("format_version")?;
        if version != FORMAT_VERSION.to_string() {
            bail!(
                "{source}: format_version {version:?}, this program reads version {FORMAT_VERSION}"
            );
        }
        let wnids: Vec<String> = serde_json::from_str(get("wnids")?).with_context(|| {
            format!("{source}: metadata 'wnids' is not a JSON array of strings")
        })?;
        let dim: usize = get("dim")?
            .parse()
            .with_context(|| format!("{source}: metadata 'dim' is not a number"))?;
        let embedder: EmbedderKind = parse_enum(get("embedder")?)
            .with_context(|| format!("{source}: metadata 'embedder'"))?;
        let normalisation: Normalisation = parse_enum(get("normalisation")?)
            .with_context(|| format!("{source}: metadata 'normalisation'"))?;
        let mut params = BTreeMap::new();
        for (key, value) in meta {
            if let Some(param) = key.strip_prefix(PARAM_PREFIX) {
                params.insert(param.to_string(), value.clone());
            } else if ![
                "format",
                "format_version",
                "wnids",
                "dim",
                "embedder",
                "normalisation",
            ]
            .contains(&key.as_str())
            {
                bail!("{source}: unknown metadata key '{key}'");
            }
        }
        let names = st.names();
        if let Some(other) = names.iter().find(|&&n| n != TENSOR) {
            bail!("{source}: unexpected tensor '{other}' (only '{TENSOR}' belongs here)");
        }
        let view = st
            .tensor(TENSOR)
            .with_context(|| format!("{source}: no tensor '{TENSOR}'"))?;
        if view.dtype() != safetensors::Dtype::F32 {
            bail!(
                "{source}: tensor '{TENSOR}' has dtype {:?}, expected F32",
                view.dtype()
            );
        }
        if view.shape() != [wnids.len(), dim] {
            bail!(
                "{source}: tensor '{TENSOR}' has shape {:?}, but the metadata lists {} wnids of dimension {dim}",
                view.shape(),
                wnids.len()
            );
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        LabelEmbeddingMatrix::new(
            wnids,
            dim,
            values,
            Provenance {
                embedder,
                normalisation,
                params,
            },
        )
        .with_context(|| source.to_string())
    }
}

/// The L2-normalised copy of `v` in f64; `None` for a zero or non-finite vector.
fn unit(v: &[f32]) -> Option<Vec<f64>> {
    let norm = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    (norm.is_finite() && norm > 0.0).then(|| v.iter().map(|&x| f64::from(x) / norm).collect())
}

/// The serde (kebab-case) name of a unit enum variant.
fn enum_name<T: Serialize>(value: &T) -> Result<String> {
    match serde_json::to_value(value)? {
        serde_json::Value::String(s) => Ok(s),
        other => bail!("not a unit enum: {other}"),
    }
}

fn parse_enum<T: serde::de::DeserializeOwned>(name: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .map_err(|e| anyhow::anyhow!("{name:?}: {e}"))
}

/// The error for a word-vector file whose dimension is not the checkpoint's: `vectors` (the
/// file), `vectors_dim`, `checkpoint` (its URL) and `checkpoint_dim` are named. `Ok` when the
/// dimensions agree.
pub fn check_dim(
    vectors: &str,
    vectors_dim: usize,
    checkpoint: &str,
    checkpoint_dim: usize,
) -> Result<()> {
    if vectors_dim != checkpoint_dim {
        bail!(
            "the word-vector file {vectors} has dimension {vectors_dim}, but the checkpoint \
             {checkpoint} was trained with vectors of dimension {checkpoint_dim}: use the vector \
             file it was trained with (text.vectors in its config.toml)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provenance() -> Provenance {
        Provenance {
            embedder: EmbedderKind::WordVectors,
            normalisation: Normalisation::L2,
            params: BTreeMap::from([
                ("vectors".to_string(), "v/wiki-300d.bin".to_string()),
                ("vectors_format".to_string(), "word2vec-binary".to_string()),
            ]),
        }
    }

    fn sample() -> LabelEmbeddingMatrix {
        let s = 0.5f32.sqrt();
        LabelEmbeddingMatrix::new(
            vec!["n01".into(), "n02".into(), "n03".into()],
            2,
            vec![1.0, 0.0, 0.0, 1.0, s, s],
            provenance(),
        )
        .unwrap()
    }

    /// A hand-made file: `tensors` `(name, dtype, shape, bytes)` with `metadata`.
    fn file(
        tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)],
        metadata: &[(&str, &str)],
    ) -> Vec<u8> {
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        let meta = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        safetensors::serialize(views, Some(meta)).unwrap()
    }

    const GOOD_META: [(&str, &str); 6] = [
        ("format", FORMAT),
        ("format_version", "1"),
        ("wnids", r#"["n01","n02"]"#),
        ("dim", "2"),
        ("embedder", "word-vectors"),
        ("normalisation", "l2"),
    ];

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn err(bytes: &[u8]) -> String {
        format!(
            "{:#}",
            LabelEmbeddingMatrix::from_safetensors(bytes, "ck/label_embedding.safetensors")
                .unwrap_err()
        )
    }

    fn with(key: &str, value: &str) -> Vec<(&'static str, String)> {
        GOOD_META
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    if *k == key {
                        value.to_string()
                    } else {
                        v.to_string()
                    },
                )
            })
            .collect()
    }

    fn good_tensor() -> (&'static str, safetensors::Dtype, Vec<usize>, Vec<u8>) {
        (
            TENSOR,
            safetensors::Dtype::F32,
            vec![2, 2],
            f32_bytes(&[1.0, 0.0, 0.0, 1.0]),
        )
    }

    fn meta_refs<'a>(meta: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
        meta.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    #[test]
    fn round_trip_is_exact_and_keeps_the_metadata() {
        let m = sample();
        let bytes = m.to_safetensors().unwrap();
        let back = LabelEmbeddingMatrix::from_safetensors(&bytes, "mem").unwrap();
        assert_eq!(back, m);
        assert_eq!(back.row("n02"), Some(&[0.0f32, 1.0][..]));
        assert_eq!(back.row("n09"), None);
        assert_eq!(back.tensor().size(), [3, 2]);
        // Plain safetensors: any reader sees the tensor and the metadata keys.
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().as_ref().unwrap();
        assert_eq!(meta["wnids"], r#"["n01","n02","n03"]"#);
        assert_eq!(meta["embedder"], "word-vectors");
        assert_eq!(meta["normalisation"], "l2");
        assert_eq!(meta["embedder.vectors_format"], "word2vec-binary");
        assert_eq!(meta["format_version"], "1");
        // The hand-made good file parses too (the error tests below each change one thing).
        let ok = file(&[good_tensor()], &GOOD_META);
        assert_eq!(
            LabelEmbeddingMatrix::from_safetensors(&ok, "x")
                .unwrap()
                .wnids,
            ["n01", "n02"]
        );
    }

    #[test]
    fn malformed_files_are_errors_naming_the_file_and_the_problem() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                b"not a safetensors file".to_vec(),
                "not a valid safetensors",
            ),
            (Vec::new(), "not a valid safetensors"),
            (file(&[], &GOOD_META), "no tensor 'label_embedding'"),
            (
                file(
                    &[(
                        TENSOR,
                        safetensors::Dtype::F64,
                        vec![2, 2],
                        [1f64, 0.0, 0.0, 1.0]
                            .iter()
                            .flat_map(|x| x.to_le_bytes())
                            .collect(),
                    )],
                    &GOOD_META,
                ),
                "dtype F64, expected F32",
            ),
            (
                file(
                    &[(
                        TENSOR,
                        safetensors::Dtype::F32,
                        vec![3, 2],
                        f32_bytes(&[1.0, 0.0, 0.0, 1.0, 1.0, 0.0]),
                    )],
                    &GOOD_META,
                ),
                "shape [3, 2], but the metadata lists 2 wnids of dimension 2",
            ),
            (
                file(
                    &[good_tensor()],
                    &meta_refs(&with("wnids", r#"["n01","n02""#)),
                ),
                "'wnids' is not a JSON array of strings",
            ),
            (
                file(&[good_tensor()], &meta_refs(&with("wnids", r#"["n01",2]"#))),
                "'wnids' is not a JSON array of strings",
            ),
            (
                file(
                    &[good_tensor()],
                    &meta_refs(&with("wnids", r#"["n01","n01"]"#)),
                ),
                "n01 listed twice",
            ),
            (
                file(&[good_tensor()], &meta_refs(&with("dim", "two"))),
                "'dim' is not a number",
            ),
            (
                file(&[good_tensor()], &meta_refs(&with("format_version", "2"))),
                "format_version \"2\"",
            ),
            (
                file(
                    &[good_tensor()],
                    &meta_refs(&with("embedder", "sentence-bert")),
                ),
                "metadata 'embedder'",
            ),
            (
                file(&[good_tensor()], &meta_refs(&with("format", "other"))),
                "'format' is \"other\"",
            ),
            (file(&[good_tensor()], &GOOD_META[1..]), "no 'format'"),
            (file(&[good_tensor()], &[]), "no 'format'"),
            (
                file(
                    &[good_tensor()],
                    &[GOOD_META.as_slice(), &[("extra", "1")]].concat(),
                ),
                "unknown metadata key 'extra'",
            ),
            (
                file(
                    &[
                        good_tensor(),
                        ("other", safetensors::Dtype::F32, vec![1], f32_bytes(&[1.0])),
                    ],
                    &GOOD_META,
                ),
                "unexpected tensor 'other'",
            ),
            (
                file(
                    &[(
                        TENSOR,
                        safetensors::Dtype::F32,
                        vec![2, 2],
                        f32_bytes(&[1.0, f32::NAN, 0.0, 1.0]),
                    )],
                    &GOOD_META,
                ),
                "vector of n01 is not finite",
            ),
        ];
        for (bytes, want) in cases {
            let e = err(&bytes);
            assert!(e.contains(want), "expected {want:?} in: {e}");
            assert!(e.contains("ck/label_embedding.safetensors"), "{e}");
        }
        // A file cut short anywhere is an error, never a panic.
        let good = sample().to_safetensors().unwrap();
        for len in 0..good.len() {
            assert!(LabelEmbeddingMatrix::from_safetensors(&good[..len], "cut").is_err());
        }
    }

    #[test]
    fn bad_matrices_are_refused_when_made_and_written() {
        let p = provenance;
        assert!(LabelEmbeddingMatrix::new(vec![], 2, vec![], p()).is_err());
        assert!(LabelEmbeddingMatrix::new(vec!["a".into()], 0, vec![], p()).is_err());
        assert!(LabelEmbeddingMatrix::new(vec!["a".into()], 2, vec![1.0], p()).is_err());
        assert!(
            LabelEmbeddingMatrix::new(vec!["a".into(), "a".into()], 1, vec![1.0, 1.0], p())
                .is_err()
        );
        let mut m = sample();
        m.values[0] = f32::INFINITY;
        assert!(m.to_safetensors().is_err());
    }

    #[test]
    fn drift_compares_unit_vectors_within_the_tolerance() {
        let m = sample();
        // Same directions at other scales (normalised before comparing), one row moved a little
        // (inside the tolerance), then one moved a lot and one missing.
        let same: HashMap<&str, Vec<f32>> = HashMap::from([
            ("n01", vec![3.0, 0.0]),
            ("n02", vec![0.0, 1.0 + 1e-7]),
            ("n03", vec![2.0, 2.0]),
        ]);
        let d = m.drift(|w| same.get(w).map(Vec::as_slice), SAME_VECTOR_TOLERANCE);
        assert!(d.is_same(), "{d:?}");
        assert!(d.max_distance < 1e-6, "{d:?}");
        let moved: HashMap<&str, Vec<f32>> =
            HashMap::from([("n01", vec![1.0, 1.0]), ("n02", vec![0.0, 1.0])]);
        let d = m.drift(|w| moved.get(w).map(Vec::as_slice), SAME_VECTOR_TOLERANCE);
        assert_eq!(d.differing, ["n01"]);
        assert_eq!(d.missing, ["n03"]);
        assert_eq!(d.compared, 3);
        // |(1,0) - (s,s)| = sqrt(2 - 2s) ~ 0.765
        assert!((d.max_distance - (2.0 - 2.0 * 0.5f32.sqrt()).sqrt()).abs() < 1e-6);
        // A vector of another dimension differs; a zero one is missing.
        let odd: HashMap<&str, Vec<f32>> = HashMap::from([
            ("n01", vec![1.0, 0.0, 0.0]),
            ("n02", vec![0.0, 0.0]),
            ("n03", vec![1.0, 1.0]),
        ]);
        let d = m.drift(|w| odd.get(w).map(Vec::as_slice), SAME_VECTOR_TOLERANCE);
        assert_eq!(
            (d.differing.as_slice(), d.missing.as_slice()),
            (&["n01".to_string()][..], &["n02".to_string()][..])
        );
    }

    #[test]
    fn dimension_errors_name_file_dims_and_checkpoint() {
        assert!(check_dim("v.bin", 300, "ck", 300).is_ok());
        let e = check_dim("glove.50d.txt", 50, "run/checkpoints/step-000000009", 300)
            .unwrap_err()
            .to_string();
        for want in [
            "glove.50d.txt",
            "dimension 50",
            "dimension 300",
            "step-000000009",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
