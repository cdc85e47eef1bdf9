//! The replication log: entries (one per changed row) and segments, whose hashes chain
//! `hash = blake3(prev_hash ‖ body)` per origin, where `body` is the exact postcard bytes of the
//! segment's entries (the bytes that travel and are stored; they are never re-encoded before
//! verification).

use std::fmt;

use crdts::VClock;
use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;
use crate::ids::{BranchId, OriginId, Seq};
use crate::schema::Schema;
use crate::value::{Row, RowWire, RowWireRef};

/// Largest encoded entry accepted, in bytes (one row; the HTTP body limit is 1 MiB).
pub const ENTRY_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Most log entries one transaction may append (its ops and the rows the rules derive).
pub const TXN_ENTRIES_MAX: usize = 3072;
/// Most encoded log bytes one transaction may append.
pub const TXN_BYTES_MAX: usize = 4 * 1024 * 1024;
/// A segment is sealed once it holds this many entries...
pub const SEGMENT_ENTRIES_TARGET: usize = 1024;
/// ...or this many body bytes, whichever comes first (or when it is old: see the edge config).
pub const SEGMENT_BYTES_TARGET: usize = 256 * 1024;
/// Hard limits a receiver enforces.
pub const SEGMENT_ENTRIES_MAX: usize = 4096;
pub const SEGMENT_BYTES_MAX: usize = SEGMENT_BYTES_TARGET + TXN_BYTES_MAX;

// Segments are sealed between transactions, so a segment holds less than the target plus one
// whole transaction.
const _: () = assert!(SEGMENT_ENTRIES_TARGET - 1 + TXN_ENTRIES_MAX <= SEGMENT_ENTRIES_MAX);
const _: () = assert!(ENTRY_BYTES_MAX <= TXN_BYTES_MAX);
const _: () = assert!(SEGMENT_BYTES_TARGET < SEGMENT_BYTES_MAX);

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryOp {
    Insert,
    Update,
    Delete,
}

impl EntryOp {
    pub fn name(self) -> &'static str {
        match self {
            EntryOp::Insert => "insert",
            EntryOp::Update => "update",
            EntryOp::Delete => "delete",
        }
    }
}

/// One changed row in an origin's log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    pub origin: OriginId,
    pub seq: Seq,
    pub hlc: Hlc,
    pub table: String,
    pub op: EntryOp,
    pub row_id: String,
    /// The row after the change; for deletes, the row as it was (a tombstone keeps its last
    /// content so that replicas and audits see what was removed).
    pub row: Row,
    /// For rows of `shared` tables: the row's version vector after this change.
    pub clock: Option<VClock<OriginId>>,
    /// For hub-origin entries: the one branch the entry is meant for (`None`: every branch).
    pub scope: Option<BranchId>,
}

/// The encoded form of a [`LogEntry`]: the row's columns by position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntryWire {
    pub origin: OriginId,
    pub seq: Seq,
    pub hlc: Hlc,
    pub table: String,
    pub op: EntryOp,
    pub row_id: String,
    pub row: RowWire,
    pub clock: Option<VClock<OriginId>>,
    pub scope: Option<BranchId>,
}

impl LogEntryWire {
    /// Resolves the table against `schema` and names the row's columns.
    pub fn attach(self, schema: &Schema) -> Result<LogEntry, SegmentError> {
        let ti = schema
            .table_index(&self.table)
            .ok_or_else(|| SegmentError::UnknownTable(self.table.chars().take(64).collect()))?;
        let row = self.row.attach(schema.columns(ti)).ok_or_else(|| {
            SegmentError::Decode(format!("a row of {} has too many values", self.table))
        })?;
        Ok(LogEntry {
            origin: self.origin,
            seq: self.seq,
            hlc: self.hlc,
            table: self.table,
            op: self.op,
            row_id: self.row_id,
            row,
            clock: self.clock,
            scope: self.scope,
        })
    }
}

impl LogEntry {
    /// The entry's postcard encoding, as stored and as carried inside segment bodies.
    pub fn encode(&self) -> Vec<u8> {
        LogEntryRef::from(self).encode()
    }

    /// Decodes an entry; `schema` names the row's columns.
    pub fn decode(bytes: &[u8], schema: &Schema) -> Result<LogEntry, SegmentError> {
        if bytes.len() > ENTRY_BYTES_MAX {
            return Err(SegmentError::TooLarge);
        }
        let wire: LogEntryWire =
            postcard::from_bytes(bytes).map_err(|e| SegmentError::Decode(e.to_string()))?;
        wire.attach(schema)
    }
}

/// A borrowed view of a [`LogEntry`] that encodes to exactly the same bytes, so a writer can
/// encode an entry without cloning its row.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LogEntryRef<'a> {
    pub origin: &'a OriginId,
    pub seq: Seq,
    pub hlc: Hlc,
    pub table: &'a str,
    pub op: EntryOp,
    pub row_id: &'a str,
    pub row: RowWireRef<'a>,
    pub clock: Option<&'a VClock<OriginId>>,
    pub scope: Option<&'a BranchId>,
}

impl LogEntryRef<'_> {
    pub fn encode(&self) -> Vec<u8> {
        // Sized up front from the row so that encoding allocates once instead of growing.
        let estimate = 96 + self.table.len() + 2 * self.row_id.len() + 24 * self.row.values.len();
        let buf = Vec::with_capacity(estimate);
        postcard::to_extend(self, buf).expect("postcard encodes log entries")
    }
}

impl<'a> From<&'a LogEntry> for LogEntryRef<'a> {
    fn from(e: &'a LogEntry) -> Self {
        LogEntryRef {
            origin: &e.origin,
            seq: e.seq,
            hlc: e.hlc,
            table: &e.table,
            op: e.op,
            row_id: &e.row_id,
            row: e.row.wire(),
            clock: e.clock.as_ref(),
            scope: e.scope.as_ref(),
        }
    }
}

/// A position in a chain: the hash of the last segment (or the origin's genesis hash).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChainHash(pub [u8; 32]);

impl ChainHash {
    /// The hash a chain starts from. Derived from the origin so that one origin's segments can
    /// never be spliced onto another's chain.
    pub fn genesis(origin: &OriginId) -> ChainHash {
        let mut h = blake3::Hasher::new_derive_key("outpost 2026 origin chain genesis");
        h.update(origin.as_str().as_bytes());
        ChainHash(*h.finalize().as_bytes())
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({})", &self.to_hex()[..16])
    }
}

/// Why a segment was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("segment hash does not match its contents")]
    HashMismatch,
    #[error("segment does not chain onto the receiver's last segment")]
    ChainBreak,
    #[error("segment is larger than the limits allow")]
    TooLarge,
    #[error("segment body does not decode: {0}")]
    Decode(String),
    #[error("segment names a table the receiver does not have: {0}")]
    UnknownTable(String),
    #[error("segment entries are not the contiguous seqs {first}..={last} of origin {origin}")]
    BadSequence {
        origin: String,
        first: u64,
        last: u64,
    },
}

/// A sealed run of one origin's log: entries `first_seq..=last_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub origin: OriginId,
    pub first_seq: Seq,
    pub last_seq: Seq,
    pub prev_hash: ChainHash,
    pub hash: ChainHash,
    /// postcard `Vec<LogEntry>`: a varint count followed by the encoded entries.
    pub body: Vec<u8>,
}

/// `blake3(prev_hash ‖ body)`.
pub fn chain_hash(prev: &ChainHash, body: &[u8]) -> ChainHash {
    let mut h = blake3::Hasher::new();
    h.update(&prev.0);
    h.update(body);
    ChainHash(*h.finalize().as_bytes())
}

/// Builds a segment body from already-encoded entries (see [`LogEntry::encode`]) without
/// re-encoding them: a postcard sequence is its varint length followed by its elements.
pub fn segment_body<'a>(entries: impl ExactSizeIterator<Item = &'a [u8]>) -> Vec<u8> {
    let count = entries.len();
    let mut body = postcard::to_stdvec(&count).expect("postcard encodes a usize");
    for e in entries {
        body.extend_from_slice(e);
    }
    body
}

impl Segment {
    /// Seals encoded entries `first_seq..` of `origin` onto the chain at `prev_hash`.
    pub fn seal<'a>(
        origin: OriginId,
        first_seq: Seq,
        prev_hash: ChainHash,
        entries: impl ExactSizeIterator<Item = &'a [u8]>,
    ) -> Segment {
        let count = entries.len() as u64;
        assert!(count > 0, "a segment holds at least one entry");
        let body = segment_body(entries);
        let hash = chain_hash(&prev_hash, &body);
        Segment {
            origin,
            first_seq,
            last_seq: Seq(first_seq.0 + count - 1),
            prev_hash,
            hash,
            body,
        }
    }

    /// Verifies the segment against the receiver's chain head `expected_prev` and returns its
    /// decoded entries: the hash over the received bytes, the chain link, the limits, and that
    /// the entries are exactly `first_seq..=last_seq` of `origin`, in order.
    pub fn verify(
        &self,
        expected_prev: &ChainHash,
        schema: &Schema,
    ) -> Result<Vec<LogEntry>, SegmentError> {
        if self.body.len() > SEGMENT_BYTES_MAX {
            return Err(SegmentError::TooLarge);
        }
        if chain_hash(&self.prev_hash, &self.body) != self.hash {
            return Err(SegmentError::HashMismatch);
        }
        if self.prev_hash != *expected_prev {
            return Err(SegmentError::ChainBreak);
        }
        let bad_sequence = || SegmentError::BadSequence {
            origin: self.origin.to_string(),
            first: self.first_seq.0,
            last: self.last_seq.0,
        };
        let (count, mut rest) = postcard::take_from_bytes::<usize>(&self.body)
            .map_err(|e| SegmentError::Decode(e.to_string()))?;
        if count == 0 || count > SEGMENT_ENTRIES_MAX {
            return Err(SegmentError::TooLarge);
        }
        if self.last_seq.0.checked_sub(self.first_seq.0) != Some(count as u64 - 1)
            || self.first_seq == Seq::ZERO
        {
            return Err(bad_sequence());
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count as u64 {
            let (wire, tail) = postcard::take_from_bytes::<LogEntryWire>(rest)
                .map_err(|e| SegmentError::Decode(e.to_string()))?;
            let entry = wire.attach(schema)?;
            if entry.origin != self.origin || entry.seq != Seq(self.first_seq.0 + i) {
                return Err(bad_sequence());
            }
            entries.push(entry);
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(SegmentError::Decode(
                "trailing bytes after the entries".into(),
            ));
        }
        Ok(entries)
    }
}

/// Verifies a run of segments of one origin from `head`, returning the new head.
pub fn verify_chain<'a>(
    mut head: ChainHash,
    segments: impl IntoIterator<Item = &'a Segment>,
    schema: &Schema,
) -> Result<ChainHash, SegmentError> {
    let mut next_seq = None;
    for s in segments {
        s.verify(&head, schema)?;
        if next_seq.is_some_and(|n| n != s.first_seq) {
            return Err(SegmentError::ChainBreak);
        }
        next_seq = Some(s.last_seq.next());
        head = s.hash;
    }
    Ok(head)
}
