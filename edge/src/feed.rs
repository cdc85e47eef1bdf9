//! The terminal live feed's fan-out (CONTRACT 2.3). One task reads the store's commits; for
//! each commit every change is encoded at most once per wire format and variant (a full row,
//! the changed columns, or a removal) into shared bytes, and each subscription's delta frame is
//! assembled from those bytes and queued on its connection's bounded queue. A connection whose
//! queue is full is marked lagging: its backlog is dropped and it is told to resync, so one
//! frozen tablet never slows the others or grows memory.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use parking_lot::Mutex;
use shared::feed::{FeedChange, FeedOp, FeedRow, ServerMsg, delta_head, feed_row};
use shared::json::{row_to_json, value_to_json};
use shared::{EntryOp, Row};
use tokio::sync::{Notify, broadcast, mpsc};

use crate::store::query::Filter;
use crate::store::{Change, Commit, Store};

/// Frames queued per connection before it counts as lagging.
pub const CONNECTION_QUEUE_FRAMES: usize = 256;
/// Most changes a `since` catch-up replays; beyond it the client gets a snapshot.
pub const CATCH_UP_CHANGES_MAX: usize = 10_000;
/// Most encoded bytes of a catch-up delta (one frame); beyond it the client gets a snapshot.
/// Well under the 16 MiB frame limit WebSocket clients commonly keep.
pub const CATCH_UP_BYTES_MAX: usize = 4 * 1024 * 1024;

/// A connection's wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Postcard,
}

/// One WebSocket message, ready to send.
#[derive(Debug, Clone)]
pub enum Frame {
    Text(String),
    Binary(Bytes),
}

/// How a change reaches a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// The whole row (`row`), for inserts and rows that newly match the filter.
    Full,
    /// The changed columns (`set`), for updates of rows that matched before and after.
    Set,
    /// A removal, for deletes and rows that no longer match.
    Gone,
}

/// A subscription: tables (by index), a filter, and the version its client has reached.
#[derive(Debug)]
pub struct Sub {
    pub tables: Vec<usize>,
    pub filter: Vec<Filter>,
    pub version: u64,
}

impl Sub {
    fn wants(&self, row: &Row) -> bool {
        self.filter.iter().all(|f| f.matches(row))
    }

    /// How a committed change reaches this subscription, if at all.
    fn variant(&self, c: &Change) -> Option<Variant> {
        if !self.tables.contains(&c.table) {
            return None;
        }
        let now = self.wants(&c.row);
        match c.op {
            EntryOp::Insert => now.then_some(Variant::Full),
            EntryOp::Delete => now.then_some(Variant::Gone),
            EntryOp::Update => {
                let before = c.before.as_ref().is_none_or(|b| self.wants(b));
                match (before, now) {
                    (true, true) => Some(Variant::Set),
                    (false, true) => Some(Variant::Full),
                    (true, false) => Some(Variant::Gone),
                    (false, false) => None,
                }
            }
        }
    }
}

/// A connection's entry in the registry.
struct Conn {
    tx: mpsc::Sender<Frame>,
    format: Format,
    lagging: Arc<AtomicBool>,
    wake: Arc<Notify>,
    subs: HashMap<String, Sub>,
}

#[derive(Debug, Default)]
pub struct FeedMetrics {
    pub connections: AtomicU64,
    pub deltas_sent: AtomicU64,
    pub encodes: AtomicU64,
    pub commits: AtomicU64,
    pub resyncs: AtomicU64,
    pub snapshots: AtomicU64,
    pub catch_ups: AtomicU64,
    /// From the start of a commit's group to its fan-out: the commit itself, handing it
    /// over, and the wait for the fan-out task.
    pub lag: crate::store::metrics::LatencyHistogram,
}

struct Inner {
    store: Store,
    conns: Mutex<HashMap<u64, Conn>>,
    next_id: AtomicU64,
    metrics: FeedMetrics,
}

/// The fan-out. Cheap to clone.
#[derive(Clone)]
pub struct Feed {
    inner: Arc<Inner>,
}

/// A registered connection's handle, held by its WebSocket task.
pub struct Registration {
    pub id: u64,
    pub rx: mpsc::Receiver<Frame>,
    pub lagging: Arc<AtomicBool>,
    pub wake: Arc<Notify>,
}

fn table_name(store: &Store, ti: usize) -> &str {
    &store.schema().tables()[ti].name
}

/// Encodes a change in one format and variant.
fn encode(store: &Store, format: Format, c: &Change, v: Variant) -> Bytes {
    let table = table_name(store, c.table);
    let set_columns = || -> Vec<(&str, shared::Value)> {
        let mut cols: Vec<(&str, shared::Value)> = c
            .changed
            .iter()
            .map(|k| (k.as_str(), c.row.get(k).clone()))
            .collect();
        cols.push(("updated_at", shared::Value::Timestamp(c.row.updated_at)));
        cols
    };
    let op = match (c.op, v) {
        (_, Variant::Gone) => FeedOp::Delete,
        (EntryOp::Insert, _) => FeedOp::Insert,
        _ => FeedOp::Update,
    };
    match format {
        Format::Json => {
            let mut m = serde_json::Map::new();
            m.insert("table".into(), table.into());
            m.insert("id".into(), c.row.id.clone().into());
            m.insert("op".into(), op.name().into());
            m.insert("version".into(), c.row.version.into());
            match v {
                Variant::Full => {
                    m.insert("row".into(), serde_json::Value::Object(row_to_json(&c.row)));
                }
                Variant::Set => {
                    let set = set_columns()
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), value_to_json(&v)))
                        .collect();
                    m.insert("set".into(), serde_json::Value::Object(set));
                }
                Variant::Gone => {}
            }
            Bytes::from(serde_json::Value::Object(m).to_string())
        }
        Format::Postcard => {
            let (row, set) = match v {
                Variant::Full => (Some(feed_row(&c.row)), None),
                Variant::Set => (
                    None,
                    Some(
                        set_columns()
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v))
                            .collect::<FeedRow>(),
                    ),
                ),
                Variant::Gone => (None, None),
            };
            let change = FeedChange {
                table: table.to_owned(),
                id: c.row.id.clone(),
                op,
                version: c.row.version,
                row,
                set,
            };
            Bytes::from(postcard::to_stdvec(&change).expect("postcard encodes a change"))
        }
    }
}

/// Builds a delta frame from encoded changes.
fn delta_frame(format: Format, sub: &str, base: u64, version: u64, parts: &[&Bytes]) -> Frame {
    match format {
        Format::Json => {
            let size: usize = parts.iter().map(|p| p.len() + 1).sum();
            let mut s = String::with_capacity(size + 96 + sub.len());
            let _ = write!(
                s,
                "{{\"type\":\"delta\",\"sub\":{},\"base\":{base},\"version\":{version},\"changes\":[",
                serde_json::Value::from(sub)
            );
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                // Encoded JSON changes are UTF-8 by construction.
                s.push_str(std::str::from_utf8(p).unwrap_or("null"));
            }
            s.push_str("]}");
            Frame::Text(s)
        }
        Format::Postcard => {
            let mut b = delta_head(sub, base, version, parts.len());
            for p in parts {
                b.extend_from_slice(p);
            }
            Frame::Binary(Bytes::from(b))
        }
    }
}

/// A whole message (snapshot, resync, error) in a format.
pub fn message_frame(format: Format, msg: &ServerMsg, json: serde_json::Value) -> Frame {
    match format {
        Format::Json => Frame::Text(json.to_string()),
        Format::Postcard => Frame::Binary(Bytes::from(
            postcard::to_stdvec(msg).expect("postcard encodes a server message"),
        )),
    }
}

pub fn resync_frame(format: Format, sub: &str, reason: &str) -> Frame {
    message_frame(
        format,
        &ServerMsg::Resync {
            sub: sub.to_owned(),
            reason: reason.to_owned(),
        },
        serde_json::json!({"type": "resync", "sub": sub, "reason": reason}),
    )
}

pub fn error_frame(format: Format, sub: Option<&str>, code: &str, message: &str) -> Frame {
    message_frame(
        format,
        &ServerMsg::Error {
            sub: sub.map(str::to_owned),
            error: code.to_owned(),
            message: message.to_owned(),
        },
        serde_json::json!({"type": "error", "sub": sub, "error": code, "message": message}),
    )
}

/// Per commit: each change's encodings, made on first use.
struct Encoded<'a> {
    store: &'a Store,
    commit: &'a Commit,
    /// `[format][variant]` per change.
    cache: Vec<[[OnceLock<Bytes>; 3]; 2]>,
    encodes: u64,
}

impl<'a> Encoded<'a> {
    fn new(store: &'a Store, commit: &'a Commit) -> Self {
        Encoded {
            store,
            commit,
            cache: (0..commit.changes.len())
                .map(|_| Default::default())
                .collect(),
            encodes: 0,
        }
    }

    fn get(&mut self, format: Format, i: usize, v: Variant) -> Bytes {
        let f = match format {
            Format::Json => 0,
            Format::Postcard => 1,
        };
        let slot = &self.cache[i][f][v as usize];
        if let Some(b) = slot.get() {
            return b.clone();
        }
        self.encodes += 1;
        let b = encode(self.store, format, &self.commit.changes[i], v);
        let _ = slot.set(b.clone());
        b
    }
}

impl Feed {
    /// Starts the fan-out task on the current tokio runtime.
    pub fn start(store: Store) -> Feed {
        let feed = Feed {
            inner: Arc::new(Inner {
                store: store.clone(),
                conns: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                metrics: FeedMetrics::default(),
            }),
        };
        let rx = store.subscribe();
        let task = feed.clone();
        tokio::spawn(async move { task.run(rx).await });
        feed
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn metrics(&self) -> &FeedMetrics {
        &self.inner.metrics
    }

    /// Frames waiting in connection queues, in total.
    pub fn queued_frames(&self) -> usize {
        self.inner
            .conns
            .lock()
            .values()
            .map(|c| CONNECTION_QUEUE_FRAMES - c.tx.capacity())
            .sum()
    }

    async fn run(self, mut rx: broadcast::Receiver<Arc<Commit>>) {
        loop {
            match rx.recv().await {
                Ok(commit) => self.fan_out(&commit),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // The feed itself fell behind the store: nobody can be sent a gap-free
                    // delta any more, so everybody resyncs.
                    tracing::warn!(
                        missed = n,
                        "terminal feed fell behind; every subscriber resyncs"
                    );
                    let conns = self.inner.conns.lock();
                    for c in conns.values() {
                        c.lagging.store(true, Relaxed);
                        c.wake.notify_one();
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn fan_out(&self, commit: &Commit) {
        let m = &self.inner.metrics;
        m.commits.fetch_add(1, Relaxed);
        m.lag.record(commit.started.elapsed());
        let mut enc = Encoded::new(&self.inner.store, commit);
        let version = commit.version.0;
        let mut conns = self.inner.conns.lock();
        for conn in conns.values_mut() {
            if conn.lagging.load(Relaxed) {
                continue;
            }
            for (name, sub) in conn.subs.iter_mut() {
                if version <= sub.version {
                    continue;
                }
                let parts: Vec<Bytes> = commit
                    .changes
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| sub.variant(c).map(|v| enc.get(conn.format, i, v)))
                    .collect();
                if parts.is_empty() {
                    continue;
                }
                let refs: Vec<&Bytes> = parts.iter().collect();
                let frame = delta_frame(conn.format, name, sub.version, version, &refs);
                match conn.tx.try_send(frame) {
                    Ok(()) => {
                        sub.version = version;
                        m.deltas_sent.fetch_add(1, Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        conn.lagging.store(true, Relaxed);
                        conn.wake.notify_one();
                        break;
                    }
                    // The connection is going away; its task unregisters it.
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
        }
        m.encodes.fetch_add(enc.encodes, Relaxed);
    }

    /// Registers a new connection.
    pub fn register(&self, format: Format) -> Registration {
        let (tx, rx) = mpsc::channel(CONNECTION_QUEUE_FRAMES);
        let id = self.inner.next_id.fetch_add(1, Relaxed);
        let lagging = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Notify::new());
        self.inner.conns.lock().insert(
            id,
            Conn {
                tx,
                format,
                lagging: lagging.clone(),
                wake: wake.clone(),
                subs: HashMap::new(),
            },
        );
        self.inner.metrics.connections.fetch_add(1, Relaxed);
        Registration {
            id,
            rx,
            lagging,
            wake,
        }
    }

    pub fn unregister(&self, id: u64) {
        if self.inner.conns.lock().remove(&id).is_some() {
            self.inner.metrics.connections.fetch_sub(1, Relaxed);
        }
    }

    /// Adds (or replaces) a subscription and queues its first frame: a catch-up delta from
    /// `since` when the log still holds it, else a snapshot. Runs under the registry lock so
    /// that no commit slips between the first frame and the live deltas.
    pub fn subscribe(
        &self,
        conn: u64,
        name: String,
        mut sub: Sub,
        since: Option<u64>,
    ) -> Result<(), crate::store::StoreError> {
        let store = &self.inner.store;
        // The reads below wait for durability; wait before taking the registry lock, so
        // that the fan-out is rarely held up behind a subscribe waiting for an fsync.
        store.wait_durable();
        let mut conns = self.inner.conns.lock();
        let Some(c) = conns.get_mut(&conn) else {
            return Ok(());
        };
        let catch_up = match since {
            Some(v) => store.changes_since(shared::Version(v), CATCH_UP_CHANGES_MAX)?,
            None => None,
        };
        // A catch-up delta from the log, if the log holds it and it fits in one frame.
        let catch_up = catch_up.and_then(|entries| {
            let base = since?;
            let version = entries.last().map_or(base, |(v, _)| v.0);
            let mut bytes = 0;
            let mut parts: Vec<Bytes> = Vec::with_capacity(entries.len());
            for (_, e) in &entries {
                let Some(ti) = store.schema().table_index(&e.table) else {
                    continue;
                };
                if !sub.tables.contains(&ti) {
                    continue;
                }
                // Log entries carry whole rows: a row that matches is sent whole, one that
                // does not (any more) is removed.
                let variant = match (e.op, sub.wants(&e.row)) {
                    (EntryOp::Delete, _) | (_, false) => Variant::Gone,
                    _ => Variant::Full,
                };
                let change = Change {
                    table: ti,
                    op: e.op,
                    row: Arc::new(e.row.clone()),
                    before: None,
                    changed: Vec::new(),
                };
                let part = encode(store, c.format, &change, variant);
                bytes += part.len();
                if bytes > CATCH_UP_BYTES_MAX {
                    return None;
                }
                parts.push(part);
            }
            let refs: Vec<&Bytes> = parts.iter().collect();
            Some((version, delta_frame(c.format, &name, base, version, &refs)))
        });
        let frame = match catch_up {
            Some((version, frame)) => {
                sub.version = version;
                self.inner.metrics.catch_ups.fetch_add(1, Relaxed);
                frame
            }
            _ => {
                let names: Vec<&str> = sub.tables.iter().map(|&t| table_name(store, t)).collect();
                let snap = store.snapshot(Some(&names))?;
                sub.version = snap.version.0;
                self.inner.metrics.snapshots.fetch_add(1, Relaxed);
                let rows: Vec<(String, Vec<Arc<Row>>)> = snap
                    .tables
                    .into_iter()
                    .map(|(t, rows)| (t, rows.into_iter().filter(|r| sub.wants(r)).collect()))
                    .collect();
                let json_rows: serde_json::Map<String, serde_json::Value> = rows
                    .iter()
                    .map(|(t, rs)| {
                        let list = rs.iter().map(|r| serde_json::Value::Object(row_to_json(r)));
                        (t.clone(), serde_json::Value::Array(list.collect()))
                    })
                    .collect();
                let json = serde_json::json!({
                    "type": "snapshot", "sub": name, "version": snap.version.0, "rows": json_rows,
                });
                match c.format {
                    Format::Json => Frame::Text(json.to_string()),
                    Format::Postcard => message_frame(
                        c.format,
                        &ServerMsg::Snapshot {
                            sub: name.clone(),
                            version: snap.version.0,
                            rows: rows
                                .iter()
                                .map(|(t, rs)| {
                                    (t.clone(), rs.iter().map(|r| feed_row(r)).collect())
                                })
                                .collect(),
                        },
                        serde_json::Value::Null,
                    ),
                }
            }
        };
        if c.tx.try_send(frame).is_err() {
            c.lagging.store(true, Relaxed);
            c.wake.notify_one();
        }
        c.subs.insert(name, sub);
        Ok(())
    }

    /// Queues a frame on a connection (answers to its own messages).
    pub fn push(&self, conn: u64, frame: Frame) {
        if let Some(c) = self.inner.conns.lock().get(&conn)
            && c.tx.try_send(frame).is_err()
        {
            c.lagging.store(true, Relaxed);
            c.wake.notify_one();
        }
    }

    /// How many subscriptions a connection holds.
    pub fn subscriptions(&self, conn: u64) -> usize {
        self.inner
            .conns
            .lock()
            .get(&conn)
            .map_or(0, |c| c.subs.len())
    }

    pub fn unsubscribe(&self, conn: u64, name: &str) {
        if let Some(c) = self.inner.conns.lock().get_mut(&conn) {
            c.subs.remove(name);
        }
    }

    /// Handles a lagging connection: drops its backlog and its subscriptions and returns the
    /// resync frames to send, one per subscription.
    pub fn resync(&self, conn: u64, rx: &mut mpsc::Receiver<Frame>) -> Vec<Frame> {
        let mut conns = self.inner.conns.lock();
        let Some(c) = conns.get_mut(&conn) else {
            return Vec::new();
        };
        while rx.try_recv().is_ok() {}
        let frames: Vec<Frame> = c
            .subs
            .drain()
            .map(|(name, _)| resync_frame(c.format, &name, "lagging"))
            .collect();
        self.inner
            .metrics
            .resyncs
            .fetch_add(frames.len() as u64, Relaxed);
        c.lagging.store(false, Relaxed);
        frames
    }
}
