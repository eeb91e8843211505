//! Redraws the README's charts from the numbers its tables hold: every
//! `docs/figures/NAME.csv` becomes `docs/figures/NAME.svg` (benches that need llama.cpp or
//! a GPU cannot all be re-run on one machine, so their README numbers are kept as data).
//!
//! `cargo bench --bench figures [-- DIR]` (default DIR: docs/figures). A test
//! (tests/readme.rs) fails when a checked-in SVG differs from what its CSV draws.

#[path = "support/plot.rs"]
mod plot;

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/figures"),
            PathBuf::from,
        );
    let mut csvs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csv"))
        .collect();
    csvs.sort();
    if csvs.is_empty() {
        return Err(format!("no .csv files in {}", dir.display()).into());
    }
    for csv in csvs {
        let text = std::fs::read_to_string(&csv)?;
        let chart = plot::Chart::from_csv(&text).map_err(|e| format!("{}: {e}", csv.display()))?;
        let svg = csv.with_extension("svg");
        std::fs::write(&svg, plot::render_svg(&chart)?)?;
        println!("{} -> {}", csv.display(), svg.display());
    }
    Ok(())
}
