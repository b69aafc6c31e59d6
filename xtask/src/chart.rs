//! The benchmark's chart: connection rate and p99 latency against the number of Services, one
//! line per path, as an SVG beside the JSON (README shows the latest one committed under docs/).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// One measured point: (path, number of Services, conn/s, p99 µs).
pub struct Point<'a> {
    pub path: &'a str,
    pub services: usize,
    pub per_sec: f64,
    pub p99_us: f64,
}

/// Which figure of a point a panel shows.
type Figure = fn(&Point<'_>) -> f64;

/// Draws `points` into `file`: rate above, p99 below, a log scale of Services across. Paths
/// measured at one N only still appear (as a dot), so every row of the table is on the chart.
pub fn write_svg(points: &[Point<'_>], file: &Path) -> Result<()> {
    let mut paths: Vec<&str> = Vec::new();
    for p in points {
        if !paths.contains(&p.path) {
            paths.push(p.path);
        }
    }
    let max_n = points.iter().map(|p| p.services).max().unwrap_or(1) as f64;
    let root = SVGBackend::new(file, (1000, 900)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", file.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(450);
    let rate: Figure = |p| p.per_sec;
    let p99: Figure = |p| p.p99_us;
    let panels = [
        (top, "new connections per second", rate),
        (bottom, "p99 latency per transaction (µs)", p99),
    ];
    for (area, title, value) in panels {
        let y_max = points.iter().map(value).fold(0.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d((0.8..max_n * 1.6).log_scale(), 0.0..y_max.max(1.0))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("Services")
            .y_desc(title)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, path) in paths.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let line: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.path == *path)
                .map(|p| (p.services as f64, value(p)))
                .collect();
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(*path)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart
                .draw_series(line.iter().map(|&xy| Circle::new(xy, 3, color.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_is_drawn_and_named() {
        let point = |path, services, per_sec| Point {
            path,
            services,
            per_sec,
            p99_us: 1e6 / per_sec,
        };
        let points = [
            point("direct pod IP", 1, 9000.0),
            point("direct pod IP", 10_000, 8800.0),
            point("ClusterIP via kpr ebpf", 1, 8700.0),
            point("ClusterIP via kpr ebpf", 10_000, 8000.0),
            point("external client → NodePort via kpr (tc)", 10_000, 7000.0),
        ];
        let dir = std::env::temp_dir().join(format!("kpr-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.svg");
        write_svg(&points, &file).unwrap();
        let svg = std::fs::read_to_string(&file).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        for name in [
            "direct pod IP",
            "ClusterIP via kpr ebpf",
            "NodePort via kpr (tc)",
        ] {
            // Once in each panel's legend.
            assert_eq!(svg.matches(name).count(), 2, "{name}");
        }
        // Two lines of two points per panel (the one-point path is a dot only).
        assert!(svg.matches("<polyline").count() >= 4, "{svg}");
    }
}
