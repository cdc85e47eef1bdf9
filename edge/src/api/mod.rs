//! The terminal API (CONTRACT.md section 2): axum routes under
//! `/api/branches/{branch}/modules/{module}`, bearer-token auth with per-table role
//! permissions, JSON errors with stable codes, and the WebSocket live feed.

mod body;
mod error;
mod query;
mod rows;
mod ws;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::task::Poll;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::{get, post};
use bytes::Bytes;
use parking_lot::RwLock;
use shared::{BranchId, Role};

pub use error::{ApiError, ApiResult};

/// A JSON answer. Serialized into a `Vec` in one go: `axum::Json` writes through a
/// `BytesMut` writer, which costs a call per fragment (every key, quote and escape).
pub struct Out<T>(pub T);

impl<T: serde::Serialize> axum::response::IntoResponse for Out<T> {
    fn into_response(self) -> axum::response::Response {
        match serde_json::to_vec(&self.0) {
            Ok(body) => (
                [(
                    axum::http::header::CONTENT_TYPE,
                    axum::http::HeaderValue::from_static("application/json"),
                )],
                body,
            )
                .into_response(),
            Err(e) => {
                tracing::error!("an answer does not serialize: {e}");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the answer does not serialize",
                )
                    .into_response()
            }
        }
    }
}

use crate::feed::Feed;
use crate::store::{Store, StoreError};

/// Largest request body accepted, in bytes.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<AppInner>,
}

struct AppInner {
    store: Store,
    branch: BranchId,
    feed: Feed,
    routes: RouteMetrics,
    /// blake3(token) -> role, filled on first use; tokens are never revoked at the edge yet.
    tokens: RwLock<HashMap<[u8; 32], Role>>,
}

impl AppState {
    /// Builds the state and starts the live feed (on the current tokio runtime).
    pub fn new(store: Store, branch: BranchId) -> AppState {
        AppState {
            inner: Arc::new(AppInner {
                feed: Feed::start(store.clone()),
                routes: RouteMetrics::default(),
                store,
                branch,
                tokens: RwLock::new(HashMap::new()),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Runs a read of the store on the blocking pool: reads may wait for a pooled SQLite
    /// connection or at the durability barrier, which must not hold up a thread serving
    /// requests.
    pub async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> ApiResult<T> {
        let store = self.store().clone();
        Ok(crate::store::blocking(move || read(&store)).await?)
    }

    pub fn branch(&self) -> &BranchId {
        &self.inner.branch
    }

    pub fn feed(&self) -> &Feed {
        &self.inner.feed
    }

    pub fn routes(&self) -> &RouteMetrics {
        &self.inner.routes
    }

    /// The role of a bearer token. The database is asked once per token; afterwards the
    /// answer comes from memory.
    async fn role_of(&self, token: &str) -> ApiResult<Option<Role>> {
        let key = *blake3::hash(token.as_bytes()).as_bytes();
        if let Some(role) = self.inner.tokens.read().get(&key) {
            return Ok(Some(*role));
        }
        // A token not seen yet (or not known at all) is looked up in SQLite: off the threads
        // serving requests, as the read may wait for a pooled connection.
        let owned = token.to_owned();
        let role = self.read(move |store| store.token_role(&owned)).await?;
        if let Some(role) = role {
            self.inner.tokens.write().insert(key, role);
        }
        Ok(role)
    }
}

/// The caller's role, from `Authorization: Bearer TOKEN` (or `?token=` for WebSockets).
#[derive(Debug, Clone, Copy)]
pub struct Auth(pub Role);

impl Auth {
    pub async fn from_token(state: &AppState, token: Option<&str>) -> ApiResult<Auth> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(ApiError::unauthorized(
                "send a bearer token: Authorization: Bearer TOKEN",
            ));
        };
        match state.role_of(token).await? {
            Some(role) => Ok(Auth(role)),
            None => Err(ApiError::unauthorized("the bearer token is not known here")),
        }
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Auth> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let token = header.and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
                .map(str::trim)
        });
        Auth::from_token(state, token).await
    }
}

/// The path's parameters. A path axum cannot decode (a segment that is not UTF-8 once
/// percent-decoded) is a JSON API error like any other, not axum's plain-text answer.
pub struct Segments<T>(pub T);

impl<T, S> FromRequestParts<S> for Segments<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Segments<T>> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(t)| Segments(t))
            .map_err(|e| {
                ApiError::bad_request(
                    "invalid_path",
                    format!("the path cannot be read: {}", e.body_text()),
                )
            })
    }
}

/// A request body's bytes, at most [`BODY_BYTES_MAX`]; errors are API errors. Write routes
/// read rows straight from them (`body`); others parse a [`JsonBody`].
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> ApiResult<RawBody> {
        // A body that has come whole with its head (a terminal's usual request) is read
        // without arming a timer; one still arriving must come within the body timeout, so a
        // client that stalls mid-body does not hold its connection and task for ever.
        let mut read = std::pin::pin!(Bytes::from_request(req, state));
        let read = match std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await {
            Poll::Ready(read) => read,
            Poll::Pending => {
                let timeout = crate::http::body_timeout();
                tokio::time::timeout(timeout, read).await.map_err(|_| {
                    ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "body_timeout",
                        format!(
                            "the request body did not arrive within {} s",
                            timeout.as_secs_f64()
                        ),
                    )
                })?
            }
        };
        read.map(RawBody).map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "the request body is larger than 1 MiB",
                )
            } else {
                ApiError::bad_request(
                    "invalid_body",
                    format!("the request body cannot be read: {e}"),
                )
            }
        })
    }
}

/// A JSON request body parsed into a document.
pub struct JsonBody(pub serde_json::Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> ApiResult<JsonBody> {
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(body::not_json)
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "there is no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

/// Upper bounds of the request latency histogram, in microseconds.
pub const REQUEST_US_BUCKETS: [u64; 10] = [
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    100_000,
    1_000_000,
    u64::MAX,
];

/// A latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    pub buckets: [AtomicU64; 10],
    pub sum_us: AtomicU64,
}

impl Histogram {
    fn record(&self, us: u64) {
        let i = REQUEST_US_BUCKETS
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(9);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }
}

/// Request latency by route (the matched path template) and method.
#[derive(Debug, Default)]
pub struct RouteMetrics {
    /// `(method, route, histogram)`: a dozen entries at most, found by a scan that, unlike a
    /// map keyed by owned strings, allocates nothing per request.
    routes: RwLock<Vec<(String, String, Arc<Histogram>)>>,
}

impl RouteMetrics {
    fn histogram(&self, method: &str, route: &str) -> Arc<Histogram> {
        let find = |routes: &[(String, String, Arc<Histogram>)]| {
            routes
                .iter()
                .find(|(m, r, _)| m == method && r == route)
                .map(|(_, _, h)| h.clone())
        };
        if let Some(h) = find(&self.routes.read()) {
            return h;
        }
        let mut routes = self.routes.write();
        if let Some(h) = find(&routes) {
            return h;
        }
        let h = Arc::new(Histogram::default());
        routes.push((method.to_owned(), route.to_owned(), h.clone()));
        h
    }

    /// `((method, route), histogram)`, sorted.
    pub fn all(&self) -> Vec<((String, String), Arc<Histogram>)> {
        let mut v: Vec<_> = self
            .routes
            .read()
            .iter()
            .map(|(m, r, h)| ((m.clone(), r.clone()), h.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Records each request's latency under its route template (unmatched requests are not
/// recorded, so random paths cannot grow the table).
async fn time_requests(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let method = req.method().clone();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    if let Some(route) = route {
        let us = started.elapsed().as_micros() as u64;
        state
            .routes()
            .histogram(method.as_str(), route.as_str())
            .record(us);
    }
    resp
}

/// The terminal API's routes (health and metrics are added by the server).
pub fn router(state: AppState) -> Router {
    const B: &str = "/api/branches/{branch}/modules/{module}";
    Router::new()
        .route(B, get(rows::snapshot))
        .route(&format!("{B}/schema"), get(rows::schema))
        .route(&format!("{B}/tables/{{table}}"), post(rows::insert))
        .route(
            &format!("{B}/tables/{{table}}/{{id}}"),
            get(rows::get_row).patch(rows::update).delete(rows::delete),
        )
        .route(&format!("{B}/batch"), post(rows::batch))
        .route(&format!("{B}/query"), post(query::query))
        .route(&format!("{B}/events"), get(rows::events))
        .route("/ws", get(ws::upgrade))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            time_requests,
        ))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}
