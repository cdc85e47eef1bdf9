//! Errors of the store: why a transaction was refused, and why the store could not open.

use std::sync::Arc;

use shared::Row;
use shared::json::FieldError;

/// Why one operation of a transaction failed. Every variant has a stable snake_case code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("there is no table {0:?} in this module")]
    UnknownTable(String),
    #[error(transparent)]
    Field(#[from] FieldError),
    #[error("no row {id:?} in table {table:?}")]
    NotFound { table: String, id: String },
    #[error("row {id:?} is at version {}, not {expected}", current.version)]
    VersionConflict {
        id: String,
        expected: u64,
        current: Arc<Row>,
    },
    #[error("a row with id {id:?} already exists in {table:?} with different content")]
    IdConflict { table: String, id: String },
    #[error("order {order_id:?} does not exist")]
    UnknownOrder { order_id: String },
    #[error("order {order_id:?} is closed or cancelled; its lines cannot change")]
    OrderClosed { order_id: String },
    #[error("order {order_id:?} has lines or payments; cancel it instead of deleting it")]
    OrderNotEmpty { order_id: String },
    #[error("the order cannot close: {paid} paid of {total}")]
    Unpaid { total: i64, paid: i64 },
    #[error("status cannot move from {from:?} to {to:?}")]
    IllegalTransition { from: String, to: String },
    #[error("table {0:?} is owned by the hub; change it at head office")]
    HubOwned(String),
    #[error("rows of {0:?} are written by the edge itself")]
    ServerWritten(String),
    #[error("rows of log table {0:?} are immutable")]
    LogImmutable(String),
    #[error(
        "rows of shared table {0:?} are never deleted (branches and head office share them); update a column instead"
    )]
    SharedDelete(String),
    #[error("the transaction is too large: {0}")]
    TooLarge(&'static str),
    #[error("order {order_id:?} would exceed the largest amount")]
    AmountOverflow { order_id: String },
    #[error("a transaction needs at least one operation")]
    EmptyTransaction,
    #[error("storage failure: {0}")]
    Storage(String),
    #[error("the store is shutting down")]
    Closed,
    #[error("{}", .0.message)]
    Refused(super::txn::Refusal),
}

impl StoreError {
    /// The stable error code terminals see.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::UnknownTable(_) => "unknown_table",
            StoreError::Field(f) => f.code(),
            StoreError::NotFound { .. } => "not_found",
            StoreError::VersionConflict { .. } => "version_conflict",
            StoreError::IdConflict { .. } => "id_conflict",
            StoreError::UnknownOrder { .. } => "unknown_order",
            StoreError::OrderClosed { .. } => "order_closed",
            StoreError::OrderNotEmpty { .. } => "order_not_empty",
            StoreError::Unpaid { .. } => "unpaid",
            StoreError::IllegalTransition { .. } => "illegal_transition",
            StoreError::HubOwned(_) => "hub_owned",
            StoreError::ServerWritten(_) => "forbidden",
            StoreError::LogImmutable(_) => "log_immutable",
            StoreError::SharedDelete(_) => "shared_delete",
            StoreError::TooLarge(_) => "too_large",
            StoreError::AmountOverflow { .. } => "amount_overflow",
            StoreError::EmptyTransaction => "empty_transaction",
            StoreError::Storage(_) => "storage",
            StoreError::Closed => "shutting_down",
            StoreError::Refused(r) => r.code,
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Storage(e.to_string())
    }
}

/// A failed transaction: the error, and which operation caused it (`None` when the whole
/// group commit failed, e.g. the disk is full).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error}")]
pub struct TxnError {
    pub op_index: Option<usize>,
    pub error: StoreError,
}

/// Why the store could not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the database belongs to branch {stored:?}, not {requested:?}")]
    WrongBranch { stored: String, requested: String },
    #[error("the database does not fit the schema: {0}")]
    Incompatible(String),
    #[error("the stored log is damaged: {0}")]
    Corrupt(String),
    #[error("cannot start the writer thread: {0}")]
    Thread(#[from] std::io::Error),
}
