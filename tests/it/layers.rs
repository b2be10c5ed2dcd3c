//! The library's layers (as `src/lib.rs` documents them), checked on every `crate::` path in
//! `src/**/*.rs`: a module imports from the layers below it, and from its own layer only another
//! module's `Config` section type or along one of the edges listed in [`SAME_LAYER`]. A module
//! missing from [`LAYERS`] fails too, so a new module is placed before it is used.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top-level modules by layer, top (0) to bottom (4). `src/main.rs` (the binary) is above them
/// all and is not checked.
const LAYERS: &[(&str, usize)] = &[
    // Entry points.
    ("demo", 0),
    // The run: training, evaluation, their configuration and plan.
    ("train", 1),
    ("eval", 1),
    ("config", 1),
    // What a run leaves behind.
    ("checkpoint", 2),
    ("report", 2),
    // The model and what trains it.
    ("model", 3),
    ("loss", 3),
    ("optim", 3),
    ("collective", 3),
    // Bytes, samples, words.
    ("data", 4),
    ("text", 4),
    ("storage", 4),
];

/// Imports allowed inside one layer beyond `Config` types: `(from, to, why)`.
const SAME_LAYER: &[(&str, &str, &str)] = &[
    ("train", "eval", "training evaluates after each stage"),
    ("train", "config", "the run configuration and its plan"),
    ("eval", "config", "the run configuration and its plan"),
    (
        "data",
        "storage",
        "shards are read and written through storage",
    ),
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|&(_, l)| l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`src/train/step.rs` -> `train`,
/// `src/loss.rs` -> `loss`); `None` for the crate roots.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

/// Every `crate::` path in `text` outside `//` comments: `(line, path)`, a `crate::{a, b::C}`
/// group giving one path per item.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    // Comments blanked (doc links may name any module), line breaks kept.
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let is_path_char = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
    let mut from = 0;
    while let Some(i) = code[from..].find("crate::") {
        let start = from + i;
        from = start + "crate::".len();
        if code[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            continue; // `$crate::`, `foo_crate::`
        }
        let line = code[..start].matches('\n').count() + 1;
        let rest = &code[from..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(group.len(), |(j, _)| j);
            let mut item = String::new();
            let mut depth = 0;
            for c in group[..end].chars().chain([',']) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        let path: String = item
                            .trim()
                            .chars()
                            .take_while(|&c| is_path_char(c))
                            .collect();
                        if !path.is_empty() {
                            out.push((line, format!("crate::{path}")));
                        }
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
        } else {
            let path: String = rest.chars().take_while(|&c| is_path_char(c)).collect();
            out.push((line, format!("crate::{}", path.trim_end_matches(':'))));
        }
    }
    out
}

/// Why `from` must not use `path` (a `crate::` path), or `None` when the layers allow it.
fn violation(from: &str, path: &str) -> Option<String> {
    let segments: Vec<&str> = path.split("::").collect();
    let to = *segments.get(1)?;
    if to == from || to == "self" {
        return None;
    }
    let (Some(lf), Some(lt)) = (layer(from), layer(to)) else {
        return Some(format!(
            "{from} -> {to}: a module missing from the layer table in tests/it/layers.rs"
        ));
    };
    if lt > lf {
        return None;
    }
    if lt < lf {
        return Some(format!(
            "{from} (layer {lf}) imports {to} (layer {lt}, above it)"
        ));
    }
    let config_type = segments.last() == Some(&"Config");
    if config_type || SAME_LAYER.iter().any(|&(f, t, _)| f == from && t == to) {
        return None;
    }
    Some(format!(
        "{from} imports {to}, of its own layer {lf}: only a `Config` type, or an edge listed in \
         SAME_LAYER"
    ))
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn every_crate_path_in_src_follows_the_layers() {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        if layer(&module).is_none() {
            problems.push(format!(
                "{}: module {module} is not in the layer table of tests/it/layers.rs",
                file.display()
            ));
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for (line, path) in crate_paths(&text) {
            checked += 1;
            if let Some(why) = violation(&module, &path) {
                let shown = file
                    .strip_prefix(env!("CARGO_MANIFEST_DIR"))
                    .unwrap_or(file);
                problems.push(format!("{}:{line}: `{path}`: {why}", shown.display()));
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} crate:: paths found: is the parser broken?"
    );
    assert!(
        problems.is_empty(),
        "layer rule broken:\n{}",
        problems.join("\n")
    );
}

/// `src/lib.rs` declares exactly the modules of the table, bottom layer first (data-flow order).
#[test]
fn lib_rs_declares_the_table_bottom_up() {
    let lib = std::fs::read_to_string(src_dir().join("lib.rs")).unwrap();
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';'))
        .collect();
    let table: BTreeSet<&str> = LAYERS.iter().map(|(m, _)| *m).collect();
    assert_eq!(declared.iter().copied().collect::<BTreeSet<_>>(), table);
    let layers: Vec<usize> = declared.iter().map(|m| layer(m).unwrap()).collect();
    assert!(
        layers.windows(2).all(|w| w[0] >= w[1]),
        "lib.rs declares {declared:?}: not bottom layer first"
    );
    for m in declared {
        assert!(
            lib.contains(&format!("[`{m}`]")),
            "the lib.rs map does not list {m}"
        );
    }
}

#[test]
fn the_checker_sees_grouped_and_nested_paths_and_rejects_upward_ones() {
    let text = "use crate::{model::DeviseModel, optim::{self, Optimizer}};\n\
                // crate::train in a comment\n\
                let x = crate::train::fault::get();\n";
    assert_eq!(
        crate_paths(text),
        vec![
            (1, "crate::model::DeviseModel".to_string()),
            (1, "crate::optim::".to_string()),
            (3, "crate::train::fault::get".to_string()),
        ]
    );
    assert!(violation("checkpoint", "crate::train::fault::get").is_some());
    assert!(violation("model", "crate::optim::Optimizer").is_some());
    assert!(violation("config", "crate::train::Config").is_none());
    assert!(violation("train", "crate::eval::evaluate").is_none());
    assert!(violation("eval", "crate::train::train").is_some());
    assert!(violation("storage", "crate::storage::tensors").is_none());
    assert!(violation("brand_new", "crate::storage::Store").is_some());
}
