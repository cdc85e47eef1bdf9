//! `outpost-edge`: the branch edge node's command line (CONTRACT.md section 1).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use edge::server::{ServeConfig, StartError, open_data_dir};
use shared::{BranchId, Role, Schema};

#[derive(Parser)]
#[command(
    name = "outpost-edge",
    version,
    about = "Outpost branch edge: serves the branch's terminals, syncs with the hub"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the branch's terminals (initialises an empty data dir).
    Serve {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, value_parser = parse_branch)]
        branch: BranchId,
        #[arg(long, default_value = "127.0.0.1:9090")]
        http: SocketAddr,
        /// The hub's QUIC address (requires --identity).
        #[arg(long, requires = "identity")]
        hub: Option<SocketAddr>,
        /// The branch identity issued by `outpost-hub enroll`.
        #[arg(long, requires = "hub")]
        identity: Option<PathBuf>,
        /// A schema file to use instead of the built-in `pos` module.
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Check that this binary runs, print its version and exit 0 (run on a downloaded release
    /// before it is switched to).
    SelfCheck,
    /// Print a new bearer token for a terminal role on stdout.
    Token {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, value_parser = parse_role)]
        role: Role,
    },
}

fn parse_branch(s: &str) -> Result<BranchId, String> {
    BranchId::parse(s).map_err(|e| e.to_string())
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s)
        .ok_or_else(|| "role must be one of admin, manager, cashier, waiter, kitchen".into())
}

fn load_schema(path: Option<&PathBuf>) -> Result<Arc<Schema>, StartError> {
    match path {
        None => Ok(Arc::new(shared::pos::schema())),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| StartError(format!("cannot read schema {}: {e}", p.display())))?;
            Schema::from_json(&text)
                .map(Arc::new)
                .map_err(|e| StartError(format!("{}: {e}", p.display())))
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, StartError> {
    match cli.command {
        Command::Serve {
            data_dir,
            branch,
            http,
            hub,
            identity,
            schema,
        } => {
            let schema = load_schema(schema.as_ref())?;
            if let (Some(dir), None) = (&identity, std::env::var_os(edge::update::WORKER_ENV)) {
                // The identity is checked before anything is created.
                edge::server::load_identity(dir, &branch)?;
                // A syncing edge updates itself: this process keeps the current release
                // running as its worker (see `edge::update`).
                let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
                return edge::update::keep(&data_dir, args).map_err(StartError);
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(edge::server::worker_threads())
                .enable_all()
                .build()
                .map_err(|e| StartError(format!("cannot start the runtime: {e}")))?;
            let end = runtime.block_on(edge::server::serve(ServeConfig {
                data_dir,
                branch,
                http,
                schema,
                hub: hub.zip(identity),
            }))?;
            Ok(match end {
                edge::server::ServeEnd::Stopped => ExitCode::SUCCESS,
                edge::server::ServeEnd::Update => ExitCode::from(edge::update::EXIT_UPDATE),
            })
        }
        Command::SelfCheck => {
            let version = edge::update::run_self_check().map_err(StartError)?;
            println!("{version}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { data_dir, role } => {
            if !data_dir.join("edge.db").exists() {
                return Err(StartError(format!(
                    "{} holds no edge database; run `outpost-edge serve --data-dir {}` first",
                    data_dir.display(),
                    data_dir.display()
                )));
            }
            let branch = stored_branch(&data_dir)?;
            let store = open_data_dir(&data_dir, &branch, Arc::new(shared::pos::schema()))?;
            let token = store
                .create_token(role)
                .map_err(|e| StartError(format!("cannot create the token: {e}")))?;
            store.close();
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The branch a data dir belongs to, read from its database.
fn stored_branch(data_dir: &std::path::Path) -> Result<BranchId, StartError> {
    let conn = rusqlite::Connection::open_with_flags(
        data_dir.join("edge.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .map_err(|e| StartError(format!("cannot open {}: {e}", data_dir.display())))?;
    let branch: String = conn
        .query_row("SELECT value FROM _meta WHERE key = 'branch'", [], |r| {
            r.get(0)
        })
        .map_err(|e| {
            StartError(format!(
                "{} is not an edge data dir: {e}",
                data_dir.display()
            ))
        })?;
    BranchId::parse(&branch).map_err(|e| StartError(e.to_string()))
}

/// mimalloc: 6 % more durable writes per second than the system allocator in the till-cycle
/// load (`outpost-sim load --url`, BENCHMARKS.md); the writer thread and the HTTP tasks
/// allocate and free across threads, where glibc's arenas contend.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("outpost-edge: {e}");
            ExitCode::from(2)
        }
    }
}
