//! The guide's Harbor Analytics story on the simulation, in virtual time, with the capacity
//! advisor's verdict on each configuration.
//!
//! ```text
//! cargo run --release --example harbor -- [--seed N] [--svg PATH]
//! ```
//!
//! Prints one Markdown table (one TP=2 replica of a 70B model at holiday load; at the normal
//! load; two TP=2 replicas behind the full stack; one TP=4 replica on the same four GPUs; the
//! long-context lesson under four affinity policies) and writes a chart of the TTFT
//! percentiles and the aggregate throughput per configuration to `--svg` (default
//! `target/harbor.svg`). Every number comes from `replica_router_mock::sim::harbor`.

use std::error::Error;
use std::path::PathBuf;
use std::time::Instant;

use plotters::prelude::*;
use replica_router_mock::sim::harbor::{harbor, HarborConfig, HarborReport};

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
    "(b') bounded",
    "(c) 1xTP4",
    "(d) conv",
    "(d) user",
    "(d) bnd conv",
    "(d) bnd user",
    "(d) full",
];

fn chart(report: &HarborReport, path: &PathBuf) -> Result<(), Box<dyn Error>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let runs: Vec<_> = report.runs().collect();
    let n = runs.len();
    let label = |x: &f64| -> String {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
            SHORT.get(i as usize).copied().unwrap_or("").to_owned()
        } else {
            String::new()
        }
    };
    let root = SVGBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(760);

    // TTFT percentiles, log scale.
    let secs = |d: std::time::Duration| d.as_secs_f64().max(0.01);
    let top = runs
        .iter()
        .map(|r| secs(r.report.ttft.p99))
        .fold(1.0, f64::max)
        * 2.0;
    let mut ttft = ChartBuilder::on(&left)
        .caption("TTFT p50 / p95 / p99 (s, log scale)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (0.01f64..top).log_scale())?;
    ttft.configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&label)
        .x_label_style(("sans-serif", 11))
        .y_desc("seconds")
        .draw()?;
    let colors = [
        RGBColor(120, 170, 220),
        RGBColor(30, 100, 180),
        RGBColor(10, 40, 90),
    ];
    for (k, (name, color)) in ["p50", "p95", "p99"].iter().zip(colors).enumerate() {
        ttft.draw_series(runs.iter().enumerate().map(|(i, r)| {
            let p = &r.report.ttft;
            let v = secs([p.p50, p.p95, p.p99][k]);
            let x0 = i as f64 - 0.36 + 0.24 * k as f64;
            Rectangle::new([(x0, 0.01), (x0 + 0.22, v)], color.filled())
        }))?
        .label(*name)
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    ttft.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;

    // Aggregate throughput.
    let max_tps = runs.iter().map(|r| r.report.throughput).fold(1.0, f64::max) * 1.15;
    let mut tps = ChartBuilder::on(&right)
        .caption("aggregate generated tok/s", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..max_tps)?;
    tps.configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&label)
        .x_label_style(("sans-serif", 11))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("tokens / s")
        .draw()?;
    tps.draw_series(runs.iter().enumerate().map(|(i, r)| {
        let color = if i == 2 {
            RGBColor(30, 140, 80)
        } else {
            RGBColor(150, 150, 150)
        };
        Rectangle::new(
            [
                (i as f64 - 0.35, 0.0),
                (i as f64 + 0.35, r.report.throughput),
            ],
            color.filled(),
        )
    }))?;
    tps.draw_series(runs.iter().enumerate().map(|(i, r)| {
        Text::new(
            format!("{:.0}", r.report.throughput),
            (i as f64 - 0.3, r.report.throughput + max_tps * 0.01),
            ("sans-serif", 12),
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
