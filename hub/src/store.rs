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
use shared::release::{OFFERS_MAX, ReleaseOffer, UpdateOutcome, UpdateReport, is_newer};
use shared::schema::Owner;
use shared::wire::Position;
use shared::{BranchId, Fields, HlcClock, OriginId, Row, Schema, Seq, Timestamp, Value};

use crate::releases::{Release, Ring};
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
    #[error("release {0} was published before; a published release never changes")]
    ReleaseExists(String),
    #[error("there is no release {0}")]
    UnknownRelease(String),
    #[error("release {0} is in ring {1} on its other platforms; publish it to ring {1}")]
    RingMismatch(String, &'static str),
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
    /// The platform the edge named (protocol 2 on); none for an older edge.
    pub edge_target: Option<String>,
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

/// An edge's report of how an update attempt ended, as the hub keeps it (the latest per
/// branch and release).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchOutcome {
    pub branch: BranchId,
    pub report: UpdateReport,
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
    /// Records the platform the branch's edge named after its hello (a hello clears it: an
    /// edge that does not name one is an older one).
    fn record_platform(&self, branch: &BranchId, target: &str) -> Result<(), HubStoreError>;
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

    /// Records a published release (its artifact is already durable on disk). A version
    /// published before for the same target is refused with [`HubStoreError::ReleaseExists`],
    /// one whose other platforms are in another ring with [`HubStoreError::RingMismatch`],
    /// and nothing changes.
    fn add_release(&self, release: &Release) -> Result<(), HubStoreError>;
    /// One release (a version for a target), if it was published.
    fn release(&self, version: &str, target: &str) -> Result<Option<Release>, HubStoreError>;
    /// Every release, newest version first (semantic version order), then by target.
    fn releases(&self) -> Result<Vec<Release>, HubStoreError>;
    /// The releases of `version`, one per target it was published for, by target.
    fn version_releases(&self, version: &str) -> Result<Vec<Release>, HubStoreError>;
    /// Moves a version (for every target it was published for) to ring `all`, so every branch
    /// is offered it, and returns its releases.
    fn promote_release(&self, version: &str) -> Result<Vec<Release>, HubStoreError>;
    /// Puts a branch in a rollout ring.
    fn set_ring(&self, branch: &BranchId, ring: Ring) -> Result<(), HubStoreError>;
    /// The releases offered to a branch that runs version `running` on `target`: those for
    /// its target (every target when the edge did not name one: protocol 1), of ring `all`,
    /// and of ring `canary` when the branch is in the canary ring, newer than `running`;
    /// newest first, at most [`OFFERS_MAX`].
    fn offers(
        &self,
        branch: &BranchId,
        running: &str,
        target: Option<&str>,
    ) -> Result<Vec<ReleaseOffer>, HubStoreError>;
    /// Release `version` for `target` if it is offered to the branch by the ring rules
    /// (whatever version the branch runs), else `None`.
    fn offered_release(
        &self,
        branch: &BranchId,
        version: &str,
        target: &str,
    ) -> Result<Option<Release>, HubStoreError>;
    /// Keeps the branch's update reports: per release, the one with the latest `at` wins.
    /// Reports about versions the hub never published are ignored. Returns how many were
    /// kept.
    fn record_update_reports(
        &self,
        branch: &BranchId,
        reports: &[UpdateReport],
    ) -> Result<usize, HubStoreError>;
    /// Every branch's kept update outcomes, by branch, each branch's newest first.
    fn update_outcomes(&self) -> Result<Vec<BranchOutcome>, HubStoreError>;
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
    edge_target TEXT,
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
CREATE TABLE IF NOT EXISTS releases (
    version TEXT NOT NULL,
    target TEXT NOT NULL,
    size INTEGER NOT NULL,
    hash BLOB NOT NULL,
    signature BLOB NOT NULL,
    ring TEXT NOT NULL,
    published_at INTEGER NOT NULL,
    PRIMARY KEY (version, target)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS release_outcomes (
    branch TEXT NOT NULL,
    version TEXT NOT NULL,
    from_version TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (branch, version)
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

/// A hub created before releases had one row per target kept one per version: its rows move
/// to the table keyed by version and target.
fn migrate_releases(conn: &Connection) -> Result<(), HubStoreError> {
    let sql: Option<String> = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'releases'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if !sql.is_some_and(|s| s.contains("version TEXT PRIMARY KEY")) {
        return Ok(());
    }
    let ddl = SCHEMA_SQL
        .split(';')
        .find(|stmt| stmt.contains("CREATE TABLE IF NOT EXISTS releases ("))
        .ok_or_else(|| HubStoreError::Storage("the releases table's definition".into()))?;
    conn.execute_batch(&format!(
        "BEGIN;
         ALTER TABLE releases RENAME TO releases_by_version;
         {ddl};
         INSERT INTO releases ({RELEASE_COLUMNS}) SELECT {RELEASE_COLUMNS} FROM releases_by_version;
         DROP TABLE releases_by_version;
         COMMIT;"
    ))?;
    tracing::info!("releases table migrated to one row per version and target");
    Ok(())
}

/// A hub from before edges named their platform has no `branches.edge_target`.
fn migrate_branches(conn: &Connection) -> Result<(), HubStoreError> {
    let has: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('branches') WHERE name = 'edge_target'")?
        .exists([])?;
    if !has {
        conn.execute_batch("ALTER TABLE branches ADD COLUMN edge_target TEXT")?;
    }
    Ok(())
}

/// The rows head office wrote for every branch are kept under this branch name.
pub const ALL_BRANCHES: &str = "*";

impl SqliteHubStore {
    pub fn open(path: &Path, schema: Arc<Schema>) -> Result<SqliteHubStore, HubStoreError> {
        let conn = Connection::open(path)?;
        configure(&conn)?;
        conn.execute_batch(SCHEMA_SQL)?;
        migrate_releases(&conn)?;
        migrate_branches(&conn)?;
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

const RELEASE_COLUMNS: &str = "version, target, size, hash, signature, ring, published_at";

/// A release from a row of [`RELEASE_COLUMNS`].
fn release_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Release, HubStoreError>> {
    let (version, target, size, hash, signature, ring, published_at): (
        String,
        String,
        i64,
        Vec<u8>,
        Vec<u8>,
        String,
        i64,
    ) = (
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
    );
    let bad = |what: &str| HubStoreError::Storage(format!("release {version}: {what}"));
    Ok((|| {
        Ok(Release {
            hash: hash.try_into().map_err(|_| bad("a hash is 32 bytes"))?,
            signature: signature
                .try_into()
                .map_err(|_| bad("a signature is 64 bytes"))?,
            ring: Ring::parse(&ring).ok_or_else(|| bad("unknown ring"))?,
            size: u64::try_from(size).map_err(|_| bad("negative size"))?,
            published_at: Timestamp(published_at),
            target,
            version: version.clone(),
        })
    })())
}

/// Every release, newest version first.
fn releases_on(conn: &Connection) -> Result<Vec<Release>, HubStoreError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {RELEASE_COLUMNS} FROM releases"))?;
    let mut out = stmt
        .query_map([], release_of)?
        .collect::<rusqlite::Result<Vec<_>>>()?
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    // Stored versions were checked on publish; one that does not parse sorts last.
    out.sort_by_cached_key(|r| {
        (
            std::cmp::Reverse(shared::release::parse_version(&r.version).ok()),
            r.target.clone(),
        )
    });
    Ok(out)
}

fn release_on(
    conn: &Connection,
    version: &str,
    target: &str,
) -> Result<Option<Release>, HubStoreError> {
    conn.prepare_cached(&format!(
        "SELECT {RELEASE_COLUMNS} FROM releases WHERE version = ?1 AND target = ?2"
    ))?
    .query_row([version, target], release_of)
    .optional()?
    .transpose()
}

/// The releases of `version`, one per target it was published for.
fn version_on(conn: &Connection, version: &str) -> Result<Vec<Release>, HubStoreError> {
    conn.prepare_cached(&format!(
        "SELECT {RELEASE_COLUMNS} FROM releases WHERE version = ?1 ORDER BY target"
    ))?
    .query_map([version], release_of)?
    .collect::<rusqlite::Result<Vec<_>>>()?
    .into_iter()
    .collect()
}

/// A branch's rollout ring.
fn ring_on(conn: &Connection, branch: &BranchId) -> Result<Ring, HubStoreError> {
    let ring: String = conn
        .prepare_cached("SELECT ring FROM branches WHERE branch = ?1")?
        .query_row([branch.as_str()], |r| r.get(0))
        .optional()?
        .ok_or_else(|| HubStoreError::UnknownBranch(branch.to_string()))?;
    // A ring this build does not know gets only general releases.
    Ok(Ring::parse(&ring).unwrap_or(Ring::All))
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
                    "UPDATE branches SET edge_version = ?2, edge_head_seq = ?3, last_seen = ?4, edge_target = NULL WHERE branch = ?1",
                )?
                .execute(params![branch.as_str(), software, edge_head.0 as i64, now.0])?;
            Ok(())
        })
    }

    fn record_platform(&self, branch: &BranchId, target: &str) -> Result<(), HubStoreError> {
        self.write(|w| {
            w.conn
                .prepare_cached("UPDATE branches SET edge_target = ?2 WHERE branch = ?1")?
                .execute(params![branch.as_str(), target])?;
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
            "SELECT branch, revoked, ring, synced_seq, chain_head, last_seen, edge_version, feed_seq, feed_acked_seq, edge_head_seq, materialised_seq, edge_target FROM branches ORDER BY branch",
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
                    r.get::<_, Option<String>>(11)?,
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
                    edge_target: r.11,
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

    fn add_release(&self, release: &Release) -> Result<(), HubStoreError> {
        self.write(|w| {
            if release_on(&w.conn, &release.version, &release.target)?.is_some() {
                return Err(HubStoreError::ReleaseExists(format!(
                    "{} for {}",
                    release.version, release.target
                )));
            }
            // A version is in one ring on every platform: promotion moves it as a whole.
            if let Some(other) = version_on(&w.conn, &release.version)?.first()
                && other.ring != release.ring
            {
                return Err(HubStoreError::RingMismatch(
                    release.version.clone(),
                    other.ring.as_str(),
                ));
            }
            w.conn.execute(
                &format!(
                    "INSERT INTO releases ({RELEASE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                ),
                params![
                    &release.version,
                    &release.target,
                    i64::try_from(release.size)
                        .map_err(|_| HubStoreError::Storage("a release size over i64".into()))?,
                    &release.hash[..],
                    &release.signature[..],
                    release.ring.as_str(),
                    release.published_at.0
                ],
            )?;
            Ok(())
        })
    }

    fn release(&self, version: &str, target: &str) -> Result<Option<Release>, HubStoreError> {
        release_on(&self.reader.lock(), version, target)
    }

    fn releases(&self) -> Result<Vec<Release>, HubStoreError> {
        releases_on(&self.reader.lock())
    }

    fn version_releases(&self, version: &str) -> Result<Vec<Release>, HubStoreError> {
        version_on(&self.reader.lock(), version)
    }

    fn promote_release(&self, version: &str) -> Result<Vec<Release>, HubStoreError> {
        self.write(|w| {
            let changed = w.conn.execute(
                "UPDATE releases SET ring = ?2 WHERE version = ?1",
                params![version, Ring::All.as_str()],
            )?;
            if changed == 0 {
                return Err(HubStoreError::UnknownRelease(version.to_owned()));
            }
            version_on(&w.conn, version)
        })
    }

    fn set_ring(&self, branch: &BranchId, ring: Ring) -> Result<(), HubStoreError> {
        self.write(|w| {
            let changed = w.conn.execute(
                "UPDATE branches SET ring = ?2 WHERE branch = ?1",
                params![branch.as_str(), ring.as_str()],
            )?;
            if changed == 0 {
                return Err(HubStoreError::UnknownBranch(branch.to_string()));
            }
            Ok(())
        })
    }

    fn offers(
        &self,
        branch: &BranchId,
        running: &str,
        target: Option<&str>,
    ) -> Result<Vec<ReleaseOffer>, HubStoreError> {
        let conn = self.reader.lock();
        let ring = ring_on(&conn, branch)?;
        Ok(releases_on(&conn)?
            .iter()
            .filter(|r| target.is_none_or(|t| r.target == t))
            .filter(|r| ring.gets(r.ring) && is_newer(&r.version, running))
            .take(OFFERS_MAX)
            .map(Release::offer)
            .collect())
    }

    fn offered_release(
        &self,
        branch: &BranchId,
        version: &str,
        target: &str,
    ) -> Result<Option<Release>, HubStoreError> {
        let conn = self.reader.lock();
        let ring = ring_on(&conn, branch)?;
        Ok(release_on(&conn, version, target)?.filter(|r| ring.gets(r.ring)))
    }

    fn record_update_reports(
        &self,
        branch: &BranchId,
        reports: &[UpdateReport],
    ) -> Result<usize, HubStoreError> {
        self.write(|w| {
            let mut kept = 0;
            for r in reports {
                if version_on(&w.conn, &r.version)?.is_empty() {
                    continue;
                }
                w.conn
                    .prepare_cached(
                        "INSERT INTO release_outcomes (branch, version, from_version, outcome, detail, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT (branch, version) DO UPDATE SET from_version = excluded.from_version, outcome = excluded.outcome, detail = excluded.detail, at = excluded.at
                         WHERE excluded.at >= release_outcomes.at",
                    )?
                    .execute(params![
                        branch.as_str(),
                        &r.version,
                        &r.from,
                        r.outcome.as_str(),
                        &r.detail,
                        r.at
                    ])?;
                kept += 1;
            }
            Ok(kept)
        })
    }

    fn update_outcomes(&self) -> Result<Vec<BranchOutcome>, HubStoreError> {
        let conn = self.reader.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT branch, version, from_version, outcome, detail, at FROM release_outcomes ORDER BY branch, at DESC, version DESC",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(branch, version, from, outcome, detail, at)| {
                Ok(BranchOutcome {
                    branch: BranchId::parse(&branch)
                        .map_err(|e| HubStoreError::Storage(e.to_string()))?,
                    report: UpdateReport {
                        outcome: UpdateOutcome::parse(&outcome).ok_or_else(|| {
                            HubStoreError::Storage(format!("unknown update outcome {outcome:?}"))
                        })?,
                        version,
                        from,
                        detail,
                        at,
                    },
                })
            })
            .collect()
    }
}

/// Wall-clock microseconds (for bookkeeping columns; rows carry the caller's `now`).
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SqliteHubStore) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteHubStore::open(&dir.path().join("hub.db"), Arc::new(shared::pos::schema()))
                .unwrap();
        for b in ["B001", "B002"] {
            store.enroll(&branch(b), [1; 32]).unwrap();
        }
        (dir, store)
    }

    fn branch(id: &str) -> BranchId {
        BranchId::parse(id).unwrap()
    }

    const X86: &str = "x86_64-linux";

    fn release(version: &str, ring: Ring) -> Release {
        Release {
            version: version.to_owned(),
            target: X86.to_owned(),
            size: 10,
            hash: *blake3::hash(version.as_bytes()).as_bytes(),
            signature: [7; 64],
            ring,
            published_at: Timestamp(1_700_000_000_000_000),
        }
    }

    fn versions(offers: &[ReleaseOffer]) -> Vec<&str> {
        offers.iter().map(|o| o.version.as_str()).collect()
    }

    fn report(version: &str, outcome: UpdateOutcome, at: i64) -> UpdateReport {
        UpdateReport {
            version: version.to_owned(),
            from: "0.1.0".to_owned(),
            outcome,
            detail: format!("{} at {at}", outcome.as_str()),
            at,
        }
    }

    #[test]
    fn releases_list_newest_first_by_semver() {
        let (_d, s) = store();
        for v in ["0.9.0", "1.0.0-rc.1", "0.10.0", "1.0.0", "0.10.0-beta"] {
            s.add_release(&release(v, Ring::All)).unwrap();
        }
        let listed: Vec<String> = s
            .releases()
            .unwrap()
            .into_iter()
            .map(|r| r.version)
            .collect();
        assert_eq!(
            listed,
            ["1.0.0", "1.0.0-rc.1", "0.10.0", "0.10.0-beta", "0.9.0"]
        );
        // Every field round-trips.
        assert_eq!(
            s.release("0.9.0", X86).unwrap(),
            Some(release("0.9.0", Ring::All))
        );
        assert_eq!(s.release("9.9.9", X86).unwrap(), None);
    }

    #[test]
    fn a_release_is_published_once() {
        let (_d, s) = store();
        s.add_release(&release("1.0.0", Ring::Canary)).unwrap();
        let mut again = release("1.0.0", Ring::All);
        again.size = 99;
        assert!(matches!(
            s.add_release(&again),
            Err(HubStoreError::ReleaseExists(v)) if v == "1.0.0 for x86_64-linux"
        ));
        assert_eq!(
            s.release("1.0.0", X86).unwrap(),
            Some(release("1.0.0", Ring::Canary)),
            "the first publication stands"
        );
    }

    #[test]
    fn offers_follow_the_ring_and_the_running_version() {
        let (_d, s) = store();
        let (general, canary) = (branch("B001"), branch("B002"));
        s.add_release(&release("0.1.0", Ring::All)).unwrap();
        s.add_release(&release("0.2.0", Ring::Canary)).unwrap();
        s.add_release(&release("0.3.0", Ring::All)).unwrap();
        s.add_release(&release("0.4.0", Ring::Canary)).unwrap();
        s.set_ring(&canary, Ring::Canary).unwrap();

        assert_eq!(
            versions(&s.offers(&general, "0.1.0", Some(X86)).unwrap()),
            ["0.3.0"]
        );
        assert_eq!(
            versions(&s.offers(&canary, "0.1.0", Some(X86)).unwrap()),
            ["0.4.0", "0.3.0", "0.2.0"]
        );
        assert_eq!(
            versions(&s.offers(&canary, "0.3.0", Some(X86)).unwrap()),
            ["0.4.0"]
        );
        assert!(s.offers(&canary, "0.4.0", Some(X86)).unwrap().is_empty());
        assert!(s.offers(&general, "1.0.0", Some(X86)).unwrap().is_empty());
        // A version that does not parse is older than any release.
        assert_eq!(
            versions(&s.offers(&general, "unknown", Some(X86)).unwrap()),
            ["0.3.0", "0.1.0"]
        );
        // The offer carries what the edge verifies.
        let offer = &s.offers(&general, "0.2.0", Some(X86)).unwrap()[0];
        assert_eq!(offer, &release("0.3.0", Ring::All).offer());
        assert_eq!(offer.signature.len(), 64);
        assert!(matches!(
            s.offers(&branch("B999"), "0.1.0", Some(X86)),
            Err(HubStoreError::UnknownBranch(_))
        ));

        // Whether a download is allowed depends on the ring, not the running version.
        assert!(s.offered_release(&general, "0.1.0", X86).unwrap().is_some());
        assert!(s.offered_release(&general, "0.2.0", X86).unwrap().is_none());
        assert!(s.offered_release(&canary, "0.2.0", X86).unwrap().is_some());
        assert!(s.offered_release(&canary, "7.0.0", X86).unwrap().is_none());
    }

    #[test]
    fn a_version_is_released_per_target_and_offered_to_its_target_only() {
        let (_d, s) = store();
        let b = branch("B001");
        let arm = |v: &str, ring| Release {
            target: "aarch64-linux".into(),
            hash: [3; 32],
            ..release(v, ring)
        };
        s.add_release(&release("0.2.0", Ring::Canary)).unwrap();
        s.add_release(&arm("0.2.0", Ring::Canary)).unwrap();
        // Newer arm releases do not crowd the x86 one out of an x86 edge's offers.
        for minor in 3..(3 + OFFERS_MAX) {
            s.add_release(&arm(&format!("0.{minor}.0"), Ring::All))
                .unwrap();
        }
        s.set_ring(&b, Ring::Canary).unwrap();
        let offers = s.offers(&b, "0.1.0", Some(X86)).unwrap();
        assert_eq!(versions(&offers), ["0.2.0"]);
        assert_eq!(offers[0].target, X86);
        assert_eq!(
            s.offers(&b, "0.1.0", Some("aarch64-linux")).unwrap().len(),
            OFFERS_MAX
        );
        assert!(
            s.offers(&b, "0.1.0", Some("riscv64-linux"))
                .unwrap()
                .is_empty()
        );
        // A protocol 1 edge names no platform: every target's releases, newest first.
        let all = s.offers(&b, "0.1.0", None).unwrap();
        assert_eq!(all.len(), OFFERS_MAX);
        assert!(all.iter().all(|o| o.target == "aarch64-linux"));
        assert_eq!(
            s.release("0.2.0", "aarch64-linux").unwrap(),
            Some(arm("0.2.0", Ring::Canary))
        );
        assert!(
            s.offered_release(&b, "0.2.0", "aarch64-linux")
                .unwrap()
                .is_some()
        );
        assert!(
            s.offered_release(&b, "0.2.0", "riscv64-linux")
                .unwrap()
                .is_none()
        );
        // Promotion moves every target of the version.
        let promoted = s.promote_release("0.2.0").unwrap();
        assert_eq!(promoted.len(), 2);
        assert!(promoted.iter().all(|r| r.ring == Ring::All));
        // A third platform joins the version's ring, not another.
        let riscv = |ring| Release {
            target: "riscv64-linux".into(),
            ..release("0.2.0", ring)
        };
        assert!(matches!(
            s.add_release(&riscv(Ring::Canary)),
            Err(HubStoreError::RingMismatch(v, "all")) if v == "0.2.0"
        ));
        assert_eq!(s.release("0.2.0", "riscv64-linux").unwrap(), None);
        s.add_release(&riscv(Ring::All)).unwrap();
        // The listing: newest version first, then by target.
        let listed: Vec<(String, String)> = s
            .releases()
            .unwrap()
            .into_iter()
            .map(|r| (r.version, r.target))
            .filter(|(v, _)| v == "0.2.0")
            .collect();
        assert_eq!(
            listed,
            [
                ("0.2.0".to_owned(), "aarch64-linux".to_owned()),
                ("0.2.0".to_owned(), "riscv64-linux".to_owned()),
                ("0.2.0".to_owned(), X86.to_owned())
            ]
        );
    }

    #[test]
    fn a_hub_from_before_targets_keeps_its_releases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE releases (
                    version TEXT PRIMARY KEY,
                    target TEXT NOT NULL,
                    size INTEGER NOT NULL,
                    hash BLOB NOT NULL,
                    signature BLOB NOT NULL,
                    ring TEXT NOT NULL,
                    published_at INTEGER NOT NULL
                ) WITHOUT ROWID;",
            )
            .unwrap();
            let r = release("0.5.0", Ring::Canary);
            conn.execute(
                &format!(
                    "INSERT INTO releases ({RELEASE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                ),
                params![
                    &r.version,
                    &r.target,
                    10i64,
                    &r.hash[..],
                    &r.signature[..],
                    "canary",
                    r.published_at.0
                ],
            )
            .unwrap();
        }
        let s = SqliteHubStore::open(&path, Arc::new(shared::pos::schema())).unwrap();
        assert_eq!(
            s.release("0.5.0", X86).unwrap(),
            Some(release("0.5.0", Ring::Canary))
        );
        // And the version can now have a second target.
        s.add_release(&Release {
            target: "aarch64-linux".into(),
            ..release("0.5.0", Ring::Canary)
        })
        .unwrap();
        assert_eq!(s.promote_release("0.5.0").unwrap().len(), 2);
        drop(s);
        // Opening again migrates nothing more.
        let s = SqliteHubStore::open(&path, Arc::new(shared::pos::schema())).unwrap();
        assert_eq!(s.releases().unwrap().len(), 2);
    }

    #[test]
    fn a_hub_from_before_platforms_gains_the_column_and_records_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let schema = Arc::new(shared::pos::schema());
        {
            let s = SqliteHubStore::open(&path, schema.clone()).unwrap();
            s.enroll(&branch("B001"), [1; 32]).unwrap();
        }
        Connection::open(&path)
            .unwrap()
            .execute_batch("ALTER TABLE branches DROP COLUMN edge_target")
            .unwrap();
        let s = SqliteHubStore::open(&path, schema).unwrap();
        let b = branch("B001");
        let target_of = |s: &SqliteHubStore| s.branches().unwrap()[0].edge_target.clone();
        assert_eq!(target_of(&s), None);
        s.record_platform(&b, X86).unwrap();
        assert_eq!(target_of(&s).as_deref(), Some(X86));
        // A hello clears it until the edge names it again.
        s.record_hello(&b, "0.1.0", Seq(0), Timestamp(1)).unwrap();
        assert_eq!(target_of(&s), None);
    }

    #[test]
    fn offers_are_capped_newest_first() {
        let (_d, s) = store();
        for minor in 1..=(OFFERS_MAX + 4) {
            s.add_release(&release(&format!("0.{minor}.0"), Ring::All))
                .unwrap();
        }
        let offers = s.offers(&branch("B001"), "0.0.1", Some(X86)).unwrap();
        assert_eq!(offers.len(), OFFERS_MAX);
        assert_eq!(offers[0].version, format!("0.{}.0", OFFERS_MAX + 4));
    }

    #[test]
    fn promoting_offers_a_canary_release_to_everyone() {
        let (_d, s) = store();
        let general = branch("B001");
        s.add_release(&release("0.2.0", Ring::Canary)).unwrap();
        assert!(s.offers(&general, "0.1.0", Some(X86)).unwrap().is_empty());
        let promoted = s.promote_release("0.2.0").unwrap();
        assert_eq!(promoted, [release("0.2.0", Ring::All)]);
        assert_eq!(
            versions(&s.offers(&general, "0.1.0", Some(X86)).unwrap()),
            ["0.2.0"]
        );
        // Promoting again changes nothing; an unknown release is an error.
        assert_eq!(s.promote_release("0.2.0").unwrap(), promoted);
        assert!(matches!(
            s.promote_release("0.9.0"),
            Err(HubStoreError::UnknownRelease(_))
        ));
    }

    #[test]
    fn rings_are_set_per_branch() {
        let (_d, s) = store();
        let b = branch("B001");
        let ring_of = |s: &SqliteHubStore| {
            s.branches()
                .unwrap()
                .into_iter()
                .find(|i| i.branch == b)
                .unwrap()
                .ring
        };
        assert_eq!(ring_of(&s), "all");
        s.set_ring(&b, Ring::Canary).unwrap();
        assert_eq!(ring_of(&s), "canary");
        s.set_ring(&b, Ring::All).unwrap();
        assert_eq!(ring_of(&s), "all");
        assert!(matches!(
            s.set_ring(&branch("B999"), Ring::Canary),
            Err(HubStoreError::UnknownBranch(_))
        ));
    }

    #[test]
    fn the_latest_report_per_branch_and_release_wins() {
        let (_d, s) = store();
        let (b1, b2) = (branch("B001"), branch("B002"));
        s.add_release(&release("0.2.0", Ring::All)).unwrap();
        s.add_release(&release("0.3.0", Ring::All)).unwrap();
        let kept = s
            .record_update_reports(
                &b1,
                &[
                    report("0.2.0", UpdateOutcome::RolledBack, 10),
                    // Never published: ignored.
                    report("5.0.0", UpdateOutcome::Installed, 11),
                ],
            )
            .unwrap();
        assert_eq!(kept, 1);
        // An older report of the same release does not replace a newer one.
        s.record_update_reports(&b1, &[report("0.2.0", UpdateOutcome::Installed, 5)])
            .unwrap();
        s.record_update_reports(&b2, &[report("0.2.0", UpdateOutcome::Refused, 12)])
            .unwrap();
        let outcomes = s.update_outcomes().unwrap();
        assert_eq!(
            outcomes,
            [
                BranchOutcome {
                    branch: b1.clone(),
                    report: report("0.2.0", UpdateOutcome::RolledBack, 10)
                },
                BranchOutcome {
                    branch: b2.clone(),
                    report: report("0.2.0", UpdateOutcome::Refused, 12)
                },
            ]
        );
        // A newer report replaces it; another release adds a row, newest first.
        s.record_update_reports(
            &b1,
            &[
                report("0.2.0", UpdateOutcome::Installed, 20),
                report("0.3.0", UpdateOutcome::Installed, 30),
            ],
        )
        .unwrap();
        let b1_reports: Vec<UpdateReport> = s
            .update_outcomes()
            .unwrap()
            .into_iter()
            .filter(|o| o.branch == b1)
            .map(|o| o.report)
            .collect();
        assert_eq!(
            b1_reports,
            [
                report("0.3.0", UpdateOutcome::Installed, 30),
                report("0.2.0", UpdateOutcome::Installed, 20),
            ]
        );
    }
}
