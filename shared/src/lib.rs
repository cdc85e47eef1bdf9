//! Outpost's shared data model: identifiers, schemas, typed rows, hybrid logical clocks, the
//! replication log and its hash chain, and JSON conversions and query parsing for the HTTP
//! layers.
//!
//! This crate does no I/O: no sockets, no files, no clock. Time is always passed in.

pub mod feed;
pub mod hlc;
pub mod ids;
pub mod json;
pub mod json_rows;
pub mod log;
pub mod merge;
pub mod metrics;
pub mod pos;
pub mod query;
pub mod release;
pub mod schema;
pub mod sync;
pub mod value;
pub mod wire;

pub use hlc::{Hlc, HlcClock};
pub use ids::{BranchId, OriginId, Seq, Version};
pub use log::{ChainHash, EntryOp, LogEntry, Segment, SegmentError};
pub use schema::{Access, ColumnType, HotRule, Owner, Role, Schema, Table, TableKind};
pub use value::{Fields, Row, Timestamp, Value};
