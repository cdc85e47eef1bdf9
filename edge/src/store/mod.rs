//! The edge's durable store: SQLite in WAL mode, one writer thread doing group commit with a
//! transactional outbox (the origin log) and its WAL fsync beside it (`durable`), a pool of
//! read connections and the in-memory hot tier.
//!
//! A `Store` is cheap to clone; all clones share one writer. Writes go through [`Store::commit`]
//! (async) or [`Store::commit_blocking`]; both return only after the group's fsync.

mod chunk;
mod durable;
mod error;
mod hot;
pub mod metrics;
mod prepare;
pub mod query;
mod rules;
mod sql;
mod txn;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};
use rusqlite::{Connection, OpenFlags};
use shared::log::{ChainHash, LogEntry, Segment, verify_chain};
use shared::{BranchId, OriginId, Row, Schema, Seq, Timestamp, Version};
use tokio::sync::{broadcast, mpsc, oneshot};

pub use durable::SyncGate;
pub use error::{OpenError, StoreError, TxnError};
pub use hot::HotTier;
pub use metrics::StoreMetrics;
pub use prepare::{Write, refused_by_kind};
pub use rules::{MONEY_ABS_MAX, QUANTITY_ABS_MAX};
pub use txn::{Applied, Change, Commit, Committed, Op, OpResult, Refusal, TXN_OPS_MAX, Txn};
pub use writer::LogStatus;

use sql::TableSql;
use writer::{Msg, Writer};

/// The source of wall-clock time for row timestamps and log stamps.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(d.as_micros() as i64)
    })
}

/// Most requests waiting for the writer; callers beyond it wait (back-pressure).
pub const QUEUE_REQUESTS_MAX: usize = 8192;
/// Most requests in one group commit.
pub const GROUP_REQUESTS_MAX: usize = 1024;
/// WAL frames past which the writer starts the WAL over: 32 MiB with 4 KiB pages.
pub const WAL_RESTART_FRAMES: u64 = 8_192;
/// Most rows a log page returns.
pub const LOG_PAGE_MAX: usize = 1000;
/// Most commits buffered for a slow [`Store::subscribe`] receiver before it is told it lagged.
pub const COMMIT_FEED_CAPACITY: usize = 4096;

const _: () = assert!(GROUP_REQUESTS_MAX <= QUEUE_REQUESTS_MAX);

/// How to open a store.
#[derive(Clone)]
pub struct StoreConfig {
    /// The SQLite file.
    pub path: PathBuf,
    pub branch: BranchId,
    pub schema: Arc<Schema>,
    pub queue_requests_max: usize,
    pub group_requests_max: usize,
    pub readers: usize,
    /// An open segment older than this is sealed.
    pub segment_age_ms: u64,
    /// Acked segments are kept this long before they are pruned.
    pub retention_ms: u64,
    /// How often the housekeeping thread checkpoints the WAL and ticks the writer.
    pub housekeeping_ms: u64,
    /// WAL frames (pages) past which the writer starts the WAL over between groups; the
    /// housekeeper truncates a WAL four times as long.
    pub wal_restart_frames: u64,
    pub clock: Clock,
    /// Test hook: holds the WAL fsyncs of commits until the test opens it.
    #[doc(hidden)]
    pub sync_gate: Option<Arc<SyncGate>>,
    /// Groups of at most this many requests are answered by the writer itself when nothing
    /// else waits to be answered (fsync inline); larger ones go to the answering thread, so
    /// that their fsync overlaps the next group.
    pub deliver_inline_max: usize,
}

impl StoreConfig {
    pub fn new(path: impl Into<PathBuf>, branch: BranchId, schema: Arc<Schema>) -> StoreConfig {
        StoreConfig {
            path: path.into(),
            branch,
            schema,
            queue_requests_max: QUEUE_REQUESTS_MAX,
            group_requests_max: GROUP_REQUESTS_MAX,
            readers: 4,
            segment_age_ms: 1000,
            retention_ms: 7 * 24 * 3600 * 1000,
            housekeeping_ms: 50,
            wal_restart_frames: WAL_RESTART_FRAMES,
            clock: system_clock(),
            sync_gate: None,
            deliver_inline_max: 4,
        }
    }
}

/// Runs `work` (a store read, which may wait for a pooled connection or at the durability
/// barrier) on tokio's blocking pool, off the threads that serve requests. A task the
/// shutting-down runtime cancelled is [`StoreError::Closed`].
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => done,
        Err(e) if e.is_cancelled() => Err(StoreError::Closed),
        Err(e) => Err(StoreError::Storage(format!("a read stopped: {e}"))),
    }
}

/// A function the store calls with each durable commit (see [`Store::on_commit`]).
pub(crate) type CommitListener = Box<dyn Fn(&Commit) + Send + Sync>;

/// State shared by the writer and readers.
pub(crate) struct Shared {
    pub hot: RwLock<HotTier>,
    pub status: Mutex<LogStatus>,
    pub commits: broadcast::Sender<Arc<Commit>>,
    /// Called with every durable commit, in order, on the thread that delivers it.
    pub listeners: RwLock<Vec<CommitListener>>,
    pub metrics: StoreMetrics,
    /// Groups handed to the answering thread and not yet answered.
    pub deliveries_pending: std::sync::atomic::AtomicUsize,
    /// Which commits are durable; every read waits at its barrier (see `durable`).
    pub durability: durable::Durability,
}

/// A small pool of read-only connections.
struct ReadPool {
    idle: Mutex<Vec<Connection>>,
    available: Condvar,
}

impl ReadPool {
    fn with<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        let conn = {
            let mut idle = self.idle.lock();
            loop {
                if let Some(c) = idle.pop() {
                    break c;
                }
                self.available.wait(&mut idle);
            }
        };
        let out = f(&conn);
        self.idle.lock().push(conn);
        self.available.notify_one();
        out
    }
}

struct Inner {
    config: StoreConfig,
    origin: OriginId,
    sql: Arc<Vec<TableSql>>,
    shared: Arc<Shared>,
    readers: ReadPool,
    tx: Mutex<Option<mpsc::Sender<Msg>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stopping: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Inner {
    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.tx.lock().take();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}

/// The edge's store. See the module documentation.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// A consistent view of the hot rows at one commit version.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub version: Version,
    pub tables: Vec<(String, Vec<Arc<Row>>)>,
}

/// A page of the origin log.
#[derive(Debug, Clone)]
pub struct LogPage {
    /// `(commit version, entry)` in seq order.
    pub entries: Vec<(Version, LogEntry)>,
    pub has_more: bool,
}

fn open_connection(config: &StoreConfig, writer: bool) -> Result<Connection, OpenError> {
    let flags = if writer {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(&config.path, flags)?;
    sql::configure(&conn, writer)?;
    Ok(conn)
}

impl Store {
    /// Opens (creating if needed) the store, restores the log position and fills the hot tier.
    pub fn open(config: StoreConfig) -> Result<Store, OpenError> {
        let schema = config.schema.clone();
        let conn = open_connection(&config, true)?;
        sql::migrate(&conn, &schema, config.branch.as_str())?;
        let sql: Arc<Vec<TableSql>> = Arc::new(schema.tables().iter().map(TableSql::new).collect());
        let version = Version(sql::get_meta::<i64>(&conn, "version")?.unwrap_or(0) as u64);
        let hot = load_hot(&conn, &schema, &sql, version)?;
        // From here on the writer's COMMIT only writes the WAL; `durable` fsyncs it beside
        // the writer, before anything committed is answered or read.
        // The database's path as SQLite resolved it (symlinks followed), so that the fsync
        // reaches the WAL SQLite writes.
        let resolved = conn
            .path()
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| {
                OpenError::Incompatible("SQLite reports no file for the database".into())
            })?;
        let durability = durable::Durability::open(&resolved, config.sync_gate.clone())?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let (commits, _) = broadcast::channel(COMMIT_FEED_CAPACITY);
        let shared = Arc::new(Shared {
            hot: RwLock::new(hot),
            status: Mutex::new(
                writer::load_log_state(&conn, &OriginId::from(&config.branch), &schema)?.0,
            ),
            commits,
            listeners: RwLock::new(Vec::new()),
            metrics: StoreMetrics::default(),
            deliveries_pending: std::sync::atomic::AtomicUsize::new(0),
            durability,
        });
        /// Groups committed but not yet answered; beyond it the writer waits.
        const DELIVERIES_MAX: usize = 64;
        let (deliveries, to_answer) = crossbeam_channel::bounded(DELIVERIES_MAX);
        let writer = Writer::open(
            conn,
            &config,
            schema.clone(),
            sql.clone(),
            shared.clone(),
            deliveries,
        )?;
        debug_assert!(writer.conn().is_autocommit());
        let readers = (0..config.readers.max(1))
            .map(|_| open_connection(&config, false))
            .collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = mpsc::channel(config.queue_requests_max.max(1));
        let stopping = Arc::new(AtomicBool::new(false));
        let writer_thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx))?;
        let answerer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("store-answer".into())
                .spawn(move || writer::answer(to_answer, shared))?
        };
        let housekeeping = {
            let conn = open_connection(&config, true)?;
            let tx = tx.clone();
            let stopping = stopping.clone();
            let every = Duration::from_millis(config.housekeeping_ms.max(1));
            let shared = shared.clone();
            let truncate_frames = config.wal_restart_frames.saturating_mul(4);
            std::thread::Builder::new()
                .name("store-housekeeping".into())
                .spawn(move || {
                    housekeep(conn, tx, stopping, every, truncate_frames, &shared.metrics)
                })?
        };
        Ok(Store {
            inner: Arc::new(Inner {
                origin: OriginId::from(&config.branch),
                config,
                sql,
                shared,
                readers: ReadPool {
                    idle: Mutex::new(readers),
                    available: Condvar::new(),
                },
                tx: Mutex::new(Some(tx)),
                threads: Mutex::new(vec![writer_thread, answerer, housekeeping]),
                stopping,
            }),
        })
    }

    pub fn schema(&self) -> &Arc<Schema> {
        &self.inner.config.schema
    }

    pub fn branch(&self) -> &BranchId {
        &self.inner.config.branch
    }

    pub fn origin(&self) -> &OriginId {
        &self.inner.origin
    }

    fn sender(&self) -> Result<mpsc::Sender<Msg>, StoreError> {
        self.inner.tx.lock().clone().ok_or(StoreError::Closed)
    }

    fn closed() -> TxnError {
        TxnError {
            op_index: None,
            error: StoreError::Closed,
        }
    }

    /// Commits a transaction; returns after the group's fsync. Checks against the schema
    /// happen here, in the caller's task, before the transaction queues for the writer.
    pub async fn commit(&self, txn: Txn) -> Result<Committed, TxnError> {
        let txn = prepare::prepare(self.schema(), txn)?;
        let (reply, rx) = oneshot::channel();
        let tx = self.sender().map_err(|_| Self::closed())?;
        tx.send(Msg::Commit { txn, reply })
            .await
            .map_err(|_| Self::closed())?;
        let (result, spent) = rx.await.map_err(|_| Self::closed())?;
        drop(spent);
        result
    }

    /// Commits a transaction from a thread outside any async runtime.
    pub fn commit_blocking(&self, txn: Txn) -> Result<Committed, TxnError> {
        let txn = prepare::prepare(self.schema(), txn)?;
        let (reply, rx) = oneshot::channel();
        let tx = self.sender().map_err(|_| Self::closed())?;
        tx.blocking_send(Msg::Commit { txn, reply })
            .map_err(|_| Self::closed())?;
        let (result, spent) = rx.blocking_recv().map_err(|_| Self::closed())?;
        drop(spent);
        result
    }

    fn request_blocking<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Msg,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .blocking_send(make(reply))
            .map_err(|_| StoreError::Closed)?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// Seals the open segment now (the sync client does this before it sends).
    pub fn seal_blocking(&self) -> Result<(), StoreError> {
        self.request_blocking(|reply| Msg::SealNow { reply })
    }

    /// Records that the hub holds everything up to `seq` durably; retention may now prune it.
    pub fn set_acked_blocking(&self, seq: Seq) -> Result<(), StoreError> {
        self.request_blocking(|reply| Msg::SetAcked { seq, reply })
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Msg,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Records that the hub holds everything up to `seq` durably (from async code).
    pub async fn set_acked(&self, seq: Seq) -> Result<(), StoreError> {
        self.request(|reply| Msg::SetAcked { seq, reply }).await
    }

    /// Applies a verified segment of the hub's feed (its decoded entries) and records the
    /// feed position, in one transaction; terminals see the rows as an ordinary commit.
    pub async fn apply_feed(
        &self,
        position: shared::wire::Position,
        entries: Vec<LogEntry>,
    ) -> Result<(), StoreError> {
        self.request(|reply| Msg::ApplyFeed {
            position,
            entries,
            reply,
        })
        .await
    }

    /// The hub's durable position in this branch's log as last recorded (seq and the hash
    /// of the segment ending there).
    pub fn acked_position(&self) -> Result<shared::wire::Position, StoreError> {
        let seq = self.log_status().acked_seq;
        let origin = self.inner.origin.clone();
        if seq == Seq::ZERO {
            return Ok(shared::wire::Position::genesis(&origin));
        }
        let hash: Option<Vec<u8>> = self.with_reader(|conn| {
            conn.prepare_cached("SELECT hash FROM _segments WHERE last_seq = ?1")?
                .query_row([seq.0 as i64], |r| r.get(0))
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })
        })?;
        let hash = match hash {
            Some(h) => h,
            None => self
                .with_reader(|conn| sql::get_meta::<Vec<u8>>(conn, "pruned_hash"))?
                .ok_or_else(|| StoreError::Storage(format!("no hash for acked seq {seq}")))?,
        };
        let hash = ChainHash(
            hash.try_into()
                .map_err(|_| StoreError::Storage("a stored hash is not 32 bytes".into()))?,
        );
        Ok(shared::wire::Position { origin, seq, hash })
    }

    /// Subscribes to commits as they become durable, through a channel.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Commit>> {
        self.inner.shared.commits.subscribe()
    }

    /// Calls `listener` with every commit from now on, in commit order, once it is durable
    /// and before its callers are answered, on the thread that delivers it (the writer's or
    /// the answering thread): the terminal feed's source. The listener must be quick and must
    /// not read from the store, whose reads may wait for a delivery that waits for it.
    pub fn on_commit(&self, listener: impl Fn(&Commit) + Send + Sync + 'static) {
        self.inner.shared.listeners.write().push(Box::new(listener));
    }

    /// Returns what was just read from the published state (hot tier, log status) once
    /// every commit it may include is durable: the writer publishes a commit before its
    /// fsync, and readers wait here instead (see `durable`).
    fn durable<T>(&self, read: T) -> T {
        self.inner.shared.durability.barrier_published();
        read
    }

    /// Waits until every commit that has started is durable. Callers about to take a lock
    /// under which they will read call it first, so that they rarely wait while holding it.
    pub fn wait_durable(&self) {
        self.inner.shared.durability.barrier();
    }

    /// The last committed version visible to readers.
    pub fn version(&self) -> Version {
        let v = self.inner.shared.hot.read().version();
        self.durable(v)
    }

    pub fn log_status(&self) -> LogStatus {
        let status = self.inner.shared.status.lock().clone();
        self.durable(status)
    }

    pub fn metrics(&self) -> &StoreMetrics {
        &self.inner.shared.metrics
    }

    fn table_index(&self, table: &str) -> Result<usize, StoreError> {
        self.schema()
            .table_index(table)
            .ok_or_else(|| StoreError::UnknownTable(table.chars().take(64).collect()))
    }

    /// One row by id: from the hot tier when it is there, else from SQLite.
    pub fn get(&self, table: &str, id: &str) -> Result<Option<Arc<Row>>, StoreError> {
        let ti = self.table_index(table)?;
        {
            let hot = self.inner.shared.hot.read();
            let found = hot.get(ti, id).cloned();
            if found.is_some() || hot.is_complete(ti) {
                drop(hot);
                return Ok(self.durable(found));
            }
        }
        self.with_reader(|conn| {
            writer::read_row(conn, self.schema(), &self.inner.sql, ti, id).map(|r| r.map(Arc::new))
        })
    }

    /// Every row of a table, from SQLite (tests and tools; terminals use snapshots and queries).
    pub fn scan(&self, table: &str) -> Result<Vec<Row>, StoreError> {
        let ti = self.table_index(table)?;
        self.with_reader(|conn| {
            let mut stmt =
                conn.prepare_cached(&format!("{} ORDER BY id", self.inner.sql[ti].select_all))?;
            let rows = stmt
                .query_map([], |r| sql::row_from_sql(self.schema(), ti, r))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    /// The hot rows of the named tables (all tables when `None`) at one version.
    pub fn snapshot(&self, tables: Option<&[&str]>) -> Result<Snapshot, StoreError> {
        let indexes: Vec<usize> = match tables {
            Some(names) => names
                .iter()
                .map(|n| self.table_index(n))
                .collect::<Result<_, _>>()?,
            None => (0..self.schema().tables().len()).collect(),
        };
        let hot = self.inner.shared.hot.read();
        let snapshot = Snapshot {
            version: hot.version(),
            tables: indexes
                .into_iter()
                .filter(|&i| hot.caches(i))
                .map(|i| {
                    let mut rows: Vec<Arc<Row>> = hot.rows(i).cloned().collect();
                    rows.sort_by(|a, b| a.id.cmp(&b.id));
                    (self.schema().tables()[i].name.clone(), rows)
                })
                .collect(),
        };
        drop(hot);
        Ok(self.durable(snapshot))
    }

    /// Runs a read query (see [`query`]) on a pooled read connection.
    pub fn query(&self, spec: &query::QuerySpec) -> Result<query::QueryResult, StoreError> {
        if spec.table >= self.schema().tables().len() {
            return Err(StoreError::UnknownTable(spec.table.to_string()));
        }
        let select_all = &self.inner.sql[spec.table].select_all;
        self.with_reader(|conn| query::run(conn, self.schema(), select_all, spec))
    }

    /// Number of rows in the hot tier.
    pub fn hot_rows(&self) -> usize {
        self.inner.shared.hot.read().len()
    }

    /// Runs `f` with a read-only connection from the pool.
    pub fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        let read = self.inner.readers.with(f);
        // SQLite shows a COMMIT as soon as it returns, before its fsync.
        self.inner.shared.durability.barrier();
        read
    }

    /// Entries of the origin log after `after`, at most `limit` (≤ [`LOG_PAGE_MAX`]).
    pub fn log_page(&self, after: Seq, limit: usize) -> Result<LogPage, StoreError> {
        let limit = limit.min(LOG_PAGE_MAX);
        let raw = self.with_reader(|conn| {
            writer::read_entries_max(conn, after.next(), Seq(u64::MAX >> 1), limit + 1)
        })?;
        let has_more = raw.len() > limit;
        let entries = raw
            .into_iter()
            .take(limit)
            .map(|(_, version, bytes)| {
                LogEntry::decode(&bytes, self.schema())
                    .map(|e| (version, e))
                    .map_err(|e| StoreError::Storage(format!("log entry does not decode: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(LogPage { entries, has_more })
    }

    /// The changes of the commits after `since` up to the current version, in order, if the
    /// log still holds all of them and there are at most `max`; `None` when a snapshot is
    /// needed instead (pruned, too many, or a `since` this edge never issued). Commits after
    /// the current version as read at the start are left out whole, never cut.
    pub fn changes_since(
        &self,
        since: Version,
        max: usize,
    ) -> Result<Option<Vec<(Version, LogEntry)>>, StoreError> {
        let now = self.version();
        if since > now {
            return Ok(None);
        }
        self.with_reader(|conn| {
            // The first chunk holding a commit after `since`, and whether the log reaches back
            // to it: the commit right after `since` must not have been pruned.
            let first: Option<(i64, i64)> = conn
                .prepare_cached(
                    "SELECT first_seq, last_seq FROM _log WHERE last_version > ?1 ORDER BY last_seq LIMIT 1",
                )?
                .query_row([since.0 as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })?;
            let Some((first_seq, _)) = first else {
                // Nothing after `since` in the log: right only if nothing was committed.
                return Ok((since == now).then(Vec::new));
            };
            let limit = max.saturating_add(64);
            let entries = writer::read_entries_max(
                conn,
                Seq(first_seq as u64),
                Seq(u64::MAX >> 1),
                limit,
            )?;
            // The read ends at `limit` entries, maybe inside a commit: it is whole up to
            // `now` only if it reached past `now` or the end of the log.
            let mut whole = entries.len() < limit;
            let mut out = Vec::new();
            let mut expected = Version(since.0 + 1);
            for (_, version, bytes) in entries {
                if version <= since {
                    continue;
                }
                if version > now {
                    // Committed after `now` was read: the caller gets it from the feed.
                    whole = true;
                    break;
                }
                if version.0 > expected.0 {
                    // A commit with no entries of this origin's log is missing from it.
                    return Ok(None);
                }
                expected = Version(version.0 + 1);
                if out.len() == max {
                    return Ok(None);
                }
                let entry = LogEntry::decode(&bytes, self.schema())
                    .map_err(|e| StoreError::Storage(format!("log entry does not decode: {e}")))?;
                out.push((version, entry));
            }
            // Every commit up to the version seen at the start must be there, whole.
            if !whole || out.last().map_or(since, |(v, _)| *v) < now {
                return Ok(None);
            }
            Ok(Some(out))
        })
    }

    /// Sealed segments whose entries come after `after`, at most `max` of them, rebuilt from
    /// the stored entry bytes (the same bytes that were hashed).
    pub fn segments_after(&self, after: Seq, max: usize) -> Result<Vec<Segment>, StoreError> {
        let origin = self.inner.origin.clone();
        self.with_reader(|conn| {
            let heads: Vec<(i64, i64, Vec<u8>, Vec<u8>)> = conn
                .prepare_cached(
                    "SELECT first_seq, last_seq, prev_hash, hash FROM _segments WHERE last_seq > ?1 ORDER BY last_seq LIMIT ?2",
                )?
                .query_map(rusqlite::params![after.0 as i64, max as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut out = Vec::with_capacity(heads.len());
            for (first, last, prev, hash) in heads {
                let entries = writer::read_entries(conn, Seq(first as u64), Seq(last as u64))?;
                if entries.len() as i64 != last - first + 1 {
                    return Err(StoreError::Storage(format!("segment {first}..={last} lacks entries")));
                }
                let hash32 = |v: Vec<u8>| {
                    v.try_into()
                        .map(ChainHash)
                        .map_err(|_| StoreError::Storage("a stored hash is not 32 bytes".into()))
                };
                out.push(Segment {
                    origin: origin.clone(),
                    first_seq: Seq(first as u64),
                    last_seq: Seq(last as u64),
                    prev_hash: hash32(prev)?,
                    hash: hash32(hash)?,
                    body: shared::log::segment_body(entries.iter().map(|(_, _, b)| b.as_slice())),
                });
            }
            Ok(out)
        })
    }

    /// Verifies every stored segment from the pruned point (or genesis) to the head, and that
    /// the unsealed tail is contiguous. Returns the last sealed seq.
    pub fn verify_log(&self) -> Result<Seq, StoreError> {
        let status = self.log_status();
        let start = self.with_reader(|conn| -> Result<ChainHash, StoreError> {
            Ok(match sql::get_meta::<Vec<u8>>(conn, "pruned_hash")? {
                Some(h) => ChainHash(
                    h.try_into()
                        .map_err(|_| StoreError::Storage("bad pruned hash".into()))?,
                ),
                None => ChainHash::genesis(&self.inner.origin),
            })
        })?;
        let mut head = start;
        let mut after = status.pruned_seq;
        loop {
            let segs = self.segments_after(after, 64)?;
            let Some(last) = segs.last() else { break };
            after = last.last_seq;
            head = verify_chain(head, &segs, self.schema()).map_err(|e| {
                StoreError::Storage(format!("log chain at seq {}: {e}", segs[0].first_seq))
            })?;
        }
        if after < status.sealed_seq || head != status.head {
            return Err(StoreError::Storage(
                "the stored chain does not reach the head".into(),
            ));
        }
        Ok(after)
    }

    /// Creates a terminal token for `role` (see [`crate::tokens`]) on a short-lived connection:
    /// tokens are local to this edge and never enter the replicated log.
    pub fn create_token(&self, role: shared::Role) -> Result<String, StoreError> {
        let conn = open_connection(&self.inner.config, true)
            .map_err(|e| StoreError::Storage(e.to_string()))?;
        crate::tokens::create(&conn, role, (self.inner.config.clock)().0)
            .map_err(|e| StoreError::Storage(e.to_string()))
    }

    /// The role of a bearer token, if it is known.
    pub fn token_role(&self, token: &str) -> Result<Option<shared::Role>, StoreError> {
        // Tokens are written by their own connection with `synchronous=FULL`, never by the
        // writer, so this read waits for no fsync.
        Ok(self
            .inner
            .readers
            .with(|conn| crate::tokens::lookup(conn, token))?)
    }

    /// Stops the writer after the requests already queued, and waits for it.
    pub fn close(&self) {
        self.inner.stop();
    }
}

/// Checkpoints the WAL on its own connection so that commits never pay for it, and ticks the
/// writer for age-based sealing and pruning. It reports the WAL's length to the writer, which
/// starts the WAL over between groups (see `Writer::restart_wal`); a WAL past
/// `truncate_frames` all the same (the writer could not restart it: a reader held an old
/// snapshot throughout) is truncated here, which blocks the writer while it runs.
fn housekeep(
    conn: Connection,
    tx: mpsc::Sender<Msg>,
    stopping: Arc<AtomicBool>,
    every: Duration,
    truncate_frames: u64,
    metrics: &StoreMetrics,
) {
    let mut ticks = 0u64;
    while !stopping.load(Ordering::SeqCst) {
        std::thread::park_timeout(every);
        // A busy checkpoint (the writer is running one) reports no length: keep the last.
        if let Ok((0, log_frames, _)) = sql::wal_checkpoint(&conn, "PASSIVE") {
            let log_frames = log_frames.max(0) as u64;
            metrics.wal_frames.store(log_frames, Ordering::Relaxed);
            if log_frames > truncate_frames
                && let Ok((0, _, _)) = sql::wal_checkpoint(&conn, "TRUNCATE")
            {
                metrics.wal_truncates.fetch_add(1, Ordering::Relaxed);
            }
        }
        ticks += 1;
        if ticks.is_multiple_of(5) {
            match tx.try_send(Msg::Tick) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    }
}

/// Fills the hot tier at start-up with targeted queries: rows of `all` tables, rows not
/// excluded by an `unless` rule, and the children of hot parents by their index.
fn load_hot(
    conn: &Connection,
    schema: &Schema,
    sql: &[TableSql],
    version: Version,
) -> Result<HotTier, OpenError> {
    use shared::HotRule;
    let mut hot = HotTier::new(schema, version);
    for (ti, t) in schema.tables().iter().enumerate() {
        let (query, params): (String, Vec<rusqlite::types::Value>) = match &t.hot {
            HotRule::All => (sql[ti].select_all.clone(), vec![]),
            HotRule::Unless { column, values } => {
                let marks: Vec<String> = (1..=values.len()).map(|i| format!("?{i}")).collect();
                (
                    format!(
                        "{} WHERE {c} IS NULL OR {c} NOT IN ({})",
                        sql[ti].select_all,
                        marks.join(", "),
                        c = sql::quote(column)
                    ),
                    values.iter().map(sql::value_to_sql).collect(),
                )
            }
            HotRule::None | HotRule::WithParent { .. } => continue,
        };
        let mut stmt = conn.prepare(&query)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(params), |r| {
                sql::row_from_sql(schema, ti, r)
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for r in rows {
            hot.load(ti, Arc::new(r));
        }
    }
    for (ti, t) in schema.tables().iter().enumerate() {
        if let HotRule::WithParent { column, table } = &t.hot {
            let parent = schema.table_index(table).expect("validated parent");
            let parent_ids: Vec<String> = hot.rows(parent).map(|r| r.id.clone()).collect();
            let q = format!("{} WHERE {} = ?1", sql[ti].select_all, sql::quote(column));
            let mut stmt = conn.prepare(&q)?;
            for pid in parent_ids {
                let rows = stmt
                    .query_map([&pid], |r| sql::row_from_sql(schema, ti, r))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                for r in rows {
                    hot.load(ti, Arc::new(r));
                }
            }
        }
    }
    Ok(hot)
}
