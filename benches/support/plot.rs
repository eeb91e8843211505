//! SVG charts next to the benchmark tables, one look for every bench.
//!
//! Why plotters with only its SVG backend: the charts are for the README, where a vector
//! image scales and diffs as text, and the SVG backend keeps labels as `<text>` drawn by
//! the viewer's font, so no system font library (fontconfig, freetype) is needed to build
//! or to render; plotters' built-in estimate of text width sizes the label areas.
//!
//! A chart travels as a small CSV file (`# key: value` header lines, then `series,x,y`
//! rows), the same numbers as the bench's table. Benches write the CSV and the SVG side by
//! side; `cargo bench --bench figures` redraws the README's charts (docs/figures/*.csv)
//! from the numbers its tables hold, without re-running a bench.

#![allow(dead_code)] // Each bench uses part of this module.

use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::coord::combinators::BindKeyPoints;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// How values on an axis are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// A plain number.
    Plain,
    /// Token counts: `8K`, `128K` (K = 1024, as context lengths are quoted).
    Tokens,
    /// Seconds: `0.368 s`, `58 s`.
    Seconds,
    /// Per-second rates: `23k`, `302k` (k = 1000).
    Rate,
    /// Percentages: `60%`.
    Percent,
}

impl Unit {
    fn parse(s: &str) -> Result<Unit, String> {
        Ok(match s {
            "plain" => Unit::Plain,
            "tokens" => Unit::Tokens,
            "seconds" => Unit::Seconds,
            "rate" => Unit::Rate,
            "percent" => Unit::Percent,
            other => return Err(format!("unknown unit `{other}`")),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Unit::Plain => "plain",
            Unit::Tokens => "tokens",
            Unit::Seconds => "seconds",
            Unit::Rate => "rate",
            Unit::Percent => "percent",
        }
    }

    /// `v` as an axis label or a value label.
    pub fn format(self, v: f64) -> String {
        match self {
            Unit::Plain => short_number(v),
            Unit::Tokens if v >= 1024.0 && v % 1024.0 == 0.0 => format!("{}K", v / 1024.0),
            Unit::Tokens => format!("{v:.0}"),
            Unit::Seconds => format!("{} s", short_number(v)),
            Unit::Rate if v >= 1000.0 => format!("{}k", short_number(v / 1000.0)),
            Unit::Rate => short_number(v),
            Unit::Percent => format!("{}%", short_number(v)),
        }
    }
}

/// Three significant digits, no trailing zeros: `0.368`, `58`, `1.5`, `302`.
fn short_number(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let magnitude = v.abs().log10().floor() as i32;
    let decimals = (2 - magnitude).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Lines over a numeric x axis, or one bar per series (all at one x).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Lines,
    Bars,
}

/// One named line (or bar).
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Everything a chart shows. `dashed` lists words: a series whose name contains one is
/// drawn dashed (peers such as llama.cpp or PyTorch, against solid starkv lines).
#[derive(Clone, Debug, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_unit: Unit,
    pub y_unit: Unit,
    pub log_x: bool,
    pub log_y: bool,
    pub kind: Kind,
    pub dashed: Vec<String>,
    /// A line under the chart: where the numbers come from.
    pub note: String,
    pub series: Vec<Series>,
}

impl Chart {
    /// A line chart with linear axes and plain numbers; set the rest field by field.
    pub fn lines(title: &str, x_label: &str, y_label: &str) -> Chart {
        Chart {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            x_unit: Unit::Plain,
            y_unit: Unit::Plain,
            log_x: false,
            log_y: false,
            kind: Kind::Lines,
            dashed: Vec::new(),
            note: String::new(),
            series: Vec::new(),
        }
    }

    /// Adds the point to the series `name` (created on first use, in order).
    pub fn push(&mut self, name: &str, x: f64, y: f64) {
        match self.series.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push((x, y)),
            None => self.series.push(Series {
                name: name.into(),
                points: vec![(x, y)],
            }),
        }
    }

    /// The CSV form: header lines, then one `series,x,y` row per point.
    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        let axes = match (self.log_x, self.log_y) {
            (false, false) => "linear",
            (true, false) => "log-x",
            (false, true) => "log-y",
            (true, true) => "log-xy",
        };
        let kind = match self.kind {
            Kind::Lines => "lines",
            Kind::Bars => "bars",
        };
        for (key, value) in [
            ("title", self.title.as_str()),
            ("x", self.x_label.as_str()),
            ("y", self.y_label.as_str()),
            ("x-unit", self.x_unit.name()),
            ("y-unit", self.y_unit.name()),
            ("axes", axes),
            ("kind", kind),
            ("dashed", &self.dashed.join(", ")),
            ("note", self.note.as_str()),
        ] {
            let _ = writeln!(out, "# {key}: {value}");
        }
        out.push_str("series,x,y\n");
        for s in &self.series {
            for (x, y) in &s.points {
                let _ = writeln!(out, "{},{x},{y}", s.name);
            }
        }
        out
    }

    /// Parses [`Chart::to_csv`]'s format (series names may contain commas; x and y may not).
    pub fn from_csv(text: &str) -> Result<Chart, String> {
        let mut chart = Chart::lines("", "", "");
        let mut header_seen = false;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(meta) = line.strip_prefix('#') {
                let (key, value) = meta
                    .split_once(':')
                    .ok_or_else(|| format!("line {}: `# key: value` expected", n + 1))?;
                let value = value.trim();
                match key.trim() {
                    "title" => chart.title = value.into(),
                    "x" => chart.x_label = value.into(),
                    "y" => chart.y_label = value.into(),
                    "x-unit" => chart.x_unit = Unit::parse(value)?,
                    "y-unit" => chart.y_unit = Unit::parse(value)?,
                    "axes" => {
                        (chart.log_x, chart.log_y) = match value {
                            "linear" => (false, false),
                            "log-x" => (true, false),
                            "log-y" => (false, true),
                            "log-xy" => (true, true),
                            other => return Err(format!("unknown axes `{other}`")),
                        }
                    }
                    "kind" => {
                        chart.kind = match value {
                            "lines" => Kind::Lines,
                            "bars" => Kind::Bars,
                            other => return Err(format!("unknown kind `{other}`")),
                        }
                    }
                    "dashed" => {
                        chart.dashed = value
                            .split(',')
                            .map(str::trim)
                            .filter(|w| !w.is_empty())
                            .map(String::from)
                            .collect()
                    }
                    "note" => chart.note = value.into(),
                    other => return Err(format!("line {}: unknown key `{other}`", n + 1)),
                }
                continue;
            }
            if !header_seen {
                if line != "series,x,y" {
                    return Err(format!("line {}: `series,x,y` header expected", n + 1));
                }
                header_seen = true;
                continue;
            }
            let mut fields = line.rsplitn(3, ',');
            let (y, x, name) = (fields.next(), fields.next(), fields.next());
            let (Some(y), Some(x), Some(name)) = (y, x, name) else {
                return Err(format!("line {}: `series,x,y` expected", n + 1));
            };
            let number = |s: &str| {
                s.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| format!("line {}: `{s}` is not a number", n + 1))
            };
            chart.push(name.trim(), number(x)?, number(y)?);
        }
        if chart.series.is_empty() {
            return Err("no data rows".into());
        }
        Ok(chart)
    }

    fn is_dashed(&self, series: &Series) -> bool {
        self.dashed.iter().any(|w| series.name.contains(w.as_str()))
    }
}

/// Where benches write their charts: `$STARKV_FIGURES_DIR`, else `target/figures`.
pub fn figures_dir() -> PathBuf {
    std::env::var_os("STARKV_FIGURES_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/figures"),
        PathBuf::from,
    )
}

/// Writes `chart` as `dir/name.csv` and `dir/name.svg` (creating `dir`); returns the SVG path.
pub fn save(chart: &Chart, dir: &Path, name: &str) -> Result<PathBuf, Box<dyn Error>> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(format!("{name}.csv")), chart.to_csv())?;
    let svg = dir.join(format!("{name}.svg"));
    std::fs::write(&svg, render_svg(chart)?)?;
    Ok(svg)
}

/// Colour-blind-safe palette (Okabe-Ito), in series order.
const PALETTE: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
];

const SIZE: (u32, u32) = (760, 440);
const FONT: &str = "sans-serif";

/// The chart as an SVG document.
pub fn render_svg(chart: &Chart) -> Result<String, Box<dyn Error>> {
    if chart.series.iter().all(|s| s.points.is_empty()) {
        return Err("a chart needs at least one point".into());
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let (plot_area, note_area) = root.split_vertically(SIZE.1 - 22);
        note_area.draw(&Text::new(
            chart.note.clone(),
            (12, 4),
            (FONT, 12).into_font().color(&RGBColor(90, 90, 90)),
        ))?;
        match chart.kind {
            Kind::Lines => draw_lines(chart, &plot_area)?,
            Kind::Bars => draw_bars(chart, &plot_area)?,
        }
        root.present()?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// `(min, max)` of `values`, widened so that lines and labels do not touch the frame.
fn span(values: impl Iterator<Item = f64>, log: bool, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if log {
        lo = lo.max(f64::MIN_POSITIVE);
        (lo / 1.6, hi * 1.6)
    } else {
        if from_zero {
            lo = lo.min(0.0);
        }
        if hi == lo {
            hi = lo + 1.0;
        }
        let pad = (hi - lo) * 0.08;
        (if from_zero && lo >= 0.0 { lo } else { lo - pad }, hi + pad)
    }
}

fn draw_lines(chart: &Chart, area: &Area<'_>) -> Result<(), Box<dyn Error>> {
    let layout = layout(chart);
    let ((x0, x1), (y0, y1)) = (layout.x, layout.y);
    // Log-x ticks at the measured x values (the context lengths a bench ran are the ones
    // worth reading); log-y ticks at 1-2-5 steps; linear axes keep plotters' round ticks.
    let mut x_ticks: Vec<f64> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    x_ticks.sort_by(f64::total_cmp);
    x_ticks.dedup();
    let y_ticks = log_ticks(y0, y1);
    let legend = layout.legend;
    match (chart.log_x, chart.log_y) {
        (false, false) => lines_on(chart, area, x0..x1, y0..y1, legend),
        (true, false) => lines_on(
            chart,
            area,
            (x0..x1).log_scale().with_key_points(x_ticks),
            y0..y1,
            legend,
        ),
        (false, true) => lines_on(
            chart,
            area,
            x0..x1,
            (y0..y1).log_scale().with_key_points(y_ticks),
            legend,
        ),
        (true, true) => lines_on(
            chart,
            area,
            (x0..x1).log_scale().with_key_points(x_ticks),
            (y0..y1).log_scale().with_key_points(y_ticks),
            legend,
        ),
    }
}

/// 1, 2, 5 times powers of ten within `lo..=hi`.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = 10f64.powf(lo.max(f64::MIN_POSITIVE).log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let t = decade * m;
            if (lo..=hi).contains(&t) {
                ticks.push(t);
            }
        }
        decade *= 10.0;
    }
    ticks
}

/// Axis ranges of a line chart and the corner its legend goes in.
struct Layout {
    x: (f64, f64),
    y: (f64, f64),
    legend: SeriesLabelPosition,
}

/// Puts the legend in a corner no line passes through; when every corner is crossed,
/// raises the top of the y axis until the band the legend needs is free of data.
fn layout(chart: &Chart) -> Layout {
    let xs = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1));
    let x = span(xs, chart.log_x, false);
    let mut y = span(ys, chart.log_y, true);
    // The legend's size as fractions of the plotting area (about 640 x 320 pixels).
    let longest = chart
        .series
        .iter()
        .map(|s| s.name.chars().count())
        .max()
        .unwrap_or(0);
    let width = (longest as f64 * 6.5 + 56.0) / 640.0;
    let height = (chart.series.len() as f64 * 17.0 + 20.0) / 320.0;
    let to_axis = |v: f64, log: bool| {
        if log {
            v.max(f64::MIN_POSITIVE).ln()
        } else {
            v
        }
    };
    let from_axis = |v: f64, log: bool| if log { v.exp() } else { v };
    let mut samples = Vec::new();
    for s in &chart.series {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .map(|&(px, py)| (to_axis(px, chart.log_x), to_axis(py, chart.log_y)))
            .collect();
        samples.extend(pts.iter().copied());
        for w in pts.windows(2) {
            samples.extend((1..32).map(|i| {
                let t = f64::from(i) / 32.0;
                (
                    w[0].0 + t * (w[1].0 - w[0].0),
                    w[0].1 + t * (w[1].1 - w[0].1),
                )
            }));
        }
    }
    let (ax0, ax1) = (to_axis(x.0, chart.log_x), to_axis(x.1, chart.log_x));
    let (ay0, ay1) = (to_axis(y.0, chart.log_y), to_axis(y.1, chart.log_y));
    let free = |left: bool, upper: bool| {
        !samples.iter().any(|&(sx, sy)| {
            let fx = (sx - ax0) / (ax1 - ax0);
            let fy = (sy - ay0) / (ay1 - ay0);
            (if left { fx < width } else { fx > 1.0 - width })
                && (if upper {
                    fy > 1.0 - height
                } else {
                    fy < height
                })
        })
    };
    let corners = [
        (SeriesLabelPosition::UpperLeft, true, true),
        (SeriesLabelPosition::UpperRight, false, true),
        (SeriesLabelPosition::LowerRight, false, false),
        (SeriesLabelPosition::LowerLeft, true, false),
    ];
    if let Some((corner, _, _)) = corners.into_iter().find(|&(_, l, u)| free(l, u)) {
        return Layout {
            x,
            y,
            legend: corner,
        };
    }
    let top = ay0 + (ay1 - ay0) / (1.0 - height);
    y.1 = from_axis(top, chart.log_y);
    Layout {
        x,
        y,
        legend: SeriesLabelPosition::UpperLeft,
    }
}

fn lines_on<X, Y>(
    chart: &Chart,
    area: &Area<'_>,
    x: X,
    y: Y,
    legend: SeriesLabelPosition,
) -> Result<(), Box<dyn Error>>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut ctx = ChartBuilder::on(area)
        .caption(&chart.title, (FONT, 18))
        .margin(14)
        .x_label_area_size(42)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)?;
    let (x_unit, y_unit) = (chart.x_unit, chart.y_unit);
    ctx.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .x_label_formatter(&|v| x_unit.format(*v))
        .y_label_formatter(&|v| y_unit.format(*v))
        .y_labels(8)
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 13))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()?;
    for (i, s) in chart.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let line = color.stroke_width(2);
        let points = s.points.clone();
        let dashed = chart.is_dashed(s);
        let drawn = if dashed {
            ctx.draw_series(DashedLineSeries::new(points.clone(), 7, 5, line))?
        } else {
            ctx.draw_series(LineSeries::new(points.clone(), line))?
        };
        drawn.label(&s.name).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(2))
        });
        ctx.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    ctx.configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .label_font((FONT, 12))
        .draw()?;
    Ok(())
}

/// One bar per series (its first point), each labelled with its value; the x value is
/// the same for every bar and named in the axis label.
fn draw_bars(chart: &Chart, area: &Area<'_>) -> Result<(), Box<dyn Error>> {
    let values: Vec<(&str, f64)> = chart
        .series
        .iter()
        .filter_map(|s| s.points.first().map(|p| (s.name.as_str(), p.1)))
        .collect();
    let (y0, y1) = span(values.iter().map(|v| v.1), chart.log_y, true);
    let n = values.len() as f64;
    if chart.log_y {
        bars_on(chart, area, &values, 0.0..n, (y0..y1).log_scale(), y0)
    } else {
        bars_on(chart, area, &values, 0.0..n, y0..y1, y0)
    }
}

fn bars_on<Y>(
    chart: &Chart,
    area: &Area<'_>,
    values: &[(&str, f64)],
    x: std::ops::Range<f64>,
    y: Y,
    floor: f64,
) -> Result<(), Box<dyn Error>>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut ctx = ChartBuilder::on(area)
        .caption(&chart.title, (FONT, 18))
        .margin(14)
        .x_label_area_size(30)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)?;
    let y_unit = chart.y_unit;
    ctx.configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .y_label_formatter(&|v| y_unit.format(*v))
        .y_labels(8)
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 13))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()?;
    for (i, &(name, value)) in values.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let left = i as f64 + 0.2;
        let right = i as f64 + 0.8;
        ctx.draw_series(std::iter::once(Rectangle::new(
            [(left, floor), (right, value)],
            color.filled(),
        )))?
        .label(name)
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
        ctx.draw_series(std::iter::once(Text::new(
            y_unit.format(value),
            (left, value),
            TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Left, VPos::Bottom)),
        )))?;
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .label_font((FONT, 12))
        .draw()?;
    Ok(())
}
