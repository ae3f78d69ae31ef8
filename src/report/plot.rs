//! SVG line plots (plotters' SVG backend: text is written as SVG text, so no system fonts are needed).
use plotters::prelude::*;
use std::path::Path;

use crate::error::{Error, Result};

/// One line per (label, points) on a log-scaled y axis (losses span orders of magnitude early in training);
/// non-positive values are left out.
pub fn curves(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let err = |e: String| Error::file(path, format!("cannot draw the plot: {e}"));
    let pts = series
        .iter()
        .flat_map(|(_, v)| v.iter().filter(|p| p.1 > 0.0));
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return Err(err("no positive values to plot".into()));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 * 1.001 {
        (y0, y1) = (y0 * 0.9, y1 * 1.1);
    }
    let root = SVGBackend::new(path, (860, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    // log-y only when the values span a decade or more (else a log axis has no labelled ticks)
    let (lo, hi) = (y0 * 0.95, y1 * 1.05);
    if hi / lo >= 10.0 {
        draw(&root, title, y_label, series, x0..x1, (lo..hi).log_scale()).map_err(err)?;
    } else {
        draw(&root, title, y_label, series, x0..x1, lo..hi).map_err(err)?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn draw<Y>(
    root: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x: std::ops::Range<f64>,
    y: Y,
) -> std::result::Result<(), String>
where
    Y: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    Y::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
{
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_label)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            let s = format!("{y:.3}");
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        })
        .draw()
        .map_err(|x| e(&x))?;
    for (i, (label, v)) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                v.iter().copied().filter(|p| p.1 > 0.0),
                colour.stroke_width(2),
            ))
            .map_err(|x| e(&x))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|x| e(&x))?;
    Ok(())
}
