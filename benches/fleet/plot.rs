//! The bench's figure: one panel per measurement, each a set of curves over a shared x axis,
//! drawn as SVG with plotters.

use std::path::Path;

use plotters::element::DashedPathElement;
use plotters::prelude::*;

use super::BoxError;

/// One curve.
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    /// Dashed, so a curve that lies on another one drawn before it leaves that one visible.
    pub dashed: bool,
}

/// One panel: a title, the axes' descriptions, its curves.
pub struct Panel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub curves: Vec<Curve>,
}

/// Colours of the curves, in order: enough for three topologies with two curves each.
pub const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws the panels two per row under `title` into an SVG file at `path`.
pub fn draw(path: &Path, title: &str, panels: &[Panel]) -> Result<(), BoxError> {
    let rows = panels.len().div_ceil(2).max(1);
    let height = u32::try_from(rows).unwrap_or(1) * 360 + 40;
    let root = SVGBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    for (area, panel) in root.split_evenly((rows, 2)).iter().zip(panels) {
        draw_panel(area, panel)?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel,
) -> Result<(), BoxError>
where
    DB::ErrorType: 'static,
{
    let points = || panel.curves.iter().flat_map(|c| c.points.iter());
    let x_max = points().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let y_max = points().map(|p| p.1).fold(0.0, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.25 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(38)
        .y_label_area_size(58)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|e| e.to_string())?;
    let x_label = |x: &f64| format!("{x:.0}");
    let fine = y_max < 5.0;
    let y_label = move |y: &f64| {
        if fine {
            format!("{y:.1}")
        } else {
            format!("{y:.0}")
        }
    };
    chart
        .configure_mesh()
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .x_desc(panel.x_desc.as_str())
        .y_desc(panel.y_desc.as_str())
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| e.to_string())?;
    for curve in &panel.curves {
        let (color, points) = (curve.color, curve.points.iter().copied());
        let series = if curve.dashed {
            chart
                .draw_series(
                    points
                        .clone()
                        .map(|p| Circle::new(p, 3, color.stroke_width(2))),
                )
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(DashedLineSeries::new(points, 8, 5, color.stroke_width(2)))
                .map_err(|e| e.to_string())?
        } else {
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(3))
                .map_err(|e| e.to_string())?
        };
        let dashed = curve.dashed;
        series.label(curve.label.as_str()).legend(move |(x, y)| {
            let (dash, gap) = if dashed { (5, 3) } else { (18, 0) };
            DashedPathElement::new(vec![(x, y), (x + 18, y)], dash, gap, color.stroke_width(2))
        });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}
