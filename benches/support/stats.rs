//! Small statistics shared by the benchmarks.

/// Median of `xs` (mean of the two middle values for an even count).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The `"seconds": [...]` list of one JSON line printed by a peer script.
pub fn peer_seconds(line: &serde_json::Value) -> Option<Vec<f64>> {
    Some(
        line["seconds"]
            .as_array()?
            .iter()
            .filter_map(|x| x.as_f64())
            .collect(),
    )
}
