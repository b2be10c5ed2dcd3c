//! Scope: every parser of user-provided text in `devise`, fed arbitrary Unicode (multi-byte
//! letters, combining marks, NUL and other controls, bidi marks, emoji, the BOM, non-ASCII
//! spaces; invalid UTF-8 where the input is bytes). Each never panics and returns `Ok` or an
//! error naming its input; where a round trip means something (vector files, label lists, split
//! files, names files, tar members, config values, object names) what is written reads back the
//! same. And `devise predict` end to end on images whose file names and S3 keys are not ASCII.
//!
//! | parser | input |
//! |---|---|
//! | `eval::predict::wnid_in_name` | image paths and object-store URLs |
//! | `eval::predict::read_label_list` | label lists (`--labels`) |
//! | `data::split::parse_split` | `labels.split` files |
//! | `text::hierarchy::Hierarchy::parse` | `eval.hierarchy` files |
//! | `text::labels::read_names` | `text.names` (words.txt) files |
//! | `text::labels::candidate_words`, `map_labels` | synset names -> vocabulary words |
//! | `text::vectors::read_vectors`, `read_vectors_file` | word2vec text / binary, GloVe, fastText `.vec`; file paths and `file://` URLs |
//! | `config::RunConfig::load_with_env`, `split_override`, `overlay_overrides` | TOML, `--set`, `DEVISE__*` variables, `--config` overlays |
//! | `train::fault::Faults::parse`, `from_env_values` | `DEVISE_FAULT`, `DEVISE_RESTART_ATTEMPT` |
//! | `checkpoint::split_step_url`, `list_steps`, `find_latest`; `train::Resume` | checkpoint step URLs, step folder names, `LATEST` |
//! | `storage::Store` | store URLs and object names |
//! | `data::webdataset::SampleReader` | tar member names (ustar, GNU long names, pax `path`) |
//! | `data::index::{expand_pattern, parse_split_pattern, read_sorted_classes, index_shards}`, `data::shards::{read_class_column, read_manifest, build_shards}` | shard patterns, class files, manifests, `.cls` text (also `data::verify::verify_shards`), ImageFolder file names |
//! | `data::ilsvrc::read_ilsvrc_val` | `LOC_val_solution.csv` and validation file names |
//! | `report::html::html` | class names in the HTML report |
use crate::common::launch::{devise, text};
use crate::common::shared_dir;
use devise::checkpoint;
use devise::config::{overlay_overrides, split_override, RunConfig};
use devise::data::index::{expand_pattern, parse_split_pattern, read_sorted_classes};
use devise::data::webdataset::{append_member, SampleReader};
use devise::eval::predict::{read_label_list, wnid_in_name};
use devise::storage::Store;
use devise::text::hierarchy::Hierarchy;
use devise::text::labels::{candidate_words, map_labels, read_names};
use devise::text::vectors::{read_vectors, read_vectors_file, Format};
use devise::text::{OnUnmapped, WordVectors};
use devise::train::fault::Faults;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::process::Command;

// ---------------------------------------------------------------------------------------------
// Strategies.

/// Characters that break byte-minded text handling, mixed with any `char`.
fn nasty_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => any::<char>(),
        2 => prop::sample::select(vec![
            'ß', 'ü', 'é', 'İ', 'ſ', 'K', '日', '語', // multi-byte; case maps that change length
            '\u{301}', '\u{308}', // combining marks
            '\0', '\u{1}', '\u{7f}', '\t', '\r', '\u{b}', '\u{c}', // controls
            '\u{202e}', '\u{200f}', '\u{61c}', // bidi
            '😀', '👍', '\u{fe0f}', '\u{200d}', // emoji, variation selector, ZWJ
            '\u{feff}', '\u{a0}', '\u{3000}', '\u{2028}', // BOM, non-ASCII spaces
        ]),
        2 => prop::sample::select(vec![
            'a', 'Z', 'n', '0', '9', ' ', '.', '/', '_', '-', ',', '#', '=', '[', ']', '{', '}', '%',
            '\\', '"', '\'', ':', ';',
        ]),
    ]
}

/// A string of up to `max` [`nasty_char`]s.
fn nasty(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(nasty_char(), 0..=max).prop_map(|v| v.into_iter().collect())
}

/// Like [`nasty`], without the characters in `banned`.
fn nasty_without(max: usize, banned: &'static [char]) -> impl Strategy<Value = String> {
    nasty(max).prop_map(move |s| s.chars().filter(|c| !banned.contains(c)).collect())
}

/// A non-empty token: trimmed of Unicode whitespace, free of `banned`, not starting with `#`.
fn token(max: usize, banned: &'static [char]) -> impl Strategy<Value = String> {
    nasty_without(max, banned)
        .prop_map(|s| s.trim().to_string())
        .prop_filter("non-empty, not a comment", |s| {
            !s.is_empty() && !s.starts_with('#')
        })
}

/// A wnid: `n` and 8 digits.
fn wnid() -> impl Strategy<Value = String> {
    "[0-9]{8}".prop_map(|d| format!("n{d}"))
}

/// Bytes that are mostly Unicode text, sometimes with invalid UTF-8 mixed in.
fn text_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            4 => nasty(8).prop_map(String::into_bytes),
            1 => prop::collection::vec(any::<u8>(), 0..4),
        ],
        0..max,
    )
    .prop_map(|parts| parts.concat())
}

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig::with_cases(n)
}

/// A temporary directory whose own name is not ASCII either.
fn unicode_tempdir() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let inner = dir.path().join("Daten-ü-日本語-😀");
    std::fs::create_dir(&inner).unwrap();
    (dir, inner)
}

/// `err` (with its causes) mentions `what`.
fn names(err: &anyhow::Error, what: &str) -> bool {
    format!("{err:#}").contains(what)
}

fn is_wnid(s: &str) -> bool {
    s.len() == 9 && s.starts_with('n') && s[1..].bytes().all(|b| b.is_ascii_digit())
}

// ---------------------------------------------------------------------------------------------
// predict: image names and label lists.

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn wnid_in_name_never_panics(any_text in any::<String>(), nasty_text in nasty(40)) {
        for name in [&any_text, &nasty_text] {
            if let Some(w) = wnid_in_name(name) {
                prop_assert!(is_wnid(&w) && name.contains(&w), "{name:?} -> {w}");
            }
        }
    }

    #[test]
    fn wnid_in_name_reads_a_leading_wnid_after_any_directory(
        dir in nasty(20), wnid in wnid(), tail in nasty_without(20, &['/']),
    ) {
        let path = format!("s3://bucket/{dir}/{wnid}_{tail}.JPEG");
        prop_assert_eq!(wnid_in_name(&path), Some(wnid));
    }

    #[test]
    fn wnid_in_name_reads_a_wnid_after_a_separator(
        head in nasty_without(20, &['/', 'n']),
        separator in prop::sample::select(vec!['_', ' ', '-', '.', '😀', '\u{301}', '\0', '\u{3000}']),
        wnid in wnid(),
        tail in nasty_without(10, &['/', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9']),
    ) {
        let path = format!("{head}{separator}{wnid}{tail}");
        prop_assert_eq!(wnid_in_name(&path), Some(wnid));
    }

    #[test]
    fn label_lists_round_trip_with_unicode_names(
        rows in prop::collection::vec((wnid(), nasty_without(20, &['\n'])), 1..20),
        comments in prop::collection::vec(nasty_without(20, &['\n']), 0..4),
    ) {
        let (_dir, root) = unicode_tempdir();
        let path = root.join("labels-ü.txt");
        let mut text = String::new();
        let mut want = Vec::new();
        for (i, (wnid, name)) in rows.iter().enumerate() {
            if let Some(c) = comments.get(i) {
                text.push_str(&format!("# {c}\n\n"));
            }
            if !want.contains(wnid) {
                want.push(wnid.clone());
                text.push_str(&format!("{wnid}\t{name}\n"));
            }
        }
        std::fs::write(&path, text).unwrap();
        prop_assert_eq!(read_label_list(path.to_str().unwrap()).unwrap(), want);
    }

    #[test]
    fn label_lists_of_any_text_are_read_or_named(bytes in text_bytes(30), wnid in wnid()) {
        let (_dir, root) = unicode_tempdir();
        let path = root.join("labels-ü.txt");
        let path = path.to_str().unwrap();
        for content in [bytes.clone(), [wnid.as_bytes(), b" ", &bytes].concat()] {
            std::fs::write(path, &content).unwrap();
            match read_label_list(path) {
                Ok(list) => prop_assert!(list.iter().all(|w| is_wnid(w))),
                Err(e) => prop_assert!(names(&e, path), "{e:#}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Split files, hierarchy files, names files, label mapping.

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn split_files_round_trip(
        rows in prop::collection::vec(
            (token(12, &['\t', '\n', '\r']), any::<bool>(), nasty_without(20, &['\n'])),
            1..16,
        ),
    ) {
        let mut text = String::from("# wnid\tsplit\tnames\n");
        let (mut seen, mut unseen, mut ids) = (Vec::new(), Vec::new(), HashSet::new());
        for (id, is_seen, names) in &rows {
            if !ids.insert(id.clone()) {
                continue;
            }
            let kind = if *is_seen { "seen" } else { "unseen" };
            text.push_str(&format!("{id}\t{kind}\t{names}\r\n"));
            if *is_seen { seen.push(id.clone()) } else { unseen.push(id.clone()) }
        }
        match devise::data::split::parse_split(&text, "split-ü.tsv", None) {
            Ok(split) => {
                prop_assert_eq!(&split.seen, &seen);
                prop_assert_eq!(&split.unseen, &unseen);
            }
            Err(e) => {
                prop_assert!(seen.is_empty(), "{e:#}");
                prop_assert!(names(&e, "split-ü.tsv"));
            }
        }
    }

    #[test]
    fn split_files_of_any_text_are_read_or_named(any_text in any::<String>(), nasty_text in nasty(60)) {
        for text in [any_text, nasty_text.replace(';', "\t")] {
            if let Err(e) = devise::data::split::parse_split(&text, "split-ü.tsv", Some(3)) {
                prop_assert!(names(&e, "split-ü.tsv"), "{e:#}");
            }
        }
    }

    #[test]
    fn hierarchy_files_round_trip(
        pairs in prop::collection::vec(
            (token(10, &[]), token(10, &[])).prop_map(|(a, b)| {
                let strip = |s: String| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
                (strip(a), strip(b))
            }).prop_filter("two different non-empty tokens", |(a, b)| {
                !a.is_empty() && !b.is_empty() && a != b && !a.starts_with('#')
            }),
            1..12,
        ),
    ) {
        let text: String = pairs.iter().map(|(p, c)| format!("{p} {c}\n")).collect();
        let h = Hierarchy::parse(&text, "is_a-ü.txt").unwrap();
        let nodes: HashSet<&String> = pairs.iter().flat_map(|(p, c)| [p, c]).collect();
        prop_assert_eq!(h.len(), nodes.len());
        prop_assert!(nodes.iter().all(|n| h.contains(n)));
    }

    #[test]
    fn hierarchy_files_of_any_text_are_read_or_named(any_text in any::<String>(), nasty_text in nasty(60)) {
        for text in [any_text, nasty_text] {
            if let Err(e) = Hierarchy::parse(&text, "is_a-ü.txt") {
                prop_assert!(names(&e, "is_a-ü.txt"), "{e:#}");
            }
        }
    }

    #[test]
    fn names_files_round_trip(
        rows in prop::collection::vec(
            (token(12, &['\t', '\n']), prop::collection::vec(nasty_without(12, &[',', '\n']), 1..4)),
            1..12,
        ),
    ) {
        let (_dir, root) = unicode_tempdir();
        let path = root.join("words-ü.txt");
        let mut text = String::from("# wnid\tnames\n");
        let mut want: HashMap<String, Vec<String>> = HashMap::new();
        for (wnid, list) in &rows {
            if want.contains_key(wnid) {
                continue;
            }
            text.push_str(&format!("{wnid}\t{}\n", list.join(",")));
            let names = list.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty());
            want.insert(wnid.clone(), names.collect());
        }
        std::fs::write(&path, text).unwrap();
        prop_assert_eq!(read_names(path.to_str().unwrap()).unwrap(), want);
    }

    #[test]
    fn names_files_of_any_text_are_read_or_named(bytes in text_bytes(40)) {
        let (_dir, root) = unicode_tempdir();
        let path = root.join("words-ü.txt");
        std::fs::write(&path, &bytes).unwrap();
        let path = path.to_str().unwrap();
        if let Err(e) = read_names(path) {
            prop_assert!(names(&e, path), "{e:#}");
        }
    }

    /// The words `candidate_words` lists are all that mapping can look up: reading only those
    /// (what the trainer does) maps every label exactly as the whole vocabulary does.
    #[test]
    fn mapping_needs_only_the_candidate_words(
        names_of in prop::collection::vec(prop::collection::vec(nasty(16), 1..3), 1..6),
        // Vector files never hold an empty word (their readers refuse one).
        extra_words in prop::collection::vec(nasty(8).prop_filter("a word", |w| !w.is_empty()), 0..8),
        picks in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let wnids: Vec<String> = (0..names_of.len()).map(|i| format!("n{i:08}")).collect();
        let names: HashMap<String, Vec<String>> =
            wnids.iter().cloned().zip(names_of.iter().cloned()).collect();
        let candidates: Vec<String> =
            names_of.iter().flatten().flat_map(|n| candidate_words(n)).collect();
        // A vocabulary holding some candidate words (so labels map) and some other words.
        let mut vocabulary: Vec<String> = extra_words;
        if !candidates.is_empty() {
            vocabulary.extend(picks.iter().map(|p| p.get(&candidates).clone()));
        }
        let full = vocab(&vocabulary);
        let keep: HashSet<&String> = candidates.iter().collect();
        let kept: Vec<String> = full.words.iter().filter(|w| keep.contains(w)).cloned().collect();
        let filtered = vocab(&kept);
        let a = map_labels(&wnids, &names, &full, OnUnmapped::Skip).unwrap();
        let b = map_labels(&wnids, &names, &filtered, OnUnmapped::Skip).unwrap();
        prop_assert_eq!(&a.entries, &b.entries);
        for m in a.entries.iter().filter_map(|e| e.mapping.as_ref()) {
            let norm = m.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
            prop_assert!((norm - 1.0).abs() < 1e-5);
        }
    }
}

/// A vocabulary of `words` (first occurrence wins), each word's non-zero vector a function of
/// its bytes (so a word has the same vector in every vocabulary).
fn vocab(words: &[String]) -> WordVectors {
    let mut v = WordVectors {
        dim: 3,
        ..WordVectors::default()
    };
    for w in words {
        if !v.index.contains_key(w) {
            let sum: u32 = w.bytes().map(u32::from).sum();
            v.index.insert(w.clone(), v.words.len());
            v.words.push(w.clone());
            v.data.extend_from_slice(&[
                1.0 + w.len() as f32,
                (sum % 7) as f32,
                -((sum % 3) as f32),
            ]);
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Word-vector files.

/// Finite f32 values.
fn values(dim: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![
            any::<f32>().prop_filter("finite", |v| v.is_finite()),
            -2.0f32..2.0,
        ],
        dim,
    )
}

/// Unique words (no space, no newline, not empty) with `dim`-vectors.
fn text_rows() -> impl Strategy<Value = (usize, Vec<(String, Vec<f32>)>)> {
    (1usize..5).prop_flat_map(|dim| {
        let word = nasty_without(12, &[' ', '\n']).prop_filter("non-empty", |w| !w.is_empty());
        (
            Just(dim),
            prop::collection::vec((word, values(dim)), 1..12).prop_map(|rows| {
                let mut seen = HashSet::new();
                rows.into_iter()
                    .filter(|(w, _)| seen.insert(w.clone()))
                    .collect()
            }),
        )
    })
}

/// Rows of a binary vector file: `(word bytes, vector)`.
type BinaryRows = Vec<(Vec<u8>, Vec<f32>)>;

/// Unique byte-string words (any byte but space and newline; invalid UTF-8 included) with
/// `dim`-vectors; unique also after lossy decoding (how they are stored).
fn binary_rows() -> impl Strategy<Value = (usize, BinaryRows)> {
    (1usize..9).prop_flat_map(|dim| {
        let word = prop_oneof![
            nasty_without(12, &[' ', '\n']).prop_map(String::into_bytes),
            prop::collection::vec(
                any::<u8>().prop_filter("not a separator", |b| *b != b' ' && *b != b'\n'),
                1..12
            ),
        ]
        .prop_filter("non-empty", |w| !w.is_empty());
        (
            Just(dim),
            prop::collection::vec((word, values(dim)), 1..12).prop_map(|rows| {
                let mut seen = HashSet::new();
                rows.into_iter()
                    .filter(|(w, _)| seen.insert(String::from_utf8_lossy(w).into_owned()))
                    .collect()
            }),
        )
    })
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn text_vector_files_round_trip_unicode_words((dim, rows) in text_rows(), crlf in any::<bool>()) {
        let eol = if crlf { "\r\n" } else { "\n" };
        let body: String = rows
            .iter()
            .map(|(w, v)| {
                let values: Vec<String> = v.iter().map(|x| x.to_string()).collect();
                format!("{w} {}{eol}", values.join(" "))
            })
            .collect();
        let with_header = format!("{} {dim}{eol}{body}", rows.len());
        let keep: HashSet<String> = rows.iter().step_by(2).map(|(w, _)| w.clone()).collect();
        for (format, text) in [
            (Format::Word2vecText, &with_header),
            (Format::Fasttext, &with_header),
            (Format::Glove, &body),
        ] {
            // A GloVe file's first word starting with U+FEFF loses it as a byte-order mark.
            if format == Format::Glove && rows[0].0.starts_with('\u{feff}') {
                continue;
            }
            let (v, report) = read_vectors(text.as_bytes(), "vectors-ü.txt", format, None).unwrap();
            prop_assert_eq!(v.dim, dim);
            prop_assert_eq!(&v.words, &rows.iter().map(|(w, _)| w.clone()).collect::<Vec<_>>());
            for (w, want) in &rows {
                prop_assert_eq!(bits(v.get(w).unwrap()), bits(want), "{:?}", w);
            }
            prop_assert!(report.warnings.is_empty(), "{:?}", report.warnings);
            let (v, _) = read_vectors(text.as_bytes(), "vectors-ü.txt", format, Some(&keep)).unwrap();
            prop_assert_eq!(v.words.iter().cloned().collect::<HashSet<_>>(), keep.clone());
            // Auto-detection reads it or says why (a control byte in a word reads as binary).
            if let Err(e) = read_vectors(text.as_bytes(), "vectors-ü.txt", Format::Auto, None) {
                prop_assert!(names(&e, "vectors-ü.txt"), "{e:#}");
            }
        }
    }

    #[test]
    fn binary_vector_files_round_trip_any_word_bytes(
        (dim, rows) in binary_rows(), newline in any::<bool>(),
    ) {
        let mut bytes = format!("{} {dim}\n", rows.len()).into_bytes();
        for (w, v) in &rows {
            bytes.extend_from_slice(w);
            bytes.push(b' ');
            for x in v {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
            if newline {
                bytes.push(b'\n');
            }
        }
        let words: Vec<String> = rows.iter().map(|(w, _)| String::from_utf8_lossy(w).into_owned()).collect();
        let keep: HashSet<String> = words.iter().skip(1).step_by(2).cloned().collect();
        for cap in [7, 1 << 16] {
            let reader = std::io::BufReader::with_capacity(cap, &bytes[..]);
            let (v, report) = read_vectors(reader, "vectors-ü.bin", Format::Word2vecBinary, None).unwrap();
            prop_assert_eq!(&v.words, &words);
            for ((_, want), w) in rows.iter().zip(&words) {
                prop_assert_eq!(bits(v.get(w).unwrap()), bits(want));
            }
            let invalid = rows.iter().filter(|(w, _)| std::str::from_utf8(w).is_err()).count();
            prop_assert_eq!(report.warnings.len(), invalid, "one warning per word that is not UTF-8");
            let reader = std::io::BufReader::with_capacity(cap, &bytes[..]);
            let (v, _) = read_vectors(reader, "vectors-ü.bin", Format::Word2vecBinary, Some(&keep)).unwrap();
            prop_assert_eq!(v.words.iter().cloned().collect::<HashSet<_>>(), keep.clone());
        }
        if let Err(e) = read_vectors(&bytes[..], "vectors-ü.bin", Format::Auto, None) {
            prop_assert!(names(&e, "vectors-ü.bin"), "{e:#}");
        }
    }

    #[test]
    fn vector_files_with_unicode_junk_are_read_or_named(
        header in prop_oneof![Just(String::new()), "[0-9]{1,3} [0-9]{1,2}\n"],
        lines in prop::collection::vec(text_bytes(6), 0..8),
    ) {
        let mut bytes = header.into_bytes();
        for line in lines {
            bytes.extend_from_slice(&line);
            bytes.push(b'\n');
        }
        for format in [Format::Auto, Format::Word2vecBinary, Format::Word2vecText, Format::Glove, Format::Fasttext] {
            if let Err(e) = read_vectors(&bytes[..], "vectors-ü.txt", format, None) {
                prop_assert!(names(&e, "vectors-ü.txt"), "{format}: {e:#}");
            }
        }
    }

    #[test]
    fn vector_file_locations_are_read_or_named(name in token(20, &['/', '\0']), junk in nasty(30)) {
        let (_dir, root) = unicode_tempdir();
        let path = root.join(format!("{name}.txt"));
        std::fs::write(&path, "ü 1 2\n😀 3 4\n").unwrap();
        let url = url::Url::from_file_path(&path).unwrap().to_string();
        for location in [path.to_str().unwrap(), url.as_str()] {
            let (v, _) = read_vectors_file(location, Format::Auto, None).unwrap();
            prop_assert_eq!(&v.words, &["ü", "😀"]);
        }
        let missing = root.join("missing");
        for location in [
            format!("{}/{junk}", missing.display()),
            format!("file://{}/{junk}", missing.display()),
            format!("s3://bucket/{junk}"),
            format!("{junk}://{junk}"),
        ] {
            let e = read_vectors_file(&location, Format::Auto, None).unwrap_err();
            prop_assert!(format!("{e:#}").contains(&location) || names(&e, &missing.display().to_string()), "{location:?}: {e:#}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration: TOML, --set, DEVISE__* variables, overlays.

const BASE_TOML: &str = devise::demo::DEMO_TOML;

fn no_env() -> Vec<(OsString, OsString)> {
    Vec::new()
}

/// `s` as a TOML string literal.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Would the config crate's environment source read `s` as something other than a string?
fn parses_as_scalar(s: &str) -> bool {
    s.to_lowercase().parse::<bool>().is_ok() || s.parse::<i64>().is_ok() || s.parse::<f64>().is_ok()
}

/// Keys a user might type, including the array indices the config crate would expand.
fn override_key() -> impl Strategy<Value = String> {
    prop_oneof![
        nasty(16),
        any::<String>(),
        Just("run.name".to_string()),
        (
            prop::sample::select(vec!["data.mean", "run.name", "train.softmax.epochs"]),
            any::<i64>()
        )
            .prop_map(|(k, i)| format!("{k}[{i}]")),
        nasty(6).prop_map(|s| format!("run.{s}")),
    ]
}

proptest! {
    #![proptest_config(cases(64))]

    #[test]
    fn set_items_are_split_or_named(item in prop_oneof![any::<String>(), nasty(30), override_key().prop_map(|k| format!("{k}=1"))]) {
        match split_override(&item) {
            Ok((key, _)) => prop_assert!(key.split('.').all(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))),
            Err(e) => prop_assert!(names(&e, &format!("{item:?}")), "{e:#}"),
        }
    }

    #[test]
    fn set_overrides_load_or_are_named(key in override_key(), value in prop_oneof![nasty(20), any::<String>(), Just("[1, 2]".to_string())]) {
        let item = format!("{key}={value}");
        if let Err(e) = RunConfig::load_with_env(BASE_TOML, "demo-ü.toml", std::slice::from_ref(&item), no_env()) {
            let e = format!("{e:#}");
            prop_assert!(e.contains(&format!("{item:?}")) || e.contains(&item) || e.contains("demo-ü.toml"), "{e}");
        }
    }

    #[test]
    fn unicode_config_values_round_trip(name in any::<String>(), raw in nasty(20)) {
        // A TOML string in the file, in --set, and from a DEVISE__ variable.
        let toml = BASE_TOML.replace("name = \"demo-shapes\"", &format!("name = {}", toml_string(&name)));
        prop_assert_eq!(RunConfig::load_with_env(&toml, "demo-ü.toml", &[], no_env()).unwrap().run.name, name.clone());
        let set = format!("run.name={}", toml_string(&name));
        prop_assert_eq!(RunConfig::load_with_env(BASE_TOML, "demo-ü.toml", &[set], no_env()).unwrap().run.name, name.clone());
        if !parses_as_scalar(&name) {
            let env = vec![(OsString::from("DEVISE__RUN__NAME"), OsString::from(&name))];
            prop_assert_eq!(RunConfig::load_with_env(BASE_TOML, "demo-ü.toml", &[], env).unwrap().run.name, name.clone());
        }
        // An unquoted --set value that is not TOML is taken as the string it is.
        let is_toml = toml::from_str::<toml::Table>(&format!("v = {raw}")).is_ok();
        if !is_toml {
            let set = format!("run.name={raw}");
            prop_assert_eq!(RunConfig::load_with_env(BASE_TOML, "demo-ü.toml", &[set], no_env()).unwrap().run.name, raw);
        }
    }

    #[test]
    fn config_environment_is_read_or_named(
        name in prop_oneof![
            override_key().prop_map(|k| format!("DEVISE__{}", k.replace('.', "__").to_uppercase())),
            nasty(12).prop_map(|s| format!("devise__{s}")),
            nasty(12),
        ],
        value in prop_oneof![
            nasty(12).prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..8),
        ],
    ) {
        let env = vec![(OsString::from(&name), OsString::from_vec(value.clone()))];
        // Errors name the variable, or (a known variable with a value of the wrong type, an
        // unknown key) the configuration being loaded.
        if let Err(e) = RunConfig::load_with_env(BASE_TOML, "demo-ü.toml", &[], env) {
            let e = format!("{e:#}");
            prop_assert!(e.contains(&format!("{name:?}")) || e.contains(&name) || e.contains("demo-ü.toml"), "{name:?}: {e}");
        }
    }

    #[test]
    fn config_files_of_any_text_load_or_are_named(
        text in prop_oneof![
            any::<String>(),
            nasty(60),
            (nasty(12), any::<i64>()).prop_map(|(k, i)| format!("{}\n\"{}[{i}]\" = 1\n", BASE_TOML, k.replace(['"', '\\'], ""))),
            nasty(20).prop_map(|s| format!("{BASE_TOML}\n[run.{}]\n", toml_string(&s))),
        ],
    ) {
        if let Err(e) = RunConfig::load_with_env(&text, "demo-ü.toml", &[], no_env()) {
            prop_assert!(names(&e, "demo-ü.toml"), "{e:#}");
        }
    }

    #[test]
    fn overlays_flatten_or_are_named(key in nasty(12), value in any::<String>()) {
        let (_dir, root) = unicode_tempdir();
        let path = root.join("overlay-ü.toml");
        std::fs::write(&path, format!("[run]\nname = {}\n{} = 1\n", toml_string(&value), toml_string(&key))).unwrap();
        let path = path.to_str().unwrap();
        match overlay_overrides(path) {
            Ok(items) => {
                prop_assert!(items.iter().all(|i| split_override(i).is_ok()), "{items:?}");
                // The name reads back through the same path `devise eval --config` takes.
                let name: Vec<String> = items.into_iter().filter(|i| i.starts_with("run.name=")).collect();
                let cfg = RunConfig::load_with_env(BASE_TOML, "demo-ü.toml", &name, no_env()).unwrap();
                prop_assert_eq!(cfg.run.name, value);
            }
            Err(e) => prop_assert!(names(&e, path), "{e:#}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DEVISE_FAULT / DEVISE_RESTART_ATTEMPT.

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn fault_specs_parse_or_are_named(text in prop_oneof![any::<String>(), nasty(40)]) {
        if let Err(e) = Faults::parse(&text, true) {
            prop_assert!(names(&e, devise::train::fault::ENV), "{e:#}");
        }
    }

    #[test]
    fn fault_specs_round_trip_with_unicode_padding(
        step in any::<u64>(), rank in 0usize..1024, pause in any::<u64>(),
        pad in prop::collection::vec(prop::sample::select(vec![" ", "\t", "\u{3000}", "\u{a0}", "\u{2028}", ""]), 4),
    ) {
        let text = format!("{0}nan_loss:{step}:{rank}{1};{2}checkpoint_pause_ms:{pause}{3};", pad[0], pad[1], pad[2], pad[3]);
        let f = Faults::parse(&text, true).unwrap();
        prop_assert_eq!(f.nan_loss, Some((step, rank)));
        prop_assert_eq!(f.checkpoint_pause, Some(std::time::Duration::from_millis(pause)));
    }

    #[test]
    fn fault_environment_values_are_read_or_named(
        fault in prop::option::of(prop::collection::vec(any::<u8>(), 0..12)),
        attempt in prop::option::of(prop::collection::vec(any::<u8>(), 0..4)),
    ) {
        let fault = fault.map(OsString::from_vec);
        let attempt = attempt.map(OsString::from_vec);
        match Faults::from_env_values(fault.as_deref(), attempt.as_deref()) {
            Ok(_) => prop_assert!(fault.iter().chain(&attempt).all(|v| v.to_str().is_some())),
            Err(e) => {
                // The fault value is read first, then the attempt, then the fault text parsed.
                let bad_attempt = attempt.as_ref().is_some_and(|v| v.to_str().is_none());
                let bad_fault = fault.as_ref().is_some_and(|v| v.to_str().is_none());
                let var = if bad_attempt && !bad_fault { devise::train::fault::RESTART_ATTEMPT_ENV } else { devise::train::fault::ENV };
                prop_assert!(names(&e, var), "{e:#}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoint URLs, step folders, LATEST; --resume.

proptest! {
    #![proptest_config(cases(64))]

    #[test]
    fn step_urls_parse_or_are_named(
        run in token(12, &['/', '\0']).prop_filter("not . or ..", |s| s != "." && s != ".."),
        dir in prop_oneof![nasty_without(14, &['/']), (0u64..1_000_000_000).prop_map(checkpoint::step_dir_name), "step-[0-9]{9}", nasty_without(9, &['/']).prop_map(|s| format!("step-{s}"))],
    ) {
        let (_tmp, root) = unicode_tempdir();
        let url = format!("{}/{run}/checkpoints/{dir}", root.display());
        let valid = dir.strip_prefix("step-").is_some_and(|d| d.len() == 9 && d.bytes().all(|b| b.is_ascii_digit()));
        match checkpoint::split_step_url(&url) {
            Ok((store, step)) => {
                prop_assert!(valid, "{url:?}");
                prop_assert_eq!(checkpoint::step_dir_name(step), dir.clone());
                prop_assert_eq!(store.url(), format!("{}/{run}", root.display()));
            }
            Err(e) => {
                prop_assert!(!valid || dir.contains('/'), "{url:?}: {e:#}");
                prop_assert!(names(&e, &url) || names(&e, &root.display().to_string()), "{e:#}");
            }
        }
        let resume: Result<devise::train::Resume, String> = url.parse();
        prop_assert_eq!(resume.is_ok(), dir.starts_with("step-") && !dir.contains('/'));
    }

    #[test]
    fn step_folders_and_latest_of_any_name(
        folders in prop::collection::vec(
            prop_oneof![token(12, &['/', '\0']), nasty_without(9, &['/']).prop_map(|s| format!("step-{s}"))]
                .prop_filter("not the LATEST file", |s| s != "LATEST"),
            0..6,
        ),
        steps in prop::collection::btree_set(0u64..1000, 0..4),
        latest in text_bytes(12),
    ) {
        let (_tmp, root) = unicode_tempdir();
        let run = Store::open(root.to_str().unwrap()).unwrap();
        for name in &folders {
            // Folders whose names are not step-NNNNNNNNN are not checkpoints.
            let _ = run.put(&format!("checkpoints/{name}/manifest.json"), "{}".into());
        }
        for step in &steps {
            run.put(&format!("checkpoints/{}/x", checkpoint::step_dir_name(*step)), "x".into()).unwrap();
        }
        run.put("checkpoints/LATEST", latest.into()).unwrap();
        let mut want: BTreeSet<u64> = steps.clone();
        for name in &folders {
            if let Some(d) = name.strip_prefix("step-").filter(|d| d.len() == 9 && d.bytes().all(|b| b.is_ascii_digit())) {
                want.insert(d.parse().unwrap());
            }
        }
        prop_assert_eq!(checkpoint::list_steps(&run).unwrap(), want.into_iter().collect::<Vec<_>>());
        // None of them verifies (no complete manifest): no step to resume from, and no panic.
        prop_assert_eq!(checkpoint::find_latest(&run).unwrap(), None);
    }

    #[test]
    fn resume_values_parse_or_are_named(s in prop_oneof![any::<String>(), nasty(30)]) {
        match s.parse::<devise::train::Resume>() {
            Ok(devise::train::Resume::From(url)) => prop_assert_eq!(url, s),
            Ok(_) => prop_assert!(s == "auto" || s == "never"),
            Err(e) => prop_assert!(e.contains(&s), "{e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Object stores: URLs and object names.

proptest! {
    #![proptest_config(cases(64))]

    #[test]
    fn store_urls_open_or_are_named(
        scheme in prop::sample::select(vec!["s3", "s3a", "gs", "az", "abfss", "http", "https", "memory", "file", "ftp", "", "ü"]),
        rest in prop_oneof![nasty(20), any::<String>()],
    ) {
        let url = if scheme.is_empty() { rest.clone() } else { format!("{scheme}://{rest}") };
        // open_existing: never creates a local directory.
        if let Err(e) = Store::open_existing(&url) {
            let e = format!("{e:#}");
            prop_assert!(e.contains(&url) || url.trim().is_empty() || e.contains(url.trim()), "{url:?}: {e}");
        }
    }

    #[test]
    fn object_names_round_trip_or_are_named(
        name in prop_oneof![nasty(24), any::<String>(), (nasty(8), nasty(8)).prop_map(|(a, b)| format!("{a}/{b}"))]
            .prop_filter("an object name (the empty name is the store itself)", |n| !n.trim_matches('/').is_empty()),
        data in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let (_tmp, root) = unicode_tempdir();
        for store in [Store::open("memory://").unwrap(), Store::open(root.to_str().unwrap()).unwrap()] {
            match store.put(&name, data.clone().into()) {
                Ok(()) => {
                    prop_assert_eq!(&store.get(&name).unwrap()[..], &data[..]);
                    prop_assert!(store.exists(&name).unwrap());
                    let listed: Vec<String> = store.list("").unwrap().into_iter().map(|(n, _)| n).collect();
                    prop_assert!(listed.contains(&name.trim_matches('/').to_string()), "{name:?} not in {listed:?}");
                    let mut read = Vec::new();
                    std::io::Read::read_to_end(&mut store.open_read(&name).unwrap(), &mut read).unwrap();
                    prop_assert_eq!(read, data.clone());
                    store.delete(&name).unwrap();
                    prop_assert!(!store.exists(&name).unwrap());
                }
                Err(e) => {
                    let e = format!("{e:#}");
                    let shown = format!("{:?}", name.trim_matches('/'));
                    prop_assert!(e.contains(&shown) || e.contains(name.trim_start_matches('/')), "{name:?}: {e}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shards: tar member names, patterns, class files, manifests, .cls text, ImageFolder names.

fn tar_of(members: &[(String, Vec<u8>)]) -> Option<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in members {
        append_member(&mut b, path, data).ok()?;
    }
    b.into_inner().ok()
}

/// A tar member name with an arbitrary Unicode key (up to ~300 bytes: GNU long names too).
fn member_name() -> impl Strategy<Value = (String, &'static str)> {
    (
        prop::collection::vec(token(40, &['/', '.', '\0']), 1..4).prop_map(|parts| parts.join("/")),
        prop::sample::select(vec!["jpg", "cls", "seg.png", "JSON", "ü"]),
    )
}

proptest! {
    #![proptest_config(cases(64))]

    #[test]
    fn tar_members_with_unicode_names_group_by_key(
        members in prop::collection::vec((member_name(), prop::collection::vec(any::<u8>(), 0..40)), 1..8),
    ) {
        // One sample per distinct key, fields unique within it.
        let mut seen = HashSet::new();
        let mut order: Vec<String> = Vec::new();
        let mut by_key: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
        let mut list = Vec::new();
        for ((key, field), data) in members {
            if seen.insert(key.clone()) {
                order.push(key.clone());
            }
            let fields = by_key.entry(key.clone()).or_default();
            if fields.insert(field.to_ascii_lowercase(), data.clone()).is_none() {
                list.push((key, field, data));
            }
        }
        list.sort_by_key(|(k, _, _)| order.iter().position(|o| o == k));
        let entries: Vec<(String, Vec<u8>)> = list.iter().map(|(k, f, d)| (format!("{k}.{f}"), d.clone())).collect();
        let Some(bytes) = tar_of(&entries) else {
            return Ok(()); // the tar crate refuses the name; nothing to read back
        };
        let samples: Vec<_> = SampleReader::new(&bytes[..], "shard-ü.tar").collect::<Result<_, _>>().unwrap();
        let got: Vec<(String, BTreeMap<String, Vec<u8>>)> = samples.into_iter().map(|s| (s.key, s.fields)).collect();
        let want: Vec<(String, BTreeMap<String, Vec<u8>>)> = order.iter().map(|k| (k.clone(), by_key[k].clone())).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn raw_tar_names_of_any_bytes_never_panic(
        name in prop::collection::vec(any::<u8>().prop_filter("no NUL", |b| *b != 0), 1..100),
        pax in text_bytes(20),
        long in text_bytes(30),
    ) {
        let mut out = Vec::new();
        // A ustar header with raw name bytes.
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(&name);
        h.set_size(1);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&[b'1'; 1]);
        out.extend_from_slice(&[0; 511]);
        // A pax `path` record ("<length> path=<value>\n", the length counting itself) and a GNU
        // long name of any bytes, each before a member.
        let rest = " path=".len() + pax.len() + 1;
        let mut length = rest + 1;
        while length != rest + length.to_string().len() {
            length = rest + length.to_string().len();
        }
        let record = [format!("{length} path=").as_bytes(), &pax, b"\n"].concat();
        for (kind, data) in [(tar::EntryType::XHeader, record), (tar::EntryType::GNULongName, long)] {
            let mut x = tar::Header::new_ustar();
            x.set_size(data.len() as u64);
            x.set_entry_type(kind);
            x.set_cksum();
            out.extend_from_slice(x.as_bytes());
            out.extend_from_slice(&data);
            out.resize(out.len().div_ceil(512) * 512, 0);
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(&[b'2'; 1]);
            out.extend_from_slice(&[0; 511]);
        }
        out.extend_from_slice(&[0; 1024]);
        for sample in SampleReader::new(&out[..], "shard-ü.tar").flatten() {
            prop_assert!(!sample.key.is_empty());
        }
    }

    #[test]
    fn shard_patterns_expand_or_are_named(pattern in prop_oneof![any::<String>(), nasty(30)], alternatives in prop::collection::vec(token(8, &['{', '}', ',', '\\', '$', '.']), 2..4)) {
        match expand_pattern(&pattern) {
            Ok(names) => prop_assert!(!names.is_empty()),
            Err(e) => prop_assert!(names(&e, &format!("{pattern:?}")), "{e:#}"),
        }
        let joined = format!("shard-{{{}}}.tar", alternatives.join(","));
        let want: Vec<String> = alternatives.iter().map(|a| format!("shard-{a}.tar")).collect();
        prop_assert_eq!(expand_pattern(&joined).unwrap(), want);
        match parse_split_pattern(&pattern) {
            Ok((split, p)) => prop_assert!(!split.is_empty() && !p.is_empty() && pattern.contains('=')),
            Err(e) => prop_assert!(e.contains(&pattern), "{e}"),
        }
    }

    #[test]
    fn class_files_round_trip_or_are_named(
        ids in prop::collection::btree_set(token(12, &[]).prop_map(|t| t.split_whitespace().next().unwrap_or("x").to_string()), 1..10),
        junk in text_bytes(20),
    ) {
        let (_tmp, root) = unicode_tempdir();
        let path = root.join("classes-ü.tsv");
        let text: String = ids.iter().map(|id| format!("{id}\tName ü 😀\n")).collect();
        std::fs::write(&path, format!("# ids\n\n{text}")).unwrap();
        let want: Vec<String> = ids.iter().filter(|id| !id.starts_with('#')).cloned().collect();
        prop_assert_eq!(read_sorted_classes(&path).unwrap(), want.clone());
        std::fs::write(&path, &junk).unwrap();
        if let Err(e) = devise::data::shards::read_class_column(&path) {
            prop_assert!(names(&e, &path.display().to_string()), "{e:#}");
        }
        if let Err(e) = read_sorted_classes(&path) {
            prop_assert!(names(&e, &path.display().to_string()), "{e:#}");
        }
    }
}

/// A WebDataset shard directory with Unicode split, shard, key and class names: indexed
/// (`.cls` text checked), then read back through the manifest.
fn index_and_read_back(
    split: &str,
    keys: &[String],
    classes: &[String],
    cls: &[Vec<u8>],
) -> Result<(), TestCaseError> {
    let (_tmp, root) = unicode_tempdir();
    let store = Store::open(root.to_str().unwrap()).unwrap();
    let mut members = Vec::new();
    for (key, cls) in keys.iter().zip(cls) {
        members.push((format!("{key}.jpg"), b"not decoded here".to_vec()));
        members.push((format!("{key}.cls"), cls.clone()));
    }
    let Some(tar) = tar_of(&members) else {
        return Ok(());
    };
    let shard = format!("{split}-ü-000000.tar");
    let (tar_bytes, tar_sha256) = (tar.len() as u64, sha256_hex(&tar));
    if store.put(&shard, tar.into()).is_err() {
        return Ok(()); // a name the store refuses (named in its error, tested above)
    }
    let opts = devise::data::index::IndexOptions {
        classes: classes.to_vec(),
        classes_source: "classes-ü.tsv".into(),
        shards: Vec::new(),
        overwrite: false,
    };
    let valid = cls.iter().all(|c| {
        String::from_utf8_lossy(c)
            .trim()
            .parse::<usize>()
            .is_ok_and(|i| i < classes.len())
    });
    match devise::data::index::index_shards(root.to_str().unwrap(), &opts) {
        Ok(manifest) => {
            prop_assert!(valid);
            let back = devise::data::read_manifest(root.to_str().unwrap()).unwrap();
            prop_assert_eq!(&back, &manifest);
            let info = back.split(&format!("{split}-ü")).unwrap();
            prop_assert_eq!(info.samples, keys.len() as u64);
            prop_assert_eq!(&info.shards[0].name, &shard);
            prop_assert_eq!(&back.classes, classes);
        }
        Err(e) => {
            let e = format!("{e:#}");
            prop_assert!(!valid && e.contains(&shard), "{e}");
        }
    }
    // `data verify` reads the shard through a manifest written here, whatever its `.cls` say:
    // each problem names the shard (and a sample by its key), one per `.cls` that is not an index.
    let n = keys.len() as u64;
    let mut class_counts = vec![0; classes.len()];
    class_counts[0] = n;
    let manifest = devise::data::Manifest {
        format: devise::data::shards::FORMAT.into(),
        classes: classes.to_vec(),
        splits: BTreeMap::from([(
            format!("{split}-ü"),
            devise::data::SplitInfo {
                samples: n,
                shards: vec![devise::data::ShardInfo {
                    name: shard.clone(),
                    samples: n,
                    bytes: tar_bytes,
                    sha256: tar_sha256,
                    class_counts: class_counts.clone(),
                }],
                class_counts,
            },
        )]),
    };
    store
        .put(
            "manifest.json",
            serde_json::to_vec(&manifest).unwrap().into(),
        )
        .unwrap();
    let opts = devise::data::verify::VerifyOptions {
        split: None,
        max_pixels: devise::data::DEFAULT_MAX_PIXELS,
    };
    let report = devise::data::verify::verify_shards(root.to_str().unwrap(), &opts).unwrap();
    for p in &report.problems {
        prop_assert!(p.shard == shard || p.shard == "(split)", "{p}");
        prop_assert!(p.key.as_ref().is_none_or(|k| keys.contains(k)), "{p}");
    }
    let bad_cls = |c: &Vec<u8>| {
        !String::from_utf8_lossy(c)
            .trim()
            .parse::<usize>()
            .is_ok_and(|i| i < classes.len())
    };
    let cls_problems = report
        .problems
        .iter()
        .filter(|p| p.key.is_some() && p.message.starts_with(".cls"))
        .count();
    prop_assert_eq!(cls_problems, cls.iter().filter(|c| bad_cls(c)).count());
    Ok(())
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

proptest! {
    #![proptest_config(cases(32))]

    #[test]
    fn shard_directories_with_unicode_names_index_and_read_back(
        split in token(10, &['/', '-', '\0']),
        keys in prop::collection::btree_set(token(20, &['/', '.', '\0']), 1..5),
        classes in prop::collection::btree_set(nasty(8), 1..4),
        cls in prop::collection::vec(prop_oneof![3 => (0usize..4).prop_map(|i| format!(" {i}\n").into_bytes()), 1 => text_bytes(3)], 5),
    ) {
        let keys: Vec<String> = keys.into_iter().collect();
        let classes: Vec<String> = classes.into_iter().collect();
        index_and_read_back(&split, &keys, &classes, &cls[..keys.len()])?;
    }

    #[test]
    fn manifests_of_any_text_are_read_or_named(bytes in text_bytes(40), class in nasty(10), split in nasty(10)) {
        let (_tmp, root) = unicode_tempdir();
        let store = Store::open(root.to_str().unwrap()).unwrap();
        let url = root.to_str().unwrap();
        store.put("manifest.json", bytes.into()).unwrap();
        if let Err(e) = devise::data::read_manifest(url) {
            prop_assert!(names(&e, url), "{e:#}");
        }
        let manifest = devise::data::Manifest {
            format: devise::data::shards::FORMAT.into(),
            classes: vec![class],
            splits: BTreeMap::from([(split, devise::data::SplitInfo { samples: 0, shards: Vec::new(), class_counts: vec![0] })]),
        };
        store.put("manifest.json", serde_json::to_vec(&manifest).unwrap().into()).unwrap();
        prop_assert_eq!(devise::data::read_manifest(url).unwrap(), manifest);
    }

    #[test]
    fn image_folders_with_unicode_file_names_shard_and_read_back(
        files in prop::collection::btree_set(token(30, &['/', '\0']), 1..6),
        wnid in token(12, &['/', '\0', '.']),
        ext in prop::sample::select(vec!["jpg", "JPEG", "png"]),
    ) {
        let (_tmp, root) = unicode_tempdir();
        let class_dir = root.join("src/train").join(&wnid);
        std::fs::create_dir_all(&class_dir).unwrap();
        // A hidden file named like an extension alone has no stem, so no key: not an image.
        std::fs::write(class_dir.join(format!(".{ext}")), b"hidden").unwrap();
        let mut want = BTreeSet::new();
        for name in &files {
            let file = format!("{name}.{ext}");
            if file.len() > 255 {
                continue; // longer than a file name may be
            }
            std::fs::write(class_dir.join(&file), name.as_bytes()).unwrap();
            want.insert(format!("train/{wnid}/{file}"));
        }
        let opts = devise::data::BuildOptions {
            splits: vec!["train".into()],
            classes: None,
            shard_size_bytes: 4096,
            seed: 0,
            progress: false,
        };
        let dst = root.join("shards");
        let manifest = devise::data::build_shards(&root.join("src"), dst.to_str().unwrap(), &opts).unwrap();
        let train = manifest.split("train").unwrap();
        prop_assert_eq!(train.samples, want.len() as u64);
        // Every file is one sample: its key, its bytes, and its source path in `<key>.json`.
        let mut sources = BTreeSet::new();
        for shard in &train.shards {
            let bytes = std::fs::read(dst.join(&shard.name)).unwrap();
            for sample in SampleReader::new(&bytes[..], &shard.name) {
                let sample = sample.unwrap();
                prop_assert!(!sample.key.contains('.'));
                let json: serde_json::Value = serde_json::from_slice(&sample.fields["json"]).unwrap();
                prop_assert_eq!(json["wnid"].as_str(), Some(wnid.as_str()));
                let source = json["source"].as_str().unwrap().to_string();
                let image = sample.fields.get("jpg").or(sample.fields.get("png")).unwrap();
                let stem = source.rsplit_once('.').unwrap().0.rsplit('/').next().unwrap();
                prop_assert_eq!(&image[..], stem.as_bytes());
                sources.insert(source);
            }
        }
        prop_assert_eq!(sources, want);
    }

    #[test]
    fn ilsvrc_val_csvs_with_unicode_ids_pair_or_are_named(
        ids in prop::collection::btree_set(token(16, &['/', '\0', '.', ',', '"', '\n', '\r']), 1..5),
        wnid in token(10, &[' ', ',', '"', '\n', '\r', '\t']).prop_map(|w| w.split_whitespace().next().unwrap_or("n1").to_string()),
        junk in text_bytes(30),
    ) {
        let (_tmp, root) = unicode_tempdir();
        let images_dir = root.join("val");
        std::fs::create_dir(&images_dir).unwrap();
        let mut csv = String::from("\u{feff}ImageId,PredictionString\n");
        for id in &ids {
            std::fs::write(images_dir.join(format!("{id}.JPEG")), b"x").unwrap();
            csv.push_str(&format!("{id},{wnid} 1 2 3 4\n"));
        }
        let solution_csv = root.join("LOC_val_solution-ü.csv");
        std::fs::write(&solution_csv, &csv).unwrap();
        let val = devise::data::ilsvrc::IlsvrcVal { images_dir, solution_csv: solution_csv.clone(), known_wnids: None };
        let images = devise::data::ilsvrc::read_ilsvrc_val(&val).unwrap();
        let got: Vec<(String, String)> = images.into_iter().map(|v| (v.image_id, v.wnid)).collect();
        let want: Vec<(String, String)> = ids.iter().map(|id| (id.clone(), wnid.clone())).collect();
        prop_assert_eq!(got, want);
        std::fs::write(&solution_csv, [csv.as_bytes(), &junk].concat()).unwrap();
        if let Err(e) = devise::data::ilsvrc::read_ilsvrc_val(&val) {
            prop_assert!(names(&e, &solution_csv.display().to_string()) || names(&e, &val.images_dir.display().to_string()), "{e:#}");
        }
    }

    #[test]
    fn report_pages_render_unicode_class_names(names_of in prop::collection::vec(prop_oneof![any::<String>(), nasty(30)], 1..6), title in nasty(20)) {
        let per_class: Vec<serde_json::Value> = (0..names_of.len())
            .map(|i| serde_json::json!({"wnid": format!("n{i:08}"), "images": 2, "hit_at_1": 0.5, "hit_at_5": 1.0}))
            .collect();
        let eval: devise::eval::StageEval = serde_json::from_value(serde_json::json!({
            "stage": "devise", "step": 3, "seconds": 1.0,
            "rows": {"zero_shot/devise_0": {
                "images": 4, "candidates": names_of.len(),
                "hit_at_k": {"1": 0.5, "5": 1.0}, "chance_at_k": {"1": 0.2, "5": 1.0},
                "per_class": per_class,
            }},
            "examples": [{"wnid": "n00000000", "png_base64": "", "top": [["n00000001", 0.5]]}],
        })).unwrap();
        let name_of = |wnid: &str| {
            let i: usize = wnid[1..].parse().unwrap();
            names_of.get(i).cloned().unwrap_or_default()
        };
        let markdown = format!("| class | hit@1 |\n|---|---|\n{}", names_of.iter().map(|n| format!("| {} | 1 |\n", n.replace(['|', '\n'], " "))).collect::<String>());
        let metrics = vec![serde_json::json!({"step": 1, "train/loss": 1.0}), serde_json::json!({"step": 2, "train/loss": 0.5})];
        let html = devise::report::html::html(&title, &markdown, &[eval], &metrics, &name_of).unwrap();
        prop_assert!(html.starts_with("<!DOCTYPE html>"));
    }
}

#[test]
fn image_folder_names_that_become_one_key_are_an_error() {
    let (_tmp, root) = unicode_tempdir();
    let dir = root.join("src/train/n00000001");
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["Straße.1.jpg", "Straße_1.JPEG", "ü.jpg"] {
        std::fs::write(dir.join(name), name).unwrap();
    }
    let opts = devise::data::BuildOptions {
        splits: vec!["train".into()],
        classes: None,
        shard_size_bytes: 1 << 20,
        seed: 0,
        progress: false,
    };
    let dst = root.join("shards");
    let e = devise::data::build_shards(&root.join("src"), dst.to_str().unwrap(), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Straße.1.jpg") && e.contains("Straße_1.JPEG") && e.contains("Straße_1\""),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// `devise predict` on images whose names are not ASCII, local and in S3.

/// A full-size ImageNet JPEG from `../shared` and the wnid its name starts with.
fn sample_jpeg(shared: &Path) -> (std::path::PathBuf, String) {
    let dir = shared.join("data/imagenet-sample-100");
    let mut found: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    found.sort();
    let path = found.into_iter().next().expect("an image");
    let wnid = path.file_name().unwrap().to_str().unwrap()[..9].to_string();
    assert!(is_wnid(&wnid), "{}", path.display());
    (path, wnid)
}

/// `(image, label_from_name)` of each prediction of a `devise predict --json` run.
fn predicted_labels(out: &std::process::Output) -> Vec<(String, Option<String>)> {
    assert!(out.status.success(), "{}", text(out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert!(!p["top"].as_array().unwrap().is_empty());
            (
                p["image"].as_str().unwrap().to_string(),
                p["label_from_name"].as_str().map(str::to_string),
            )
        })
        .collect()
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn predict_reads_images_with_non_ascii_names() {
    let shared = shared_dir();
    let (_dir, run) = crate::common::tiny::trained_run();
    let checkpoint = run.join("checkpoints/step-000000009");
    let (jpeg, wnid) = sample_jpeg(&shared);
    let tmp = tempfile::tempdir().unwrap();
    let names = [
        ("Straße_01.jpg".to_string(), None),
        (format!("{wnid}_ü.JPEG"), Some(&wnid)),
        (format!("日本語/{wnid}_1.jpg"), Some(&wnid)),
        (
            format!("Ünïcödé 😀/\u{202e}gpj.{wnid} (1).jpeg"),
            Some(&wnid),
        ),
    ];
    let mut images = Vec::new();
    for (name, _) in &names {
        let path = tmp.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::copy(&jpeg, &path).unwrap();
        images.push(path.to_str().unwrap().to_string());
    }
    let out = Command::new(devise())
        .args(["predict", "--checkpoint", checkpoint.to_str().unwrap()])
        .args([
            "--labels", "seen", "--top-k", "2", "--device", "cpu", "--json",
        ])
        .args(&images)
        .output()
        .unwrap();
    let got = predicted_labels(&out);
    let want: Vec<(String, Option<String>)> = images
        .iter()
        .zip(&names)
        .map(|(image, (_, wnid))| (image.clone(), wnid.cloned()))
        .collect();
    assert_eq!(got, want);
    // The table prints the names as they are.
    let out = Command::new(devise())
        .args(["predict", "--checkpoint", checkpoint.to_str().unwrap()])
        .args(["--labels", "seen", "--device", "cpu"])
        .args(&images)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(images.iter().all(|i| table.contains(i.as_str())), "{table}");
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn predict_reads_s3_objects_with_non_ascii_keys() {
    let shared = shared_dir();
    let (_dir, run) = crate::common::tiny::trained_run();
    let Some(server) = crate::common::s3::start_server("bilder") else {
        return;
    };
    let checkpoint = run.join("checkpoints/step-000000009");
    let (jpeg, wnid) = sample_jpeg(&shared);
    let keys = [
        ("Straße_01.jpg".to_string(), None),
        (format!("Ordner ü/{wnid}_ü.JPEG"), Some(&wnid)),
        (format!("日本語/{wnid}_1.jpg"), Some(&wnid)),
    ];
    let store_url = "s3://bilder";
    let mut images = Vec::new();
    for (key, _) in &keys {
        // s3s-fs keeps each object as a file under <root>/<bucket>/<key>.
        let path = server.root.path().join("bilder").join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::copy(&jpeg, &path).unwrap();
        images.push(format!("{store_url}/{key}"));
    }
    let out = crate::common::s3::s3_env(Command::new(devise()), server.port)
        .args(["predict", "--checkpoint", checkpoint.to_str().unwrap()])
        .args([
            "--labels", "seen", "--top-k", "2", "--device", "cpu", "--json",
        ])
        .args(&images)
        .output()
        .unwrap();
    let got = predicted_labels(&out);
    let want: Vec<(String, Option<String>)> = images
        .iter()
        .zip(&keys)
        .map(|(image, (_, wnid))| (image.clone(), wnid.cloned()))
        .collect();
    assert_eq!(got, want);
}
