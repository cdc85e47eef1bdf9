//! The QUIC sync server: accepts edges with mutual TLS, takes the branch from the
//! certificate, and drives one [`HubSession`] per connection against the [`HubStore`].
//!
//! Streams: the edge opens one bidirectional control stream (hello, welcome, acks, rejects)
//! and one unidirectional stream for its segments; the hub opens one unidirectional stream
//! for the branch's feed. Every frame is `shared::wire`'s length-prefixed postcard.
//!
//! Releases (auto-update): after the welcome, and whenever releases or rings change while the
//! session is live, the hub sends the branch's offers (`Frame::Releases`) on the control
//! stream; the edge's `UpdateReports` are stored, not passed to the session. Every further
//! bidirectional stream the edge opens is one download: a `Fetch` frame, answered by an
//! `Artifact` frame and the artifact's raw bytes from the asked offset (or by a `Close`).
//!
//! One session per branch at a time: a reconnecting edge supersedes its old connection, which
//! is closed and finishes its storage work before the new session reads the branch's
//! position, so appends never interleave.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use shared::log::{LogEntry, Segment};
use shared::release::ReleaseOffer;
use shared::sync::{HubSession, SyncConfig, SyncIo};
use shared::wire::TEXT_BYTES_MAX;
use shared::wire::{Frame, FrameReader, Position};
use shared::{BranchId, OriginId, Timestamp};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::identity::{self, HubIdentity};
use crate::releases::{ReleaseFiles, SERVE_CHUNK_BYTES};
use crate::store::{Admission, HubStore};

/// QUIC application close codes.
pub mod close {
    pub const NORMAL: u32 = 0;
    pub const NOT_ADMITTED: u32 = 1;
    pub const SUPERSEDED: u32 = 2;
    pub const PROTOCOL: u32 = 3;
    pub const SHUTDOWN: u32 = 4;
}

/// The materialiser waits until no segment was persisted for this long.
const INGEST_QUIET_MS: u64 = 20;

/// Entries the background materialiser takes per transaction: few, so that the persisters
/// (which acknowledge) get the database between its steps.
const MATERIALISER_STEP: usize = 2048;
/// The longest the materialiser defers to ingest.
const MATERIALISE_DEFER_MS: u64 = 100;

/// Verified segments queued for the persister, at most (the window bounds it anyway).
const PERSIST_QUEUE: usize = 16;

/// How often a live session checks that its branch is still admitted (revocation).
const ADMISSION_RECHECK: Duration = Duration::from_secs(2);

/// How long a download stream may take to send its `Fetch` frame.
const FETCH_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct SyncMetrics {
    pub connections: AtomicU64,
    pub refused_connections: AtomicU64,
    pub segments_persisted: AtomicU64,
    pub entries_persisted: AtomicU64,
    pub entries_materialised: AtomicU64,
    pub bytes_received: AtomicU64,
    pub segments_refused: AtomicU64,
    pub divergences: AtomicU64,
    pub feed_segments_sent: AtomicU64,
    /// Release downloads answered with the artifact.
    pub release_fetches: AtomicU64,
    /// Of those, downloads resumed from an offset past 0.
    pub release_fetches_resumed: AtomicU64,
    /// Artifact bytes sent.
    pub release_bytes_served: AtomicU64,
    /// Update reports received from edges.
    pub update_reports: AtomicU64,
}

/// What an edge last said about its backlog (`Frame::Status`); kept in memory, told again
/// on every connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeReport {
    pub unsynced: u64,
    /// When the oldest payment the hub does not hold yet was taken at the edge.
    pub oldest_unsynced_payment: Option<Timestamp>,
    pub reported_at: Timestamp,
}

struct Slot {
    generation: u64,
    /// Closing it asks the session to stop.
    stop: Option<oneshot::Sender<()>>,
    /// Resolves when the session has finished.
    done: Option<oneshot::Receiver<()>>,
}

/// Shared by the accept loop, the connections and the HTTP API.
pub struct SyncServer {
    store: Arc<dyn HubStore>,
    config: SyncConfig,
    sessions: Mutex<HashMap<BranchId, Slot>>,
    feeds: Mutex<HashMap<BranchId, Arc<Notify>>>,
    reports: Mutex<HashMap<BranchId, EdgeReport>>,
    /// The artifacts served to edges (`None`: this server serves no releases).
    releases: Option<Arc<ReleaseFiles>>,
    /// Bumped when releases or rings change: every live session sends its offers again.
    releases_changed: watch::Sender<u64>,
    next_generation: AtomicU64,
    /// Wakes the materialiser (stored segments wait to become rows).
    materialise: Notify,
    /// When a segment was last persisted (ms since `epoch`).
    last_persist: AtomicU64,
    pub metrics: SyncMetrics,
    epoch: Instant,
}

impl SyncServer {
    /// A server that serves no releases (downloads are refused; offers still come from the
    /// store).
    pub fn new(store: Arc<dyn HubStore>) -> Arc<SyncServer> {
        SyncServer::build(store, None)
    }

    /// A server that serves the release artifacts in `releases` (and through which the HTTP
    /// API publishes them).
    pub fn with_releases(store: Arc<dyn HubStore>, releases: Arc<ReleaseFiles>) -> Arc<SyncServer> {
        SyncServer::build(store, Some(releases))
    }

    fn build(store: Arc<dyn HubStore>, releases: Option<Arc<ReleaseFiles>>) -> Arc<SyncServer> {
        Arc::new(SyncServer {
            store,
            config: SyncConfig::default(),
            sessions: Mutex::new(HashMap::new()),
            feeds: Mutex::new(HashMap::new()),
            reports: Mutex::new(HashMap::new()),
            releases,
            releases_changed: watch::Sender::new(0),
            next_generation: AtomicU64::new(1),
            materialise: Notify::new(),
            last_persist: AtomicU64::new(0),
            metrics: SyncMetrics::default(),
            epoch: Instant::now(),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether a session of `branch` is running.
    pub fn is_connected(&self, branch: &BranchId) -> bool {
        self.sessions.lock().contains_key(branch)
    }

    /// The branch's last report of its backlog, if it sent one since the hub started.
    pub fn report(&self, branch: &BranchId) -> Option<EdgeReport> {
        self.reports.lock().get(branch).copied()
    }

    pub fn connected_count(&self) -> usize {
        self.sessions.lock().len()
    }

    fn feed_notify(&self, branch: &BranchId) -> Arc<Notify> {
        self.feeds.lock().entry(branch.clone()).or_default().clone()
    }

    /// Head office wrote to these branches' feeds: their sessions send it now.
    pub fn feeds_grew(&self, branches: &[BranchId]) {
        for b in branches {
            self.feed_notify(b).notify_one();
        }
    }

    /// The release artifacts this server serves, if any.
    pub fn releases(&self) -> Option<&Arc<ReleaseFiles>> {
        self.releases.as_ref()
    }

    /// Releases were published or promoted, or a branch's ring changed: every live session
    /// works out its branch's offers again and sends them if they changed.
    pub fn releases_changed(&self) {
        self.releases_changed
            .send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Binds the QUIC endpoint (4 MiB socket buffers: the defaults drop packets at speed).
    pub fn bind(identity: &HubIdentity, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
        let config = identity
            .server_config()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        let _ = socket.set_recv_buffer_size(4 << 20);
        let _ = socket.set_send_buffer_size(4 << 20);
        socket.bind(&addr.into())?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
        quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(config),
            socket.into(),
            runtime,
        )
    }

    /// Materialises stored segments behind the acks, relaying shared rows to the feeds;
    /// catches up on any backlog at start (after a crash).
    async fn materialiser(self: Arc<Self>) {
        loop {
            // Ingest comes first: while segments are arriving, rows wait a little (a query
            // catches them up itself when it needs them), but never more than
            // `MATERIALISE_DEFER_MS`, so shared rows still reach the other branches.
            let waiting = self.now();
            while self
                .now()
                .saturating_sub(self.last_persist.load(Ordering::Relaxed))
                < INGEST_QUIET_MS
                && self.now().saturating_sub(waiting) < MATERIALISE_DEFER_MS
            {
                tokio::time::sleep(Duration::from_millis(INGEST_QUIET_MS)).await;
            }
            let store = self.store.clone();
            match tokio::task::spawn_blocking(move || store.materialise(MATERIALISER_STEP)).await {
                Ok(Ok(m)) => {
                    self.metrics
                        .entries_materialised
                        .fetch_add(m.entries as u64, Ordering::Relaxed);
                    self.feeds_grew(&m.relayed);
                    if m.more {
                        continue;
                    }
                }
                Ok(Err(e)) => tracing::error!("materialising stored segments failed: {e}"),
                Err(e) => tracing::error!("the materialiser failed: {e}"),
            }
            self.materialise.notified().await;
        }
    }

    /// Accepts connections until the endpoint closes.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        let materialiser = tokio::spawn(self.clone().materialiser());
        while let Some(incoming) = endpoint.accept().await {
            let server = self.clone();
            tokio::spawn(async move {
                if let Err(e) = server.connection(incoming).await {
                    tracing::info!("sync connection ended: {e}");
                }
            });
        }
        materialiser.abort();
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) -> Result<(), String> {
        let remote = incoming.remote_address();
        let conn = incoming
            .await
            .map_err(|e| format!("handshake with {remote} failed: {e}"))?;
        let peer = match identity::peer_branch(&conn) {
            Ok(p) => p,
            Err(e) => {
                self.metrics
                    .refused_connections
                    .fetch_add(1, Ordering::Relaxed);
                conn.close(close::NOT_ADMITTED.into(), b"no branch identity");
                return Err(format!("{remote}: {e}"));
            }
        };
        let store = self.store.clone();
        let (branch, fp) = (peer.branch.clone(), peer.fingerprint);
        let admission = tokio::task::spawn_blocking(move || store.admission(&branch, &fp))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if admission != Admission::Allowed {
            self.metrics
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            let why = match admission {
                Admission::NotEnrolled => "branch not enrolled",
                Admission::Revoked => "branch revoked",
                _ => "certificate superseded by a newer enrollment",
            };
            conn.close(close::NOT_ADMITTED.into(), why.as_bytes());
            return Err(format!("{} from {remote} refused: {why}", peer.branch));
        }
        let branch = peer.branch;
        // Supersede the branch's previous session and wait for it to finish.
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let (stop_tx, stop_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let old = self.sessions.lock().insert(
            branch.clone(),
            Slot {
                generation,
                stop: Some(stop_tx),
                done: Some(done_rx),
            },
        );
        if let Some(mut old) = old {
            drop(old.stop.take());
            if let Some(done) = old.done.take() {
                let _ = done.await;
            }
        }
        self.metrics.connections.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%branch, %remote, "edge connected");
        let result = self
            .run_session(&branch, peer.fingerprint, &conn, stop_rx)
            .await;
        {
            let mut sessions = self.sessions.lock();
            if sessions
                .get(&branch)
                .is_some_and(|s| s.generation == generation)
            {
                sessions.remove(&branch);
            }
        }
        drop(done_tx);
        tracing::info!(%branch, "edge disconnected");
        result
    }

    /// Runs a session with its persister: verified segments are stored by a task of their
    /// own, in order, while the session goes on receiving and verifying the next ones; the
    /// session acks each when its commit is reported back. The session ends only after the
    /// persister has finished what it was given.
    async fn run_session(
        self: &Arc<Self>,
        branch: &BranchId,
        fingerprint: [u8; 32],
        conn: &quinn::Connection,
        stop: oneshot::Receiver<()>,
    ) -> Result<(), String> {
        let (persist_tx, mut persist_rx) = mpsc::channel::<(Segment, Vec<LogEntry>)>(PERSIST_QUEUE);
        let (done_tx, done_rx) = mpsc::channel(PERSIST_QUEUE);
        let store = self.store.clone();
        let b = branch.clone();
        let persister = tokio::spawn(async move {
            while let Some((segment, entries)) = persist_rx.recv().await {
                let (store, b2) = (store.clone(), b.clone());
                let n = entries.len() as u64;
                let r = tokio::task::spawn_blocking(move || store.persist(&b2, &segment))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| format!("persisting {b}'s segment: {e}")));
                let failed = r.is_err();
                if done_tx.send(r.map(|p| (p, n))).await.is_err() || failed {
                    break;
                }
            }
        });
        let result = self
            .session_loop(branch, fingerprint, conn, stop, persist_tx, done_rx)
            .await;
        let _ = persister.await;
        result
    }

    async fn session_loop(
        self: &Arc<Self>,
        branch: &BranchId,
        fingerprint: [u8; 32],
        conn: &quinn::Connection,
        mut stop: oneshot::Receiver<()>,
        persist: mpsc::Sender<(Segment, Vec<LogEntry>)>,
        mut persisted: mpsc::Receiver<Result<(Position, u64), String>>,
    ) -> Result<(), String> {
        let mut recheck = tokio::time::interval(ADMISSION_RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let store = self.store.clone();
        let b = branch.clone();
        let state = tokio::task::spawn_blocking(move || store.sync_state(&b))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let mut session = HubSession::new(
            self.config.clone(),
            self.store.schema().clone(),
            state.durable,
            state.feed_acked,
            state.feed_head,
        );
        let (mut ctrl_send, ctrl_recv) = conn
            .accept_bi()
            .await
            .map_err(|e| format!("no control stream: {e}"))?;
        let (frames_tx, mut frames) = mpsc::channel(64);
        tokio::spawn(read_frames(ctrl_recv, frames_tx.clone()));
        {
            let conn = conn.clone();
            let tx = frames_tx.clone();
            tokio::spawn(async move {
                if let Ok(data) = conn.accept_uni().await {
                    read_frames(data, tx).await;
                }
            });
        }
        drop(frames_tx);
        // The edge's platform, once it names it (a protocol 2 `Platform`): downloads check
        // against it.
        let (platform_tx, platform) = tokio::sync::watch::channel::<Option<String>>(None);
        // Every further bidirectional stream is a release download; they end with the session.
        let _downloads = AbortOnDrop(tokio::spawn(self.clone().serve_downloads(
            branch.clone(),
            conn.clone(),
            platform,
        )));
        let mut feed_send: Option<quinn::SendStream> = None;
        let feed = self.feed_notify(branch);
        let mut releases_changed = self.releases_changed.subscribe();
        // The version the edge runs (from its hello) and its platform (from `Platform`; none
        // for a protocol 1 edge, which picks its own among all offers), the offers it was
        // last sent, and whether they should be worked out again.
        let mut running: Option<(String, Option<String>)> = None;
        let mut protocol = 0u16;
        let mut offered: Vec<ReleaseOffer> = Vec::new();
        let mut offers_due = false;
        loop {
            self.drive(branch, &mut session, &persist).await?;
            while let Some(frame) = session.poll_transmit() {
                let stream = match &frame {
                    Frame::Segment(_) => {
                        self.metrics
                            .feed_segments_sent
                            .fetch_add(1, Ordering::Relaxed);
                        if feed_send.is_none() {
                            feed_send = Some(conn.open_uni().await.map_err(|e| e.to_string())?);
                        }
                        feed_send.as_mut().expect("opened above")
                    }
                    _ => &mut ctrl_send,
                };
                stream
                    .write_all(&frame.encode())
                    .await
                    .map_err(|e| format!("sending to {branch}: {e}"))?;
            }
            if session.is_closed() {
                let _ = ctrl_send.finish();
                conn.close(close::PROTOCOL.into(), b"session closed");
                return Ok(());
            }
            // Offers go out after the welcome (flushed above), and again when they change.
            if offers_due && let Some((software, target)) = &running {
                offers_due = false;
                match self.offers(branch, software, target.as_deref()).await {
                    Ok(offers) if offers != offered => {
                        let frame = Frame::Releases {
                            offers: offers.clone(),
                        };
                        ctrl_send
                            .write_all(&frame.encode())
                            .await
                            .map_err(|e| format!("sending to {branch}: {e}"))?;
                        offered = offers;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(%branch, "cannot work out release offers: {e}"),
                }
            }
            let deadline = session
                .poll_timeout()
                .map(|t| tokio::time::Instant::from_std(self.epoch + Duration::from_millis(t)));
            tokio::select! {
                frame = frames.recv() => match frame {
                    Some(Ok(frame)) => {
                        let hello = matches!(frame, Frame::Hello { .. });
                        if let Frame::Platform { target } = frame {
                            // Protocol 2: offers wait for the platform, then follow it.
                            if let Some((_, platform)) = running.as_mut().filter(|_| protocol >= 2) {
                                *platform = Some(target.clone());
                                let _ = platform_tx.send(Some(target.clone()));
                                offers_due = true;
                                let (store, b) = (self.store.clone(), branch.clone());
                                match tokio::task::spawn_blocking(move || store.record_platform(&b, &target)).await {
                                    Ok(Ok(())) => {}
                                    Ok(Err(e)) => tracing::warn!(%branch, "cannot record the edge's platform: {e}"),
                                    Err(e) => tracing::warn!(%branch, "cannot record the edge's platform: {e}"),
                                }
                            }
                            continue;
                        }
                        if let Frame::Hello { protocol: p, software, vector } = &frame {
                            protocol = *p;
                            running = Some((software.clone(), None));
                            let origin = OriginId::from(branch);
                            let head = vector.iter().find(|p| p.origin == origin).map_or(shared::Seq::ZERO, |p| p.seq);
                            let (store, b, sw) = (self.store.clone(), branch.clone(), software.clone());
                            let now = Timestamp(crate::store::now_micros());
                            let _ = tokio::task::spawn_blocking(move || store.record_hello(&b, &sw, head, now)).await;
                        }
                        if let Frame::Status { unsynced, oldest_unsynced_payment } = frame {
                            let report = EdgeReport {
                                unsynced,
                                oldest_unsynced_payment: oldest_unsynced_payment.map(Timestamp),
                                reported_at: Timestamp(crate::store::now_micros()),
                            };
                            self.reports.lock().insert(branch.clone(), report);
                            continue;
                        }
                        if let Frame::UpdateReports { reports } = frame {
                            self.metrics.update_reports.fetch_add(reports.len() as u64, Ordering::Relaxed);
                            for r in &reports {
                                tracing::info!(%branch, version = %r.version, from = %r.from, outcome = r.outcome.as_str(), "update report: {}", r.detail);
                            }
                            let (store, b) = (self.store.clone(), branch.clone());
                            match tokio::task::spawn_blocking(move || store.record_update_reports(&b, &reports)).await {
                                Ok(Ok(_)) => {}
                                Ok(Err(e)) => tracing::error!(%branch, "storing update reports failed: {e}"),
                                Err(e) => tracing::error!(%branch, "storing update reports failed: {e}"),
                            }
                            continue;
                        }
                        if let Frame::Segment(s) = &frame {
                            self.metrics.bytes_received.fetch_add(s.body.len() as u64, Ordering::Relaxed);
                        }
                        session.handle_frame(self.now(), frame);
                        // A hello the session accepted is welcomed: offers follow (for protocol 2,
                        // once the edge has named its platform).
                        if hello && !session.is_closed() && protocol < 2 {
                            offers_due = true;
                        }
                    }
                    Some(Err(e)) => {
                        conn.close(close::PROTOCOL.into(), b"bad frame");
                        return Err(format!("{branch} sent a bad frame: {e}"));
                    }
                    None => return Ok(()),
                },
                done = persisted.recv() => match done {
                    Some(Ok((p, n))) => {
                        self.metrics.segments_persisted.fetch_add(1, Ordering::Relaxed);
                        self.metrics.entries_persisted.fetch_add(n, Ordering::Relaxed);
                        self.last_persist.store(self.now(), Ordering::Relaxed);
                        self.materialise.notify_one();
                        if p.seq > session.durable().seq {
                            session.handle_persisted(self.now(), p);
                        }
                    }
                    Some(Err(e)) => return Err(e),
                    None => return Err("the persister stopped".into()),
                },
                _ = feed.notified() => {
                    let store = self.store.clone();
                    let b = branch.clone();
                    let state = tokio::task::spawn_blocking(move || store.sync_state(&b))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                    session.handle_sealed(self.now(), state.feed_head);
                }
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    session.handle_timeout(self.now());
                }
                _ = recheck.tick() => {
                    // A branch revoked (or re-enrolled) while connected is cut off.
                    let (store, b) = (self.store.clone(), branch.clone());
                    let admission = tokio::task::spawn_blocking(move || store.admission(&b, &fingerprint))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                    if admission != Admission::Allowed {
                        self.metrics.refused_connections.fetch_add(1, Ordering::Relaxed);
                        conn.close(close::NOT_ADMITTED.into(), b"branch no longer admitted");
                        return Err(format!("{branch} is no longer admitted ({admission:?})"));
                    }
                }
                Ok(()) = releases_changed.changed() => {
                    offers_due = running.is_some();
                }
                _ = &mut stop => {
                    conn.close(close::SUPERSEDED.into(), b"superseded by a new connection");
                    return Ok(());
                }
                reason = conn.closed() => return Err(format!("{branch}: {reason}")),
            }
        }
    }

    /// The branch's release offers for an edge running `software`.
    async fn offers(
        &self,
        branch: &BranchId,
        software: &str,
        target: Option<&str>,
    ) -> Result<Vec<ReleaseOffer>, String> {
        let (store, b, sw) = (self.store.clone(), branch.clone(), software.to_owned());
        let t = target.map(str::to_owned);
        tokio::task::spawn_blocking(move || store.offers(&b, &sw, t.as_deref()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Serves the release downloads of a connection: every bidirectional stream the edge
    /// opens after the control stream, each in a task of its own. Ends when the connection
    /// closes; dropping it (the session ended) stops the downloads under way.
    async fn serve_downloads(
        self: Arc<Self>,
        branch: BranchId,
        conn: quinn::Connection,
        platform: tokio::sync::watch::Receiver<Option<String>>,
    ) {
        let mut downloads = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                stream = conn.accept_bi() => match stream {
                    Ok((send, recv)) => {
                        let (server, branch) = (self.clone(), branch.clone());
                        let platform = platform.borrow().clone();
                        downloads.spawn(async move {
                            if let Err(e) = server.serve_download(&branch, platform, send, recv).await {
                                tracing::info!(%branch, "release download ended: {e}");
                            }
                        });
                    }
                    Err(_) => return,
                },
                Some(_) = downloads.join_next() => {}
            }
        }
    }

    /// One download: reads the `Fetch`, checks that the release is offered to the branch and
    /// the offset is within it, then sends `Artifact` and the bytes from the offset and
    /// finishes the stream. A refused fetch is answered with a `Close` saying why.
    async fn serve_download(
        &self,
        branch: &BranchId,
        platform: Option<String>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), String> {
        let mut reader = FrameReader::default();
        let request = tokio::time::timeout(FETCH_REQUEST_TIMEOUT, async {
            loop {
                if let Some(frame) = reader.next_frame().map_err(|e| e.to_string())? {
                    return Ok(frame);
                }
                match recv.read_chunk(SERVE_CHUNK_BYTES, true).await {
                    Ok(Some(chunk)) => reader.push(&chunk.bytes),
                    Ok(None) => return Err("the stream ended before a fetch".to_owned()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await
        .map_err(|_| "no fetch in time".to_owned())?;
        let (version, target, offset) = match request {
            // Protocol 1: no platform named; the version's only target, else the hub's own.
            Ok(Frame::Fetch { version, offset }) => {
                let (store, v) = (self.store.clone(), version.clone());
                let targets = tokio::task::spawn_blocking(move || store.version_releases(&v))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                let target = match targets.as_slice() {
                    [only] => only.target.clone(),
                    _ => shared::release::this_target(),
                };
                (version, target, offset)
            }
            Ok(Frame::FetchFor {
                version,
                target,
                offset,
            }) => {
                if platform.as_deref() != Some(target.as_str()) {
                    let named = platform.as_deref().unwrap_or("no platform yet");
                    return refuse(
                        send,
                        &format!("release {version} for {target} is not for this edge ({named})"),
                    )
                    .await;
                }
                (version, target, offset)
            }
            Ok(other) => {
                return refuse(
                    send,
                    &format!("a download starts with a fetch, not {}", frame_name(&other)),
                )
                .await;
            }
            Err(e) => return refuse(send, &format!("a download starts with a fetch: {e}")).await,
        };
        let Some(files) = self.releases.clone() else {
            return refuse(send, "this hub serves no releases").await;
        };
        let (store, b, v, t) = (
            self.store.clone(),
            branch.clone(),
            version.clone(),
            target.clone(),
        );
        let release = tokio::task::spawn_blocking(move || store.offered_release(&b, &v, &t))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let Some(release) = release else {
            return refuse(
                send,
                &format!("release {version} for {target} is not offered to {branch}"),
            )
            .await;
        };
        if offset > release.size {
            return refuse(
                send,
                &format!(
                    "offset {offset} is past the end of release {version} for {target} ({} bytes)",
                    release.size
                ),
            )
            .await;
        }
        let path = files.artifact_path(&version, &target);
        let opened = async {
            let mut file = tokio::fs::File::open(&path).await?;
            let len = file.metadata().await?.len();
            if len != release.size {
                return Err(std::io::Error::other(format!(
                    "it holds {len} bytes, not {}",
                    release.size
                )));
            }
            file.seek(SeekFrom::Start(offset)).await?;
            Ok::<_, std::io::Error>(file)
        }
        .await;
        let mut file = match opened {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(%branch, path = %path.display(), "release {version} for {target}: its artifact is unusable: {e}");
                return refuse(
                    send,
                    &format!("release {version} for {target}: its artifact is unavailable"),
                )
                .await;
            }
        };
        // Sync traffic (segments, acks, the feed) goes before artifact bytes.
        let _ = send.set_priority(-1);
        let header = Frame::Artifact {
            version: version.clone(),
            size: release.size,
            offset,
        };
        send.write_all(&header.encode())
            .await
            .map_err(|e| e.to_string())?;
        self.metrics.release_fetches.fetch_add(1, Ordering::Relaxed);
        if offset > 0 {
            self.metrics
                .release_fetches_resumed
                .fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(%branch, %version, offset, size = release.size, "serving a release");
        let mut buf = vec![0u8; SERVE_CHUNK_BYTES];
        let mut left = release.size - offset;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = file
                .read(&mut buf[..want])
                .await
                .map_err(|e| format!("reading release {version}: {e}"))?;
            if n == 0 {
                return Err(format!("release {version}'s artifact ended early"));
            }
            send.write_all(&buf[..n]).await.map_err(|e| e.to_string())?;
            self.metrics
                .release_bytes_served
                .fetch_add(n as u64, Ordering::Relaxed);
            left -= n as u64;
        }
        send.finish().map_err(|e| e.to_string())
    }

    /// Answers the session's storage requests, in order.
    async fn drive(
        &self,
        branch: &BranchId,
        session: &mut HubSession,
        persist: &mpsc::Sender<(Segment, Vec<LogEntry>)>,
    ) -> Result<(), String> {
        while let Some(io) = session.poll_io() {
            let store = self.store.clone();
            let b = branch.clone();
            match io {
                SyncIo::Persist { segment, entries } => {
                    persist
                        .send((segment, entries))
                        .await
                        .map_err(|_| "the persister stopped".to_owned())?;
                }
                SyncIo::LoadSegments { after, max } => {
                    let segs =
                        tokio::task::spawn_blocking(move || store.feed_after(&b, after, max))
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|e| e.to_string())?;
                    session.handle_segments(self.now(), segs);
                }
                SyncIo::RecordAck(pos) => {
                    tokio::task::spawn_blocking(move || store.record_feed_ack(&b, &pos))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                }
                SyncIo::Refused {
                    origin,
                    first_seq,
                    reason,
                    detail,
                } => {
                    self.metrics
                        .segments_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%branch, %origin, %first_seq, ?reason, "segment refused: {detail}");
                }
                SyncIo::Diverged { ours, theirs } => {
                    self.metrics.divergences.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        %branch,
                        "histories diverge for origin {}: the hub holds seq {} ({}), the edge seq {} ({})",
                        ours.origin, ours.seq, ours.hash, theirs.seq, theirs.hash
                    );
                }
            }
        }
        Ok(())
    }
}

/// Aborts a task when dropped (a session's downloads end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Refuses a download: a `Close` saying why (cut to the wire's text limit), then the end of
/// the stream.
async fn refuse(mut send: quinn::SendStream, reason: &str) -> Result<(), String> {
    let mut end = reason.len().min(TEXT_BYTES_MAX);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = Frame::Close {
        reason: reason[..end].to_owned(),
    };
    send.write_all(&frame.encode())
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    Err(format!("refused: {reason}"))
}

/// A frame's kind, for messages.
fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello { .. } => "hello",
        Frame::Segment(_) => "segment",
        Frame::Close { .. } => "close",
        Frame::Status { .. } => "status",
        Frame::Artifact { .. } => "artifact",
        Frame::UpdateReports { .. } => "update reports",
        _ => "another frame",
    }
}

/// Reads frames from a stream into `tx` until it ends, fails, or a frame does not decode
/// (sent as an error: the peer is broken or hostile).
async fn read_frames(mut recv: quinn::RecvStream, tx: mpsc::Sender<Result<Frame, String>>) {
    let mut reader = FrameReader::default();
    loop {
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => reader.push(&chunk.bytes),
            // The stream or the connection ended (a frame cut short is simply lost: what
            // was not acknowledged is sent again).
            Ok(None) | Err(_) => return,
        }
        loop {
            match reader.next_frame() {
                Ok(Some(f)) => {
                    if tx.send(Ok(f)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string())).await;
                    return;
                }
            }
        }
    }
}
