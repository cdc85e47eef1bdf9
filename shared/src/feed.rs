//! The terminal live feed's wire messages (CONTRACT 2.3) in their postcard form, for clients
//! that ask for the `outpost.v1.postcard` subprotocol. JSON clients get the same content as
//! JSON text. Rows travel as named columns, the server's columns included.

use serde::{Deserialize, Serialize};

use crate::value::{Row, Value};

/// The WebSocket subprotocol for binary postcard frames.
pub const POSTCARD_PROTOCOL: &str = "outpost.v1.postcard";

/// A row as the feed carries it: `(column, value)` pairs, starting with `id`, `version`,
/// `created_at`, `updated_at` (and `seq` for log rows).
pub type FeedRow = Vec<(String, Value)>;

/// What a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMsg {
    Subscribe {
        sub: String,
        module: String,
        tables: Vec<String>,
        /// The `where` object as JSON text (the same shape as a query's `where`).
        filter: Option<String>,
        since: Option<u64>,
    },
    Unsubscribe {
        sub: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeedOp {
    Insert,
    Update,
    Delete,
}

impl FeedOp {
    pub fn name(self) -> &'static str {
        match self {
            FeedOp::Insert => "insert",
            FeedOp::Update => "update",
            FeedOp::Delete => "delete",
        }
    }
}

/// One row change in a delta: an insert carries `row`; an update carries `set` (the changed
/// columns and `updated_at`) or, when the row newly matches the subscription, `row`; a delete
/// carries neither.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedChange {
    pub table: String,
    pub id: String,
    pub op: FeedOp,
    pub version: u64,
    pub row: Option<FeedRow>,
    pub set: Option<FeedRow>,
}

/// What the server sends. Variant order is part of the format (postcard tags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMsg {
    Snapshot {
        sub: String,
        version: u64,
        rows: Vec<(String, Vec<FeedRow>)>,
    },
    Delta {
        sub: String,
        base: u64,
        version: u64,
        changes: Vec<FeedChange>,
    },
    Resync {
        sub: String,
        reason: String,
    },
    Error {
        sub: Option<String>,
        error: String,
        message: String,
    },
}

/// The postcard tag of [`ServerMsg::Delta`].
const DELTA_TAG: u8 = 1;

#[derive(Serialize)]
struct DeltaHead<'a> {
    sub: &'a str,
    base: u64,
    version: u64,
    changes: usize,
}

/// The bytes of a postcard [`ServerMsg::Delta`] up to its changes: a delta frame is this
/// followed by `count` already-encoded [`FeedChange`]s, so that a change is encoded once and
/// its bytes are shared by every subscriber it goes to.
pub fn delta_head(sub: &str, base: u64, version: u64, count: usize) -> Vec<u8> {
    let mut out = vec![DELTA_TAG];
    let head = DeltaHead {
        sub,
        base,
        version,
        changes: count,
    };
    out.extend(postcard::to_stdvec(&head).expect("postcard encodes a delta head"));
    out
}

/// A stored row in feed form.
pub fn feed_row(row: &Row) -> FeedRow {
    let mut out = Vec::with_capacity(row.values.len() + 5);
    out.push(("id".into(), Value::Text(row.id.clone())));
    out.push(("version".into(), Value::Int(row.version as i64)));
    out.push(("created_at".into(), Value::Timestamp(row.created_at)));
    out.push(("updated_at".into(), Value::Timestamp(row.updated_at)));
    if let Some(seq) = row.seq {
        out.push(("seq".into(), Value::Int(seq as i64)));
    }
    out.extend(row.iter().map(|(k, v)| (k.to_owned(), v.clone())));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delta_assembled_from_parts_decodes_as_a_whole() {
        let change = FeedChange {
            table: "order_line".into(),
            id: "l1".into(),
            op: FeedOp::Update,
            version: 3,
            row: None,
            set: Some(vec![("status".into(), Value::Text("ready".into()))]),
        };
        let mut frame = delta_head("s1", 7, 9, 2);
        let part = postcard::to_stdvec(&change).unwrap();
        frame.extend(&part);
        frame.extend(&part);
        let msg: ServerMsg = postcard::from_bytes(&frame).unwrap();
        assert_eq!(
            msg,
            ServerMsg::Delta {
                sub: "s1".into(),
                base: 7,
                version: 9,
                changes: vec![change.clone(), change]
            }
        );
    }
}
