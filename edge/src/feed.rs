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
//! followed by one delta of the collected commits newer than it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use parking_lot::Mutex;
use shared::feed::{FeedChange, FeedOp, FeedRow, ServerMsg, delta_head, feed_row};
use shared::json::{row_to_json, value_to_json};
use shared::{EntryOp, Row, Schema};
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
                    // A row the subscription's snapshot could not hold goes whole.
                    (true, true) if c.was_cold => Some(Variant::Full),
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
    /// Their encoded size; past [`CATCH_UP_BYTES_MAX`] the connection resyncs.
    bytes: usize,
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

/// The fan-out's state. The store's commit listener holds it weakly and holds no store, so
/// that the last reference, if dropped on the delivering thread, never takes the store (and
/// its writer thread) down with it there.
struct Inner {
    schema: Arc<Schema>,
    conns: Mutex<HashMap<u64, Conn>>,
    next_id: AtomicU64,
    metrics: FeedMetrics,
}

/// The fan-out. Cheap to clone.
#[derive(Clone)]
pub struct Feed {
    inner: Arc<Inner>,
    store: Store,
}

/// A registered connection's handle, held by its WebSocket task.
pub struct Registration {
    pub id: u64,
    pub rx: mpsc::Receiver<Frame>,
    pub lagging: Arc<AtomicBool>,
    pub wake: Arc<Notify>,
}

/// Encodes a change in one format and variant.
fn encode(schema: &Schema, format: Format, c: &Change, v: Variant) -> Bytes {
    let table = schema.tables()[c.table].name.as_str();
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
    schema: &'a Schema,
    commit: &'a Commit,
    /// `[format][variant]` per change.
    cache: Vec<[[OnceLock<Bytes>; 3]; 2]>,
    encodes: u64,
}

impl<'a> Encoded<'a> {
    fn new(schema: &'a Schema, commit: &'a Commit) -> Self {
        Encoded {
            schema,
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
        let b = encode(self.schema, format, &self.commit.changes[i], v);
        let _ = slot.set(b.clone());
        b
    }
}

impl Inner {
    /// Queues a durable commit's deltas: for live subscriptions on their connections' queues,
    /// for pending ones in their collections.
    fn fan_out(&self, commit: &Commit) {
        let m = &self.metrics;
        m.commits.fetch_add(1, Relaxed);
        m.lag.record(commit.started.elapsed());
        let mut conns = self.conns.lock();
        if conns.is_empty() {
            return;
        }
        let mut enc = Encoded::new(&self.schema, commit);
        let version = commit.version.0;
        'conns: for Conn {
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
                p.bytes += parts.iter().map(Bytes::len).sum::<usize>();
                if p.bytes > CATCH_UP_BYTES_MAX {
                    // More than the one delta that follows the first frame may carry: as good
                    // as a full queue.
                    out.lag();
                    continue 'conns;
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
                    continue 'conns;
                }
                sub.version = version;
                m.deltas_sent.fetch_add(1, Relaxed);
            }
        }
        m.encodes.fetch_add(enc.encodes, Relaxed);
    }

    /// Registers a new connection.
    fn register(&self, format: Format) -> Registration {
        let (tx, rx) = mpsc::channel(CONNECTION_QUEUE_FRAMES);
        let id = self.next_id.fetch_add(1, Relaxed);
        let lagging = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Notify::new());
        self.conns.lock().insert(
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
        self.metrics.connections.fetch_add(1, Relaxed);
        Registration {
            id,
            rx,
            lagging,
            wake,
        }
    }

    /// Registers a subscription as pending (replacing any of the same name); returns the
    /// connection's format, or `None` when the connection is gone.
    fn pend(&self, conn: u64, name: &str, sub: &Sub) -> Option<Format> {
        let mut conns = self.conns.lock();
        let c = conns.get_mut(&conn)?;
        c.subs.remove(name);
        c.pending.insert(
            name.to_owned(),
            Pending {
                sub: sub.clone(),
                deltas: Vec::new(),
                bytes: 0,
            },
        );
        Some(c.format)
    }

    /// Makes a pending subscription live: queues its first frame (version, frame), then the
    /// commits collected since it was registered that the first frame does not hold, as one
    /// delta. A failed read leaves no subscription of that name.
    fn go_live(
        &self,
        conn: u64,
        name: String,
        first: Result<(u64, Frame), crate::store::StoreError>,
    ) -> Result<(), crate::store::StoreError> {
        let mut conns = self.conns.lock();
        let Some(c) = conns.get_mut(&conn) else {
            return Ok(());
        };
        let Some(Pending {
            mut sub, deltas, ..
        }) = c.pending.remove(&name)
        else {
            return Ok(());
        };
        let (version, frame) = first?;
        sub.version = version;
        let newer: Vec<&(u64, Vec<Bytes>)> = deltas.iter().filter(|(v, _)| *v > version).collect();
        if c.out.queue(frame)
            && let Some(&&(last, _)) = newer.last()
        {
            let refs: Vec<&Bytes> = newer.iter().flat_map(|(_, parts)| parts).collect();
            if c.out
                .queue(delta_frame(c.format, &name, version, last, &refs))
            {
                sub.version = last;
                self.metrics.deltas_sent.fetch_add(1, Relaxed);
            }
        }
        c.subs.insert(name, sub);
        Ok(())
    }
}

impl Feed {
    /// Starts fanning out the store's commits.
    pub fn start(store: Store) -> Feed {
        let feed = Feed {
            inner: Arc::new(Inner {
                schema: store.schema().clone(),
                conns: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                metrics: FeedMetrics::default(),
            }),
            store,
        };
        // The store keeps the listener; a weak reference lets the feed go before the store.
        let weak = Arc::downgrade(&feed.inner);
        feed.store.on_commit(move |commit| {
            let Some(inner) = weak.upgrade() else { return };
            // A panic here would stop the thread that answers writes; the fan-out's state may
            // be half-updated, so every connection resyncs instead.
            let fanned =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.fan_out(commit)));
            if fanned.is_err() {
                tracing::error!("the terminal feed failed on a commit; every subscriber resyncs");
                for c in inner.conns.lock().values() {
                    c.out.lag();
                }
            }
        });
        feed
    }

    pub fn store(&self) -> &Store {
        &self.store
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

    /// Registers a new connection.
    pub fn register(&self, format: Format) -> Registration {
        self.inner.register(format)
    }

    pub fn unregister(&self, id: u64) {
        if self.inner.conns.lock().remove(&id).is_some() {
            self.inner.metrics.connections.fetch_sub(1, Relaxed);
        }
    }

    /// Adds (or replaces) a subscription and queues its first frame: a catch-up delta from
    /// `since` when the log still holds it, else a snapshot; then the deltas of the commits
    /// fanned out while that frame was read (as one delta), so that none slips between it and
    /// the live deltas. Called by the connection's own task, one message at a time. A
    /// subscription of the same name stops at once; if the read fails, the client gets the
    /// error and no subscription of that name remains.
    pub fn subscribe(
        &self,
        conn: u64,
        name: String,
        sub: Sub,
        since: Option<u64>,
    ) -> Result<(), crate::store::StoreError> {
        let Some(format) = self.inner.pend(conn, &name, &sub) else {
            return Ok(());
        };
        // Every commit fanned out from here on is collected; every one fanned out before is
        // in what the read below sees (the store publishes a commit before delivering it).
        let first = self.first_frame(format, &name, &sub, since);
        self.inner.go_live(conn, name, first)
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
        let store = &self.store;
        if let Some(base) = since
            && let Some(entries) =
                store.changes_since(shared::Version(base), CATCH_UP_CHANGES_MAX)?
            && let Some(frame) = catch_up_frame(store, format, name, sub, base, &entries)
        {
            self.inner.metrics.catch_ups.fetch_add(1, Relaxed);
            return Ok(frame);
        }
        let names: Vec<&str> = sub
            .tables
            .iter()
            .map(|&t| store.schema().tables()[t].name.as_str())
            .collect();
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
            was_cold: false,
        };
        let part = encode(store.schema(), format, &change, variant);
        bytes += part.len();
        if bytes > CATCH_UP_BYTES_MAX {
            return None;
        }
        parts.push(part);
    }
    let refs: Vec<&Bytes> = parts.iter().collect();
    Some((version, delta_frame(format, name, base, version, &refs)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{Timestamp, Value};

    fn inner() -> Inner {
        Inner {
            schema: Arc::new(shared::pos::schema()),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            metrics: FeedMetrics::default(),
        }
    }

    /// A commit inserting one `order_header` row.
    fn commit(inner: &Inner, version: u64, id: &str, table_id: Value) -> Commit {
        let ti = inner.schema.table_index("order_header").unwrap();
        let columns = inner.schema.columns(ti).clone();
        let mut values = vec![Value::Null; columns.len()];
        values[columns.iter().position(|c| c == "table_id").unwrap()] = table_id;
        let row = Row {
            id: id.into(),
            version: 1,
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
            seq: None,
            columns,
            values,
        };
        Commit {
            version: shared::Version(version),
            changes: vec![Change {
                table: ti,
                op: EntryOp::Insert,
                row: Arc::new(row),
                before: None,
                changed: Vec::new(),
                was_cold: false,
            }],
            started: std::time::Instant::now(),
        }
    }

    fn sub(inner: &Inner) -> Sub {
        Sub {
            tables: vec![inner.schema.table_index("order_header").unwrap()],
            filter: Vec::new(),
            version: 0,
        }
    }

    fn json(frame: Frame) -> serde_json::Value {
        match frame {
            Frame::Text(t) => serde_json::from_str(&t).unwrap(),
            Frame::Binary(_) => panic!("a JSON connection got a binary frame"),
        }
    }

    fn ids(delta: &serde_json::Value) -> Vec<&str> {
        delta["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn a_pending_subscription_gets_the_commits_its_first_frame_lacks_as_one_delta() {
        let inner = inner();
        let mut reg = inner.register(Format::Json);
        inner.pend(reg.id, "s", &sub(&inner)).unwrap();
        // Fanned out while the first frame is read: v2 and v3 are in it, v4 and v5 are not.
        for (v, id) in [(2, "a"), (3, "b"), (4, "c"), (5, "d")] {
            inner.fan_out(&commit(&inner, v, id, Value::Null));
        }
        let first = Frame::Text(r#"{"type":"snapshot","version":3}"#.into());
        inner.go_live(reg.id, "s".into(), Ok((3, first))).unwrap();
        assert_eq!(json(reg.rx.try_recv().unwrap())["version"], 3);
        let delta = json(reg.rx.try_recv().unwrap());
        assert_eq!(
            (delta["base"].as_u64(), delta["version"].as_u64()),
            (Some(3), Some(5))
        );
        assert_eq!(ids(&delta), ["c", "d"]);
        // Live from there: the next commit's delta starts where that one ended.
        inner.fan_out(&commit(&inner, 6, "e", Value::Null));
        let live = json(reg.rx.try_recv().unwrap());
        assert_eq!(
            (live["base"].as_u64(), live["version"].as_u64()),
            (Some(5), Some(6))
        );
        assert_eq!(ids(&live), ["e"]);
        assert!(reg.rx.try_recv().is_err());
        assert_eq!(
            inner.metrics.encodes.load(Relaxed),
            5,
            "one encode per change"
        );
    }

    #[test]
    fn nothing_collected_past_the_first_frame_adds_no_delta() {
        let inner = inner();
        let mut reg = inner.register(Format::Json);
        inner.pend(reg.id, "s", &sub(&inner)).unwrap();
        inner.fan_out(&commit(&inner, 2, "a", Value::Null));
        let first = Frame::Text(r#"{"version":2}"#.into());
        inner.go_live(reg.id, "s".into(), Ok((2, first))).unwrap();
        assert_eq!(json(reg.rx.try_recv().unwrap())["version"], 2);
        assert!(reg.rx.try_recv().is_err());
    }

    #[test]
    fn a_failed_first_read_leaves_no_subscription() {
        let inner = inner();
        let mut reg = inner.register(Format::Json);
        inner.pend(reg.id, "s", &sub(&inner)).unwrap();
        let failed = Err(crate::store::StoreError::Closed);
        assert!(inner.go_live(reg.id, "s".into(), failed).is_err());
        inner.fan_out(&commit(&inner, 2, "a", Value::Null));
        assert!(reg.rx.try_recv().is_err());
        let c = &inner.conns.lock()[&reg.id];
        assert!(c.subs.is_empty() && c.pending.is_empty());
    }

    #[test]
    fn a_pending_subscription_that_collects_too_much_resyncs_its_connection() {
        let inner = inner();
        let reg = inner.register(Format::Json);
        inner.pend(reg.id, "s", &sub(&inner)).unwrap();
        let big = Value::Text("x".repeat(CATCH_UP_BYTES_MAX / 2));
        inner.fan_out(&commit(&inner, 2, "a", big.clone()));
        assert!(!reg.lagging.load(Relaxed));
        inner.fan_out(&commit(&inner, 3, "b", big));
        assert!(reg.lagging.load(Relaxed));
    }
}
