//! A label hierarchy: a file of `parent child` wnid pairs, one per line (ImageNet's
//! `wordnet.is_a.txt`; any file of that shape works, so users can bring theirs). Hops are counted
//! along parent/child edges in either direction (the shortest path in the undirected graph).
//!
//! `hCorrectSet(truth, k)` (paper appendix A.3, [`Hierarchy::correct_sets`]): start with radius
//! R = 0; while the set has fewer than k members, add every node exactly R hops from the true
//! label that is a *valid label* (a candidate of the label set being evaluated), then R += 1. When
//! the whole connected component is exhausted before k members are found, the set stays smaller
//! than k. Hierarchical precision@k over these sets is computed in `eval::hierarchy`.
use anyhow::{bail, Context, Result};
use std::collections::{HashMap, VecDeque};
use std::path::Path;

/// An undirected view of a `parent child` hierarchy.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    /// wnid -> node index.
    index: HashMap<String, u32>,
    /// Neighbours (parents and children) of each node.
    adjacent: Vec<Vec<u32>>,
}

impl Hierarchy {
    /// Reads a `parent child` file (whitespace-separated wnids, one pair per line; blank lines
    /// and lines starting with `#` are skipped). Errors name the file and line.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the label hierarchy {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses the text of a `parent child` file; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let mut h = Hierarchy {
            index: HashMap::new(),
            adjacent: Vec::new(),
        };
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(parent), Some(child), None) = (parts.next(), parts.next(), parts.next())
            else {
                bail!(
                    "{source}:{}: expected 'parent child' (two wnids), got '{line}'",
                    i + 1
                );
            };
            if parent == child {
                bail!("{source}:{}: '{parent}' is its own parent", i + 1);
            }
            let (p, c) = (h.node(parent), h.node(child));
            if !h.adjacent[p as usize].contains(&c) {
                h.adjacent[p as usize].push(c);
                h.adjacent[c as usize].push(p);
            }
        }
        if h.index.is_empty() {
            bail!("{source}: no 'parent child' lines");
        }
        Ok(h)
    }

    fn node(&mut self, wnid: &str) -> u32 {
        if let Some(&i) = self.index.get(wnid) {
            return i;
        }
        let i = self.adjacent.len() as u32;
        self.index.insert(wnid.to_string(), i);
        self.adjacent.push(Vec::new());
        i
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.adjacent.len()
    }

    /// Whether the hierarchy has no nodes (never, after a successful parse).
    pub fn is_empty(&self) -> bool {
        self.adjacent.is_empty()
    }

    /// Whether `wnid` is a node.
    pub fn contains(&self, wnid: &str) -> bool {
        self.index.contains_key(wnid)
    }

    /// The correct sets of a true label for each k in `ks` (ascending), as candidate indices:
    /// `candidates` lists the valid labels (the evaluated label set) in candidate order. A true
    /// label missing from the hierarchy gets `{truth}` (when it is a candidate) for every k.
    pub fn correct_sets(
        &self,
        truth: &str,
        candidates: &CandidateIndex,
        ks: &[usize],
    ) -> Vec<Vec<u32>> {
        let kmax = ks.iter().copied().max().unwrap_or(0);
        // Valid labels by hop radius, until kmax of them are found or the component is done.
        let mut rings: Vec<Vec<u32>> = Vec::new();
        match self.index.get(truth) {
            None => rings.push(candidates.get(truth).into_iter().collect()),
            Some(&start) => {
                let mut seen = vec![false; self.adjacent.len()];
                let mut frontier = VecDeque::from([start]);
                seen[start as usize] = true;
                let mut found = 0usize;
                while !frontier.is_empty() && found < kmax {
                    let mut ring = Vec::new();
                    let mut next = VecDeque::new();
                    for node in frontier.drain(..) {
                        if let Some(c) = candidates.by_node.get(&node) {
                            ring.push(*c);
                        }
                        for &n in &self.adjacent[node as usize] {
                            if !seen[n as usize] {
                                seen[n as usize] = true;
                                next.push_back(n);
                            }
                        }
                    }
                    found += ring.len();
                    rings.push(ring);
                    frontier = next;
                }
            }
        }
        ks.iter()
            .map(|&k| {
                let mut set = Vec::new();
                for ring in &rings {
                    if set.len() >= k {
                        break;
                    }
                    set.extend_from_slice(ring);
                }
                set.sort_unstable();
                set
            })
            .collect()
    }

    /// Maps candidate wnids (in candidate order) onto this hierarchy's nodes.
    pub fn candidate_index(&self, candidates: &[String]) -> CandidateIndex {
        let mut by_node = HashMap::new();
        let mut by_wnid = HashMap::new();
        for (i, w) in candidates.iter().enumerate() {
            by_wnid.insert(w.clone(), i as u32);
            if let Some(&n) = self.index.get(w) {
                by_node.insert(n, i as u32);
            }
        }
        CandidateIndex { by_node, by_wnid }
    }
}

/// Candidate labels located in a hierarchy ([`Hierarchy::candidate_index`]).
#[derive(Debug, Clone)]
pub struct CandidateIndex {
    by_node: HashMap<u32, u32>,
    by_wnid: HashMap<String, u32>,
}

impl CandidateIndex {
    /// Candidate index of `wnid`.
    pub fn get(&self, wnid: &str) -> Option<u32> {
        self.by_wnid.get(wnid).copied()
    }
}

/// The small tree the hierarchy tests of this module and of `eval::hierarchy` share.
#[cfg(test)]
pub(crate) mod fixture {
    use super::Hierarchy;

    /// ```text
    ///            root
    ///          /      \
    ///        a          b
    ///      / | \        |
    ///    a1  a2  a3     b1
    ///    |               \
    ///   a1x               b1x
    /// ```
    pub(crate) fn tree() -> Hierarchy {
        Hierarchy::parse(
            "root a\nroot b\na a1\na a2\na a3\nb b1\na1 a1x\nb1 b1x\n",
            "tree",
        )
        .unwrap()
    }

    pub(crate) fn names(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::{names, tree};
    use super::*;

    #[test]
    fn correct_sets_grow_by_hop_radius_over_valid_labels_only() {
        let h = tree();
        // Valid labels: the leaves and b1 (a, b, root are not candidates).
        let cands = names(&["a1", "a2", "a3", "a1x", "b1", "b1x"]);
        let idx = h.candidate_index(&cands);
        let sets = h.correct_sets("a1", &idx, &[1, 2, 3, 5, 6]);
        // R=0: {a1}. R=1: a, a1x -> a1x valid. R=2: root, a2, a3 -> a2, a3. R=3: b. R=4: b1.
        // R=5: b1x.
        assert_eq!(sets[0], vec![0], "k=1: the true label");
        assert_eq!(sets[1], vec![0, 3], "k=2: + a1x (1 hop)");
        assert_eq!(sets[2], vec![0, 1, 2, 3], "k=3: + a2, a3 (2 hops): 4 >= 3");
        assert_eq!(
            sets[3],
            vec![0, 1, 2, 3, 4],
            "k=5: + b1 (4 hops; b at 3 is not valid)"
        );
        assert_eq!(sets[4], vec![0, 1, 2, 3, 4, 5], "k=6: everything");
        // More than the component holds: all of it.
        assert_eq!(h.correct_sets("a1", &idx, &[10])[0].len(), 6);
        // A true label outside the hierarchy: itself only.
        let idx2 = h.candidate_index(&names(&["zzz", "a1"]));
        assert_eq!(
            h.correct_sets("zzz", &idx2, &[1, 5]),
            vec![vec![0], vec![0]]
        );
    }

    #[test]
    fn malformed_lines_name_the_file_and_line() {
        let e = Hierarchy::parse("a b\nc\n", "h.txt")
            .unwrap_err()
            .to_string();
        assert!(e.contains("h.txt:2"), "{e}");
        let e = Hierarchy::parse("a a\n", "h.txt").unwrap_err().to_string();
        assert!(e.contains("its own parent"), "{e}");
        assert!(Hierarchy::parse("# only a comment\n", "h.txt").is_err());
    }
}
