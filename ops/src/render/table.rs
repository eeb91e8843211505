//! Aligned output: tables whose columns fit their widest cell, and `label  value` lines.

use super::format::{Style, Tone};

/// Column alignment: text left, numbers right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Align {
    Left,
    Right,
}

/// A table whose columns are as wide as their widest cell, two spaces apart.
pub(super) struct Table {
    columns: Vec<(&'static str, Align)>,
    pub(super) rows: Vec<Vec<(String, Tone)>>,
}

impl Table {
    pub(super) fn new(columns: &[(&'static str, Align)]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub(super) fn render(&self, style: Style) -> String {
        let width = |i: usize| {
            self.rows
                .iter()
                .map(|r| r[i].0.chars().count())
                .chain(std::iter::once(self.columns[i].0.len()))
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.columns.len()).map(width).collect();
        let line = |cells: Vec<(String, Tone)>| {
            let last = cells.len() - 1;
            let parts: Vec<String> = cells
                .into_iter()
                .enumerate()
                .map(|(i, (text, tone))| {
                    let pad = widths[i] - text.chars().count();
                    let padded = match (self.columns[i].1, i == last) {
                        (Align::Right, _) => format!("{}{text}", " ".repeat(pad)),
                        (Align::Left, false) => format!("{text}{}", " ".repeat(pad)),
                        (Align::Left, true) => text,
                    };
                    // Pad first, then colour: escape codes take no room on the screen.
                    match tone {
                        Tone::Plain => padded,
                        _ => {
                            let trimmed = padded.trim();
                            let at = padded.find(trimmed).unwrap_or(0);
                            format!(
                                "{}{}{}",
                                &padded[..at],
                                style.paint(tone, trimmed),
                                &padded[at + trimmed.len()..]
                            )
                        }
                    }
                })
                .collect();
            parts.join("  ").trim_end().to_string()
        };
        let mut out = vec![line(
            self.columns
                .iter()
                .map(|(name, _)| (name.to_string(), Tone::Heading))
                .collect(),
        )];
        out.extend(self.rows.iter().cloned().map(line));
        out.join("\n") + "\n"
    }
}

/// Aligned `label  value` lines.
pub(super) fn key_values(pairs: &[(&str, String)], style: Style) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| {
            let pad = " ".repeat(width - k.len());
            format!("{}{pad}  {v}\n", style.paint(Tone::Quiet, k))
        })
        .collect()
}
