//! Statistics for paired yes/no outcomes (the needle benches): an accuracy's Wilson
//! interval, and a paired bootstrap interval on the ratio or difference of two
//! configurations' accuracies over the same questions.

/// Bootstrap resamples behind every paired interval.
const RESAMPLES: usize = 2000;

/// The resampling stream: splitmix64 with a fixed seed (the needle cases' generator, so
/// the module needs nothing else and an interval is the same in every run and release).
struct Resampler(u64);

impl Resampler {
    /// An index in `0..n` (`n > 0`; the modulo bias is far below the bootstrap's noise).
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

pub fn rate(marks: &[bool]) -> f64 {
    marks.iter().filter(|&&m| m).count() as f64 / marks.len().max(1) as f64
}

/// `"95.2% (200/210)"`.
pub fn percent(marks: &[bool]) -> String {
    format!(
        "{:.1}% ({}/{})",
        100.0 * rate(marks),
        marks.iter().filter(|&&m| m).count(),
        marks.len()
    )
}

/// Wilson score interval at 95% for a proportion (sound near 0% and 100%, unlike the
/// normal approximation).
pub fn wilson(marks: &[bool]) -> (f64, f64) {
    let n = marks.len() as f64;
    if n == 0.0 {
        return (f64::NAN, f64::NAN);
    }
    let z = 1.959_964;
    let p = rate(marks);
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / (1.0 + z * z / n);
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// The outcomes of two configurations on the questions both answered, in question order
/// (`None`: the configuration did not answer that question, e.g. a run cut short).
pub fn paired(a: &[Option<bool>], b: &[Option<bool>]) -> (Vec<bool>, Vec<bool>) {
    a.iter()
        .zip(b)
        .filter_map(|(x, y)| Some(((*x)?, (*y)?)))
        .unzip()
}

/// The answered outcomes of one configuration.
pub fn answered(col: &[Option<bool>]) -> Vec<bool> {
    col.iter().flatten().copied().collect()
}

/// `stat(a, b)` with a paired bootstrap 95% interval: questions are resampled together,
/// so the correlation between the two configurations (the same question is hard for
/// both) narrows the interval. Resamples where `stat` is undefined are skipped.
fn paired_bootstrap(
    a: &[bool],
    b: &[bool],
    stat: impl Fn(usize, usize, usize) -> Option<f64>,
) -> Option<(f64, f64, f64)> {
    let n = a.len();
    if n == 0 || n != b.len() {
        return None;
    }
    let count = |m: &[bool]| m.iter().filter(|&&x| x).count();
    let point = stat(count(a), count(b), n)?;
    let mut rng = Resampler(0xB007_57A9);
    let mut values: Vec<f64> = (0..RESAMPLES)
        .filter_map(|_| {
            let (mut sa, mut sb) = (0usize, 0usize);
            for _ in 0..n {
                let j = rng.below(n);
                sa += usize::from(a[j]);
                sb += usize::from(b[j]);
            }
            stat(sa, sb, n)
        })
        .collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    Some((point, at(0.025), at(0.975)))
}

/// `rate(star) / rate(full)` over the same questions with its paired bootstrap 95%
/// interval; `None` when full answered none of them.
pub fn paired_ratio(star: &[bool], full: &[bool]) -> Option<(f64, f64, f64)> {
    paired_bootstrap(star, full, |s, f, _| (f > 0).then(|| s as f64 / f as f64))
}

/// `rate(a) - rate(b)` in percentage points over the same questions with its paired
/// bootstrap 95% interval.
pub fn paired_difference(a: &[bool], b: &[bool]) -> Option<(f64, f64, f64)> {
    paired_bootstrap(a, b, |sa, sb, n| {
        Some(100.0 * (sa as f64 - sb as f64) / n as f64)
    })
}
