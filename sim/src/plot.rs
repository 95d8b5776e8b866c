//! Plots: small hand-written SVG line charts (no dependency), for the sweep's curves.

use std::fmt::Write as _;

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// (x, y) points, drawn in order.
    pub points: Vec<(f64, f64)>,
}

/// A line chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// Title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Logarithmic x axis.
    pub log_x: bool,
    /// Logarithmic y axis (values below 1 are drawn at 1).
    pub log_y: bool,
    /// The lines.
    pub series: Vec<Series>,
}

const W: f64 = 720.0;
const H: f64 = 420.0;
const L: f64 = 80.0;
const R: f64 = 190.0;
const T: f64 = 40.0;
const B: f64 = 60.0;
const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A "nice" step for about `n` ticks over `span`.
fn step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    mag * if f < 1.5 {
        1.0
    } else if f < 3.5 {
        2.0
    } else if f < 7.5 {
        5.0
    } else {
        10.0
    }
}

impl Chart {
    /// The chart as an SVG document.
    pub fn svg(&self) -> String {
        let pts = self.series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 1.0f64);
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            (x0, x1) = (0.0, 1.0);
        }
        let tx = |x: f64| if self.log_x { x.max(1e-9).log10() } else { x };
        let (a, b) = (tx(x0), tx(x1).max(tx(x0) + 1e-9));
        let ys = step(y1.max(1e-9), 5.0);
        let ytop = if self.log_y {
            10f64.powf(y1.max(1.0).log10().ceil().max(1.0))
        } else {
            (y1 / ys).ceil().max(1.0) * ys
        };
        let ty = |y: f64| if self.log_y { y.max(1.0).log10() / ytop.log10() } else { y / ytop };
        let px = |x: f64| L + (tx(x) - a) / (b - a) * (W - L - R);
        let py = |y: f64| H - B - ty(y) * (H - T - B);
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = write!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = write!(
            s,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
            (W - R + L) / 2.0,
            esc(&self.title)
        );
        // Axes, grid and ticks.
        let yticks: Vec<f64> = if self.log_y {
            (0..=ytop.log10().round() as i32).map(|e| 10f64.powi(e)).collect()
        } else {
            (0..).map(|k| f64::from(k) * ys).take_while(|y| *y <= ytop + ys / 2.0).collect()
        };
        for y in yticks {
            let p = py(y);
            let _ = write!(
                s,
                r##"<line x1="{L}" y1="{p:.1}" x2="{:.1}" y2="{p:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - R,
                L - 6.0,
                p + 4.0,
                trim(y)
            );
        }
        let xticks: Vec<f64> = if self.log_x {
            let mut v = Vec::new();
            let mut d = 10f64.powf(a.floor());
            while d <= x1 * 1.0001 {
                for m in [1.0, 2.0, 5.0] {
                    if d * m >= x0 * 0.9999 && d * m <= x1 * 1.0001 {
                        v.push(d * m);
                    }
                }
                d *= 10.0;
            }
            v
        } else {
            let st = step(x1 - x0, 6.0);
            let mut v = Vec::new();
            let mut x = (x0 / st).ceil() * st;
            while x <= x1 + st / 2.0 {
                v.push(x);
                x += st;
            }
            v
        };
        for x in xticks {
            let p = px(x);
            let _ = write!(
                s,
                r#"<line x1="{p:.1}" y1="{:.1}" x2="{p:.1}" y2="{:.1}" stroke="black"/><text x="{p:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                H - B,
                H - B + 5.0,
                H - B + 20.0,
                trim(x)
            );
        }
        let _ = write!(
            s,
            r#"<line x1="{L}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/><line x1="{L}" y1="{T}" x2="{L}" y2="{:.1}" stroke="black"/>"#,
            H - B,
            W - R,
            H - B,
            H - B
        );
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            (W - R + L) / 2.0,
            H - 15.0,
            esc(&self.x_label)
        );
        let _ = write!(
            s,
            r#"<text transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            (H - B + T) / 2.0,
            esc(&self.y_label)
        );
        for (k, se) in self.series.iter().enumerate() {
            let c = COLORS[k % COLORS.len()];
            let path: Vec<String> =
                se.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
            let _ = write!(
                s,
                r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
                path.join(" ")
            );
            for &(x, y) in &se.points {
                let _ =
                    write!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#, px(x), py(y));
            }
            let ly = T + 10.0 + 20.0 * k as f64;
            let _ = write!(
                s,
                r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{c}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                W - R + 10.0,
                W - R + 30.0,
                W - R + 35.0,
                ly + 4.0,
                esc(&se.name)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

fn trim(v: f64) -> String {
    if v.abs() >= 1000.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_svg_with_every_series() {
        let c = Chart {
            title: "a < b".into(),
            x_label: "nodes".into(),
            y_label: "s".into(),
            log_x: true,
            log_y: false,
            series: vec![
                Series { name: "p50".into(), points: vec![(100.0, 3.0), (10_000.0, 3.5)] },
                Series { name: "p95".into(), points: vec![(100.0, 5.0), (10_000.0, 6.0)] },
            ],
        };
        let s = c.svg();
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("a &lt; b"));
        assert!(s.contains(">1000<") && s.contains(">100<"));
        let log = Chart { log_y: true, ..c }.svg();
        assert!(log.contains(">10<") && log.contains(">1<"));
    }
}
