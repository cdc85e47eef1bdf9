//! `POST B/query` (CONTRACT 2.2): the JSON query, checked against the schema and handed to the
//! store's query builder, which binds every value.

use std::time::Instant;

use super::Out;
use axum::extract::State;
use serde_json::{Value as Json, json};
use shared::json::row_to_json;
use shared::query::{QUERY_MEMBERS, QueryError, parse_spec, query_object, query_table};
use shared::schema::Access;

use super::rows::{check_scope, table_for};
use super::{ApiError, ApiResult, AppState, Auth, JsonBody, Segments};
use crate::store::query::{Filter, QuerySpec};

/// Every query parsing error is bad input: 400 with the parser's code and message.
impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> ApiError {
        ApiError::bad_request(e.code, e.message)
    }
}

/// Parses a `where` object (CONTRACT 2.2) for table `ti` (see [`shared::query::parse_where`]).
/// Also used by feed filters.
pub(crate) fn parse_where(
    schema: &shared::Schema,
    ti: usize,
    filter: Option<&Json>,
) -> ApiResult<Vec<Filter>> {
    Ok(shared::query::parse_where(schema, ti, filter)?)
}

/// Parses and checks a query body into a spec and the selected columns. The table is resolved
/// between the body's shape and its members so that an unknown table is 404 and a table the
/// role may not read is 403.
pub(super) fn parse(
    state: &AppState,
    auth: Auth,
    body: &Json,
) -> ApiResult<(QuerySpec, Option<Vec<String>>)> {
    let q = query_object(body, &QUERY_MEMBERS)?;
    let table = query_table(q)?;
    let t = table_for(state, auth, table, Access::Read)?;
    let schema = state.store().schema();
    let ti = schema.table_index(&t.name).expect("table_for found it");
    Ok(parse_spec(schema, ti, q)?)
}

pub(super) async fn query(
    State(state): State<AppState>,
    auth: Auth,
    Segments((branch, module)): Segments<(String, String)>,
    JsonBody(body): JsonBody,
) -> ApiResult<Out<Json>> {
    check_scope(&state, &branch, &module)?;
    let (spec, select) = parse(&state, auth, &body)?;
    let started = Instant::now();
    let spec_table = spec.table;
    let result = state.read(move |store| store.query(&spec)).await?;
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
