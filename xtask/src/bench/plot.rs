//! The report's two plots, as SVG: new connections per second against the number of Services,
//! and programming and endpoint-change times against the number of Services, one panel per
//! endpoint count.
use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::Outcome;
use super::results::{ConfigResult, Variant, Workload};

const SIZE: (u32, u32) = (1100, 460);

fn color(variant: Variant) -> RGBColor {
    match variant {
        Variant::Direct => RGBColor(90, 90, 90),
        Variant::Socket => RGBColor(31, 119, 180),
        Variant::Tc => RGBColor(148, 103, 189),
        Variant::IptablesLegacy => RGBColor(214, 39, 40),
        Variant::IptablesNft => RGBColor(255, 127, 14),
        Variant::Nftables => RGBColor(44, 160, 44),
    }
}

fn plotted(outcome: &Outcome) -> Vec<Variant> {
    Variant::ALL
        .into_iter()
        .filter(|v| outcome.settings.variants.contains(v))
        .collect()
}

fn configs(outcome: &Outcome, endpoints: usize) -> Vec<&ConfigResult> {
    outcome
        .configs
        .iter()
        .filter(|c| c.endpoints == endpoints)
        .collect()
}

fn x_range(outcome: &Outcome) -> std::ops::Range<f64> {
    let max = outcome.settings.services.iter().copied().max().unwrap_or(1) as f64;
    0.7..(max * 1.6).max(10.0)
}

fn err<E: std::fmt::Display>(error: E) -> anyhow::Error {
    anyhow!("drawing the plot: {error}")
}

/// Connections per second (median over rounds) for each variant.
pub fn connections(file: &Path, outcome: &Outcome) -> Result<()> {
    let root = SVGBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((1, outcome.settings.endpoints.len().max(1)));
    for (panel, &endpoints) in panels.iter().zip(&outcome.settings.endpoints) {
        let configs = configs(outcome, endpoints);
        let series: Vec<(Variant, Vec<(f64, f64)>)> = plotted(outcome)
            .into_iter()
            .map(|variant| {
                let points = configs
                    .iter()
                    .filter_map(|c| {
                        let rate = c.rate(variant, Workload::TcpCrr)?;
                        Some((c.services as f64, rate.median))
                    })
                    .collect();
                (variant, points)
            })
            .collect();
        let top = series
            .iter()
            .flat_map(|(_, points)| points.iter().map(|p| p.1))
            .fold(1.0_f64, f64::max);
        draw_panel(
            panel,
            &format!("New TCP connections/s, {}", per_service(endpoints)),
            "connections/s",
            x_range(outcome),
            Scale::Linear(0.0..top * 1.15),
            &series
                .iter()
                .map(|(v, p)| (v.label().to_owned(), color(*v), p.clone(), false))
                .collect::<Vec<_>>(),
        )?;
    }
    root.present().map_err(err)
}

/// Programming from nothing (solid) and one endpoint change (dashed), in seconds.
pub fn sync(file: &Path, outcome: &Outcome) -> Result<()> {
    let root = SVGBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((1, outcome.settings.endpoints.len().max(1)));
    for (panel, &endpoints) in panels.iter().zip(&outcome.settings.endpoints) {
        let configs = configs(outcome, endpoints);
        let mut lines = Vec::new();
        for variant in plotted(outcome)
            .into_iter()
            .filter(|v| v.control_plane_timed())
        {
            let program: Vec<(f64, f64)> = configs
                .iter()
                .filter_map(|c| {
                    let s = c.variants.get(&variant)?.program_s?;
                    Some((c.services as f64, s))
                })
                .collect();
            let change: Vec<(f64, f64)> = configs
                .iter()
                .filter_map(|c| {
                    let times = c.variants.get(&variant)?.change_s.clone();
                    let s = super::results::Spread::of(times)?.median;
                    Some((c.services as f64, s))
                })
                .collect();
            lines.push((
                format!("{}: all Services", variant.label()),
                color(variant),
                program,
                false,
            ));
            lines.push((
                format!("{}: one change", variant.label()),
                color(variant),
                change,
                true,
            ));
        }
        let values = lines.iter().flat_map(|l| l.2.iter().map(|p| p.1));
        let (low, high) = values.fold((f64::MAX, 1e-3_f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let low = if low == f64::MAX { 1e-3 } else { low };
        draw_panel(
            panel,
            &format!("Programming time, {}", per_service(endpoints)),
            "seconds",
            x_range(outcome),
            Scale::Log((low / 2.0).max(1e-5)..high * 2.0),
            &lines,
        )?;
    }
    root.present().map_err(err)
}

fn per_service(endpoints: usize) -> String {
    if endpoints == 1 {
        "1 endpoint per Service".to_owned()
    } else {
        format!("{endpoints} endpoints per Service")
    }
}

enum Scale {
    Linear(std::ops::Range<f64>),
    Log(std::ops::Range<f64>),
}

/// (label, color, points, dashed)
type Line = (String, RGBColor, Vec<(f64, f64)>, bool);

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    y_label: &str,
    x: std::ops::Range<f64>,
    y: Scale,
    lines: &[Line],
) -> Result<()> {
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(70);
    match y {
        Scale::Linear(range) => {
            let mut chart = builder
                .build_cartesian_2d(x.log_scale(), range)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("Services (log scale)")
                .y_desc(y_label)
                .x_label_formatter(&|v| short(*v))
                .y_label_formatter(&|v| short(*v))
                .draw()
                .map_err(err)?;
            for line in lines {
                draw_line(&mut chart, line)?;
            }
            legend(&mut chart, SeriesLabelPosition::LowerLeft)
        }
        Scale::Log(range) => {
            let mut chart = builder
                .build_cartesian_2d(x.log_scale(), range.log_scale())
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("Services (log scale)")
                .y_desc(format!("{y_label} (log scale)"))
                .x_label_formatter(&|v| short(*v))
                .y_label_formatter(&|v| seconds(*v))
                .draw()
                .map_err(err)?;
            for line in lines {
                draw_line(&mut chart, line)?;
            }
            legend(&mut chart, SeriesLabelPosition::UpperLeft)
        }
    }
}

fn draw_line<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    (label, color, points, dashed): &Line,
) -> Result<()>
where
    X: plotters::coord::ranged1d::Ranged<ValueType = f64>,
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>,
{
    if points.is_empty() {
        return Ok(());
    }
    let color = *color;
    let style = color.stroke_width(2);
    if *dashed {
        chart
            .draw_series(DashedLineSeries::new(points.clone(), 6, 4, style))
            .map_err(err)?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 8, y)], color.stroke_width(2))
            });
    } else {
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(err)?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .draw_series(
            points
                .iter()
                .map(|&(px, py)| Circle::new((px, py), 3, color.filled())),
        )
        .map_err(err)?;
    Ok(())
}

fn legend<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
) -> Result<()>
where
    X: plotters::coord::ranged1d::Ranged<ValueType = f64>,
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(err)
}

/// `1`, `100`, `10k`, `1.5M`.
fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if v >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let text = format!("{v:.1}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn seconds(v: f64) -> String {
    if v >= 1.0 {
        format!("{} s", trim(v))
    } else if v >= 1e-3 {
        format!("{} ms", trim(v * 1e3))
    } else {
        format!("{} µs", trim(v * 1e6))
    }
}
