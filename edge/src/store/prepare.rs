//! Checks a transaction against the schema in the caller's thread, before it reaches the
//! writer: tables exist, the operation is allowed for the table's kind and owner, columns exist
//! and hold the right types, inserts get an id and every column. The writer then does only
//! what needs its state (compare-and-set, rules, the log), so pure validation never occupies
//! the single writer thread.

use shared::json::FieldError;
use shared::schema::{ColumnType, Owner, Schema, Table, TableKind};
use shared::{Fields, Value};

use super::error::{StoreError, TxnError};
use super::txn::{Op, TXN_OPS_MAX, Txn};

/// A checked operation, by table index.
#[derive(Debug)]
pub(crate) enum PreparedOp {
    /// `values` holds every column of the table, in order.
    Insert {
        ti: usize,
        id: String,
        values: Vec<Value>,
    },
    Update {
        ti: usize,
        id: String,
        version: u64,
        set: Fields,
    },
    Delete {
        ti: usize,
        id: String,
        version: u64,
    },
    /// An operation that failed its checks. It is reported when the writer reaches it, so a
    /// batch's error is always its first failing operation's, in order.
    Invalid(StoreError),
}

impl PreparedOp {
    pub(crate) fn table(&self) -> usize {
        match self {
            PreparedOp::Insert { ti, .. }
            | PreparedOp::Update { ti, .. }
            | PreparedOp::Delete { ti, .. } => *ti,
            PreparedOp::Invalid(_) => usize::MAX,
        }
    }
}

/// A checked transaction. Only [`prepare`] makes one.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub actor: String,
    pub ops: Vec<PreparedOp>,
}

fn table_index(schema: &Schema, name: &str) -> Result<usize, StoreError> {
    schema
        .table_index(name)
        .ok_or_else(|| StoreError::UnknownTable(name.chars().take(64).collect()))
}

/// Checks client fields: known columns, not server-owned, values of the column's type.
fn check_fields(schema: &Schema, ti: usize, fields: &Fields) -> Result<(), StoreError> {
    let t = &schema.tables()[ti];
    for (name, v) in fields {
        let Some(c) = t.column(name) else {
            return Err(FieldError::UnknownColumn {
                table: t.name.clone(),
                column: name.chars().take(64).collect(),
            }
            .into());
        };
        if c.server_owned {
            return Err(FieldError::ReadOnlyColumn {
                column: name.clone(),
            }
            .into());
        }
        let ok = matches!(
            (c.ty, v),
            (_, Value::Null)
                | (ColumnType::Text, Value::Text(_))
                | (ColumnType::Json, Value::Json(_))
                | (ColumnType::Integer | ColumnType::Money, Value::Int(_))
                | (ColumnType::Bool, Value::Bool(_))
                | (ColumnType::Timestamp, Value::Timestamp(_))
        );
        if !ok {
            return Err(FieldError::InvalidValue {
                column: name.clone(),
                expected: match c.ty {
                    ColumnType::Money => "an integer amount in minor units",
                    ColumnType::Integer => "an integer",
                    ColumnType::Text => "a string",
                    ColumnType::Json => "a JSON document",
                    ColumnType::Bool => "true or false",
                    ColumnType::Timestamp => "a timestamp",
                },
            }
            .into());
        }
    }
    Ok(())
}

/// A kind of write, for [`refused_by_kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Insert,
    Update,
    Delete,
}

/// What a table's kind and owner refuse whoever asks: any write to a hub-owned table, an
/// update or delete of a log row, a delete of a shared row. The API checks this before the
/// role's rights, so that a role is told why nobody may do it.
pub fn refused_by_kind(t: &Table, write: Write) -> Option<StoreError> {
    if t.owner == Owner::Hub {
        return Some(StoreError::HubOwned(t.name.clone()));
    }
    if write != Write::Insert && t.kind == TableKind::Log {
        return Some(StoreError::LogImmutable(t.name.clone()));
    }
    if write == Write::Delete && t.owner == Owner::Shared {
        return Some(StoreError::SharedDelete(t.name.clone()));
    }
    None
}

fn prepare_op(schema: &Schema, op: Op) -> Result<PreparedOp, StoreError> {
    let (table, write) = match &op {
        Op::Insert { table, .. } => (table, Write::Insert),
        Op::Update { table, .. } => (table, Write::Update),
        Op::Delete { table, .. } => (table, Write::Delete),
        Op::Refused(r) => return Err(StoreError::Refused(r.clone())),
    };
    let ti = table_index(schema, table)?;
    let t = &schema.tables()[ti];
    if let Some(refused) = refused_by_kind(t, write) {
        return Err(refused);
    }
    Ok(match op {
        Op::Insert { id, fields, .. } => {
            if t.server_written {
                return Err(StoreError::ServerWritten(t.name.clone()));
            }
            check_fields(schema, ti, &fields)?;
            let id = match id {
                Some(id) if id.is_empty() || id.len() > shared::ids::ID_BYTES_MAX => {
                    return Err(FieldError::InvalidValue {
                        column: "id".into(),
                        expected: "a non-empty string of at most 128 bytes",
                    }
                    .into());
                }
                Some(id) => id,
                None => uuid::Uuid::now_v7().to_string(),
            };
            let mut values = vec![Value::Null; t.columns.len()];
            for (name, v) in fields {
                // check_fields found every name among the columns.
                let i = t.column_index(&name).expect("checked column");
                values[i] = v;
            }
            PreparedOp::Insert { ti, id, values }
        }
        Op::Update {
            id, version, set, ..
        } => {
            check_fields(schema, ti, &set)?;
            PreparedOp::Update {
                ti,
                id,
                version,
                set,
            }
        }
        Op::Delete { id, version, .. } => PreparedOp::Delete { ti, id, version },
        Op::Refused(r) => return Err(StoreError::Refused(r)),
    })
}

/// Checks a whole transaction; the error names the first bad operation.
pub(crate) fn prepare(schema: &Schema, txn: Txn) -> Result<Prepared, TxnError> {
    let whole = |error| TxnError {
        op_index: None,
        error,
    };
    if txn.ops.is_empty() {
        return Err(whole(StoreError::EmptyTransaction));
    }
    if txn.ops.len() > TXN_OPS_MAX {
        return Err(whole(StoreError::TooLarge("more than 1000 operations")));
    }
    let ops: Vec<PreparedOp> = txn
        .ops
        .into_iter()
        .map(|op| prepare_op(schema, op).unwrap_or_else(PreparedOp::Invalid))
        .collect();
    // Nothing can fail before the first operation: report it without queueing.
    if let Some(PreparedOp::Invalid(error)) = ops.first() {
        return Err(TxnError {
            op_index: Some(0),
            error: error.clone(),
        });
    }
    Ok(Prepared {
        actor: txn.actor,
        ops,
    })
}
