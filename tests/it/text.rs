//! Scope: `devise::text` — word-vector readers on the field cases B11, B12, B13, B16
//! (`../shared/field-cases`), label mapping on real data (Tiny ImageNet names with the shared
//! word2vec binary; GloVe 6B 50d from `.deps/vectors` when installed), config parsing, and a
//! proptest fuzz of every reader (never a panic).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devise::text::labels::{self, MatchKind};
use devise::text::vectors::{read_vectors, read_vectors_file, Format, WordVectors};
use devise::text::{load_label_embeddings, Config, OnUnmapped};
use proptest::prelude::*;

/// The path of `../shared/field-cases/<name>`.
fn case(name: &str) -> String {
    let path = crate::common::shared_dir().join("field-cases").join(name);
    path.to_str().unwrap().to_owned()
}

/// `{err:#}`: the message with its whole context chain.
fn err_text<T>(result: anyhow::Result<T>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// Runs `f` with a tracing subscriber that records everything logged on this thread.
fn with_log<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    (out, log)
}

fn as_map(v: &WordVectors) -> BTreeMap<String, Vec<f32>> {
    v.words
        .iter()
        .map(|w| (w.clone(), v.get(w).unwrap().to_vec()))
        .collect()
}

fn write_names(dir: &Path, rows: &[(&str, &str)]) -> String {
    let path = dir.join("names.tsv");
    let mut text = String::from("# wnid\tnames\n");
    for (wnid, names) in rows {
        text.push_str(&format!("{wnid}\t{names}\n"));
    }
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn b11_word2vec_binary_with_and_without_newlines() {
    let expected = case("B11_expected.json");
    let expected: BTreeMap<String, Vec<f32>> =
        serde_json::from_str(&std::fs::read_to_string(expected).unwrap()).unwrap();
    for file in ["B11_w2v_no_newline.bin", "B11_w2v_with_newline.bin"] {
        let path = case(file);
        for format in [Format::Auto, Format::Word2vecBinary] {
            let (v, report) = read_vectors_file(&path, format, None).unwrap();
            assert_eq!(report.format, Format::Word2vecBinary, "{file}");
            assert_eq!(v.dim, 4);
            assert_eq!(v.words, ["</s>", "dog", "great_white_shark"], "{file}");
            assert_eq!(as_map(&v), expected, "{file} {format}");
            assert_eq!((report.header_count, report.rows_read), (Some(3), 3));
            assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        }
    }
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn b12_header_disagrees_with_body() {
    let overcount_vec = case("B12_header_overcount.vec");
    for path in [overcount_vec, case("B12_header_overcount.bin")] {
        for format in [
            Format::Auto,
            Format::Word2vecText,
            Format::Word2vecBinary,
            Format::Fasttext,
        ] {
            let is_bin = path.ends_with(".bin");
            if matches!(format, Format::Word2vecBinary) != is_bin && format != Format::Auto {
                continue;
            }
            let err = err_text(read_vectors_file(&path, format, None));
            assert!(err.contains("header says 4 vectors, EOF after 3"), "{err}");
            assert!(
                err.contains("B12_header_overcount"),
                "names the file: {err}"
            );
        }
    }

    let path = case("B12_header_undercount.vec");
    let (v, report) = read_vectors_file(&path, Format::Auto, None).unwrap();
    assert_eq!(report.format, Format::Word2vecText);
    assert_eq!(v.words, ["a", "b"]);
    assert_eq!(v.get("b"), Some(&[0.4, 0.5, 0.6][..]));
    assert_eq!((report.header_count, report.rows_read), (Some(2), 2));
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(report.warnings[0].contains("header says 2 vectors but data continues at line 4"));

    let path = case("B12_row_dim_mismatch.vec");
    for format in [Format::Auto, Format::Word2vecText, Format::Fasttext] {
        let err = err_text(read_vectors_file(&path, format, None));
        assert!(err.contains("line 3") && err.contains("\"b\""), "{err}");
        assert!(err.contains("has 2 values, expected 3"), "{err}");
    }
    // Only rows of kept words are parsed: the bad row of 'b' is skipped when 'b' is not needed.
    let keep: HashSet<String> = ["c".to_owned()].into();
    let (v, _) = read_vectors_file(&path, Format::Auto, Some(&keep)).unwrap();
    assert_eq!(v.words, ["c"]);
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn b13_glove_without_header() {
    let path = case("B13_glove_noheader.txt");
    for format in [Format::Auto, Format::Glove] {
        let (v, report) = read_vectors_file(&path, format, None).unwrap();
        assert_eq!(report.format, Format::Glove);
        assert_eq!(v.words, ["the", ",", "1999"]);
        assert_eq!(v.get("1999"), Some(&[0.7, 0.8, 0.9][..]));
        assert_eq!(report.header_count, None);
    }
    // The reader that insists on a header names the problem.
    let err = err_text(read_vectors_file(&path, Format::Word2vecText, None));
    assert!(err.contains("line 1") && err.contains("glove"), "{err}");

    let path = case("B13_glove_dim1_numeric.txt");
    let (v, report) = read_vectors_file(&path, Format::Glove, None).unwrap();
    assert_eq!(v.words, ["2", "3", "cat"]);
    assert_eq!(v.data, [1.0, 1.0, 0.5]);
    assert_eq!(report.format, Format::Glove);
    // Auto: ambiguous; it must say which format it chose (in the log and the report).
    let ((v, report), log) = with_log(|| read_vectors_file(&path, Format::Auto, None).unwrap());
    assert_eq!(report.format, Format::Word2vecText);
    assert_eq!(v.words, ["3", "cat"]);
    assert!(
        report.warnings[0].contains("auto-detected word2vec-text"),
        "{:?}",
        report.warnings
    );
    assert!(
        log.contains("WARN") && log.contains("auto-detected word2vec-text"),
        "{log}"
    );
    assert!(log.contains("vectors_format = \"glove\""), "{log}");
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn b16_duplicates_and_case_collisions() {
    let path = case("B16_duplicates.vec");
    let ((v, report), log) = with_log(|| read_vectors_file(&path, Format::Auto, None).unwrap());
    assert_eq!(v.words, ["apple", "Apple", "pear"]);
    assert_eq!(
        v.get("apple"),
        Some(&[1.0, 0.0, 0.0][..]),
        "first occurrence wins"
    );
    assert_eq!(v.get("Apple"), Some(&[0.0, 1.0, 0.0][..]));
    assert_eq!((report.header_count, report.rows_read), (Some(4), 4));
    assert_eq!(report.warnings.len(), 1);
    assert!(
        report.warnings[0].contains("duplicate word \"apple\""),
        "{:?}",
        report.warnings
    );
    assert!(log.contains("duplicate word \"apple\""), "{log}");

    // Through the label mapping: 3 rows; "APPLE" falls back to lowercase 'apple' (first vector),
    // and an exact 'Apple' is never replaced by 'apple'.
    let dir = tempfile::tempdir().unwrap();
    let names = write_names(
        dir.path(),
        &[
            ("n1", "apple"),
            ("n2", "Apple"),
            ("n3", "pear"),
            ("n4", "APPLE"),
        ],
    );
    let cfg = Config {
        vectors: format!("file://{path}"),
        vectors_format: Format::Auto,
        names,
        on_unmapped: OnUnmapped::Error,
    };
    let wnids: Vec<String> = ["n1", "n2", "n3", "n4"].map(String::from).to_vec();
    let e = load_label_embeddings(&cfg, &wnids).unwrap();
    let m: Vec<_> = e
        .entries
        .iter()
        .map(|e| e.mapping.clone().unwrap())
        .collect();
    assert_eq!(m[0].vector, [1.0, 0.0, 0.0]);
    assert_eq!(
        (m[1].via, m[1].vector.as_slice()),
        (MatchKind::Exact, &[0.0, 1.0, 0.0][..])
    );
    assert_eq!(
        (m[3].via, m[3].words.as_slice()),
        (MatchKind::Lowercase, &["apple".to_owned()][..])
    );
    assert_eq!(e.matrix(&wnids[..3]).unwrap().len(), 3 * 3);
    assert_eq!(e.coincident, vec![vec!["n1".to_owned(), "n4".to_owned()]]);
    assert_eq!(e.vectors_report.format, Format::Word2vecText);
}

#[test]
fn config_parsing_and_names_errors() {
    let cfg: Config =
        serde_json::from_str(r#"{"vectors": "v.bin", "names": "words.txt"}"#).unwrap();
    assert_eq!(
        (cfg.vectors_format, cfg.on_unmapped),
        (Format::Auto, OnUnmapped::Skip)
    );
    let cfg: Config = serde_json::from_str(
        r#"{"vectors": "v", "names": "n", "vectors_format": "word2vec-binary", "on_unmapped": "error"}"#,
    )
    .unwrap();
    assert_eq!(
        (cfg.vectors_format, cfg.on_unmapped),
        (Format::Word2vecBinary, OnUnmapped::Error)
    );
    for name in ["word2vec-text", "glove", "fasttext", "auto"] {
        let f: Format = serde_json::from_str(&format!("\"{name}\"")).unwrap();
        assert_eq!(f.name(), name);
    }
    assert!(
        serde_json::from_str::<Config>(r#"{"vectors": "v", "names": "n", "typo": 1}"#).is_err()
    );

    let dir = tempfile::tempdir().unwrap();
    let names = write_names(dir.path(), &[("n1", " a ,b,, c d ")]);
    let table = labels::read_names(&names).unwrap();
    assert_eq!(table["n1"], ["a", "b", "c d"]);
    std::fs::write(&names, "n1\ta\nn1\tb\n").unwrap();
    let err = err_text(labels::read_names(&names));
    assert!(err.contains("line 2") && err.contains("n1"), "{err}");
    std::fs::write(&names, "n1 a\n").unwrap();
    assert!(err_text(labels::read_names(&names)).contains("line 1"));

    // A wnid that is not in the names file: error naming both.
    std::fs::write(&names, "n1\ta\n").unwrap();
    let vectors = dir.path().join("v.txt");
    std::fs::write(&vectors, "a 1 0\n").unwrap();
    let cfg = Config {
        vectors: vectors.to_str().unwrap().to_owned(),
        vectors_format: Format::Auto,
        names: names.clone(),
        on_unmapped: OnUnmapped::Skip,
    };
    let err = err_text(load_label_embeddings(
        &cfg,
        &["n1".to_owned(), "n7".to_owned()],
    ));
    assert!(err.contains("n7") && err.contains(&names), "{err}");
}

fn shared_file(rel: &str) -> PathBuf {
    crate::common::shared_dir().join(rel)
}

fn tsv_wnids(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split('\t').next().unwrap().to_owned())
        .collect()
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn real_tiny_imagenet_labels_with_wiki_skipgram() {
    let meta = shared_file("data/imagenet-meta");
    let wnids = tsv_wnids(&meta.join("tiny200_wnids_names.tsv"));
    assert_eq!(wnids.len(), 200);
    let cfg = Config {
        vectors: shared_file("data/vectors/wiki-skipgram-300d.bin")
            .to_str()
            .unwrap()
            .into(),
        vectors_format: Format::Auto,
        names: meta.join("words.txt").to_str().unwrap().into(),
        on_unmapped: OnUnmapped::Skip,
    };
    let started = Instant::now();
    let e = load_label_embeddings(&cfg, &wnids).unwrap();
    println!("loaded in {:.2?} (test profile)", started.elapsed());
    let r = &e.vectors_report;
    assert_eq!(
        (r.format, r.header_count, r.rows_read),
        (Format::Word2vecBinary, Some(28_432), 28_432)
    );
    assert_eq!(e.dim, 300);

    let unmapped: Vec<(String, String)> = e
        .unmapped()
        .iter()
        .map(|u| (u.wnid.clone(), u.names.join(", ")))
        .collect();
    println!("unmapped: {unmapped:?}");
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for m in e.entries.iter().filter_map(|e| e.mapping.as_ref()) {
        *by_kind.entry(format!("{:?}", m.via)).or_default() += 1;
    }
    println!("mapped via: {by_kind:?}; coincident: {:?}", e.coincident);
    // The data README: "Some name of 198/200 Tiny ImageNet ... classes is fully covered".
    let unmapped_wnids: Vec<&str> = unmapped.iter().map(|(w, _)| w.as_str()).collect();
    assert_eq!(
        unmapped_wnids,
        ["n07875152", "n04532106"],
        "potpie, vestment"
    );
    assert_eq!(unmapped[0].1, "potpie");
    assert_eq!(unmapped[1].1, "vestment");

    // First name wins: 'Egyptian cat' maps through its tokens (lower-case vocabulary).
    let cat = e.entries.iter().find(|e| e.wnid == "n02124075").unwrap();
    let m = cat.mapping.as_ref().unwrap();
    assert_eq!(
        (m.name.as_str(), m.via),
        ("Egyptian cat", MatchKind::TokenMean)
    );
    assert_eq!(m.words, ["egyptian", "cat"]);
    for entry in e.entries.iter().filter(|e| e.mapping.is_some()) {
        let v = &entry.mapping.as_ref().unwrap().vector;
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{} norm {norm}", entry.wnid);
    }
    let mapped: Vec<String> = e
        .entries
        .iter()
        .filter(|e| e.mapping.is_some())
        .map(|e| e.wnid.clone())
        .collect();
    assert_eq!(e.matrix(&mapped).unwrap().len(), 198 * 300);
    assert!(err_text(e.matrix(&["n07875152".to_owned()])).contains("potpie"));
    let strict = Config {
        on_unmapped: OnUnmapped::Error,
        ..cfg
    };
    let err = err_text(load_label_embeddings(&strict, &wnids));
    assert!(
        err.contains("2 of 200") && err.contains("vestment") && err.contains("potpie"),
        "{err}"
    );
}

#[test]
fn real_glove_6b_50d_if_installed() {
    let glove = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".deps/vectors/glove.6B.50d.txt");
    if !glove.is_file() {
        eprintln!(
            "SKIP: {} not installed (scripts/setup installs it)",
            glove.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = write_names(
        dir.path(),
        &[
            ("s1", "red circle"),
            ("s2", "Blue square, blue"),
            ("s3", "great white shark, white shark"),
            ("s4", "jack-o'-lantern"),
            ("s5", "Egyptian cat"),
            ("s6", "qqqxxyz zzzqqq"),
        ],
    );
    let cfg = Config {
        vectors: glove.to_str().unwrap().into(),
        vectors_format: Format::Auto,
        names,
        on_unmapped: OnUnmapped::Skip,
    };
    let wnids: Vec<String> = ["s1", "s2", "s3", "s4", "s5", "s6"]
        .map(String::from)
        .to_vec();
    let started = Instant::now();
    let e = load_label_embeddings(&cfg, &wnids).unwrap();
    println!("GloVe 6B 50d: {:.2?} (test profile)", started.elapsed());
    let r = &e.vectors_report;
    assert_eq!(
        (r.format, r.header_count, r.rows_read, e.dim),
        (Format::Glove, None, 400_000, 50)
    );
    let via: Vec<Option<(MatchKind, Vec<String>)>> = e
        .entries
        .iter()
        .map(|e| e.mapping.as_ref().map(|m| (m.via, m.words.clone())))
        .collect();
    let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        via[0],
        Some((MatchKind::TokenMean, words(&["red", "circle"])))
    );
    assert_eq!(
        via[1],
        Some((MatchKind::TokenMean, words(&["blue", "square"]))),
        "lowercase token"
    );
    assert_eq!(
        via[2],
        Some((MatchKind::TokenMean, words(&["great", "white", "shark"])))
    );
    assert_eq!(
        via[3],
        Some((MatchKind::TokenMean, words(&["jack", "o", "lantern"])))
    );
    assert_eq!(
        via[4],
        Some((MatchKind::TokenMean, words(&["egyptian", "cat"])))
    );
    assert_eq!(via[5], None);
}

/// GloVe 6B 50d (as `scripts/setup.sh` installs it) for the real Tiny ImageNet names.
#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn real_glove_6b_50d_maps_the_tiny_imagenet_names() {
    let glove = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".deps/vectors/glove.6B.50d.txt");
    let meta = shared_file("data/imagenet-meta");
    let tiny = tsv_wnids(&meta.join("tiny200_wnids_names.tsv"));
    let cfg = Config {
        vectors: glove.to_str().unwrap().into(),
        vectors_format: Format::Auto,
        names: meta.join("words.txt").to_str().unwrap().into(),
        on_unmapped: OnUnmapped::Skip,
    };
    let e = load_label_embeddings(&cfg, &tiny).unwrap();
    let unmapped: Vec<String> = e
        .unmapped()
        .iter()
        .map(|u| format!("{} ({})", u.wnid, u.names.join(", ")))
        .collect();
    println!(
        "GloVe unmapped of Tiny ImageNet: {unmapped:?}; coincident {:?}",
        e.coincident
    );
    assert!(unmapped.len() <= 2, "{unmapped:?}");
}

/// Valid inputs in every format, mutated by the fuzz test.
fn seeds() -> Vec<Vec<u8>> {
    let mut binary = b"3 2\nab ".to_vec();
    for (i, word) in ["", "cd ", "\nef "].iter().enumerate() {
        binary.extend_from_slice(word.as_bytes());
        binary.extend_from_slice(&(i as f32).to_le_bytes());
        binary.extend_from_slice(&0.5f32.to_le_bytes());
    }
    vec![
        binary,
        b"2 3\na 0.1 0.2 0.3\nb 0.4 0.5 0.6\n".to_vec(),
        b"the 0.1 0.2\n, 0.3 0.4\r\n1999 1e-3 -2\n".to_vec(),
        b"2 1\n3 1\ncat 0.5\n".to_vec(),
        b"4 3\napple 1 0 0\nApple 0 1 0\napple 0 0 1\npear 1 1 1\n".to_vec(),
    ]
}

const FORMATS: [Format; 5] = [
    Format::Auto,
    Format::Word2vecBinary,
    Format::Word2vecText,
    Format::Glove,
    Format::Fasttext,
];

fn check_no_panic(bytes: &[u8]) {
    let keep: HashSet<String> = ["a", "cd", "the", "apple", "1999"].map(String::from).into();
    for format in FORMATS {
        for keep in [None, Some(&keep)] {
            if let Ok((v, report)) = read_vectors(bytes, "fuzz", format, keep) {
                assert_eq!(v.data.len(), v.words.len() * v.dim);
                assert_eq!(v.index.len(), v.words.len());
                assert_ne!(report.format, Format::Auto);
                assert!(v.data.iter().all(|x| x.is_finite()));
                if let Some(keep) = keep {
                    assert!(v.words.iter().all(|w| keep.contains(w)));
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn fuzz_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_no_panic(&bytes);
    }

    #[test]
    fn fuzz_mutated_files_never_panic(
        seed in 0usize..5,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..4), 1..6),
    ) {
        let mut bytes = seeds()[seed].clone();
        for (at, byte, op) in edits {
            let at = if bytes.is_empty() { 0 } else { at % (bytes.len() + 1) };
            match op {
                0 if at < bytes.len() => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                2 if at < bytes.len() => { bytes.remove(at); }
                _ => bytes.truncate(at),
            }
        }
        check_no_panic(&bytes);
    }

    #[test]
    fn fuzz_mapping_never_panics(name in "\\PC{0,20}", words in proptest::collection::vec("[a-zA-Z_ -]{1,8}", 1..6)) {
        let mut v = WordVectors { dim: 2, ..WordVectors::default() };
        for (i, w) in words.iter().enumerate() {
            if v.index.insert(w.clone(), v.words.len()).is_none() {
                v.words.push(w.clone());
                v.data.extend_from_slice(&[i as f32, 1.0 - i as f32]);
            }
        }
        let names: HashMap<String, Vec<String>> = [("n1".to_owned(), vec![name.clone()])].into();
        let e = labels::map_labels(&["n1".to_owned()], &names, &v, OnUnmapped::Skip).unwrap();
        if let Some(m) = &e.entries[0].mapping {
            let norm = m.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
            prop_assert!((norm - 1.0).abs() < 1e-5);
            let candidates = labels::candidate_words(&name);
            prop_assert!(m.words.iter().all(|w| candidates.contains(w)));
        }
    }
}
