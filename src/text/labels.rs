//! Synset names -> one unit-norm `label_embedding` per wnid (paper appendix A.2).
//!
//! The paper trains each synset toward "the embedding of the synset's first term". Our names come
//! from ImageNet's `words.txt` (`wnid TAB name, name, ...`), and a vocabulary rarely holds every
//! name verbatim, so a synset's names are tried **in order** and the first that maps wins; a name
//! maps through the first of these that finds a usable vector:
//!
//! 1. [`MatchKind::Exact`]: the name itself (`"Egyptian cat"` only if the vocabulary has it).
//! 2. [`MatchKind::Lowercase`]: its lowercase. Only a fallback: when `Apple` is in the vocabulary
//!    it is used, never `apple` (field case B16).
//! 3. [`MatchKind::Phrase`]: whitespace runs joined by `_` (`great_white_shark`, word2vec's phrase
//!    convention), then that phrase lowercased.
//! 4. [`MatchKind::TokenMean`]: the mean of the raw (unnormalised) vectors of its tokens (split on
//!    every non-alphanumeric character: space, `-`, `'`, `,`, `.`), each looked up exactly then
//!    lowercase; only when *every* token is present.
//!
//! The result is L2-normalised. A zero or non-finite candidate vector is never used: it is
//! skipped with a warning and the next candidate is tried. This is the "simpler variant" of A.2:
//! one vector per synset, synsets ranked directly. The same vector can name several synsets (two
//! ILSVRC synsets are just "crane"): such groups are reported in
//! [`LabelEmbeddings::coincident`] and logged, because no image model can tell them apart.

use std::collections::{HashMap, HashSet};
use std::io::BufRead;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::vectors::{ReadReport, WordVectors};
use super::OnUnmapped;

/// The mapping rule of this module in one line, recorded as `label_mapping` in a
/// [`super::label_embedding`] file made from word vectors.
pub const MAPPING_RULE: &str = "first name that maps, each name tried as: exact word, lowercase, \
     phrase (whitespace joined by _, then lowercase), mean of its tokens' raw vectors (every token \
     present); then L2-normalised (paper appendix A.2, one vector per label)";

/// How a name found its vector (see the module docs for the order they are tried in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MatchKind {
    /// The name is a vocabulary word as written.
    Exact,
    /// The name's lowercase is a vocabulary word (the name itself is not).
    Lowercase,
    /// The name's words joined by `_` (or that, lowercased) is a vocabulary word.
    Phrase,
    /// The mean of all its tokens' vectors (every token present).
    TokenMean,
}

/// The vector a label got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mapping {
    /// The synset name that mapped (the first of its names that did).
    pub name: String,
    /// How it mapped.
    pub via: MatchKind,
    /// The vocabulary words used: one for `Exact`/`Lowercase`/`Phrase`, the tokens for `TokenMean`.
    pub words: Vec<String>,
    /// `[dim]` label embedding, unit L2 norm.
    pub vector: Vec<f32>,
}

/// One requested label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelEntry {
    /// WordNet id, e.g. `n01443537`.
    pub wnid: String,
    /// Its names, in the names file's order.
    pub names: Vec<String>,
    /// `None` when no name maps to a vector.
    pub mapping: Option<Mapping>,
}

/// Label embeddings for a list of wnids (paper A.2), with what reading and mapping found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelEmbeddings {
    /// Embedding dimension (the vector file's).
    pub dim: usize,
    /// One entry per requested wnid, in the requested order.
    pub entries: Vec<LabelEntry>,
    /// Groups (>= 2, in request order) of mapped wnids whose label embeddings are bit-identical.
    pub coincident: Vec<Vec<String>>,
    /// How the vector file was read. From [`map_labels`] alone (no file read) it is a placeholder
    /// with `format: Auto`; [`super::load_label_embeddings`] fills it in.
    pub vectors_report: ReadReport,
}

impl LabelEmbeddings {
    /// Entries with no vector, in request order.
    pub fn unmapped(&self) -> Vec<&LabelEntry> {
        self.entries
            .iter()
            .filter(|e| e.mapping.is_none())
            .collect()
    }

    /// True when `wnid` was requested and has a vector.
    pub fn is_mapped(&self, wnid: &str) -> bool {
        self.entries
            .iter()
            .any(|e| e.wnid == wnid && e.mapping.is_some())
    }

    /// The unit `[dim]` vector of `wnid`, when it was requested and maps.
    pub fn vector(&self, wnid: &str) -> Option<&[f32]> {
        self.entries
            .iter()
            .find(|e| e.wnid == wnid)?
            .mapping
            .as_ref()
            .map(|m| m.vector.as_slice())
    }

    /// Row-major `[wnids.len(), dim]` matrix of unit label embeddings, rows in `wnids` order.
    ///
    /// Errors on the first wnid that was not requested or has no vector (naming it and its names).
    pub fn matrix(&self, wnids: &[String]) -> Result<Vec<f32>> {
        let by_wnid: HashMap<&str, &LabelEntry> =
            self.entries.iter().map(|e| (e.wnid.as_str(), e)).collect();
        let mut out = Vec::with_capacity(wnids.len() * self.dim);
        for wnid in wnids {
            let Some(entry) = by_wnid.get(wnid.as_str()) else {
                bail!("label embedding matrix: wnid {wnid} was not among the labels loaded");
            };
            let Some(mapping) = &entry.mapping else {
                bail!(
                    "label embedding matrix: wnid {wnid} ({}) has no word vector (unmapped)",
                    entry.names.join(", ")
                );
            };
            out.extend_from_slice(&mapping.vector);
        }
        Ok(out)
    }
}

/// Reads a `words.txt`-format file (ImageNet's `words.txt`, the synthetic dataset's `names.tsv`):
/// `wnid TAB name, name, ...` per line; blank lines and lines starting with `#` are skipped.
///
/// Returns `wnid -> names` in file order, each trimmed, empty ones dropped. `path` is a plain path
/// or a `file://` URL. Errors name the file and 1-based line: a line without a TAB, an empty wnid,
/// a wnid listed twice; and I/O errors.
pub fn read_names(path: &str) -> Result<HashMap<String, Vec<String>>> {
    read_names_filtered(path, None)
}

/// [`read_names`] keeping only the wnids in `wanted` (every line is still parsed and checked,
/// duplicates included): what the trainer needs, at a fraction of the memory of the whole
/// table (WordNet's `words.txt` has 82,115 synsets; ImageNet-21K needs 21,841).
pub fn read_names_of(path: &str, wanted: &HashSet<&str>) -> Result<HashMap<String, Vec<String>>> {
    read_names_filtered(path, Some(wanted))
}

fn read_names_filtered(
    path: &str,
    wanted: Option<&HashSet<&str>>,
) -> Result<HashMap<String, Vec<String>>> {
    let local = super::vectors::local_path(path)?;
    let file = std::fs::File::open(&local)
        .with_context(|| format!("opening names file {}", local.display()))?;
    let mut names = HashMap::new();
    let mut first_line = HashMap::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line_no = i + 1;
        let line = line.with_context(|| format!("{path}: reading line {line_no}"))?;
        let line = line.trim_end_matches(['\r', '\n']);
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((wnid, list)) = line.split_once('\t') else {
            bail!("{path}: line {line_no}: expected `wnid<TAB>names`, found {line:?}");
        };
        let wnid = wnid.trim();
        if wnid.is_empty() {
            bail!("{path}: line {line_no}: empty wnid");
        }
        if let Some(first) = first_line.insert(wnid.to_owned(), line_no) {
            bail!("{path}: line {line_no}: wnid {wnid} already listed on line {first}");
        }
        if wanted.is_some_and(|w| !w.contains(wnid)) {
            continue;
        }
        let list: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        names.insert(wnid.to_owned(), list);
    }
    Ok(names)
}

/// The vocabulary words a name can map through (for [`super::vectors::read_vectors`]' `keep`):
/// the name, its lowercase, the `_`-joined phrase and its lowercase, its tokens and their
/// lowercase (module docs). Deduplicated, in that order.
pub fn candidate_words(name: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |w: String| {
        if !w.is_empty() && !out.contains(&w) {
            out.push(w);
        }
    };
    add(name.to_owned());
    add(name.to_lowercase());
    if let Some(phrase) = phrase(name) {
        let lower = phrase.to_lowercase();
        add(phrase);
        add(lower);
    }
    for token in tokens(name) {
        add(token.to_owned());
        add(token.to_lowercase());
    }
    out
}

/// `great white shark` -> `great_white_shark`; `None` for a single word.
fn phrase(name: &str) -> Option<String> {
    let parts: Vec<&str> = name.split_whitespace().collect();
    (parts.len() > 1).then(|| parts.join("_"))
}

/// Alphanumeric runs of `name`.
fn tokens(name: &str) -> Vec<&str> {
    name.split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .collect()
}

/// A candidate vector for one name, L2-normalised; `None` when absent.
struct Candidate {
    via: MatchKind,
    words: Vec<String>,
    vector: Vec<f32>,
}

/// L2-normalises in f64; `None` for a zero or non-finite vector.
fn normalise(v: &[f32]) -> Option<Vec<f32>> {
    let norm = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if !(norm.is_finite() && norm > 0.0) {
        return None;
    }
    let out: Vec<f32> = v.iter().map(|&x| (f64::from(x) / norm) as f32).collect();
    out.iter().all(|x| x.is_finite()).then_some(out)
}

/// Maps one name (module docs), skipping zero / non-finite candidates with a warning.
fn map_name(wnid: &str, name: &str, vectors: &WordVectors) -> Option<Candidate> {
    let usable = |via: MatchKind, words: Vec<String>, raw: &[f32]| -> Option<Candidate> {
        match normalise(raw) {
            Some(vector) => Some(Candidate { via, words, vector }),
            None => {
                tracing::warn!(
                    wnid,
                    name,
                    ?via,
                    ?words,
                    "word vector is zero or not finite; not used as a label embedding"
                );
                None
            }
        }
    };
    let single = |via: MatchKind, word: &str| {
        vectors
            .get(word)
            .and_then(|raw| usable(via, vec![word.to_owned()], raw))
    };
    if let Some(c) = single(MatchKind::Exact, name) {
        return Some(c);
    }
    let lower = name.to_lowercase();
    if lower != name {
        if let Some(c) = single(MatchKind::Lowercase, &lower) {
            return Some(c);
        }
    }
    if let Some(phrase) = phrase(name) {
        if let Some(c) = single(MatchKind::Phrase, &phrase) {
            return Some(c);
        }
        let lower = phrase.to_lowercase();
        if lower != phrase {
            if let Some(c) = single(MatchKind::Phrase, &lower) {
                return Some(c);
            }
        }
    }
    let tokens = tokens(name);
    if tokens.is_empty() || (tokens.len() == 1 && tokens[0] == name) {
        return None; // nothing new to try
    }
    let mut sum = vec![0f64; vectors.dim];
    let mut words = Vec::with_capacity(tokens.len());
    for token in tokens {
        let (word, raw) = match vectors.get(token) {
            Some(raw) => (token.to_owned(), raw),
            None => {
                let lower = token.to_lowercase();
                let raw = vectors.get(&lower)?;
                (lower, raw)
            }
        };
        for (s, &x) in sum.iter_mut().zip(raw) {
            *s += f64::from(x);
        }
        words.push(word);
    }
    let mean: Vec<f32> = sum
        .iter()
        .map(|s| (s / words.len() as f64) as f32)
        .collect();
    usable(MatchKind::TokenMean, words, &mean)
}

/// Maps each wnid to the vector of its first name that maps (module docs; paper A.2).
///
/// `names`: wnid -> names (from [`read_names`]); `vectors`: the vocabulary, typically read with
/// `keep` = the [`candidate_words`] of these names. Returns entries in `wnids` order, with
/// unit-norm `[dim]` vectors, and the coincident groups; `vectors_report` is a placeholder.
///
/// Unmapped labels are logged (`warn`, with wnid and names) and, with [`OnUnmapped::Error`],
/// an error listing all of them. Also errors on a wnid missing from `names` or listed twice.
pub fn map_labels(
    wnids: &[String],
    names: &HashMap<String, Vec<String>>,
    vectors: &WordVectors,
    on_unmapped: OnUnmapped,
) -> Result<LabelEmbeddings> {
    let mut seen = HashSet::new();
    let mut entries = Vec::with_capacity(wnids.len());
    for wnid in wnids {
        if !seen.insert(wnid.as_str()) {
            bail!("wnid {wnid} is listed twice among the labels to map");
        }
        let Some(label_names) = names.get(wnid) else {
            bail!("wnid {wnid} is not in the names table");
        };
        let mapping = label_names.iter().find_map(|name| {
            map_name(wnid, name, vectors).map(|c| Mapping {
                name: name.clone(),
                via: c.via,
                words: c.words,
                vector: c.vector,
            })
        });
        entries.push(LabelEntry {
            wnid: wnid.clone(),
            names: label_names.clone(),
            mapping,
        });
    }

    let unmapped: Vec<String> = entries
        .iter()
        .filter(|e| e.mapping.is_none())
        .map(|e| format!("{} ({})", e.wnid, e.names.join(", ")))
        .collect();
    for label in &unmapped {
        tracing::warn!(
            label = label.as_str(),
            "no word vector for any name of this label"
        );
    }
    if !unmapped.is_empty() && on_unmapped == OnUnmapped::Error {
        bail!(
            "{} of {} labels have no word vector for any of their names (on_unmapped = \"error\"): {}",
            unmapped.len(),
            entries.len(),
            unmapped.join("; ")
        );
    }

    let coincident = coincident_groups(&entries);
    for group in &coincident {
        tracing::warn!(
            wnids = ?group,
            "labels share one label embedding (identical vectors); they cannot be told apart"
        );
    }
    let mut by_kind: HashMap<MatchKind, usize> = HashMap::new();
    for m in entries.iter().filter_map(|e| e.mapping.as_ref()) {
        *by_kind.entry(m.via).or_default() += 1;
    }
    tracing::info!(
        mapped = entries.len() - unmapped.len(),
        requested = entries.len(),
        ?by_kind,
        coincident_groups = coincident.len(),
        "label embeddings mapped"
    );
    Ok(LabelEmbeddings {
        dim: vectors.dim,
        entries,
        coincident,
        vectors_report: ReadReport {
            rows_read: vectors.len(),
            ..ReadReport::default()
        },
    })
}

/// Groups of >= 2 mapped wnids with bit-identical vectors, in first-appearance order. Keyed by
/// a 64-bit hash of the vector's bits (not a copy of the vector), each candidate compared bit for
/// bit with its group's first vector, so a hash collision never merges different vectors.
fn coincident_groups(entries: &[LabelEntry]) -> Vec<Vec<String>> {
    use std::hash::{Hash, Hasher};
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    // (first entry's vector, wnids) per group; hash -> indices of the groups with that hash.
    let mut groups: Vec<(&[f32], Vec<String>)> = Vec::new();
    let mut by_hash: HashMap<u64, Vec<usize>> = HashMap::new();
    for entry in entries {
        let Some(mapping) = &entry.mapping else {
            continue;
        };
        let v = mapping.vector.as_slice();
        let mut h = std::hash::DefaultHasher::new();
        for x in v {
            x.to_bits().hash(&mut h);
        }
        let candidates = by_hash.entry(h.finish()).or_default();
        match candidates.iter().find(|&&g| same(groups[g].0, v)) {
            Some(&g) => groups[g].1.push(entry.wnid.clone()),
            None => {
                candidates.push(groups.len());
                groups.push((v, vec![entry.wnid.clone()]));
            }
        }
    }
    groups
        .into_iter()
        .map(|(_, wnids)| wnids)
        .filter(|g| g.len() >= 2)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(rows: &[(&str, &[f32])]) -> WordVectors {
        let mut v = WordVectors {
            dim: rows[0].1.len(),
            ..WordVectors::default()
        };
        for (w, x) in rows {
            v.index.insert((*w).to_owned(), v.words.len());
            v.words.push((*w).to_owned());
            v.data.extend_from_slice(x);
        }
        v
    }

    fn table(rows: &[(&str, &[&str])]) -> (Vec<String>, HashMap<String, Vec<String>>) {
        let wnids = rows.iter().map(|(w, _)| (*w).to_owned()).collect();
        let names = rows
            .iter()
            .map(|(w, n)| ((*w).to_owned(), n.iter().map(|s| (*s).to_owned()).collect()))
            .collect();
        (wnids, names)
    }

    fn norm(v: &[f32]) -> f32 {
        v.iter().map(|x| x * x).sum::<f32>().sqrt()
    }

    #[test]
    fn each_match_kind_and_unit_norm() {
        let v = vocab(&[
            ("Apple", &[0.0, 3.0, 0.0]),
            ("apple", &[3.0, 0.0, 0.0]),
            ("tabby", &[0.0, 0.0, 2.0]),
            ("great_white_shark", &[1.0, 1.0, 0.0]),
            ("red", &[2.0, 0.0, 0.0]),
            ("circle", &[0.0, 4.0, 0.0]),
        ]);
        let (wnids, names) = table(&[
            ("n1", &["Apple"]),
            ("n2", &["TABBY"]),
            ("n3", &["Great White shark"]),
            ("n4", &["red circle"]),
            ("n5", &["Red-circle"]),
        ]);
        let e = map_labels(&wnids, &names, &v, OnUnmapped::Error).unwrap();
        let via: Vec<MatchKind> = e
            .entries
            .iter()
            .map(|e| e.mapping.as_ref().unwrap().via)
            .collect();
        use MatchKind::*;
        assert_eq!(via, [Exact, Lowercase, Phrase, TokenMean, TokenMean]);
        let m = |i: usize| e.entries[i].mapping.as_ref().unwrap();
        assert_eq!(
            m(0).vector,
            [0.0, 1.0, 0.0],
            "exact 'Apple' wins over 'apple'"
        );
        assert_eq!(m(1).words, ["tabby"]);
        assert_eq!(m(2).words, ["great_white_shark"]);
        assert_eq!(m(3).words, ["red", "circle"]);
        // mean of [2,0,0] and [0,4,0] = [1,2,0] -> /sqrt(5)
        let s5 = 5f32.sqrt();
        assert!(m(3)
            .vector
            .iter()
            .zip([1.0 / s5, 2.0 / s5, 0.0])
            .all(|(a, b)| (a - b).abs() < 1e-6));
        assert_eq!(
            m(4).words,
            ["red", "circle"],
            "tokens fall back to lowercase"
        );
        for entry in &e.entries {
            assert!((norm(&entry.mapping.as_ref().unwrap().vector) - 1.0).abs() < 1e-6);
        }
        assert_eq!(e.coincident, vec![vec!["n4".to_owned(), "n5".to_owned()]]);
        let matrix = e.matrix(&["n5".to_owned(), "n1".to_owned()]).unwrap();
        assert_eq!(matrix.len(), 6);
        assert_eq!(matrix[3..], [0.0, 1.0, 0.0]);
    }

    #[test]
    fn first_name_that_maps_wins_and_zero_vectors_are_skipped() {
        let v = vocab(&[
            ("zero", &[0.0, 0.0]),
            ("b", &[0.0, 2.0]),
            ("c", &[5.0, 0.0]),
        ]);
        let (wnids, names) = table(&[("n1", &["nope", "zero", "b", "c"]), ("n2", &["zero"])]);
        let e = map_labels(&wnids, &names, &v, OnUnmapped::Skip).unwrap();
        let m = e.entries[0].mapping.as_ref().unwrap();
        assert_eq!(
            (m.name.as_str(), m.vector.as_slice()),
            ("b", &[0.0, 1.0][..])
        );
        assert_eq!(e.unmapped().len(), 1);
        assert!(!e.is_mapped("n2") && e.is_mapped("n1"));
        let err = e.matrix(&["n2".to_owned()]).unwrap_err().to_string();
        assert!(err.contains("n2") && err.contains("zero"), "{err}");
        let err = e.matrix(&["n9".to_owned()]).unwrap_err().to_string();
        assert!(err.contains("n9"), "{err}");
        let err = map_labels(&wnids, &names, &v, OnUnmapped::Error)
            .unwrap_err()
            .to_string();
        assert!(err.contains("n2 (zero)"), "{err}");
    }

    #[test]
    fn token_mean_needs_every_token() {
        let v = vocab(&[("red", &[1.0, 0.0])]);
        let (wnids, names) = table(&[("n1", &["red circle"])]);
        let e = map_labels(&wnids, &names, &v, OnUnmapped::Skip).unwrap();
        assert!(e.entries[0].mapping.is_none());
    }

    #[test]
    fn unknown_or_repeated_wnid_is_an_error() {
        let v = vocab(&[("a", &[1.0])]);
        let (_, names) = table(&[("n1", &["a"])]);
        let err = map_labels(&["n2".to_owned()], &names, &v, OnUnmapped::Skip).unwrap_err();
        assert!(err.to_string().contains("n2"));
        assert!(map_labels(
            &["n1".to_owned(), "n1".to_owned()],
            &names,
            &v,
            OnUnmapped::Skip
        )
        .is_err());
    }

    #[test]
    fn candidates() {
        assert_eq!(
            candidate_words("Great white-shark"),
            [
                "Great white-shark",
                "great white-shark",
                "Great_white-shark",
                "great_white-shark",
                "Great",
                "great",
                "white",
                "shark"
            ]
        );
        assert_eq!(candidate_words("dog"), ["dog"]);
    }
}
