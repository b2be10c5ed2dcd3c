//! The ILSVRC-2012 validation set as it is distributed: a flat folder of images
//! (`ILSVRC2012_val_00000001.JPEG` ... `ILSVRC2012_val_00050000.JPEG`, no class folders) and the
//! labels in Kaggle's `LOC_val_solution.csv` (ImageNet Object Localization Challenge):
//!
//! ```text
//! ImageId,PredictionString
//! ILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295
//! ```
//!
//! `PredictionString` is space-separated groups of `wnid x_min y_min x_max y_max` (one group per
//! bounding box, pixels); the image's label is the FIRST token. The boxes are not used.
//!
//! [`read_ilsvrc_val`] pairs every image with its row and refuses anything that does not pair up,
//! naming the file and the CSV line: a row whose image is missing, an image without a row, two
//! rows for one ImageId, an empty or malformed `PredictionString`, a wnid outside the known class
//! list. `build-shards --ilsvrc-val-dir DIR --ilsvrc-val-solution CSV` turns the result into the
//! split `val` ([`crate::data::shards::build_shards_from`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where the ILSVRC-2012 validation images and their labels are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IlsvrcVal {
    /// The flat folder of validation images (`ILSVRC2012_val_NNNNNNNN.JPEG`; any `.jpeg`, `.jpg`
    /// or `.png` file counts as an image, and its name without the extension is its ImageId).
    pub images_dir: PathBuf,
    /// Kaggle's `LOC_val_solution.csv` (header `ImageId,PredictionString`).
    pub solution_csv: PathBuf,
    /// Wnids a row may name (e.g. the whole `--classes` file): a row naming another wnid is an
    /// error (a typo guard, or the wrong CSV). `None`: any wnid is accepted. Which of the accepted
    /// rows are sharded is decided by [`crate::data::BuildOptions::classes`].
    pub known_wnids: Option<Vec<String>>,
}

/// One validation image with its label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValImage {
    /// `ILSVRC2012_val_00000001`: the file name without its extension, and the CSV's `ImageId`.
    pub image_id: String,
    /// The label: the first token of the row's `PredictionString`.
    pub wnid: String,
    /// The image file (inside [`IlsvrcVal::images_dir`]).
    pub path: PathBuf,
    /// File name inside [`IlsvrcVal::images_dir`], e.g. `ILSVRC2012_val_00000001.JPEG`.
    pub file_name: String,
    /// Size of the file when it was listed, bytes.
    pub bytes: u64,
}

/// Image file extensions (compared case-insensitively), as for ImageFolder trees.
pub(crate) const IMAGE_EXTENSIONS: &[&str] = &["jpeg", "jpg", "png"];

/// At most this many problems are spelled out in one error (then "... and N more").
const MAX_LISTED: usize = 10;

/// Reads the solution CSV and the image folder and pairs them; sorted by ImageId.
///
/// Errors (each names the file, and for CSV problems the line): unreadable folder or CSV, a header
/// other than `ImageId,PredictionString`, a record with another number of fields, an empty
/// ImageId, an empty `PredictionString` or one whose tokens are not groups of 5, an ImageId on two
/// lines, a wnid outside [`IlsvrcVal::known_wnids`], a row whose image is not in the folder, an
/// image in the folder without a row, two images with one ImageId (`x.JPEG` and `x.png`), no
/// rows at all. Up to 10 problems are listed in one error, then the count of the rest.
pub fn read_ilsvrc_val(val: &IlsvrcVal) -> Result<Vec<ValImage>> {
    let rows = read_solution(&val.solution_csv, val.known_wnids.as_deref())?;
    let csv = val.solution_csv.display();
    let dir = &val.images_dir;
    let mut problems = Vec::new();

    // ImageId -> (file name, path, size) of every image file in the folder.
    let mut files: BTreeMap<String, (String, PathBuf, u64)> = BTreeMap::new();
    let mut ignored = 0usize;
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((stem, ext)) = name.rsplit_once('.') else {
            ignored += 1;
            continue;
        };
        // metadata() follows symbolic links: a linked image is an image.
        let meta = std::fs::metadata(entry.path());
        let is_image = IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str())
            && meta.as_ref().is_ok_and(|m| m.is_file());
        if !is_image {
            if entry.path() != val.solution_csv {
                ignored += 1;
            }
            continue;
        }
        let size = meta.map(|m| m.len()).unwrap_or_default();
        if let Some((other, _, _)) = files.get(stem) {
            problems.push(format!(
                "{}: two images for ImageId {stem}: {other} and {name}",
                dir.display()
            ));
            continue;
        }
        files.insert(stem.to_string(), (name.clone(), entry.path(), size));
    }
    if ignored > 0 {
        tracing::warn!(
            "{}: {ignored} entries are not image files (.jpeg/.jpg/.png) and were ignored",
            dir.display()
        );
    }
    for (id, (name, _, _)) in &files {
        if !rows.contains_key(id) {
            problems.push(format!(
                "{}: image without a row in {csv} (no ImageId {id})",
                dir.join(name).display()
            ));
        }
    }
    let mut out = Vec::with_capacity(rows.len());
    for (id, row) in rows {
        match files.remove(&id) {
            Some((file_name, path, bytes)) => out.push(ValImage {
                image_id: id,
                wnid: row.wnid,
                path,
                file_name,
                bytes,
            }),
            None => problems.push(format!(
                "{csv}:{}: ImageId {id} has no image in {} (no {id}.JPEG, .jpg or .png)",
                row.line,
                dir.display()
            )),
        }
    }
    if !problems.is_empty() {
        bail!("{}", list_problems(&problems));
    }
    if out.is_empty() {
        bail!("{csv}: no rows, so no validation images");
    }
    Ok(out)
}

struct Row {
    wnid: String,
    line: u64,
}

/// `ImageId -> (label wnid, line)` of every row of the solution CSV.
fn read_solution(path: &Path, known: Option<&[String]>) -> Result<BTreeMap<String, Row>> {
    let shown = path.display();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_path(path)
        .with_context(|| format!("opening {shown}"))?;
    let header = reader
        .headers()
        .with_context(|| format!("{shown}: reading the header"))?
        .clone();
    let names: Vec<&str> = header
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').trim())
        .collect();
    if names != ["ImageId", "PredictionString"] {
        bail!("{shown}:1: header {names:?}, expected ImageId,PredictionString (Kaggle's LOC_val_solution.csv)");
    }
    let known: Option<std::collections::HashSet<&str>> =
        known.map(|k| k.iter().map(String::as_str).collect());
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut problems = Vec::new();
    for record in reader.records() {
        // csv's errors carry the line ("record 3 (line: 4, byte: 120): found record with 3
        // fields, but the previous record has 2 fields").
        let record = record.with_context(|| format!("{shown}: malformed CSV"))?;
        let line = record.position().map_or(0, |p| p.line());
        let (Some(id), Some(prediction)) = (record.get(0), record.get(1)) else {
            problems.push(format!(
                "{shown}:{line}: expected 2 fields (ImageId,PredictionString)"
            ));
            continue;
        };
        let id = id.trim();
        let tokens: Vec<&str> = prediction.split_whitespace().collect();
        if id.is_empty() {
            problems.push(format!("{shown}:{line}: empty ImageId"));
            continue;
        }
        let Some(&wnid) = tokens.first() else {
            problems.push(format!(
                "{shown}:{line}: ImageId {id}: empty PredictionString (expected `wnid x_min y_min x_max y_max` ...)"
            ));
            continue;
        };
        if !tokens.len().is_multiple_of(5) {
            problems.push(format!(
                "{shown}:{line}: ImageId {id}: PredictionString has {} tokens, expected groups of 5 (`wnid x_min y_min x_max y_max`)",
                tokens.len()
            ));
            continue;
        }
        if let Some(known) = &known {
            if !known.contains(wnid) {
                problems.push(format!(
                    "{shown}:{line}: ImageId {id}: wnid {wnid} is not in the class list"
                ));
                continue;
            }
        }
        if let Some(first) = rows.get(id) {
            problems.push(format!(
                "{shown}:{line}: ImageId {id} again (first on line {})",
                first.line
            ));
            continue;
        }
        rows.insert(
            id.to_string(),
            Row {
                wnid: wnid.to_string(),
                line,
            },
        );
    }
    if !problems.is_empty() {
        bail!("{}", list_problems(&problems));
    }
    Ok(rows)
}

/// The first [`MAX_LISTED`] problems, one per line, then how many more there are.
fn list_problems(problems: &[String]) -> String {
    let mut text = problems[..problems.len().min(MAX_LISTED)].join("\n");
    if problems.len() > MAX_LISTED {
        text.push_str(&format!(
            "\n... and {} more problems",
            problems.len() - MAX_LISTED
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(csv: &str, images: &[&str]) -> (tempfile::TempDir, IlsvrcVal) {
        let dir = tempfile::tempdir().unwrap();
        let images_dir = dir.path().join("val");
        std::fs::create_dir(&images_dir).unwrap();
        for name in images {
            std::fs::write(images_dir.join(name), b"jpeg bytes").unwrap();
        }
        let solution_csv = dir.path().join("LOC_val_solution.csv");
        std::fs::write(&solution_csv, csv).unwrap();
        let val = IlsvrcVal {
            images_dir,
            solution_csv,
            known_wnids: None,
        };
        (dir, val)
    }

    const HEADER: &str = "ImageId,PredictionString\n";

    #[test]
    fn pairs_rows_with_images_and_takes_the_first_wnid() {
        let csv = format!(
            "{HEADER}ILSVRC2012_val_00000002,n02 1 2 3 4 n09 5 6 7 8 \nILSVRC2012_val_00000001,n01 10 20 30 40\n"
        );
        let (_d, val) = setup(
            &csv,
            &[
                "ILSVRC2012_val_00000001.JPEG",
                "ILSVRC2012_val_00000002.JPEG",
                "notes.txt",
            ],
        );
        let got = read_ilsvrc_val(&val).unwrap();
        let summary: Vec<_> = got
            .iter()
            .map(|v| (v.image_id.as_str(), v.wnid.as_str(), v.bytes))
            .collect();
        assert_eq!(
            summary,
            [
                ("ILSVRC2012_val_00000001", "n01", 10),
                ("ILSVRC2012_val_00000002", "n02", 10)
            ]
        );
        assert_eq!(got[0].file_name, "ILSVRC2012_val_00000001.JPEG");
    }

    #[test]
    fn every_mismatch_names_file_and_line() {
        let err = |csv: &str, images: &[&str], known: Option<&[&str]>| -> String {
            let (_d, mut val) = setup(csv, images);
            val.known_wnids = known.map(|k| k.iter().map(|s| s.to_string()).collect());
            format!("{:#}", read_ilsvrc_val(&val).unwrap_err())
        };
        let one = ["ILSVRC2012_val_00000001.JPEG"];
        let row1 = "ILSVRC2012_val_00000001,n01 1 2 3 4\n";

        let e = err(
            &format!("{HEADER}{row1}ILSVRC2012_val_00000002,n02 1 2 3 4\n"),
            &one,
            None,
        );
        assert!(
            e.contains("LOC_val_solution.csv:3: ImageId ILSVRC2012_val_00000002 has no image"),
            "{e}"
        );
        let e = err(
            &format!("{HEADER}{row1}"),
            &[one[0], "ILSVRC2012_val_00000009.JPEG"],
            None,
        );
        assert!(
            e.contains("ILSVRC2012_val_00000009.JPEG: image without a row in")
                && e.contains("LOC_val_solution.csv"),
            "{e}"
        );
        let e = err(&format!("{HEADER}{row1}"), &one, Some(&["n02"]));
        assert!(
            e.contains("LOC_val_solution.csv:2: ImageId ILSVRC2012_val_00000001: wnid n01 is not in the class list"),
            "{e}"
        );
        let e = err(&format!("{HEADER}ILSVRC2012_val_00000001,  \n"), &one, None);
        assert!(
            e.contains(
                "LOC_val_solution.csv:2: ImageId ILSVRC2012_val_00000001: empty PredictionString"
            ),
            "{e}"
        );
        let e = err(
            &format!("{HEADER}ILSVRC2012_val_00000001,n01 1 2\n"),
            &one,
            None,
        );
        assert!(e.contains(":2:") && e.contains("groups of 5"), "{e}");
        let e = err(&format!("{HEADER}{row1}{row1}"), &one, None);
        assert!(
            e.contains(
                "LOC_val_solution.csv:3: ImageId ILSVRC2012_val_00000001 again (first on line 2)"
            ),
            "{e}"
        );
        let e = err("ImageId,Label\nx,n01\n", &one, None);
        assert!(e.contains("LOC_val_solution.csv:1: header"), "{e}");
        let e = err(&format!("{HEADER}{row1}a,b,c\n"), &one, None);
        assert!(
            e.contains("LOC_val_solution.csv") && e.contains("line: 3"),
            "{e}"
        );
        let e = err(
            &format!("{HEADER}{row1}"),
            &[one[0], "ILSVRC2012_val_00000001.png"],
            None,
        );
        assert!(
            e.contains("two images for ImageId ILSVRC2012_val_00000001"),
            "{e}"
        );
        let e = err(HEADER, &[], None);
        assert!(e.contains("no rows"), "{e}");
        // Many problems: the first 10 are listed, then a count.
        let rows: String = (0..15)
            .map(|i| format!("ILSVRC2012_val_{i:08},n01 1 2 3 4\n"))
            .collect();
        let e = err(&format!("{HEADER}{rows}"), &[], None);
        assert_eq!(e.lines().count(), 11, "{e}");
        assert!(e.ends_with("... and 5 more problems"), "{e}");
    }
}
