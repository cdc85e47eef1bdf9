//! The hub's storage: every branch's log as received (exact segment bytes, chained), the
//! current rows of every table materialised per branch for head-office queries, each branch's
//! feed (the hub-origin log of head-office rows meant for it), enrollments and sync state.
//!
//! [`HubStore`] is the interface the sync server and the HTTP API use; [`SqliteHubStore`] is
//! the embedded implementation (one SQLite file in the data dir, WAL, `synchronous=FULL`).
//! Persisting a segment and advancing the branch's watermark happen in one transaction, and
//! the sync server acks only after it returns.

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params};
use shared::log::{ChainHash, EntryOp, LogEntry, Segment};
use shared::merge::SharedRow;
use shared::schema::Owner;
use shared::wire::Position;
use shared::{BranchId, Fields, HlcClock, OriginId, Row, Schema, Seq, Timestamp, Value};

use crate::rows;

/// Entries materialised per transaction when a query catches up.
pub const MATERIALISE_BATCH: usize = 65_536;

/// Most entries in one feed segment written when a branch is enrolled.
const FEED_SEED_SEGMENT_ENTRIES: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum HubStoreError {
    #[error("storage failure: {0}")]
    Storage(String),
    #[error("branch {0} is not enrolled")]
    UnknownBranch(String),
    #[error("segment {first}..={last} does not follow the stored position {stored}")]
    NotNext { first: Seq, last: Seq, stored: Seq },
    #[error("there is no table {0:?} in this module")]
    UnknownTable(String),
    #[error("table {0:?} is written by the branches, not head office")]
    NotHubOwned(String),
    #[error("rows of shared table {0:?} are the same at every branch; leave out ?branch")]
    SharedScoped(String),
    #[error(transparent)]
    Field(#[from] shared::json::FieldError),
}

impl From<rusqlite::Error> for HubStoreError {
    fn from(e: rusqlite::Error) -> Self {
        HubStoreError::Storage(e.to_string())
    }
}

impl From<rows::RowsError> for HubStoreError {
    fn from(e: rows::RowsError) -> Self {
        HubStoreError::Storage(e.to_string())
    }
}

/// Whether a presented certificate may sync as its branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    NotEnrolled,
    Revoked,
    /// Not the branch's latest enrolled certificate.
    Superseded,
}

/// Where a branch's sync stands, for a new session.
#[derive(Debug, Clone)]
pub struct BranchSync {
    /// The hub's durable position in the branch's log.
    pub durable: Position,
    /// How far the branch acknowledged its feed.
    pub feed_acked: Position,
    /// The feed's last position.
    pub feed_head: Position,
}

/// A branch as head office sees it.
#[derive(Debug, Clone)]
pub struct BranchInfo {
    pub branch: BranchId,
    pub revoked: bool,
    pub ring: String,
    pub synced_seq: Seq,
    /// Rows of the log up to here are materialised (queryable).
    pub materialised_seq: Seq,
    pub chain_head: ChainHash,
    pub last_seen: Option<Timestamp>,
    pub edge_version: Option<String>,
    pub feed_seq: Seq,
    pub feed_acked_seq: Seq,
    /// The edge's last sealed seq as it told in its last hello.
    pub edge_head_seq: Seq,
}

/// What a round of materialisation did.
#[derive(Debug, Clone, Default)]
pub struct Materialised {
    pub segments: usize,
    pub entries: usize,
    /// Branches whose feed received relayed shared rows.
    pub relayed: Vec<BranchId>,
    /// Stored segments remain to be materialised.
    pub more: bool,
}

/// Concurrent versions of a shared row, as head office sees them.
#[derive(Debug, Clone)]
pub struct Conflict {
    pub table: String,
    pub row_id: String,
    pub at: Timestamp,
    /// The origin whose write revealed the conflict.
    pub origin: String,
    /// Every concurrent version's row (JSON).
    pub versions: serde_json::Value,
    /// The row every replica shows (JSON).
    pub winner: serde_json::Value,
}

/// A head-office row written by [`HubStore::put_hub_row`].
#[derive(Debug, Clone)]
pub struct PutOutcome {
    pub row: Row,
    /// The branches whose feed got the row.
    pub branches: Vec<BranchId>,
}

/// The hub's storage, as the sync server and the HTTP API use it.
pub trait HubStore: Send + Sync + 'static {
    fn schema(&self) -> &Arc<Schema>;
    /// Records a branch's new certificate (re-enrolling replaces the old one and lifts a
    /// revocation); a new branch's feed starts with the current head-office rows.
    fn enroll(&self, branch: &BranchId, fingerprint: [u8; 32]) -> Result<(), HubStoreError>;
    /// Refuses the branch from now on. Returns whether it was enrolled.
    fn revoke(&self, branch: &BranchId) -> Result<bool, HubStoreError>;
    fn admission(
        &self,
        branch: &BranchId,
        fingerprint: &[u8; 32],
    ) -> Result<Admission, HubStoreError>;
    fn sync_state(&self, branch: &BranchId) -> Result<BranchSync, HubStoreError>;
    /// Stores a verified segment of the branch's log with its entries and advances the
    /// branch's position, in one transaction. A segment at or below the stored position is
    /// already there: nothing is written and the stored position is returned.
    fn persist(&self, branch: &BranchId, segment: &Segment) -> Result<Position, HubStoreError>;
    /// Materialises stored segments (whole ones, until about `max_entries` entries) that are not yet (in log order per
    /// branch): their rows for queries, shared-row merges, conflicts, and relays of shared
    /// writes to the other branches' feeds. Runs behind `persist`, which acknowledges as
    /// soon as the segment's bytes are durable; queries catch it up first.
    fn materialise(&self, max_entries: usize) -> Result<Materialised, HubStoreError>;
    fn feed_after(
        &self,
        branch: &BranchId,
        after: Seq,
        max: usize,
    ) -> Result<Vec<Segment>, HubStoreError>;
    fn record_feed_ack(&self, branch: &BranchId, pos: &Position) -> Result<(), HubStoreError>;
    /// Notes a session's start: the edge's software version and its sealed head.
    fn record_hello(
        &self,
        branch: &BranchId,
        software: &str,
        edge_head: Seq,
        now: Timestamp,
    ) -> Result<(), HubStoreError>;
    /// Upserts a head-office row (the given columns replace, the others keep their value),
    /// for every branch or for one, and appends it to the feed of each branch it reaches.
    fn put_hub_row(
        &self,
        table: &str,
        id: &str,
        fields: Fields,
        scope: Option<&BranchId>,
        now: Timestamp,
    ) -> Result<PutOutcome, HubStoreError>;
    fn branches(&self) -> Result<Vec<BranchInfo>, HubStoreError>;
    /// The most recent shared-row conflicts, newest first.
    fn conflicts(&self, limit: usize) -> Result<Vec<Conflict>, HubStoreError>;
    fn query(&self, body: &serde_json::Value) -> Result<serde_json::Value, rows::QueryError>;
}

/// The embedded SQLite implementation.
pub struct SqliteHubStore {
    schema: Arc<Schema>,
    writer: Mutex<Writer>,
    reader: Mutex<Connection>,
}

struct Writer {
    conn: Connection,
    hlc: HlcClock,
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(())
}

/// A stored segment's columns: first and last seq, previous hash, hash, body.
type SegmentRow = (i64, i64, Vec<u8>, Vec<u8>, Vec<u8>);

fn segment_of(origin: OriginId, row: SegmentRow) -> Result<Segment, HubStoreError> {
    let (first, last, prev, hash, body) = row;
    Ok(Segment {
        origin,
        first_seq: Seq(first as u64),
        last_seq: Seq(last as u64),
        prev_hash: hash32(prev)?,
        hash: hash32(hash)?,
        body,
    })
}

fn hash32(bytes: Vec<u8>) -> Result<ChainHash, HubStoreError> {
    bytes
        .try_into()
        .map(ChainHash)
        .map_err(|_| HubStoreError::Storage("a stored hash is not 32 bytes".into()))
}

const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS branches (
    branch TEXT PRIMARY KEY,
    fingerprint BLOB NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    ring TEXT NOT NULL DEFAULT 'all',
    enrolled_at INTEGER NOT NULL,
    synced_seq INTEGER NOT NULL DEFAULT 0,
    chain_head BLOB NOT NULL,
    feed_seq INTEGER NOT NULL DEFAULT 0,
    feed_head BLOB NOT NULL,
    feed_acked_seq INTEGER NOT NULL DEFAULT 0,
    feed_acked_hash BLOB NOT NULL,
    last_seen INTEGER,
    edge_version TEXT,
    edge_head_seq INTEGER NOT NULL DEFAULT 0,
    materialised_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS segments (
    origin TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    body BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (origin, last_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS feed (
    branch TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (branch, last_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shared_rows (
    tbl TEXT NOT NULL,
    id TEXT NOT NULL,
    reg BLOB NOT NULL,
    PRIMARY KEY (tbl, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conflicts (
    n INTEGER PRIMARY KEY,
    tbl TEXT NOT NULL,
    row_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    origin TEXT NOT NULL,
    versions TEXT NOT NULL,
    winner TEXT NOT NULL
);
";

/// The rows head office wrote for every branch are kept under this branch name.
pub const ALL_BRANCHES: &str = "*";

impl SqliteHubStore {
    pub fn open(path: &Path, schema: Arc<Schema>) -> Result<SqliteHubStore, HubStoreError> {
        let conn = Connection::open(path)?;
        configure(&conn)?;
        conn.execute_batch(SCHEMA_SQL)?;
        rows::migrate(&conn, &schema)?;
        let hlc: i64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'hlc'", [], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        let reader = Connection::open(path)?;
        configure(&reader)?;
        Ok(SqliteHubStore {
            schema,
            writer: Mutex::new(Writer {
                conn,
                hlc: HlcClock::starting_after(shared::Hlc(hlc as u64)),
            }),
            reader: Mutex::new(reader),
        })
    }

    fn sync_state_on(conn: &Connection, branch: &BranchId) -> Result<BranchSync, HubStoreError> {
        let origin = OriginId::from(branch);
        let hub = OriginId::hub();
        let row = conn
            .query_row(
                "SELECT synced_seq, chain_head, feed_seq, feed_head, feed_acked_seq, feed_acked_hash FROM branches WHERE branch = ?1",
                [branch.as_str()],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, Vec<u8>>(5)?,
                    ))
                },
            )
            .optional()?
            .ok_or_else(|| HubStoreError::UnknownBranch(branch.to_string()))?;
        Ok(BranchSync {
            durable: Position {
                origin,
                seq: Seq(row.0 as u64),
                hash: hash32(row.1)?,
            },
            feed_head: Position {
                origin: hub.clone(),
                seq: Seq(row.2 as u64),
                hash: hash32(row.3)?,
            },
            feed_acked: Position {
                origin: hub,
                seq: Seq(row.4 as u64),
                hash: hash32(row.5)?,
            },
        })
    }

    /// Runs `f` in a write transaction.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut Writer) -> Result<T, HubStoreError>,
    ) -> Result<T, HubStoreError> {
        let mut w = self.writer.lock();
        w.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f(&mut w) {
            Ok(v) => {
                w.conn.execute_batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                let _ = w.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }
}

impl Writer {
    /// Appends entries (already stamped with seqs from `feed_seq + 1`) to a branch's feed as
    /// one segment.
    fn append_feed(&mut self, branch: &str, entries: &[LogEntry]) -> Result<(), HubStoreError> {
        let (feed_seq, feed_head): (i64, Vec<u8>) = self.conn.query_row(
            "SELECT feed_seq, feed_head FROM branches WHERE branch = ?1",
            [branch],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let prev = hash32(feed_head)?;
        let first = Seq(feed_seq as u64 + 1);
        let encoded: Vec<Vec<u8>> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut e = e.clone();
                e.seq = Seq(first.0 + i as u64);
                e.encode()
            })
            .collect();
        let seg = Segment::seal(
            OriginId::hub(),
            first,
            prev,
            encoded.iter().map(Vec::as_slice),
        );
        self.conn
            .prepare_cached(
                "INSERT INTO feed (branch, last_seq, first_seq, prev_hash, hash, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                branch,
                seg.last_seq.0 as i64,
                seg.first_seq.0 as i64,
                &seg.prev_hash.0[..],
                &seg.hash.0[..],
                &seg.body
            ])?;
        self.conn
            .prepare_cached("UPDATE branches SET feed_seq = ?2, feed_head = ?3 WHERE branch = ?1")?
            .execute(params![branch, seg.last_seq.0 as i64, &seg.hash.0[..]])?;
        Ok(())
    }

    /// See [`HubStore::materialise`]; runs inside the caller's transaction.
    fn materialise(
        &mut self,
        schema: &Schema,
        max_entries: usize,
    ) -> Result<Materialised, HubStoreError> {
        let mut out = Materialised::default();
        let behind: Vec<(String, i64)> = self
            .conn
            .prepare_cached(
                "SELECT branch, materialised_seq FROM branches WHERE materialised_seq < synced_seq ORDER BY branch",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut relayed = std::collections::BTreeSet::new();
        for (name, from) in behind {
            let branch =
                BranchId::parse(&name).map_err(|e| HubStoreError::Storage(e.to_string()))?;
            let origin = OriginId::from(&branch);
            if out.entries >= max_entries {
                out.more = true;
                break;
            }
            // Whole segments up to about `max_entries` entries (at least one).
            let upto: i64 = from + (max_entries - out.entries) as i64;
            let segs: Vec<SegmentRow> = self
                .conn
                .prepare_cached(
                    "SELECT first_seq, last_seq, prev_hash, hash, body FROM segments WHERE origin = ?1 AND last_seq > ?2 AND (first_seq <= ?3 OR first_seq = ?2 + 1) ORDER BY last_seq",
                )?
                .query_map(params![origin.as_str(), from, upto], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut last = from;
            for row in segs {
                let segment = segment_of(origin.clone(), row)?;
                let (first, l) = (segment.first_seq, segment.last_seq.0 as i64);
                // The stored bytes were verified on arrival; decoding them checks them again.
                let entries = segment.verify(&segment.prev_hash, schema).map_err(|e| {
                    HubStoreError::Storage(format!("stored segment {first}..={l} of {branch}: {e}"))
                })?;
                for e in &entries {
                    let shared = schema
                        .table(&e.table)
                        .is_some_and(|t| t.owner == Owner::Shared);
                    if shared {
                        relayed.extend(self.merge_shared(schema, e, Some(&branch))?);
                    } else {
                        rows::apply(&self.conn, schema, branch.as_str(), e)?;
                    }
                }
                out.entries += entries.len();
                out.segments += 1;
                last = l;
            }
            self.conn
                .prepare_cached("UPDATE branches SET materialised_seq = ?2 WHERE branch = ?1")?
                .execute(params![branch.as_str(), last])?;
        }
        out.relayed = relayed.into_iter().collect();
        Ok(out)
    }

    /// The enrolled, admitted branches.
    fn live_branches(&self) -> Result<Vec<BranchId>, HubStoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT branch FROM branches WHERE revoked = 0 ORDER BY branch")?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        names
            .into_iter()
            .map(|b| BranchId::parse(&b).map_err(|e| HubStoreError::Storage(e.to_string())))
            .collect()
    }

    /// Applies a write of a shared row (from a branch, or head office when `from` is
    /// `None`) to the row's register; when the register changes, the winner is materialised
    /// for every branch (`*`), a conflict is recorded if versions are concurrent, and the
    /// write is relayed to every other branch's feed. Returns the branches relayed to.
    fn merge_shared(
        &mut self,
        schema: &Schema,
        e: &LogEntry,
        from: Option<&BranchId>,
    ) -> Result<Vec<BranchId>, HubStoreError> {
        if e.op == EntryOp::Delete {
            // Edges never delete shared rows; a delete in a log is ignored, not merged.
            return Ok(Vec::new());
        }
        let ti = schema
            .table_index(&e.table)
            .ok_or_else(|| HubStoreError::UnknownTable(e.table.clone()))?;
        let stored: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT reg FROM shared_rows WHERE tbl = ?1 AND id = ?2")?
            .query_row(params![&e.table, &e.row_id], |r| r.get(0))
            .optional()?;
        let mut reg = match stored {
            Some(b) => SharedRow::decode(&b)
                .map_err(|err| HubStoreError::Storage(format!("shared row state: {err}")))?,
            None => SharedRow::default(),
        };
        let clock = e.clock.clone().unwrap_or_default();
        let mut values = e.row.values.clone();
        values.resize(schema.columns(ti).len(), Value::Null);
        if !reg.apply(clock.clone(), e.hlc, values.clone()) {
            return Ok(Vec::new()); // seen before, or superseded
        }
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO shared_rows (tbl, id, reg) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![&e.table, &e.row_id, reg.encode()])?;
        let winner = reg
            .winner()
            .expect("a register that took a write has a version");
        let current = rows::get(&self.conn, schema, ALL_BRANCHES, &e.table, &e.row_id)?;
        let mut row = e.row.clone();
        row.id = e.row_id.clone();
        row.seq = None;
        row.columns = schema.columns(ti).clone();
        row.values = winner.values.clone();
        if let Some(c) = &current {
            row.version = c.version + 1;
            row.created_at = c.created_at;
        } else {
            row.version = 1;
        }
        let versions = reg.versions();
        if versions.len() > 1 {
            let as_json = |vals: &[Value]| {
                let mut r = row.clone();
                r.values = vals.to_vec();
                serde_json::Value::Object(shared::json::row_to_json(&r))
            };
            let all: Vec<serde_json::Value> = versions.iter().map(|v| as_json(&v.values)).collect();
            self.conn
                .prepare_cached(
                    "INSERT INTO conflicts (tbl, row_id, at, origin, versions, winner) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    &e.table,
                    &e.row_id,
                    now_micros(),
                    from.map_or(OriginId::HUB, |b| b.as_str()),
                    serde_json::Value::Array(all).to_string(),
                    as_json(&winner.values).to_string()
                ])?;
        }
        if current.as_ref().is_none_or(|c| c.values != row.values) {
            let materialised = hub_entry(&e.table, EntryOp::Update, row, e.hlc, None);
            rows::apply(&self.conn, schema, ALL_BRANCHES, &materialised)?;
        }
        // Relay the write itself (with its clock and HLC): every replica's register takes it.
        let mut relay = hub_entry(&e.table, EntryOp::Update, e.row.clone(), e.hlc, None);
        relay.row.values = values;
        relay.clock = Some(clock);
        let mut out = Vec::new();
        for b in self.live_branches()? {
            if Some(&b) != from {
                self.append_feed(b.as_str(), std::slice::from_ref(&relay))?;
                out.push(b);
            }
        }
        Ok(out)
    }

    fn tick(&mut self, now: Timestamp) -> Result<shared::Hlc, HubStoreError> {
        let h = self.hlc.tick(now.as_millis());
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('hlc', ?1)")?
            .execute([h.0 as i64])?;
        Ok(h)
    }
}

/// The materialised rows of table `ti` kept under any of `branches`, with their branch.
fn rows_of(
    conn: &Connection,
    schema: &Schema,
    ti: usize,
    branches: &[&str],
) -> Result<Vec<(String, Row)>, HubStoreError> {
    let t = &schema.tables()[ti];
    let sql = format!(
        "SELECT branch, id FROM \"r_{}\" WHERE branch = ?1 OR branch = ?2 ORDER BY id, branch",
        t.name
    );
    let keys = conn
        .prepare(&sql)?
        .query_map(
            params![branches[0], branches.get(1).copied().unwrap_or(branches[0])],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let _ = ti;
    keys.into_iter()
        .filter_map(|(b, id)| match rows::get(conn, schema, &b, &t.name, &id) {
            Ok(Some(row)) => Some(Ok((b, row))),
            Ok(None) => None,
            Err(e) => Some(Err(e.into())),
        })
        .collect()
}

/// A hub-origin entry carrying `row` (its seq is set when it joins a feed).
fn hub_entry(
    table: &str,
    op: EntryOp,
    row: Row,
    hlc: shared::Hlc,
    scope: Option<BranchId>,
) -> LogEntry {
    LogEntry {
        origin: OriginId::hub(),
        seq: Seq::ZERO,
        hlc,
        table: table.to_owned(),
        op,
        row_id: row.id.clone(),
        row,
        clock: None,
        scope,
    }
}

impl HubStore for SqliteHubStore {
    fn schema(&self) -> &Arc<Schema> {
        &self.schema
    }

    fn enroll(&self, branch: &BranchId, fingerprint: [u8; 32]) -> Result<(), HubStoreError> {
        let schema = self.schema.clone();
        self.write(|w| {
            let existed = w
                .conn
                .query_row(
                    "SELECT 1 FROM branches WHERE branch = ?1",
                    [branch.as_str()],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if existed {
                w.conn.execute(
                    "UPDATE branches SET fingerprint = ?2, revoked = 0 WHERE branch = ?1",
                    params![branch.as_str(), &fingerprint[..]],
                )?;
                return Ok(());
            }
            let origin = OriginId::from(branch);
            let hub = OriginId::hub();
            let now = now_micros();
            w.conn.execute(
                "INSERT INTO branches (branch, fingerprint, enrolled_at, chain_head, feed_head, feed_acked_hash) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                params![
                    branch.as_str(),
                    &fingerprint[..],
                    now,
                    &ChainHash::genesis(&origin).0[..],
                    &ChainHash::genesis(&hub).0[..]
                ],
            )?;
            // The new branch's feed starts with every current head-office row for it.
            let mut seed = Vec::new();
            for (ti, t) in schema.tables().iter().enumerate() {
                if t.owner != Owner::Hub {
                    continue;
                }
                for (scope, row) in rows_of(&w.conn, &schema, ti, &[ALL_BRANCHES, branch.as_str()])? {
                    let scope = (scope != ALL_BRANCHES).then(|| branch.clone());
                    let hlc = w.hlc.last();
                    seed.push(hub_entry(&t.name, EntryOp::Insert, row, hlc, scope));
                }
            }
            // A branch-scoped row replaces the all-branches row with the same id.
            let mut chosen: std::collections::BTreeMap<(String, String), LogEntry> =
                std::collections::BTreeMap::new();
            for e in seed {
                let key = (e.table.clone(), e.row_id.clone());
                if e.scope.is_some() || !chosen.contains_key(&key) {
                    chosen.insert(key, e);
                }
            }
            let seed: Vec<LogEntry> = chosen.into_values().collect();
            for chunk in seed.chunks(FEED_SEED_SEGMENT_ENTRIES) {
                w.append_feed(branch.as_str(), chunk)?;
            }
            Ok(())
        })
    }

    fn revoke(&self, branch: &BranchId) -> Result<bool, HubStoreError> {
        self.write(|w| {
            Ok(w.conn.execute(
                "UPDATE branches SET revoked = 1 WHERE branch = ?1",
                [branch.as_str()],
            )? > 0)
        })
    }

    fn admission(
        &self,
        branch: &BranchId,
        fingerprint: &[u8; 32],
    ) -> Result<Admission, HubStoreError> {
        let conn = self.reader.lock();
        let row: Option<(Vec<u8>, bool)> = conn
            .query_row(
                "SELECT fingerprint, revoked FROM branches WHERE branch = ?1",
                [branch.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(match row {
            None => Admission::NotEnrolled,
            Some((_, true)) => Admission::Revoked,
            Some((f, false)) if f[..] != fingerprint[..] => Admission::Superseded,
            Some(_) => Admission::Allowed,
        })
    }

    fn sync_state(&self, branch: &BranchId) -> Result<BranchSync, HubStoreError> {
        Self::sync_state_on(&self.reader.lock(), branch)
    }

    fn persist(&self, branch: &BranchId, segment: &Segment) -> Result<Position, HubStoreError> {
        self.write(|w| {
            let state = Self::sync_state_on(&w.conn, branch)?;
            if segment.last_seq <= state.durable.seq {
                return Ok(state.durable);
            }
            if segment.first_seq != state.durable.seq.next()
                || segment.prev_hash != state.durable.hash
                || segment.origin != state.durable.origin
            {
                return Err(HubStoreError::NotNext {
                    first: segment.first_seq,
                    last: segment.last_seq,
                    stored: state.durable.seq,
                });
            }
            w.conn
                .prepare_cached(
                    "INSERT INTO segments (origin, last_seq, first_seq, prev_hash, hash, body, received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    segment.origin.as_str(),
                    segment.last_seq.0 as i64,
                    segment.first_seq.0 as i64,
                    &segment.prev_hash.0[..],
                    &segment.hash.0[..],
                    &segment.body,
                    now_micros()
                ])?;
            w.conn
                .prepare_cached(
                    "UPDATE branches SET synced_seq = ?2, chain_head = ?3, last_seen = ?4 WHERE branch = ?1",
                )?
                .execute(params![
                    branch.as_str(),
                    segment.last_seq.0 as i64,
                    &segment.hash.0[..],
                    now_micros()
                ])?;
            Ok(Position {
                origin: segment.origin.clone(),
                seq: segment.last_seq,
                hash: segment.hash,
            })
        })
    }

    fn materialise(&self, max_entries: usize) -> Result<Materialised, HubStoreError> {
        let schema = self.schema.clone();
        self.write(|w| w.materialise(&schema, max_entries))
    }

    fn feed_after(
        &self,
        branch: &BranchId,
        after: Seq,
        max: usize,
    ) -> Result<Vec<Segment>, HubStoreError> {
        let conn = self.reader.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT first_seq, last_seq, prev_hash, hash, body FROM feed WHERE branch = ?1 AND last_seq > ?2 ORDER BY last_seq LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(params![branch.as_str(), after.0 as i64, max as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(first, last, prev, hash, body)| {
                Ok(Segment {
                    origin: OriginId::hub(),
                    first_seq: Seq(first as u64),
                    last_seq: Seq(last as u64),
                    prev_hash: hash32(prev)?,
                    hash: hash32(hash)?,
                    body,
                })
            })
            .collect()
    }

    fn record_feed_ack(&self, branch: &BranchId, pos: &Position) -> Result<(), HubStoreError> {
        self.write(|w| {
            w.conn
                .prepare_cached(
                    "UPDATE branches SET feed_acked_seq = ?2, feed_acked_hash = ?3 WHERE branch = ?1 AND feed_acked_seq < ?2",
                )?
                .execute(params![branch.as_str(), pos.seq.0 as i64, &pos.hash.0[..]])?;
            Ok(())
        })
    }

    fn record_hello(
        &self,
        branch: &BranchId,
        software: &str,
        edge_head: Seq,
        now: Timestamp,
    ) -> Result<(), HubStoreError> {
        self.write(|w| {
            w.conn
                .prepare_cached(
                    "UPDATE branches SET edge_version = ?2, edge_head_seq = ?3, last_seen = ?4 WHERE branch = ?1",
                )?
                .execute(params![branch.as_str(), software, edge_head.0 as i64, now.0])?;
            Ok(())
        })
    }

    fn put_hub_row(
        &self,
        table: &str,
        id: &str,
        fields: Fields,
        scope: Option<&BranchId>,
        now: Timestamp,
    ) -> Result<PutOutcome, HubStoreError> {
        let schema = self.schema.clone();
        let ti = schema
            .table_index(table)
            .ok_or_else(|| HubStoreError::UnknownTable(table.to_owned()))?;
        let owner = schema.tables()[ti].owner;
        if owner == Owner::Branch {
            return Err(HubStoreError::NotHubOwned(table.to_owned()));
        }
        if owner == Owner::Shared {
            if scope.is_some() {
                return Err(HubStoreError::SharedScoped(table.to_owned()));
            }
            return self.write(|w| {
                let mut row =
                    rows::get(&w.conn, &schema, ALL_BRANCHES, table, id)?.unwrap_or(Row {
                        id: id.to_owned(),
                        version: 0,
                        created_at: now,
                        updated_at: now,
                        seq: None,
                        columns: schema.columns(ti).clone(),
                        values: vec![Value::Null; schema.columns(ti).len()],
                    });
                row.updated_at = now;
                for (k, v) in fields {
                    row.set(&k, v);
                }
                let stored: Option<Vec<u8>> = w
                    .conn
                    .prepare_cached("SELECT reg FROM shared_rows WHERE tbl = ?1 AND id = ?2")?
                    .query_row(params![table, id], |r| r.get(0))
                    .optional()?;
                let reg = match stored {
                    Some(b) => SharedRow::decode(&b).map_err(|err| {
                        HubStoreError::Storage(format!("shared row state: {err}"))
                    })?,
                    None => SharedRow::default(),
                };
                // Head office writes on top of everything it has seen.
                let hlc = w.tick(now)?;
                let mut next = reg.clone();
                let clock = next.write(&OriginId::hub(), hlc, row.values.clone());
                let mut entry = hub_entry(table, EntryOp::Update, row, hlc, None);
                entry.clock = Some(clock);
                let branches = w.merge_shared(&schema, &entry, None)?;
                let row =
                    rows::get(&w.conn, &schema, ALL_BRANCHES, table, id)?.ok_or_else(|| {
                        HubStoreError::Storage("a merged shared row is missing".into())
                    })?;
                Ok(PutOutcome { row, branches })
            });
        }
        self.write(|w| {
            let key = scope.map_or(ALL_BRANCHES, |b| b.as_str());
            if let Some(b) = scope {
                let enrolled = w
                    .conn
                    .query_row(
                        "SELECT 1 FROM branches WHERE branch = ?1",
                        [b.as_str()],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some();
                if !enrolled {
                    return Err(HubStoreError::UnknownBranch(b.to_string()));
                }
            }
            let existing = rows::get(&w.conn, &schema, key, table, id)?;
            let (op, mut row) = match existing {
                Some(mut r) => {
                    r.version += 1;
                    r.updated_at = now;
                    (EntryOp::Update, r)
                }
                None => (
                    EntryOp::Insert,
                    Row {
                        id: id.to_owned(),
                        version: 1,
                        created_at: now,
                        updated_at: now,
                        seq: None,
                        columns: schema.columns(ti).clone(),
                        values: vec![Value::Null; schema.columns(ti).len()],
                    },
                ),
            };
            for (k, v) in fields {
                row.set(&k, v);
            }
            let hlc = w.tick(now)?;
            let entry = hub_entry(table, op, row.clone(), hlc, scope.cloned());
            rows::apply(&w.conn, &schema, key, &entry)?;
            // Which feeds get it: the one branch, or every enrolled branch without its own
            // row of that id (a branch-scoped row overrides the all-branches one).
            let targets: Vec<String> = match scope {
                Some(b) => vec![b.as_str().to_owned()],
                None => {
                    let mut stmt = w.conn.prepare_cached(
                        "SELECT branch FROM branches WHERE revoked = 0 ORDER BY branch",
                    )?;
                    let all = stmt
                        .query_map([], |r| r.get::<_, String>(0))?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    drop(stmt);
                    let mut out = Vec::new();
                    for b in all {
                        if rows::get(&w.conn, &schema, &b, table, id)?.is_none() {
                            out.push(b);
                        }
                    }
                    out
                }
            };
            let mut branches = Vec::with_capacity(targets.len());
            for b in targets {
                w.append_feed(&b, std::slice::from_ref(&entry))?;
                branches
                    .push(BranchId::parse(&b).map_err(|e| HubStoreError::Storage(e.to_string()))?);
            }
            Ok(PutOutcome { row, branches })
        })
    }

    fn branches(&self) -> Result<Vec<BranchInfo>, HubStoreError> {
        let conn = self.reader.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT branch, revoked, ring, synced_seq, chain_head, last_seen, edge_version, feed_seq, feed_acked_seq, edge_head_seq, materialised_seq FROM branches ORDER BY branch",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, i64>(8)?,
                    r.get::<_, i64>(9)?,
                    r.get::<_, i64>(10)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|r| {
                Ok(BranchInfo {
                    branch: BranchId::parse(&r.0)
                        .map_err(|e| HubStoreError::Storage(e.to_string()))?,
                    revoked: r.1,
                    ring: r.2,
                    synced_seq: Seq(r.3 as u64),
                    chain_head: hash32(r.4)?,
                    last_seen: r.5.map(Timestamp),
                    edge_version: r.6,
                    feed_seq: Seq(r.7 as u64),
                    feed_acked_seq: Seq(r.8 as u64),
                    edge_head_seq: Seq(r.9 as u64),
                    materialised_seq: Seq(r.10 as u64),
                })
            })
            .collect()
    }

    fn conflicts(&self, limit: usize) -> Result<Vec<Conflict>, HubStoreError> {
        let conn = self.reader.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT tbl, row_id, at, origin, versions, winner FROM conflicts ORDER BY n DESC LIMIT ?1",
        )?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows
            .into_iter()
            .map(|(table, row_id, at, origin, versions, winner)| Conflict {
                table,
                row_id,
                at: Timestamp(at),
                origin,
                versions: serde_json::from_str(&versions).unwrap_or_default(),
                winner: serde_json::from_str(&winner).unwrap_or_default(),
            })
            .collect())
    }

    fn query(&self, body: &serde_json::Value) -> Result<serde_json::Value, rows::QueryError> {
        // A query sees every acknowledged entry: what is stored but not yet materialised is
        // materialised first.
        loop {
            match self.materialise(MATERIALISE_BATCH) {
                Ok(m) if m.more => continue,
                Ok(_) => break,
                Err(e) => {
                    return Err(rows::QueryError {
                        status: 500,
                        code: "storage",
                        message: e.to_string(),
                    });
                }
            }
        }
        rows::query(&self.reader.lock(), &self.schema, body)
    }
}

/// Wall-clock microseconds (for bookkeeping columns; rows carry the caller's `now`).
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}
