//! `outpost-sim`: the demo now; the deterministic simulator and the partition harness join it
//! as the sync protocol lands.

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
    /// A branch's rush hour on a real edge store, with a restart in the middle, and a report.
    Demo {
        /// Where to keep the demo's database (a temporary directory by default).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Orders to serve.
        #[arg(long, default_value_t = 2000)]
        orders: usize,
        /// Terminals working at once.
        #[arg(long, default_value_t = 60)]
        terminals: usize,
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Load {
            url,
            token,
            clients,
            subscribers,
            seconds,
            rate,
        } => {
            let runtime = match tokio::runtime::Runtime::new() {
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
            orders,
            terminals,
        } => {
            match simulations::demo::run(simulations::demo::DemoConfig {
                data_dir,
                orders,
                terminals,
            }) {
                Ok(report) => {
                    println!("{report}");
                    if report.ok() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("outpost-sim demo: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
