//! The guide's Harbor Analytics story on the simulation, in virtual time, with the capacity
//! advisor's verdict on each configuration.
//!
//! ```text
//! cargo run --release --example harbor -- [--seed N] [--svg PATH]
//! ```
//!
//! Prints one Markdown table (one TP=2 replica of a 70B model at holiday load; at the normal
//! load; two TP=2 replicas behind the full stack; one TP=4 replica on the same four GPUs; the
//! long-context lesson under five policies) and writes a chart of the TTFT distributions
//! (empirical CDFs) and the aggregate throughput per configuration to `--svg` (default
//! `target/harbor.svg`). Every number comes from `replica_router_mock::sim::harbor`.

use std::error::Error;
use std::path::PathBuf;
use std::time::Instant;

use plotters::prelude::*;
use replica_router_mock::sim::harbor::{harbor, HarborConfig, HarborReport, HarborRun};

struct Args {
    seed: u64,
    svg: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seed: HarborConfig::default().seed,
        svg: PathBuf::from("target/harbor.svg"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--svg" => args.svg = PathBuf::from(value()?),
            "-h" | "--help" => {
                println!("cargo run --release --example harbor -- [--seed N] [--svg PATH]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// Short names of the runs, in table order, for the chart's axis.
const SHORT: [&str; 10] = [
    "(a) 1xTP2",
    "1xTP2 half",
    "(b) 2xTP2",
    "(b') bnd",
    "(c) 1xTP4",
    "(d) conv",
    "(d) user",
    "(d) b-conv",
    "(d) b-user",
    "(d) full",
];

/// Up to `points` points of the empirical CDF of sorted `samples`: (seconds, fraction at or
/// below).
fn cdf(samples: &[std::time::Duration], points: usize) -> Vec<(f64, f64)> {
    let n = samples.len();
    if n == 0 {
        return Vec::new();
    }
    let step = (n / points.max(1)).max(1);
    let mut out: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| {
            (
                samples[i].as_secs_f64().max(0.01),
                (i + 1) as f64 / n as f64,
            )
        })
        .collect();
    out.push((samples[n - 1].as_secs_f64().max(0.01), 1.0));
    out
}

const PALETTE: [RGBColor; 5] = [
    RGBColor(200, 60, 50),
    RGBColor(120, 120, 120),
    RGBColor(30, 140, 80),
    RGBColor(90, 160, 220),
    RGBColor(150, 90, 200),
];

fn cdf_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    runs: &[(&str, &HarborRun)],
    top: f64,
) -> Result<(), Box<dyn Error>> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(50)
        .build_cartesian_2d((0.01f64..top).log_scale(), 0f64..1.0)?;
    chart
        .configure_mesh()
        .x_desc("time to first token (s, log scale)")
        .y_desc("fraction of requests")
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()?;
    for (k, (name, run)) in runs.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                cdf(&run.report.ttft_samples, 400),
                color.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 12))
        .draw()?;
    Ok(())
}

fn chart(report: &HarborReport, path: &PathBuf) -> Result<(), Box<dyn Error>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let runs: Vec<&HarborRun> = report.runs().collect();
    let n = runs.len();
    let top = runs
        .iter()
        .filter_map(|r| r.report.ttft_samples.last())
        .map(|d| d.as_secs_f64())
        .fold(1.0, f64::max)
        * 1.5;
    let root = SVGBackend::new(path, (1560, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, rest) = root.split_horizontally(520);
    let (middle, right) = rest.split_horizontally(520);

    // TTFT distributions: the holiday story, then the long-context lesson.
    let main: Vec<(&str, &HarborRun)> = SHORT
        .iter()
        .copied()
        .zip(runs.iter().copied())
        .take(5)
        .collect();
    cdf_panel(&left, "TTFT distribution: (a)-(c)", &main, top)?;
    let long: Vec<(&str, &HarborRun)> = SHORT
        .iter()
        .copied()
        .zip(runs.iter().copied())
        .skip(5)
        .collect();
    cdf_panel(&middle, "TTFT distribution: (d) >32k sessions", &long, top)?;

    // Aggregate throughput.
    let label = |x: &f64| -> String {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
            SHORT.get(i as usize).copied().unwrap_or("").to_owned()
        } else {
            String::new()
        }
    };
    let max_tps = runs.iter().map(|r| r.report.throughput).fold(1.0, f64::max) * 1.15;
    let mut tps = ChartBuilder::on(&right)
        .caption("aggregate generated tok/s", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..max_tps)?;
    tps.configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&label)
        .x_label_style(("sans-serif", 9))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    tps.draw_series(runs.iter().enumerate().map(|(i, r)| {
        let color = if i == 2 {
            RGBColor(30, 140, 80)
        } else {
            RGBColor(150, 150, 150)
        };
        Rectangle::new(
            [
                (i as f64 - 0.38, 0.0),
                (i as f64 + 0.38, r.report.throughput),
            ],
            color.filled(),
        )
    }))?;
    tps.draw_series(runs.iter().enumerate().map(|(i, r)| {
        Text::new(
            format!("{:.0}", r.report.throughput),
            (i as f64 - 0.38, r.report.throughput + max_tps * 0.01),
            ("sans-serif", 10),
        )
    }))?;
    root.present()?;
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let config = HarborConfig {
        seed: args.seed,
        ..HarborConfig::default()
    };
    let started = Instant::now();
    let report = harbor(&config)?;
    println!(
        "## Harbor Analytics in virtual time (70B, FP8, H100; {} s of arrivals, {} s warm-up, seed {})\n",
        config.arrival_window.as_secs(),
        config.warmup.as_secs(),
        config.seed
    );
    print!("{}", report.to_markdown());
    let (b, a, half) = (
        &report.two_replicas_holiday,
        &report.one_replica_holiday,
        &report.one_replica_normal,
    );
    println!(
        "\nTwo TP=2 replicas: {:.2}x the aggregate tok/s of one at holiday load, p95 TTFT {:.2} s \
         vs {:.2} s for one replica at half the load. One TP=4 replica on the same GPUs: {:.2}x \
         one TP=2 replica's capacity (two TP=2: 2.00x), {:.1} ms per token at low load vs {:.1} ms \
         for TP=2.",
        report.dp_speedup(),
        b.report.ttft.p95.as_secs_f64(),
        half.report.ttft.p95.as_secs_f64(),
        report.tp4_capacity_ratio(),
        report.tp4_holiday.low_load_tpot.as_secs_f64() * 1e3,
        a.low_load_tpot.as_secs_f64() * 1e3,
    );
    println!("\nAdvisor on (a):\n{}", a.advice);
    chart(&report, &args.svg)?;
    println!(
        "\nChart: {} (simulated in {:.1} s of wall time)",
        args.svg.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
