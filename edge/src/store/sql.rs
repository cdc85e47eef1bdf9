//! The SQLite layout of the edge's database: one table per schema table (`t_<name>`), the
//! origin log (`_log`), sealed segments (`_segments`), settings (`_meta`) and terminal tokens
//! (`_tokens`). Builds the statements once per table and converts rows to and from SQL values.

use std::collections::HashMap;

use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{Connection, OptionalExtension, params};
use shared::schema::{ColumnType, Schema, Table};
use shared::{Row, Timestamp, Value};

use super::error::OpenError;

/// Columns every SQL table has before the user columns, in this order.
const SYSTEM_SQL: &str = "id, version, created_at, updated_at, seq, _clock";
const SYSTEM_SQL_COUNT: usize = 6;

/// Pragmas for every connection: WAL and `synchronous=FULL`. The store's writer connection
/// then switches to `NORMAL`, its fsync made by `store::durable` beside it.
pub fn configure(conn: &Connection, writer: bool) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -16_000)?; // KiB
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    if writer {
        // Checkpoints run on their own connection so that no commit pays for one.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    } else {
        conn.pragma_update(None, "query_only", true)?;
    }
    conn.set_prepared_statement_cache_capacity(256);
    Ok(())
}

fn sql_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Text | ColumnType::Json => "TEXT",
        ColumnType::Integer | ColumnType::Money | ColumnType::Bool | ColumnType::Timestamp => {
            "INTEGER"
        }
    }
}

/// Quotes an identifier. Schema names are already restricted to `[a-z_][a-z0-9_]*`; quoting
/// keeps SQL keywords (`order`, `group`) usable as names.
pub fn quote(name: &str) -> String {
    debug_assert!(shared::schema::is_valid_name(name));
    format!("\"{name}\"")
}

pub fn table_name(table: &str) -> String {
    quote(&format!("t_{table}"))
}

/// Statements of one table, built once.
#[derive(Debug, Clone)]
pub struct TableSql {
    pub insert: String,
    pub update: String,
    pub delete: String,
    pub select_by_id: String,
    pub select_all: String,
    pub select_clock: String,
}

impl TableSql {
    pub fn new(t: &Table) -> TableSql {
        let name = table_name(&t.name);
        let cols: Vec<String> = t.columns.iter().map(|c| quote(&c.name)).collect();
        let all_cols = if cols.is_empty() {
            SYSTEM_SQL.to_owned()
        } else {
            format!("{SYSTEM_SQL}, {}", cols.join(", "))
        };
        let n = SYSTEM_SQL_COUNT + cols.len();
        let placeholders: Vec<String> = (1..=n).map(|i| format!("?{i}")).collect();
        TableSql {
            insert: format!(
                "INSERT INTO {name} ({all_cols}) VALUES ({})",
                placeholders.join(", ")
            ),
            update: update_sql(t, |_| true).0,
            delete: format!("DELETE FROM {name} WHERE id = ?1"),
            select_by_id: format!("SELECT {all_cols} FROM {name} WHERE id = ?1"),
            select_all: format!("SELECT {all_cols} FROM {name}"),
            select_clock: format!("SELECT _clock FROM {name} WHERE id = ?1"),
        }
    }
}

/// Most partial update statements kept (the connection caches 256 statements in all).
const PARTIAL_UPDATES_MAX: usize = 128;

/// `UPDATE` statements that set the system columns and only the user columns an update
/// changed, built once per (table, changed columns) and kept. SQLite re-writes an index
/// whenever one of its columns is in the `SET` list, changed or not, so the full-row `update`
/// would move every index entry of the row (an order's `status`, `shift_id` and `table_id`
/// when only its totals changed).
#[derive(Debug, Default)]
pub struct PartialUpdates {
    built: HashMap<(usize, u64), (String, usize)>,
}

impl PartialUpdates {
    /// The statement for the `changed` columns of table `ti` (`t`), and how many of
    /// `row_params` it binds: its parameters keep `row_params`' positions, cut after the last
    /// one it uses. `None` when a changed column is not in the table or past the 64th, or
    /// when `PARTIAL_UPDATES_MAX` statements exist already (terminals sending ever new sets
    /// of columns must not grow the map or churn the statement cache): the caller then uses
    /// the full `update`.
    pub fn get(&mut self, t: &Table, ti: usize, changed: &[String]) -> Option<(&str, usize)> {
        let mut mask = 0u64;
        for c in changed {
            let i = u32::try_from(t.column_index(c)?).ok()?;
            mask |= 1u64.checked_shl(i)?;
        }
        if self.built.len() >= PARTIAL_UPDATES_MAX && !self.built.contains_key(&(ti, mask)) {
            return None;
        }
        let (sql, params) = self
            .built
            .entry((ti, mask))
            .or_insert_with(|| update_sql(t, |i| mask >> i & 1 == 1));
        Some((sql, *params))
    }
}

/// An `UPDATE` by `id` of the system columns that change (`version`, `updated_at`, `_clock`)
/// and of the user columns `set` picks (by position), with `row_params`' parameter positions
/// (`created_at`, ?3, and `seq`, ?5, never change after the insert). Returns the statement and
/// how many parameters it binds: up to the last one it uses.
fn update_sql(t: &Table, set: impl Fn(usize) -> bool) -> (String, usize) {
    let mut sets = vec!["version = ?2, updated_at = ?4, _clock = ?6".to_owned()];
    let mut params = SYSTEM_SQL_COUNT;
    for (i, c) in t.columns.iter().enumerate().filter(|(i, _)| set(*i)) {
        params = SYSTEM_SQL_COUNT + i + 1;
        sets.push(format!("{} = ?{params}", quote(&c.name)));
    }
    let sql = format!(
        "UPDATE {} SET {} WHERE id = ?1",
        table_name(&t.name),
        sets.join(", ")
    );
    (sql, params)
}

/// `PRAGMA wal_checkpoint(mode)`: whether it was blocked (1) or not (0), the WAL's frames, and
/// how many of them are in the database now.
pub fn wal_checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(i64, i64, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
}

pub fn value_to_sql(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Int(i) => SqlValue::Integer(*i),
        Value::Timestamp(t) => SqlValue::Integer(t.0),
        Value::Text(s) | Value::Json(s) => SqlValue::Text(s.clone()),
    }
}

fn value_from_sql(ty: ColumnType, v: ValueRef<'_>) -> rusqlite::Result<Value> {
    let bad = || rusqlite::Error::InvalidColumnType(0, ty.name().into(), v.data_type());
    Ok(match (ty, v) {
        (_, ValueRef::Null) => Value::Null,
        (ColumnType::Text, ValueRef::Text(s)) => {
            Value::Text(String::from_utf8(s.to_vec()).map_err(|_| bad())?)
        }
        (ColumnType::Json, ValueRef::Text(s)) => {
            Value::Json(String::from_utf8(s.to_vec()).map_err(|_| bad())?)
        }
        (ColumnType::Integer | ColumnType::Money, ValueRef::Integer(i)) => Value::Int(i),
        (ColumnType::Bool, ValueRef::Integer(i)) => Value::Bool(i != 0),
        (ColumnType::Timestamp, ValueRef::Integer(i)) => Value::Timestamp(Timestamp(i)),
        _ => return Err(bad()),
    })
}

/// Borrows a column value as an SQL parameter.
pub fn value_ref(v: &Value) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(match v {
        Value::Null => ValueRef::Null,
        Value::Bool(b) => ValueRef::Integer(i64::from(*b)),
        Value::Int(i) => ValueRef::Integer(*i),
        Value::Timestamp(t) => ValueRef::Integer(t.0),
        Value::Text(s) | Value::Json(s) => ValueRef::Text(s.as_bytes()),
    })
}

/// The parameters of `insert`/`update` for a row, in column order, borrowed from the row
/// (an iterator: no vector is built per statement).
pub fn row_params<'a>(
    t: &Table,
    row: &'a Row,
    clock: Option<&'a [u8]>,
) -> impl Iterator<Item = ToSqlOutput<'a>> {
    debug_assert_eq!(row.values.len(), t.columns.len());
    let system = [
        ValueRef::Text(row.id.as_bytes()),
        ValueRef::Integer(row.version as i64),
        ValueRef::Integer(row.created_at.0),
        ValueRef::Integer(row.updated_at.0),
        row.seq
            .map_or(ValueRef::Null, |s| ValueRef::Integer(s as i64)),
        clock.map_or(ValueRef::Null, ValueRef::Blob),
    ];
    system
        .into_iter()
        .map(ToSqlOutput::Borrowed)
        .chain(row.values.iter().map(value_ref))
}

/// Reads a row selected with the table's column list (`select_by_id`, `select_all`).
pub fn row_from_sql(schema: &Schema, ti: usize, r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let t = &schema.tables()[ti];
    let mut values = Vec::with_capacity(t.columns.len());
    for (i, c) in t.columns.iter().enumerate() {
        values.push(value_from_sql(c.ty, r.get_ref(SYSTEM_SQL_COUNT + i)?)?);
    }
    Ok(Row {
        id: r.get(0)?,
        version: r.get::<_, i64>(1)? as u64,
        created_at: Timestamp(r.get(2)?),
        updated_at: Timestamp(r.get(3)?),
        seq: r.get::<_, Option<i64>>(4)?.map(|s| s as u64),
        columns: schema.columns(ti).clone(),
        values,
    })
}

/// Creates or checks the database layout for `schema`. When the stored fingerprint equals the
/// schema's, the layout is known to match and nothing is checked.
pub fn migrate(conn: &Connection, schema: &Schema, branch: &str) -> Result<(), OpenError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS _meta (key TEXT PRIMARY KEY NOT NULL, value) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS _log (last_seq INTEGER PRIMARY KEY, first_seq INTEGER NOT NULL,
             last_version INTEGER NOT NULL, chunk BLOB NOT NULL);
         CREATE INDEX IF NOT EXISTS _log_version ON _log (last_version);
         CREATE TABLE IF NOT EXISTS _segments (last_seq INTEGER PRIMARY KEY, first_seq INTEGER NOT NULL,
             prev_hash BLOB NOT NULL, hash BLOB NOT NULL, bytes INTEGER NOT NULL, sealed_at INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS _tombstones (tbl TEXT NOT NULL, id TEXT NOT NULL,
             version INTEGER NOT NULL, PRIMARY KEY (tbl, id)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS _tokens (hash BLOB PRIMARY KEY NOT NULL, role TEXT NOT NULL,
             created_at INTEGER NOT NULL) WITHOUT ROWID;",
    )?;
    match get_meta::<String>(conn, "branch")? {
        None => set_meta(conn, "branch", branch)?,
        Some(stored) if stored == branch => {}
        Some(stored) => {
            return Err(OpenError::WrongBranch {
                stored,
                requested: branch.to_owned(),
            });
        }
    }
    let fingerprint = schema.fingerprint().to_vec();
    let old_layout = without_rowid_tables(conn, schema)?;
    if old_layout.is_empty()
        && get_meta::<Vec<u8>>(conn, "schema_fingerprint")?.as_deref() == Some(&fingerprint[..])
    {
        return Ok(());
    }
    let tx = conn.unchecked_transaction()?;
    for table in &old_layout {
        rebuild_as_rowid_table(&tx, table)?;
    }
    for t in schema.tables() {
        let name = table_name(&t.name);
        let existing: Vec<(String, String)> = {
            let mut stmt = tx.prepare(&format!(
                "SELECT name, type FROM pragma_table_info('t_{}')",
                t.name
            ))?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?
        };
        if existing.is_empty() {
            let mut cols = vec![
                "id TEXT PRIMARY KEY NOT NULL".to_owned(),
                "version INTEGER NOT NULL".to_owned(),
                "created_at INTEGER NOT NULL".to_owned(),
                "updated_at INTEGER NOT NULL".to_owned(),
                "seq INTEGER".to_owned(),
                "_clock BLOB".to_owned(),
            ];
            cols.extend(
                t.columns
                    .iter()
                    .map(|c| format!("{} {}", quote(&c.name), sql_type(c.ty))),
            );
            // A rowid table, not `WITHOUT ROWID`: rows are stored in insertion order and
            // every index entry ends in the rowid, so a group's new rows, their status-log
            // rows and their low-cardinality index entries (`status`, `station_id`) land on
            // the last page of each B-tree instead of one page per row. A group commit then
            // writes ~40 % fewer WAL frames with the load generator's per-till ids
            // (BENCHMARKS.md, "Where the till cycle's pages go"). Tables created by earlier
            // versions as `WITHOUT ROWID` are rebuilt this way when the store opens
            // (`rebuild_as_rowid_table`).
            tx.execute_batch(&format!("CREATE TABLE {name} ({})", cols.join(", ")))?;
        } else {
            for c in &t.columns {
                match existing.iter().find(|(n, _)| *n == c.name) {
                    None => tx.execute_batch(&format!(
                        "ALTER TABLE {name} ADD COLUMN {} {}",
                        quote(&c.name),
                        sql_type(c.ty)
                    ))?,
                    Some((_, ty)) if ty == sql_type(c.ty) => {}
                    Some((_, ty)) => {
                        return Err(OpenError::Incompatible(format!(
                            "column {}.{} is stored as {ty} but the schema declares {}; migrate the data or use a new column name",
                            t.name,
                            c.name,
                            c.ty.name()
                        )));
                    }
                }
            }
        }
        for c in t.index_columns() {
            tx.execute_batch(&format!(
                "CREATE INDEX IF NOT EXISTS {} ON {name} ({})",
                quote(&format!("i_{}_{c}", t.name)),
                quote(c)
            ))?;
        }
    }
    set_meta(&tx, "schema_fingerprint", fingerprint)?;
    tx.commit()?;
    Ok(())
}

/// The schema's tables that an earlier version created `WITHOUT ROWID` (stored names).
fn without_rowid_tables(conn: &Connection, schema: &Schema) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name, sql FROM sqlite_master WHERE type = 'table'")?;
    let tables = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(tables
        .into_iter()
        .filter(|(name, sql)| {
            let ours = schema
                .tables()
                .iter()
                .any(|t| name.strip_prefix("t_") == Some(t.name.as_str()));
            ours && sql
                .trim_end()
                .to_ascii_uppercase()
                .ends_with("WITHOUT ROWID")
        })
        .map(|(name, _)| name)
        .collect())
}

/// Rebuilds the stored table `name` as a rowid table with the same columns and rows, inside
/// the caller's transaction. Its indexes go with the old table; the schema's are created
/// again after it.
fn rebuild_as_rowid_table(tx: &Connection, name: &str) -> rusqlite::Result<()> {
    let started = std::time::Instant::now();
    let columns: Vec<String> = tx
        .prepare("SELECT name, type, \"notnull\", pk FROM pragma_table_info(?1) ORDER BY cid")?
        .query_map([name], |r| {
            let (column, ty, not_null, pk) = (
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, i64>(3)?,
            );
            let constraint = match (pk > 0, not_null) {
                (true, _) => " PRIMARY KEY NOT NULL",
                (false, true) => " NOT NULL",
                (false, false) => "",
            };
            Ok(format!("{} {ty}{constraint}", quote(&column)))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let rows: i64 = tx.query_row(&format!("SELECT count(*) FROM {}", quote(name)), [], |r| {
        r.get(0)
    })?;
    tx.execute_batch(&format!(
        "DROP TABLE IF EXISTS _rowid_rebuild;
         CREATE TABLE _rowid_rebuild ({columns});
         INSERT INTO _rowid_rebuild SELECT * FROM {old};
         DROP TABLE {old};
         ALTER TABLE _rowid_rebuild RENAME TO {old};",
        columns = columns.join(", "),
        old = quote(name),
    ))?;
    tracing::info!(
        table = name,
        rows,
        ms = started.elapsed().as_millis() as u64,
        "rebuilt a WITHOUT ROWID table of an earlier version as a rowid table"
    );
    Ok(())
}

pub fn get_meta<T: rusqlite::types::FromSql>(
    conn: &Connection,
    key: &str,
) -> rusqlite::Result<Option<T>> {
    conn.prepare_cached("SELECT value FROM _meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()
}

pub fn set_meta(conn: &Connection, key: &str, value: impl rusqlite::ToSql) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT INTO _meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value")?
        .execute(params![key, value])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_update_sets_only_the_changed_columns_and_binds_up_to_the_last() {
        let schema = shared::pos::schema();
        let t = schema.table("order_header").expect("order_header");
        let ti = schema.table_index("order_header").expect("order_header");
        let total = t.column_index("total_amount").expect("total_amount");
        let changed = ["total_amount".to_owned()];
        let mut updates = PartialUpdates::default();
        let (sql, params) = updates.get(t, ti, &changed).expect("a statement");
        assert_eq!(
            sql,
            format!(
                "UPDATE \"t_order_header\" SET version = ?2, updated_at = ?4, _clock = ?6, \
                 \"total_amount\" = ?{} WHERE id = ?1",
                SYSTEM_SQL_COUNT + total + 1
            )
        );
        assert_eq!(params, SYSTEM_SQL_COUNT + total + 1);
        for indexed in ["status", "shift_id", "table_id"] {
            assert!(!sql.contains(indexed), "{indexed} is set: {sql}");
        }

        // Only the system columns: six parameters.
        let (sql, params) = updates.get(t, ti, &[]).expect("a statement");
        assert_eq!(
            sql,
            "UPDATE \"t_order_header\" SET version = ?2, updated_at = ?4, _clock = ?6 WHERE id = ?1"
        );
        assert_eq!(params, SYSTEM_SQL_COUNT);

        // The same columns in another order are the same statement, built once.
        let two = ["status".to_owned(), "total_amount".to_owned()];
        let two_reversed = ["total_amount".to_owned(), "status".to_owned()];
        let first = updates.get(t, ti, &two).expect("a statement").0.to_owned();
        assert_eq!(
            updates.get(t, ti, &two_reversed).expect("a statement").0,
            first
        );
        assert_eq!(updates.built.len(), 3);

        // A name the table does not have gets no statement (the caller writes the whole row).
        assert!(updates.get(t, ti, &["nope".to_owned()]).is_none());

        // Past the cap, a new set of columns gets none either; a known one still does. The
        // set of `bits` holds column i when bit i is set, so its key is `bits` itself.
        let names: Vec<String> = t.columns.iter().map(|c| c.name.clone()).collect();
        let set_of = |bits: u64| -> Vec<String> {
            names
                .iter()
                .enumerate()
                .filter(|(i, _)| bits >> i & 1 == 1)
                .map(|(_, c)| c.clone())
                .collect()
        };
        let mut bits = 1;
        while updates.built.len() < PARTIAL_UPDATES_MAX {
            assert!(updates.get(t, ti, &set_of(bits)).is_some());
            bits += 1;
        }
        while updates.built.contains_key(&(ti, bits)) {
            bits += 1;
        }
        assert!(updates.get(t, ti, &set_of(bits)).is_none());
        assert_eq!(updates.built.len(), PARTIAL_UPDATES_MAX);
        assert!(updates.get(t, ti, &two).is_some());
    }
}
