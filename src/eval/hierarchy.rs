//! Hierarchical precision@k (paper appendix A.3) over a label hierarchy
//! ([`crate::text::hierarchy`], where `hCorrectSet(truth, k)` is defined): hp@k of one image =
//! |top-k predictions ∩ hCorrectSet(truth, k)| / k; the reported hp@k is its mean over images. At
//! k = 1 it equals hit@1 whenever the true label is a candidate. Chance hp@k (k random candidates)
//! is the mean of |hCorrectSet| / candidates.
use crate::report::results::HpAtK;
use crate::text::hierarchy::{CandidateIndex, Hierarchy};
use std::collections::HashMap;

/// Accumulates hp@k for one results row: per k, the sum over images of the precision and of the
/// correct-set size. Correct sets are cached per true label.
pub struct HpCounter {
    ks: Vec<usize>,
    /// `ks` capped at the number of candidates (at least 1), what is computed.
    eff: Vec<usize>,
    candidates: usize,
    precision_sum: Vec<f64>,
    set_size_sum: Vec<f64>,
    images: u64,
    cache: HashMap<u32, Vec<Vec<u32>>>,
}

impl HpCounter {
    /// A counter for `ks` (ascending) over `candidates` labels. A k above the number of
    /// candidates is computed as k = candidates (as hit@k is).
    pub fn new(ks: &[usize], candidates: usize) -> Self {
        HpCounter {
            ks: ks.to_vec(),
            eff: ks.iter().map(|&k| k.min(candidates).max(1)).collect(),
            candidates,
            precision_sum: vec![0.0; ks.len()],
            set_size_sum: vec![0.0; ks.len()],
            images: 0,
            cache: HashMap::new(),
        }
    }

    /// One image: `truth` its true label's candidate index and wnid, `top` its ranked predictions
    /// (candidate indices, at least `min(max k, candidates)` of them).
    pub fn add(
        &mut self,
        hierarchy: &Hierarchy,
        candidates: &CandidateIndex,
        truth: (u32, &str),
        top: &[u32],
    ) {
        let eff = &self.eff;
        let sets = self
            .cache
            .entry(truth.0)
            .or_insert_with(|| hierarchy.correct_sets(truth.1, candidates, eff));
        for (i, &k) in self.eff.iter().enumerate() {
            let set = &sets[i];
            let hits = top
                .iter()
                .take(k)
                .filter(|c| set.binary_search(c).is_ok())
                .count();
            self.precision_sum[i] += hits as f64 / k as f64;
            self.set_size_sum[i] += set.len() as f64;
        }
        self.images += 1;
    }

    /// Raw sums for an all-reduce: `[precision sums..., set size sums..., images]`.
    pub fn sums(&self) -> Vec<f64> {
        let mut v = self.precision_sum.clone();
        v.extend(&self.set_size_sum);
        v.push(self.images as f64);
        v
    }

    /// `(hp_at_k, mean correct-set size, chance hp_at_k)` from summed [`HpCounter::sums`].
    pub fn finish(&self, summed: &[f64]) -> HpAtK {
        let n = self.ks.len();
        let images = summed[2 * n].max(1.0);
        let mut out = HpAtK::default();
        for (i, &k) in self.ks.iter().enumerate() {
            let size = summed[n + i] / images;
            out.hp_at_k.insert(k, summed[i] / images);
            out.mean_correct_set_size.insert(k, size);
            out.chance_hp_at_k
                .insert(k, (size / self.candidates.max(1) as f64).min(1.0));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::hierarchy::fixture::{names, tree};

    #[test]
    fn hp_at_k_by_hand() {
        let h = tree();
        let cands = names(&["a1", "a2", "a3", "a1x", "b1", "b1x"]);
        let idx = h.candidate_index(&cands);
        let mut c = HpCounter::new(&[1, 2, 5], cands.len());
        // Image 1, truth a1: top = a2, a1x, a1, b1, b1x.
        //   k=1 set {a1}: a2 no -> 0. k=2 set {a1, a1x}: {a2, a1x} -> 1/2.
        //   k=5 set {a1,a2,a3,a1x,b1}: a2, a1x, a1, b1 -> 4/5.
        c.add(&h, &idx, (0, "a1"), &[1, 3, 0, 4, 5]);
        // Image 2, truth b1x: R0 {b1x}, R1 {b1}, R2 {b} not valid, R3 root, R4 a, R5 a1 a2 a3,
        // R6 a1x. k=1 {b1x}; k=2 {b1x, b1}; k=5: {b1x, b1, a1, a2, a3} (5 at R5).
        // top = b1x, a1x, b1, a3, a2: k=1 -> 1; k=2 -> 1/2; k=5 -> b1x, b1, a3, a2 = 4/5.
        c.add(&h, &idx, (5, "b1x"), &[5, 3, 4, 2, 1]);
        let r = c.finish(&c.sums());
        assert_eq!(r.hp_at_k[&1], 0.5);
        assert_eq!(r.hp_at_k[&2], 0.5);
        assert!((r.hp_at_k[&5] - 0.8).abs() < 1e-12);
        // k above the 6 candidates counts as k = 6 (everything is correct at that radius).
        let mut big = HpCounter::new(&[20], 6);
        big.add(&h, &idx, (0, "a1"), &[1, 3, 0, 4, 5, 2]);
        assert_eq!(big.finish(&big.sums()).hp_at_k[&20], 1.0);
        // Mean set sizes: k=1: 1; k=2: 2; k=5: (5 + 5) / 2.
        assert_eq!(r.mean_correct_set_size[&1], 1.0);
        assert_eq!(r.mean_correct_set_size[&2], 2.0);
        assert_eq!(r.mean_correct_set_size[&5], 5.0);
        assert!((r.chance_hp_at_k[&5] - 5.0 / 6.0).abs() < 1e-12);
    }
}
