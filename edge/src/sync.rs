//! The edge's sync client: one long-lived QUIC connection to the hub with mutual TLS,
//! driving the sans-IO [`EdgeSession`] against the store. It reconnects with exponential
//! backoff and jitter, resumes from the hub's position, sends sealed segments with a bounded
//! window, applies the hub's feed through the store's write path, and records the hub's acks
//! as the log's retention watermark.
//!
//! Streams: the edge opens a bidirectional control stream and a unidirectional stream for
//! its segments; the hub's feed arrives on a unidirectional stream the hub opens.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shared::Timestamp;
use shared::sync::{EdgeSession, SyncConfig, SyncIo};
use shared::wire::{Frame, FrameReader, HUB_SERVER_NAME, Position};
use tokio::sync::{mpsc, watch};

use crate::identity::EdgeIdentity;
use crate::store::Store;

/// First reconnect delay; it doubles up to [`BACKOFF_MAX`], with jitter.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A segment unacknowledged for this long marks the link as down in `/healthz`.
const STALLED_MS: u64 = 2_000;
/// How often the client looks for newly sealed segments.
const SEAL_POLL: Duration = Duration::from_millis(50);
/// How often the backlog report (`Frame::Status`) is refreshed while it changes...
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// ... and repeated while it does not.
const STATUS_REPEAT: Duration = Duration::from_secs(10);

/// What `/healthz` and `/metrics` show about the sync link.
#[derive(Debug, Default)]
pub struct SyncStatus {
    pub connected: AtomicBool,
    pub diverged: AtomicBool,
    pub connects: AtomicU64,
    pub reconnects: AtomicU64,
    pub segments_sent: AtomicU64,
    pub entries_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Segments the hub refused (it failed verification there) and sent again.
    pub segments_rejected: AtomicU64,
    /// Feed segments from the hub that failed verification here.
    pub feed_refused: AtomicU64,
    pub feed_segments_applied: AtomicU64,
    pub feed_entries_applied: AtomicU64,
}

/// A test hook: `OUTPOST_FAULT_CORRUPT_SEGMENT=N` flips one byte in the body of the N-th
/// segment this process sends (1-based), to prove the hub refuses it and it is sent again.
const CORRUPT_ENV: &str = "OUTPOST_FAULT_CORRUPT_SEGMENT";

pub struct SyncClient {
    store: Store,
    identity: EdgeIdentity,
    hub: SocketAddr,
    software: String,
    pub status: Arc<SyncStatus>,
    epoch: Instant,
    corrupt_nth: Option<u64>,
    updater: Option<Arc<crate::update::Updater>>,
}

impl SyncClient {
    pub fn new(store: Store, identity: EdgeIdentity, hub: SocketAddr, software: &str) -> Self {
        SyncClient {
            store,
            identity,
            hub,
            software: software.to_owned(),
            status: Arc::new(SyncStatus::default()),
            epoch: Instant::now(),
            corrupt_nth: std::env::var(CORRUPT_ENV).ok().and_then(|v| v.parse().ok()),
            updater: None,
        }
    }

    /// Installs the hub's release offers with `updater` (a worker under a keeper).
    pub fn with_updater(mut self, updater: Option<Arc<crate::update::Updater>>) -> Self {
        self.updater = updater;
        self
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The log's status, read off the runtime's threads: the read waits for an fsync.
    async fn log_status(&self) -> crate::store::LogStatus {
        let store = self.store.clone();
        crate::store::blocking(move || Ok(store.log_status()))
            .await
            // Only while the runtime shuts down.
            .unwrap_or_else(|_| self.store.log_status())
    }

    async fn sealed_head(&self) -> Position {
        let s = self.log_status().await;
        Position {
            origin: self.store.origin().clone(),
            seq: s.sealed_seq,
            hash: s.head,
        }
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), String> {
        let client_config = self.identity.client_config().map_err(|e| e.to_string())?;
        let bind: SocketAddr = if self.hub.is_ipv6() {
            "[::]:0".parse().expect("address")
        } else {
            "0.0.0.0:0".parse().expect("address")
        };
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| e.to_string())?;
        endpoint.set_default_client_config(client_config);
        let status = self.log_status().await;
        let mut session = EdgeSession::new(
            SyncConfig::default(),
            &self.software,
            self.store.schema().clone(),
            self.store.acked_position().map_err(|e| e.to_string())?,
            self.sealed_head().await,
            status.feed.clone(),
        );
        let mut rng = Jitter::new();
        let mut backoff = BACKOFF_MIN;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let attempt = async {
                let conn = endpoint
                    .connect(self.hub, HUB_SERVER_NAME)
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                self.status.connects.fetch_add(1, Ordering::Relaxed);
                let welcomed = self.connection(&conn, &mut session).await;
                conn.close(0u32.into(), b"bye");
                welcomed
            };
            let outcome = tokio::select! {
                r = attempt => r,
                _ = shutdown.changed() => break,
            };
            self.status.connected.store(false, Ordering::Relaxed);
            session.handle_disconnected(self.now());
            match outcome {
                Ok(true) => backoff = BACKOFF_MIN,
                Ok(false) => {}
                Err(e) => tracing::info!(hub = %self.hub, "sync link down: {e}"),
            }
            if session.is_diverged() {
                self.status.diverged.store(true, Ordering::Relaxed);
                tracing::error!("the hub holds a different history; syncing stopped");
                let _ = shutdown.changed().await;
                break;
            }
            self.status.reconnects.fetch_add(1, Ordering::Relaxed);
            let delay = rng.jitter(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => break,
            }
        }
        endpoint.close(0u32.into(), b"shutting down");
        endpoint.wait_idle().await;
        Ok(())
    }

    /// One connection; returns whether the hub welcomed the session.
    async fn connection(
        &self,
        conn: &quinn::Connection,
        session: &mut EdgeSession,
    ) -> Result<bool, String> {
        let (mut ctrl_send, ctrl_recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let mut data_send = conn.open_uni().await.map_err(|e| e.to_string())?;
        let (frames_tx, mut frames) = mpsc::channel(64);
        tokio::spawn(read_frames(ctrl_recv, frames_tx.clone()));
        {
            let conn = conn.clone();
            let tx = frames_tx.clone();
            tokio::spawn(async move {
                if let Ok(feed) = conn.accept_uni().await {
                    read_frames(feed, tx).await;
                }
            });
        }
        drop(frames_tx);
        // The hello carries everything sealed so far, offline time included.
        let head = self.sealed_head().await;
        if head.seq > session.head().seq {
            session.handle_sealed(self.now(), head);
        }
        session.handle_connected(self.now());
        let mut poll = tokio::time::interval(SEAL_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status_checked: Option<Instant> = None;
        let mut status_sent: Option<(Instant, Frame)> = None;
        let mut reports_sent: Option<u64> = None;
        loop {
            self.drive(session).await?;
            if let Some(updater) = &self.updater
                && session.is_welcomed()
                && reports_sent != Some(updater.reports_generation())
            {
                // Update outcomes, on every connection and whenever one is added.
                reports_sent = Some(updater.reports_generation());
                let reports = updater.reports();
                if !reports.is_empty() {
                    let frame = Frame::UpdateReports { reports };
                    ctrl_send
                        .write_all(&frame.encode())
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            if session.is_welcomed() && status_checked.is_none_or(|at| at.elapsed() >= STATUS_EVERY)
            {
                status_checked = Some(Instant::now());
                let status = self.backlog_status().await;
                let send = status_sent
                    .as_ref()
                    .is_none_or(|(at, f)| f != &status || at.elapsed() >= STATUS_REPEAT);
                if send {
                    ctrl_send
                        .write_all(&status.encode())
                        .await
                        .map_err(|e| e.to_string())?;
                    status_sent = Some((Instant::now(), status));
                }
            }
            while let Some(frame) = session.poll_transmit() {
                let bytes = match &frame {
                    Frame::Segment(s) => {
                        let n = self.status.segments_sent.fetch_add(1, Ordering::Relaxed) + 1;
                        self.status
                            .entries_sent
                            .fetch_add(s.last_seq.0 - s.first_seq.0 + 1, Ordering::Relaxed);
                        self.status
                            .bytes_sent
                            .fetch_add(s.body.len() as u64, Ordering::Relaxed);
                        if self.corrupt_nth == Some(n) && !s.body.is_empty() {
                            let mut bad = s.clone();
                            let i = bad.body.len() / 2;
                            bad.body[i] ^= 0x40;
                            tracing::warn!("test hook: corrupting segment {n} on the way out");
                            Frame::Segment(bad).encode()
                        } else {
                            frame.encode()
                        }
                    }
                    _ => frame.encode(),
                };
                let stream = if matches!(frame, Frame::Segment(_)) {
                    &mut data_send
                } else {
                    &mut ctrl_send
                };
                stream.write_all(&bytes).await.map_err(|e| e.to_string())?;
            }
            let welcomed = session.is_welcomed();
            // Up: welcomed, and the hub acknowledges what was sent (a cut link keeps its
            // QUIC connection until the idle timeout; it is not "connected" meanwhile).
            let stalled = session
                .oldest_unacked()
                .is_some_and(|t| self.now().saturating_sub(t) > STALLED_MS);
            self.status
                .connected
                .store(welcomed && !stalled, Ordering::Relaxed);
            if session.is_diverged() {
                return Ok(welcomed);
            }
            let deadline = session
                .poll_timeout()
                .map(|t| tokio::time::Instant::from_std(self.epoch + Duration::from_millis(t)));
            tokio::select! {
                frame = frames.recv() => match frame {
                    Some(Ok(frame)) => {
                        if let Frame::Reject { .. } = frame {
                            self.status.segments_rejected.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Frame::Releases { offers } = &frame {
                            if let Some(updater) = &self.updater {
                                updater.offers(conn, offers);
                            }
                            continue;
                        }
                        session.handle_frame(self.now(), frame);
                        if !session.is_welcomed() && !session.is_diverged() && welcomed {
                            return Ok(true); // the hub closed the session
                        }
                    }
                    Some(Err(e)) => return Err(format!("the hub sent a bad frame: {e}")),
                    None => return Ok(welcomed),
                },
                _ = poll.tick() => {
                    // Whatever was sealed since the session last heard, offline time included.
                    let head = self.sealed_head().await;
                    if head.seq > session.head().seq {
                        session.handle_sealed(self.now(), head);
                    }
                }
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    session.handle_timeout(self.now());
                }
                reason = conn.closed() => {
                    return if welcomed { Ok(true) } else { Err(reason.to_string()) };
                }
            }
        }
    }

    /// The backlog as the hub's dashboard shows it.
    async fn backlog_status(&self) -> Frame {
        let store = self.store.clone();
        let (unsynced, oldest) = tokio::task::spawn_blocking(move || {
            (unsynced(&store), oldest_unsynced_payment(&store))
        })
        .await
        .unwrap_or((0, None));
        Frame::Status {
            unsynced,
            oldest_unsynced_payment: oldest.map(|t| t.0),
        }
    }

    /// Answers the session's storage requests, in order.
    async fn drive(&self, session: &mut EdgeSession) -> Result<(), String> {
        while let Some(io) = session.poll_io() {
            match io {
                SyncIo::LoadSegments { after, max } => {
                    let store = self.store.clone();
                    let segs =
                        tokio::task::spawn_blocking(move || store.segments_after(after, max))
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|e| e.to_string())?;
                    session.handle_segments(self.now(), segs);
                }
                SyncIo::RecordAck(pos) => {
                    self.store
                        .set_acked(pos.seq)
                        .await
                        .map_err(|e| format!("recording the hub's ack: {e}"))?;
                }
                SyncIo::Persist { segment, entries } => {
                    let pos = Position {
                        origin: segment.origin.clone(),
                        seq: segment.last_seq,
                        hash: segment.hash,
                    };
                    let n = entries.len() as u64;
                    self.store
                        .apply_feed(pos.clone(), entries)
                        .await
                        .map_err(|e| format!("applying the hub's feed: {e}"))?;
                    self.status
                        .feed_segments_applied
                        .fetch_add(1, Ordering::Relaxed);
                    self.status
                        .feed_entries_applied
                        .fetch_add(n, Ordering::Relaxed);
                    session.handle_persisted(self.now(), pos);
                }
                SyncIo::Refused {
                    origin,
                    first_seq,
                    reason,
                    detail,
                } => {
                    self.status.feed_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%origin, %first_seq, ?reason, "feed segment refused: {detail}");
                }
                SyncIo::Diverged { ours, theirs } => {
                    tracing::error!(
                        "histories diverge for origin {}: this edge holds seq {} ({}), the hub seq {} ({})",
                        ours.origin,
                        ours.seq,
                        ours.hash,
                        theirs.seq,
                        theirs.hash
                    );
                }
            }
        }
        Ok(())
    }
}

/// The age of the oldest payment the hub does not hold yet, if any.
pub fn oldest_unsynced_payment(store: &Store) -> Option<Timestamp> {
    let status = store.log_status();
    if status.acked_seq >= status.last_seq {
        return None;
    }
    let page = store.log_page(status.acked_seq, 1000).ok()?;
    page.entries
        .iter()
        .find(|(_, e)| e.table == "order_payment" && e.seq > status.acked_seq)
        .map(|(_, e)| e.row.created_at)
}

/// Unsynced entries: written here, not yet durable at the hub.
pub fn unsynced(store: &Store) -> u64 {
    let s = store.log_status();
    s.last_seq.0.saturating_sub(s.acked_seq.0)
}

/// Reads frames from a stream into `tx` until it ends, fails, or a frame does not decode
/// (sent as an error).
async fn read_frames(mut recv: quinn::RecvStream, tx: mpsc::Sender<Result<Frame, String>>) {
    let mut reader = FrameReader::default();
    loop {
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => reader.push(&chunk.bytes),
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

/// Backoff jitter: a xorshift seeded from the OS, so branches that lost the hub together do
/// not all come back in the same millisecond.
struct Jitter(u64);

impl Jitter {
    fn new() -> Jitter {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        Jitter(u64::from_le_bytes(b) | 1)
    }

    /// A delay between half and all of `d`.
    fn jitter(&mut self, d: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let half = d.as_millis() as u64 / 2;
        Duration::from_millis(half + self.0 % (half + 1))
    }
}
