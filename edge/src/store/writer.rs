//! The writer thread: it owns the write connection and performs group commit. Requests that
//! wait in the queue are applied in one SQLite transaction with one fsync for the group; one
//! caller's failure never fails its neighbours (a request that fails part-way has the group
//! re-run with a savepoint around each request, see `commit_group`). Every
//! changed row appends its entry to the origin log in the same transaction (transactional
//! outbox); segments are sealed between requests once they are full, or old.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crdts::VClock;
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};
use shared::log::{
    ChainHash, ENTRY_BYTES_MAX, EntryOp, LogEntry, LogEntryRef, SEGMENT_BYTES_TARGET,
    SEGMENT_ENTRIES_TARGET, Segment, TXN_BYTES_MAX, TXN_ENTRIES_MAX, chain_hash, segment_body,
};
use shared::merge::SharedRow;
use shared::schema::{Owner, Schema, TableKind};
use shared::wire::Position;
use shared::{Fields, Hlc, HlcClock, OriginId, Row, Seq, Timestamp, Value, Version};
use tokio::sync::{mpsc, oneshot};

use super::chunk;
use super::error::{OpenError, StoreError, TxnError};
use super::prepare::{Prepared, PreparedOp};
use super::rules::{self, PosRules};
use super::sql::{self, TableSql};
use super::txn::{Applied, Change, Commit, Committed, OpResult};
use super::{Clock, Shared, StoreConfig};

pub(crate) type Reply<T> = oneshot::Sender<T>;

/// A commit's answer. The transaction travels back so that the caller's thread, not the
/// writer, frees it.
pub(crate) type Answer = (Result<Committed, TxnError>, Prepared);

pub(crate) enum Msg {
    Commit {
        txn: Prepared,
        reply: Reply<Answer>,
    },
    /// Periodic housekeeping: seal an old open segment, prune acked segments.
    Tick,
    SealNow {
        reply: Reply<Result<(), StoreError>>,
    },
    SetAcked {
        seq: Seq,
        reply: Reply<Result<(), StoreError>>,
    },
    /// Rows from the hub's feed (head-office and shared rows) and the feed position they
    /// bring the edge to, applied in one transaction.
    ApplyFeed {
        position: Position,
        entries: Vec<LogEntry>,
        reply: Reply<Result<(), StoreError>>,
    },
}

/// A committed group's answers and its commits for the feed. Waking hundreds of waiting
/// callers costs a system call each; a separate thread does it so that the writer can start
/// the next group at once.
pub(crate) struct Delivery {
    answers: Vec<(Reply<Answer>, Answer)>,
    commits: Vec<Commit>,
    /// The durability ticket of the group's COMMIT: nothing is delivered before it is durable.
    ticket: u64,
    /// When the group started.
    started: Instant,
}

impl Delivery {
    /// Publishes the commits, then answers: a caller holding its answer can count on its
    /// commit being in the feed already.
    pub(crate) fn deliver(self, shared: &Shared) {
        if !self.commits.is_empty() {
            let listeners = shared.listeners.read();
            let channel = shared.commits.receiver_count() > 0;
            for c in self.commits {
                for listen in listeners.iter() {
                    listen(&c);
                }
                if channel {
                    // A send error only means the last receiver just went.
                    let _ = shared.commits.send(Arc::new(c));
                }
            }
        }
        if self.answers.is_empty() {
            return;
        }
        for (reply, answer) in self.answers {
            let _ = reply.send(answer);
        }
        shared.metrics.answered.record(self.started.elapsed());
    }
}

impl Drop for Writer {
    /// However the writer stops (a panic included), what it committed is made durable, so
    /// that no reader waits forever for a ticket nobody will sync.
    fn drop(&mut self) {
        let committed = self.shared.durability.committed();
        self.shared.durability.sync(committed, &self.shared.metrics);
    }
}

/// Makes groups durable and answers them, in commit order, until the writer hangs up: one
/// fsync covers every group waiting here, while the writer already applies the next ones.
pub(crate) fn answer(rx: crossbeam_channel::Receiver<Delivery>, shared: Arc<Shared>) {
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        batch.extend(rx.try_iter());
        let upto = batch.iter().map(|d| d.ticket).max().unwrap_or(0);
        shared.durability.sync(upto, &shared.metrics);
        for d in batch.drain(..) {
            d.deliver(&shared);
            shared.deliveries_pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The origin log's position, as the writer keeps it and as readers see it.
#[derive(Debug, Clone)]
pub struct LogStatus {
    /// The last committed version.
    pub version: Version,
    /// The last seq written to the log (0: none).
    pub last_seq: Seq,
    /// The last seq inside a sealed segment.
    pub sealed_seq: Seq,
    /// The hash of the last sealed segment (or genesis).
    pub head: ChainHash,
    /// Entries up to here are durable at the hub (as recorded by the sync client).
    pub acked_seq: Seq,
    /// Entries up to here were removed by retention.
    pub pruned_seq: Seq,
    /// How far the hub's feed has been applied here.
    pub feed: Position,
}

/// The open (not yet sealed) segment: encoded entries `sealed_seq+1 ..= last_seq` with their
/// commit versions. Entries from `flushed` on are not yet written to `_log`; they are written
/// as one chunk at the end of the group (or when the segment is sealed).
#[derive(Debug, Default)]
pub(crate) struct OpenSegment {
    entries: Vec<(Version, Vec<u8>)>,
    flushed: usize,
    bytes: usize,
    since: Option<Timestamp>,
    /// It holds an entry of a priority table (payments): sealed at the end of the group,
    /// so that it leaves for the hub at once instead of waiting for the segment to age.
    priority: bool,
}

/// A shared row's write stamp: the clock that travels with its log entry, and its HLC.
struct Stamp {
    clock: VClock<OriginId>,
    hlc: Hlc,
}

/// What a request may need to undo in memory when its savepoint rolls back.
struct Mark {
    status: LogStatus,
    open_len: usize,
    open_bytes: usize,
    open_since: Option<Timestamp>,
    hlc: Hlc,
}

pub(crate) struct Writer {
    conn: Connection,
    schema: Arc<Schema>,
    sql: Arc<Vec<TableSql>>,
    origin: OriginId,
    shared: Arc<Shared>,
    rules: Option<PosRules>,
    clock: Clock,
    hlc: HlcClock,
    status: LogStatus,
    open: OpenSegment,
    ids: IdGen,
    deliveries: crossbeam_channel::Sender<Delivery>,
    group_requests_max: usize,
    deliver_inline_max: usize,
    segment_age_us: i64,
    retention_us: i64,
    wal_restart_frames: u64,
    /// When a segment was last sealed: payments seal early at most once per
    /// `PRIORITY_SEAL_GAP_US`, so a busy till does not cut the log into one-entry segments.
    last_seal: Timestamp,
    /// By table: whether it may have a tombstone. An insert into a table without any skips
    /// the tombstone lookup. Set before a tombstone is written and never cleared (a
    /// tombstone rolled back only costs lookups).
    tombstoned: Vec<bool>,
    /// Updates that set only the columns they change.
    partial_updates: sql::PartialUpdates,
    /// Groups started so far.
    groups: u64,
    /// Multi-operation requests run inside savepoints until this group (see `commit_group`).
    batch_savepoints_until: u64,
    /// Hashes of `(table, id)` of the rows this group's finished requests wrote: the hot tier
    /// does not show them yet (see `row_now`). A collision only costs a SQLite read.
    touched: std::collections::HashSet<u64, foldhash::fast::FixedState>,
}

/// The key of a row in `Writer::touched`.
fn touched_key(table: usize, id: &str) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0).hash_one((table, id))
}

/// How many groups after a re-run keep multi-operation requests inside savepoints.
const BATCH_SAVEPOINT_GROUPS: u64 = 64;

/// The shortest gap between two early (payment) seals; a payment waits at most this plus a
/// housekeeping tick before its segment is sealed.
const PRIORITY_SEAL_GAP_US: i64 = 20_000;

/// Per-request scratch: its changes, the entries it appended, the orders whose totals it
/// dirtied.
pub(crate) struct Scratch<'a> {
    actor: &'a str,
    pub(crate) now: Timestamp,
    version: Version,
    changes: Vec<Change>,
    entries: usize,
    bytes: usize,
    /// Whether a statement of this request changed the database.
    wrote: bool,
    /// Per order, the change to its `total_amount` and `paid_amount` this request made,
    /// written once per order when the request ends (or when the order itself is updated).
    order_deltas: BTreeMap<String, (i128, i128)>,
}

/// Why a request did not apply.
enum RequestError {
    Failed(TxnError),
    /// It failed after writing, without a savepoint to undo its writes.
    NeedsSavepoint,
}

enum GroupError {
    Store(StoreError),
    NeedsSavepoints,
}

impl From<StoreError> for GroupError {
    fn from(e: StoreError) -> Self {
        GroupError::Store(e)
    }
}

impl From<rusqlite::Error> for GroupError {
    fn from(e: rusqlite::Error) -> Self {
        GroupError::Store(e.into())
    }
}

fn fail(op_index: usize) -> impl FnOnce(StoreError) -> TxnError {
    move |error| TxnError {
        op_index: Some(op_index),
        error,
    }
}

impl Writer {
    pub(crate) fn open(
        conn: Connection,
        config: &StoreConfig,
        schema: Arc<Schema>,
        sql: Arc<Vec<TableSql>>,
        shared: Arc<Shared>,
        deliveries: crossbeam_channel::Sender<Delivery>,
    ) -> Result<Writer, OpenError> {
        let origin = OriginId::from(&config.branch);
        let (status, open, hlc) = load_log_state(&conn, &origin, &schema)?;
        *shared.status.lock() = status.clone();
        // One index probe per table: `_tombstones` is keyed by (table, id) and only grows.
        let tombstoned = {
            let mut any = conn.prepare("SELECT 1 FROM _tombstones WHERE tbl = ?1 LIMIT 1")?;
            let mut flags = Vec::with_capacity(schema.tables().len());
            for t in schema.tables() {
                flags.push(any.exists([&t.name])?);
            }
            flags
        };
        Ok(Writer {
            tombstoned,
            partial_updates: sql::PartialUpdates::default(),
            groups: 0,
            batch_savepoints_until: 0,
            touched: Default::default(),
            rules: PosRules::for_schema(&schema),
            conn,
            schema,
            sql,
            origin,
            shared,
            clock: config.clock.clone(),
            hlc: HlcClock::starting_after(hlc),
            status,
            open,
            ids: IdGen::new(),
            deliveries,
            group_requests_max: config.group_requests_max,
            deliver_inline_max: config.deliver_inline_max,
            segment_age_us: config.segment_age_ms as i64 * 1000,
            retention_us: config.retention_ms as i64 * 1000,
            wal_restart_frames: config.wal_restart_frames.max(1),
            last_seal: Timestamp(0),
        })
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The writer loop: runs until every sender is gone.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut group = Vec::with_capacity(self.group_requests_max);
        let mut other = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Commit { txn, reply } => group.push((txn, reply)),
                    m => other.push(m),
                }
                if group.len() < self.group_requests_max {
                    next = rx.try_recv().ok();
                }
            }
            if !group.is_empty() {
                self.commit_group(&mut group);
            }
            for m in other.drain(..) {
                self.handle_other(m);
            }
        }
        tracing::debug!("store writer stopped");
    }

    fn handle_other(&mut self, msg: Msg) {
        match msg {
            Msg::Commit { .. } => unreachable!("commits are grouped"),
            Msg::Tick => {
                let now = (self.clock)();
                let old = self
                    .open
                    .since
                    .is_some_and(|t| now.0 - t.0 >= self.segment_age_us)
                    || (self.open.priority && now.0 - self.last_seal.0 >= PRIORITY_SEAL_GAP_US);
                if old && let Err(e) = self.in_txn(|w| w.seal(now)) {
                    tracing::error!("sealing an old segment failed: {e}");
                }
                if let Err(e) = self.prune(now) {
                    tracing::error!("pruning the log failed: {e}");
                }
            }
            Msg::SealNow { reply } => {
                let now = (self.clock)();
                let _ = reply.send(self.in_txn(|w| w.seal(now)));
            }
            Msg::SetAcked { seq, reply } => {
                let _ = reply.send(self.set_acked(seq));
            }
            Msg::ApplyFeed {
                position,
                entries,
                reply,
            } => {
                let _ = reply.send(self.apply_feed(position, entries));
            }
        }
    }

    /// Runs `f` in its own transaction; on failure the in-memory log state is reloaded.
    fn in_txn(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f(self).and_then(|()| Ok(self.commit_durably()?)) {
            Ok(ticket) => {
                self.shared.durability.publishing(ticket);
                *self.shared.status.lock() = self.status.clone();
                Ok(())
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.reload();
                Err(e)
            }
        }
    }

    /// COMMIT (the frames reach the WAL, not yet the disk), with a durability ticket taken
    /// first; returns the ticket. A failed COMMIT is synced anyway: a reader may be waiting
    /// for its ticket, and there is nothing new to flush.
    fn commit_statement(&mut self) -> rusqlite::Result<u64> {
        let ticket = self.shared.durability.ticket();
        let started = Instant::now();
        let done = self.conn.execute_batch("COMMIT");
        self.shared.metrics.commit_write.record(started.elapsed());
        if done.is_err() {
            self.shared.durability.sync(ticket, &self.shared.metrics);
        }
        done.map(|()| ticket)
    }

    /// COMMIT and wait for the fsync, for the rare transactions outside group commit
    /// (seals, acks, the hub's feed), whose effects are published as soon as they return.
    fn commit_durably(&mut self) -> rusqlite::Result<u64> {
        let ticket = self.commit_statement()?;
        self.shared.durability.sync(ticket, &self.shared.metrics);
        Ok(ticket)
    }

    /// Reloads the log state from the database after a failed transaction. If even that
    /// fails the database is unusable, and continuing could corrupt the chain.
    fn reload(&mut self) {
        let (status, open, hlc) = load_log_state(&self.conn, &self.origin, &self.schema)
            .expect("reloading the log state after a rollback");
        self.status = status;
        self.open = open;
        // The log on disk does not say which open entries were payments: seal early as if
        // some were, so that a payment committed before the rollback never waits for the
        // age seal.
        self.open.priority = !self.open.entries.is_empty();
        self.hlc = HlcClock::starting_after(hlc.max(self.hlc.last()));
    }

    /// Commits a group. Requests run without a savepoint, since nearly every failure
    /// (validation, a CAS conflict, a missing order) happens before they write, and a
    /// savepoint costs a copy of every page a request touches (~9 % of the writer's
    /// instructions for the till cycle's batches). If a request fails after writing, the
    /// whole group is rolled back and re-run with a savepoint around every request; and for
    /// the next `BATCH_SAVEPOINT_GROUPS` groups, requests of several operations (the ones
    /// likely to fail part-way again) run inside savepoints from the start, so a terminal
    /// that keeps sending failing batches costs at most one re-run in that many groups. (A
    /// single operation that fails after its write, such as a row over the size limit, still
    /// re-runs its group each time; such failures are rare and cost only time.)
    fn commit_group(&mut self, group: &mut Vec<(Prepared, Reply<Answer>)>) {
        self.groups += 1;
        let now = (self.clock)();
        let started = Instant::now();
        let mut outcomes: Vec<Result<Committed, TxnError>> = Vec::with_capacity(group.len());
        let commits = &mut Vec::new();
        let mut result = Ok(0);
        for careful in [false, true] {
            outcomes.clear();
            commits.clear();
            result = self.try_group(group, now, careful, &mut outcomes, commits);
            match result {
                Err(GroupError::NeedsSavepoints) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    self.reload();
                    self.batch_savepoints_until = self.groups + BATCH_SAVEPOINT_GROUPS;
                    self.shared.metrics.reruns.fetch_add(1, Ordering::Relaxed);
                }
                _ => break,
            }
        }
        let (ticket, error) = match result {
            Ok(ticket) => (ticket, None),
            Err(GroupError::Store(e)) => (0, Some(e)),
            Err(GroupError::NeedsSavepoints) => {
                unreachable!("with savepoints every request fails alone")
            }
        };
        if let Some(error) = error {
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            self.reload();
            tracing::error!("group commit failed: {error}");
            for (txn, reply) in group.drain(..) {
                let failed = Err(TxnError {
                    op_index: None,
                    error: error.clone(),
                });
                let _ = reply.send((failed, txn));
            }
            return;
        }
        let elapsed = started.elapsed();
        for c in commits.iter_mut() {
            c.started = started;
        }
        self.shared.metrics.record_group(
            group.len(),
            commits.iter().map(|c| c.changes.len()).sum(),
            elapsed,
        );
        self.publish(commits, ticket);
        let answers = group
            .drain(..)
            .zip(outcomes.drain(..))
            .map(|((txn, reply), outcome)| (reply, (outcome, txn)))
            .collect();
        let delivery = Delivery {
            answers,
            commits: std::mem::take(commits),
            ticket,
            started,
        };
        self.hand_over(delivery);
        self.restart_wal();
    }

    /// Lets SQLite start the WAL over. Under steady load the housekeeper's passive checkpoints
    /// never catch up with the writer, and SQLite only writes the WAL from its start again
    /// once every frame is in the database; so the WAL grew until the housekeeper truncated
    /// it, which blocked the writer for tens of milliseconds (behind SQLite's sleeping busy
    /// handler) and left a file that every fsync then had to extend. Past
    /// `StoreConfig::wal_restart_frames`, the writer checkpoints what the housekeeper has not
    /// copied yet (the frames since its last run), between groups; its next commit then
    /// writes from the WAL's start. A busy housekeeper or a reader on an old snapshot makes
    /// it try again after the next group.
    fn restart_wal(&mut self) {
        let metrics = &self.shared.metrics;
        if metrics.wal_frames.load(Ordering::Relaxed) < self.wal_restart_frames {
            return;
        }
        match sql::wal_checkpoint(&self.conn, "PASSIVE") {
            Ok((0, log, copied)) if copied == log => {
                metrics.wal_frames.store(0, Ordering::Relaxed);
                metrics.wal_restarts.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("checkpoint before a WAL restart failed: {e}"),
        }
    }

    /// Delivers a committed group's commits and answers, in commit order.
    fn hand_over(&mut self, delivery: Delivery) {
        // A small group is answered here: handing it over would cost the waiting callers a
        // thread hop for nothing, as there is no queue behind them to start on.
        // Only when the answering thread has nothing left, so the feed stays in commit order.
        let idle = self.shared.deliveries_pending.load(Ordering::Acquire) == 0;
        if delivery.answers.len() <= self.deliver_inline_max && idle {
            self.shared
                .durability
                .sync(delivery.ticket, &self.shared.metrics);
            delivery.deliver(&self.shared);
            return;
        }
        self.shared
            .deliveries_pending
            .fetch_add(1, Ordering::AcqRel);
        if let Err(undelivered) = self.deliveries.send(delivery) {
            // The answering thread is gone (only while stopping): answer here.
            let undelivered = undelivered.into_inner();
            self.shared
                .durability
                .sync(undelivered.ticket, &self.shared.metrics);
            undelivered.deliver(&self.shared);
            self.shared
                .deliveries_pending
                .fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// One attempt at a group: BEGIN, every request, seals, COMMIT.
    fn try_group(
        &mut self,
        group: &[(Prepared, Reply<Answer>)],
        now: Timestamp,
        careful: bool,
        outcomes: &mut Vec<Result<Committed, TxnError>>,
        commits: &mut Vec<Commit>,
    ) -> Result<u64, GroupError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        self.touched.clear();
        let sealed_before = self.status.sealed_seq;
        for (txn, _) in group {
            match self.apply_request(txn, now, careful) {
                Ok((committed, commit)) => {
                    if let Some(c) = &commit {
                        for ch in &c.changes {
                            self.touched.insert(touched_key(ch.table, &ch.row.id));
                        }
                    }
                    commits.extend(commit);
                    outcomes.push(Ok(committed));
                }
                Err(RequestError::Failed(e)) => {
                    if self.conn.is_autocommit() {
                        // SQLite rolled the whole transaction back itself (a full disk, an
                        // I/O error): nothing of the group may go on as if it were open.
                        return Err(GroupError::Store(e.error));
                    }
                    outcomes.push(Err(e));
                }
                Err(RequestError::NeedsSavepoint) => return Err(GroupError::NeedsSavepoints),
            }
            let full = self.open.entries.len() >= SEGMENT_ENTRIES_TARGET
                || self.open.bytes >= SEGMENT_BYTES_TARGET;
            if full {
                self.seal(now)?;
            }
        }
        if self.open.priority && now.0 - self.last_seal.0 >= PRIORITY_SEAL_GAP_US {
            self.seal(now)?;
        }
        if !commits.is_empty() {
            self.flush_chunk()?;
            sql::set_meta(&self.conn, "version", self.status.version.0 as i64)?;
        }
        if commits.is_empty() && self.status.sealed_seq == sealed_before {
            // Nothing changed (every request failed or was a no-op): the COMMIT writes
            // nothing and needs no fsync of its own. The answers may carry rows read from
            // earlier commits, so they wait for those.
            self.conn.execute_batch("COMMIT")?;
            return Ok(self.shared.durability.committed());
        }
        Ok(self.commit_statement()?)
    }

    /// Makes a group's commits visible: the hot tier in place, then the log status.
    /// `ticket` is their COMMIT's; readers of this state wait until it is durable.
    fn publish(&mut self, commits: &mut [Commit], ticket: u64) {
        self.shared.durability.publishing(ticket);
        let mut hot = self.shared.hot.write();
        for c in commits {
            for ch in &mut c.changes {
                ch.was_cold = ch.op == EntryOp::Update && hot.get(ch.table, &ch.row.id).is_none();
                let newly_hot = hot.apply(super::hot::HotChange {
                    table: ch.table,
                    deleted: ch.op == EntryOp::Delete,
                    row: &ch.row,
                });
                // A row that was just inserted has no children in SQLite yet (they reference
                // it, so they come after it and reach the tier as changes of their own); only
                // an existing row that turns hot sends us looking.
                if let Some((table, id)) = newly_hot.filter(|_| ch.op != EntryOp::Insert) {
                    for (child, column) in hot.children_of(table).to_vec() {
                        match load_children(
                            &self.conn,
                            &self.schema,
                            &self.sql,
                            child,
                            &column,
                            &id,
                        ) {
                            Ok(rows) => rows.into_iter().for_each(|r| hot.load(child, r)),
                            Err(e) => tracing::error!("loading hot children failed: {e}"),
                        }
                    }
                }
            }
        }
        hot.set_version(self.status.version);
        drop(hot);
        *self.shared.status.lock() = self.status.clone();
    }

    fn mark(&self) -> Mark {
        Mark {
            status: self.status.clone(),
            open_len: self.open.entries.len(),
            open_bytes: self.open.bytes,
            open_since: self.open.since,
            hlc: self.hlc.last(),
        }
    }

    fn restore(&mut self, m: Mark) {
        self.status = m.status;
        debug_assert!(
            m.open_len >= self.open.flushed,
            "chunks are flushed between requests"
        );
        self.open.entries.truncate(m.open_len);
        self.open.bytes = m.open_bytes;
        self.open.since = m.open_since;
        self.hlc = HlcClock::starting_after(m.hlc);
    }

    /// Applies one request: inside a savepoint when `careful` is set, or when it has several
    /// operations shortly after a re-run; otherwise a failure after a write asks for the
    /// careful re-run.
    fn apply_request(
        &mut self,
        txn: &Prepared,
        now: Timestamp,
        careful: bool,
    ) -> Result<(Committed, Option<Commit>), RequestError> {
        let whole = |error| {
            RequestError::Failed(TxnError {
                op_index: None,
                error,
            })
        };
        // A batch holding an invalid operation fails at it, after the ones before it wrote.
        let batch_may_fail = self.groups <= self.batch_savepoints_until
            || txn
                .ops
                .iter()
                .any(|op| matches!(op, PreparedOp::Invalid(_)));
        let savepoint = careful || (txn.ops.len() > 1 && batch_may_fail);
        let mark = self.mark();
        if savepoint {
            self.exec_cached("SAVEPOINT request").map_err(whole)?;
        }
        let mut scratch = Scratch {
            actor: &txn.actor,
            now,
            version: Version(self.status.version.0 + 1),
            changes: Vec::new(),
            entries: 0,
            bytes: 0,
            wrote: false,
            order_deltas: BTreeMap::new(),
        };
        let mut results = Vec::with_capacity(txn.ops.len());
        let mut outcome = Ok(());
        for (i, op) in txn.ops.iter().enumerate() {
            match self.apply_op(op, &mut scratch).map_err(fail(i)) {
                Ok(r) => results.push(r),
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        if outcome.is_ok() {
            outcome = self.flush_orders(&mut scratch).map_err(|error| TxnError {
                op_index: Some(txn.ops.len() - 1),
                error,
            });
        }
        if let Err(e) = outcome {
            self.restore(mark);
            if savepoint {
                self.exec_cached("ROLLBACK TO request")
                    .and_then(|()| self.exec_cached("RELEASE request"))
                    .map_err(whole)?;
            } else if scratch.wrote {
                return Err(RequestError::NeedsSavepoint);
            }
            return Err(RequestError::Failed(e));
        }
        if savepoint {
            self.exec_cached("RELEASE request").map_err(whole)?;
        }
        if scratch.changes.is_empty() {
            self.restore(mark);
            return Ok((
                Committed {
                    version: self.status.version,
                    results: results.into_iter().map(|(_, r)| r).collect(),
                },
                None,
            ));
        }
        self.status.version = scratch.version;
        // Each result shows its row as its operation left it, except orders: their totals are
        // derived at the end of the request, and the result shows them.
        if let Some(order) = self.rules.as_ref().map(|r| r.order) {
            for (ti, r) in &mut results {
                if *ti == order && r.applied != Applied::Deleted {
                    let last = scratch.changes.iter().rev().find(|c| {
                        c.table == order && c.row.id == r.row.id && c.op != EntryOp::Delete
                    });
                    if let Some(last) = last {
                        r.row = last.row.clone();
                    }
                }
            }
        }
        let commit = Commit {
            version: scratch.version,
            changes: scratch.changes,
            started: Instant::now(),
        };
        Ok((
            Committed {
                version: scratch.version,
                results: results.into_iter().map(|(_, r)| r).collect(),
            },
            Some(commit),
        ))
    }

    fn exec_cached(&self, sql: &str) -> Result<(), StoreError> {
        self.conn.prepare_cached(sql)?.execute([])?;
        Ok(())
    }

    fn apply_op(
        &mut self,
        op: &PreparedOp,
        s: &mut Scratch<'_>,
    ) -> Result<(usize, OpResult), StoreError> {
        let ti = op.table();
        let r = match op {
            PreparedOp::Invalid(error) => return Err(error.clone()),
            PreparedOp::Insert { id, values, .. } => {
                let mut row = self.new_row(ti, id.clone(), values.clone(), s.now);
                if let Some(rules) = &self.rules {
                    let orders = |id: &str| self.row_now(rules.order, id, s);
                    rules.before_insert(&orders, ti, &mut row)?;
                }
                self.insert_row(ti, row, s)
            }
            PreparedOp::Update {
                id, version, set, ..
            } => {
                // The client's version is compared with the row as the client could have seen
                // it: totals this request dirtied are derived below, in the same update.
                let current = self.current_at(ti, id, *version, s)?;
                let mut set = set.clone();
                let mut fresh = current.clone();
                if self.rules.as_ref().is_some_and(|r| r.is_order(ti))
                    && let Some((total, paid)) = s.order_deltas.remove(id)
                {
                    for (col, delta) in [("total_amount", total), ("paid_amount", paid)] {
                        let v = Value::Int(rules::add_amount(id, current.get(col), delta)?);
                        fresh.set(col, v.clone());
                        set.insert(col.into(), v);
                    }
                }
                if let Some(rules) = &self.rules {
                    let orders = |id: &str| self.row_now(rules.order, id, s);
                    rules.before_update(&orders, ti, &fresh, &set)?;
                }
                self.update_row(ti, current, set, s)
            }
            PreparedOp::Delete { id, version, .. } => {
                let current = self.current_at(ti, id, *version, s)?;
                if let Some(rules) = &self.rules {
                    let orders = |id: &str| self.row_now(rules.order, id, s);
                    rules.before_delete(&self.conn, &orders, ti, &current)?;
                }
                self.delete_row(ti, current, s)
            }
        }?;
        Ok((ti, r))
    }

    pub(crate) fn new_id(&mut self, now: Timestamp) -> String {
        self.ids.next(now)
    }

    /// A new row of table `ti` (version 1, created now) with the named values; the other
    /// columns are null.
    pub(crate) fn new_row_from(
        &self,
        ti: usize,
        id: String,
        fields: Fields,
        now: Timestamp,
    ) -> Row {
        let mut row = self.new_row(
            ti,
            id,
            vec![Value::Null; self.schema.tables()[ti].columns.len()],
            now,
        );
        for (k, v) in fields {
            row.set(&k, v);
        }
        row
    }

    fn new_row(&self, ti: usize, id: String, values: Vec<Value>, now: Timestamp) -> Row {
        Row {
            id,
            version: 1,
            created_at: now,
            updated_at: now,
            seq: None,
            columns: self.schema.columns(ti).clone(),
            values,
        }
    }

    /// A row as the request sees it, from the cheapest place that has it right: the
    /// request's own last change to it; else the hot tier, which holds every commit before
    /// this group, unless a finished request of this group wrote the row; else the write
    /// connection (which sees this group's writes). `None` when there is no such row.
    fn row_now(
        &self,
        ti: usize,
        id: &str,
        s: &Scratch<'_>,
    ) -> Result<Option<Arc<Row>>, StoreError> {
        if let Some(c) = s
            .changes
            .iter()
            .rev()
            .find(|c| c.table == ti && c.row.id == id)
        {
            return Ok((c.op != EntryOp::Delete).then(|| c.row.clone()));
        }
        if !self.touched.contains(&touched_key(ti, id))
            && let Some(row) = self.shared.hot.read().get(ti, id)
        {
            return Ok(Some(row.clone()));
        }
        Ok(read_row(&self.conn, &self.schema, &self.sql, ti, id)?.map(Arc::new))
    }

    /// The current row (see `row_now`).
    fn current(&self, ti: usize, id: &str, s: &Scratch<'_>) -> Result<Row, StoreError> {
        match self.row_now(ti, id, s)? {
            Some(row) => Ok(Arc::unwrap_or_clone(row)),
            None => Err(StoreError::NotFound {
                table: self.schema.tables()[ti].name.clone(),
                id: id.chars().take(128).collect(),
            }),
        }
    }

    /// The current row, if it is at `version` (compare-and-set).
    fn current_at(
        &self,
        ti: usize,
        id: &str,
        version: u64,
        s: &Scratch<'_>,
    ) -> Result<Row, StoreError> {
        let current = self.current(ti, id, s)?;
        if current.version != version {
            return Err(StoreError::VersionConflict {
                id: id.to_owned(),
                expected: version,
                current: Arc::new(current),
            });
        }
        Ok(current)
    }

    /// The replicated state of a shared row (`None` for other tables).
    fn shared_row(&self, ti: usize, id: &str) -> Result<Option<SharedRow>, StoreError> {
        if self.schema.tables()[ti].owner != Owner::Shared {
            return Ok(None);
        }
        let stored: Option<Option<Vec<u8>>> = self
            .conn
            .prepare_cached(&self.sql[ti].select_clock)?
            .query_row([id], |r| r.get(0))
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        Ok(Some(match stored.flatten() {
            Some(bytes) => SharedRow::decode(&bytes)
                .map_err(|e| StoreError::Storage(format!("stored shared row state: {e}")))?,
            None => SharedRow::default(),
        }))
    }

    /// A local write of a shared row: its register takes the new version, stamped now.
    /// Returns the stamp for the log entry and the register's bytes for `_clock`.
    fn stamp_shared(
        &mut self,
        ti: usize,
        row: &Row,
        now: Timestamp,
    ) -> Result<(Option<Stamp>, Option<Vec<u8>>), StoreError> {
        let Some(mut reg) = self.shared_row(ti, &row.id)? else {
            return Ok((None, None));
        };
        let hlc = self.hlc.tick(now.as_millis());
        let clock = reg.write(&self.origin, hlc, row.values.clone());
        Ok((Some(Stamp { clock, hlc }), Some(reg.encode())))
    }

    /// The version of the tombstone a deleted row left under `id`, if any.
    fn tombstone(&self, ti: usize, id: &str) -> Result<Option<i64>, StoreError> {
        if !self.tombstoned[ti] {
            return Ok(None);
        }
        Ok(self
            .conn
            .prepare_cached("SELECT version FROM _tombstones WHERE tbl = ?1 AND id = ?2")?
            .query_row(params![&self.schema.tables()[ti].name, id], |r| r.get(0))
            .optional()?)
    }

    /// Records a deleted row's tombstone (its id and last version).
    fn write_tombstone(&mut self, ti: usize, tombstone: &Row) -> Result<(), StoreError> {
        self.tombstoned[ti] = true;
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO _tombstones (tbl, id, version) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![
                &self.schema.tables()[ti].name,
                &tombstone.id,
                tombstone.version as i64
            ])?;
        Ok(())
    }

    pub(crate) fn insert_row(
        &mut self,
        ti: usize,
        mut row: Row,
        s: &mut Scratch<'_>,
    ) -> Result<OpResult, StoreError> {
        let t = &self.schema.tables()[ti];
        let is_log = t.kind == TableKind::Log;
        row.seq = is_log.then_some(self.status.last_seq.0 + 1);
        if !is_log {
            // An id used before continues its versions after its tombstone, so a client still
            // holding the old row cannot compare-and-set the new one.
            if let Some(v) = self.tombstone(ti, &row.id)? {
                row.version = v as u64 + 1;
            }
        }
        let (stamp, clock_bytes) = self.stamp_shared(ti, &row, s.now)?;
        let t = &self.schema.tables()[ti];
        let inserted = self
            .conn
            .prepare_cached(&self.sql[ti].insert)?
            .execute(params_from_iter(sql::row_params(
                t,
                &row,
                clock_bytes.as_deref(),
            )));
        match inserted {
            Ok(_) => s.wrote = true,
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                let existing = self.current(ti, &row.id, s)?;
                if is_log && existing.values == row.values {
                    return Ok(OpResult {
                        applied: Applied::AlreadyPresent,
                        row: Arc::new(existing),
                    });
                }
                return Err(StoreError::IdConflict {
                    table: t.name.clone(),
                    id: row.id,
                });
            }
            Err(e) => return Err(e.into()),
        }
        let row = Arc::new(row);
        self.append(ti, EntryOp::Insert, row.clone(), stamp, Vec::new(), s)?;
        if let Some(rules) = self.rules.clone() {
            rules.after_write(self, ti, None, &row, s)?;
        }
        Ok(OpResult {
            applied: Applied::Inserted,
            row,
        })
    }

    fn update_row(
        &mut self,
        ti: usize,
        current: Row,
        set: Fields,
        s: &mut Scratch<'_>,
    ) -> Result<OpResult, StoreError> {
        let changed: Vec<String> = set
            .iter()
            .filter(|(k, v)| current.get(k) != *v)
            .map(|(k, _)| k.clone())
            .collect();
        if changed.is_empty() {
            return Ok(OpResult {
                applied: Applied::Unchanged,
                row: Arc::new(current),
            });
        }
        self.write_update(ti, current, set, changed, s)
    }

    /// Writes an update (client or derived) and appends its entry.
    fn write_update(
        &mut self,
        ti: usize,
        current: Row,
        set: Fields,
        changed: Vec<String>,
        s: &mut Scratch<'_>,
    ) -> Result<OpResult, StoreError> {
        let mut row = current.clone();
        row.version += 1;
        row.updated_at = s.now;
        for (k, v) in set {
            row.set(&k, v);
        }
        let (stamp, clock_bytes) = self.stamp_shared(ti, &row, s.now)?;
        self.write_row_update(ti, &row, clock_bytes.as_deref(), &changed)?;
        s.wrote = true;
        let row = Arc::new(row);
        let before = Arc::new(current);
        self.append(ti, EntryOp::Update, row.clone(), stamp, changed, s)?;
        if let Some(c) = s.changes.last_mut() {
            c.before = Some(before.clone());
        }
        if let Some(rules) = self.rules.clone() {
            rules.after_write(self, ti, Some(&before), &row, s)?;
        }
        Ok(OpResult {
            applied: Applied::Updated,
            row,
        })
    }

    /// Stores an updated row: its version, `updated_at`, `_clock` and the `changed` columns
    /// (every other column of `row` must equal the stored one).
    fn write_row_update(
        &mut self,
        ti: usize,
        row: &Row,
        clock: Option<&[u8]>,
        changed: &[String],
    ) -> rusqlite::Result<()> {
        let t = &self.schema.tables()[ti];
        let params = sql::row_params(t, row, clock);
        match self.partial_updates.get(t, ti, changed) {
            Some((update, n)) => self
                .conn
                .prepare_cached(update)?
                .execute(params_from_iter(params.take(n)))?,
            None => self
                .conn
                .prepare_cached(&self.sql[ti].update)?
                .execute(params_from_iter(params))?,
        };
        Ok(())
    }

    fn delete_row(
        &mut self,
        ti: usize,
        current: Row,
        s: &mut Scratch<'_>,
    ) -> Result<OpResult, StoreError> {
        debug_assert!(
            self.schema.tables()[ti].owner != Owner::Shared,
            "shared rows are never deleted (refused when prepared)"
        );
        self.conn
            .prepare_cached(&self.sql[ti].delete)?
            .execute([&current.id])?;
        s.wrote = true;
        let mut tombstone = current.clone();
        tombstone.version += 1;
        tombstone.updated_at = s.now;
        self.write_tombstone(ti, &tombstone)?;
        let tombstone = Arc::new(tombstone);
        self.append(ti, EntryOp::Delete, tombstone.clone(), None, Vec::new(), s)?;
        if let Some(rules) = self.rules.clone() {
            rules.after_delete(self, ti, &current, s)?;
        }
        Ok(OpResult {
            applied: Applied::Deleted,
            row: tombstone,
        })
    }

    /// Appends a change to the origin log and to the request's change list.
    fn append(
        &mut self,
        ti: usize,
        op: EntryOp,
        row: Arc<Row>,
        stamp: Option<Stamp>,
        changed: Vec<String>,
        s: &mut Scratch<'_>,
    ) -> Result<(), StoreError> {
        let seq = self.status.last_seq.next();
        let hlc = match &stamp {
            Some(st) => st.hlc,
            None => self.hlc.tick(s.now.as_millis()),
        };
        let entry = LogEntryRef {
            origin: &self.origin,
            seq,
            hlc,
            table: &self.schema.tables()[ti].name,
            op,
            row_id: &row.id,
            row: row.wire(),
            clock: stamp.as_ref().map(|st| &st.clock),
            scope: None,
        };
        let bytes = entry.encode();
        if bytes.len() > ENTRY_BYTES_MAX {
            return Err(StoreError::TooLarge("a row is larger than 2 MiB"));
        }
        s.entries += 1;
        s.bytes += bytes.len();
        if s.entries > TXN_ENTRIES_MAX || s.bytes > TXN_BYTES_MAX {
            return Err(StoreError::TooLarge(
                "the transaction changes more than 3072 rows or 4 MiB",
            ));
        }
        self.status.last_seq = seq;
        self.open.bytes += bytes.len();
        self.open.entries.push((s.version, bytes));
        self.open.since.get_or_insert(s.now);
        self.open.priority |= self.schema.tables()[ti].priority;
        s.changes.push(Change {
            table: ti,
            op,
            row,
            before: None,
            changed,
            was_cold: false,
        });
        Ok(())
    }

    fn flush_orders(&mut self, s: &mut Scratch<'_>) -> Result<(), StoreError> {
        while let Some((id, delta)) = s.order_deltas.pop_first() {
            self.flush_order(&id, delta, s)?;
        }
        Ok(())
    }

    /// Applies the request's net change to an order's derived totals, in one update.
    fn flush_order(
        &mut self,
        order_id: &str,
        (total, paid): (i128, i128),
        s: &mut Scratch<'_>,
    ) -> Result<(), StoreError> {
        let Some(rules) = self.rules.clone() else {
            return Ok(());
        };
        let Some(current) = self.row_now(rules.order, order_id, s)? else {
            return Ok(()); // deleted in this request
        };
        let current = Arc::unwrap_or_clone(current);
        let mut set = Fields::new();
        for (col, delta) in [("total_amount", total), ("paid_amount", paid)] {
            if delta != 0 {
                set.insert(
                    col.into(),
                    Value::Int(rules::add_amount(order_id, current.get(col), delta)?),
                );
            }
        }
        if set.is_empty() {
            return Ok(());
        }
        let changed = set.keys().cloned().collect();
        self.write_update(rules.order, current, set, changed, s)?;
        Ok(())
    }

    /// Writes the entries appended since the last flush as one `_log` chunk.
    fn flush_chunk(&mut self) -> Result<(), StoreError> {
        let pending = &self.open.entries[self.open.flushed..];
        if pending.is_empty() {
            return Ok(());
        }
        let first = self.status.sealed_seq.0 + 1 + self.open.flushed as u64;
        let last = first + pending.len() as u64 - 1;
        debug_assert_eq!(last, self.status.last_seq.0);
        let blob = chunk::encode(pending.iter().map(|(v, b)| (*v, b.as_slice())));
        let last_version = pending.last().map_or(0, |(v, _)| v.0);
        self.conn
            .prepare_cached(
                "INSERT INTO _log (last_seq, first_seq, last_version, chunk) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![last as i64, first as i64, last_version as i64, blob])?;
        self.open.flushed = self.open.entries.len();
        Ok(())
    }

    /// Seals the open segment (inside the caller's transaction).
    fn seal(&mut self, now: Timestamp) -> Result<(), StoreError> {
        if self.open.entries.is_empty() {
            return Ok(());
        }
        self.last_seal = now;
        // A chunk never straddles a segment boundary, so pruning removes whole chunks.
        self.flush_chunk()?;
        let first = self.status.sealed_seq.next();
        let segment = Segment::seal(
            self.origin.clone(),
            first,
            self.status.head,
            self.open.entries.iter().map(|(_, b)| b.as_slice()),
        );
        // The edge asserts the chain before it stores (and later sends) a segment.
        assert_eq!(
            segment.last_seq, self.status.last_seq,
            "segment covers the open log"
        );
        assert_eq!(
            segment.prev_hash, self.status.head,
            "segment chains onto the head"
        );
        self.conn
            .prepare_cached(
                "INSERT INTO _segments (last_seq, first_seq, prev_hash, hash, bytes, sealed_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                segment.last_seq.0 as i64,
                first.0 as i64,
                &segment.prev_hash.0[..],
                &segment.hash.0[..],
                segment.body.len() as i64,
                now.0
            ])?;
        self.status.sealed_seq = segment.last_seq;
        self.status.head = segment.hash;
        self.open = OpenSegment::default();
        Ok(())
    }

    /// Applies rows of the hub's feed: each entry replaces (or removes) its row, with the
    /// edge's own row versions so that terminals' compare-and-set keeps working; the feed
    /// position moves in the same transaction, and terminals see one ordinary commit. Entries
    /// never enter the branch's own log. A position already applied is a no-op (a segment
    /// handed over twice is applied once).
    fn apply_feed(&mut self, position: Position, entries: Vec<LogEntry>) -> Result<(), StoreError> {
        if position.seq <= self.status.feed.seq {
            return Ok(());
        }
        let now = (self.clock)();
        let version = Version(self.status.version.0 + 1);
        let branch = self.origin.as_str().to_owned();
        let mut changes = Vec::new();
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let applied = (|| -> Result<u64, StoreError> {
            for entry in &entries {
                if entry.scope.as_ref().is_some_and(|b| b.as_str() != branch) {
                    continue; // meant for another branch
                }
                let ti = self
                    .schema
                    .table_index(&entry.table)
                    .ok_or_else(|| StoreError::UnknownTable(entry.table.clone()))?;
                let t = &self.schema.tables()[ti];
                if t.owner == Owner::Branch {
                    return Err(StoreError::Storage(format!(
                        "the hub's feed may not write branch table {}",
                        t.name
                    )));
                }
                if let Some(change) = self.apply_feed_entry(ti, entry, now)? {
                    changes.push(change);
                }
            }
            sql::set_meta(&self.conn, "feed_seq", position.seq.0 as i64)?;
            sql::set_meta(&self.conn, "feed_hash", &position.hash.0[..])?;
            if !changes.is_empty() {
                sql::set_meta(&self.conn, "version", version.0 as i64)?;
            }
            Ok(self.commit_durably()?)
        })();
        let ticket = match applied {
            Ok(ticket) => ticket,
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        };
        self.status.feed = position;
        let mut commits = if changes.is_empty() {
            Vec::new()
        } else {
            self.status.version = version;
            vec![Commit {
                version,
                changes,
                started: Instant::now(),
            }]
        };
        self.publish(&mut commits, ticket);
        self.hand_over(Delivery {
            answers: Vec::new(),
            commits,
            ticket,
            started: Instant::now(),
        });
        Ok(())
    }

    /// One feed entry: the row as the hub sent it, at the edge's next version of that row.
    fn apply_feed_entry(
        &mut self,
        ti: usize,
        entry: &LogEntry,
        now: Timestamp,
    ) -> Result<Option<Change>, StoreError> {
        let t = &self.schema.tables()[ti];
        let existing = read_row(&self.conn, &self.schema, &self.sql, ti, &entry.row_id)?;
        if entry.op == EntryOp::Delete {
            let Some(current) = existing else {
                return Ok(None);
            };
            self.conn
                .prepare_cached(&self.sql[ti].delete)?
                .execute([&current.id])?;
            let mut tombstone = current;
            tombstone.version += 1;
            tombstone.updated_at = now;
            self.write_tombstone(ti, &tombstone)?;
            return Ok(Some(Change {
                table: ti,
                op: EntryOp::Delete,
                row: Arc::new(tombstone),
                before: None,
                changed: Vec::new(),
                was_cold: false,
            }));
        }
        let mut row = entry.row.clone();
        row.id = entry.row_id.clone();
        row.seq = None;
        row.columns = self.schema.columns(ti).clone();
        row.values.resize(row.columns.len(), Value::Null);
        let mut clock_bytes = None;
        if let Some(mut reg) = self.shared_row(ti, &row.id)? {
            // A shared row: the hub relays another replica's write; the register decides
            // what terminals see (the same everywhere), and keeps a concurrent local write.
            self.hlc.observe(entry.hlc, now.as_millis());
            let clock = entry.clock.clone().unwrap_or_default();
            if !reg.apply(clock, entry.hlc, row.values.clone()) {
                return Ok(None);
            }
            let winner = reg
                .winner()
                .expect("a register that took a write has a version");
            row.values = winner.values;
            clock_bytes = Some(reg.encode());
            if let Some(current) = &existing
                && current.values == row.values
            {
                // The visible row stays; only the register changed.
                self.conn
                    .prepare_cached(&format!(
                        "UPDATE {} SET _clock = ?2 WHERE id = ?1",
                        sql::table_name(&t.name)
                    ))?
                    .execute(params![&row.id, clock_bytes.as_deref()])?;
                return Ok(None);
            }
        }
        match existing {
            Some(current) => {
                let changed: Vec<String> = row
                    .columns
                    .iter()
                    .zip(row.values.iter().zip(&current.values))
                    .filter(|(_, (new, old))| new != old)
                    .map(|(c, _)| c.clone())
                    .collect();
                if changed.is_empty() {
                    return Ok(None);
                }
                row.version = current.version + 1;
                row.created_at = current.created_at;
                self.write_row_update(ti, &row, clock_bytes.as_deref(), &changed)?;
                Ok(Some(Change {
                    table: ti,
                    op: EntryOp::Update,
                    row: Arc::new(row),
                    before: Some(Arc::new(current)),
                    changed,
                    was_cold: false,
                }))
            }
            None => {
                let tombstone = self.tombstone(ti, &row.id)?;
                row.version = tombstone.map_or(1, |v| v as u64 + 1);
                self.conn
                    .prepare_cached(&self.sql[ti].insert)?
                    .execute(params_from_iter(sql::row_params(
                        t,
                        &row,
                        clock_bytes.as_deref(),
                    )))?;
                Ok(Some(Change {
                    table: ti,
                    op: EntryOp::Insert,
                    row: Arc::new(row),
                    before: None,
                    changed: Vec::new(),
                    was_cold: false,
                }))
            }
        }
    }

    fn set_acked(&mut self, seq: Seq) -> Result<(), StoreError> {
        if seq > self.status.sealed_seq {
            return Err(StoreError::Storage(format!(
                "cannot record an ack at seq {seq}: only {} entries are sealed",
                self.status.sealed_seq
            )));
        }
        if seq <= self.status.acked_seq {
            return Ok(()); // acks only move forward; an old ack is a stale duplicate
        }
        // In its own transaction, durable before the new position is published.
        self.in_txn(|w| {
            sql::set_meta(&w.conn, "acked_seq", seq.0 as i64)?;
            w.status.acked_seq = seq;
            Ok(())
        })
    }

    /// Removes acked segments sealed longer ago than the retention period, in one
    /// transaction. The chain head of the last removed segment is kept so that the chain
    /// stays verifiable.
    fn prune(&mut self, now: Timestamp) -> Result<(), StoreError> {
        if self.status.acked_seq <= self.status.pruned_seq {
            return Ok(());
        }
        let cutoff = now.0 - self.retention_us;
        let last: Option<(i64, Vec<u8>)> = self
            .conn
            .prepare_cached(
                "SELECT last_seq, hash FROM _segments WHERE last_seq <= ?1 AND sealed_at <= ?2 ORDER BY last_seq DESC LIMIT 1",
            )?
            .query_row(params![self.status.acked_seq.0 as i64, cutoff], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        let Some((last_seq, hash)) = last else {
            return Ok(());
        };
        if last_seq as u64 <= self.status.pruned_seq.0 {
            return Ok(());
        }
        self.in_txn(|w| {
            w.conn
                .prepare_cached("DELETE FROM _log WHERE last_seq <= ?1")?
                .execute([last_seq])?;
            w.conn
                .prepare_cached("DELETE FROM _segments WHERE last_seq <= ?1")?
                .execute([last_seq])?;
            sql::set_meta(&w.conn, "pruned_seq", last_seq)?;
            sql::set_meta(&w.conn, "pruned_hash", hash)?;
            w.status.pruned_seq = Seq(last_seq as u64);
            Ok(())
        })
    }
}

/// UUIDv7 ids for rows the server names: the commit's millisecond and 74 bits from a
/// xorshift generator seeded from the OS once, so that naming a row costs no system call.
pub(crate) struct IdGen {
    state: u64,
}

impl IdGen {
    fn new() -> IdGen {
        let mut seed = [0u8; 8];
        // Without OS randomness, fall back to the time: ids stay unique within this edge
        // because the primary key rejects a repeat, which only fails that one request.
        if getrandom::fill(&mut seed).is_err() {
            seed = (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64)
                .to_le_bytes();
        }
        IdGen {
            state: u64::from_le_bytes(seed) | 1,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    pub(crate) fn next(&mut self, now: Timestamp) -> String {
        let mut bytes = [0u8; 10];
        bytes[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        bytes[8..].copy_from_slice(&self.next_u64().to_le_bytes()[..2]);
        uuid::Builder::from_unix_timestamp_millis(now.as_millis(), &bytes)
            .into_uuid()
            .to_string()
    }
}

impl Scratch<'_> {
    pub(crate) fn add_to_order(&mut self, order_id: &str, total: i128, paid: i128) {
        if total == 0 && paid == 0 {
            return;
        }
        let d = self.order_deltas.entry(order_id.to_owned()).or_default();
        d.0 += total;
        d.1 += paid;
    }

    /// Drops the pending changes to a deleted order's totals.
    pub(crate) fn forget_order(&mut self, order_id: &str) {
        self.order_deltas.remove(order_id);
    }

    pub(crate) fn actor(&self) -> &str {
        self.actor
    }
}

pub(crate) fn read_row(
    conn: &Connection,
    schema: &Schema,
    sql: &[TableSql],
    ti: usize,
    id: &str,
) -> Result<Option<Row>, StoreError> {
    let mut stmt = conn.prepare_cached(&sql[ti].select_by_id)?;
    let mut rows = stmt.query([id])?;
    match rows.next()? {
        Some(r) => Ok(Some(sql::row_from_sql(schema, ti, r)?)),
        None => Ok(None),
    }
}

fn load_children(
    conn: &Connection,
    schema: &Schema,
    sql: &[TableSql],
    child: usize,
    column: &str,
    parent_id: &str,
) -> Result<Vec<Arc<Row>>, StoreError> {
    let q = format!(
        "{} WHERE {} = ?1",
        sql[child].select_all,
        sql::quote(column)
    );
    let mut stmt = conn.prepare_cached(&q)?;
    let rows = stmt
        .query_map([parent_id], |r| {
            sql::row_from_sql(schema, child, r).map(Arc::new)
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Reads entries `from..=to` of the origin log: `(seq, commit version, entry bytes)`.
pub(crate) fn read_entries(
    conn: &Connection,
    from: Seq,
    to: Seq,
) -> Result<Vec<(Seq, Version, Vec<u8>)>, StoreError> {
    read_entries_max(conn, from, to, usize::MAX)
}

/// Like [`read_entries`], stopping after `max` entries.
pub(crate) fn read_entries_max(
    conn: &Connection,
    from: Seq,
    to: Seq,
    max: usize,
) -> Result<Vec<(Seq, Version, Vec<u8>)>, StoreError> {
    let mut out = Vec::new();
    let mut stmt = conn.prepare_cached(
        "SELECT first_seq, chunk FROM _log WHERE last_seq >= ?1 AND first_seq <= ?2 ORDER BY last_seq",
    )?;
    let mut rows = stmt.query(params![from.0 as i64, to.0 as i64])?;
    while let Some(r) = rows.next()? {
        let first: i64 = r.get(0)?;
        let blob = r
            .get_ref(1)?
            .as_blob()
            .map_err(|e| StoreError::Storage(format!("log chunk at seq {first}: {e}")))?;
        let entries = chunk::decode(blob)
            .ok_or_else(|| StoreError::Storage(format!("log chunk at seq {first} is damaged")))?;
        for (i, (version, bytes)) in entries.into_iter().enumerate() {
            let seq = Seq(first as u64 + i as u64);
            if seq >= from && seq <= to {
                if out.len() == max {
                    return Ok(out);
                }
                out.push((seq, version, bytes.to_vec()));
            }
        }
    }
    Ok(out)
}

/// Loads the log position from the database: the last sealed segment, the open tail (checked
/// to be contiguous), the last stamp, and the acked and pruned watermarks.
pub(crate) fn load_log_state(
    conn: &Connection,
    origin: &OriginId,
    schema: &Schema,
) -> Result<(LogStatus, OpenSegment, Hlc), OpenError> {
    let corrupt = |m: String| OpenError::Corrupt(m);
    let version = sql::get_meta::<i64>(conn, "version")?.unwrap_or(0) as u64;
    let acked = sql::get_meta::<i64>(conn, "acked_seq")?.unwrap_or(0) as u64;
    let pruned = sql::get_meta::<i64>(conn, "pruned_seq")?.unwrap_or(0) as u64;
    let hub = OriginId::hub();
    let feed = Position {
        seq: Seq(sql::get_meta::<i64>(conn, "feed_seq")?.unwrap_or(0) as u64),
        hash: match sql::get_meta::<Vec<u8>>(conn, "feed_hash")? {
            Some(h) => ChainHash(
                h.try_into()
                    .map_err(|_| corrupt("feed hash is not 32 bytes".into()))?,
            ),
            None => ChainHash::genesis(&hub),
        },
        origin: hub,
    };
    let pruned_hash = match sql::get_meta::<Vec<u8>>(conn, "pruned_hash")? {
        Some(h) => ChainHash(
            h.try_into()
                .map_err(|_| corrupt("pruned hash is not 32 bytes".into()))?,
        ),
        None => ChainHash::genesis(origin),
    };
    let last_segment: Option<(i64, i64, Vec<u8>, Vec<u8>)> = conn
        .query_row(
            "SELECT last_seq, first_seq, prev_hash, hash FROM _segments ORDER BY last_seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    let (sealed, head) = match last_segment {
        Some((last, first, prev, hash)) => {
            let hash = ChainHash(
                hash.try_into()
                    .map_err(|_| corrupt("segment hash is not 32 bytes".into()))?,
            );
            let prev = ChainHash(
                prev.try_into()
                    .map_err(|_| corrupt("segment hash is not 32 bytes".into()))?,
            );
            // Recompute the newest segment from the log: a cheap check that the tail of the
            // chain survived whatever stopped the process.
            let entries = read_entries(conn, Seq(first as u64), Seq(last as u64))
                .map_err(|e| corrupt(e.to_string()))?;
            if entries.len() as i64 != last - first + 1 {
                return Err(corrupt(format!("segment {first}..={last} lacks entries")));
            }
            let body = segment_body(entries.iter().map(|(_, _, b)| b.as_slice()));
            if chain_hash(&prev, &body) != hash {
                return Err(corrupt(format!(
                    "segment {first}..={last} does not match its hash"
                )));
            }
            (last as u64, hash)
        }
        None => (pruned, pruned_hash),
    };
    let mut open = OpenSegment::default();
    let mut hlc = Hlc::default();
    let tail = read_entries(conn, Seq(sealed + 1), Seq(u64::MAX >> 1))
        .map_err(|e| corrupt(e.to_string()))?;
    let mut last_seq = sealed;
    for (seq, version, bytes) in tail {
        if seq.0 != last_seq + 1 {
            return Err(corrupt(format!(
                "the log jumps from seq {last_seq} to {seq}"
            )));
        }
        last_seq = seq.0;
        let entry =
            LogEntry::decode(&bytes, schema).map_err(|e| corrupt(format!("entry {seq}: {e}")))?;
        hlc = entry.hlc;
        open.since.get_or_insert(entry.row.updated_at);
        open.bytes += bytes.len();
        open.entries.push((version, bytes));
    }
    open.flushed = open.entries.len();
    if open.entries.is_empty() && sealed > pruned {
        let last =
            read_entries(conn, Seq(sealed), Seq(sealed)).map_err(|e| corrupt(e.to_string()))?;
        let (_, _, bytes) = last
            .first()
            .ok_or_else(|| corrupt(format!("entry {sealed} is missing")))?;
        hlc = LogEntry::decode(bytes, schema)
            .map_err(|e| corrupt(format!("entry {sealed}: {e}")))?
            .hlc;
    }
    Ok((
        LogStatus {
            version: Version(version),
            last_seq: Seq(last_seq),
            sealed_seq: Seq(sealed),
            head,
            acked_seq: Seq(acked),
            pruned_seq: Seq(pruned),
            feed,
        },
        open,
        hlc,
    ))
}
