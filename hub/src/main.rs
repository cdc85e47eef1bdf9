//! `outpost-hub`: the central hub's command line (CONTRACT.md section 1). The sync server and
//! head-office API are being built (see the README's status); until then every command
//! explains that and exits with status 2, so no script mistakes it for a running hub.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "outpost-hub",
    version,
    about = "Outpost hub: receives branch logs over QUIC, serves head office"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve edges over QUIC and head office over HTTP (initialises an empty data dir).
    Serve {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:4433")]
        quic: SocketAddr,
        /// Storage URL; defaults to an embedded SQLite file in the data dir.
        #[arg(long)]
        db: Option<String>,
    },
    /// Issue a branch identity signed by the hub's CA.
    Enroll {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        branch: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let name = match cli.command {
        Command::Serve { .. } => "serve",
        Command::Enroll { .. } => "enroll",
    };
    eprintln!(
        "outpost-hub {name}: the hub is not part of this build yet; edges run standalone until it lands (see README)"
    );
    ExitCode::from(2)
}
