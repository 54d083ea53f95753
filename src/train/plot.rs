//! Loss curves as self-contained SVG line charts: no fonts, scripts or external files, so the
//! file opens anywhere (a browser, an image viewer, a README).
//!
//! ```ignore
//! let train = Series::new("train", smooth(&train_points, 20), PALETTE[0]);
//! let eval = Series::new("eval", eval_points, PALETTE[1]);
//! write_loss_curve(&out.join("loss.svg"), &[train, eval], "Decoder loss", "step", "loss")?;
//! ```
//!
//! Non-finite points (NaN, ±∞) are dropped; a chart with no points at all still renders (axes
//! and a "no data" note).

use crate::util::atomic_write;
use crate::Result;
use std::fmt::Write as _;
use std::path::Path;

/// Colours that read well together on white (Tableau 10).
pub const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// One line of a chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The legend entry.
    pub name: String,
    /// `(x, y)` points, drawn in order.
    pub points: Vec<(f64, f64)>,
    /// Any SVG colour (`#4e79a7`, `teal`).
    pub color: &'static str,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>, color: &'static str) -> Series {
        Series {
            name: name.into(),
            points,
            color,
        }
    }
}

/// A trailing moving average: each point's `y` becomes the mean of the `y`s of the last
/// `window` finite points up to it (fewer at the start). Non-finite points are dropped;
/// `window <= 1` only drops them.
pub fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let finite: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let window = window.max(1);
    let mut out = Vec::with_capacity(finite.len());
    let mut sum = 0.0;
    for (i, &(x, y)) in finite.iter().enumerate() {
        sum += y;
        if i >= window {
            sum -= finite[i - window].1;
        }
        let n = (i + 1).min(window);
        out.push((x, sum / n as f64));
    }
    out
}

const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 480.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 52.0;
const BOTTOM: f64 = 62.0;
const FONT: &str = "-apple-system, 'Segoe UI', Helvetica, Arial, sans-serif";

/// An SVG line chart of `series` (see the module docs). Axes get about five "nice" ticks
/// (1, 2 or 5 times a power of ten) with grid lines, and a legend lists the series that
/// have points.
pub fn loss_curve_svg(series: &[Series], title: &str, x_label: &str, y_label: &str) -> String {
    let lines: Vec<(&Series, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| {
            let pts = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect::<Vec<_>>();
            (s, pts)
        })
        .filter(|(_, pts)| !pts.is_empty())
        .collect();
    let all = lines.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let empty = lines.is_empty();
    if empty {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let xt = Ticks::new(x0, x1, 6);
    let yt = Ticks::new(y0, y1, 5);

    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let sx = |x: f64| LEFT + (x - xt.lo) / (xt.hi - xt.lo) * pw;
    let sy = |y: f64| TOP + ph - (y - yt.lo) / (yt.hi - yt.lo) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="{FONT}">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="30" text-anchor="middle" font-size="18" font-weight="600" fill="#222">{}</text>"##,
        LEFT + pw / 2.0,
        escape(title)
    );

    // grid and tick labels
    let _ = writeln!(s, r##"<g stroke="#e6e6e6" stroke-width="1">"##);
    for &v in &xt.values {
        let x = sx(v);
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{TOP:.1}" x2="{x:.1}" y2="{:.1}"/>"#,
            TOP + ph
        );
    }
    for &v in &yt.values {
        let y = sy(v);
        let _ = writeln!(
            s,
            r#"<line x1="{LEFT:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}"/>"#,
            LEFT + pw
        );
    }
    let _ = writeln!(s, "</g>");
    let _ = writeln!(
        s,
        r##"<g font-size="12" fill="#555" text-anchor="middle">"##
    );
    for &v in &xt.values {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            sx(v),
            TOP + ph + 18.0,
            xt.label(v)
        );
    }
    let _ = writeln!(s, "</g>");
    let _ = writeln!(s, r##"<g font-size="12" fill="#555" text-anchor="end">"##);
    for &v in &yt.values {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            LEFT - 8.0,
            sy(v) + 4.0,
            yt.label(v)
        );
    }
    let _ = writeln!(s, "</g>");
    // axes
    let _ = writeln!(
        s,
        r##"<path d="M{LEFT:.1},{TOP:.1} V{:.1} H{:.1}" fill="none" stroke="#888" stroke-width="1"/>"##,
        TOP + ph,
        LEFT + pw
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13" fill="#333">{}</text>"##,
        LEFT + pw / 2.0,
        HEIGHT - 16.0,
        escape(x_label)
    );
    let _ = writeln!(
        s,
        r##"<text transform="translate(20 {:.1}) rotate(-90)" text-anchor="middle" font-size="13" fill="#333">{}</text>"##,
        TOP + ph / 2.0,
        escape(y_label)
    );

    if empty {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="14" fill="#999">no data</text>"##,
            LEFT + pw / 2.0,
            TOP + ph / 2.0
        );
    }

    // the lines, clipped to the plot area
    let _ = writeln!(
        s,
        r#"<clipPath id="plot-area"><rect x="{LEFT:.1}" y="{TOP:.1}" width="{pw:.1}" height="{ph:.1}"/></clipPath>"#
    );
    let _ = writeln!(s, r#"<g clip-path="url(#plot-area)" fill="none">"#);
    for (ser, pts) in &lines {
        let mut d = String::with_capacity(pts.len() * 14);
        for (i, &(x, y)) in pts.iter().enumerate() {
            if i > 0 {
                d.push(' ');
            }
            let _ = write!(d, "{:.1},{:.1}", sx(x), sy(y));
        }
        let _ = writeln!(
            s,
            r#"<polyline points="{d}" stroke="{}" stroke-width="2" stroke-linejoin="round" stroke-linecap="round"/>"#,
            escape(ser.color)
        );
        if pts.len() == 1 {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#,
                sx(pts[0].0),
                sy(pts[0].1),
                escape(ser.color)
            );
        }
    }
    let _ = writeln!(s, "</g>");

    // legend, top right inside the plot area
    if !lines.is_empty() {
        let longest = lines
            .iter()
            .map(|(ser, _)| ser.name.chars().count())
            .max()
            .unwrap_or(0);
        let w = 44.0 + 7.0 * longest as f64;
        let h = 10.0 + 20.0 * lines.len() as f64;
        let (lx, ly) = (LEFT + pw - w - 10.0, TOP + 10.0);
        let _ = writeln!(
            s,
            r##"<rect x="{lx:.1}" y="{ly:.1}" width="{w:.1}" height="{h:.1}" rx="4" fill="white" fill-opacity="0.85" stroke="#ddd"/>"##
        );
        for (i, (ser, _)) in lines.iter().enumerate() {
            let y = ly + 15.0 + 20.0 * i as f64;
            let _ = writeln!(
                s,
                r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="3" stroke-linecap="round"/>"#,
                lx + 10.0,
                lx + 30.0,
                escape(ser.color)
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" font-size="12" fill="#333">{}</text>"##,
                lx + 38.0,
                y + 4.0,
                escape(&ser.name)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// [`loss_curve_svg`] written to `path` atomically.
pub fn write_loss_curve(
    path: &Path,
    series: &[Series],
    title: &str,
    x_label: &str,
    y_label: &str,
) -> Result<()> {
    atomic_write(
        path,
        loss_curve_svg(series, title, x_label, y_label).as_bytes(),
    )
}

/// Axis ticks: multiples of a nice step (1, 2 or 5 × 10ⁿ) covering the data range.
struct Ticks {
    lo: f64,
    hi: f64,
    step: f64,
    values: Vec<f64>,
}

impl Ticks {
    fn new(min: f64, max: f64, target: usize) -> Ticks {
        let (mut min, mut max) = (min, max);
        if max - min <= f64::EPSILON * max.abs().max(min.abs()).max(1e-300) {
            // one value: a unit-wide window around it (or ±10% of it)
            let pad = if min == 0.0 { 1.0 } else { 0.1 * min.abs() };
            min -= pad;
            max += pad;
        }
        let step = nice_step(min, max, target.max(2));
        let lo = (min / step).floor() * step;
        let hi = (max / step).ceil() * step;
        let n = ((hi - lo) / step).round() as usize;
        let values = (0..=n).map(|i| lo + step * i as f64).collect();
        Ticks {
            lo,
            hi,
            step,
            values,
        }
    }

    /// A tick value with as many decimals as the step needs; large or tiny values in
    /// exponent form.
    fn label(&self, v: f64) -> String {
        let v = if v.abs() < self.step * 1e-9 { 0.0 } else { v };
        let mag = self.lo.abs().max(self.hi.abs());
        if mag >= 1e6 || self.step < 1e-4 {
            let s = format!("{v:.2e}");
            // 1.50e3 → 1.5e3, 2.00e-5 → 2e-5
            match s.split_once('e') {
                Some((m, e)) => {
                    let m = m.trim_end_matches('0').trim_end_matches('.');
                    format!("{m}e{e}")
                }
                None => s,
            }
        } else {
            let decimals = decimals(self.step);
            format!("{v:.decimals$}")
        }
    }
}

/// The step among 1, 2, 2.5 and 5 times a power of ten whose ticks covering `[min, max]` come
/// closest to `target` in number (the larger step on a tie).
fn nice_step(min: f64, max: f64, target: usize) -> f64 {
    let raw = (max - min) / (target - 1) as f64;
    let base = 10f64.powf(raw.log10().floor());
    let count = |step: f64| ((max / step).ceil() - (min / step).floor()) as usize + 1;
    let mut best = (usize::MAX, 0.0);
    for scale in [0.1, 1.0, 10.0] {
        for m in [1.0, 2.0, 2.5, 5.0] {
            let step = m * base * scale;
            let miss = count(step).abs_diff(target);
            if miss < best.0 || (miss == best.0 && step > best.1) {
                best = (miss, step);
            }
        }
    }
    best.1
}

/// The fewest decimals that write every multiple of `step` exactly (0.25 → 2, 0.5 → 1, 50 → 0).
fn decimals(step: f64) -> usize {
    (0..12)
        .find(|&d| {
            let scaled = step * 10f64.powi(d as i32);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.abs().max(1.0)
        })
        .unwrap_or(12)
}

/// Escape text for SVG content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => {}
            c => out.push(c),
        }
    }
    out
}
