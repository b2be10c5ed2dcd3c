//! Scope: hierarchical precision@k's correct sets over the real ImageNet hierarchy
//! (`../shared/data/imagenet-meta/wordnet.is_a.txt`) and the real 1K label list: their mean sizes
//! against the paper's Table 5.
use crate::common::shared_dir;
use devise::text::hierarchy::Hierarchy;

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn mean_correct_set_sizes_over_the_1k_labels_are_on_the_papers_scale() {
    let shared = shared_dir();
    let meta = shared.join("data/imagenet-meta");
    let h = Hierarchy::load(&meta.join("wordnet.is_a.txt")).unwrap();
    let labels: Vec<String> = std::fs::read_to_string(meta.join("zero-shot-splits/1k.txt"))
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(labels.len(), 1000);
    assert!(
        labels.iter().all(|w| h.contains(w)),
        "every 1K label is in the hierarchy"
    );
    let idx = h.candidate_index(&labels);
    let ks = [1usize, 2, 5, 10, 20];
    let mut sums = [0f64; 5];
    for w in &labels {
        for (i, set) in h.correct_sets(w, &idx, &ks).iter().enumerate() {
            assert!(set.len() >= ks[i], "{w}: k={} set {}", ks[i], set.len());
            sums[i] += set.len() as f64;
        }
    }
    let means: Vec<f64> = sums.iter().map(|s| s / labels.len() as f64).collect();
    eprintln!("mean |hCorrectSet| over the 1K labels, k = 1/2/5/10/20: {means:?}");
    assert_eq!(means[0], 1.0);
    // Paper Table 5 (means over the 50K validation images, ~50 per class): 6.5 / 12.5 / 22.5 /
    // 41.7 for k = 2 / 5 / 10 / 20. This file's graph gives 4.5 / 9.5 / 18.0 / 33.8 with the
    // paper's definition (appendix A.3: undirected hops, valid = the 1K labels): the paper's sets are
    // 1.2-1.4x larger, presumably another version of the hierarchy (not established; an
    // "ancestor height" variant gives 14.2 / 38.6 / 65.5 / 103, much further off). The hand-made
    // unit tests in src/text/hierarchy.rs and src/eval/hierarchy.rs pin the definition; this pins the real-data scale.
    for (got, paper) in means[1..].iter().zip([6.5, 12.5, 22.5, 41.7]) {
        let ratio = got / paper;
        assert!(
            (0.65..=0.85).contains(&ratio),
            "mean set size {got:.1} vs the paper's {paper}: ratio {ratio:.2}"
        );
    }
    assert!(means.windows(2).all(|w| w[0] < w[1]), "{means:?}");
}
