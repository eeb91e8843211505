//! How values read for people: sizes in KB/MB/GB, counts with separators, durations and
//! ages ("3m ago"), and whether the output is coloured at all.

use std::ffi::OsStr;

/// Whether output is coloured: only on a terminal, and never when `NO_COLOR` is set to a
/// non-empty value (the no-color.org convention).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Style {
    color: bool,
}

/// What a piece of text means, which decides its colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tone {
    Plain,
    Heading,
    Good,
    Warn,
    Bad,
    Quiet,
}

impl Style {
    /// No colour at all (files, pipes, tests).
    pub const PLAIN: Style = Style { color: false };

    /// `is_terminal`: whether the stream is a terminal; `no_color`: the value of `NO_COLOR`.
    pub fn new(is_terminal: bool, no_color: Option<&OsStr>) -> Style {
        Style {
            color: is_terminal && no_color.is_none_or(OsStr::is_empty),
        }
    }

    /// The style for this process's standard output.
    pub fn for_stdout() -> Style {
        use std::io::IsTerminal;
        Style::new(
            std::io::stdout().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        )
    }

    pub fn colored(self) -> bool {
        self.color
    }

    /// `text` in the colour of `tone` (unchanged without colour).
    pub fn paint(self, tone: Tone, text: &str) -> String {
        let code = match tone {
            Tone::Plain => return text.to_string(),
            Tone::Heading => "1",
            Tone::Good => "32",
            Tone::Warn => "33",
            Tone::Bad => "1;31",
            Tone::Quiet => "2",
        };
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
}

/// Bytes in decimal units with three significant digits: `512 B`, `1.50 KB`, `153 MB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1000.0;
    let mut unit = 0;
    while value >= 999.5 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    let decimals = if value >= 99.95 {
        0
    } else if value >= 9.995 {
        1
    } else {
        2
    };
    format!("{value:.decimals$} {}", UNITS[unit])
}

/// An integer with thousands separators: `131,072`.
pub fn human_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A span in its largest whole unit: `45s`, `3m`, `2h`, `5d`.
pub fn human_span(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// A duration in at most two units, exact when it fits: `90s` is `1m 30s`, `7200s` is `2h`.
pub fn human_duration(secs: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")];
    let Some(i) = UNITS.iter().position(|&(size, _)| secs >= size) else {
        return "0s".into();
    };
    let (size, name) = UNITS[i];
    let mut out = format!("{}{name}", secs / size);
    if let Some(&(next, next_name)) = UNITS.get(i + 1) {
        let rest = secs % size / next;
        if rest > 0 {
            out.push_str(&format!(" {rest}{next_name}"));
        }
    }
    out
}

/// How long ago a millisecond timestamp was: `just now`, `3m ago`; 0 means `never`.
pub fn human_ago(then_ms: u64, now_ms: u64) -> String {
    if then_ms == 0 {
        return "never".into();
    }
    let secs = now_ms.saturating_sub(then_ms) / 1000;
    if secs < 5 {
        "just now".into()
    } else {
        format!("{} ago", human_span(secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn bytes_use_three_significant_digits() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_500), "1.50 KB");
        assert_eq!(human_bytes(15_300), "15.3 KB");
        assert_eq!(human_bytes(153_000_000), "153 MB");
        assert_eq!(human_bytes(999_999), "1.00 MB");
        assert_eq!(human_bytes(2_340_000_000), "2.34 GB");
        assert_eq!(human_bytes(u64::MAX), "18447 PB");
    }

    #[test]
    fn counts_spans_and_durations() {
        assert_eq!(human_count(7), "7");
        assert_eq!(human_count(7996), "7,996");
        assert_eq!(human_count(131_072), "131,072");
        assert_eq!(human_count(1_234_567), "1,234,567");
        assert_eq!(human_span(59), "59s");
        assert_eq!(human_span(180), "3m");
        assert_eq!(human_span(7300), "2h");
        assert_eq!(human_span(3 * 86_400 + 5), "3d");
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(90), "1m 30s");
        assert_eq!(human_duration(7200), "2h");
        assert_eq!(human_duration(7500), "2h 5m");
        assert_eq!(human_duration(86_400 + 3 * 3600 + 59), "1d 3h");
        assert_eq!(human_ago(0, NOW), "never");
        assert_eq!(human_ago(NOW - 2_000, NOW), "just now");
        assert_eq!(human_ago(NOW - 180_000, NOW), "3m ago");
        assert_eq!(human_ago(NOW + 10_000, NOW), "just now", "clock skew");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(Style::new(true, None).colored());
        assert!(Style::new(true, Some(OsStr::new(""))).colored());
        assert!(!Style::new(true, Some(OsStr::new("1"))).colored());
        assert!(!Style::new(false, None).colored());
        assert_eq!(Style::PLAIN.paint(Tone::Bad, "x"), "x");
        assert_eq!(
            Style::new(true, None).paint(Tone::Good, "x"),
            "\x1b[32mx\x1b[0m"
        );
    }
}
