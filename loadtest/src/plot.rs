//! SVG plots: latency CDFs of one run, throughput and goodput against request rate for a
//! sweep. SVG text is laid out by the viewer, so no font files are needed.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::client::RequestOutcome;
use crate::{BenchResult, LoadtestError, Result};

/// Enough points for a smooth curve, few enough for a small file.
const MAX_POINTS: usize = 2000;
const COLORS: [RGBColor; 4] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40)];

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

fn plot_err(e: impl std::fmt::Display) -> LoadtestError {
    LoadtestError::Plot(e.to_string())
}

/// Lines through `series`; with `markers`, a dot on every point (for few, measured points).
fn line_chart(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[Series], markers: bool) -> Result<()> {
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x_max, mut y_max) = (0.0f64, 0.0f64);
    for (x, y) in all {
        x_max = x_max.max(*x);
        y_max = y_max.max(*y);
    }
    let (x_max, y_max) = ((x_max * 1.05).max(1e-9), (y_max * 1.05).max(1e-9));
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(plot_err)?;
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw().map_err(plot_err)?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        if markers {
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(plot_err)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)
}

/// The empirical CDF of `values`, thinned to at most `MAX_POINTS` points.
fn cdf(values: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let step = n.div_ceil(MAX_POINTS).max(1);
    let mut points: Vec<(f64, f64)> = (0..n).step_by(step).map(|i| (sorted[i], (i + 1) as f64 / n as f64)).collect();
    if n > 0 && points.last().map(|p| p.1) != Some(1.0) {
        points.push((sorted[n - 1], 1.0));
    }
    points
}

/// `{prefix}ttft_cdf.svg`, `{prefix}itl_cdf.svg` and `{prefix}e2el_cdf.svg` in `dir`, from the
/// completed requests.
pub fn latency_cdfs(dir: &Path, prefix: &str, outcomes: &[RequestOutcome]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| LoadtestError::io(dir, e))?;
    let ok: Vec<&RequestOutcome> = outcomes.iter().filter(|o| o.is_ok()).collect();
    let ms = |v: f64| v * 1000.0;
    let metrics: [(&str, &str, Vec<f64>); 3] = [
        ("ttft", "Time to first token", ok.iter().map(|o| ms(o.ttft)).collect()),
        ("itl", "Inter-token latency", ok.iter().flat_map(|o| o.itl.iter().map(|&x| ms(x))).collect()),
        ("e2el", "End-to-end latency", ok.iter().map(|o| ms(o.e2el)).collect()),
    ];
    let mut written = Vec::new();
    for (key, title, values) in metrics {
        let path = dir.join(format!("{prefix}{key}_cdf.svg"));
        let series = [Series { name: format!("{key} ({} samples)", values.len()), points: cdf(&values) }];
        line_chart(&path, &format!("{title} CDF"), "milliseconds", "fraction of samples", &series, false)?;
        written.push(path);
    }
    Ok(written)
}

/// `throughput_vs_rate.svg` (request throughput and goodput) and
/// `output_throughput_vs_rate.svg` in `dir`. Runs at an infinite rate have no place on the
/// axis and are left out.
pub fn sweep_plots(dir: &Path, results: &[BenchResult]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| LoadtestError::io(dir, e))?;
    let finite: Vec<&BenchResult> = results.iter().filter(|r| r.info.request_rate.is_finite()).collect();
    let line = |name: &str, f: &dyn Fn(&BenchResult) -> Option<f64>| Series {
        name: name.to_string(),
        points: finite.iter().filter_map(|r| f(r).map(|y| (r.info.request_rate, y))).collect(),
    };
    let mut requests = vec![line("request throughput", &|r| Some(r.request_throughput))];
    if finite.iter().any(|r| r.request_goodput.is_some()) {
        requests.push(line("goodput", &|r| r.request_goodput));
    }
    requests.push(line("offered load", &|r| Some(r.info.request_rate)));
    let tokens = [line("output tokens/s", &|r| Some(r.output_throughput)), line("total tokens/s", &|r| Some(r.total_token_throughput))];

    let a = dir.join("throughput_vs_rate.svg");
    line_chart(&a, "Throughput and goodput vs request rate", "request rate (req/s)", "requests/s", &requests, true)?;
    let b = dir.join("output_throughput_vs_rate.svg");
    line_chart(&b, "Token throughput vs request rate", "request rate (req/s)", "tokens/s", &tokens, true)?;
    Ok(vec![a, b])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_plot_has_a_goodput_series_only_with_goodput() {
        let run = |rate: f64, goodput: Option<f64>| BenchResult {
            info: crate::result::RunInfo { request_rate: rate, ..Default::default() },
            request_throughput: rate * 0.9,
            request_goodput: goodput,
            ..Default::default()
        };
        let dir = std::env::temp_dir().join(format!("tandem-loadtest-plot-{}", std::process::id()));
        let svg = |results: &[BenchResult]| {
            let paths = sweep_plots(&dir, results).unwrap();
            std::fs::read_to_string(&paths[0]).unwrap()
        };
        // The texts of the plot: title, tick labels and the legend's series names.
        let texts = |svg: &str| -> Vec<String> {
            svg.split("<text").skip(1).filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim().to_string())).collect()
        };
        let without = svg(&[run(1.0, None), run(2.0, None)]);
        let with = svg(&[run(1.0, Some(0.8)), run(2.0, Some(1.2))]);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!texts(&without).contains(&"goodput".to_string()), "{without}");
        assert!(texts(&with).contains(&"goodput".to_string()), "{with}");
        // One more line, and its two measured points.
        assert!(with.matches("<polyline").count() > without.matches("<polyline").count());
        assert_eq!(with.matches("<circle").count(), without.matches("<circle").count() + 2);
    }

    #[test]
    fn cdf_is_monotone_thin_and_ends_at_one() {
        let values: Vec<f64> = (0..10_000).rev().map(f64::from).collect();
        let c = cdf(&values);
        assert!(c.len() <= MAX_POINTS + 1);
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert_eq!(c.last(), Some(&(9999.0, 1.0)));
        assert!(cdf(&[]).is_empty());
    }
}
