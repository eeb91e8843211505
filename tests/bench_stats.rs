//! The needle benches' statistics (`benches/support/paired.rs`): the intervals the README
//! quotes for issue 14 must be what they claim to be.

#[path = "../benches/support/paired.rs"]
mod paired;

use paired::{answered, paired, paired_difference, paired_ratio, percent, rate, wilson};

fn marks(right: usize, wrong: usize) -> Vec<bool> {
    let mut m = vec![true; right];
    m.extend(vec![false; wrong]);
    m
}

#[test]
fn wilson_matches_the_closed_form() {
    // Reference values: Wilson score interval, z = 1.959964 (e.g. R's prop.test without
    // continuity correction, or statsmodels' proportion_confint(method="wilson")).
    for (right, wrong, lo, hi) in [
        (0, 10, 0.0, 0.277_53),
        (10, 0, 0.722_47, 1.0),
        (5, 10 - 5, 0.236_59, 0.763_41),
        (189, 11, 0.904_21, 0.969_01),
    ] {
        let (l, h) = wilson(&marks(right, wrong));
        assert!(
            (l - lo).abs() < 5e-5 && (h - hi).abs() < 5e-5,
            "{right}/{}: {l} {h}",
            right + wrong
        );
    }
    let (l, h) = wilson(&[]);
    assert!(l.is_nan() && h.is_nan());
    assert_eq!(percent(&marks(3, 1)), "75.0% (3/4)");
    assert_eq!(rate(&marks(3, 1)), 0.75);
}

#[test]
fn pairs_keep_only_questions_both_answered() {
    let a = [Some(true), None, Some(false), Some(true)];
    let b = [Some(false), Some(true), None, Some(true)];
    assert_eq!(paired(&a, &b), (vec![true, true], vec![false, true]));
    assert_eq!(answered(&a), vec![true, false, true]);
}

#[test]
fn paired_intervals_reflect_the_pairing() {
    // Identical outcomes: no difference and no spread, whatever the accuracy.
    let same: Vec<bool> = (0..200).map(|i| i % 3 != 0).collect();
    assert_eq!(paired_difference(&same, &same), Some((0.0, 0.0, 0.0)));
    assert_eq!(paired_ratio(&same, &same), Some((1.0, 1.0, 1.0)));
    // A better than B on 4 of 200 questions and never worse: every resample has A >= B,
    // so the paired interval never goes below 0 (unpaired, two 50% accuracies would give
    // about +-10 points).
    let b: Vec<bool> = (0..200).map(|i| i % 2 == 0).collect();
    let mut a = b.clone();
    for i in [1, 3, 5, 7] {
        a[i] = true;
    }
    let (d, lo, hi) = paired_difference(&a, &b).unwrap();
    assert!((d - 2.0).abs() < 1e-12, "{d}");
    assert!((0.0..d).contains(&lo), "{lo}");
    assert!(hi > d && hi < 6.0, "{hi}");
    let (r, rlo, rhi) = paired_ratio(&a, &b).unwrap();
    assert!((r - 104.0 / 100.0).abs() < 1e-12, "{r}");
    assert!(rlo >= 1.0 && rhi > r && rhi < 1.15, "{rlo} {rhi}");
    // Full attention right on no question: no ratio.
    assert_eq!(paired_ratio(&a, &[false; 200]), None);
    assert_eq!(paired_difference(&[], &[]), None);
}
