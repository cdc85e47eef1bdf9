//! The hub's materialised rows: the current state of every table of the schema, per branch,
//! kept in SQLite from the log entries the branches send, and the head-office query over them
//! (CONTRACT 3, `POST /api/query`).
//!
//! Layout: one SQLite table `r_<table>` per schema table with the columns `branch`, `id`,
//! `version`, `created_at`, `updated_at` (µs), `seq`, then the schema's columns with the SQL
//! types the edge uses; the key is `(branch, id)`, so the same id at two branches is two rows.
//! Hub-owned rows meant for every branch are stored under the branch [`ALL_BRANCHES`] (`*`).
//! The hub reserves the name `branch`: a schema table that declares a `branch` column cannot
//! be materialised.
//!
//! The query is CONTRACT 2.2's body (parsed by `shared::query`, so both ends agree on codes and
//! messages) plus `branch`, `groupBy` and `aggregates`. Every value is a bound parameter; every
//! name in the SQL is a schema column, one of the fixed columns, or an alias the compiler makes
//! up (`a0`, `a1`, ...): client text never reaches the SQL.
//!
//! Result rows of a plain query are the edge's row JSON plus `"branch"`. A grouped query (one
//! with `groupBy` or `aggregates`) returns one row per group holding the group columns and the
//! named aggregates, and nothing else: `"branch"` appears only when it is one of the `groupBy`
//! columns, because a group that spans branches has no single branch. Without `groupBy` the
//! aggregates cover every matching row and the result is exactly one row (SQL's meaning:
//! `count` 0, `sum`/`min`/`max`/`avg` null over no rows).

use std::sync::Arc;
use std::time::Instant;

use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, OptionalExtension};
use serde_json::{Map, Value as Json, json};
use shared::json::{row_to_json, value_to_json};
use shared::log::{EntryOp, LogEntry};
use shared::query::{
    self as sq, Filter, QUERY_IN_VALUES_MAX, QUERY_LIMIT_DEFAULT, QUERY_LIMIT_MAX,
    QUERY_OFFSET_MAX, QUERY_TERMS_MAX, column_type, excerpt, unknown_column,
};
use shared::schema::{ColumnType, Table, TableKind};
use shared::{BranchId, Row, Schema, Timestamp, Value};

/// The `branch` of hub-owned rows meant for every branch (an entry without a scope).
pub const ALL_BRANCHES: &str = "*";
/// Most branch ids one query's `branch` member lists.
pub const QUERY_BRANCHES_MAX: usize = QUERY_IN_VALUES_MAX;
/// Most `groupBy` columns in one query.
pub const QUERY_GROUP_BY_MAX: usize = QUERY_TERMS_MAX;
/// Most aggregates in one query.
pub const QUERY_AGGREGATES_MAX: usize = QUERY_TERMS_MAX;
/// Longest aggregate name (`as`), in bytes.
pub const AGGREGATE_NAME_BYTES_MAX: usize = 64;

/// The members of a head-office query body: CONTRACT 2.2's, then the hub's own.
pub const HUB_QUERY_MEMBERS: [&str; 9] = [
    "table",
    "select",
    "where",
    "orderBy",
    "limit",
    "offset",
    "branch",
    "groupBy",
    "aggregates",
];

/// The fixed columns of every materialised table, in this order, before the schema's columns.
const FIXED_SQL: &str = "\"branch\", \"id\", \"version\", \"created_at\", \"updated_at\", \"seq\"";
const FIXED_SQL_COUNT: usize = 6;
/// The column that holds the branch; reserved, see the module documentation.
const BRANCH: &str = "branch";

/// Why a log entry could not be materialised or a row read back.
#[derive(Debug, thiserror::Error)]
pub enum RowsError {
    #[error("the schema has no table {0:?}")]
    UnknownTable(String),
    #[error("{0:?} is neither a branch id nor \"*\"")]
    InvalidBranch(String),
    #[error("log entry {origin}#{seq} of {table}: {reason}")]
    InvalidEntry {
        origin: String,
        seq: u64,
        table: String,
        reason: String,
    },
    #[error("storage: {0}")]
    Storage(#[from] rusqlite::Error),
}

/// Why a head-office query was refused: the HTTP status to answer, a stable snake_case code and
/// a sentence. Bad input is 4xx: 404 `unknown_table`, 400 for the body (`invalid_body`,
/// `invalid_value`, `invalid_parameter`, `unknown_column`, `bad_aggregate`), 422
/// `aggregate_overflow` when a `sum` leaves the 64-bit range. A storage failure is 500.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct QueryError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl QueryError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> QueryError {
        QueryError {
            status,
            code,
            message: message.into(),
        }
    }
}

/// A parsing error of the shared query grammar: always bad input.
impl From<sq::QueryError> for QueryError {
    fn from(e: sq::QueryError) -> QueryError {
        QueryError::new(400, e.code, e.message)
    }
}

fn bad(code: &'static str, message: impl Into<String>) -> QueryError {
    QueryError::new(400, code, message)
}

fn storage(e: rusqlite::Error) -> QueryError {
    QueryError::new(500, "storage", format!("the query failed in storage: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Layout

/// Quotes a schema name. Schema names are restricted to `[a-z_][a-z0-9_]*`; quoting keeps SQL
/// keywords (`order`, `group`) usable as names.
fn quote(name: &str) -> String {
    assert!(
        shared::schema::is_valid_name(name),
        "schema names are valid SQL identifiers"
    );
    format!("\"{name}\"")
}

fn table_name(table: &str) -> String {
    quote(&format!("r_{table}"))
}

/// An index name that cannot collide: `.` never occurs in schema names.
fn index_name(table: &str, what: &str) -> String {
    format!("\"r_{table}.{what}\"")
}

fn sql_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Text | ColumnType::Json => "TEXT",
        ColumnType::Integer | ColumnType::Money | ColumnType::Bool | ColumnType::Timestamp => {
            "INTEGER"
        }
    }
}

/// The select list of a whole row: the fixed columns, then the schema's.
fn row_columns(t: &Table) -> String {
    let mut cols = FIXED_SQL.to_owned();
    for c in &t.columns {
        cols.push_str(", ");
        cols.push_str(&quote(&c.name));
    }
    cols
}

/// An error for a stored layout the schema cannot use.
fn incompatible(message: String) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_MISMATCH),
        Some(message),
    )
}

/// Creates the materialised tables for `schema` if missing, adds columns the schema has gained
/// (columns are only ever appended), and creates the indexes: `(branch, seq)` on log tables,
/// `(column, branch)` on indexed columns and hot-tier parent references such as `order_id`.
/// Idempotent. Runs inside a savepoint, so it is all or nothing both inside the caller's
/// transaction and outside one.
pub fn migrate(conn: &Connection, schema: &Schema) -> rusqlite::Result<()> {
    conn.execute_batch("SAVEPOINT rows_migrate")?;
    match migrate_tables(conn, schema) {
        Ok(()) => conn.execute_batch("RELEASE rows_migrate"),
        Err(e) => {
            // The original error matters more than a failure to roll back.
            let _ = conn.execute_batch("ROLLBACK TO rows_migrate; RELEASE rows_migrate");
            Err(e)
        }
    }
}

fn migrate_tables(conn: &Connection, schema: &Schema) -> rusqlite::Result<()> {
    for t in schema.tables() {
        if t.column(BRANCH).is_some() {
            return Err(incompatible(format!(
                "table {}: the hub reserves the column name \"branch\"",
                t.name
            )));
        }
        let name = table_name(&t.name);
        let existing: Vec<(String, String)> = conn
            .prepare("SELECT name, upper(type) FROM pragma_table_info(?1)")?
            .query_map([format!("r_{}", t.name)], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        if existing.is_empty() {
            let mut cols = vec![
                "\"branch\" TEXT NOT NULL".to_owned(),
                "\"id\" TEXT NOT NULL".to_owned(),
                "\"version\" INTEGER NOT NULL".to_owned(),
                "\"created_at\" INTEGER NOT NULL".to_owned(),
                "\"updated_at\" INTEGER NOT NULL".to_owned(),
                "\"seq\" INTEGER".to_owned(),
            ];
            cols.extend(
                t.columns
                    .iter()
                    .map(|c| format!("{} {}", quote(&c.name), sql_type(c.ty))),
            );
            conn.execute_batch(&format!(
                "CREATE TABLE {name} ({}, PRIMARY KEY (\"branch\", \"id\")) WITHOUT ROWID",
                cols.join(", ")
            ))?;
        } else {
            for c in &t.columns {
                match existing.iter().find(|(n, _)| *n == c.name) {
                    None => conn.execute_batch(&format!(
                        "ALTER TABLE {name} ADD COLUMN {} {}",
                        quote(&c.name),
                        sql_type(c.ty)
                    ))?,
                    Some((_, ty)) if ty == sql_type(c.ty) => {}
                    Some((_, ty)) => {
                        return Err(incompatible(format!(
                            "column {}.{} is stored as {ty} but the schema declares {}",
                            t.name,
                            c.name,
                            c.ty.name()
                        )));
                    }
                }
            }
        }
        if t.kind == TableKind::Log {
            conn.execute_batch(&format!(
                "CREATE INDEX IF NOT EXISTS {} ON {name} (\"branch\", \"seq\")",
                index_name(&t.name, "seq")
            ))?;
        }
        // Column first: head office looks a value up across branches at least as often as
        // within one, and `(column, branch)` serves both.
        for c in t.index_columns() {
            conn.execute_batch(&format!(
                "CREATE INDEX IF NOT EXISTS {} ON {name} ({}, \"branch\")",
                index_name(&t.name, c),
                quote(c)
            ))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Values

fn value_to_sql(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Int(i) => SqlValue::Integer(*i),
        Value::Timestamp(t) => SqlValue::Integer(t.0),
        Value::Text(s) | Value::Json(s) => SqlValue::Text(s.clone()),
    }
}

fn value_from_sql(ty: ColumnType, i: usize, v: ValueRef<'_>) -> rusqlite::Result<Value> {
    let bad = || rusqlite::Error::InvalidColumnType(i, ty.name().into(), v.data_type());
    let text = |s: &[u8]| String::from_utf8(s.to_vec()).map_err(|_| bad());
    Ok(match (ty, v) {
        (_, ValueRef::Null) => Value::Null,
        (ColumnType::Text, ValueRef::Text(s)) => Value::Text(text(s)?),
        (ColumnType::Json, ValueRef::Text(s)) => Value::Json(text(s)?),
        (ColumnType::Integer | ColumnType::Money, ValueRef::Integer(i)) => Value::Int(i),
        (ColumnType::Bool, ValueRef::Integer(i)) => Value::Bool(i != 0),
        (ColumnType::Timestamp, ValueRef::Integer(i)) => Value::Timestamp(Timestamp(i)),
        _ => return Err(bad()),
    })
}

/// Whether a value may be stored in a column of type `ty`.
fn fits(ty: ColumnType, v: &Value) -> bool {
    matches!(
        (ty, v),
        (_, Value::Null)
            | (ColumnType::Text, Value::Text(_))
            | (ColumnType::Json, Value::Json(_))
            | (ColumnType::Integer | ColumnType::Money, Value::Int(_))
            | (ColumnType::Bool, Value::Bool(_))
            | (ColumnType::Timestamp, Value::Timestamp(_))
    )
}

/// The kind of a value, for messages (values themselves may be long).
fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Int(_) => "integer",
        Value::Text(_) => "text",
        Value::Timestamp(_) => "timestamp",
        Value::Json(_) => "json",
    }
}

/// Reads a row selected with [`row_columns`]; returns its branch too.
fn row_from_sql(
    schema: &Schema,
    ti: usize,
    r: &rusqlite::Row<'_>,
) -> rusqlite::Result<(String, Row)> {
    let t = &schema.tables()[ti];
    let mut values = Vec::with_capacity(t.columns.len());
    for (i, c) in t.columns.iter().enumerate() {
        let at = FIXED_SQL_COUNT + i;
        values.push(value_from_sql(c.ty, at, r.get_ref(at)?)?);
    }
    // Stored by `apply`, which refuses versions and seqs beyond i64.
    let unsigned = |i: usize, v: i64| {
        u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(i, v))
    };
    let row = Row {
        id: r.get(1)?,
        version: unsigned(2, r.get(2)?)?,
        created_at: Timestamp(r.get(3)?),
        updated_at: Timestamp(r.get(4)?),
        seq: r
            .get::<_, Option<i64>>(5)?
            .map(|s| unsigned(5, s))
            .transpose()?,
        columns: schema.columns(ti).clone(),
        values,
    };
    Ok((r.get(0)?, row))
}

fn check_branch(branch: &str) -> Result<(), RowsError> {
    if branch == ALL_BRANCHES || BranchId::parse(branch).is_ok() {
        Ok(())
    } else {
        Err(RowsError::InvalidBranch(excerpt(branch)))
    }
}

fn table_index(schema: &Schema, table: &str) -> Result<usize, RowsError> {
    schema
        .table_index(table)
        .ok_or_else(|| RowsError::UnknownTable(excerpt(table)))
}

// ---------------------------------------------------------------------------------------------
// Apply and get

/// Materialises one log entry received from `branch`: an insert or update upserts the row with
/// all its columns, a delete removes it. For rows of hub-owned tables the hub passes the
/// entry's scope, or [`ALL_BRANCHES`].
///
/// Entries are applied in the order given, the last one winning: the caller applies each
/// origin's entries once and in log order, in the transaction that stores them. A log row
/// inserted again (a replay) is rewritten with the same content. The row must fit the schema:
/// its id is the entry's `row_id`, each value has its column's type.
pub fn apply(
    conn: &Connection,
    schema: &Schema,
    branch: &str,
    entry: &LogEntry,
) -> Result<(), RowsError> {
    check_branch(branch)?;
    let ti = table_index(schema, &entry.table)?;
    let t = &schema.tables()[ti];
    let invalid = |reason: String| RowsError::InvalidEntry {
        origin: entry.origin.to_string(),
        seq: entry.seq.0,
        table: t.name.clone(),
        reason,
    };
    let row = &entry.row;
    if row.id != entry.row_id || row.id.is_empty() || row.id.len() > shared::ids::ID_BYTES_MAX {
        return Err(invalid(format!(
            "row id {:?} must equal the entry's row_id {:?} and have 1 to {} bytes",
            excerpt(&row.id),
            excerpt(&entry.row_id),
            shared::ids::ID_BYTES_MAX
        )));
    }
    let name = table_name(&t.name);
    if entry.op == EntryOp::Delete {
        conn.prepare_cached(&format!(
            "DELETE FROM {name} WHERE \"branch\" = ?1 AND \"id\" = ?2"
        ))?
        .execute([branch, row.id.as_str()])?;
        return Ok(());
    }

    // The row's values by schema column. A row decoded with this schema shares its column
    // names; one built elsewhere is matched by name, and must not carry unknown columns.
    let columns = schema.columns(ti);
    let same_columns = (Arc::ptr_eq(&row.columns, columns) || row.columns == *columns)
        && row.values.len() == columns.len();
    if !same_columns && let Some(c) = row.columns.iter().find(|c| t.column(c).is_none()) {
        return Err(invalid(format!("the table has no column {:?}", excerpt(c))));
    }
    let mut params: Vec<SqlValue> = Vec::with_capacity(FIXED_SQL_COUNT + t.columns.len());
    let version = i64::try_from(row.version)
        .map_err(|_| invalid(format!("version {} is out of range", row.version)))?;
    let seq = row
        .seq
        .map(|s| i64::try_from(s).map_err(|_| invalid(format!("seq {s} is out of range"))))
        .transpose()?;
    params.extend([
        SqlValue::Text(branch.to_owned()),
        SqlValue::Text(row.id.clone()),
        SqlValue::Integer(version),
        SqlValue::Integer(row.created_at.0),
        SqlValue::Integer(row.updated_at.0),
        seq.map_or(SqlValue::Null, SqlValue::Integer),
    ]);
    for (i, c) in t.columns.iter().enumerate() {
        let v = if same_columns {
            &row.values[i]
        } else {
            row.get(&c.name)
        };
        if !fits(c.ty, v) {
            return Err(invalid(format!(
                "column {} holds a {} value, not a {} one",
                c.name,
                value_kind(v),
                c.ty.name()
            )));
        }
        params.push(value_to_sql(v));
    }

    let cols = row_columns(t);
    let marks: Vec<String> = (1..=params.len()).map(|i| format!("?{i}")).collect();
    let sets: Vec<String> = ["version", "created_at", "updated_at", "seq"]
        .into_iter()
        .map(str::to_owned)
        .chain(t.columns.iter().map(|c| c.name.clone()))
        .map(|c| format!("{0} = excluded.{0}", quote(&c)))
        .collect();
    conn.prepare_cached(&format!(
        "INSERT INTO {name} ({cols}) VALUES ({}) ON CONFLICT (\"branch\", \"id\") DO UPDATE SET {}",
        marks.join(", "),
        sets.join(", ")
    ))?
    .execute(rusqlite::params_from_iter(params))?;
    Ok(())
}

/// Reads one materialised row back.
pub fn get(
    conn: &Connection,
    schema: &Schema,
    branch: &str,
    table: &str,
    id: &str,
) -> Result<Option<Row>, RowsError> {
    check_branch(branch)?;
    let ti = table_index(schema, table)?;
    let t = &schema.tables()[ti];
    let row = conn
        .prepare_cached(&format!(
            "SELECT {} FROM {} WHERE \"branch\" = ?1 AND \"id\" = ?2",
            row_columns(t),
            table_name(&t.name)
        ))?
        .query_row([branch, id], |r| row_from_sql(schema, ti, r))
        .optional()?;
    Ok(row.map(|(_, row)| row))
}

// ---------------------------------------------------------------------------------------------
// The head-office query

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AggFn {
    Count,
    Sum,
    Min,
    Max,
    Avg,
}

impl AggFn {
    fn parse(name: &str) -> Option<AggFn> {
        Some(match name {
            "count" => AggFn::Count,
            "sum" => AggFn::Sum,
            "min" => AggFn::Min,
            "max" => AggFn::Max,
            "avg" => AggFn::Avg,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            AggFn::Count => "count",
            AggFn::Sum => "sum",
            AggFn::Min => "min",
            AggFn::Max => "max",
            AggFn::Avg => "avg",
        }
    }
}

/// One checked aggregate: `field` is a column of the table (`None`: count rows).
#[derive(Debug, Clone)]
struct Aggregate {
    func: AggFn,
    field: Option<(String, ColumnType)>,
    name: String,
}

/// A group column: `branch` or a column of the table.
#[derive(Debug, Clone)]
enum GroupColumn {
    Branch,
    Column(String, ColumnType),
}

impl GroupColumn {
    fn name(&self) -> &str {
        match self {
            GroupColumn::Branch => BRANCH,
            GroupColumn::Column(c, _) => c,
        }
    }
}

/// What a result column is, for ordering and reading.
#[derive(Debug, Clone, Copy)]
enum OrderKey {
    /// A column of the table, or `branch`.
    Column,
    /// The aggregate at this position.
    Aggregate(usize),
}

/// A checked head-office query.
#[derive(Debug)]
struct Plan {
    ti: usize,
    /// `None`: every branch.
    branches: Option<Vec<String>>,
    filters: Vec<Filter>,
    /// Columns kept in plain rows (`branch` always is); `None`: all.
    select: Option<Vec<String>>,
    /// `Some` for a grouped query.
    grouping: Option<(Vec<GroupColumn>, Vec<Aggregate>)>,
    order: Vec<(String, OrderKey, bool)>,
    limit: usize,
    offset: usize,
}

fn parse_branches(v: Option<&Json>) -> Result<Option<Vec<String>>, QueryError> {
    let one = |v: &Json| -> Result<String, QueryError> {
        match v {
            Json::String(s) if s == ALL_BRANCHES => Ok(s.clone()),
            Json::String(s) => BranchId::parse(s)
                .map(|b| b.as_str().to_owned())
                .map_err(|e| bad("invalid_value", format!("\"branch\": {e}"))),
            _ => Err(bad(
                "invalid_value",
                "\"branch\" is a branch id, \"*\" (rows for every branch) or a list of them",
            )),
        }
    };
    match v {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Array(list)) if list.len() <= QUERY_BRANCHES_MAX => {
            Ok(Some(list.iter().map(one).collect::<Result<_, _>>()?))
        }
        Some(Json::Array(_)) => Err(bad(
            "invalid_parameter",
            format!("\"branch\" lists at most {QUERY_BRANCHES_MAX} branches"),
        )),
        Some(v) => Ok(Some(vec![one(v)?])),
    }
}

fn parse_group_by(
    schema: &Schema,
    ti: usize,
    v: Option<&Json>,
) -> Result<Vec<GroupColumn>, QueryError> {
    let table = &schema.tables()[ti].name;
    let shape = || {
        bad(
            "invalid_body",
            format!("\"groupBy\" is a list of at most {QUERY_GROUP_BY_MAX} column names"),
        )
    };
    let list = match v {
        None | Some(Json::Null) => return Ok(Vec::new()),
        Some(Json::Array(list)) if list.len() <= QUERY_GROUP_BY_MAX => list,
        Some(_) => return Err(shape()),
    };
    let mut group = Vec::with_capacity(list.len());
    for c in list {
        let c = c.as_str().ok_or_else(shape)?;
        let column = if c == BRANCH {
            GroupColumn::Branch
        } else {
            let ty = column_type(schema, ti, c).ok_or_else(|| unknown_column(table, c))?;
            GroupColumn::Column(c.to_owned(), ty)
        };
        if group.iter().any(|g: &GroupColumn| g.name() == c) {
            return Err(bad(
                "invalid_body",
                format!("\"groupBy\" names {c:?} twice"),
            ));
        }
        group.push(column);
    }
    Ok(group)
}

/// True for `[A-Za-z_][A-Za-z0-9_]*` of at most [`AGGREGATE_NAME_BYTES_MAX`] bytes.
fn is_plain_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'A'..=b'Z' | b'_'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && name.len() <= AGGREGATE_NAME_BYTES_MAX
}

fn parse_aggregates(
    schema: &Schema,
    ti: usize,
    v: Option<&Json>,
    group: &[GroupColumn],
) -> Result<Vec<Aggregate>, QueryError> {
    let table = &schema.tables()[ti].name;
    let shape = || {
        bad(
            "invalid_body",
            format!(
                "\"aggregates\" is a list of at most {QUERY_AGGREGATES_MAX} objects {{\"fn\": count|sum|min|max|avg, \"field\": column, \"as\": name}}"
            ),
        )
    };
    let list = match v {
        None | Some(Json::Null) => return Ok(Vec::new()),
        Some(Json::Array(list)) if list.len() <= QUERY_AGGREGATES_MAX => list,
        Some(_) => return Err(shape()),
    };
    let mut aggregates: Vec<Aggregate> = Vec::with_capacity(list.len());
    for a in list {
        let a = a.as_object().ok_or_else(shape)?;
        if let Some(k) = a
            .keys()
            .find(|k| !["fn", "field", "as"].contains(&k.as_str()))
        {
            return Err(bad(
                "invalid_body",
                format!("unknown aggregate member {:?} (fn, field, as)", excerpt(k)),
            ));
        }
        let func = match a.get("fn") {
            Some(Json::String(f)) => AggFn::parse(f).ok_or_else(|| {
                bad(
                    "bad_aggregate",
                    format!(
                        "unknown aggregate function {:?} (count, sum, min, max, avg)",
                        excerpt(f)
                    ),
                )
            })?,
            _ => return Err(shape()),
        };
        let field = match a.get("field") {
            None | Some(Json::Null) => None,
            Some(Json::String(c)) => {
                let ty = column_type(schema, ti, c).ok_or_else(|| unknown_column(table, c))?;
                Some((c.clone(), ty))
            }
            Some(_) => return Err(shape()),
        };
        match (func, &field) {
            (AggFn::Count, _) => {}
            (_, None) => {
                return Err(bad(
                    "bad_aggregate",
                    format!("{} needs a \"field\"", func.name()),
                ));
            }
            (AggFn::Sum | AggFn::Avg, Some((c, ty))) => {
                if !matches!(ty, ColumnType::Integer | ColumnType::Money) {
                    return Err(bad(
                        "bad_aggregate",
                        format!(
                            "{} works on integer and money columns; {c} is {}",
                            func.name(),
                            ty.name()
                        ),
                    ));
                }
            }
            (AggFn::Min | AggFn::Max, Some((c, ty))) => {
                if *ty == ColumnType::Json {
                    return Err(bad(
                        "bad_aggregate",
                        format!("{} does not compare json columns such as {c}", func.name()),
                    ));
                }
            }
        }
        let name = match a.get("as") {
            None | Some(Json::Null) => match &field {
                None => func.name().to_owned(),
                Some((c, _)) => format!("{}_{c}", func.name()),
            },
            Some(Json::String(n)) if is_plain_name(n) => n.clone(),
            Some(n) => {
                return Err(bad(
                    "bad_aggregate",
                    format!(
                        "\"as\" must be a name of letters, digits and _ (at most {AGGREGATE_NAME_BYTES_MAX} bytes), not {:?}",
                        excerpt(&n.to_string())
                    ),
                ));
            }
        };
        // Group columns and aggregates share each result row; `branch` keeps its meaning.
        if name == BRANCH
            || group.iter().any(|g| g.name() == name)
            || aggregates.iter().any(|a| a.name == name)
        {
            return Err(bad(
                "bad_aggregate",
                format!("the aggregate name {name:?} is already used in the result rows"),
            ));
        }
        aggregates.push(Aggregate { func, field, name });
    }
    Ok(aggregates)
}

/// Checks a body into a plan. Members are checked in a fixed order so that a body with several
/// faults always gets the same error.
fn plan(schema: &Schema, body: &Json) -> Result<Plan, QueryError> {
    let q = sq::query_object(body, &HUB_QUERY_MEMBERS)?;
    let table = sq::query_table(q)?;
    let ti = schema.table_index(table).ok_or_else(|| {
        QueryError::new(
            404,
            "unknown_table",
            format!("there is no table {:?} in this module", excerpt(table)),
        )
    })?;
    let t = &schema.tables()[ti];
    let branches = parse_branches(q.get("branch"))?;

    // Every row carries `branch`, so selecting it is allowed and changes nothing.
    let select = match q.get("select") {
        Some(Json::Array(cols)) => {
            let cols: Vec<Json> = cols
                .iter()
                .filter(|c| c.as_str() != Some(BRANCH))
                .cloned()
                .collect();
            sq::parse_select(schema, ti, Some(&Json::Array(cols)))?
        }
        other => sq::parse_select(schema, ti, other)?,
    };
    let filters = sq::parse_where(schema, ti, q.get("where"))?;
    let group = parse_group_by(schema, ti, q.get("groupBy"))?;
    let aggregates = parse_aggregates(schema, ti, q.get("aggregates"), &group)?;
    let grouping = if group.is_empty() && aggregates.is_empty() {
        None
    } else {
        if select.is_some() {
            return Err(bad(
                "invalid_body",
                "a grouped query returns its groupBy columns and aggregates; drop \"select\"",
            ));
        }
        Some((group, aggregates))
    };

    let mut order = Vec::new();
    let terms = sq::parse_order(q.get("orderBy"), |field| {
        let key = match &grouping {
            None if field == BRANCH || column_type(schema, ti, field).is_some() => OrderKey::Column,
            None => return Err(unknown_column(&t.name, field)),
            Some((group, aggregates)) => {
                if group.iter().any(|g| g.name() == field) {
                    OrderKey::Column
                } else if let Some(i) = aggregates.iter().position(|a| a.name == field) {
                    OrderKey::Aggregate(i)
                } else {
                    return Err(sq::QueryError::new(
                        "unknown_column",
                        format!(
                            "a grouped query orders by its groupBy columns or aggregate names, not {:?}",
                            excerpt(field)
                        ),
                    ));
                }
            }
        };
        order.push(key);
        Ok(())
    })?;
    let order = terms
        .into_iter()
        .zip(order)
        .map(|((field, desc), key)| (field, key, desc))
        .collect();
    Ok(Plan {
        ti,
        branches,
        filters,
        select,
        grouping,
        order,
        limit: sq::parse_count(q, "limit", QUERY_LIMIT_DEFAULT, QUERY_LIMIT_MAX)?,
        offset: sq::parse_count(q, "offset", 0, QUERY_OFFSET_MAX)?,
    })
}

/// A result column name as SQL: `branch` or a column of the table, checked again here because
/// this is where SQL is made.
fn column_sql(schema: &Schema, ti: usize, name: &str) -> Result<String, QueryError> {
    if name == BRANCH || column_type(schema, ti, name).is_some() {
        Ok(quote(name))
    } else {
        Err(QueryError::new(
            500,
            "storage",
            format!(
                "the query compiler met an unchecked column {:?}",
                excerpt(name)
            ),
        ))
    }
}

impl Plan {
    /// The SQL and its parameters. Names are quoted schema names or made-up aliases; every
    /// value is a parameter.
    fn sql(&self, schema: &Schema) -> Result<(String, Vec<SqlValue>), QueryError> {
        let t = &schema.tables()[self.ti];
        let col = |name: &str| column_sql(schema, self.ti, name);
        let mut params: Vec<SqlValue> = Vec::new();
        fn mark(params: &mut Vec<SqlValue>, v: SqlValue) -> String {
            params.push(v);
            format!("?{}", params.len())
        }

        let mut result_cols: Vec<String> = Vec::new();
        match &self.grouping {
            None => result_cols.push(row_columns(t)),
            Some((group, aggregates)) => {
                for g in group {
                    result_cols.push(col(g.name())?);
                }
                for (i, a) in aggregates.iter().enumerate() {
                    let arg = match &a.field {
                        None => "*".to_owned(),
                        Some((c, _)) => col(c)?,
                    };
                    result_cols.push(format!("{}({arg}) AS a{i}", a.func.name()));
                }
            }
        }

        let mut where_sql = Vec::new();
        if let Some(branches) = &self.branches {
            let marks: Vec<String> = branches
                .iter()
                .map(|b| mark(&mut params, SqlValue::Text(b.clone())))
                .collect();
            where_sql.push(if marks.is_empty() {
                "0".to_owned()
            } else {
                format!("\"branch\" IN ({})", marks.join(", "))
            });
        }
        for f in &self.filters {
            where_sql.push(match f {
                Filter::Compare(c, cmp, v) => {
                    let m = mark(&mut params, value_to_sql(v));
                    format!("{} {} {m}", col(c)?, cmp.sql())
                }
                Filter::In(_, values) if values.is_empty() => "0".to_owned(),
                Filter::In(c, values) => {
                    let marks: Vec<String> = values
                        .iter()
                        .map(|v| mark(&mut params, value_to_sql(v)))
                        .collect();
                    format!("{} IN ({})", col(c)?, marks.join(", "))
                }
                Filter::IsNull(c) => format!("{} IS NULL", col(c)?),
            });
        }

        let mut q = format!(
            "SELECT {} FROM {}",
            result_cols.join(", "),
            table_name(&t.name)
        );
        if !where_sql.is_empty() {
            q.push_str(" WHERE ");
            q.push_str(&where_sql.join(" AND "));
        }
        let mut order: Vec<String> = Vec::new();
        for (field, key, desc) in &self.order {
            let dir = if *desc { "DESC" } else { "ASC" };
            order.push(match key {
                OrderKey::Column => format!("{} {dir}", col(field)?),
                OrderKey::Aggregate(i) => format!("a{i} {dir}"),
            });
        }
        // Ties are broken by the result's key so that pages are stable.
        match &self.grouping {
            None => order.push("\"branch\" ASC, \"id\" ASC".to_owned()),
            Some((group, _)) => {
                if !group.is_empty() {
                    q.push_str(" GROUP BY ");
                    q.push_str(
                        &group
                            .iter()
                            .map(|g| col(g.name()))
                            .collect::<Result<Vec<_>, _>>()?
                            .join(", "),
                    );
                }
                for g in group {
                    order.push(format!("{} ASC", col(g.name())?));
                }
            }
        }
        if !order.is_empty() {
            q.push_str(" ORDER BY ");
            q.push_str(&order.join(", "));
        }
        let limit = mark(&mut params, SqlValue::Integer(self.limit as i64 + 1));
        let offset = mark(&mut params, SqlValue::Integer(self.offset as i64));
        q.push_str(&format!(" LIMIT {limit} OFFSET {offset}"));
        Ok((q, params))
    }

    /// One result row as JSON.
    fn row_json(&self, schema: &Schema, r: &rusqlite::Row<'_>) -> rusqlite::Result<Json> {
        let Some((group, aggregates)) = &self.grouping else {
            let (branch, row) = row_from_sql(schema, self.ti, r)?;
            let mut m = row_to_json(&row);
            if let Some(cols) = &self.select {
                m.retain(|k, _| cols.iter().any(|c| c == k));
            }
            m.insert(BRANCH.into(), Json::String(branch));
            return Ok(Json::Object(m));
        };
        let mut m = Map::with_capacity(group.len() + aggregates.len());
        for (i, g) in group.iter().enumerate() {
            let v = match g {
                GroupColumn::Branch => Json::String(r.get(i)?),
                GroupColumn::Column(_, ty) => {
                    value_to_json(&value_from_sql(*ty, i, r.get_ref(i)?)?)
                }
            };
            m.insert(g.name().to_owned(), v);
        }
        for (j, a) in aggregates.iter().enumerate() {
            let i = group.len() + j;
            let v = match (a.func, &a.field) {
                (AggFn::Count, _) => Json::from(r.get::<_, i64>(i)?),
                (AggFn::Sum, _) => r.get::<_, Option<i64>>(i)?.map_or(Json::Null, Json::from),
                // A finite average of integers; JSON has no NaN, so a NaN (impossible here)
                // would read as null rather than fail.
                (AggFn::Avg, _) => r
                    .get::<_, Option<f64>>(i)?
                    .and_then(serde_json::Number::from_f64)
                    .map_or(Json::Null, Json::Number),
                (AggFn::Min | AggFn::Max, Some((_, ty))) => {
                    value_to_json(&value_from_sql(*ty, i, r.get_ref(i)?)?)
                }
                // `plan` gives min and max a field.
                (AggFn::Min | AggFn::Max, None) => Json::Null,
            };
            m.insert(a.name.clone(), v);
        }
        Ok(Json::Object(m))
    }
}

/// SQLite's integer `sum` fails with this message rather than wrap or lose precision.
fn is_integer_overflow(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(_, Some(m)) if m.contains("integer overflow"))
}

/// Runs a head-office query: the CONTRACT 2.2 body plus `"branch": ID | [IDs]` (default all;
/// `"*"` names the hub-owned rows kept for every branch), `"groupBy": [cols]` (columns of the
/// table, or `branch`) and `"aggregates": [{"fn": count|sum|min|max|avg, "field": c?, "as":
/// name?}]` (`count` without a field counts rows; `sum` and `avg` take integer or money columns;
/// `as` defaults to `count` or `<fn>_<field>`). With grouping, `orderBy` names group columns or
/// aggregate names. Branches are chosen with `branch` only: `where` names table columns, as at
/// the edge. Returns `{"table": t, "rows": [...], "meta": {"count": n, "has_more": b,
/// "query_ms": f}}`; see the module documentation for the shape of the rows. Only reads.
pub fn query(conn: &Connection, schema: &Schema, body: &Json) -> Result<Json, QueryError> {
    let started = Instant::now();
    let plan = plan(schema, body)?;
    let (sql, params) = plan.sql(schema)?;
    let overflow = |e: rusqlite::Error| {
        if is_integer_overflow(&e) {
            QueryError::new(
                422,
                "aggregate_overflow",
                "a sum leaves the 64-bit integer range; narrow the query with branch or where, or group it",
            )
        } else {
            storage(e)
        }
    };
    let mut stmt = conn.prepare_cached(&sql).map_err(storage)?;
    let mut rows: Vec<Json> = stmt
        .query_map(rusqlite::params_from_iter(params), |r| {
            plan.row_json(schema, r)
        })
        .map_err(storage)?
        .collect::<rusqlite::Result<_>>()
        .map_err(overflow)?;
    let has_more = rows.len() > plan.limit;
    rows.truncate(plan.limit);
    let count = rows.len();
    let query_ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok(json!({
        "table": schema.tables()[plan.ti].name,
        "rows": rows,
        "meta": { "count": count, "has_more": has_more, "query_ms": query_ms },
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use serde_json::json;
    use shared::{Hlc, OriginId, Seq, pos};

    use super::*;

    const T0: i64 = 1_780_000_000_000_000;

    fn db(schema: &Schema) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        migrate(&conn, schema).unwrap();
        conn
    }

    /// A log entry from `origin` for `table`, with the given user columns (others null).
    #[allow(clippy::too_many_arguments)]
    fn entry(
        s: &Schema,
        origin: &str,
        seq: u64,
        table: &str,
        op: EntryOp,
        id: &str,
        version: u64,
        fields: &[(&str, Value)],
    ) -> LogEntry {
        let ti = s.table_index(table).unwrap();
        let t = &s.tables()[ti];
        let mut values = vec![Value::Null; t.columns.len()];
        for (c, v) in fields {
            values[t.column_index(c).unwrap()] = v.clone();
        }
        LogEntry {
            origin: OriginId::parse(origin).unwrap(),
            seq: Seq(seq),
            hlc: Hlc::new(seq, 0),
            table: table.into(),
            op,
            row_id: id.into(),
            row: Row {
                id: id.into(),
                version,
                created_at: Timestamp(T0 + seq as i64),
                updated_at: Timestamp(T0 + seq as i64 + version as i64),
                seq: (t.kind == TableKind::Log).then_some(seq),
                columns: s.columns(ti).clone(),
                values,
            },
            clock: None,
            scope: None,
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    /// Everything in the database, to show that a refused request changed nothing.
    fn dump(conn: &Connection, schema: &Schema) -> Vec<String> {
        let mut out: Vec<String> = conn
            .prepare("SELECT type, name, sql FROM sqlite_master ORDER BY name")
            .unwrap()
            .query_map([], |r| {
                Ok(format!(
                    "{:?}",
                    (
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?
                    )
                ))
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        for t in schema.tables() {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT * FROM {} ORDER BY branch, id",
                    table_name(&t.name)
                ))
                .unwrap();
            let n = stmt.column_count();
            let rows: Vec<String> = stmt
                .query_map([], |r| {
                    let vals: Vec<SqlValue> = (0..n).map(|i| r.get(i)).collect::<Result<_, _>>()?;
                    Ok(format!("{}: {vals:?}", t.name))
                })
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            out.extend(rows);
        }
        out
    }

    #[test]
    fn hub_members_extend_the_edge_members() {
        assert_eq!(HUB_QUERY_MEMBERS[..6], sq::QUERY_MEMBERS);
    }

    #[test]
    fn migrate_is_idempotent_and_appends_columns() {
        let s = pos::schema();
        let conn = db(&s);
        conn.execute_batch("BEGIN").unwrap();
        let e = entry(
            &s,
            "B1",
            1,
            "order_payment",
            EntryOp::Insert,
            "p1",
            1,
            &[("amount", Value::Int(5))],
        );
        apply(&conn, &s, "B1", &e).unwrap();
        // Inside the caller's transaction too (a savepoint, not a BEGIN).
        migrate(&conn, &s).unwrap();
        conn.execute_batch("COMMIT").unwrap();
        let before = dump(&conn, &s);
        migrate(&conn, &s).unwrap();
        assert_eq!(dump(&conn, &s), before);
        assert!(
            before
                .iter()
                .any(|l| l.contains("r_order_payment.order_id")),
            "{before:?}"
        );
        assert!(
            before.iter().any(|l| l.contains("r_order_payment.seq")),
            "{before:?}"
        );
        assert!(
            !before.iter().any(|l| l.contains("r_order_header.seq")),
            "{before:?}"
        );

        let v1 = Schema::from_json(
            r#"{"module":"m","tables":[{"name":"thing","kind":"state","owner":"branch",
                "columns":[{"name":"a","type":"text"}]}]}"#,
        )
        .unwrap();
        let v2 = Schema::from_json(
            r#"{"module":"m","tables":[{"name":"thing","kind":"state","owner":"branch",
                "columns":[{"name":"a","type":"text"},{"name":"b","type":"money","indexed":true}]}]}"#,
        )
        .unwrap();
        let conn = db(&v1);
        let old = entry(
            &v1,
            "B1",
            1,
            "thing",
            EntryOp::Insert,
            "x",
            1,
            &[("a", text("kept"))],
        );
        apply(&conn, &v1, "B1", &old).unwrap();
        migrate(&conn, &v2).unwrap();
        let row = get(&conn, &v2, "B1", "thing", "x").unwrap().unwrap();
        assert_eq!(row.get("a"), &text("kept"));
        assert_eq!(row.get("b"), &Value::Null);
        // An entry decoded with the old schema still applies under the new one, by name.
        apply(&conn, &v2, "B1", &old).unwrap();

        let retyped = Schema::from_json(
            r#"{"module":"m","tables":[{"name":"thing","kind":"state","owner":"branch",
                "columns":[{"name":"a","type":"integer"}]}]}"#,
        )
        .unwrap();
        let before = dump(&conn, &v2);
        let e = migrate(&conn, &retyped).unwrap_err();
        assert!(e.to_string().contains("stored as TEXT"), "{e}");
        assert_eq!(dump(&conn, &v2), before);

        let reserved = Schema::from_json(
            r#"{"module":"m","tables":[{"name":"other","kind":"state","owner":"branch",
                "columns":[{"name":"branch","type":"text"}]}]}"#,
        )
        .unwrap();
        let e = migrate(&conn, &reserved).unwrap_err();
        assert!(e.to_string().contains("reserves"), "{e}");
    }

    #[test]
    fn apply_round_trips_through_get() {
        let s = pos::schema();
        let conn = db(&s);
        let ins = entry(
            &s,
            "B1",
            1,
            "order_header",
            EntryOp::Insert,
            "o1",
            1,
            &[("status", text("open")), ("total_amount", Value::Int(1250))],
        );
        apply(&conn, &s, "B1", &ins).unwrap();
        assert_eq!(
            get(&conn, &s, "B1", "order_header", "o1").unwrap(),
            Some(ins.row.clone())
        );
        assert_eq!(get(&conn, &s, "B2", "order_header", "o1").unwrap(), None);

        let upd = entry(
            &s,
            "B1",
            2,
            "order_header",
            EntryOp::Update,
            "o1",
            2,
            &[("status", text("closed")), ("notes", text("paid; thanks"))],
        );
        apply(&conn, &s, "B1", &upd).unwrap();
        assert_eq!(
            get(&conn, &s, "B1", "order_header", "o1").unwrap(),
            Some(upd.row.clone())
        );

        let shift = entry(
            &s,
            "B1",
            3,
            "pos_shift",
            EntryOp::Insert,
            "s1",
            1,
            &[
                ("is_closed", Value::Bool(true)),
                ("opened_at", Value::Timestamp(Timestamp(T0 - 7))),
                ("opening_cash", Value::Int(-3)),
            ],
        );
        apply(&conn, &s, "B1", &shift).unwrap();
        assert_eq!(
            get(&conn, &s, "B1", "pos_shift", "s1").unwrap(),
            Some(shift.row.clone())
        );

        let del = entry(&s, "B1", 4, "order_header", EntryOp::Delete, "o1", 3, &[]);
        apply(&conn, &s, "B1", &del).unwrap();
        assert_eq!(get(&conn, &s, "B1", "order_header", "o1").unwrap(), None);
        // Deleting what is not there is a no-op.
        apply(&conn, &s, "B1", &del).unwrap();

        // Hub-owned rows for every branch.
        let menu = entry(
            &s,
            "hub",
            1,
            "menu_item",
            EntryOp::Insert,
            "m1",
            1,
            &[("price", Value::Int(900))],
        );
        apply(&conn, &s, ALL_BRANCHES, &menu).unwrap();
        assert_eq!(
            get(&conn, &s, "*", "menu_item", "m1").unwrap(),
            Some(menu.row)
        );
    }

    #[test]
    fn apply_refuses_bad_entries_and_changes_nothing() {
        let s = pos::schema();
        let conn = db(&s);
        let good = entry(
            &s,
            "B1",
            1,
            "order_payment",
            EntryOp::Insert,
            "p1",
            1,
            &[("amount", Value::Int(5))],
        );
        apply(&conn, &s, "B1", &good).unwrap();
        let before = dump(&conn, &s);

        let check = |branch: &str, e: &LogEntry, want: &str| {
            let err = apply(&conn, &s, branch, e).unwrap_err();
            assert!(format!("{err:?}").starts_with(want), "{err:?}");
            assert_eq!(dump(&conn, &s), before);
        };
        check("B 1", &good, "InvalidBranch");
        check("", &good, "InvalidBranch");
        check(
            "B1'; DROP TABLE r_order_payment; --",
            &good,
            "InvalidBranch",
        );
        let mut e = good.clone();
        e.table = "sqlite_master".into();
        check("B1", &e, "UnknownTable");
        let mut e = good.clone();
        e.row.set("amount", text("12550"));
        check("B1", &e, "InvalidEntry");
        let mut e = good.clone();
        e.row_id = "p2".into();
        check("B1", &e, "InvalidEntry");
        let mut e = good.clone();
        e.row.version = u64::MAX;
        check("B1", &e, "InvalidEntry");
        let mut e = good.clone();
        e.row.columns = vec!["amount".to_owned(), "tip".to_owned()].into();
        e.row.values = vec![Value::Int(1), Value::Int(2)];
        check("B1", &e, "InvalidEntry");

        // A row with fewer values than columns (an older encoding) gets nulls, not a panic.
        let mut e = good.clone();
        e.row.values.truncate(1);
        apply(&conn, &s, "B1", &e).unwrap();
        let row = get(&conn, &s, "B1", "order_payment", "p1")
            .unwrap()
            .unwrap();
        assert_eq!(row.get("order_id"), &Value::Null);
        assert_eq!(row.get("amount"), &Value::Null);
    }

    #[test]
    fn log_rows_of_two_branches_with_one_id_are_two_rows() {
        let s = pos::schema();
        let conn = db(&s);
        for (b, amount) in [("B1", 100), ("B2", 200)] {
            let e = entry(
                &s,
                b,
                7,
                "order_payment",
                EntryOp::Insert,
                "p1",
                1,
                &[("amount", Value::Int(amount))],
            );
            apply(&conn, &s, b, &e).unwrap();
            // A replayed insert changes nothing.
            apply(&conn, &s, b, &e).unwrap();
        }
        let amount = |b: &str| {
            get(&conn, &s, b, "order_payment", "p1")
                .unwrap()
                .unwrap()
                .get("amount")
                .clone()
        };
        assert_eq!(amount("B1"), Value::Int(100));
        assert_eq!(amount("B2"), Value::Int(200));
        let out = query(&conn, &s, &json!({"table": "order_payment"})).unwrap();
        assert_eq!(out["meta"]["count"], 2);
        assert_eq!(out["rows"][0]["branch"], "B1");
        assert_eq!(out["rows"][1]["branch"], "B2");
        assert_eq!(out["rows"][1]["seq"], 7);
    }

    /// One order of the query fixture.
    #[derive(Debug, Clone)]
    struct Order {
        branch: String,
        id: String,
        status: &'static str,
        customer: Option<String>,
        total: i64,
        table_id: String,
    }

    fn orders() -> Vec<Order> {
        (0..30)
            .map(|i: i64| Order {
                branch: format!("B{}", i % 3 + 1),
                id: format!("o{i:02}"),
                status: ["open", "closed", "preparing", "open"][(i % 4) as usize],
                customer: match i % 5 {
                    0 => None,
                    1 | 2 => Some(format!("Ann {i}")),
                    _ => Some(format!("Bob {i}")),
                },
                total: (i * 37) % 1000,
                table_id: format!("T{}", i % 4),
            })
            .collect()
    }

    fn orders_db(s: &Schema) -> (Connection, Vec<Order>) {
        let conn = db(s);
        let orders = orders();
        for (i, o) in orders.iter().enumerate() {
            let e = entry(
                s,
                &o.branch,
                i as u64 + 1,
                "order_header",
                EntryOp::Insert,
                &o.id,
                1,
                &[
                    ("status", text(o.status)),
                    (
                        "customer_name",
                        o.customer.clone().map_or(Value::Null, Value::Text),
                    ),
                    ("total_amount", Value::Int(o.total)),
                    ("table_id", text(&o.table_id)),
                ],
            );
            apply(&conn, s, &o.branch, &e).unwrap();
        }
        (conn, orders)
    }

    fn keys(out: &Json) -> Vec<(String, String)> {
        out["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["branch"].as_str().unwrap().to_owned(),
                    r["id"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn query_filters_match_the_fixture() {
        let s = pos::schema();
        let (conn, orders) = orders_db(&s);
        let check = |filter: Json, pred: &dyn Fn(&Order) -> bool| {
            let mut body = json!({"table": "order_header", "limit": 1000});
            for (k, v) in filter.as_object().unwrap() {
                body[k] = v.clone();
            }
            let out = query(&conn, &s, &body).unwrap_or_else(|e| panic!("{body}: {e}"));
            let mut want: Vec<(String, String)> = orders
                .iter()
                .filter(|o| pred(o))
                .map(|o| (o.branch.clone(), o.id.clone()))
                .collect();
            want.sort();
            assert_eq!(keys(&out), want, "{body}");
            assert_eq!(out["meta"]["count"], want.len(), "{body}");
            assert_eq!(out["meta"]["has_more"], false, "{body}");
            assert_eq!(out["table"], "order_header");
        };
        let ann = |o: &Order| o.customer.as_deref().is_some_and(|c| c.starts_with("Ann"));
        check(json!({}), &|_| true);
        check(json!({"where": {"status": "open"}}), &|o| {
            o.status == "open"
        });
        check(json!({"where": {"table_id": ["T1", "T2"]}}), &|o| {
            ["T1", "T2"].contains(&o.table_id.as_str())
        });
        check(json!({"where": {"table_id": []}}), &|_| false);
        check(json!({"where": {"customer_name": null}}), &|o| {
            o.customer.is_none()
        });
        check(
            json!({"where": {"customer_name": {"op": "=", "value": null}}}),
            &|o| o.customer.is_none(),
        );
        check(
            json!({"where": {"total_amount": {"op": ">=", "value": 500}}}),
            &|o| o.total >= 500,
        );
        check(
            json!({"where": {"total_amount": {"op": "<", "value": 300}}}),
            &|o| o.total < 300,
        );
        check(
            json!({"where": {"status": {"op": "!=", "value": "open"}}}),
            &|o| o.status != "open",
        );
        check(
            json!({"where": {"customer_name": {"op": "like", "value": "ann%"}}}),
            &ann,
        );
        check(
            json!({"where": {"customer_name": {"op": "like", "value": "%n 1_"}, "status": "open"}}),
            &|o| {
                let c = o.customer.as_deref().unwrap_or("");
                c.len() >= 4 && &c[c.len() - 4..c.len() - 1] == "n 1" && o.status == "open"
            },
        );
        check(json!({"where": {"id": "o07"}}), &|o| o.id == "o07");
        check(json!({"branch": "B2"}), &|o| o.branch == "B2");
        check(json!({"branch": ["B1", "B3"]}), &|o| o.branch != "B2");
        check(
            json!({"branch": ["B1", "B3"], "where": {"status": "open"}}),
            &|o| o.branch != "B2" && o.status == "open",
        );
        check(json!({"branch": []}), &|_| false);
        check(json!({"branch": "B9"}), &|_| false);
    }

    #[test]
    fn query_rows_are_edge_rows_plus_branch() {
        let s = pos::schema();
        let (conn, _) = orders_db(&s);
        let out = query(
            &conn,
            &s,
            &json!({"table": "order_header", "branch": "B2", "limit": 1}),
        )
        .unwrap();
        let row = get(&conn, &s, "B2", "order_header", "o01")
            .unwrap()
            .unwrap();
        let mut want = row_to_json(&row);
        want.insert("branch".into(), json!("B2"));
        assert_eq!(out["rows"][0], Json::Object(want));
        assert_eq!(out["rows"][0]["created_at"], "2026-05-28T20:26:40.000002Z");
        assert!(out["meta"]["query_ms"].as_f64().is_some());

        let out = query(
            &conn,
            &s,
            &json!({"table": "order_header", "select": ["id", "status", "branch"], "limit": 2}),
        )
        .unwrap();
        for r in out["rows"].as_array().unwrap() {
            let mut ks: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
            ks.sort();
            assert_eq!(ks, ["branch", "id", "status"]);
        }
    }

    #[test]
    fn query_orders_and_pages() {
        let s = pos::schema();
        let (conn, orders) = orders_db(&s);
        let out = query(
            &conn,
            &s,
            &json!({"table": "order_header", "orderBy": [{"field": "total_amount", "direction": "desc"}], "limit": 1000}),
        )
        .unwrap();
        let totals: Vec<i64> = out["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["total_amount"].as_i64().unwrap())
            .collect();
        let mut want: Vec<i64> = orders.iter().map(|o| o.total).collect();
        want.sort_by(|a, b| b.cmp(a));
        assert_eq!(totals, want);

        // Branch descending, ties by id.
        let out = query(&conn, &s, &json!({"table": "order_header", "orderBy": [{"field": "branch", "direction": "desc"}], "limit": 3})).unwrap();
        assert_eq!(
            keys(&out),
            [("B3", "o02"), ("B3", "o05"), ("B3", "o08")]
                .map(|(b, i)| (b.to_owned(), i.to_owned()))
        );

        // Pages in the default order (branch, id) cover everything once.
        let mut seen = Vec::new();
        let mut offset = 0;
        loop {
            let out = query(
                &conn,
                &s,
                &json!({"table": "order_header", "limit": 7, "offset": offset}),
            )
            .unwrap();
            let page = keys(&out);
            seen.extend(page.clone());
            offset += 7;
            let more = out["meta"]["has_more"].as_bool().unwrap();
            assert_eq!(more, offset < orders.len(), "offset {offset}");
            if !more {
                assert_eq!(page.len(), orders.len() % 7);
                break;
            }
            assert_eq!(page.len(), 7);
        }
        let mut want: Vec<(String, String)> = orders
            .iter()
            .map(|o| (o.branch.clone(), o.id.clone()))
            .collect();
        want.sort();
        assert_eq!(seen, want);
        let out = query(&conn, &s, &json!({"table": "order_header"})).unwrap();
        assert_eq!(out["meta"]["count"], 30);
        let out = query(&conn, &s, &json!({"table": "order_header", "limit": 0})).unwrap();
        assert_eq!(
            (
                out["meta"]["count"].as_u64(),
                out["meta"]["has_more"].as_bool()
            ),
            (Some(0), Some(true))
        );
    }

    /// A deterministic pseudo-random sequence for fixtures.
    fn lcg(state: &mut u64) -> u64 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *state >> 33
    }

    #[test]
    fn group_by_branch_aggregates_payments() {
        let s = pos::schema();
        let conn = db(&s);
        let mut rng = 7;
        // (branch, method, amount) per payment.
        let mut payments: Vec<(String, &str, i64)> = Vec::new();
        for i in 0..400u64 {
            let branch = format!("B{}", lcg(&mut rng) % 3 + 1);
            let method = ["cash", "card", "voucher"][(lcg(&mut rng) % 3) as usize];
            let amount = (lcg(&mut rng) % 50_000) as i64 + 1;
            let e = entry(
                &s,
                &branch,
                i + 1,
                "order_payment",
                EntryOp::Insert,
                &format!("p{i}"),
                1,
                &[
                    ("amount", Value::Int(amount)),
                    ("method", text(method)),
                    ("order_id", text("o1")),
                ],
            );
            apply(&conn, &s, &branch, &e).unwrap();
            payments.push((branch, method, amount));
        }
        let out = query(
            &conn,
            &s,
            &json!({
                "table": "order_payment",
                "groupBy": ["branch"],
                "aggregates": [
                    {"fn": "count", "as": "n"},
                    {"fn": "sum", "field": "amount", "as": "total"},
                    {"fn": "avg", "field": "amount", "as": "mean"},
                    {"fn": "min", "field": "amount"},
                    {"fn": "max", "field": "amount"},
                    {"fn": "max", "field": "created_at", "as": "last"},
                    {"fn": "count", "field": "reference"},
                ],
            }),
        )
        .unwrap();
        let rows = out["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 3, "{out}");
        assert_eq!(out["meta"]["count"], 3);
        for (i, r) in rows.iter().enumerate() {
            let branch = format!("B{}", i + 1);
            let mine: Vec<i64> = payments
                .iter()
                .filter(|p| p.0 == branch)
                .map(|p| p.2)
                .collect();
            let sum: i64 = mine.iter().sum();
            let mut keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
            keys.sort();
            assert_eq!(
                keys,
                [
                    "branch",
                    "count_reference",
                    "last",
                    "max_amount",
                    "mean",
                    "min_amount",
                    "n",
                    "total"
                ]
            );
            assert_eq!(r["branch"], branch.as_str());
            assert_eq!(r["n"], mine.len());
            assert_eq!(r["total"], sum);
            let mean = r["mean"].as_f64().unwrap();
            assert!(
                (mean - sum as f64 / mine.len() as f64).abs() < 1e-6,
                "{mean}"
            );
            assert_eq!(r["min_amount"], *mine.iter().min().unwrap());
            assert_eq!(r["max_amount"], *mine.iter().max().unwrap());
            assert_eq!(r["count_reference"], 0);
            assert!(r["last"].as_str().unwrap().ends_with('Z'), "{r}");
        }

        // Two group columns, ordered by an aggregate; branch filter; no branch in the rows when
        // it is not grouped by.
        let out = query(
            &conn,
            &s,
            &json!({
                "table": "order_payment",
                "branch": ["B1", "B2"],
                "groupBy": ["method"],
                "aggregates": [{"fn": "sum", "field": "amount", "as": "total"}],
                "orderBy": [{"field": "total", "direction": "desc"}],
            }),
        )
        .unwrap();
        let mut want: BTreeMap<&str, i64> = BTreeMap::new();
        for p in payments.iter().filter(|p| p.0 != "B3") {
            *want.entry(p.1).or_default() += p.2;
        }
        let mut want: Vec<(&str, i64)> = want.into_iter().collect();
        want.sort_by_key(|w| std::cmp::Reverse(w.1));
        let got: Vec<(&str, i64)> = out["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert!(r.get("branch").is_none(), "{r}");
                (r["method"].as_str().unwrap(), r["total"].as_i64().unwrap())
            })
            .collect();
        assert_eq!(got, want);

        // Grouped by branch and method, paged.
        let out = query(
            &conn,
            &s,
            &json!({"table": "order_payment", "groupBy": ["branch", "method"], "aggregates": [{"fn": "count"}], "limit": 4}),
        )
        .unwrap();
        assert_eq!(out["meta"]["count"], 4);
        assert_eq!(out["meta"]["has_more"], true);
        assert_eq!(out["rows"][0]["branch"], "B1");
        assert_eq!(out["rows"][0]["method"], "card");
        let n = payments
            .iter()
            .filter(|p| p.0 == "B1" && p.1 == "card")
            .count();
        assert_eq!(out["rows"][0]["count"], n);

        // Aggregates without groupBy: one row over every match, even none.
        let all: i64 = payments.iter().filter(|p| p.1 == "cash").map(|p| p.2).sum();
        let out = query(
            &conn,
            &s,
            &json!({"table": "order_payment", "where": {"method": "cash"}, "aggregates": [{"fn": "sum", "field": "amount"}, {"fn": "count"}]}),
        )
        .unwrap();
        assert_eq!(
            out["rows"],
            json!([{"sum_amount": all, "count": payments.iter().filter(|p| p.1 == "cash").count()}])
        );
        let out = query(
            &conn,
            &s,
            &json!({"table": "order_payment", "where": {"method": "cheque"}, "aggregates": [{"fn": "sum", "field": "amount"}, {"fn": "avg", "field": "amount"}, {"fn": "count"}]}),
        )
        .unwrap();
        assert_eq!(
            out["rows"],
            json!([{"sum_amount": null, "avg_amount": null, "count": 0}])
        );

        // groupBy alone lists the distinct groups.
        let out = query(
            &conn,
            &s,
            &json!({"table": "order_payment", "groupBy": ["branch"]}),
        )
        .unwrap();
        assert_eq!(
            out["rows"],
            json!([{"branch": "B1"}, {"branch": "B2"}, {"branch": "B3"}])
        );
    }

    #[test]
    fn sum_overflow_is_a_clear_error() {
        let s = pos::schema();
        let conn = db(&s);
        for (i, amount) in [i64::MAX, 1].into_iter().enumerate() {
            let e = entry(
                &s,
                "B1",
                i as u64 + 1,
                "order_payment",
                EntryOp::Insert,
                &format!("p{i}"),
                1,
                &[("amount", Value::Int(amount))],
            );
            apply(&conn, &s, "B1", &e).unwrap();
        }
        let sum =
            json!({"table": "order_payment", "aggregates": [{"fn": "sum", "field": "amount"}]});
        let e = query(&conn, &s, &sum).unwrap_err();
        assert_eq!((e.status, e.code), (422, "aggregate_overflow"), "{e}");
        // avg and max still answer.
        let out = query(
            &conn,
            &s,
            &json!({"table": "order_payment", "aggregates": [{"fn": "avg", "field": "amount"}, {"fn": "max", "field": "amount"}]}),
        )
        .unwrap();
        assert_eq!(out["rows"][0]["max_amount"], i64::MAX);
        assert!(out["rows"][0]["avg_amount"].as_f64().unwrap() > 4e18);
    }

    #[test]
    fn bad_queries_get_4xx_and_change_nothing() {
        let s = pos::schema();
        let (conn, _) = orders_db(&s);
        let before = dump(&conn, &s);
        let sql_col = "notes\" OR 1=1 --";
        let agg = |a: Json| json!({"table": "order_payment", "aggregates": [a]});
        #[rustfmt::skip]
        let cases = [
            (json!([1]),                                                                     400, "invalid_body"),
            (json!({"where": {}}),                                                           400, "invalid_body"),
            (json!({"table": 5}),                                                            400, "invalid_body"),
            (json!({"table": "order_header", "having": "1=1"}),                              400, "invalid_body"),
            (json!({"table": "no_such_table"}),                                              404, "unknown_table"),
            (json!({"table": "order_header; DROP TABLE r_order_header"}),                    404, "unknown_table"),
            (json!({"table": "sqlite_master"}),                                              404, "unknown_table"),
            (json!({"table": "order_header", "where": {"bogus": 1}}),                        400, "unknown_column"),
            (json!({"table": "order_header", "where": {sql_col: 1}}),                        400, "unknown_column"),
            (json!({"table": "order_header", "where": {"branch": "B1"}}),                    400, "unknown_column"),
            (json!({"table": "order_header", "select": [sql_col]}),                          400, "unknown_column"),
            (json!({"table": "order_header", "orderBy": [{"field": sql_col}]}),              400, "unknown_column"),
            (json!({"table": "order_header", "orderBy": [{"field": "id", "direction": "asc; DROP TABLE x"}]}), 400, "invalid_value"),
            (json!({"table": "order_header", "where": {"status": {"op": "regexp", "value": "x"}}}), 400, "invalid_value"),
            (json!({"table": "order_header", "where": {"total_amount": {"op": "like", "value": "1%"}}}), 400, "invalid_value"),
            (json!({"table": "order_header", "where": {"total_amount": "lots"}}),            400, "invalid_value"),
            (json!({"table": "order_header", "where": {"status": vec!["x"; 1001]}}),         400, "invalid_parameter"),
            (json!({"table": "order_header", "groupBy": ["bogus"]}),                         400, "unknown_column"),
            (json!({"table": "order_header", "groupBy": [sql_col]}),                         400, "unknown_column"),
            (json!({"table": "order_header", "groupBy": "status"}),                          400, "invalid_body"),
            (json!({"table": "order_header", "groupBy": ["status", "status"]}),              400, "invalid_body"),
            (json!({"table": "order_header", "groupBy": ["status"], "select": ["status"]}),   400, "invalid_body"),
            (json!({"table": "order_header", "groupBy": ["status"], "orderBy": [{"field": "total_amount"}]}), 400, "unknown_column"),
            (json!({"table": "order_header", "groupBy": ["status"], "orderBy": [{"field": "branch"}]}), 400, "unknown_column"),
            (json!({"table": "order_header", "groupBy": ["status"], "orderBy": [{"field": "count"}]}), 400, "unknown_column"),
            (agg(json!({"fn": "sum", "field": "bogus"})),                                    400, "unknown_column"),
            (agg(json!({"fn": "sum", "field": sql_col})),                                    400, "unknown_column"),
            (agg(json!({"fn": "sum", "field": "branch"})),                                   400, "unknown_column"),
            (agg(json!({"fn": "median", "field": "amount"})),                                400, "bad_aggregate"),
            (agg(json!({"fn": "sum(amount); DROP TABLE x; --", "field": "amount"})),         400, "bad_aggregate"),
            (agg(json!({"fn": "sum", "field": "method"})),                                   400, "bad_aggregate"),
            (agg(json!({"fn": "avg", "field": "created_at"})),                               400, "bad_aggregate"),
            (agg(json!({"fn": "sum"})),                                                      400, "bad_aggregate"),
            (agg(json!({"fn": "max"})),                                                      400, "bad_aggregate"),
            (agg(json!({"fn": "count", "as": "n; DROP TABLE x"})),                           400, "bad_aggregate"),
            (agg(json!({"fn": "count", "as": "a".repeat(65)})),                              400, "bad_aggregate"),
            (agg(json!({"fn": "count", "as": ""})),                                          400, "bad_aggregate"),
            (agg(json!({"fn": "count", "as": 5})),                                           400, "bad_aggregate"),
            (agg(json!({"fn": "count", "as": "branch"})),                                    400, "bad_aggregate"),
            (agg(json!({"fn": "count", "extra": 1})),                                        400, "invalid_body"),
            (agg(json!("count")),                                                            400, "invalid_body"),
            (agg(json!({"field": "amount"})),                                                400, "invalid_body"),
            (json!({"table": "order_payment", "aggregates": [{"fn": "count"}, {"fn": "count"}]}), 400, "bad_aggregate"),
            (json!({"table": "order_payment", "groupBy": ["method"], "aggregates": [{"fn": "count", "as": "method"}]}), 400, "bad_aggregate"),
            (json!({"table": "order_payment", "aggregates": {"fn": "count"}}),               400, "invalid_body"),
            (json!({"table": "order_header", "limit": -1}),                                  400, "invalid_parameter"),
            (json!({"table": "order_header", "limit": 1001}),                                400, "invalid_parameter"),
            (json!({"table": "order_header", "limit": "10"}),                                400, "invalid_parameter"),
            (json!({"table": "order_header", "offset": -5}),                                 400, "invalid_parameter"),
            (json!({"table": "order_header", "offset": 100_001}),                            400, "invalid_parameter"),
            (json!({"table": "order_header", "offset": u64::MAX}),                           400, "invalid_parameter"),
            (json!({"table": "order_header", "branch": "B 1"}),                              400, "invalid_value"),
            (json!({"table": "order_header", "branch": "B1'; DROP TABLE r_order_header; --"}), 400, "invalid_value"),
            (json!({"table": "order_header", "branch": ["B1", ""]}),                         400, "invalid_value"),
            (json!({"table": "order_header", "branch": 1}),                                  400, "invalid_value"),
            (json!({"table": "order_header", "branch": vec!["B1"; 1001]}),                   400, "invalid_parameter"),
        ];
        for (body, status, code) in cases {
            let e = query(&conn, &s, &body).unwrap_err();
            assert_eq!((e.status, e.code), (status, code), "{body}: {e}");
            assert!(!e.message.is_empty());
        }
        assert_eq!(dump(&conn, &s), before);
        // The names the aggregates may use, and the edge's message for unknown members.
        let e = query(&conn, &s, &json!({"table": "order_header", "having": 1})).unwrap_err();
        assert!(
            e.message.contains(
                "(table, select, where, orderBy, limit, offset, branch, groupBy, aggregates)"
            ),
            "{e}"
        );
        query(
            &conn,
            &s,
            &agg(json!({"fn": "count", "as": "a".repeat(64)})),
        )
        .unwrap();
        query(&conn, &s, &agg(json!({"fn": "count", "as": "amount"}))).unwrap();
        query(
            &conn,
            &s,
            &json!({"table": "order_header", "offset": 100_000}),
        )
        .unwrap();
    }

    // ------------------------------------------------------------------------------------------
    // Model test: random applies against a BTreeMap.

    const MODEL_SCHEMA: &str = r#"{"module":"m","tables":[
        {"name":"thing","kind":"state","owner":"branch","columns":[
            {"name":"name","type":"text","indexed":true},{"name":"n","type":"integer"},
            {"name":"amount","type":"money"},{"name":"flag","type":"bool"},
            {"name":"at","type":"timestamp"},{"name":"doc","type":"json"}]},
        {"name":"event","kind":"log","owner":"branch","columns":[{"name":"what","type":"text"}]}
    ]}"#;

    #[derive(Debug, Clone)]
    struct Step {
        table: &'static str,
        branch: &'static str,
        id: &'static str,
        op: EntryOp,
        version: u64,
        values: Vec<Value>,
    }

    fn values_for(table: &'static str) -> BoxedStrategy<Vec<Value>> {
        let text = || {
            prop_oneof![
                Just(Value::Null),
                "[a-zA-Z0-9 '\";%_é-]{0,12}".prop_map(Value::Text)
            ]
        };
        if table == "event" {
            return text().prop_map(|v| vec![v]).boxed();
        }
        let int = || prop_oneof![Just(Value::Null), any::<i64>().prop_map(Value::Int)];
        (
            text(),
            int(),
            int(),
            prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::Bool)],
            prop_oneof![
                Just(Value::Null),
                (-(1i64 << 50)..(1i64 << 50)).prop_map(|t| Value::Timestamp(Timestamp(t)))
            ],
            prop_oneof![
                Just(Value::Null),
                prop::sample::select(vec![r#"{"a":1}"#, "[1,2]", r#""x""#, "null"])
                    .prop_map(|d| Value::Json(d.to_owned()))
            ],
        )
            .prop_map(|(a, b, c, d, e, f)| vec![a, b, c, d, e, f])
            .boxed()
    }

    fn step() -> impl Strategy<Value = Step> {
        (
            prop::sample::select(vec!["thing", "event"]),
            prop::sample::select(vec!["B1", "B2"]),
            prop::sample::select(vec!["a", "b", "c"]),
            prop::sample::select(vec![EntryOp::Insert, EntryOp::Update, EntryOp::Delete]),
            1u64..1000,
        )
            .prop_flat_map(|(table, branch, id, op, version)| {
                values_for(table).prop_map(move |values| Step {
                    table,
                    branch,
                    id,
                    op,
                    version,
                    values,
                })
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn applies_agree_with_a_model(steps in prop::collection::vec(step(), 1..60)) {
            let s = Schema::from_json(MODEL_SCHEMA).unwrap();
            let conn = db(&s);
            let mut model: BTreeMap<(&str, &str, &str), Row> = BTreeMap::new();
            for (i, st) in steps.iter().enumerate() {
                let seq = i as u64 + 1;
                let mut e = entry(&s, st.branch, seq, st.table, st.op, st.id, st.version, &[]);
                e.row.values = st.values.clone();
                apply(&conn, &s, st.branch, &e).unwrap();
                match st.op {
                    EntryOp::Delete => model.remove(&(st.table, st.branch, st.id)),
                    _ => model.insert((st.table, st.branch, st.id), e.row.clone()),
                };
            }
            for table in ["thing", "event"] {
                for branch in ["B1", "B2"] {
                    for id in ["a", "b", "c"] {
                        let got = get(&conn, &s, branch, table, id).unwrap();
                        prop_assert_eq!(got.as_ref(), model.get(&(table, branch, id)));
                    }
                }
                let out = query(&conn, &s, &json!({"table": table, "limit": 1000})).unwrap();
                let want: Vec<Json> = model
                    .iter()
                    .filter(|(k, _)| k.0 == table)
                    .map(|((_, branch, _), row)| {
                        let mut m = row_to_json(row);
                        m.insert("branch".into(), json!(branch));
                        Json::Object(m)
                    })
                    .collect();
                prop_assert_eq!(out["rows"].as_array().unwrap(), &want);
                prop_assert_eq!(&out["meta"]["count"], &json!(want.len()));
            }
        }
    }
}
