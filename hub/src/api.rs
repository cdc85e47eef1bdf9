//! The head-office HTTP API (CONTRACT.md section 3): health, metrics, branches and their sync
//! state, queries across branches, head-office rows pushed down to the edges, and edge
//! software releases (publish, promote, rollout rings, update outcomes).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Value as Json, json};
use shared::metrics::Exposition;
use shared::release::{ARTIFACT_BYTES_MAX, UpdateReport, this_target};
use shared::{BranchId, Timestamp};

use crate::releases::{Release, Ring, UploadError, check_target, check_version};
use crate::store::{HubStore, HubStoreError, now_micros};
use crate::sync::SyncServer;

/// Largest request body.
pub const BODY_BYTES_MAX: usize = 1 << 20;

#[derive(Clone)]
pub struct Hub {
    pub store: Arc<dyn HubStore>,
    pub sync: Arc<SyncServer>,
    /// blake3 of the admin token.
    pub admin_token_hash: [u8; 32],
    /// The HTTP server's connection counts, for `/metrics`.
    pub connections: Arc<httpd::ConnMetrics>,
}

/// An error response: `{"error": code, "message": sentence}`.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response()
    }
}

impl From<HubStoreError> for ApiError {
    fn from(e: HubStoreError) -> Self {
        let (status, code) = match &e {
            HubStoreError::UnknownBranch(_) => (StatusCode::NOT_FOUND, "unknown_branch"),
            HubStoreError::UnknownTable(_) => (StatusCode::NOT_FOUND, "unknown_table"),
            HubStoreError::NotHubOwned(_) => (StatusCode::FORBIDDEN, "not_hub_owned"),
            HubStoreError::SharedScoped(_) => (StatusCode::BAD_REQUEST, "shared_scoped"),
            HubStoreError::Field(f) => (StatusCode::BAD_REQUEST, f.code()),
            HubStoreError::ReleaseExists(_) => (StatusCode::CONFLICT, "release_exists"),
            HubStoreError::UnknownRelease(_) => (StatusCode::NOT_FOUND, "unknown_release"),
            HubStoreError::RingMismatch(..) => (StatusCode::CONFLICT, "ring_mismatch"),
            HubStoreError::NotNext { .. } | HubStoreError::Storage(_) => {
                tracing::error!("storage: {e}");
                (StatusCode::INTERNAL_SERVER_ERROR, "storage")
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

fn blocking_failed(e: tokio::task::JoinError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("a storage task failed: {e}"),
    )
}

/// A JSON body whose rejections become our error shape.
pub struct JsonBody(pub Json);

impl<S: Send + Sync> axum::extract::FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<Json>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(JsonBody(v)),
            Err(JsonRejection::BytesRejection(e))
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "the request body is larger than 1 MiB",
                ))
            }
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            )),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("the body is not valid JSON: {}", e.body_text()),
            )),
        }
    }
}

async fn auth(State(hub): State<Hub>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token {
        Some(t)
            if blake3::hash(t.trim().as_bytes()) == blake3::Hash::from(hub.admin_token_hash) =>
        {
            next.run(req).await
        }
        Some(_) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token").into_response()
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer TOKEN",
        )
        .into_response(),
    }
}

pub fn router(hub: Hub) -> Router {
    let api = Router::new()
        .route("/api/branches", get(branches))
        .route("/api/query", post(query))
        .route("/api/conflicts", get(conflicts))
        .route("/api/modules/{module}/tables/{table}/{id}", put(put_row))
        .route(
            "/api/releases",
            get(list_releases)
                .post(publish_release)
                // The artifact streams to disk; the handler counts it against its own limit.
                .layer(DefaultBodyLimit::max(ARTIFACT_BYTES_MAX as usize)),
        )
        .route("/api/releases/{version}/promote", post(promote_release))
        .route("/api/branches/{id}/ring", put(set_ring))
        .route_layer(middleware::from_fn_with_state(hub.clone(), auth));
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(hub)
}

/// The head-office dashboard: one page, no build step, no CDN; it reads the API with the
/// token given in the address's fragment (`/#token=...`).
async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("dashboard.html"),
    )
}

async fn healthz(State(hub): State<Hub>) -> Result<axum::Json<Json>, ApiError> {
    let store = hub.store.clone();
    let branches = tokio::task::spawn_blocking(move || store.branches())
        .await
        .map_err(blocking_failed)??;
    Ok(axum::Json(json!({
        "status": "ok",
        "role": "hub",
        "version": env!("CARGO_PKG_VERSION"),
        "branches": branches.len(),
        "connected": hub.sync.connected_count(),
    })))
}

async fn branches(State(hub): State<Hub>) -> Result<axum::Json<Json>, ApiError> {
    let store = hub.store.clone();
    let branches = tokio::task::spawn_blocking(move || store.branches())
        .await
        .map_err(blocking_failed)??;
    let now = crate::store::now_micros();
    let out: Vec<Json> = branches
        .into_iter()
        .map(|b| {
            let report = hub.sync.report(&b.branch);
            let oldest = report.and_then(|r| r.oldest_unsynced_payment);
            json!({
                "branch": b.branch.as_str(),
                "connected": hub.sync.is_connected(&b.branch),
                "last_seen": b.last_seen.map(|t| t.to_rfc3339()),
                "synced_seq": b.synced_seq.0,
                "materialised_seq": b.materialised_seq.0,
                "chain_head": b.chain_head.to_hex(),
                "edge_version": b.edge_version,
                "edge_target": b.edge_target,
                "unsynced_estimate": b.edge_head_seq.0.saturating_sub(b.synced_seq.0),
                // As the edge last reported it (it ages while the edge is unreachable).
                "unsynced_reported": report.map(|r| r.unsynced),
                "reported_at": report.map(|r| r.reported_at.to_rfc3339()),
                "oldest_unsynced_payment": oldest.map(|t| t.to_rfc3339()),
                "oldest_unsynced_payment_age_s": oldest.map(|t| (now - t.0).max(0) as f64 / 1e6),
                "revoked": b.revoked,
                "ring": b.ring,
                "feed_seq": b.feed_seq.0,
                "feed_acked_seq": b.feed_acked_seq.0,
            })
        })
        .collect();
    Ok(axum::Json(Json::Array(out)))
}

async fn conflicts(State(hub): State<Hub>) -> Result<axum::Json<Json>, ApiError> {
    let store = hub.store.clone();
    let list = tokio::task::spawn_blocking(move || store.conflicts(100))
        .await
        .map_err(blocking_failed)??;
    Ok(axum::Json(Json::Array(
        list.into_iter()
            .map(|c| {
                json!({
                    "table": c.table,
                    "id": c.row_id,
                    "at": c.at.to_rfc3339(),
                    "origin": c.origin,
                    "versions": c.versions,
                    "winner": c.winner,
                })
            })
            .collect(),
    )))
}

async fn query(
    State(hub): State<Hub>,
    JsonBody(body): JsonBody,
) -> Result<axum::Json<Json>, ApiError> {
    let store = hub.store.clone();
    tokio::task::spawn_blocking(move || store.query(&body))
        .await
        .map_err(blocking_failed)?
        .map(axum::Json)
        .map_err(|e| {
            ApiError::new(
                StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
                e.code,
                e.message,
            )
        })
}

#[derive(serde::Deserialize)]
struct PutParams {
    branch: Option<String>,
}

async fn put_row(
    State(hub): State<Hub>,
    Path((module, table, id)): Path<(String, String, String)>,
    Query(params): Query<PutParams>,
    JsonBody(body): JsonBody,
) -> Result<axum::Json<Json>, ApiError> {
    let schema = hub.store.schema().clone();
    if module != schema.module() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_module",
            format!(
                "there is no module {module:?}; this hub serves {:?}",
                schema.module()
            ),
        ));
    }
    let t = schema.table(&table).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_table",
            format!("there is no table {table:?} in module {module}"),
        )
    })?;
    if id.is_empty() || id.len() > shared::ids::ID_BYTES_MAX {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_value",
            "the id must be 1 to 128 bytes",
        ));
    }
    let scope = params
        .branch
        .map(|b| {
            BranchId::parse(&b).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_branch", e.to_string())
            })
        })
        .transpose()?;
    let Json::Object(obj) = body else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the body must be a JSON object of columns",
        ));
    };
    if let Some(Json::String(body_id)) = obj.get("id")
        && *body_id != id
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "id_mismatch",
            "the body's id differs from the id in the path",
        ));
    }
    let input = shared::json::insert_from_json(t, &obj)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))?;
    let store = hub.store.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        store.put_hub_row(
            &table,
            &id,
            input.fields,
            scope.as_ref(),
            shared::Timestamp(now_micros()),
        )
    })
    .await
    .map_err(blocking_failed)??;
    hub.sync.feeds_grew(&outcome.branches);
    let branches: Vec<&str> = outcome.branches.iter().map(BranchId::as_str).collect();
    Ok(axum::Json(json!({
        "row": shared::json::row_to_json(&outcome.row),
        "branches": branches,
    })))
}

/// A release as the API shows it.
fn release_json(r: &Release) -> Json {
    json!({
        "version": r.version,
        "target": r.target,
        "size": r.size,
        "hash": hex::encode(r.hash),
        "signature": hex::encode(r.signature),
        "ring": r.ring.as_str(),
        "published_at": r.published_at.to_rfc3339(),
    })
}

/// An update outcome as the API shows it.
fn outcome_json(r: &UpdateReport) -> Json {
    json!({
        "version": r.version,
        "from": r.from,
        "outcome": r.outcome.as_str(),
        "detail": r.detail,
        "at": Timestamp(r.at).to_rfc3339(),
    })
}

fn invalid_ring() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_ring",
        "the ring is \"canary\" or \"all\"",
    )
}

#[derive(serde::Deserialize)]
struct PublishParams {
    version: Option<String>,
    ring: Option<String>,
    target: Option<String>,
}

/// `POST /api/releases?version=SEMVER&ring=canary|all[&target=T]`, the artifact as the raw
/// body: streamed to disk while hashed, made durable, signed, then recorded; live sessions
/// are told. Any failure leaves nothing behind.
async fn publish_release(
    State(hub): State<Hub>,
    params: Result<Query<PublishParams>, QueryRejection>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, axum::Json<Json>), ApiError> {
    let Query(params) = params.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("the query string is malformed: {}", e.body_text()),
        )
    })?;
    let version = params.version.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_version",
            "give the release's version: ?version=1.2.3",
        )
    })?;
    check_version(&version)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_version", e))?;
    let ring = params
        .ring
        .as_deref()
        .and_then(Ring::parse)
        .ok_or_else(invalid_ring)?;
    let target = params.target.unwrap_or_else(this_target);
    check_target(&target)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_target", e))?;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "artifact_too_large",
            format!("a release artifact is at most {ARTIFACT_BYTES_MAX} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > ARTIFACT_BYTES_MAX) {
        return Err(too_large());
    }
    let Some(files) = hub.sync.releases().cloned() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "releases_unavailable",
            "this hub was started without a place for release artifacts",
        ));
    };
    let exists = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "release_exists",
            format!(
                "release {version} for {target} was published before; a published release never changes"
            ),
        )
    };
    let storage = |e: std::io::Error| {
        tracing::error!("storing a release artifact: {e}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage",
            format!("storing the artifact failed: {e}"),
        )
    };
    // Held until the release is recorded: no other upload of this version for this target meanwhile.
    let mut upload = files
        .begin(&version, &target)
        .await
        .map_err(storage)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "release_exists",
                format!("release {version} for {target} is being published right now"),
            )
        })?;
    // Checked before the upload (and again when recorded): a refused publish stores nothing.
    let (store, v) = (hub.store.clone(), version.clone());
    let same_version = tokio::task::spawn_blocking(move || store.version_releases(&v))
        .await
        .map_err(blocking_failed)??;
    if same_version.iter().any(|r| r.target == target) {
        return Err(exists());
    }
    if let Some(other) = same_version.first()
        && other.ring != ring
    {
        return Err(HubStoreError::RingMismatch(version, other.ring.as_str()).into());
    }
    let upload_failed = |e: UploadError| match e {
        UploadError::TooLarge(_) => too_large(),
        UploadError::Empty => ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty_artifact",
            "the body (the release artifact) is empty",
        ),
        UploadError::Io(e) => storage(e),
    };
    let mut body = body;
    while let Some(frame) = std::future::poll_fn(|cx| {
        axum::body::HttpBody::poll_frame(std::pin::Pin::new(&mut body), cx)
    })
    .await
    {
        let frame = frame.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "incomplete_body",
                format!("the artifact did not arrive whole: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            upload.write(&data).await.map_err(upload_failed)?;
        }
    }
    let (size, hash) = upload.commit().await.map_err(upload_failed)?;
    let release = Release {
        signature: files.sign(&version, &target, size, &hash),
        version,
        target,
        size,
        hash,
        ring,
        published_at: Timestamp(now_micros()),
    };
    let store = hub.store.clone();
    let r = release.clone();
    tokio::task::spawn_blocking(move || store.add_release(&r))
        .await
        .map_err(blocking_failed)??;
    drop(upload);
    tracing::info!(version = %release.version, target = %release.target, size, ring = release.ring.as_str(), "release published");
    hub.sync.releases_changed();
    Ok((StatusCode::CREATED, axum::Json(release_json(&release))))
}

/// `POST /api/releases/{version}/promote`: the version, for every target it was published
/// for, goes to ring `all`.
async fn promote_release(
    State(hub): State<Hub>,
    Path(version): Path<String>,
) -> Result<axum::Json<Json>, ApiError> {
    let store = hub.store.clone();
    let v = version.clone();
    let releases = tokio::task::spawn_blocking(move || store.promote_release(&v))
        .await
        .map_err(blocking_failed)??;
    tracing::info!(%version, targets = releases.len(), "release promoted to every branch");
    hub.sync.releases_changed();
    Ok(axum::Json(json!({
        "version": version,
        "ring": Ring::All.as_str(),
        "targets": releases.iter().map(release_json).collect::<Vec<_>>(),
    })))
}

/// `GET /api/releases`: every release, newest first, and every branch's ring, running
/// version and update outcomes.
async fn list_releases(State(hub): State<Hub>) -> Result<axum::Json<Json>, ApiError> {
    let store = hub.store.clone();
    let (releases, branches, outcomes) = tokio::task::spawn_blocking(move || {
        Ok::<_, HubStoreError>((
            store.releases()?,
            store.branches()?,
            store.update_outcomes()?,
        ))
    })
    .await
    .map_err(blocking_failed)??;
    let mut by_branch: std::collections::HashMap<BranchId, Vec<Json>> =
        std::collections::HashMap::new();
    for o in &outcomes {
        by_branch
            .entry(o.branch.clone())
            .or_default()
            .push(outcome_json(&o.report));
    }
    let branches: Vec<Json> = branches
        .into_iter()
        .map(|b| {
            let outcomes = by_branch.remove(&b.branch).unwrap_or_default();
            json!({
                "branch": b.branch.as_str(),
                "ring": b.ring,
                "installed": b.edge_version,
                "target": b.edge_target,
                "connected": hub.sync.is_connected(&b.branch),
                "last_outcome": outcomes.first().cloned(),
                "outcomes": outcomes,
            })
        })
        .collect();
    Ok(axum::Json(json!({
        "releases": releases.iter().map(release_json).collect::<Vec<_>>(),
        "branches": branches,
    })))
}

/// `PUT /api/branches/{id}/ring` with `{"ring": "canary" | "all"}`.
async fn set_ring(
    State(hub): State<Hub>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<axum::Json<Json>, ApiError> {
    let ring = body
        .get("ring")
        .and_then(Json::as_str)
        .and_then(Ring::parse)
        .ok_or_else(invalid_ring)?;
    let branch = BranchId::parse(&id).map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_branch",
            format!("there is no branch {id:?}"),
        )
    })?;
    let store = hub.store.clone();
    let b = branch.clone();
    tokio::task::spawn_blocking(move || store.set_ring(&b, ring))
        .await
        .map_err(blocking_failed)??;
    tracing::info!(%branch, ring = ring.as_str(), "branch ring set");
    hub.sync.releases_changed();
    Ok(axum::Json(
        json!({"branch": branch.as_str(), "ring": ring.as_str()}),
    ))
}

async fn metrics(State(hub): State<Hub>) -> impl IntoResponse {
    let m = &hub.sync.metrics;
    let mut out = Exposition::default();
    hub.connections.render(&mut out);
    out.gauge(
        "outpost_hub_connected_edges",
        "Edges with a live sync session.",
        hub.sync.connected_count() as u64,
    );
    for (name, help, v) in [
        (
            "outpost_hub_connections_total",
            "Sync sessions started.",
            &m.connections,
        ),
        (
            "outpost_hub_refused_connections_total",
            "Connections refused (not enrolled, revoked, superseded certificate, no identity).",
            &m.refused_connections,
        ),
        (
            "outpost_hub_segments_persisted_total",
            "Branch log segments stored.",
            &m.segments_persisted,
        ),
        (
            "outpost_hub_entries_persisted_total",
            "Branch log entries stored.",
            &m.entries_persisted,
        ),
        (
            "outpost_hub_bytes_received_total",
            "Segment body bytes received.",
            &m.bytes_received,
        ),
        (
            "outpost_hub_segments_refused_total",
            "Segments refused (corrupt, out of order, foreign origin).",
            &m.segments_refused,
        ),
        (
            "outpost_hub_divergences_total",
            "Sessions stopped because histories differ.",
            &m.divergences,
        ),
        (
            "outpost_hub_feed_segments_sent_total",
            "Feed segments sent to edges.",
            &m.feed_segments_sent,
        ),
        (
            "outpost_hub_release_fetches_total",
            "Release downloads answered with the artifact.",
            &m.release_fetches,
        ),
        (
            "outpost_hub_release_fetches_resumed_total",
            "Release downloads resumed from an offset past 0.",
            &m.release_fetches_resumed,
        ),
        (
            "outpost_hub_release_bytes_served_total",
            "Release artifact bytes sent to edges.",
            &m.release_bytes_served,
        ),
        (
            "outpost_hub_update_reports_total",
            "Update reports received from edges.",
            &m.update_reports,
        ),
    ] {
        out.counter(name, help, v.load(Relaxed));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out.0)
}
