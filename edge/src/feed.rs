//! The terminal live feed's fan-out (CONTRACT 2.3). The store hands every durable commit to
//! the fan-out on the thread that delivers it, before the commit's callers are answered; for
//! each commit every change is encoded at most once per wire format and variant (a full row,
//! the changed columns, or a removal) into shared bytes, and each subscription's delta frame is
//! assembled from those bytes and queued on its connection's bounded queue. A connection whose
//! queue is full is marked lagging: its backlog is dropped and it is told to resync, so one
//! frozen tablet never slows the others or grows memory.
//!
//! The registry lock is held only for queueing, never across a read of the store: a read
//! waits for durability, which the delivering thread (blocked on the lock) would provide. A
//! new subscription is registered as pending first, collects the deltas of the commits
//! fanned out while its first frame (snapshot or catch-up) is read, and then queues that frame
//! followed by the collected deltas newer than it.

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
use tokio::sync::{Notify, mpsc};

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
#[derive(Debug, Clone)]
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

    /// This subscription's encoded parts of a commit (empty when none of it matches).
    fn parts(&self, commit: &Commit, enc: &mut Encoded<'_>, format: Format) -> Vec<Bytes> {
        commit
            .changes
            .iter()
            .enumerate()
            .filter_map(|(i, c)| self.variant(c).map(|v| enc.get(format, i, v)))
            .collect()
    }
}

/// A subscription whose first frame is being read, and the commits fanned out meanwhile.
struct Pending {
    sub: Sub,
    /// `(version, encoded parts)` per matching commit, in commit order.
    deltas: Vec<(u64, Vec<Bytes>)>,
}

/// A connection's entry in the registry.
struct Conn {
    out: Outlet,
    format: Format,
    subs: HashMap<String, Sub>,
    pending: HashMap<String, Pending>,
}

/// A connection's way out: its queue, and the flag and wake-up for when the queue is full.
struct Outlet {
    tx: mpsc::Sender<Frame>,
    lagging: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl Outlet {
    /// Queues a frame; a full queue marks the connection lagging. False when not queued.
    fn queue(&self, frame: Frame) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => self.lag(),
            // The connection is going away; its task unregisters it.
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Marks the connection lagging and wakes its task to resync it. Returns false.
    fn lag(&self) -> bool {
        self.lagging.store(true, Relaxed);
        self.wake.notify_one();
        false
    }
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
    /// From the start of a commit's group to its fan-out: the commit itself, its fsync and
    /// the commits delivered before it.
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
    /// Starts fanning out the store's commits.
    pub fn start(store: Store) -> Feed {
        let feed = Feed {
            inner: Arc::new(Inner {
                store: store.clone(),
                conns: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                metrics: FeedMetrics::default(),
            }),
        };
        // The store keeps the listener; a weak reference lets the feed go before the store.
        let weak = Arc::downgrade(&feed.inner);
        store.on_commit(move |commit| {
            if let Some(inner) = weak.upgrade() {
                Feed { inner }.fan_out(commit);
            }
        });
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
            .map(|c| CONNECTION_QUEUE_FRAMES - c.out.tx.capacity())
            .sum()
    }

    fn fan_out(&self, commit: &Commit) {
        let m = &self.inner.metrics;
        m.commits.fetch_add(1, Relaxed);
        m.lag.record(commit.started.elapsed());
        let mut conns = self.inner.conns.lock();
        if conns.is_empty() {
            return;
        }
        let mut enc = Encoded::new(&self.inner.store, commit);
        let version = commit.version.0;
        for Conn {
            out,
            format,
            subs,
            pending,
        } in conns.values_mut()
        {
            if out.lagging.load(Relaxed) {
                continue;
            }
            for p in pending.values_mut() {
                let parts = p.sub.parts(commit, &mut enc, *format);
                if parts.is_empty() {
                    continue;
                }
                if p.deltas.len() >= CONNECTION_QUEUE_FRAMES {
                    // As good as a full queue: the connection resyncs.
                    out.lag();
                    break;
                }
                p.deltas.push((version, parts));
            }
            for (name, sub) in subs.iter_mut() {
                if version <= sub.version {
                    continue;
                }
                let parts = sub.parts(commit, &mut enc, *format);
                if parts.is_empty() {
                    continue;
                }
                let refs: Vec<&Bytes> = parts.iter().collect();
                if !out.queue(delta_frame(*format, name, sub.version, version, &refs)) {
                    break;
                }
                sub.version = version;
                m.deltas_sent.fetch_add(1, Relaxed);
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
                out: Outlet {
                    tx,
                    lagging: lagging.clone(),
                    wake: wake.clone(),
                },
                format,
                subs: HashMap::new(),
                pending: HashMap::new(),
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
    /// `since` when the log still holds it, else a snapshot; then the deltas of the commits
    /// fanned out while that frame was read, so that none slips between it and the live
    /// deltas. Called by the connection's own task, one message at a time.
    pub fn subscribe(
        &self,
        conn: u64,
        name: String,
        sub: Sub,
        since: Option<u64>,
    ) -> Result<(), crate::store::StoreError> {
        let format = {
            let mut conns = self.inner.conns.lock();
            let Some(c) = conns.get_mut(&conn) else {
                return Ok(());
            };
            c.subs.remove(&name);
            c.pending.insert(
                name.clone(),
                Pending {
                    sub: sub.clone(),
                    deltas: Vec::new(),
                },
            );
            c.format
        };
        // Every commit fanned out from here on is collected; every one fanned out before is
        // in what the read below sees (the store publishes a commit before delivering it).
        let first = self.first_frame(format, &name, &sub, since);
        let mut conns = self.inner.conns.lock();
        let Some(c) = conns.get_mut(&conn) else {
            return Ok(());
        };
        let Some(Pending { mut sub, deltas }) = c.pending.remove(&name) else {
            return Ok(());
        };
        let (version, frame) = first?;
        sub.version = version;
        if c.out.queue(frame) {
            for (v, parts) in deltas {
                if v <= sub.version {
                    continue;
                }
                let refs: Vec<&Bytes> = parts.iter().collect();
                if !c
                    .out
                    .queue(delta_frame(format, &name, sub.version, v, &refs))
                {
                    break;
                }
                sub.version = v;
                self.inner.metrics.deltas_sent.fetch_add(1, Relaxed);
            }
        }
        c.subs.insert(name, sub);
        Ok(())
    }

    /// A subscription's first frame and the version it brings the client to: a catch-up
    /// delta from `since` if the log holds it and it fits in one frame, else a snapshot.
    fn first_frame(
        &self,
        format: Format,
        name: &str,
        sub: &Sub,
        since: Option<u64>,
    ) -> Result<(u64, Frame), crate::store::StoreError> {
        let store = &self.inner.store;
        if let Some(base) = since
            && let Some(entries) =
                store.changes_since(shared::Version(base), CATCH_UP_CHANGES_MAX)?
            && let Some(frame) = catch_up_frame(store, format, name, sub, base, &entries)
        {
            self.inner.metrics.catch_ups.fetch_add(1, Relaxed);
            return Ok(frame);
        }
        let names: Vec<&str> = sub.tables.iter().map(|&t| table_name(store, t)).collect();
        let snap = store.snapshot(Some(&names))?;
        self.inner.metrics.snapshots.fetch_add(1, Relaxed);
        let rows: Vec<(String, Vec<Arc<Row>>)> = snap
            .tables
            .into_iter()
            .map(|(t, rows)| (t, rows.into_iter().filter(|r| sub.wants(r)).collect()))
            .collect();
        let frame = match format {
            Format::Json => {
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
                Frame::Text(json.to_string())
            }
            Format::Postcard => message_frame(
                format,
                &ServerMsg::Snapshot {
                    sub: name.to_owned(),
                    version: snap.version.0,
                    rows: rows
                        .iter()
                        .map(|(t, rs)| (t.clone(), rs.iter().map(|r| feed_row(r)).collect()))
                        .collect(),
                },
                serde_json::Value::Null,
            ),
        };
        Ok((snap.version.0, frame))
    }

    /// Queues a frame on a connection (answers to its own messages).
    pub fn push(&self, conn: u64, frame: Frame) {
        if let Some(c) = self.inner.conns.lock().get(&conn) {
            c.out.queue(frame);
        }
    }

    /// How many subscriptions a connection holds.
    pub fn subscriptions(&self, conn: u64) -> usize {
        self.inner
            .conns
            .lock()
            .get(&conn)
            .map_or(0, |c| c.subs.len() + c.pending.len())
    }

    pub fn unsubscribe(&self, conn: u64, name: &str) {
        if let Some(c) = self.inner.conns.lock().get_mut(&conn) {
            c.subs.remove(name);
            c.pending.remove(name);
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
        let names: Vec<String> = c.subs.drain().map(|(name, _)| name).collect();
        let frames: Vec<Frame> = names
            .iter()
            .chain(c.pending.keys())
            .map(|name| resync_frame(c.format, name, "lagging"))
            .collect();
        c.pending.clear();
        self.inner
            .metrics
            .resyncs
            .fetch_add(frames.len() as u64, Relaxed);
        c.out.lagging.store(false, Relaxed);
        frames
    }
}

/// A catch-up delta from the log's entries after `base`, and the version it reaches; `None`
/// when it would not fit in one frame.
fn catch_up_frame(
    store: &Store,
    format: Format,
    name: &str,
    sub: &Sub,
    base: u64,
    entries: &[(shared::Version, shared::LogEntry)],
) -> Option<(u64, Frame)> {
    let version = entries.last().map_or(base, |(v, _)| v.0);
    let mut bytes = 0;
    let mut parts: Vec<Bytes> = Vec::with_capacity(entries.len());
    for (_, e) in entries {
        let Some(ti) = store.schema().table_index(&e.table) else {
            continue;
        };
        if !sub.tables.contains(&ti) {
            continue;
        }
        // Log entries carry whole rows: a row that matches is sent whole, one that does not
        // (any more) is removed.
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
        let part = encode(store, format, &change, variant);
        bytes += part.len();
        if bytes > CATCH_UP_BYTES_MAX {
            return None;
        }
        parts.push(part);
    }
    let refs: Vec<&Bytes> = parts.iter().collect();
    Some((version, delta_frame(format, name, base, version, &refs)))
}
