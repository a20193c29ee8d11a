//! Plots with plotters (PNG via the bitmap backend with a bundled DejaVu Sans font, and SVG):
//! tokens over the day against vehicles parked/eligible, and a per-policy comparison.
//!
//! Owns: the plots. May import: `metrics`.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::metrics::{CompareReport, RunReport};

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("plotting: {0}")]
    Draw(String),
    #[error("creating {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn err<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError::Draw(format!("{e:?}"))
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Registration only fails on a malformed font, which is bundled and known good.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn day_chart<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    r: &RunReport,
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(err)?;
    let hours = r.series.last().map_or(24.0, |p| p.t_h).max(0.25);
    let interval_h = 0.25;
    let max_tps = r
        .series
        .iter()
        .map(|p| p.tokens as f64 / (interval_h * 3600.0))
        .fold(1.0, f64::max);
    let max_veh = r
        .series
        .iter()
        .map(|p| p.vehicles_parked as f64)
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{} / {}: tokens vs vehicles", r.scenario, r.policy),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .right_y_label_area_size(70)
        .build_cartesian_2d(0.0..hours, 0.0..max_tps * 1.1)
        .map_err(err)?
        .set_secondary_coord(0.0..hours, 0.0..max_veh * 1.1);
    chart
        .configure_mesh()
        .x_desc("hours since start")
        .y_desc("delivered tokens/s")
        .draw()
        .map_err(err)?;
    chart
        .configure_secondary_axes()
        .y_desc("vehicles")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            r.series
                .iter()
                .map(|p| (p.t_h, p.tokens as f64 / (interval_h * 3600.0))),
            BLUE.stroke_width(2),
        ))
        .map_err(err)?
        .label("tokens/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    chart
        .draw_secondary_series(LineSeries::new(
            r.series.iter().map(|p| (p.t_h, p.vehicles_parked as f64)),
            GREEN,
        ))
        .map_err(err)?
        .label("parked")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], GREEN));
    chart
        .draw_secondary_series(LineSeries::new(
            r.series.iter().map(|p| (p.t_h, p.vehicles_eligible as f64)),
            RED,
        ))
        .map_err(err)?
        .label("eligible")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

fn compare_chart<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    c: &CompareReport,
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(err)?;
    let names = ["random", "first-fit", "tokenfleet", "oracle"];
    let rows: Vec<(&str, &RunReport)> = names
        .iter()
        .filter_map(|n| c.policies.get(*n).map(|r| (*n, r)))
        .collect();
    let (left, right) = root.split_horizontally(root.dim_in_pixel().0 / 2);
    let max_tok = rows
        .iter()
        .map(|(_, r)| r.delivered_tokens as f64 / 1e9)
        .fold(1e-9, f64::max);
    let max_waste = rows
        .iter()
        .map(|(_, r)| r.wasted_frac * 100.0)
        .fold(1e-6, f64::max);
    for (area, title, max, value) in [
        (&left, "delivered (billion tokens)", max_tok, 0usize),
        (&right, "wasted (% of computed)", max_waste, 1usize),
    ] {
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{}: {}", c.scenario, title), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0..rows.len(), 0.0..max * 1.15)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(rows.len() + 1)
            .x_label_formatter(&|i| rows.get(*i).map_or(String::new(), |(n, _)| n.to_string()))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(rows.iter().enumerate().map(|(i, (_, r))| {
                let v = if value == 0 {
                    r.delivered_tokens as f64 / 1e9
                } else {
                    r.wasted_frac * 100.0
                };
                let color = Palette99::pick(i).filled();
                Rectangle::new([(i, 0.0), (i + 1, v)], color)
            }))
            .map_err(err)?;
    }
    root.present().map_err(err)
}

fn ensure_dir(dir: &Path) -> Result<(), PlotError> {
    std::fs::create_dir_all(dir).map_err(|source| PlotError::Io {
        path: dir.display().to_string(),
        source,
    })
}

/// Write `<stem>-day.png` and `.svg` for one run; returns the files written.
pub fn plot_run(r: &RunReport, dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    register_font();
    ensure_dir(dir)?;
    let stem = format!("{}-{}-day", r.scenario, r.policy);
    let png = dir.join(format!("{stem}.png"));
    let svg = dir.join(format!("{stem}.svg"));
    day_chart(BitMapBackend::new(&png, (1000, 560)).into_drawing_area(), r)?;
    day_chart(SVGBackend::new(&svg, (1000, 560)).into_drawing_area(), r)?;
    Ok(vec![png, svg])
}

/// Write `<scenario>-compare.png` and `.svg`.
pub fn plot_compare(c: &CompareReport, dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    register_font();
    ensure_dir(dir)?;
    let png = dir.join(format!("{}-compare.png", c.scenario));
    let svg = dir.join(format!("{}-compare.svg", c.scenario));
    compare_chart(BitMapBackend::new(&png, (1100, 480)).into_drawing_area(), c)?;
    compare_chart(SVGBackend::new(&svg, (1100, 480)).into_drawing_area(), c)?;
    Ok(vec![png, svg])
}
