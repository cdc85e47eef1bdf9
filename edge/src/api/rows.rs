//! Row routes: schema, snapshot, insert, get, compare-and-set update and delete, batch, and
//! the branch's event log.

use std::collections::HashMap;
use std::sync::Arc;

use super::Out;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde_json::{Map, Value as Json, json};
use shared::Seq;
use shared::json::{InsertInput, RowJson, row_to_json};
use shared::json_rows::{RowKind, RowRefusal};
use shared::schema::{Access, Table, TableKind};

use super::body::{self, OpBody};
use super::{ApiError, ApiResult, AppState, Auth, RawBody, Segments};
use crate::store::{Applied, LOG_PAGE_MAX, Op, Txn, Write, refused_by_kind};

/// Checks that the path names this edge's branch and its module.
pub(super) fn check_scope(state: &AppState, branch: &str, module: &str) -> ApiResult<()> {
    if branch != state.branch().as_str() {
        return Err(ApiError::not_found(
            "unknown_branch",
            format!("this edge serves branch {}, not {branch:?}", state.branch()),
        ));
    }
    let schema = state.store().schema();
    if module != schema.module() {
        return Err(ApiError::not_found(
            "unknown_module",
            format!(
                "this edge serves module {:?}, not {module:?}",
                schema.module()
            ),
        ));
    }
    Ok(())
}

/// The table, if the role may perform `access` on it. A write the table's kind or owner
/// refuses to everyone (a hub-owned table, a log row changed) is refused as such first.
pub(super) fn table_for<'a>(
    state: &'a AppState,
    Auth(role): Auth,
    name: &str,
    access: Access<'_>,
) -> ApiResult<&'a Table> {
    let table = state.store().schema().table(name).ok_or_else(|| {
        ApiError::not_found(
            "unknown_table",
            format!("there is no table {:?} in this module", truncate(name)),
        )
    })?;
    let write = match access {
        Access::Read => None,
        Access::Insert => Some(Write::Insert),
        Access::Update { .. } => Some(Write::Update),
        Access::Delete => Some(Write::Delete),
    };
    if let Some(refused) = write.and_then(|w| refused_by_kind(table, w)) {
        return Err(refused.into());
    }
    if !table.allows(role, access) {
        let what = match access {
            Access::Read => "read",
            Access::Insert => "insert into",
            Access::Update { .. } => "update these columns of",
            Access::Delete => "delete from",
        };
        return Err(ApiError::forbidden(format!(
            "role {role} may not {what} {}",
            table.name
        )));
    }
    Ok(table)
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A row version from JSON: a positive integer.
fn version_of(v: Option<&Json>) -> ApiResult<u64> {
    match v {
        None | Some(Json::Null) => Err(ApiError::bad_request(
            "version_required",
            "give the row's current \"version\": changes are compare-and-set",
        )),
        Some(v) => v.as_u64().filter(|n| *n >= 1).ok_or_else(|| {
            ApiError::bad_request("invalid_value", "\"version\" must be a positive integer")
        }),
    }
}

fn row_json(row: &shared::Row) -> Json {
    Json::Object(row_to_json(row))
}

/// A row in an answer, written to JSON as the answer is sent (no map built first).
pub(super) struct RowOut(Arc<shared::Row>);

impl serde::Serialize for RowOut {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        RowJson(&self.0).serialize(s)
    }
}

/// A batch's answer: `{"results": [row, ...], "version": N}`.
#[derive(serde::Serialize)]
pub(super) struct BatchOut {
    results: Vec<RowOut>,
    version: u64,
}

pub(super) async fn schema(
    State(state): State<AppState>,
    _auth: Auth,
    Segments((branch, module)): Segments<(String, String)>,
) -> ApiResult<Out<Json>> {
    check_scope(&state, &branch, &module)?;
    let schema = state.store().schema();
    let tables: Vec<Json> = schema
        .tables()
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "kind": match t.kind { TableKind::Log => "log", TableKind::State => "state" },
                "owner": match t.owner {
                    shared::Owner::Branch => "branch",
                    shared::Owner::Hub => "hub",
                    shared::Owner::Shared => "shared",
                },
                "columns": t.columns.iter().map(|c| json!({
                    "name": c.name,
                    "type": c.ty.name(),
                    "indexed": c.indexed,
                    "server_owned": c.server_owned,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Out(json!({ "module": schema.module(), "tables": tables })))
}

pub(super) async fn snapshot(
    State(state): State<AppState>,
    auth: Auth,
    Segments((branch, module)): Segments<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Out<Json>> {
    check_scope(&state, &branch, &module)?;
    let schema = state.store().schema();
    let names: Vec<&str> = match params.get("tables") {
        Some(list) => {
            // Each table once: a name given again would be read (and sent) again.
            let mut names: Vec<&str> = Vec::new();
            for n in list.split(',').filter(|s| !s.is_empty()) {
                let t = table_for(&state, auth, n, Access::Read)?;
                if !names.contains(&t.name.as_str()) {
                    names.push(&t.name);
                }
            }
            names
        }
        None => schema
            .tables()
            .iter()
            .filter(|t| t.allows(auth.0, Access::Read))
            .map(|t| t.name.as_str())
            .collect(),
    };
    let names: Vec<String> = names.into_iter().map(str::to_owned).collect();
    let snap = state
        .read(move |store| {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            store.snapshot(Some(&names))
        })
        .await?;
    let tables: Map<String, Json> = snap
        .tables
        .iter()
        .map(|(name, rows)| {
            (
                name.clone(),
                Json::Array(rows.iter().map(|r| row_json(r)).collect()),
            )
        })
        .collect();
    Ok(Out(json!({ "version": snap.version.0, "tables": tables })))
}

pub(super) async fn insert(
    State(state): State<AppState>,
    auth: Auth,
    Segments((branch, module, table)): Segments<(String, String, String)>,
    RawBody(body): RawBody,
) -> ApiResult<(StatusCode, Out<RowOut>)> {
    check_scope(&state, &branch, &module)?;
    let t = table_for(&state, auth, &table, Access::Insert)?;
    let input = body::row(t, RowKind::Insert, &body, "the row")?;
    let op = Op::Insert {
        table: t.name.clone(),
        id: input.id,
        fields: input.fields,
    };
    let mut done = state.store().commit(Txn::single(auth.0.name(), op)).await?;
    let result = done.results.swap_remove(0);
    let status = match result.applied {
        Applied::AlreadyPresent => StatusCode::OK,
        _ => StatusCode::CREATED,
    };
    Ok((status, Out(RowOut(result.row))))
}

pub(super) async fn get_row(
    State(state): State<AppState>,
    auth: Auth,
    Segments((branch, module, table, id)): Segments<(String, String, String, String)>,
) -> ApiResult<Out<RowOut>> {
    check_scope(&state, &branch, &module)?;
    let t = table_for(&state, auth, &table, Access::Read)?;
    let name = t.name.clone();
    let row = state
        .read(move |store| store.get(&name, &id).map(|r| (r, id)))
        .await?;
    match row {
        (Some(row), _) => Ok(Out(RowOut(row))),
        (None, id) => Err(ApiError::not_found(
            "not_found",
            format!("no row {:?} in table {}", truncate(&id), t.name),
        )),
    }
}

/// The table `table` if the role may update some of its columns (and it is not a log).
fn updatable<'a>(state: &'a AppState, auth: Auth, table: &str) -> ApiResult<&'a Table> {
    table_for(state, auth, table, Access::Update { columns: &[] })
}

/// A compare-and-set update of row `id` of `t` from its `version` and `set` as given,
/// checking the role's rights to the columns set.
fn update_op(
    state: &AppState,
    auth: Auth,
    t: &Table,
    id: String,
    version: Option<&Json>,
    set: Option<Result<InsertInput, RowRefusal>>,
) -> ApiResult<Op> {
    let version = version_of(version)?;
    let may_set = |columns: Vec<&str>| {
        table_for(state, auth, &t.name, Access::Update { columns: &columns }).map(|_| ())
    };
    let set = match set {
        Some(Ok(set)) => {
            may_set(set.fields.keys().map(String::as_str).collect())?;
            set.fields
        }
        Some(Err(RowRefusal::Field { error, columns })) => {
            // A role refused some of these columns hears that first, as for a valid row.
            may_set(columns.iter().map(String::as_str).collect())?;
            return Err(error.into());
        }
        None | Some(Err(RowRefusal::NotObject)) => {
            return Err(ApiError::bad_request(
                "invalid_body",
                "an update is {\"version\": N, \"set\": {column: value, ...}}",
            ));
        }
    };
    Ok(Op::Update {
        table: t.name.clone(),
        id,
        version,
        set,
    })
}

pub(super) async fn update(
    State(state): State<AppState>,
    auth: Auth,
    Segments((branch, module, table, id)): Segments<(String, String, String, String)>,
    RawBody(body): RawBody,
) -> ApiResult<Out<RowOut>> {
    check_scope(&state, &branch, &module)?;
    let t = updatable(&state, auth, &table)?;
    let body = body::update(t, &body)?;
    let op = update_op(&state, auth, t, id, body.version.as_ref(), body.set)?;
    let mut done = state.store().commit(Txn::single(auth.0.name(), op)).await?;
    Ok(Out(RowOut(done.results.swap_remove(0).row)))
}

fn delete_op(
    state: &AppState,
    auth: Auth,
    table: &str,
    id: String,
    version: Option<&Json>,
) -> ApiResult<Op> {
    let t = table_for(state, auth, table, Access::Delete)?;
    Ok(Op::Delete {
        table: t.name.clone(),
        id,
        version: version_of(version)?,
    })
}

pub(super) async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Segments((branch, module, table, id)): Segments<(String, String, String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Out<Json>> {
    check_scope(&state, &branch, &module)?;
    let version = match params.get("version") {
        None => None,
        Some(v) => Some(v.parse::<u64>().map(Json::from).map_err(|_| {
            ApiError::bad_request("invalid_value", "?version= must be a positive integer")
        })?),
    };
    let op = delete_op(&state, auth, &table, id, version.as_ref())?;
    let done = state.store().commit(Txn::single(auth.0.name(), op)).await?;
    Ok(Out(
        json!({ "deleted": true, "row": row_json(&done.results[0].row) }),
    ))
}

/// One op of a batch; `None` if it is not a JSON object.
fn batch_op(state: &AppState, auth: Auth, op: Option<&OpBody<'_>>) -> ApiResult<Op> {
    let op =
        op.ok_or_else(|| ApiError::bad_request("invalid_body", "each op must be a JSON object"))?;
    let table = match &op.table {
        Some(Json::String(t)) => t.as_str(),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_body",
                "each op needs a \"table\"",
            ));
        }
    };
    let id = || match &op.id {
        Some(Json::String(id)) if !id.is_empty() => Ok(id.clone()),
        _ => Err(ApiError::bad_request(
            "invalid_body",
            "this op needs an \"id\" string",
        )),
    };
    match op.op.as_ref().and_then(Json::as_str) {
        Some("insert") => {
            let t = table_for(state, auth, table, Access::Insert)?;
            let row = op.row.map_or("null", |r| r.get());
            let input = body::row(t, RowKind::Insert, row.as_bytes(), "an insert's \"row\"")?;
            Ok(Op::Insert {
                table: t.name.clone(),
                id: input.id,
                fields: input.fields,
            })
        }
        Some("update") => {
            let id = id()?;
            let t = updatable(state, auth, table)?;
            let set = op.set.map(|set| body::set(t, set)).transpose()?;
            update_op(state, auth, t, id, op.version.as_ref(), set)
        }
        Some("delete") => delete_op(state, auth, table, id()?, op.version.as_ref()),
        _ => Err(ApiError::bad_request(
            "invalid_body",
            "\"op\" must be \"insert\", \"update\" or \"delete\"",
        )),
    }
}

pub(super) async fn batch(
    State(state): State<AppState>,
    auth: Auth,
    Segments((branch, module)): Segments<(String, String)>,
    RawBody(body): RawBody,
) -> ApiResult<Out<BatchOut>> {
    check_scope(&state, &branch, &module)?;
    let bodies = body::batch(&body)?;
    let mut ops = Vec::with_capacity(bodies.len());
    for (i, op) in bodies.iter().enumerate() {
        match batch_op(&state, auth, op.as_ref()) {
            Ok(op) => ops.push(op),
            // Nothing before the first op can fail first.
            Err(e) if i == 0 => return Err(e.with("op_index", json!(0))),
            // An op before this one may fail against the data (a stale version, an unknown
            // order): the store reports whichever fails first.
            Err(e) => {
                ops.push(Op::Refused(e.into_refusal()));
                break;
            }
        }
    }
    let done = state
        .store()
        .commit(Txn::new(auth.0.name(), ops))
        .await
        .map_err(|e| {
            let index = e.op_index;
            let err = ApiError::from(e);
            match index {
                Some(i) => err.with("op_index", json!(i)),
                None => err,
            }
        })?;
    Ok(Out(BatchOut {
        results: done.results.into_iter().map(|r| RowOut(r.row)).collect(),
        version: done.version.0,
    }))
}

/// A non-negative integer query parameter, bounded.
pub(super) fn number_param(
    params: &HashMap<String, String>,
    name: &str,
    default: u64,
    max: u64,
) -> ApiResult<u64> {
    match params.get(name) {
        None => Ok(default),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n <= max => Ok(n),
            _ => Err(ApiError::bad_request(
                "invalid_parameter",
                format!("?{name}= must be an integer from 0 to {max}"),
            )),
        },
    }
}

pub(super) async fn events(
    State(state): State<AppState>,
    Auth(role): Auth,
    Segments((branch, module)): Segments<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Out<Json>> {
    check_scope(&state, &branch, &module)?;
    let after = number_param(&params, "after", 0, i64::MAX as u64)?;
    let limit = number_param(&params, "limit", 100, LOG_PAGE_MAX as u64)?;
    if limit == 0 {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "?limit= must be at least 1",
        ));
    }
    let page = state
        .read(move |store| store.log_page(Seq(after), limit as usize))
        .await?;
    let schema = state.store().schema();
    let next = page.entries.last().map_or(after, |(_, e)| e.seq.0);
    // Entries of tables the role may not read are left out; `next` still moves past them.
    let readable = |table: &str| {
        schema
            .table(table)
            .is_some_and(|t| t.allows(role, Access::Read))
    };
    let events: Vec<Json> = page
        .entries
        .iter()
        .filter(|(_, e)| readable(&e.table))
        .map(|(version, e)| {
            json!({
                "seq": e.seq.0,
                "version": version.0,
                "table": e.table,
                "op": e.op.name(),
                "row": row_json(&e.row),
            })
        })
        .collect();
    Ok(Out(
        json!({ "events": events, "next": next, "has_more": page.has_more }),
    ))
}
