//! `outpost-hub`: the central hub's command line (CONTRACT.md section 1).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use hub::api::{self, Hub};
use hub::identity::{BRANCH_CERT_VALIDITY_DEFAULT, HubIdentity};
use hub::releases::ReleaseFiles;
use hub::store::{HubStore, SqliteHubStore};
use hub::sync::SyncServer;
use shared::BranchId;

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
        /// Storage URL; defaults to an embedded SQLite file in the data dir
        /// (`sqlite:PATH` names another file).
        #[arg(long)]
        db: Option<String>,
    },
    /// Issue a branch identity signed by the hub's CA (ca.pem, edge.pem, edge.key).
    Enroll {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, value_parser = parse_branch)]
        branch: BranchId,
        #[arg(long)]
        out: PathBuf,
        /// How long the branch certificate is valid, in days.
        #[arg(long, default_value_t = BRANCH_CERT_VALIDITY_DEFAULT.as_secs() / 86_400)]
        valid_days: u64,
    },
    /// Refuse a branch's certificate from now on (its sessions are closed).
    Revoke {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, value_parser = parse_branch)]
        branch: BranchId,
    },
}

fn parse_branch(s: &str) -> Result<BranchId, String> {
    BranchId::parse(s).map_err(|e| e.to_string())
}

/// A fatal problem: one line on stderr, exit code 2.
struct Fatal(String);

fn db_path(data_dir: &Path, db: Option<&str>) -> Result<PathBuf, Fatal> {
    match db {
        None => Ok(data_dir.join("hub.db")),
        Some(url) => match url.strip_prefix("sqlite:") {
            Some(p) if !p.is_empty() => Ok(PathBuf::from(p.trim_start_matches("//"))),
            _ => Err(Fatal(format!(
                "--db {url:?}: this build stores in embedded SQLite only; omit --db or pass sqlite:PATH"
            ))),
        },
    }
}

fn open(data_dir: &Path, db: Option<&str>) -> Result<(HubIdentity, Arc<SqliteHubStore>), Fatal> {
    std::fs::create_dir_all(data_dir).map_err(|e| {
        Fatal(format!(
            "cannot create data dir {}: {e}",
            data_dir.display()
        ))
    })?;
    let identity = HubIdentity::init_or_load(data_dir).map_err(|e| Fatal(e.to_string()))?;
    let store = SqliteHubStore::open(&db_path(data_dir, db)?, Arc::new(shared::pos::schema()))
        .map_err(|e| Fatal(format!("cannot open the hub store: {e}")))?;
    Ok((identity, Arc::new(store)))
}

/// The admin token: read, or created (0600) on first start.
fn admin_token(data_dir: &Path) -> Result<String, Fatal> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("admin.token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        return Ok(t.trim().to_owned());
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Fatal(format!("no randomness: {e}")))?;
    let token = hex::encode(bytes);
    let tmp = data_dir.join("admin.token.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(format!("{token}\n").as_bytes())?;
            f.sync_all()?;
            Ok(f)
        })
        .map_err(|e| Fatal(format!("cannot write {}: {e}", tmp.display())))?;
    f.flush().ok();
    std::fs::rename(&tmp, &path)
        .map_err(|e| Fatal(format!("cannot write {}: {e}", path.display())))?;
    Ok(token)
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
}

async fn serve(
    data_dir: PathBuf,
    http: SocketAddr,
    quic: SocketAddr,
    db: Option<String>,
) -> Result<(), Fatal> {
    let (identity, store) = open(&data_dir, db.as_deref())?;
    let token = admin_token(&data_dir)?;
    eprintln!("admin token: {}", data_dir.join("admin.token").display());
    let store: Arc<dyn HubStore> = store;
    // Release artifacts live in <data dir>/releases, signed with the identity's release key.
    let identity = Arc::new(identity);
    let releases = ReleaseFiles::open(&data_dir, identity.clone()).map_err(|e| {
        Fatal(format!(
            "cannot open {}: {e}",
            data_dir.join(hub::releases::RELEASES_DIR).display()
        ))
    })?;
    let known = store
        .releases()
        .map_err(|e| Fatal(format!("cannot read the releases: {e}")))?;
    releases
        .adopt_legacy(&known)
        .map_err(|e| Fatal(format!("cannot move old release artifacts: {e}")))?;
    let sync = SyncServer::with_releases(store.clone(), Arc::new(releases));
    let endpoint = SyncServer::bind(&identity, quic)
        .map_err(|e| Fatal(format!("cannot listen on {quic} (UDP): {e}")))?;
    let quic_bound = endpoint
        .local_addr()
        .map_err(|e| Fatal(format!("cannot read the QUIC address: {e}")))?;
    let listener = tokio::net::TcpListener::bind(http)
        .await
        .map_err(|e| Fatal(format!("cannot listen on {http}: {e}")))?;
    let http_bound = listener
        .local_addr()
        .map_err(|e| Fatal(format!("cannot read the HTTP address: {e}")))?;
    let ports = serde_json::json!({"http": http_bound.to_string(), "quic": quic_bound.to_string()});
    let tmp = data_dir.join("ports.json.tmp");
    std::fs::write(&tmp, ports.to_string())
        .and_then(|()| std::fs::rename(&tmp, data_dir.join("ports.json")))
        .map_err(|e| Fatal(format!("cannot write ports.json: {e}")))?;
    tracing::info!(http = %http_bound, quic = %quic_bound, "hub serving");
    let quic_task = tokio::spawn(sync.clone().serve(endpoint.clone()));
    let connections = Arc::<httpd::ConnMetrics>::default();
    let app = api::router(Hub {
        store,
        sync,
        admin_token_hash: *blake3::hash(token.as_bytes()).as_bytes(),
        connections: connections.clone(),
    });
    let limits = httpd::Limits::for_this_process();
    httpd::serve(listener, app, limits, connections, shutdown_signal()).await;
    // Sessions end; each one's storage work finished before its acks went out.
    endpoint.close(hub::sync::close::SHUTDOWN.into(), b"hub shutting down");
    endpoint.wait_idle().await;
    quic_task.abort();
    tracing::info!("hub stopped");
    Ok(())
}

fn run(cli: Cli) -> Result<(), Fatal> {
    match cli.command {
        Command::Serve {
            data_dir,
            http,
            quic,
            db,
        } => {
            let runtime = tokio::runtime::Runtime::new()
                .map_err(|e| Fatal(format!("cannot start the runtime: {e}")))?;
            runtime.block_on(serve(data_dir, http, quic, db))
        }
        Command::Enroll {
            data_dir,
            branch,
            out,
            valid_days,
        } => {
            let (identity, store) = open(&data_dir, None)?;
            let enrolled = identity
                .enroll(
                    &branch,
                    &out,
                    std::time::Duration::from_secs(valid_days.max(1) * 86_400),
                )
                .map_err(|e| Fatal(e.to_string()))?;
            store
                .enroll(&branch, enrolled.fingerprint)
                .map_err(|e| Fatal(format!("cannot record the enrollment: {e}")))?;
            println!("{}", out.display());
            Ok(())
        }
        Command::Revoke { data_dir, branch } => {
            let (_, store) = open(&data_dir, None)?;
            match store.revoke(&branch) {
                Ok(true) => {
                    println!("{branch} revoked");
                    Ok(())
                }
                Ok(false) => Err(Fatal(format!("branch {branch} is not enrolled"))),
                Err(e) => Err(Fatal(format!("cannot revoke: {e}"))),
            }
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fatal(e)) => {
            eprintln!("outpost-hub: {e}");
            ExitCode::from(2)
        }
    }
}
