//! Drawing a [`Figure`]: one row per panel (one unit per panel), the left
//! column over learner steps, the right over wall time.

use anyhow::Result;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use std::ops::Range;

/// A point of a series: (learner step, wall seconds, value).
pub type Point = (f64, f64, f64);

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Style {
    /// Noisy per-step values: a centered moving average drawn solid, the
    /// values themselves faint behind it.
    Smoothed,
    /// Values already smooth (run averages, cumulative counts): drawn as given.
    Line,
    /// The quantity the figure is about (held-out evaluations): a thick line
    /// with a marker on every point.
    Prominent,
    /// Context for a prominent series: its moving average, thin and faint.
    Faint,
    /// A configured limit: dashed.
    Limit,
}

/// One line of a panel.
pub struct Series {
    pub name: String,
    pub color: RGBColor,
    pub style: Style,
    pub points: Vec<Point>,
}

/// Shares that add up to one, drawn as stacked areas (already smoothed).
pub struct Layer {
    pub name: String,
    pub color: RGBColor,
    pub points: Vec<Point>,
}

/// Where the y axis starts and ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum YAxis {
    /// Around the data.
    Auto,
    /// From zero (or below, when the data are negative) to above the data.
    FromZero,
    /// A share in [0, 1], labelled in percent, over the whole range.
    Share,
    /// A share labelled in percent, from zero to above the data.
    ShareFromZero,
}

/// One unit of measure, drawn against steps and against wall time.
pub struct Panel {
    pub title: String,
    /// The y axis' label, with its unit.
    pub y_desc: String,
    pub y_axis: YAxis,
    pub series: Vec<Series>,
    pub layers: Vec<Layer>,
    /// Spans (first step, last step, start s, end s) shaded as "judge off".
    pub shaded: Vec<(f64, f64, f64, f64)>,
    pub shaded_name: &'static str,
}

impl Panel {
    pub fn new(title: &str, y_desc: &str, y_axis: YAxis) -> Self {
        Self {
            title: title.into(),
            y_desc: y_desc.into(),
            y_axis,
            series: Vec::new(),
            layers: Vec::new(),
            shaded: Vec::new(),
            shaded_name: "",
        }
    }

    /// Adds a series; one without points is left out.
    pub fn with(mut self, name: &str, color: RGBColor, style: Style, points: Vec<Point>) -> Self {
        if !points.is_empty() {
            self.series.push(Series { name: name.into(), color, style, points });
        }
        self
    }

    /// Whether there is anything to draw: a limit alone is not.
    pub fn has_data(&self) -> bool {
        self.series.iter().any(|s| s.style != Style::Limit) || !self.layers.is_empty()
    }
}

/// One output file.
pub struct Figure {
    pub file: &'static str,
    pub title: &'static str,
    pub panels: Vec<Panel>,
}

pub const PANEL_HEIGHT: u32 = 330;
pub const WIDTH: u32 = 1400;
const TITLE_HEIGHT: u32 = 44;

impl Figure {
    pub fn size(&self) -> (u32, u32) {
        (WIDTH, TITLE_HEIGHT + PANEL_HEIGHT * self.panels.len() as u32)
    }
}

/// Number of points the moving average spans for a series of `n`: about a
/// fifteenth of the run, odd so that it is centered, 1 (no smoothing) for
/// short runs.
pub fn smoothing_window(n: usize) -> usize {
    let w = (n / 15).clamp(1, 101);
    w | 1
}

/// Centered moving average over `window` points with triangular weights
/// (`half + 1 - |distance|`, so that one spike makes a bump rather than a
/// box); near the ends the window shrinks to the points there are.
pub fn moving_average(values: &[f64], window: usize) -> Vec<f64> {
    let half = (window / 2) as isize;
    let n = values.len() as isize;
    (0..n)
        .map(|i| {
            let (mut sum, mut weights) = (0.0, 0.0);
            for j in (i - half).max(0)..=(i + half).min(n - 1) {
                let w = (half + 1 - (i - j).abs()) as f64;
                sum += w * values[j as usize];
                weights += w;
            }
            sum / weights
        })
        .collect()
}

/// The runs of `points` between gap markers (a NaN value).
pub fn segments(points: &[Point]) -> impl Iterator<Item = &[Point]> {
    points.split(|p| p.2.is_nan()).filter(|s| !s.is_empty())
}

/// `points` with each value replaced by its centered moving average over
/// `window` points, gap by gap; gap markers are kept.
pub fn smoothed(points: &[Point], window: usize) -> Vec<Point> {
    let mut out = Vec::with_capacity(points.len());
    for (i, seg) in segments(points).enumerate() {
        if i > 0 {
            out.push((seg[0].0, seg[0].1, f64::NAN));
        }
        let values: Vec<f64> = seg.iter().map(|p| p.2).collect();
        out.extend(seg.iter().zip(moving_average(&values, window)).map(|(p, v)| (p.0, p.1, v)));
    }
    out
}

/// Tick positions in [lo, hi]: at most about `max` of them, spaced 1, 2 or 5
/// times a power of ten; with `integer`, never closer than 1 apart, so that
/// every tick is a whole number (learner steps).
pub fn ticks(lo: f64, hi: f64, max: usize, integer: bool) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi < lo {
        return Vec::new();
    }
    let span = (hi - lo).max(f64::EPSILON);
    let rough = span / max.max(1) as f64;
    let magnitude = 10f64.powf(rough.log10().floor());
    let mut spacing = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|s| *s >= rough).unwrap_or(10.0 * magnitude);
    if integer {
        spacing = spacing.max(1.0).round();
    }
    let first = (lo / spacing).ceil() as i64;
    let last = (hi / spacing).floor() as i64;
    (first..=last).map(|k| k as f64 * spacing).map(|t| if integer { t.round() } else { t }).collect()
}

/// The label of a learner-step tick: a whole number, never `12.5`.
pub fn step_label(step: f64) -> String {
    format!("{}", step.round() as i64)
}

/// A tick label with as many decimals as the tick spacing needs.
fn number_label(v: f64, spacing: f64) -> String {
    let decimals = if spacing > 0.0 { (-spacing.log10()).ceil().clamp(0.0, 6.0) as usize } else { 2 };
    let v = if v.abs() < spacing * 1e-6 { 0.0 } else { v };
    if decimals == 0 && v.abs() >= 10_000.0 {
        return thousands(v.round() as i64);
    }
    format!("{v:.decimals$}")
}

fn thousands(v: i64) -> String {
    let digits = v.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// A linear axis whose ticks are given (plotters' own would put a tick at
/// step 12.5); no light mesh lines.
struct Axis {
    linear: RangedCoordf64,
    ticks: Vec<f64>,
}

impl Axis {
    fn new(lo: f64, hi: f64, ticks: Vec<f64>) -> Self {
        Self { linear: (lo..hi).into(), ticks }
    }
}

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.linear.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.linear.range()
    }
}

/// The x axis of a column.
#[derive(Clone, Copy)]
enum Column {
    Step,
    /// Wall time, in units of `seconds` seconds called `unit`.
    Time {
        seconds: f64,
        unit: &'static str,
    },
}

impl Column {
    fn x(self, p: &Point) -> f64 {
        match self {
            Column::Step => p.0,
            Column::Time { seconds, .. } => p.1 / seconds,
        }
    }
}

/// Wall time in seconds, minutes or hours, whichever reads best for a run
/// lasting `end_s`.
fn time_column(end_s: f64) -> Column {
    if end_s > 3.0 * 3600.0 {
        Column::Time { seconds: 3600.0, unit: "h" }
    } else if end_s > 20.0 * 60.0 {
        Column::Time { seconds: 60.0, unit: "min" }
    } else {
        Column::Time { seconds: 1.0, unit: "s" }
    }
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("{e:?}")
}

/// Draws `fig` on `root`.
pub fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, fig: &Figure) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(plot_err)?;
    let body = root.titled(fig.title, ("sans-serif", 26)).map_err(plot_err)?;
    let end_s = fig
        .panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|s| &s.points).chain(p.layers.iter().flat_map(|l| &l.points)))
        .map(|p| p.1)
        .fold(0.0, f64::max);
    let time = time_column(end_s);
    let areas = body.split_evenly((fig.panels.len(), 2));
    for (i, panel) in fig.panels.iter().enumerate() {
        draw_panel(&areas[2 * i], panel, Column::Step)?;
        draw_panel(&areas[2 * i + 1], panel, time)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// The series as drawn: for a smoothed one, its moving average and window.
fn drawn(series: &Series) -> (Vec<Point>, usize) {
    match series.style {
        Style::Smoothed | Style::Faint => {
            let w = smoothing_window(series.points.iter().filter(|p| !p.2.is_nan()).count());
            (smoothed(&series.points, w), w)
        }
        _ => (series.points.clone(), 1),
    }
}

fn y_range(panel: &Panel) -> (f64, f64) {
    let mut values: Vec<f64> = Vec::new();
    for s in &panel.series {
        let (line, window) = drawn(s);
        values.extend(line.iter().map(|p| p.2));
        if s.style == Style::Smoothed && window > 1 {
            // The faint raw values may spike; the axis follows the bulk of them.
            let mut raw: Vec<f64> = s.points.iter().map(|p| p.2).filter(|v| v.is_finite()).collect();
            raw.sort_by(f64::total_cmp);
            let q = |f: f64| raw[((raw.len() - 1) as f64 * f).round() as usize];
            if !raw.is_empty() {
                values.extend([q(0.01), q(0.99)]);
            }
        }
    }
    for l in &panel.layers {
        values.extend(l.points.iter().map(|p| p.2));
    }
    let (mut lo, mut hi) =
        values.iter().filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    match panel.y_axis {
        YAxis::Share => return (-0.02, 1.02),
        YAxis::FromZero | YAxis::ShareFromZero => {
            lo = lo.min(0.0);
            if hi <= lo {
                hi = lo + if panel.y_axis == YAxis::ShareFromZero { 0.01 } else { 1.0 };
            }
            return (lo, hi + (hi - lo) * 0.08);
        }
        YAxis::Auto => {}
    }
    let pad = ((hi - lo) * 0.08).max(hi.abs().max(1e-3) * 0.05);
    (lo - pad, hi + pad)
}

fn x_range(panel: &Panel, column: Column) -> (f64, f64) {
    let xs = panel.series.iter().flat_map(|s| &s.points).chain(panel.layers.iter().flat_map(|l| &l.points)).map(|p| column.x(p));
    let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    match column {
        Column::Step => (lo - 0.5, hi + 0.5),
        Column::Time { .. } => {
            let pad = ((hi - lo) * 0.02).max(1e-3);
            (lo - pad, hi + pad)
        }
    }
}

/// Where the legend goes: the corner whose legend-sized box (`box_w`,
/// `box_h` as fractions of the plot) the drawn lines cross least, preferring
/// a free one. With none free, the y range grows so that the box above the
/// data is free; the new top is returned with the corner.
fn legend_spot(
    panel: &Panel,
    column: Column,
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
    (box_w, box_h): (f64, f64),
) -> (SeriesLabelPosition, f64) {
    // The lines, sampled between their points too, as fractions of the plot.
    let mut samples: Vec<(f64, f64)> = Vec::new();
    for s in &panel.series {
        for seg in segments(&drawn(s).0) {
            let frac = |p: &Point| ((column.x(p) - x0) / (x1 - x0), (p.2 - y0) / (y1 - y0));
            samples.extend(seg.first().map(frac));
            for pair in seg.windows(2) {
                let ((ax, ay), (bx, by)) = (frac(&pair[0]), frac(&pair[1]));
                samples.extend((1..=8).map(|k| (ax + (bx - ax) * k as f64 / 8.0, ay + (by - ay) * k as f64 / 8.0)));
            }
        }
    }
    let crossing = |right: bool, upper: bool| {
        samples
            .iter()
            .filter(|(x, y)| (if right { *x > 1.0 - box_w } else { *x < box_w }) && (if upper { *y > 1.0 - box_h } else { *y < box_h }))
            .count()
    };
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let counts: Vec<usize> = corners.iter().map(|(_, right, upper)| crossing(*right, *upper)).collect();
    let best = (0..4).min_by_key(|i| counts[*i]).unwrap_or(0);
    if counts[best] == 0 || panel.y_axis == YAxis::Share {
        return (corners[best].0.clone(), y1);
    }
    // Raise the top until the data end below the box.
    let top = samples.iter().map(|p| p.1).fold(0.0, f64::max).min(1.0);
    let grown = y0 + (y1 - y0) * (top + 0.02) / (1.0 - box_h);
    let upper_right = crossing(true, false) <= crossing(false, false);
    (if upper_right { SeriesLabelPosition::UpperRight } else { SeriesLabelPosition::UpperLeft }, grown.max(y1))
}

/// How a legend entry is drawn.
#[derive(Clone, Copy)]
enum Key {
    Line(ShapeStyle),
    Dashed(ShapeStyle),
    Block(ShapeStyle),
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<Axis, Axis>>;

/// Adds a legend entry (an empty series carrying the label).
fn legend<DB: DrawingBackend>(chart: &mut Chart<'_, DB>, name: &str, key: Key) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let anno = chart.draw_series(std::iter::empty::<Circle<(f64, f64), i32>>()).map_err(plot_err)?.label(name);
    match key {
        Key::Line(style) => anno.legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style)),
        Key::Dashed(style) => anno.legend(move |(x, y)| DashedPathElement::new(vec![(x, y), (x + 20, y)], 5, 3, style)),
        Key::Block(style) => anno.legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 20, y + 6)], style)),
    };
    Ok(())
}

/// Draws `points` as lines, broken at gap markers.
fn draw_line<DB: DrawingBackend>(
    chart: &mut Chart<'_, DB>,
    points: &[Point],
    at: impl Fn(&Point) -> (f64, f64),
    style: ShapeStyle,
    dashed: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    for seg in segments(points) {
        let line = seg.iter().map(&at);
        if dashed {
            chart.draw_series(DashedLineSeries::new(line, 10, 7, style)).map_err(plot_err)?;
        } else {
            chart.draw_series(LineSeries::new(line, style)).map_err(plot_err)?;
        }
    }
    Ok(())
}

/// Room right of a stacked panel for its legend, which would hide the areas.
const SIDE_LEGEND: i32 = 170;

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, panel: &Panel, column: Column) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (x0, x1) = x_range(panel, column);
    let (y0, y1) = y_range(panel);
    let side_legend = !panel.layers.is_empty();
    let entries = panel.series.len() + usize::from(!panel.shaded.is_empty());
    let longest = panel.series.iter().map(|s| s.name.len() + 16).chain([panel.shaded_name.len()]).max().unwrap_or(0);
    let (w, h) = area.dim_in_pixel();
    let plot = ((w as f64 - 130.0).max(100.0), (h as f64 - 110.0).max(100.0));
    let legend_box = ((longest as f64 * 7.5 + 50.0) / plot.0, (entries as f64 * 19.0 + 16.0) / plot.1);
    let (corner, y1) = if side_legend || entries == 0 {
        (SeriesLabelPosition::UpperRight, y1)
    } else {
        legend_spot(panel, column, (x0, x1), (y0, y1), legend_box)
    };
    let share = matches!(panel.y_axis, YAxis::Share | YAxis::ShareFromZero);
    let x_ticks = ticks(x0, x1, 10, matches!(column, Column::Step));
    let y_ticks = if panel.y_axis == YAxis::Share { ticks(0.0, 1.0, 5, false) } else { ticks(y0, y1, 8, false) };
    let x_spacing = x_ticks.windows(2).map(|w| w[1] - w[0]).next().unwrap_or(1.0);
    let y_spacing = y_ticks.windows(2).map(|w| w[1] - w[0]).next().unwrap_or(1.0);
    let (x_desc, caption) = match column {
        Column::Step => ("learner step".to_string(), panel.title.clone()),
        Column::Time { unit, .. } => (format!("wall time ({unit})"), format!("{} over wall time", panel.title)),
    };
    let x_label = move |v: &f64| match column {
        Column::Step => step_label(*v),
        Column::Time { .. } => number_label(*v, x_spacing),
    };
    let y_label =
        move |v: &f64| if share { format!("{}%", number_label(v * 100.0, y_spacing * 100.0)) } else { number_label(*v, y_spacing) };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 19))
        .margin(12)
        .margin_right(if side_legend { SIDE_LEGEND } else { 24 })
        .x_label_area_size(44)
        .y_label_area_size(78)
        .build_cartesian_2d(Axis::new(x0, x1, x_ticks), Axis::new(y0, y1, y_ticks))
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(panel.y_desc.as_str())
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .bold_line_style(BLACK.mix(0.08))
        .axis_desc_style(("sans-serif", 15))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;
    let at = |p: &Point| (column.x(p), p.2.clamp(y0, y1));
    // Legend entries, in the order they are listed.
    let mut keys: Vec<(String, Key)> = Vec::new();

    // Stacked shares: each layer a polygon between the running sums below and above it.
    let mut below: Vec<f64> = panel.layers.first().map(|l| vec![0.0; l.points.len()]).unwrap_or_default();
    for layer in &panel.layers {
        let above: Vec<f64> = below.iter().zip(&layer.points).map(|(b, p)| b + p.2).collect();
        let xs: Vec<f64> = layer.points.iter().map(|p| column.x(p)).collect();
        let outline: Vec<(f64, f64)> = xs
            .iter()
            .zip(&above)
            .map(|(x, y)| (*x, y.clamp(y0, y1)))
            .chain(xs.iter().zip(&below).rev().map(|(x, y)| (*x, y.clamp(y0, y1))))
            .collect();
        let fill = layer.color.mix(0.85).filled();
        chart.draw_series(std::iter::once(Polygon::new(outline, fill))).map_err(plot_err)?;
        // Listed top layer first, as they are stacked.
        keys.insert(0, (layer.name.clone(), Key::Block(fill)));
        below = above;
    }

    // Over the areas, under the lines.
    let shade = RGBColor(214, 39, 40);
    let shade_fill = if side_legend { shade.mix(0.3).filled() } else { shade.mix(0.12).filled() };
    for (s_lo, s_hi, t_lo, t_hi) in &panel.shaded {
        let (a, b) = match column {
            Column::Step => (*s_lo - 0.5, *s_hi + 0.5),
            Column::Time { seconds, .. } => (t_lo / seconds, t_hi / seconds),
        };
        // On stacked areas the band must show through them: stronger, with edges.
        chart.draw_series(std::iter::once(Rectangle::new([(a, y0), (b, y1)], shade_fill))).map_err(plot_err)?;
        if side_legend {
            chart.draw_series(std::iter::once(Rectangle::new([(a, y0), (b, y1)], shade.stroke_width(2)))).map_err(plot_err)?;
        }
    }
    if !panel.shaded.is_empty() {
        keys.push((panel.shaded_name.to_string(), Key::Block(shade_fill)));
    }

    // Faint and raw lines first, so that the solid lines read on top of them.
    for s in &panel.series {
        let (line, window) = drawn(s);
        match s.style {
            Style::Smoothed if window > 1 => draw_line(&mut chart, &s.points, at, s.color.mix(0.25).stroke_width(1), false)?,
            Style::Faint => {
                let style = s.color.mix(0.6).stroke_width(2);
                draw_line(&mut chart, &line, at, style, false)?;
                let name = if window > 1 { format!("{} ({window}-step avg)", s.name) } else { s.name.clone() };
                keys.push((name, Key::Line(style)));
            }
            _ => {}
        }
    }
    for s in &panel.series {
        let (line, window) = drawn(s);
        let (style, name) = match s.style {
            Style::Faint => continue,
            Style::Smoothed if window > 1 => (s.color.stroke_width(2), format!("{} ({window}-step avg)", s.name)),
            Style::Prominent => (s.color.stroke_width(3), s.name.clone()),
            _ => (s.color.stroke_width(2), s.name.clone()),
        };
        let dashed = s.style == Style::Limit;
        draw_line(&mut chart, &line, at, style, dashed)?;
        if s.style == Style::Prominent {
            let color = s.color;
            chart.draw_series(line.iter().filter(|p| !p.2.is_nan()).map(|p| Circle::new(at(p), 4, color.filled()))).map_err(plot_err)?;
        }
        keys.push((name, if dashed { Key::Dashed(style) } else { Key::Line(style) }));
    }

    if keys.is_empty() {
        return Ok(());
    }
    if side_legend {
        // Beside the plot: stacked areas leave no free corner.
        let (w, _) = area.dim_in_pixel();
        let x = w as i32 - SIDE_LEGEND + 14;
        for (i, (name, key)) in keys.iter().enumerate() {
            let y = 48 + 22 * i as i32;
            let style = match key {
                Key::Line(s) | Key::Dashed(s) | Key::Block(s) => *s,
            };
            area.draw(&Rectangle::new([(x, y - 7), (x + 22, y + 7)], style.filled())).map_err(plot_err)?;
            area.draw(&Text::new(name.clone(), (x + 30, y - 8), ("sans-serif", 14))).map_err(plot_err)?;
        }
        return Ok(());
    }
    for (name, key) in &keys {
        legend(&mut chart, name, *key)?;
    }
    chart
        .configure_series_labels()
        .position(corner)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}
