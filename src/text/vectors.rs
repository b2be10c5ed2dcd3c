//! Word-vector files -> an in-memory table `word -> [dim] f32`.
//!
//! # Formats
//!
//! All four formats hold one vector per word, in file order. Words are case-sensitive byte
//! strings (UTF-8 expected; invalid bytes are replaced and warned about). Lines may end in `\n`
//! or `\r\n`; trailing spaces and tabs on a text line are ignored (fastText writes one), and a
//! UTF-8 byte-order mark at the very start is skipped.
//!
//! - **`word2vec-binary`** (word2vec.c `-binary 1`, gensim `save_word2vec_format(binary=True)`):
//!   an ASCII header line `count dim\n`, then `count` records `word<space><dim x f32 LE>`. The
//!   original word2vec.c writes a `\n` after each vector, gensim >= 4 and the GoogleNews file do
//!   not (field case B11), so any `\n` bytes *before* a word are skipped (as gensim does) and
//!   nothing else is: the byte after a vector is never swallowed unless it is `\n`. A word ends
//!   at the first space; it may not contain `\n` and is capped at [`MAX_WORD_BYTES`].
//! - **`word2vec-text`** (`-binary 0`): the same header line, then `count` lines
//!   `word v1 v2 .. vd` with decimal floats.
//! - **`fasttext`** (`.vec` files from fastText): exactly `word2vec-text`; kept as its own name
//!   so a config says what the file is. (fastText's `.bin` *model* files are not vector files and
//!   are rejected with a hint.)
//! - **`glove`** (Stanford GloVe `.txt`): no header; every line is `word v1 .. vd`; `dim` is
//!   taken from the first line (its field count minus one). GloVe words can be `,` or `1999`.
//!
//! In the text formats the word is everything before the first single space (so words are never
//! split or trimmed further), and the values are the remaining whitespace-separated fields. Blank
//! lines are skipped. Line numbers in errors are 1-based and count the header line.
//!
//! # What is checked (field cases B11, B12, B13, B16)
//!
//! - Header count larger than the body: error `header says 4 vectors, EOF after 3`. Header count
//!   smaller than the body: the header's count is loaded and the trailing data is reported as a
//!   warning (it is not read).
//! - A row with the wrong number of values, an unparsable value, or a NaN / infinite value: an
//!   error naming the file, the line (binary: the vector's index and byte offset) and the word.
//! - Duplicate words: the first occurrence wins (gensim-compatible) and a warning names the word.
//!   `apple` and `Apple` are different words.
//! - Truncated binary records, implausible headers (`dim` above [`MAX_DIM`]), a text file read
//!   as `word2vec-binary` (recognised from the first vector's bytes when `dim >= 4`), gzip input:
//!   clear errors, never a panic, hang or garbage read.
//!
//! With `keep = Some(words)` only those exact words are stored and only their rows are parsed:
//! other rows are skipped after reading their word (text: the line is not split; binary: the
//! vector bytes are not decoded), so a malformed row of a word that was not asked for goes
//! unnoticed. Pass `keep = None` to validate a whole file. The file is streamed through a
//! `BufRead`; memory is the kept vectors plus one line.
//!
//! # Auto-detection
//!
//! [`Format::Auto`] reads a prefix (the first two lines and at least 64 KiB, at most 16 MiB) and
//! decides:
//!
//! 1. First non-blank line exactly two unsigned integers `count dim` (a header):
//!    - if the bytes after it are not text (a control byte other than `\t\r\n`, or invalid
//!      UTF-8) -> `word2vec-binary`;
//!    - else if the second line has `dim` values -> `word2vec-text` (when `dim == 1` this is
//!      ambiguous with a dimension-1 GloVe file whose first word is a number, field case B13:
//!      `word2vec-text` is chosen and a warning says how to force `glove`);
//!    - else if the second line has exactly one value -> `glove` (dimension 1);
//!    - else `word2vec-text`, whose reader then names the bad line.
//! 2. Otherwise, a first line `word v1 .. vd` with `d >= 1` numeric values -> `glove`.
//! 3. Otherwise an error asking for an explicit `vectors_format`.
//!
//! The choice is always logged (`tracing::info!`, or `warn!` when ambiguous) and returned in
//! [`ReadReport::format`].
//!
//! # Why hand-written
//!
//! `finalfusion` (the Rust crate that reads these formats) was evaluated and rejected: it panics
//! on a duplicate word (B16) and loads the whole file, where we need a handful of words out of
//! 400k. The readers here are a few hundred lines and stream.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Cursor, Read};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Largest accepted vector dimension (header or first GloVe line). Real files are <= 4096; the
/// cap keeps a corrupt header from allocating gigabytes for one row buffer.
pub const MAX_DIM: usize = 1 << 20;

/// Longest accepted word in a binary file, in bytes (word2vec.c itself caps words at 100). A
/// longer "word" means the reader has lost its place (or the file is not word2vec binary).
pub const MAX_WORD_BYTES: usize = 4096;

/// Most warnings kept in [`ReadReport::warnings`] (and logged); the rest are counted in a final
/// summary line.
const MAX_WARNINGS: usize = 50;

/// Auto-detection reads at most this many bytes ahead (enough for two lines of any real file).
const MAX_PREFIX_BYTES: usize = 16 << 20;

/// Auto-detection reads at least this many bytes ahead (or to EOF), so the binary/text test sees
/// a whole first record of any common dimension even when `\n` bytes occur in binary floats.
const MIN_PREFIX_BYTES: usize = 64 << 10;

/// Word-vector file format. Serialized in kebab-case (`"word2vec-binary"`, ...); see the module
/// documentation for the exact layout of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Detect from the first bytes; the choice is logged.
    #[default]
    Auto,
    /// word2vec.c binary: `count dim\n` then `word<space><dim f32 little-endian>` records.
    Word2vecBinary,
    /// word2vec.c text: `count dim` header line, then `word v1 .. vd` lines.
    Word2vecText,
    /// Stanford GloVe text: no header, `word v1 .. vd` lines.
    Glove,
    /// fastText `.vec`: identical to `word2vec-text`.
    Fasttext,
}

deserialize_by_name!(Format);

impl Format {
    /// The serialized (config) name, e.g. `"word2vec-binary"`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Word2vecBinary => "word2vec-binary",
            Format::Word2vecText => "word2vec-text",
            Format::Glove => "glove",
            Format::Fasttext => "fasttext",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An in-memory table of word vectors, as read (not normalised).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WordVectors {
    /// Vector dimension (from the header, or the first GloVe line).
    pub dim: usize,
    /// Stored words in file order (first occurrence only; only `keep` words when filtered).
    pub words: Vec<String>,
    /// `word -> row` in [`Self::data`]; exact, case-sensitive keys.
    pub index: HashMap<String, usize>,
    /// Row-major `[words.len(), dim]` vectors, in the file's units (raw, not normalised).
    pub data: Vec<f32>,
}

impl WordVectors {
    /// The `[dim]` vector of exactly `word` (case-sensitive), if stored.
    pub fn get(&self, word: &str) -> Option<&[f32]> {
        let row = *self.index.get(word)?;
        Some(&self.data[row * self.dim..(row + 1) * self.dim])
    }

    /// Number of stored words.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// True when no word is stored.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
}

/// What reading a vector file found; goes into the run report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadReport {
    /// The format actually read: never `Auto` when it comes from [`read_vectors`]. (Only
    /// [`super::labels::map_labels`], which reads no file, leaves `Auto` as a placeholder.)
    pub format: Format,
    /// The header's vector count (`None` for GloVe).
    pub header_count: Option<usize>,
    /// Data rows read from the body, stored or not (a header's count caps it).
    pub rows_read: usize,
    /// Warnings (duplicate words, trailing data, ambiguous detection, ...), also logged; at most
    /// 50 plus a summary line.
    pub warnings: Vec<String>,
}

/// Reads a word-vector file from `reader` (`source` names it in messages).
///
/// `keep`: when `Some`, only these exact words are stored and only their rows are parsed (the
/// rest are skipped cheaply, see the module docs). Returns the table and a [`ReadReport`].
///
/// Errors (each naming `source`, the line or vector index, and the word): header count above the
/// number of rows (`header says 4 vectors, EOF after 3`), a row with the wrong number of values,
/// an unparsable or non-finite value, a truncated binary record, an implausible header, an
/// undetectable format, I/O errors. Formats are described in the module docs.
pub fn read_vectors<R: BufRead>(
    mut reader: R,
    source: &str,
    format: Format,
    keep: Option<&HashSet<String>>,
) -> Result<(WordVectors, ReadReport)> {
    let mut sink = Sink::new(source, keep);
    let format = match format {
        Format::Auto => {
            let prefix = read_prefix(&mut reader).with_context(|| format!("reading {source}"))?;
            let (format, note) = detect(&prefix.bytes, prefix.eof)
                .map_err(|e| anyhow::anyhow!("{source}: cannot detect the vector format: {e}"))?;
            match note {
                Some(note) => sink.warn(format!("{source}: auto-detected {format}: {note}")),
                None => tracing::info!(source, %format, "auto-detected word-vector format"),
            }
            let chained = Cursor::new(prefix.bytes).chain(reader);
            read_format(chained, format, &mut sink)?;
            format
        }
        explicit => {
            reject_known_non_vector_files(reader.fill_buf().unwrap_or(&[]))
                .map_err(|e| anyhow::anyhow!("{source}: not a {explicit} file: {e}"))?;
            read_format(reader, explicit, &mut sink)?;
            explicit
        }
    };
    if sink.rows_read == 0 {
        bail!("{source}: no vectors in the file (empty, or only a header)");
    }
    Ok(sink.finish(format))
}

/// [`read_vectors`] on a local file: `path` is a plain path or a `file://` URL.
///
/// Streams through a 1 MiB `BufReader` and logs the elapsed time. Errors as [`read_vectors`],
/// plus a missing file or a non-`file` URL scheme.
pub fn read_vectors_file(
    path: &str,
    format: Format,
    keep: Option<&HashSet<String>>,
) -> Result<(WordVectors, ReadReport)> {
    let local = local_path(path)?;
    let file = std::fs::File::open(&local)
        .with_context(|| format!("opening word-vector file {}", local.display()))?;
    let started = Instant::now();
    let out = read_vectors(BufReader::with_capacity(1 << 20, file), path, format, keep)?;
    tracing::info!(
        source = path,
        format = %out.1.format,
        dim = out.0.dim,
        rows_read = out.1.rows_read,
        stored = out.0.len(),
        secs = started.elapsed().as_secs_f64(),
        "read word vectors"
    );
    Ok(out)
}

/// A plain path, or the path of a `file://` URL. Other URL schemes are an error: vector files are
/// streamed from local disk.
pub(crate) fn local_path(location: &str) -> Result<PathBuf> {
    if let Some((scheme, _)) = location.split_once("://") {
        if scheme != "file" {
            bail!("{location}: only local paths and file:// URLs are supported here (copy the file locally)");
        }
        let url = url::Url::parse(location).with_context(|| format!("{location}: bad file URL"))?;
        return url
            .to_file_path()
            .map_err(|()| anyhow::anyhow!("{location}: file URL has no local path"));
    }
    Ok(PathBuf::from(location))
}

// ---------------------------------------------------------------------------------------------
// Storage of the rows read, shared by all formats.

struct Sink<'a> {
    source: &'a str,
    keep: Option<&'a HashSet<String>>,
    /// Built from `keep`: rejects most unwanted words before the `HashSet` lookup.
    filter: Option<KeepFilter>,
    vectors: WordVectors,
    header_count: Option<usize>,
    rows_read: usize,
    warnings: Vec<String>,
    suppressed_warnings: usize,
}

impl<'a> Sink<'a> {
    fn new(source: &'a str, keep: Option<&'a HashSet<String>>) -> Self {
        Sink {
            source,
            keep,
            filter: keep.map(KeepFilter::new),
            vectors: WordVectors::default(),
            header_count: None,
            rows_read: 0,
            warnings: Vec::new(),
            suppressed_warnings: 0,
        }
    }

    fn warn(&mut self, message: String) {
        if self.warnings.len() < MAX_WARNINGS {
            tracing::warn!("{message}");
            self.warnings.push(message);
        } else {
            self.suppressed_warnings += 1;
        }
    }

    /// Sets `dim` and reserves room (capped: a header's count is not trusted for allocation).
    fn set_dim(&mut self, dim: usize, count_hint: Option<usize>) {
        self.vectors.dim = dim;
        let rows = match self.keep {
            Some(keep) => keep.len(),
            None => count_hint.unwrap_or(0),
        };
        let rows = rows.min((4 << 20) / dim.max(1)); // at most 16 MB up front; grows as read
        self.vectors.data.reserve(rows * dim);
    }

    /// Whether the row of `word` must be parsed and stored.
    fn wants(&self, word: &[u8]) -> bool {
        match self.keep {
            None => true,
            Some(keep) => match std::str::from_utf8(word) {
                Ok(text) => {
                    self.filter.as_ref().is_none_or(|f| f.may_contain(word)) && keep.contains(text)
                }
                Err(_) => keep.contains(String::from_utf8_lossy(word).as_ref()),
            },
        }
    }

    /// Stores a row (first occurrence wins). `values.len() == dim`, all finite.
    fn push(&mut self, word: &[u8], values: &[f32], location: &str) {
        debug_assert_eq!(values.len(), self.vectors.dim);
        let word = match std::str::from_utf8(word) {
            Ok(word) => word.to_owned(),
            Err(_) => {
                let lossy = String::from_utf8_lossy(word).into_owned();
                self.warn(format!(
                    "{}: {location}: word is not valid UTF-8, stored as {lossy:?}",
                    self.source
                ));
                lossy
            }
        };
        if self.vectors.index.contains_key(&word) {
            self.warn(format!(
                "{}: {location}: duplicate word {}: keeping its first vector (gensim-compatible)",
                self.source,
                show(word.as_bytes())
            ));
            return;
        }
        self.vectors
            .index
            .insert(word.clone(), self.vectors.words.len());
        self.vectors.words.push(word);
        self.vectors.data.extend_from_slice(values);
    }

    fn finish(mut self, format: Format) -> (WordVectors, ReadReport) {
        if self.suppressed_warnings > 0 {
            let message = format!(
                "{}: {} more warnings not shown",
                self.source, self.suppressed_warnings
            );
            tracing::warn!("{message}");
            self.warnings.push(message);
        }
        self.vectors.data.shrink_to_fit();
        let report = ReadReport {
            format,
            header_count: self.header_count,
            rows_read: self.rows_read,
            warnings: self.warnings,
        };
        (self.vectors, report)
    }
}

/// A Bloom filter over the bytes of the `keep` words (two probes from one 64-bit hash, ~16 bits
/// per word, at most 2 MiB). Most rows of a large file are words nobody asked for; this rejects
/// all but ~1% of them with two bit tests in a cache-resident table, instead of a SipHash and a
/// probe of the (much larger) `HashSet<String>`, which still decides every word that passes.
struct KeepFilter {
    bits: Vec<u64>,
    mask: usize,
}

impl KeepFilter {
    fn new(keep: &HashSet<String>) -> Self {
        let n_bits = keep
            .len()
            .saturating_mul(16)
            .next_power_of_two()
            .clamp(1 << 10, 1 << 24);
        let mut filter = KeepFilter {
            bits: vec![0; n_bits / 64],
            mask: n_bits - 1,
        };
        for word in keep {
            let (a, b) = filter.probes(word.as_bytes());
            filter.bits[a / 64] |= 1 << (a % 64);
            filter.bits[b / 64] |= 1 << (b % 64);
        }
        filter
    }

    fn probes(&self, word: &[u8]) -> (usize, usize) {
        let h = word_hash(word);
        (h as usize & self.mask, (h >> 32) as usize & self.mask)
    }

    /// False only when `word` is certainly not a `keep` word.
    fn may_contain(&self, word: &[u8]) -> bool {
        let (a, b) = self.probes(word);
        self.bits[a / 64] & (1 << (a % 64)) != 0 && self.bits[b / 64] & (1 << (b % 64)) != 0
    }
}

/// A fast 64-bit hash of a short byte string (8 bytes per multiply, murmur3's finaliser).
fn word_hash(word: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = word.len() as u64;
    let mut chunks = word.chunks_exact(8);
    for chunk in &mut chunks {
        let x = u64::from_le_bytes(chunk.try_into().expect("8-byte chunk"));
        h = (h ^ x).wrapping_mul(K).rotate_left(29);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(last))
            .wrapping_mul(K)
            .rotate_left(29);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn read_format<R: BufRead>(reader: R, format: Format, sink: &mut Sink) -> Result<()> {
    match format {
        Format::Word2vecBinary => read_binary(reader, sink),
        Format::Word2vecText | Format::Fasttext => read_text(reader, true, sink),
        Format::Glove => read_text(reader, false, sink),
        Format::Auto => unreachable!("Auto is resolved before reading"),
    }
}

/// A displayable (quoted, shortened) form of a word for messages.
fn show(word: &[u8]) -> String {
    let text = String::from_utf8_lossy(word);
    if text.chars().count() > 60 {
        let short: String = text.chars().take(60).collect();
        format!("{short:?}...")
    } else {
        format!("{text:?}")
    }
}

/// Parses a `count dim` header line (already trimmed): exactly two unsigned decimal integers.
fn parse_header(line: &[u8]) -> Option<(usize, usize)> {
    let text = std::str::from_utf8(line).ok()?;
    let mut fields = text.split_ascii_whitespace();
    let count = fields.next()?;
    let dim = fields.next()?;
    if fields.next().is_some() || !is_uint(count) || !is_uint(dim) {
        return None;
    }
    Some((count.parse().ok()?, dim.parse().ok()?))
}

fn is_uint(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn check_dim(dim: usize, what: &str) -> Result<()> {
    if dim == 0 {
        bail!("{what}: dimension 0");
    }
    if dim > MAX_DIM {
        bail!("{what}: dimension {dim} is implausible (limit {MAX_DIM}); corrupt header?");
    }
    Ok(())
}

/// Strips a line's `\n`, `\r` and trailing spaces/tabs.
fn trim_end(mut line: &[u8]) -> &[u8] {
    while let [rest @ .., last] = line {
        if matches!(last, b'\n' | b'\r' | b' ' | b'\t') {
            line = rest;
        } else {
            break;
        }
    }
    line
}

fn strip_bom(line: &[u8]) -> &[u8] {
    line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line)
}

/// Errors for inputs that are recognisably not a vector file at all.
fn reject_known_non_vector_files(start: &[u8]) -> Result<()> {
    if start.starts_with(&[0x1f, 0x8b]) {
        bail!("the file is gzip-compressed; decompress it first (e.g. `gunzip -k`)");
    }
    if start.starts_with(&[0xba, 0x16, 0x4f, 0x2f]) {
        bail!("this is a fastText model .bin, not a vector file; use the matching .vec file");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Text formats: word2vec text / fastText .vec (with header) and GloVe (without).

/// Reads lines (reusing one buffer) and counts them from 1.
struct Lines<R> {
    reader: R,
    buf: Vec<u8>,
    line_no: usize,
}

impl<R: BufRead> Lines<R> {
    fn new(reader: R) -> Self {
        Lines {
            reader,
            buf: Vec::with_capacity(4096),
            line_no: 0,
        }
    }

    /// The next non-blank line, trimmed (see [`trim_end`]), with its 1-based number.
    fn next_nonblank(&mut self) -> std::io::Result<Option<(usize, &[u8])>> {
        loop {
            self.buf.clear();
            if self.reader.read_until(b'\n', &mut self.buf)? == 0 {
                return Ok(None);
            }
            self.line_no += 1;
            let end = trim_end(&self.buf).len();
            let start = if self.line_no == 1 && self.buf.starts_with(b"\xEF\xBB\xBF") {
                3.min(end)
            } else {
                0
            };
            if start < end {
                return Ok(Some((self.line_no, &self.buf[start..end])));
            }
        }
    }
}

/// Splits a trimmed text row at its first space: `(word, values_text)`.
fn split_word(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[]),
    }
}

fn count_fields(values: &[u8]) -> usize {
    values
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty())
        .count()
}

fn read_text<R: BufRead>(reader: R, has_header: bool, sink: &mut Sink) -> Result<()> {
    let source = sink.source;
    let mut lines = Lines::new(reader);
    let mut dim = None;
    let mut dim_from = String::new();
    if has_header {
        let Some((line_no, line)) = lines
            .next_nonblank()
            .with_context(|| format!("reading {source}"))?
        else {
            bail!("{source}: empty file (expected a `count dim` header line)");
        };
        let Some((count, header_dim)) = parse_header(line) else {
            bail!(
                "{source}: line {line_no}: expected a `count dim` header, found {}; a file without a header is GloVe (vectors_format = \"glove\")",
                show(line)
            );
        };
        check_dim(header_dim, &format!("{source}: line {line_no}: header"))?;
        sink.header_count = Some(count);
        sink.set_dim(header_dim, Some(count));
        dim = Some(header_dim);
        dim_from = format!("the header on line {line_no}");
    }
    let mut values: Vec<f32> = Vec::new();
    loop {
        if let Some(count) = sink.header_count {
            if sink.rows_read == count {
                if let Some((line_no, _)) = lines
                    .next_nonblank()
                    .with_context(|| format!("reading {source}"))?
                {
                    sink.warn(format!(
                        "{source}: header says {count} vectors but data continues at line {line_no}; the rest of the file is ignored"
                    ));
                }
                return Ok(());
            }
        }
        let Some((line_no, line)) = lines
            .next_nonblank()
            .with_context(|| format!("reading {source}"))?
        else {
            if let Some(count) = sink.header_count {
                bail!(
                    "{source}: header says {count} vectors, EOF after {}",
                    sink.rows_read
                );
            }
            return Ok(());
        };
        let (word, rest) = split_word(line);
        if word.is_empty() {
            bail!("{source}: line {line_no}: empty word (the line starts with a space)");
        }
        sink.rows_read += 1;
        let dim = match dim {
            Some(dim) => dim,
            None => {
                let found = count_fields(rest);
                check_dim(
                    found,
                    &format!("{source}: line {line_no}: first row (word {})", show(word)),
                )?;
                sink.set_dim(found, None);
                dim_from = format!("line {line_no}");
                *dim.insert(found)
            }
        };
        if !sink.wants(word) {
            continue;
        }
        let location = format!("line {line_no}");
        parse_text_values(rest, dim, &mut values).map_err(|problem| {
            let hint = if !has_header && line_no == 2 && problem.starts_with("has") {
                "; if line 1 is a `count dim` header, use vectors_format = \"word2vec-text\""
            } else {
                ""
            };
            anyhow::anyhow!(
                "{source}: line {line_no}: word {}: {problem} (dim {dim} from {dim_from}){hint}",
                show(word)
            )
        })?;
        sink.push(word, &values, &location);
    }
}

/// Parses exactly `dim` finite floats into `out`; the error text describes the problem.
fn parse_text_values(rest: &[u8], dim: usize, out: &mut Vec<f32>) -> Result<(), String> {
    out.clear();
    let text =
        std::str::from_utf8(rest).map_err(|_| "values are not valid UTF-8 text".to_owned())?;
    let mut n = 0;
    for (i, field) in text.split_ascii_whitespace().enumerate() {
        n += 1;
        if n > dim {
            continue; // counted for the message below
        }
        let value: f32 = field
            .parse()
            .map_err(|_| format!("value {} {:?} is not a number", i + 1, field))?;
        if !value.is_finite() {
            return Err(format!("value {} {:?} is not finite", i + 1, field));
        }
        out.push(value);
    }
    if n != dim {
        return Err(format!("has {n} values, expected {dim}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// word2vec binary.

fn read_binary<R: BufRead>(mut reader: R, sink: &mut Sink) -> Result<()> {
    let source = sink.source;
    let io = |e: std::io::Error| anyhow::Error::new(e).context(format!("reading {source}"));
    let mut header = Vec::new();
    (&mut reader)
        .take(4096)
        .read_until(b'\n', &mut header)
        .map_err(io)?;
    let header_line = strip_bom(trim_end(&header));
    let Some((count, dim)) = parse_header(header_line) else {
        bail!(
            "{source}: line 1: expected a `count dim` header, found {}",
            show(header_line)
        );
    };
    check_dim(dim, &format!("{source}: line 1: header"))?;
    sink.header_count = Some(count);
    sink.set_dim(dim, Some(count));

    let mut offset = header.len() as u64; // bytes consumed so far, for messages
    let mut word = Vec::with_capacity(64);
    let mut raw = vec![0u8; dim * 4];
    let mut values = vec![0f32; dim];
    while sink.rows_read < count {
        let record = sink.rows_read + 1; // 1-based vector index
        offset += skip_newlines(&mut reader).map_err(io)?;
        let word_offset = offset;
        // Fast path: the whole record (word, space, vector) is in the reader's buffer: it is
        // checked and, when wanted, decoded in place, then consumed: no copy, no allocation.
        let buf = reader.fill_buf().map_err(io)?;
        let window = &buf[..buf.len().min(MAX_WORD_BYTES + 1)];
        if let Some(space) = window.iter().position(|&b| b == b' ') {
            let end = space + 1 + raw.len();
            if end <= buf.len() {
                let location = RecordAt {
                    record,
                    word_offset,
                };
                check_binary_word(source, location, &buf[..space])?;
                binary_record(
                    sink,
                    location,
                    &buf[..space],
                    &buf[space + 1..end],
                    &mut values,
                )?;
                reader.consume(end);
                offset += end as u64;
                continue;
            }
        }
        // Slow path (a record across the buffer's end, EOF, or an error): copy it out.
        word.clear();
        let n = (&mut reader)
            .take(MAX_WORD_BYTES as u64 + 1)
            .read_until(b' ', &mut word)
            .map_err(io)?;
        offset += n as u64;
        if n == 0 {
            bail!(
                "{source}: header says {count} vectors, EOF after {}",
                sink.rows_read
            );
        }
        if word.last() != Some(&b' ') {
            if n > MAX_WORD_BYTES {
                bail!(
                    "{source}: vector {record} (byte offset {word_offset}): no space within {MAX_WORD_BYTES} bytes; not a word2vec binary file, or corrupt"
                );
            }
            bail!(
                "{source}: vector {record} (byte offset {word_offset}): EOF inside the word {} (header says {count} vectors)",
                show(&word)
            );
        }
        word.pop();
        let location = RecordAt {
            record,
            word_offset,
        };
        check_binary_word(source, location, &word)?;
        let got = read_full(&mut reader, &mut raw).map_err(io)?;
        offset += got as u64;
        if got < raw.len() {
            bail!(
                "{source}: vector {record} (word {}): EOF after {got} of {} bytes (header says {count} vectors of dim {dim})",
                show(&word),
                raw.len()
            );
        }
        binary_record(sink, location, &word, &raw, &mut values)?;
    }
    // Anything but newlines after the announced vectors is trailing data (header undercount).
    skip_newlines(&mut reader).map_err(io)?;
    if !reader.fill_buf().map_err(io)?.is_empty() {
        sink.warn(format!(
            "{source}: header says {count} vectors but data continues at byte offset {offset}; the rest of the file is ignored"
        ));
    }
    Ok(())
}

/// Where a binary record starts, for messages: its 1-based index and the byte offset of its word.
#[derive(Clone, Copy)]
struct RecordAt {
    record: usize,
    word_offset: u64,
}

/// A binary record's word (without its space) must be non-empty and hold no `\n`.
fn check_binary_word(source: &str, at: RecordAt, word: &[u8]) -> Result<()> {
    if word.is_empty() || word.contains(&b'\n') {
        bail!(
            "{source}: vector {} (byte offset {}): bad word {}; not a word2vec binary file, or corrupt",
            at.record,
            at.word_offset,
            show(word)
        );
    }
    Ok(())
}

/// One complete binary record (`raw`: its `dim * 4` vector bytes): counted, checked (the first
/// for being text), and, when `sink` wants the word, decoded (finite values only) and stored.
fn binary_record(
    sink: &mut Sink,
    at: RecordAt,
    word: &[u8],
    raw: &[u8],
    values: &mut [f32],
) -> Result<()> {
    let source = sink.source;
    let RecordAt {
        record,
        word_offset,
    } = at;
    sink.rows_read += 1;
    if record == 1 && raw.len() >= 16 && looks_like_text(raw) {
        bail!(
            "{source}: vector 1 (word {}): the vector bytes are text ({}); this looks like a word2vec text file, not binary (vectors_format = \"word2vec-text\")",
            show(word),
            show(&raw[..raw.len().min(40)])
        );
    }
    if !sink.wants(word) {
        return Ok(());
    }
    for (value, bytes) in values.iter_mut().zip(raw.chunks_exact(4)) {
        *value = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        bail!(
            "{source}: vector {record} (word {}, byte offset {word_offset}): value {} is {} (not finite)",
            show(word),
            i + 1,
            values[i]
        );
    }
    sink.push(word, values, &format!("vector {record}"));
    Ok(())
}

/// Consumes `\n` bytes; returns how many.
fn skip_newlines<R: BufRead>(reader: &mut R) -> std::io::Result<u64> {
    let mut skipped = 0u64;
    loop {
        let buf = reader.fill_buf()?;
        let n = buf.iter().take_while(|&&b| b == b'\n').count();
        let exhausted = n < buf.len() || buf.is_empty();
        reader.consume(n);
        skipped += n as u64;
        if exhausted {
            return Ok(skipped);
        }
    }
}

/// Reads until `buf` is full or EOF; returns the number of bytes read.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// True when a binary vector's bytes are printable ASCII with a space: the digits of a text row.
fn looks_like_text(raw: &[u8]) -> bool {
    raw.contains(&b' ')
        && raw
            .iter()
            .all(|&b| (0x20..0x7f).contains(&b) || b == b'\n' || b == b'\r')
}

// ---------------------------------------------------------------------------------------------
// Auto-detection.

struct Prefix {
    bytes: Vec<u8>,
    /// True when `bytes` is the whole input.
    eof: bool,
}

/// Reads ahead until the prefix holds two complete non-blank lines (the candidate header and the
/// first row) and at least [`MIN_PREFIX_BYTES`], or EOF, or [`MAX_PREFIX_BYTES`]. Each byte is
/// scanned once, whatever the reader's buffer size.
fn read_prefix<R: BufRead>(reader: &mut R) -> std::io::Result<Prefix> {
    let mut bytes = Vec::new();
    let (mut scanned, mut line_start, mut complete_lines) = (0, 0, 0);
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(Prefix { bytes, eof: true });
        }
        let take = buf.len().min(MAX_PREFIX_BYTES - bytes.len());
        bytes.extend_from_slice(&buf[..take]);
        reader.consume(take);
        for (i, &b) in bytes.iter().enumerate().skip(scanned) {
            if b == b'\n' {
                if !trim_end(&bytes[line_start..i]).is_empty() {
                    complete_lines += 1;
                }
                line_start = i + 1;
            }
        }
        scanned = bytes.len();
        let enough = complete_lines >= 2 && bytes.len() >= MIN_PREFIX_BYTES;
        if enough || bytes.len() >= MAX_PREFIX_BYTES {
            return Ok(Prefix { bytes, eof: false });
        }
    }
}

/// Decides the format from the input's first bytes (module docs). Returns the format and, when
/// the choice is ambiguous, a note to log as a warning.
fn detect(prefix: &[u8], eof: bool) -> Result<(Format, Option<String>)> {
    reject_known_non_vector_files(prefix)?;
    let prefix = strip_bom(prefix);
    // Skip leading blank lines; `first` is the first non-blank line, `after` what follows it.
    let mut rest = prefix;
    let (first, after) = loop {
        let (line, after) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        if !trim_end(line).is_empty() || after.is_empty() {
            break (trim_end(line), after);
        }
        rest = after;
    };
    if first.is_empty() {
        bail!("the input is empty");
    }
    if let Some((_count, dim)) = parse_header(first) {
        let region = &after[..after.len().min(dim.saturating_mul(4).saturating_add(4096))];
        if !is_textual(region, eof && region.len() == after.len()) {
            return Ok((Format::Word2vecBinary, None));
        }
        let second = after
            .split(|&b| b == b'\n')
            .map(trim_end)
            .find(|line| !line.is_empty());
        let Some(second) = second else {
            return Ok((Format::Word2vecText, None)); // a header and nothing else
        };
        let values = count_fields(split_word(second).1);
        if values == dim && dim == 1 {
            let header = String::from_utf8_lossy(first);
            return Ok((
                Format::Word2vecText,
                Some(format!(
                    "line 1 '{header}' is ambiguous: a `count dim` header, or a dimension-1 GloVe row; read as a header. If this is a GloVe file set vectors_format = \"glove\""
                )),
            ));
        }
        if values != dim && values == 1 {
            return Ok((
                Format::Glove,
                Some(format!(
                    "line 1 '{}' looks like a header but line 2 has 1 value, not {dim}: read as GloVe of dimension 1",
                    String::from_utf8_lossy(first)
                )),
            ));
        }
        return Ok((Format::Word2vecText, None));
    }
    let (word, values) = split_word(first);
    let text = std::str::from_utf8(values).unwrap_or("");
    let numbers = text
        .split_ascii_whitespace()
        .filter(|f| f.parse::<f32>().is_ok())
        .count();
    if !word.is_empty() && numbers >= 1 && numbers == count_fields(values) {
        return Ok((Format::Glove, None));
    }
    bail!(
        "line 1 {} is neither a `count dim` header nor a `word v1 .. vd` row; set vectors_format explicitly",
        show(&first[..first.len().min(200)])
    )
}

/// True when `region` could be part of a text vector file: valid UTF-8 (a character cut at the
/// end of an incomplete prefix is allowed) and no control bytes other than `\t`, `\r`, `\n`.
fn is_textual(region: &[u8], complete: bool) -> bool {
    if region
        .iter()
        .any(|&b| (b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n')) || b == 0x7f)
    {
        return false;
    }
    match std::str::from_utf8(region) {
        Ok(_) => true,
        Err(e) => !complete && e.error_len().is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8], format: Format) -> Result<(WordVectors, ReadReport)> {
        read_vectors(bytes, "test", format, None)
    }

    fn binary(words: &[(&str, &[f32])], newline: bool) -> Vec<u8> {
        let mut out = format!("{} {}\n", words.len(), words[0].1.len()).into_bytes();
        for (word, values) in words {
            out.extend_from_slice(word.as_bytes());
            out.push(b' ');
            for v in *values {
                out.extend_from_slice(&v.to_le_bytes());
            }
            if newline {
                out.push(b'\n');
            }
        }
        out
    }

    #[test]
    fn binary_with_and_without_newlines_and_keep() {
        let rows: &[(&str, &[f32])] = &[
            ("a", &[1.0, 2.0]),
            ("\u{e9}t\u{e9}", &[0.5, -0.5]),
            ("c", &[3.0, 4.0]),
        ];
        for newline in [false, true] {
            let bytes = binary(rows, newline);
            let (v, r) = read(&bytes, Format::Auto).unwrap();
            assert_eq!(r.format, Format::Word2vecBinary);
            assert_eq!(v.words, ["a", "\u{e9}t\u{e9}", "c"]);
            assert_eq!(v.get("c"), Some(&[3.0, 4.0][..]));
            assert_eq!(r.rows_read, 3);
            let keep: HashSet<String> = ["c".to_owned(), "zzz".to_owned()].into();
            let (v, r) =
                read_vectors(&bytes[..], "t", Format::Word2vecBinary, Some(&keep)).unwrap();
            assert_eq!(v.words, ["c"]);
            assert_eq!(v.data, [3.0, 4.0]);
            assert_eq!(r.rows_read, 3);
        }
    }

    #[test]
    fn binary_truncated_and_non_finite() {
        let bytes = binary(&[("a", &[1.0, 2.0]), ("b", &[3.0, 4.0])], false);
        for cut in 4..bytes.len() {
            let err = read(&bytes[..cut], Format::Word2vecBinary)
                .unwrap_err()
                .to_string();
            assert!(err.contains("test"), "{err}");
        }
        let bytes = binary(&[("a", &[1.0, f32::NAN])], false);
        let err = read(&bytes, Format::Word2vecBinary)
            .unwrap_err()
            .to_string();
        assert!(err.contains("'a'") || err.contains("\"a\""), "{err}");
        assert!(err.contains("not finite"), "{err}");
    }

    #[test]
    fn text_read_as_binary_is_an_error() {
        let err = read(
            b"2 4\na 0.1 0.2 0.3 0.4\nb 0.1 0.2 0.3 0.4\n",
            Format::Word2vecBinary,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("word2vec-text"), "{err}");
    }

    #[test]
    fn text_formats() {
        let text = b"2 3\r\nx 1 2 3 \r\n\ny -1 0 1e-3\r\n";
        for format in [Format::Auto, Format::Word2vecText, Format::Fasttext] {
            let (v, r) = read(text, format).unwrap();
            assert_ne!(r.format, Format::Auto);
            assert_eq!(v.words, ["x", "y"]);
            assert_eq!(v.get("y"), Some(&[-1.0, 0.0, 1e-3][..]));
            assert_eq!(r.header_count, Some(2));
        }
        let (v, r) = read(b"\xEF\xBB\xBFthe 1 2\nof 3 4", Format::Auto).unwrap();
        assert_eq!(r.format, Format::Glove);
        assert_eq!(v.words, ["the", "of"]);
        assert_eq!(r.header_count, None);
    }

    #[test]
    fn text_errors_name_line_and_word() {
        let err = read(b"1 2\nw 1 nan\n", Format::Auto)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("\"w\"") && err.contains("not finite"),
            "{err}"
        );
        let err = read(b"1 2\nw 1 x\n", Format::Auto).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("not a number"),
            "{err}"
        );
        let err = read(b"a 1 2\nb 1\n", Format::Glove)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("has 1 values, expected 2"),
            "{err}"
        );
        let err = read(b"a 1 2\n", Format::Word2vecText)
            .unwrap_err()
            .to_string();
        assert!(err.contains("glove"), "{err}");
        let err = read(b"3 3\na 1 2 3\n", Format::Glove)
            .unwrap_err()
            .to_string();
        assert!(err.contains("word2vec-text"), "{err}");
    }

    #[test]
    fn detection_rules() {
        assert!(read(b"", Format::Auto).is_err());
        assert!(read(b"hello world\n", Format::Auto).is_err());
        assert!(read(&[0x1f, 0x8b, 8, 0], Format::Auto)
            .unwrap_err()
            .to_string()
            .contains("gzip"));
        // A header-looking line followed by dimension-1 rows of a different dim: GloVe dim 1.
        let (v, r) = read(b"2 5\nx 0.5\n", Format::Auto).unwrap();
        assert_eq!(r.format, Format::Glove);
        assert_eq!(v.words, ["2", "x"]);
        assert_eq!(r.warnings.len(), 1);
        // Header only: no vectors is an error naming the source.
        let err = read(b"0 7\n", Format::Auto).unwrap_err().to_string();
        assert!(err.contains("no vectors"), "{err}");
        // Implausible dims are errors, not allocations.
        assert!(read(b"1 99999999999\nx ", Format::Word2vecBinary).is_err());
        assert!(read(b"99999999999999 3\n", Format::Word2vecBinary).is_err());
    }

    #[test]
    fn detection_through_a_one_byte_buffer() {
        // The first float starts with a '\n' byte: the first two "lines" look like text.
        let tricky = f32::from_le_bytes([b'\n', b'A', b'A', 0x3f]);
        let bytes = binary(&[("x", &[tricky, 0.5]), ("y", &[1.0, 2.0])], false);
        let reader = BufReader::with_capacity(1, &bytes[..]);
        let (v, r) = read_vectors(reader, "t", Format::Auto, None).unwrap();
        assert_eq!(r.format, Format::Word2vecBinary);
        assert_eq!(v.get("x"), Some(&[tricky, 0.5][..]));
        let text = b"the 1 2\nof 3 4\n".repeat(10_000);
        let reader = BufReader::with_capacity(1, &text[..]);
        let (v, r) = read_vectors(reader, "t", Format::Auto, None).unwrap();
        assert_eq!((r.format, v.len(), r.rows_read), (Format::Glove, 2, 20_000));
        assert_eq!(
            r.warnings.len(),
            50 + 1,
            "warnings are capped, the rest counted"
        );
    }

    #[test]
    fn binary_any_buffer_size_and_keep_filter() {
        // Records split anywhere across the reader's buffer (slow path) or whole in it (fast
        // path) read the same; the Bloom prefilter never drops a kept word.
        let mut rows: Vec<(String, Vec<f32>)> = (0..300)
            .map(|i| (format!("w{i}"), vec![i as f32, 1.0, -2.5]))
            .collect();
        rows.push((
            "\u{e9}t\u{e9}_long_word_of_more_than_16_bytes".into(),
            vec![7.0; 3],
        ));
        let refs: Vec<(&str, &[f32])> = rows.iter().map(|(w, v)| (w.as_str(), &v[..])).collect();
        let keep: HashSet<String> = [
            "w7",
            "w299",
            "w30",
            "\u{e9}t\u{e9}_long_word_of_more_than_16_bytes",
        ]
        .map(str::to_owned)
        .into();
        for newline in [false, true] {
            let bytes = binary(&refs, newline);
            let (all, _) = read(&bytes, Format::Word2vecBinary).unwrap();
            assert_eq!(all.len(), 301);
            for cap in [1, 2, 7, 16, 17, 64, 1000, 1 << 16] {
                let reader = BufReader::with_capacity(cap, &bytes[..]);
                let (v, r) = read_vectors(reader, "t", Format::Word2vecBinary, None).unwrap();
                assert_eq!(
                    (v.words.clone(), v.data.clone()),
                    (all.words.clone(), all.data.clone())
                );
                assert_eq!(r.rows_read, 301);
                let reader = BufReader::with_capacity(cap, &bytes[..]);
                let (v, _) =
                    read_vectors(reader, "t", Format::Word2vecBinary, Some(&keep)).unwrap();
                assert_eq!(v.len(), 4, "buffer {cap}");
                assert_eq!(v.get("w299"), Some(&[299.0, 1.0, -2.5][..]));
            }
        }
        // A bad word is reported with its index and byte offset on either path.
        let bad = binary(&[("a", &[1.0, 2.0]), ("b\nc", &[3.0, 4.0])], false);
        for cap in [1, 1 << 16] {
            let reader = BufReader::with_capacity(cap, &bad[..]);
            let err = read_vectors(reader, "t", Format::Word2vecBinary, None)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("vector 2 (byte offset 14)") && err.contains("bad word"),
                "{err}"
            );
        }
    }

    #[test]
    fn duplicates_first_wins() {
        let (v, r) = read(b"3 2\nw 1 0\nW 2 0\nw 3 0\n", Format::Auto).unwrap();
        assert_eq!(v.words, ["w", "W"]);
        assert_eq!(v.get("w"), Some(&[1.0, 0.0][..]));
        assert_eq!(r.warnings.len(), 1);
        assert!(r.warnings[0].contains("duplicate word \"w\""));
    }

    #[test]
    fn local_paths() {
        assert_eq!(local_path("/a/b.txt").unwrap(), PathBuf::from("/a/b.txt"));
        assert_eq!(
            local_path("file:///a/b%20c.txt").unwrap(),
            PathBuf::from("/a/b c.txt")
        );
        assert!(local_path("s3://bucket/v.bin").is_err());
    }
}
