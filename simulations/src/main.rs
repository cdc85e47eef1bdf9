//! `outpost-sim`: the demo, the deterministic simulator, the load generator and the catch-up
//! benchmark.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "outpost-sim",
    version,
    about = "Outpost simulations and the demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A hub and branches on loopback: a rush hour, one branch cut off for a while, a final
    /// report checked against the hub, then the dashboard until Ctrl-C.
    Demo {
        /// Where to keep the databases (a temporary directory by default).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Seconds of rush hour.
        #[arg(long, default_value_t = 30)]
        duration: u64,
        /// Branches (2 to 20).
        #[arg(long, default_value_t = 3)]
        branches: usize,
        /// Tills per branch.
        #[arg(long, default_value_t = 4)]
        tills: usize,
        /// Milliseconds between two orders at one till (0: flat out).
        #[arg(long, default_value_t = 100)]
        pace_ms: u64,
        /// Exit after the report instead of keeping the dashboard up.
        #[arg(long)]
        exit: bool,
    },
    /// The deterministic sync simulator: `--seed N` replays one seed, `--seeds A..B` runs a range.
    Sim {
        #[arg(long, conflicts_with = "seeds")]
        seed: Option<u64>,
        #[arg(long, default_value = "0..100")]
        seeds: String,
        /// Edges per run (1 to 16); by default each seed picks 1 to 6.
        #[arg(long)]
        edges: Option<usize>,
    },
    /// How many seeds catch each deliberate protocol bug (built with `--features mutations`).
    #[cfg(feature = "mutations")]
    Mutants {
        #[arg(long, default_value = "0..1000")]
        seeds: String,
    },
    /// Real hub and edge processes through UDP fault proxies, driven by a scenario's
    /// timeline, checked against the real APIs at the end. Needs the binaries built
    /// (`cargo build --release --bins`).
    Partition {
        /// A shipped scenario (rush-hour-partition, flapping-wan, hub-crash,
        /// edge-crash-mid-segment, ci-smoke) or a TOML file.
        #[arg(long, default_value = "rush-hour-partition")]
        scenario: String,
        /// Where outpost-hub and outpost-edge are (default: beside this program).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Many edges (real processes) syncing with one hub at once at a steady rate: hub CPU
    /// and acknowledgement latency. Needs the binaries built (`cargo build --release --bins`).
    Fleet {
        #[arg(long, default_value_t = 50)]
        edges: usize,
        /// Log entries per second per edge.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Catch-up benchmark: an edge writes N entries offline, then syncs them to a hub over
    /// QUIC; prints entries/s next to raw SQLite and raw quinn measured in the same run.
    Catchup {
        #[arg(long, default_value_t = 1_000_000)]
        entries: u64,
    },
    /// Load an edge over HTTP and WebSocket (starts one in this process unless --url is given).
    Load {
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        token: Option<String>,
        /// Keep-alive HTTP clients running order cycles.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// WebSocket subscribers following the orders.
        #[arg(long, default_value_t = 0)]
        subscribers: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Pace the clients to this many writes per second in total.
        #[arg(long)]
        rate: Option<f64>,
        /// How the tills name their rows: `v7` (time-ordered UUIDv7, as terminals should) or
        /// `till` (a sequence per till: rows scattered across the store's B-trees).
        #[arg(long, default_value = "v7")]
        ids: simulations::load::Ids,
        /// Runtime threads. Default: 1 with --url, so that the generator takes as little as it
        /// can from an edge on the same machine (one thread drives ~60k requests/s); without
        /// --url, what `outpost-edge serve` uses, as the edge runs in this process.
        #[arg(long)]
        threads: Option<usize>,
    },
}

/// The allocator `outpost-edge` ships with, so that edges this binary runs in its own process
/// (`load` without `--url`, `demo`) cost what they cost in the field.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Fleet {
            edges,
            rate,
            seconds,
            bin_dir,
        } => {
            let bin_dir = bin_dir.unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(std::path::Path::to_owned))
                    .unwrap_or_default()
            });
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            match rt.block_on(simulations::fleet::run(edges, rate, seconds, &bin_dir)) {
                Ok(r) => {
                    println!(
                        "{} edges at {rate} entries/s each for {:.1} s: {} entries ({:.0}/s), {} payments failed",
                        r.edges,
                        r.seconds,
                        r.entries,
                        r.entries as f64 / r.seconds,
                        r.payments_failed
                    );
                    println!(
                        "hub CPU {:.0}% of one core; ack latency ms p50 {:.0}, p99 {:.0}, max {:.0} ({} samples, 100 ms sampling)",
                        r.hub_cpu * 100.0,
                        r.percentile(0.5),
                        r.percentile(0.99),
                        r.percentile(1.0),
                        r.ack_ms.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("outpost-sim fleet: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Partition {
            scenario,
            bin_dir,
            json,
        } => {
            let scenario = match simulations::partition::Scenario::load(&scenario) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("outpost-sim partition: {e}");
                    return ExitCode::from(2);
                }
            };
            let bin_dir = bin_dir.unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(std::path::Path::to_owned))
                    .unwrap_or_default()
            });
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            match rt.block_on(simulations::partition::run(&scenario, &bin_dir)) {
                Ok(report) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&report).expect("a report encodes")
                        );
                    } else {
                        println!("{report}");
                    }
                    if report.ok() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("outpost-sim partition: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Catchup { entries } => {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            match rt.block_on(simulations::catchup::run(entries)) {
                Ok(r) => {
                    let mb = |b: f64| b / 1e6;
                    println!(
                        "filled {} entries ({:.1} MB of segment bodies) offline in {:.2} s",
                        r.entries,
                        mb(r.bytes as f64),
                        r.fill_seconds
                    );
                    println!(
                        "catch-up: {} entries durable at the hub in {:.2} s = {:.0} entries/s ({:.1} MB/s)",
                        r.entries,
                        r.catchup_seconds,
                        r.entries_per_s(),
                        mb(r.bytes as f64 / r.catchup_seconds)
                    );
                    println!(
                        "baseline raw SQLite (1000 rows/txn, FULL): {:.0} rows/s; catch-up is {:.2}x",
                        r.raw_sqlite_rows_per_s,
                        r.entries_per_s() / r.raw_sqlite_rows_per_s
                    );
                    println!(
                        "baseline raw quinn (one stream, mTLS): {:.1} MB/s = {:.0} entries/s at this entry size; catch-up is {:.2}x",
                        mb(r.raw_quinn_bytes_per_s),
                        r.raw_quinn_bytes_per_s / (r.bytes as f64 / r.entries as f64),
                        (r.bytes as f64 / r.catchup_seconds) / r.raw_quinn_bytes_per_s
                    );
                    println!(
                        "queryable at the hub (rows materialised) {:.2} s after the start",
                        r.queryable_seconds
                    );
                    println!(
                        "apart: edge loads segments at {:.0} entries/s; hub verifies and stores segments at {:.0} entries/s; materialises rows at {:.0} entries/s",
                        r.edge_load_entries_per_s,
                        r.hub_ingest_entries_per_s,
                        r.materialise_entries_per_s
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("outpost-sim catchup: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        #[cfg(feature = "mutations")]
        Command::Mutants { seeds } => {
            let Some(range) = seeds
                .split_once("..")
                .and_then(|(a, b)| Some(a.parse::<u64>().ok()?..b.parse::<u64>().ok()?))
            else {
                eprintln!("outpost-sim mutants: --seeds takes A..B");
                return ExitCode::from(2);
            };
            // Mutants are expected to fail; keep their panics out of the report.
            std::panic::set_hook(Box::new(|_| {}));
            let mut missed = false;
            for (m, caught, total) in simulations::sim::mutants(range) {
                println!("{m:?}: caught by {caught} of {total} seeds");
                missed |= caught == 0;
            }
            if missed {
                println!("a deliberate bug went unnoticed by every seed");
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Sim { seed, seeds, edges } => {
            let range = match seed {
                Some(s) => s..s + 1,
                None => match seeds
                    .split_once("..")
                    .and_then(|(a, b)| Some(a.parse::<u64>().ok()?..b.parse::<u64>().ok()?))
                {
                    Some(r) if !r.is_empty() => r,
                    _ => {
                        eprintln!("outpost-sim sim: --seeds takes A..B with A < B, e.g. 0..1000");
                        return ExitCode::from(2);
                    }
                },
            };
            if let Some(n) = edges
                && !(1..=16).contains(&n)
            {
                eprintln!("outpost-sim sim: --edges is 1 to 16");
                return ExitCode::from(2);
            }
            let started = std::time::Instant::now();
            let count = range.end - range.start;
            // Seeds are independent: one worker per core takes the next seed until none is
            // left. Each prints its seed before running it, so a seed that hangs or panics is
            // named; failures are reported in seed order at the end.
            let next = std::sync::atomic::AtomicU64::new(range.start);
            let workers = std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(count as usize);
            let (mut failed, faults) = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..workers)
                    .map(|_| {
                        scope.spawn(|| {
                            let mut failed = Vec::new();
                            let mut faults = simulations::sim::FaultCounts::default();
                            loop {
                                let s = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                if s >= range.end {
                                    break (failed, faults);
                                }
                                let mut config = simulations::sim::SimConfig::new(s);
                                if let Some(n) = edges {
                                    config.edges = n;
                                }
                                println!("seed {s}");
                                let outcome = simulations::sim::run_seed(config);
                                faults.add(&outcome.faults);
                                if count == 1 || outcome.failure.is_some() {
                                    println!("{outcome}");
                                }
                                if outcome.failure.is_some() {
                                    failed.push(s);
                                }
                            }
                        })
                    })
                    .collect();
                let mut failed = Vec::new();
                let mut faults = simulations::sim::FaultCounts::default();
                for h in handles {
                    let (f, c) = h.join().expect("a simulation worker panicked");
                    failed.extend(f);
                    faults.add(&c);
                }
                (failed, faults)
            });
            failed.sort_unstable();
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{count} seeds in {secs:.1} s ({:.0} seeds/s); faults fired: {faults:?}",
                count as f64 / secs
            );
            if count > 1 && !faults.missing().is_empty() {
                println!("fault kinds that never fired: {:?}", faults.missing());
            }
            if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                println!("FAILED seeds (replay with --seed N): {failed:?}");
                ExitCode::FAILURE
            }
        }
        Command::Load {
            url,
            token,
            clients,
            subscribers,
            seconds,
            rate,
            ids,
            threads,
        } => {
            let threads = match (threads, &url) {
                (Some(n), _) => n.max(1),
                (None, Some(_)) => 1,
                (None, None) => edge::server::worker_threads(),
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("outpost-sim load: cannot start the runtime: {e}");
                    return ExitCode::from(2);
                }
            };
            let config = simulations::load::LoadConfig {
                url,
                token,
                clients,
                subscribers,
                seconds,
                rate,
                ids,
            };
            match runtime.block_on(simulations::load::run(config)) {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("outpost-sim load: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Demo {
            data_dir,
            duration,
            branches,
            tills,
            pace_ms,
            exit,
        } => {
            if !(2..=20).contains(&branches) {
                eprintln!("outpost-sim demo: --branches is 2 to 20");
                return ExitCode::from(2);
            }
            if duration < 3 {
                eprintln!("outpost-sim demo: --duration is at least 3 seconds");
                return ExitCode::from(2);
            }
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async move {
                let demo = simulations::demo::run(simulations::demo::DemoConfig {
                    data_dir,
                    branches,
                    duration: std::time::Duration::from_secs(duration),
                    tills,
                    pace: std::time::Duration::from_millis(pace_ms.max(1)),
                    progress: true,
                })
                .await;
                match demo {
                    Ok(demo) => {
                        println!("{}", demo.report);
                        let ok = demo.report.ok();
                        if !exit {
                            println!("(Ctrl-C to stop)");
                            let _ = tokio::signal::ctrl_c().await;
                        }
                        demo.shutdown().await;
                        if ok {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::FAILURE
                        }
                    }
                    Err(e) => {
                        eprintln!("outpost-sim demo: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}
