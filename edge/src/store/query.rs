//! Read queries over one table: filters, ordering and paging, compiled to SQL in which every
//! value is a bound parameter and every name is a schema column (quoted), never client text.
//! The query types and their parsing live in `shared::query` (the hub uses them too).

use std::sync::Arc;

use rusqlite::types::Value as SqlValue;
use shared::{Row, Schema};

use super::error::StoreError;
use super::sql;

pub use shared::query::{
    Cmp, Filter, QUERY_IN_VALUES_MAX, QUERY_LIMIT_MAX, QUERY_OFFSET_MAX, QUERY_TERMS_MAX,
    QuerySpec, column_type, row_value,
};

/// The result: rows in order, and whether more rows follow.
#[derive(Debug, Clone)]
pub struct QueryResult {
    pub rows: Vec<Arc<Row>>,
    pub has_more: bool,
}

pub(crate) fn run(
    conn: &rusqlite::Connection,
    schema: &Schema,
    select_all: &str,
    spec: &QuerySpec,
) -> Result<QueryResult, StoreError> {
    let checked = |name: &str| -> Result<String, StoreError> {
        // Names were checked by the builder of the spec; check again, this is where SQL is made.
        column_type(schema, spec.table, name)
            .map(|_| sql::quote(name))
            .ok_or_else(|| StoreError::Storage(format!("query names unknown column {name:?}")))
    };
    let mut where_sql = Vec::with_capacity(spec.filters.len());
    let mut params: Vec<SqlValue> = Vec::new();
    for f in &spec.filters {
        match f {
            Filter::Compare(c, cmp, v) => {
                params.push(sql::value_to_sql(v));
                where_sql.push(format!("{} {} ?{}", checked(c)?, cmp.sql(), params.len()));
            }
            Filter::In(c, values) => {
                let marks: Vec<String> = values
                    .iter()
                    .map(|v| {
                        params.push(sql::value_to_sql(v));
                        format!("?{}", params.len())
                    })
                    .collect();
                if marks.is_empty() {
                    where_sql.push("0".into());
                } else {
                    where_sql.push(format!("{} IN ({})", checked(c)?, marks.join(", ")));
                }
            }
            Filter::IsNull(c) => where_sql.push(format!("{} IS NULL", checked(c)?)),
        }
    }
    let mut q = select_all.to_owned();
    if !where_sql.is_empty() {
        q.push_str(" WHERE ");
        q.push_str(&where_sql.join(" AND "));
    }
    let mut order: Vec<String> = Vec::with_capacity(spec.order.len() + 1);
    for (c, desc) in &spec.order {
        order.push(format!(
            "{} {}",
            checked(c)?,
            if *desc { "DESC" } else { "ASC" }
        ));
    }
    // Ties are broken by id so that pages are stable.
    order.push("id ASC".into());
    q.push_str(" ORDER BY ");
    q.push_str(&order.join(", "));
    params.push(SqlValue::Integer(
        spec.limit.min(QUERY_LIMIT_MAX) as i64 + 1,
    ));
    q.push_str(&format!(" LIMIT ?{}", params.len()));
    params.push(SqlValue::Integer(spec.offset.min(QUERY_OFFSET_MAX) as i64));
    q.push_str(&format!(" OFFSET ?{}", params.len()));
    let mut stmt = conn.prepare_cached(&q)?;
    let mut rows: Vec<Arc<Row>> = stmt
        .query_map(rusqlite::params_from_iter(params), |r| {
            sql::row_from_sql(schema, spec.table, r).map(Arc::new)
        })?
        .collect::<rusqlite::Result<_>>()?;
    let has_more = rows.len() > spec.limit;
    rows.truncate(spec.limit);
    Ok(QueryResult { rows, has_more })
}
