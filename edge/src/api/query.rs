//! `POST B/query` (CONTRACT 2.2): the JSON query, checked against the schema and handed to the
//! store's query builder, which binds every value.

use std::time::Instant;

use axum::Json as Out;
use axum::extract::{Path, State};
use serde_json::{Map, Value as Json, json};
use shared::Value;
use shared::json::{row_to_json, value_from_json};
use shared::schema::{Access, ColumnType};

use super::rows::{check_scope, table_for};
use super::{ApiError, ApiResult, AppState, Auth, JsonBody};
use crate::store::query::{
    Cmp, Filter, QUERY_IN_VALUES_MAX, QUERY_LIMIT_MAX, QUERY_OFFSET_MAX, QUERY_TERMS_MAX,
    QuerySpec, column_type,
};

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, message)
}

fn unknown_column(table: &str, c: &str) -> ApiError {
    bad(
        "unknown_column",
        format!(
            "table {table} has no column {:?}",
            c.chars().take(64).collect::<String>()
        ),
    )
}

/// A typed value for column `c`.
fn typed(ty: ColumnType, c: &str, v: &Json) -> ApiResult<Value> {
    value_from_json(ty, v).map_err(|expected| {
        bad(
            "invalid_value",
            format!("values for {c:?} must be {expected}"),
        )
    })
}

/// A bounded non-negative integer member of the query.
fn count(q: &Map<String, Json>, name: &str, default: usize, max: usize) -> ApiResult<usize> {
    match q.get(name) {
        None | Some(Json::Null) => Ok(default),
        Some(v) => match v.as_u64() {
            Some(n) if n as usize <= max => Ok(n as usize),
            _ => Err(bad(
                "invalid_parameter",
                format!("\"{name}\" must be an integer from 0 to {max}"),
            )),
        },
    }
}

/// Parses a `where` object (CONTRACT 2.2) for table `ti`: a scalar is equality, an array is
/// IN, null is IS NULL, `{"op": .., "value": ..}` a comparison. Also used by feed filters.
pub(crate) fn parse_where(
    schema: &shared::Schema,
    ti: usize,
    filter: Option<&Json>,
) -> ApiResult<Vec<Filter>> {
    let t = &schema.tables()[ti];
    let ty_of = |c: &str| column_type(schema, ti, c).ok_or_else(|| unknown_column(&t.name, c));
    let mut filters = Vec::new();
    match filter {
        None | Some(Json::Null) => {}
        Some(Json::Object(w)) if w.len() <= QUERY_TERMS_MAX => {
            for (c, v) in w {
                let ty = ty_of(c)?;
                filters.push(match v {
                    Json::Null => Filter::IsNull(c.clone()),
                    Json::Array(vs) if vs.len() <= QUERY_IN_VALUES_MAX => Filter::In(
                        c.clone(),
                        vs.iter()
                            .map(|v| typed(ty, c, v))
                            .collect::<ApiResult<_>>()?,
                    ),
                    Json::Array(_) => {
                        return Err(bad(
                            "invalid_parameter",
                            format!("an IN list holds at most {QUERY_IN_VALUES_MAX} values"),
                        ));
                    }
                    Json::Object(o) => {
                        let op = o
                            .get("op")
                            .and_then(Json::as_str)
                            .and_then(Cmp::parse)
                            .ok_or_else(|| {
                                bad(
                                    "invalid_value",
                                    format!("{c:?}: \"op\" must be one of = != < <= > >= like"),
                                )
                            })?;
                        let value = o.get("value").unwrap_or(&Json::Null);
                        if op == Cmp::Like && !(ty == ColumnType::Text && value.is_string()) {
                            return Err(bad(
                                "invalid_value",
                                format!("{c:?}: like compares a text column with a string"),
                            ));
                        }
                        match (op, typed(ty, c, value)?) {
                            (Cmp::Eq, Value::Null) => Filter::IsNull(c.clone()),
                            (_, Value::Null) => {
                                return Err(bad(
                                    "invalid_value",
                                    format!("{c:?}: only = compares with null"),
                                ));
                            }
                            (op, v) => Filter::Compare(c.clone(), op, v),
                        }
                    }
                    scalar => Filter::Compare(c.clone(), Cmp::Eq, typed(ty, c, scalar)?),
                });
            }
        }
        Some(_) => {
            return Err(bad(
                "invalid_body",
                format!("\"where\" is an object of at most {QUERY_TERMS_MAX} columns"),
            ));
        }
    }

    Ok(filters)
}

/// Parses and checks a query body into a spec and the selected columns.
pub(super) fn parse(
    state: &AppState,
    auth: Auth,
    body: &Json,
) -> ApiResult<(QuerySpec, Option<Vec<String>>)> {
    let q = body
        .as_object()
        .ok_or_else(|| bad("invalid_body", "a query is a JSON object"))?;
    let known = ["table", "select", "where", "orderBy", "limit", "offset"];
    if let Some(k) = q.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(bad(
            "invalid_body",
            format!(
                "unknown query member {:?} (table, select, where, orderBy, limit, offset)",
                k.chars().take(64).collect::<String>()
            ),
        ));
    }
    let table = match q.get("table") {
        Some(Json::String(t)) => t.as_str(),
        _ => return Err(bad("invalid_body", "a query needs \"table\": a table name")),
    };
    let t = table_for(state, auth, table, Access::Read)?;
    let schema = state.store().schema();
    let ti = schema.table_index(&t.name).expect("table_for found it");
    let ty_of = |c: &str| column_type(schema, ti, c).ok_or_else(|| unknown_column(&t.name, c));

    let select = match q.get("select") {
        None | Some(Json::Null) => None,
        Some(Json::Array(cols)) if cols.len() <= 300 => {
            let mut names = Vec::with_capacity(cols.len());
            for c in cols {
                let c = c
                    .as_str()
                    .ok_or_else(|| bad("invalid_body", "\"select\" lists column names"))?;
                ty_of(c)?;
                names.push(c.to_owned());
            }
            Some(names)
        }
        Some(_) => return Err(bad("invalid_body", "\"select\" lists column names")),
    };

    let filters = parse_where(schema, ti, q.get("where"))?;

    let mut order = Vec::new();
    match q.get("orderBy") {
        None | Some(Json::Null) => {}
        Some(Json::Array(terms)) if terms.len() <= QUERY_TERMS_MAX => {
            for term in terms {
                let field = term.get("field").and_then(Json::as_str).ok_or_else(|| {
                    bad(
                        "invalid_body",
                        "each orderBy term is {\"field\": column, \"direction\": \"asc\"|\"desc\"}",
                    )
                })?;
                ty_of(field)?;
                let desc = match term.get("direction").and_then(Json::as_str) {
                    None | Some("asc") | Some("ASC") => false,
                    Some("desc") | Some("DESC") => true,
                    Some(_) => {
                        return Err(bad("invalid_value", "\"direction\" is \"asc\" or \"desc\""));
                    }
                };
                order.push((field.to_owned(), desc));
            }
        }
        Some(_) => {
            return Err(bad(
                "invalid_body",
                "\"orderBy\" is a list of {field, direction}",
            ));
        }
    }

    let spec = QuerySpec {
        table: ti,
        filters,
        order,
        limit: count(q, "limit", 100, QUERY_LIMIT_MAX)?,
        offset: count(q, "offset", 0, QUERY_OFFSET_MAX)?,
    };
    Ok((spec, select))
}

pub(super) async fn query(
    State(state): State<AppState>,
    Path((branch, module)): Path<(String, String)>,
    auth: Auth,
    JsonBody(body): JsonBody,
) -> ApiResult<Out<Json>> {
    check_scope(&state, &branch, &module)?;
    let (spec, select) = parse(&state, auth, &body)?;
    let started = Instant::now();
    let store = state.store().clone();
    let spec_table = spec.table;
    let result = tokio::task::spawn_blocking(move || store.query(&spec))
        .await
        .map_err(|e| ApiError::from(crate::store::StoreError::Storage(e.to_string())))??;
    let query_ms = started.elapsed().as_secs_f64() * 1000.0;
    let rows: Vec<Json> = result
        .rows
        .iter()
        .map(|r| {
            let mut m = row_to_json(r);
            if let Some(cols) = &select {
                m.retain(|k, _| cols.iter().any(|c| c == k));
            }
            Json::Object(m)
        })
        .collect();
    let table = &state.store().schema().tables()[spec_table].name;
    Ok(Out(json!({
        "table": table,
        "meta": { "count": rows.len(), "has_more": result.has_more, "query_ms": query_ms },
        "rows": rows,
    })))
}
