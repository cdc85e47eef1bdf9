//! Read queries over one table: filters, ordering and paging, compiled to SQL in which every
//! value is a bound parameter and every name is a schema column (quoted), never client text.

use std::sync::Arc;

use rusqlite::types::Value as SqlValue;
use shared::schema::ColumnType;
use shared::{Row, Schema, Value};

use super::error::StoreError;
use super::sql;

/// Most rows one query returns.
pub const QUERY_LIMIT_MAX: usize = 1000;
/// Largest offset accepted: deeper pages should filter on an ordered column instead.
pub const QUERY_OFFSET_MAX: usize = 100_000;
/// Most values in one `IN` list, and most filters and order terms in one query.
pub const QUERY_IN_VALUES_MAX: usize = 1000;
pub const QUERY_TERMS_MAX: usize = 32;

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Like,
}

impl Cmp {
    pub fn parse(op: &str) -> Option<Cmp> {
        Some(match op {
            "=" | "==" => Cmp::Eq,
            "!=" | "<>" => Cmp::Ne,
            "<" => Cmp::Lt,
            "<=" => Cmp::Le,
            ">" => Cmp::Gt,
            ">=" => Cmp::Ge,
            "like" | "LIKE" => Cmp::Like,
            _ => return None,
        })
    }

    fn sql(self) -> &'static str {
        match self {
            Cmp::Eq => "=",
            Cmp::Ne => "!=",
            Cmp::Lt => "<",
            Cmp::Le => "<=",
            Cmp::Gt => ">",
            Cmp::Ge => ">=",
            Cmp::Like => "LIKE",
        }
    }
}

/// One condition on a column; the values are typed for the column already.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    Compare(String, Cmp, Value),
    In(String, Vec<Value>),
    IsNull(String),
}

/// A checked query. Build it with column names from [`column_type`].
#[derive(Debug, Clone, PartialEq)]
pub struct QuerySpec {
    pub table: usize,
    pub filters: Vec<Filter>,
    /// `(column, descending)`.
    pub order: Vec<(String, bool)>,
    pub limit: usize,
    pub offset: usize,
}

/// The type of a queryable column of table `ti`: the server's columns and the user columns.
pub fn column_type(schema: &Schema, ti: usize, name: &str) -> Option<ColumnType> {
    match name {
        "id" => Some(ColumnType::Text),
        "version" | "seq" => Some(ColumnType::Integer),
        "created_at" | "updated_at" => Some(ColumnType::Timestamp),
        _ => schema.tables()[ti].column(name).map(|c| c.ty),
    }
}

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

/// The value of a queryable column of a row, server columns included.
pub fn row_value(row: &Row, name: &str) -> Value {
    match name {
        "id" => Value::Text(row.id.clone()),
        "version" => Value::Int(row.version as i64),
        "created_at" => Value::Timestamp(row.created_at),
        "updated_at" => Value::Timestamp(row.updated_at),
        "seq" => row.seq.map_or(Value::Null, |s| Value::Int(s as i64)),
        _ => row.get(name).clone(),
    }
}

/// SQL `LIKE` in memory: `%` matches any run, `_` one character, ASCII letters ignore case.
fn like(text: &str, pattern: &str) -> bool {
    let t: Vec<char> = text.chars().map(|c| c.to_ascii_lowercase()).collect();
    let p: Vec<char> = pattern.chars().map(|c| c.to_ascii_lowercase()).collect();
    // Classic two-pointer wildcard match with backtracking to the last `%`.
    let (mut ti, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '_' || p[pi] == t[ti]) {
            ti += 1;
            pi += 1;
        } else if pi < p.len() && p[pi] == '%' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '%')
}

impl Filter {
    /// Whether a row satisfies the condition, with SQL's meaning (null matches only IS NULL).
    pub fn matches(&self, row: &Row) -> bool {
        match self {
            Filter::IsNull(c) => row_value(row, c).is_null(),
            Filter::In(c, values) => {
                let v = row_value(row, c);
                !v.is_null() && values.contains(&v)
            }
            Filter::Compare(c, cmp, value) => {
                let v = row_value(row, c);
                if v.is_null() {
                    return false;
                }
                match cmp {
                    Cmp::Eq => v == *value,
                    Cmp::Ne => v != *value,
                    Cmp::Lt => v < *value,
                    Cmp::Le => v <= *value,
                    Cmp::Gt => v > *value,
                    Cmp::Ge => v >= *value,
                    Cmp::Like => match (&v, value) {
                        (Value::Text(t), Value::Text(p)) => like(t, p),
                        _ => false,
                    },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::like;

    #[test]
    fn like_matches_as_sql_does() {
        for (t, p, want) in [
            ("Grill", "grill", true),
            ("grill station", "grill%", true),
            ("the grill", "%grill", true),
            ("bar", "b_r", true),
            ("bar", "b_", false),
            ("", "%", true),
            ("abc", "a%c%", true),
            ("abc", "a%d", false),
        ] {
            assert_eq!(like(t, p), want, "{t:?} LIKE {p:?}");
        }
    }
}
