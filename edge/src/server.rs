//! `outpost-edge serve`: initialises the data dir, opens the store, serves HTTP on loopback
//! (health and metrics here; the terminal API builds on this router), writes `ports.json`, and
//! shuts down cleanly on SIGTERM/SIGINT (in-flight requests finish, the writer drains).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use shared::{BranchId, Role, Schema};

use shared::metrics::Exposition;

use crate::http::{ConnMetrics, Limits};
use crate::store::{Store, StoreConfig, metrics};
use crate::sync::{SyncClient, SyncStatus};

/// Everything `serve` needs, parsed from the command line.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub branch: BranchId,
    pub http: SocketAddr,
    pub schema: Arc<Schema>,
    /// The hub's QUIC address and this branch's identity directory.
    pub hub: Option<(SocketAddr, PathBuf)>,
}

/// How `serve` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeEnd {
    /// A shutdown signal, or the keeper asked.
    Stopped,
    /// A new release is staged and `releases/current` points at it: the keeper starts it.
    Update,
}

/// A fatal start-up problem: printed as one line, exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

#[derive(Clone)]
struct App {
    store: Store,
    branch: BranchId,
    api: crate::api::AppState,
    /// The sync link's state; `None` for a standalone edge.
    sync: Option<Arc<SyncStatus>>,
    updater: Option<Arc<crate::update::Updater>>,
    version: Arc<str>,
    /// The HTTP server's connection counts.
    connections: Arc<ConnMetrics>,
}

/// Writes `path` readable by the owner only.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

/// Opens the data dir's store, creating the dir and the admin token on first start.
pub fn open_data_dir(
    data_dir: &Path,
    branch: &BranchId,
    schema: Arc<Schema>,
) -> Result<Store, StartError> {
    std::fs::create_dir_all(data_dir).map_err(|e| {
        StartError(format!(
            "cannot create data dir {}: {e}",
            data_dir.display()
        ))
    })?;
    let store = Store::open(StoreConfig::new(
        data_dir.join("edge.db"),
        branch.clone(),
        schema,
    ))
    .map_err(|e| {
        StartError(format!(
            "cannot open the store in {}: {e}",
            data_dir.display()
        ))
    })?;
    let token_path = data_dir.join("admin.token");
    if !token_path.exists() {
        let token = store
            .create_token(Role::Admin)
            .map_err(|e| StartError(format!("cannot create the admin token: {e}")))?;
        write_private(&token_path, &format!("{token}\n"))
            .map_err(|e| StartError(format!("cannot write {}: {e}", token_path.display())))?;
    }
    eprintln!("admin token: {}", token_path.display());
    Ok(store)
}

/// Serves health, metrics and the terminal API (the live feed listening to the store's
/// commits) on `listener` with the edge's connection limits until `stop` resolves,
/// its `/metrics` counting the connections: what `serve` runs, for harnesses that run an edge
/// in their own process (the demo, the load generator, tests).
pub async fn serve_api(
    listener: tokio::net::TcpListener,
    store: Store,
    branch: BranchId,
    sync: Option<Arc<SyncStatus>>,
    stop: impl std::future::Future<Output = ()>,
) {
    let connections = Arc::<ConnMetrics>::default();
    let app = router_with(store, branch, sync, None, connections.clone());
    crate::http::serve(listener, app, Limits::for_this_process(), connections, stop).await;
}

/// Health, metrics and the terminal API, with the live feed listening to the store's commits;
/// the updater's state and the server's connection counts in `/metrics`.
fn router_with(
    store: Store,
    branch: BranchId,
    sync: Option<Arc<SyncStatus>>,
    updater: Option<Arc<crate::update::Updater>>,
    connections: Arc<ConnMetrics>,
) -> Router {
    let api = crate::api::AppState::new(store.clone(), branch.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(prometheus))
        .with_state(App {
            store,
            branch,
            api: api.clone(),
            sync,
            updater,
            version: crate::update::running_version().into(),
            connections,
        })
        .merge(crate::api::router(api))
        .method_not_allowed_fallback(crate::api::method_not_allowed)
}

async fn healthz(State(app): State<App>) -> Result<impl IntoResponse, crate::api::ApiError> {
    let status = app.api.read(|store| Ok(store.log_status())).await?;
    Ok(axum::Json(serde_json::json!({
        "status": "ok",
        "role": "edge",
        "branch": app.branch.as_str(),
        "version": &*app.version,
        "hub": match &app.sync {
            None => "standalone",
            Some(s) if s.diverged.load(Relaxed) => "diverged",
            Some(s) if s.connected.load(Relaxed) => "connected",
            Some(_) => "disconnected",
        },
        "unsynced": status.last_seq.0 - status.acked_seq.0,
        "synced_seq": status.acked_seq.0,
        "last_seq": status.last_seq.0,
    })))
}

async fn prometheus(State(app): State<App>) -> Result<impl IntoResponse, crate::api::ApiError> {
    // The hot tier's lock can be held while the writer loads rows from SQLite.
    let syncing = app.sync.is_some();
    let (status, hot_rows, oldest_unsynced) = app
        .api
        .read(move |store| {
            let oldest = syncing.then(|| crate::sync::oldest_unsynced_payment(store));
            Ok((store.log_status(), store.hot_rows(), oldest.flatten()))
        })
        .await?;
    let m = app.store.metrics();
    let mut out = Exposition::default();
    out.counter(
        "outpost_commit_groups_total",
        "Group commits (one fsync each).",
        m.groups.load(Relaxed),
    );
    out.counter(
        "outpost_commit_reruns_total",
        "Groups rolled back and re-run with a savepoint per request, after a request failed part-way.",
        m.reruns.load(Relaxed),
    );
    out.counter(
        "outpost_wal_restarts_total",
        "Complete checkpoints the writer ran between groups so that its next commit can start the WAL over.",
        m.wal_restarts.load(Relaxed),
    );
    out.counter(
        "outpost_wal_truncates_total",
        "WAL truncations by the housekeeper, each blocking the writer (the WAL could not start over).",
        m.wal_truncates.load(Relaxed),
    );
    out.gauge(
        "outpost_wal_frames",
        "Frames in the WAL at the last housekeeping checkpoint.",
        m.wal_frames.load(Relaxed),
    );
    out.counter(
        "outpost_commit_requests_total",
        "Transactions committed or refused in groups.",
        m.requests.load(Relaxed),
    );
    out.counter(
        "outpost_commit_rows_total",
        "Rows changed by committed transactions.",
        m.rows.load(Relaxed),
    );
    out.histogram(
        "outpost_commit_group_size",
        "Requests per group commit.",
        &metrics::GROUP_SIZE_BUCKETS,
        &m.group_size,
        None,
    );
    out.histogram(
        "outpost_commit_latency_us",
        "Group commit latency (applying the group and its COMMIT; the fsync runs beside the next group), in microseconds.",
        &metrics::COMMIT_US_BUCKETS,
        &m.commit.buckets,
        Some(m.commit.sum()),
    );
    out.histogram(
        "outpost_commit_write_us",
        "The COMMIT statement alone (writing the WAL frames; the fsync is apart), in microseconds.",
        &metrics::COMMIT_US_BUCKETS,
        &m.commit_write.buckets,
        Some(m.commit_write.sum()),
    );
    out.histogram(
        "outpost_wal_fsync_us",
        "WAL fsyncs making commits durable (one may cover several groups), in microseconds.",
        &metrics::COMMIT_US_BUCKETS,
        &m.fsync.buckets,
        Some(m.fsync.sum()),
    );
    out.histogram(
        "outpost_commit_answered_us",
        "From the start of a group to its callers' answers being sent (after its fsync), in microseconds.",
        &metrics::COMMIT_US_BUCKETS,
        &m.answered.buckets,
        Some(m.answered.sum()),
    );
    out.gauge(
        "outpost_commit_version",
        "Last committed version.",
        status.version.0,
    );
    out.gauge(
        "outpost_log_last_seq",
        "Last seq in the origin log.",
        status.last_seq.0,
    );
    out.gauge(
        "outpost_log_sealed_seq",
        "Last seq in a sealed segment.",
        status.sealed_seq.0,
    );
    out.gauge(
        "outpost_log_acked_seq",
        "Last seq acknowledged by the hub.",
        status.acked_seq.0,
    );
    out.gauge(
        "outpost_log_unsynced_entries",
        "Entries not yet acknowledged by the hub.",
        status.last_seq.0 - status.acked_seq.0,
    );
    if let Some(sync) = &app.sync {
        let age = oldest_unsynced.map_or(0, |t| {
            let now = (crate::store::system_clock())();
            ((now.0 - t.0).max(0) / 1_000_000) as u64
        });
        out.gauge(
            "outpost_sync_connected",
            "1 while the hub link is up and welcomed.",
            u64::from(sync.connected.load(Relaxed)),
        );
        out.gauge(
            "outpost_sync_oldest_unsynced_payment_seconds",
            "Age of the oldest payment the hub does not hold yet (0: none).",
            age,
        );
        for (name, help, v) in [
            (
                "outpost_sync_connects_total",
                "Connections established to the hub.",
                &sync.connects,
            ),
            (
                "outpost_sync_reconnects_total",
                "Times the link dropped or failed and was retried.",
                &sync.reconnects,
            ),
            (
                "outpost_sync_segments_sent_total",
                "Log segments sent to the hub (resends included).",
                &sync.segments_sent,
            ),
            (
                "outpost_sync_entries_sent_total",
                "Log entries sent to the hub (resends included).",
                &sync.entries_sent,
            ),
            (
                "outpost_sync_bytes_sent_total",
                "Segment body bytes sent to the hub.",
                &sync.bytes_sent,
            ),
            (
                "outpost_sync_segments_rejected_total",
                "Segments the hub refused (failed verification there) and that were sent again.",
                &sync.segments_rejected,
            ),
            (
                "outpost_sync_feed_verify_failures_total",
                "Feed segments from the hub that failed verification here.",
                &sync.feed_refused,
            ),
            (
                "outpost_sync_feed_segments_applied_total",
                "Feed segments from the hub applied.",
                &sync.feed_segments_applied,
            ),
            (
                "outpost_sync_feed_entries_applied_total",
                "Feed rows from the hub applied.",
                &sync.feed_entries_applied,
            ),
        ] {
            out.counter(name, help, v.load(Relaxed));
        }
    }
    if let Some(u) = &app.updater {
        for (name, help, v) in [
            (
                "outpost_update_downloads_total",
                "Release downloads started (resumptions included).",
                &u.metrics.downloads_started,
            ),
            (
                "outpost_update_downloads_resumed_total",
                "Release downloads resumed from a partial file.",
                &u.metrics.downloads_resumed,
            ),
            (
                "outpost_update_bytes_downloaded_total",
                "Release bytes received.",
                &u.metrics.bytes_downloaded,
            ),
            (
                "outpost_update_refused_total",
                "Releases refused (verification or self-check failed).",
                &u.metrics.refused,
            ),
            (
                "outpost_update_staged_total",
                "Releases verified, staged and switched to.",
                &u.metrics.staged,
            ),
        ] {
            out.counter(name, help, v.load(Relaxed));
        }
    }
    out.gauge(
        "outpost_hot_rows",
        "Rows in the in-memory hot tier.",
        hot_rows as u64,
    );
    app.connections.render(&mut out);
    let feed = app.api.feed();
    let fm = feed.metrics();
    out.gauge(
        "outpost_feed_connections",
        "Connected terminal feed sockets.",
        fm.connections.load(Relaxed),
    );
    out.gauge(
        "outpost_feed_queued_frames",
        "Frames waiting in terminal connection queues.",
        feed.queued_frames() as u64,
    );
    out.counter(
        "outpost_feed_commits_total",
        "Commits fanned out to the terminal feed.",
        fm.commits.load(Relaxed),
    );
    out.counter(
        "outpost_feed_encodes_total",
        "Change encodings made by the feed (at most one per change, format and variant).",
        fm.encodes.load(Relaxed),
    );
    out.counter(
        "outpost_feed_deltas_sent_total",
        "Delta frames queued to terminals.",
        fm.deltas_sent.load(Relaxed),
    );
    out.counter(
        "outpost_feed_resyncs_total",
        "Subscriptions told to resync because their terminal lagged.",
        fm.resyncs.load(Relaxed),
    );
    out.counter(
        "outpost_feed_snapshots_total",
        "Subscriptions started with a snapshot.",
        fm.snapshots.load(Relaxed),
    );
    out.histogram(
        "outpost_feed_lag_us",
        "From the start of a commit's group to its fan-out to terminal queues, in microseconds.",
        &metrics::COMMIT_US_BUCKETS,
        &fm.lag.buckets,
        Some(fm.lag.sum()),
    );
    out.counter(
        "outpost_feed_catch_ups_total",
        "Subscriptions resumed from their last version with a delta.",
        fm.catch_ups.load(Relaxed),
    );
    let name = "outpost_request_latency_us";
    out.family(
        name,
        "histogram",
        "Terminal API request latency by route, in microseconds.",
    );
    for ((method, route), h) in app.api.routes().all() {
        let labels = format!("method=\"{method}\",route=\"{route}\"");
        let mut cumulative = 0;
        for (b, c) in crate::api::REQUEST_US_BUCKETS.iter().zip(&h.buckets) {
            cumulative += c.load(Relaxed);
            let le = if *b == u64::MAX {
                "+Inf".to_owned()
            } else {
                b.to_string()
            };
            let _ = writeln!(out.0, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out.0, "{name}_sum{{{labels}}} {}", h.sum_us.load(Relaxed));
        let _ = writeln!(out.0, "{name}_count{{{labels}}} {cumulative}");
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out.0))
}

/// How many threads serve terminals: one core fewer than the machine has (at least one), so
/// that the store's writer, which every write passes through, keeps a core to itself instead
/// of being preempted by request handling. `TOKIO_WORKER_THREADS` overrides it. On the
/// two-core test machine this took 64 tills from 12.3-14.1k to 16.5-17.2k writes/s
/// (BENCHMARKS.md, session 8).
pub fn worker_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| cores.saturating_sub(1).max(1))
}

/// Resolves when SIGTERM or SIGINT arrives.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// Binds the terminal API's port. A worker started right after its predecessor (an update,
/// or a restart after the keeper was killed) may find the port still held for a moment.
async fn bind(addr: SocketAddr, retry: bool) -> Result<tokio::net::TcpListener, StartError> {
    let mut tries = 0;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if retry && e.kind() == std::io::ErrorKind::AddrInUse && tries < 100 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(StartError(format!("cannot listen on {addr}: {e}"))),
        }
    }
}

/// Loads the branch identity in `dir` and checks that it is `branch`'s.
pub fn load_identity(
    dir: &Path,
    branch: &BranchId,
) -> Result<crate::identity::EdgeIdentity, StartError> {
    let identity = crate::identity::EdgeIdentity::load(dir)
        .map_err(|e| StartError(format!("identity {}: {e}", dir.display())))?;
    if &identity.branch != branch {
        return Err(StartError(format!(
            "identity {} belongs to branch {}, not {branch}",
            dir.display(),
            identity.branch,
        )));
    }
    Ok(identity)
}

/// Takes the data dir's lock (`edge.lock`): one serving process per data dir. A worker waits
/// a while for it, since its predecessor may still be on its way out.
async fn lock_data_dir(data_dir: &Path, wait: bool) -> Result<std::fs::File, StartError> {
    std::fs::create_dir_all(data_dir).map_err(|e| {
        StartError(format!(
            "cannot create data dir {}: {e}",
            data_dir.display()
        ))
    })?;
    let path = data_dir.join("edge.lock");
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StartError(format!("cannot open {}: {e}", path.display())))?;
    let mut tries = 0;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if wait && tries < 200 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StartError(format!(
                    "another outpost-edge is serving {}",
                    data_dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StartError(format!("cannot lock {}: {e}", path.display())));
            }
        }
    }
}

/// How long requests under way may take to finish once the edge is stopping.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the edge until a shutdown signal (or, under a keeper, until it asks to stop or a new
/// release is staged).
pub async fn serve(config: ServeConfig) -> Result<ServeEnd, StartError> {
    // The identity is checked before anything is created: a refused start leaves no trace.
    let identity = match &config.hub {
        None => None,
        Some((_, dir)) => Some(load_identity(dir, &config.branch)?),
    };
    let worker = std::env::var_os(crate::update::WORKER_ENV).is_some();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    if worker {
        crate::update::watch_keeper(stop_tx);
    }
    let version = crate::update::running_version();
    let _lock = lock_data_dir(&config.data_dir, worker).await?;
    let store = open_data_dir(&config.data_dir, &config.branch, config.schema.clone())?;
    let listener = bind(config.http, worker).await?;
    let bound = listener
        .local_addr()
        .map_err(|e| StartError(format!("cannot read the bound address: {e}")))?;
    let ports = serde_json::json!({ "http": bound.to_string() }).to_string();
    let ports_path = config.data_dir.join("ports.json");
    let tmp = config.data_dir.join("ports.json.tmp");
    std::fs::write(&tmp, ports)
        .and_then(|()| std::fs::rename(&tmp, &ports_path))
        .map_err(|e| StartError(format!("cannot write {}: {e}", ports_path.display())))?;
    let (stop_sync, sync_stopped) = tokio::sync::watch::channel(false);
    // Only a worker under a keeper installs releases (the keeper runs and rolls them back).
    let updater = match (&identity, worker) {
        (Some(identity), true) => Some(crate::update::Updater::new(
            &config.data_dir,
            &version,
            identity.release_key,
        )),
        _ => None,
    };
    let (sync, sync_task) = match (&config.hub, identity) {
        (Some((addr, _)), Some(identity)) => {
            let client = SyncClient::new(store.clone(), identity, *addr, &version)
                .with_updater(updater.clone());
            let status = client.status.clone();
            let task = tokio::spawn(client.run(sync_stopped));
            tracing::info!(hub = %addr, %version, "syncing with the hub");
            (Some(status), Some(task))
        }
        _ => (None, None),
    };
    // A release on trial is committed once healthy: store open, API listening, and the hub's
    // welcome.
    if let (Some(updater), Some(status)) = (&updater, &sync) {
        updater.locally_up();
        let (updater, status) = (updater.clone(), status.clone());
        tokio::spawn(async move {
            while !status.connected.load(Relaxed) {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            updater.healthy();
        });
    }
    let mut staged = updater.as_ref().map(|u| u.staged());
    let update = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let stopping = {
        let update = update.clone();
        async move {
            tokio::select! {
                () = shutdown_signal() => {}
                _ = stop_rx.wait_for(|s| *s) => {}
                _ = async { staged.as_mut().expect("guarded").wait_for(|s| *s).await }, if staged.is_some() => {
                    update.store(true, Relaxed);
                }
            }
            let _ = stopping_tx.send(true);
        }
    };
    tracing::info!(branch = %config.branch, http = %bound, "edge serving");
    let limits = Limits::for_this_process();
    let connections = Arc::<ConnMetrics>::default();
    let server = crate::http::serve(
        listener,
        router_with(
            store.clone(),
            config.branch.clone(),
            sync,
            updater,
            connections.clone(),
        ),
        limits,
        connections,
        stopping,
    );
    // Requests under way get SHUTDOWN_GRACE to finish; the edge then stops without waiting for
    // a client that holds its connection longer: the store closes, anything that connection
    // still asks gets an error, and the process exit ends it (a write it got no answer for
    // was never acknowledged).
    let grace = async {
        let _ = stopping_rx.wait_for(|s| *s).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        () = server => {}
        () = grace => tracing::warn!("connections still open {}s after the stop; stopping without them", SHUTDOWN_GRACE.as_secs()),
    }
    let _ = stop_sync.send(true);
    if let Some(task) = sync_task {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("sync client: {e}"),
            Err(e) => tracing::error!("sync client task: {e}"),
        }
    }
    // The writer answers every queued request before it stops.
    tokio::task::spawn_blocking(move || store.close())
        .await
        .map_err(|e| StartError(format!("store did not close: {e}")))?;
    if update.load(Relaxed) {
        tracing::info!("edge stopped for an update");
        return Ok(ServeEnd::Update);
    }
    tracing::info!("edge stopped");
    Ok(ServeEnd::Stopped)
}
