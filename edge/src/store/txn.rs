//! What callers submit to the writer (a transaction of operations) and what they get back.

use std::sync::Arc;

use shared::{EntryOp, Fields, Row, Version};

/// Most operations in one transaction (a batch).
pub const TXN_OPS_MAX: usize = 1000;

/// One operation of a transaction. Fields are typed already (see `shared::json`); the writer
/// checks them against the schema again, so a programmatic caller cannot bypass the checks.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Insert {
        table: String,
        /// The client's id; the writer assigns a UUIDv7 when absent.
        id: Option<String>,
        fields: Fields,
    },
    Update {
        table: String,
        id: String,
        /// The row version the client saw (compare-and-set).
        version: u64,
        set: Fields,
    },
    Delete {
        table: String,
        id: String,
        version: u64,
    },
    /// An operation its caller found invalid before submitting it (a batch op that is not
    /// well-formed, or that the caller's role may not perform). The transaction fails at it
    /// with this error, after the operations before it were tried against the data: so a
    /// batch's error is always its first failing operation's.
    Refused(Refusal),
}

/// An error its caller decided, carried through the store unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status.
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

/// A transaction: all of its operations commit, or none.
#[derive(Debug, Clone, PartialEq)]
pub struct Txn {
    /// Who asks (recorded in status logs), e.g. the terminal token's role.
    pub actor: String,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new(actor: impl Into<String>, ops: Vec<Op>) -> Txn {
        Txn {
            actor: actor.into(),
            ops,
        }
    }

    pub fn single(actor: impl Into<String>, op: Op) -> Txn {
        Txn::new(actor, vec![op])
    }
}

/// What an operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Inserted,
    Updated,
    Deleted,
    /// The log row already existed with identical content: a retried request, applied once.
    AlreadyPresent,
    /// An update that changed no column.
    Unchanged,
}

#[derive(Debug, Clone)]
pub struct OpResult {
    pub applied: Applied,
    /// The row after the operation (for deletes, the tombstone: the last content).
    pub row: Arc<Row>,
}

/// A committed transaction's answer.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The commit version the transaction became (or the current version when it changed
    /// nothing, e.g. a retried payment).
    pub version: Version,
    pub results: Vec<OpResult>,
}

/// One row changed by a commit, including rows derived by the rules (order totals, status
/// logs). `changed` names the columns an update changed.
#[derive(Debug, Clone)]
pub struct Change {
    pub table: usize,
    pub op: EntryOp,
    pub row: Arc<Row>,
    /// For updates: the row before the change (a feed filter may stop or start matching).
    pub before: Option<Arc<Row>>,
    pub changed: Vec<String>,
    /// For updates: the row was not in the hot tier before the change (a closed order, say),
    /// so a feed snapshot taken before it did not hold it; the feed sends such a row whole
    /// rather than its changed columns. Set when the commit is published.
    pub was_cold: bool,
}

/// A commit as published to subscribers (the terminal feed).
#[derive(Debug)]
pub struct Commit {
    pub version: Version,
    pub changes: Vec<Change>,
    /// When the writer started the group that committed it (for the feed's lag metric).
    pub started: std::time::Instant,
}
