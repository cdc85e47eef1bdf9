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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
