//! `GET /ws?token=TOKEN`: a terminal's live feed connection. JSON text frames by default,
//! postcard binary frames with the `outpost.v1.postcard` subprotocol. One task per connection
//! sends queued frames (coalescing bursts into one flush), reads the client's subscribe and
//! unsubscribe messages, keeps the connection alive with pings and reaps it when it goes quiet.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value as Json;
use shared::Role;
use shared::feed::{ClientMsg, POSTCARD_PROTOCOL};
use shared::schema::Access;

use super::query::parse_where;
use super::{ApiError, AppState, Auth};
use crate::feed::{Feed, Format, Frame, Sub, error_frame};

/// How often the server pings an idle connection.
pub const PING_INTERVAL: Duration = Duration::from_secs(15);
/// A connection silent for this long (no message, no pong) is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(45);
/// Most subscriptions on one connection.
pub const SUBSCRIPTIONS_MAX: usize = 64;
/// Read buffer per connection, in bytes.
const READ_BUFFER_BYTES: usize = 4096;
/// Largest message (and frame) a terminal may send: subscribe and unsubscribe messages are a
/// few hundred bytes. A larger one closes the connection (code 1009, message too big) instead
/// of being buffered: tungstenite's defaults would hold up to 64 MiB per connection.
pub const CLIENT_MESSAGE_BYTES_MAX: usize = 64 * 1024;
/// Frames sent before one flush when a burst is queued.
const FLUSH_FRAMES_MAX: usize = 64;

const _: () = assert!(PING_INTERVAL.as_secs() * 2 < IDLE_TIMEOUT.as_secs());

pub(super) async fn upgrade(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Auth(role) = match Auth::from_token(&state, params.get("token").map(String::as_str)).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::bad_request(
                "websocket_required",
                format!("/ws is a WebSocket endpoint: {e}"),
            )
            .into_response();
        }
    };
    let feed = state.feed().clone();
    // Terminals send only small control messages; a small read buffer keeps each read from
    // clearing the default 128 KiB.
    ws.protocols([POSTCARD_PROTOCOL])
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(CLIENT_MESSAGE_BYTES_MAX)
        .max_frame_size(CLIENT_MESSAGE_BYTES_MAX)
        .on_upgrade(move |socket| connection(socket, feed, role))
}

fn to_message(frame: Frame) -> Message {
    match frame {
        Frame::Text(s) => Message::Text(Utf8Bytes::from(s)),
        Frame::Binary(b) => Message::Binary(b),
    }
}

/// How long one burst of frames may take to reach a terminal's socket before the connection
/// is given up: a terminal that stops reading (a frozen tablet whose TCP receive window has
/// shut) would otherwise hold its task, its queue and its socket buffers until the kernel
/// gives up on it, some 15 minutes later. The same as [`IDLE_TIMEOUT`];
/// `OUTPOST_WS_SEND_TIMEOUT_MS` overrides it (a test hook).
fn send_timeout() -> Duration {
    std::env::var("OUTPOST_WS_SEND_TIMEOUT_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(IDLE_TIMEOUT, Duration::from_millis)
}

/// Writes `frames` and flushes them within `timeout`; false when the terminal is gone or
/// does not take them in time.
async fn send(
    socket: &mut WebSocket,
    frames: impl Iterator<Item = Frame>,
    timeout: Duration,
) -> bool {
    let write = async {
        for f in frames {
            socket.feed(to_message(f)).await?;
        }
        socket.flush().await
    };
    let mut write = std::pin::pin!(write);
    // Nearly always the socket takes the burst at once: a timer only when it does not (one
    // per burst would cost the runtime worker a timer-wheel entry per frame delivered).
    let first = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::future::Future::poll(write.as_mut(), cx))
    })
    .await;
    match first {
        std::task::Poll::Ready(done) => done.is_ok(),
        std::task::Poll::Pending => {
            matches!(tokio::time::timeout(timeout, write).await, Ok(Ok(())))
        }
    }
}

async fn connection(mut socket: WebSocket, feed: Feed, role: Role) {
    let format = match socket.protocol() {
        Some(p) if p.as_bytes() == POSTCARD_PROTOCOL.as_bytes() => Format::Postcard,
        _ => Format::Json,
    };
    let timeout = send_timeout();
    let mut reg = feed.register(format);
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await; // the first tick is immediate
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            frame = reg.rx.recv() => {
                let Some(frame) = frame else { break };
                let lagging = reg.lagging.load(std::sync::atomic::Ordering::Relaxed);
                let sent = if lagging {
                    let frames = feed.resync(reg.id, &mut reg.rx);
                    send(&mut socket, frames.into_iter(), timeout).await
                } else {
                    // Coalesce a burst: what is waiting goes out with one flush.
                    let rx = &mut reg.rx;
                    let burst = std::iter::once(frame)
                        .chain(std::iter::from_fn(|| rx.try_recv().ok()).take(FLUSH_FRAMES_MAX));
                    send(&mut socket, burst, timeout).await
                };
                if !sent { break; }
            }
            () = reg.wake.notified() => {
                if reg.lagging.load(std::sync::atomic::Ordering::Relaxed) {
                    let frames = feed.resync(reg.id, &mut reg.rx);
                    if !send(&mut socket, frames.into_iter(), timeout).await { break; }
                }
            }
            msg = socket.next() => {
                let Some(Ok(msg)) = msg else { break };
                last_heard = Instant::now();
                match msg {
                    Message::Text(t) => {
                        handle(&feed, reg.id, role, format, parse_json(t.as_str())).await
                    }
                    Message::Binary(b) => {
                        handle(&feed, reg.id, role, format, parse_postcard(&b)).await
                    }
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > IDLE_TIMEOUT {
                    tracing::debug!(conn = reg.id, "closing a silent terminal connection");
                    break;
                }
                let pinged = tokio::time::timeout(timeout, socket.send(Message::Ping(bytes::Bytes::new())));
                if !matches!(pinged.await, Ok(Ok(()))) { break; }
            }
        }
    }
    feed.unregister(reg.id);
    // A terminal that does not read does not get to hold the task either.
    let _ = tokio::time::timeout(timeout, socket.close()).await;
}

/// A client message, or why it is not one: `(sub, code, message)`.
type Parsed = Result<ClientMsg, (Option<String>, &'static str, String)>;

fn parse_json(text: &str) -> Parsed {
    let v: Json = serde_json::from_str(text).map_err(|e| {
        (
            None,
            "invalid_json",
            format!("the frame is not valid JSON: {e}"),
        )
    })?;
    let sub = v.get("sub").and_then(Json::as_str).map(str::to_owned);
    let fail = |code, message: &str| (sub.clone(), code, message.to_owned());
    let sub_name = sub
        .clone()
        .ok_or_else(|| fail("invalid_frame", "every message names its \"sub\""))?;
    match v.get("type").and_then(Json::as_str) {
        Some("subscribe") => {
            let tables = v
                .get("tables")
                .and_then(Json::as_array)
                .map(|ts| {
                    ts.iter()
                        .map(|t| t.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>()
                })
                .unwrap_or(None)
                .ok_or_else(|| fail("invalid_frame", "\"tables\" is a list of table names"))?;
            let since = match v.get("since") {
                None | Some(Json::Null) => None,
                Some(s) => Some(s.as_u64().ok_or_else(|| {
                    fail(
                        "invalid_value",
                        "\"since\" is a version: a non-negative integer",
                    )
                })?),
            };
            Ok(ClientMsg::Subscribe {
                sub: sub_name,
                module: v
                    .get("module")
                    .and_then(Json::as_str)
                    .unwrap_or("pos")
                    .to_owned(),
                tables,
                filter: v.get("where").filter(|w| !w.is_null()).map(Json::to_string),
                since,
            })
        }
        Some("unsubscribe") => Ok(ClientMsg::Unsubscribe { sub: sub_name }),
        _ => Err(fail(
            "invalid_frame",
            "\"type\" is \"subscribe\" or \"unsubscribe\"",
        )),
    }
}

fn parse_postcard(bytes: &[u8]) -> Parsed {
    postcard::from_bytes(bytes).map_err(|e| {
        (
            None,
            "invalid_frame",
            format!("the frame is not a postcard client message: {e}"),
        )
    })
}

async fn handle(feed: &Feed, conn: u64, role: Role, format: Format, msg: Parsed) {
    let reply_error = |sub: Option<&str>, code: &str, message: &str| {
        feed.push(conn, error_frame(format, sub, code, message));
    };
    match msg {
        Err((sub, code, message)) => reply_error(sub.as_deref(), code, &message),
        Ok(ClientMsg::Unsubscribe { sub }) => feed.unsubscribe(conn, &sub),
        Ok(ClientMsg::Subscribe {
            sub,
            module,
            tables,
            filter,
            since,
        }) => match check_subscription(feed, role, &sub, &module, &tables, filter.as_deref()) {
            Err(e) => reply_error(Some(&sub), e.code, &e.message),
            Ok(s) => {
                if feed.subscriptions(conn) >= SUBSCRIPTIONS_MAX {
                    reply_error(
                        Some(&sub),
                        "too_many_subscriptions",
                        "a connection holds at most 64 subscriptions",
                    );
                } else {
                    // The first frame is read from the store (a snapshot, or the log for a
                    // catch-up) and waits for durability: not on a thread serving requests.
                    let (f, name) = (feed.clone(), sub.clone());
                    let done =
                        crate::store::blocking(move || f.subscribe(conn, name, s, since)).await;
                    if let Err(e) = done {
                        let e = ApiError::from(e);
                        reply_error(Some(&sub), e.code, &e.message);
                    }
                }
            }
        },
    }
}

/// Checks a subscription against the schema and the role.
fn check_subscription(
    feed: &Feed,
    role: Role,
    sub: &str,
    module: &str,
    tables: &[String],
    filter: Option<&str>,
) -> Result<Sub, ApiError> {
    let schema = feed.store().schema();
    if sub.is_empty() || sub.len() > 64 {
        return Err(ApiError::bad_request(
            "invalid_frame",
            "\"sub\" is a name of 1 to 64 bytes",
        ));
    }
    if module != schema.module() {
        return Err(ApiError::not_found(
            "unknown_module",
            format!("this edge serves module {:?}", schema.module()),
        ));
    }
    if tables.is_empty() || tables.len() > schema.tables().len() {
        return Err(ApiError::bad_request(
            "invalid_frame",
            format!(
                "subscribe to 1 to {} tables, each named once",
                schema.tables().len()
            ),
        ));
    }
    let filter: Option<Json> = match filter {
        None => None,
        Some(text) => Some(serde_json::from_str(text).map_err(|e| {
            ApiError::bad_request("invalid_value", format!("\"where\" is not valid JSON: {e}"))
        })?),
    };
    let mut indexes = Vec::with_capacity(tables.len());
    let mut filters = Vec::new();
    for name in tables {
        let ti = schema.table_index(name).ok_or_else(|| {
            ApiError::not_found(
                "unknown_table",
                format!(
                    "there is no table {:?}",
                    name.chars().take(64).collect::<String>()
                ),
            )
        })?;
        if !schema.tables()[ti].allows(role, Access::Read) {
            return Err(ApiError::forbidden(format!(
                "role {role} may not read {name}"
            )));
        }
        if indexes.contains(&ti) {
            continue;
        }
        // The filter must make sense for every table of the subscription.
        let f = parse_where(schema, ti, filter.as_ref())?;
        if filters.is_empty() {
            filters = f;
        }
        indexes.push(ti);
    }
    Ok(Sub {
        tables: indexes,
        filter: filters,
        version: 0,
    })
}
