//! Which classes are seen (trained on) and which are unseen (zero-shot targets).
//!
//! The split file is the format of `../shared/data/tiny-imagenet-200-zero-shot-split.tsv`:
//! `wnid TAB seen|unseen [TAB names]` per line, `#` comments, blank lines ignored.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// `[labels]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Path of the split file.
    pub split: String,
    /// Use only the first `limit` classes of the file (after comments), e.g. 40 for the small run.
    #[serde(default)]
    pub limit: Option<usize>,
    /// wnids of the file to leave out of every stage (reported), e.g. to compare two vector sets
    /// on the same classes.
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// Seen and unseen wnids, each in file order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Split {
    /// Classes trained on.
    pub seen: Vec<String>,
    /// Zero-shot classes, never trained on.
    pub unseen: Vec<String>,
}

/// Parses split-file text; `source` names the file in errors (with 1-based line numbers).
pub fn parse_split(text: &str, source: &str, limit: Option<usize>) -> Result<Split> {
    let mut split = Split {
        seen: Vec::new(),
        unseen: Vec::new(),
    };
    let mut all = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        if limit.is_some_and(|n| all.len() >= n) {
            break;
        }
        let mut fields = line.split('\t');
        let wnid = fields.next().unwrap_or("").trim();
        let kind = fields.next().map(str::trim);
        if wnid.is_empty() {
            bail!("{source}:{}: empty class id", i + 1);
        }
        if !all.insert(wnid.to_string()) {
            bail!("{source}:{}: class '{wnid}' listed twice", i + 1);
        }
        match kind {
            Some("seen") => split.seen.push(wnid.to_string()),
            Some("unseen") => split.unseen.push(wnid.to_string()),
            other => bail!(
                "{source}:{}: class '{wnid}': second column must be 'seen' or 'unseen', got {:?}",
                i + 1,
                other.unwrap_or("")
            ),
        }
    }
    if split.seen.is_empty() {
        bail!("{source}: no 'seen' classes");
    }
    Ok(split)
}

/// Reads the split file named by `cfg.split`.
pub fn read_split(cfg: &Config) -> Result<Split> {
    let text = std::fs::read_to_string(&cfg.split)
        .with_context(|| format!("labels.split: cannot read {}", cfg.split))?;
    let mut split = parse_split(&text, &cfg.split, cfg.limit)?;
    for wnid in &cfg.exclude {
        let before = split.seen.len() + split.unseen.len();
        split.seen.retain(|w| w != wnid);
        split.unseen.retain(|w| w != wnid);
        if split.seen.len() + split.unseen.len() == before {
            bail!("labels.exclude: '{wnid}' is not a class of {}", cfg.split);
        }
    }
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_limits() {
        let text = "# wnid\tsplit\tnames\nn1\tseen\ta\nn2\tunseen\tb\nn3\tseen\tc\n";
        let s = parse_split(text, "f", None).unwrap();
        assert_eq!(s.seen, vec!["n1", "n3"]);
        assert_eq!(s.unseen, vec!["n2"]);
        let s = parse_split(text, "f", Some(2)).unwrap();
        assert_eq!(s.seen, vec!["n1"]);
        assert_eq!(s.unseen, vec!["n2"]);
        let err = parse_split("n1\tmaybe\n", "f", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("f:1") && err.contains("maybe"), "{err}");
    }
}
