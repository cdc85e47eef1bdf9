//! End-to-end tests of the edge's terminal live feed (CONTRACT.md 2.3) against the real
//! `outpost-edge` binary: writes go over real HTTP, the feed is read with a real WebSocket
//! client. Snapshot then gap-free deltas under concurrent writers, resume with `since` (also
//! across a kill -9), a stalled client resynced while another keeps receiving, JSON and
//! postcard clients seeing the same content, and a kitchen screen's filtered subscription.
//!
//! Nothing waits on a timer: the tests wait on frames, on HTTP responses and on versions
//! announced by write responses. The deadlines below are safety nets against a hung edge
//! turning into a hung test, never timing assertions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::{Client, Method};
use serde_json::{Map, Value as Json, json};
use shared::feed::{ClientMsg, FeedOp, FeedRow, POSTCARD_PROTOCOL, ServerMsg};
use shared::json::value_to_json;
use tests::{EdgeProcess, Reply, int, text, uint};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Safety net for one HTTP request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Safety net for one expected WebSocket frame.
const FRAME_DEADLINE: Duration = Duration::from_secs(60);

/// The hot tables of an order and the status logs the edge writes next to them.
const ORDER_TABLES: [&str; 5] = [
    "order_header",
    "order_line",
    "order_payment",
    "order_status_log",
    "order_line_status_log",
];

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// A terminal: an HTTP client with one role's token, talking to one edge run.
#[derive(Clone)]
struct Terminal {
    http: Client,
    base: String,
    module: String,
    token: String,
}

impl Terminal {
    fn new(edge: &EdgeProcess, token: &str) -> Terminal {
        Terminal {
            http: Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .build()
                .expect("an HTTP client"),
            base: edge.base_url(),
            module: edge.module_url(),
            token: token.to_owned(),
        }
    }

    async fn call(&self, method: Method, url: String, body: Option<Json>) -> Reply {
        let what = format!("{method} {url}");
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        Reply::read(resp)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    /// Inserts a row that must be new (201); returns the stored row.
    async fn insert(&self, table: &str, row: Json) -> Json {
        let url = format!("{}/tables/{table}", self.module);
        self.call(Method::POST, url, Some(row)).await.expect(201)
    }

    /// One row, or `None` on 404.
    async fn get(&self, table: &str, id: &str) -> Option<Json> {
        let url = format!("{}/tables/{table}/{id}", self.module);
        let reply = self.call(Method::GET, url, None).await;
        match reply.status.as_u16() {
            200 => Some(reply.body),
            404 => None,
            _ => panic!("GET {table}/{id}: {} {}", reply.status, reply.text),
        }
    }

    async fn patch(&self, table: &str, id: &str, version: u64, set: Json) -> Reply {
        let url = format!("{}/tables/{table}/{id}", self.module);
        let body = json!({"version": version, "set": set});
        self.call(Method::PATCH, url, Some(body)).await
    }

    /// A compare-and-set update that must succeed; returns the new row.
    async fn update(&self, table: &str, id: &str, version: u64, set: Json) -> Json {
        self.patch(table, id, version, set).await.expect(200)
    }

    /// Reads the row and updates it by compare-and-set, again on conflict, until it wins.
    async fn update_current(&self, table: &str, id: &str, set: Json) -> (Json, usize) {
        let mut version = uint(&self.get(table, id).await.expect("the row")["version"]);
        for conflicts in 0..10_000 {
            let reply = self.patch(table, id, version, set.clone()).await;
            match reply.status.as_u16() {
                200 => return (reply.body, conflicts),
                409 if reply.code() == "version_conflict" => {
                    version = uint(&reply.body["current"]["version"]);
                }
                _ => panic!("PATCH {table}/{id}: {} {}", reply.status, reply.text),
            }
        }
        panic!("PATCH {table}/{id} never won its compare-and-set");
    }

    async fn delete(&self, table: &str, id: &str, version: u64) -> Json {
        let url = format!("{}/tables/{table}/{id}?version={version}", self.module);
        self.call(Method::DELETE, url, None).await.expect(200)
    }

    /// A batch that must succeed; returns the response (`version` is its commit).
    async fn batch(&self, ops: Json) -> Json {
        let url = format!("{}/batch", self.module);
        self.call(Method::POST, url, Some(json!({ "ops": ops })))
            .await
            .expect(200)
    }

    /// `GET B?tables=...`.
    async fn snapshot(&self, tables: &[&str]) -> Json {
        let url = format!("{}?tables={}", self.module, tables.join(","));
        self.call(Method::GET, url, None).await.expect(200)
    }

    /// A counter from `/metrics`.
    async fn metric(&self, name: &str) -> u64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics text");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }
}

/// The tokens of one edge's terminals.
struct Tokens {
    admin: String,
    cashier: String,
    waiter: String,
    kitchen: String,
}

impl Tokens {
    fn mint(edge: &EdgeProcess) -> Tokens {
        Tokens {
            admin: edge.admin_token().to_owned(),
            cashier: edge.mint_token("cashier"),
            waiter: edge.mint_token("waiter"),
            kitchen: edge.mint_token("kitchen"),
        }
    }
}

/// A branch's staff at their terminals on one edge run.
#[derive(Clone)]
struct Staff {
    admin: Terminal,
    cashier: Terminal,
    waiter: Terminal,
    kitchen: Terminal,
}

impl Staff {
    fn new(edge: &EdgeProcess, t: &Tokens) -> Staff {
        Staff {
            admin: Terminal::new(edge, &t.admin),
            cashier: Terminal::new(edge, &t.cashier),
            waiter: Terminal::new(edge, &t.waiter),
            kitchen: Terminal::new(edge, &t.kitchen),
        }
    }
}

/// One writer's service: `orders` orders, each with a grill and a bar line (every third one
/// in a single batch), the kitchen starting the grill line, every fourth bar line taken back,
/// the bill paid in two parts, a note on an order all writers share, written by
/// compare-and-set against each other, and every other order closed. Returns the compare-and-set conflicts.
async fn serve_orders(staff: Staff, writer: usize, orders: usize, shared_order: String) -> usize {
    let mut conflicts = 0;
    for o in 0..orders {
        let id = format!("w{writer}-o{o}");
        let (grill, bar) = (format!("{id}-grill"), format!("{id}-bar"));
        let order = json!({"id": id, "table_id": format!("T{writer}"), "customer_name": format!("guest {o}")});
        let grill_line = json!({"id": grill, "order_id": id, "item_id": "burger", "name": "burger",
            "quantity": 1 + o % 3, "unit_price": 1250 + writer as i64, "station_id": "grill"});
        let bar_line = json!({"id": bar, "order_id": id, "item_id": "lemonade", "name": "lemonade",
            "quantity": 2, "unit_price": 350, "station_id": "bar"});
        if o % 3 == 0 {
            staff
                .waiter
                .batch(json!([
                    {"op": "insert", "table": "order_header", "row": order},
                    {"op": "insert", "table": "order_line", "row": grill_line},
                    {"op": "insert", "table": "order_line", "row": bar_line},
                ]))
                .await;
        } else {
            staff.waiter.insert("order_header", order).await;
            staff.waiter.insert("order_line", grill_line).await;
            staff.waiter.insert("order_line", bar_line).await;
        }
        staff
            .kitchen
            .update("order_line", &grill, 1, json!({"status": "preparing"}))
            .await;
        if o % 4 == 1 {
            staff.waiter.delete("order_line", &bar, 1).await;
        }
        let total = int(&staff
            .cashier
            .get("order_header", &id)
            .await
            .expect("the order")["total_amount"]);
        for (part, amount) in [(1, total / 2), (2, total - total / 2)] {
            staff
                .cashier
                .insert(
                    "order_payment",
                    json!({"id": format!("{id}-pay{part}"), "order_id": id, "method": "card", "amount": amount}),
                )
                .await;
        }
        let (_, c) = staff
            .waiter
            .update_current(
                "order_header",
                &shared_order,
                json!({"notes": format!("writer {writer} order {o}")}),
            )
            .await;
        conflicts += c;
        if o % 2 == 0 {
            let (closed, c) = staff
                .cashier
                .update_current("order_header", &id, json!({"status": "closed"}))
                .await;
            assert_eq!(closed["status"], "closed", "{closed}");
            conflicts += c;
        }
    }
    conflicts
}

/// Runs `serve_orders` for each writer at once; returns the compare-and-set conflicts.
async fn serve_concurrently(
    staff: &Staff,
    writers: std::ops::Range<usize>,
    orders: usize,
) -> usize {
    let shared_order = format!("shared-{}", writers.start);
    staff
        .waiter
        .insert(
            "order_header",
            json!({"id": shared_order, "table_id": "T-shared"}),
        )
        .await;
    let tasks: Vec<_> = writers
        .map(|w| tokio::spawn(serve_orders(staff.clone(), w, orders, shared_order.clone())))
        .collect();
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.expect("a writer");
    }
    conflicts
}

/// A write that touches every subscription of these tests (an open order with a queued grill
/// line) and returns its commit's version: once a subscription reaches it, it has every
/// earlier commit.
async fn marker(t: &Terminal, name: &str) -> u64 {
    let reply = t
        .batch(json!([
            {"op": "insert", "table": "order_header", "row": {"id": name, "table_id": "T-marker"}},
            {"op": "insert", "table": "order_line", "row": {"id": format!("{name}-l"), "order_id": name,
                "name": "marker", "quantity": 1, "unit_price": 100, "station_id": "grill"}},
        ]))
        .await;
    uint(&reply["version"])
}

// ---------------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------------

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A connection's wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Json,
    Postcard,
}

/// A terminal's live feed connection.
struct FeedClient {
    ws: Ws,
    wire: Wire,
}

/// Opens `GET /ws?token=TOKEN`, asking for the postcard subprotocol when `wire` says so.
async fn connect(edge: &EdgeProcess, token: &str, wire: Wire) -> FeedClient {
    connect_to(edge.http_addr(), token, wire).await
}

async fn connect_to(addr: std::net::SocketAddr, token: &str, wire: Wire) -> FeedClient {
    let mut req = format!("ws://{addr}/ws?token={token}")
        .into_client_request()
        .expect("a WebSocket request");
    if wire == Wire::Postcard {
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            POSTCARD_PROTOCOL.parse().expect("a header value"),
        );
    }
    // A small read buffer: the default 128 KiB one is cleared on every read. No size limit
    // on frames: a `since` catch-up is one delta frame however much it carries.
    let config = WebSocketConfig::default()
        .read_buffer_size(8192)
        .max_frame_size(None)
        .max_message_size(None);
    let (ws, resp) = tokio::time::timeout(
        FRAME_DEADLINE,
        tokio_tungstenite::connect_async_with_config(req, Some(config), true),
    )
    .await
    .expect("the WebSocket handshake within the deadline")
    .expect("the WebSocket handshake");
    let protocol = resp.headers().get("sec-websocket-protocol");
    match wire {
        Wire::Postcard => assert_eq!(
            protocol.map(|p| p.as_bytes()),
            Some(POSTCARD_PROTOCOL.as_bytes()),
            "the edge accepts the postcard subprotocol"
        ),
        Wire::Json => assert!(protocol.is_none(), "no subprotocol was asked for"),
    }
    FeedClient { ws, wire }
}

impl FeedClient {
    /// Subscribes: JSON clients send a JSON text frame, postcard clients a postcard
    /// [`ClientMsg`] binary frame.
    async fn subscribe(
        &mut self,
        sub: &str,
        tables: &[&str],
        filter: Option<&Json>,
        since: Option<u64>,
    ) {
        let msg = match self.wire {
            Wire::Json => {
                let mut m =
                    json!({"type": "subscribe", "sub": sub, "module": "pos", "tables": tables});
                if let Some(f) = filter {
                    m["where"] = f.clone();
                }
                if let Some(s) = since {
                    m["since"] = json!(s);
                }
                Message::Text(m.to_string().into())
            }
            Wire::Postcard => {
                let m = ClientMsg::Subscribe {
                    sub: sub.to_owned(),
                    module: "pos".to_owned(),
                    tables: tables.iter().map(|t| (*t).to_owned()).collect(),
                    filter: filter.map(Json::to_string),
                    since,
                };
                Message::Binary(postcard::to_stdvec(&m).expect("postcard").into())
            }
        };
        self.ws.send(msg).await.expect("send a subscribe frame");
    }

    async fn unsubscribe(&mut self, sub: &str) {
        let msg = match self.wire {
            Wire::Json => Message::Text(
                json!({"type": "unsubscribe", "sub": sub})
                    .to_string()
                    .into(),
            ),
            Wire::Postcard => Message::Binary(
                postcard::to_stdvec(&ClientMsg::Unsubscribe {
                    sub: sub.to_owned(),
                })
                .expect("postcard")
                .into(),
            ),
        };
        self.ws.send(msg).await.expect("send an unsubscribe frame");
    }

    /// The next server message in the JSON shape (postcard messages are converted).
    async fn next(&mut self) -> Json {
        loop {
            let msg = tokio::time::timeout(FRAME_DEADLINE, self.ws.next())
                .await
                .expect("a frame within the deadline")
                .expect("the connection stays open")
                .expect("a WebSocket frame");
            match (self.wire, msg) {
                (Wire::Json, Message::Text(t)) => {
                    return serde_json::from_str(&t)
                        .unwrap_or_else(|e| panic!("a JSON frame that is not JSON ({e}): {t}"));
                }
                (Wire::Postcard, Message::Binary(b)) => {
                    let msg: ServerMsg = postcard::from_bytes(&b)
                        .unwrap_or_else(|e| panic!("a binary frame that is not postcard: {e}"));
                    return postcard_to_json(msg);
                }
                (_, Message::Ping(_) | Message::Pong(_)) => {}
                (wire, other) => panic!("unexpected frame on a {wire:?} connection: {other:?}"),
            }
        }
    }

    async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

fn feed_row_json(row: &FeedRow) -> Json {
    Json::Object(
        row.iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

/// A postcard server message in the shape of its JSON twin.
fn postcard_to_json(msg: ServerMsg) -> Json {
    match msg {
        ServerMsg::Snapshot { sub, version, rows } => {
            let rows: Map<String, Json> = rows
                .iter()
                .map(|(t, rs)| {
                    (
                        t.clone(),
                        Json::Array(rs.iter().map(feed_row_json).collect()),
                    )
                })
                .collect();
            json!({"type": "snapshot", "sub": sub, "version": version, "rows": rows})
        }
        ServerMsg::Delta {
            sub,
            base,
            version,
            changes,
        } => {
            let changes: Vec<Json> = changes
                .iter()
                .map(|c| {
                    let op = match c.op {
                        FeedOp::Insert => "insert",
                        FeedOp::Update => "update",
                        FeedOp::Delete => "delete",
                    };
                    let mut m =
                        json!({"table": c.table, "id": c.id, "op": op, "version": c.version});
                    if let Some(r) = &c.row {
                        m["row"] = feed_row_json(r);
                    }
                    if let Some(s) = &c.set {
                        m["set"] = feed_row_json(s);
                    }
                    m
                })
                .collect();
            json!({"type": "delta", "sub": sub, "base": base, "version": version, "changes": changes})
        }
        ServerMsg::Resync { sub, reason } => {
            json!({"type": "resync", "sub": sub, "reason": reason})
        }
        ServerMsg::Error {
            sub,
            error,
            message,
        } => json!({"type": "error", "sub": sub, "error": error, "message": message}),
    }
}

// ---------------------------------------------------------------------------------------------
// Replicas
// ---------------------------------------------------------------------------------------------

type Key = (String, String);

/// A terminal's local copy of one subscription, maintained from its snapshot and deltas.
#[derive(Debug, Default, Clone, PartialEq)]
struct Replica {
    version: u64,
    rows: BTreeMap<Key, Map<String, Json>>,
    deltas: usize,
}

impl Replica {
    /// Applies a snapshot or a delta, checking that deltas are gap-free.
    fn apply(&mut self, msg: &Json) {
        match msg["type"].as_str() {
            Some("snapshot") => {
                self.version = uint(&msg["version"]);
                self.rows.clear();
                for (t, rows) in msg["rows"].as_object().expect("snapshot rows") {
                    for r in rows.as_array().expect("a table's rows") {
                        let key = (t.clone(), text(&r["id"]).to_owned());
                        self.rows.insert(key, r.as_object().expect("a row").clone());
                    }
                }
            }
            Some("delta") => {
                let (base, version) = (uint(&msg["base"]), uint(&msg["version"]));
                assert_eq!(
                    base, self.version,
                    "deltas are gap-free: base {base} after version {}: {msg}",
                    self.version
                );
                let changes = msg["changes"].as_array().expect("a delta's changes");
                assert!(version >= base, "a delta goes forward: {msg}");
                assert!(
                    changes.is_empty() || version > base,
                    "a delta with changes moves the version: {msg}"
                );
                self.version = version;
                self.deltas += 1;
                for c in changes {
                    let key = (text(&c["table"]).to_owned(), text(&c["id"]).to_owned());
                    let row_version = &c["version"];
                    match (text(&c["op"]), c.get("row"), c.get("set")) {
                        ("delete", None, None) => {
                            self.rows.remove(&key);
                        }
                        ("insert" | "update", Some(row), None) => {
                            assert_eq!(&row["id"], &c["id"], "{c}");
                            assert_eq!(&row["version"], row_version, "{c}");
                            self.rows
                                .insert(key, row.as_object().expect("a row").clone());
                        }
                        ("update", None, Some(set)) => {
                            let row = self.rows.get_mut(&key).unwrap_or_else(|| {
                                panic!("an update of a row this replica never had: {c}")
                            });
                            row.extend(set.as_object().expect("a set").clone());
                            row.insert("version".into(), row_version.clone());
                        }
                        _ => panic!("malformed change {c}"),
                    }
                }
            }
            _ => panic!("unexpected message: {msg}"),
        }
    }

    fn ids(&self) -> BTreeSet<&str> {
        self.rows.keys().map(|(_, id)| id.as_str()).collect()
    }

    fn row(&self, table: &str, id: &str) -> &Map<String, Json> {
        self.rows
            .get(&(table.to_owned(), id.to_owned()))
            .unwrap_or_else(|| panic!("the replica has no {table}/{id}"))
    }
}

/// A connection's replicas by subscription name.
type Replicas = BTreeMap<String, Replica>;

fn replicas(subs: &[&str]) -> Replicas {
    subs.iter()
        .map(|s| ((*s).to_owned(), Replica::default()))
        .collect()
}

/// Routes a message to its subscription's replica; a resync or an error fails the test.
fn route(replicas: &mut Replicas, msg: &Json) {
    let sub = msg["sub"].as_str().unwrap_or("");
    let replica = replicas
        .get_mut(sub)
        .unwrap_or_else(|| panic!("a message for an unknown subscription: {msg}"));
    replica.apply(msg);
}

/// Reads frames into the replicas until every one of them has reached the target version,
/// which may be announced later through the watch; returns the messages read. When given,
/// `progress` is told the highest version of the replicas after each message.
async fn follow(
    client: &mut FeedClient,
    replicas: &mut Replicas,
    target: &mut watch::Receiver<u64>,
    progress: Option<&watch::Sender<u64>>,
) -> Vec<Json> {
    let mut seen = Vec::new();
    let mut open = true;
    loop {
        let t = *target.borrow_and_update();
        if replicas.values().all(|r| r.version >= t) {
            return seen;
        }
        tokio::select! {
            changed = target.changed(), if open => open = changed.is_ok(),
            msg = client.next() => {
                route(replicas, &msg);
                seen.push(msg);
                if let Some(p) = progress {
                    p.send_replace(replicas.values().map(|r| r.version).max().unwrap_or(0));
                }
            }
        }
    }
}

/// Reads frames into the replicas until every one of them has reached `version`; returns the
/// messages read.
async fn follow_to(client: &mut FeedClient, replicas: &mut Replicas, version: u64) -> Vec<Json> {
    let (_keep, mut target) = watch::channel(version);
    follow(client, replicas, &mut target, None).await
}

/// Checks a replica against the edge over HTTP: every row it holds is exactly what a GET of
/// that row returns now (and matches the subscription's filter), and every hot row of the
/// subscription's tables in a module snapshot that matches the filter is in it, equal.
async fn assert_matches_edge(
    replica: &Replica,
    t: &Terminal,
    tables: &[&str],
    wants: impl Fn(&Json) -> bool,
) {
    let current: Vec<Option<Json>> = futures_util::stream::iter(replica.rows.keys())
        .map(|(table, id)| t.get(table, id))
        .buffered(16)
        .collect()
        .await;
    for (((table, id), row), current) in replica.rows.iter().zip(current) {
        let current = current
            .unwrap_or_else(|| panic!("the replica holds {table}/{id}, which the edge has not"));
        assert_eq!(
            &Json::Object(row.clone()),
            &current,
            "the replica's {table}/{id} is not the edge's"
        );
        assert!(
            wants(&current),
            "{table}/{id} does not match the filter: {current}"
        );
    }
    let snap = t.snapshot(tables).await;
    let mut hot = 0;
    for (table, rows) in snap["tables"].as_object().expect("snapshot tables") {
        for row in rows.as_array().expect("rows").iter().filter(|r| wants(r)) {
            hot += 1;
            let id = text(&row["id"]);
            let held = replica
                .rows
                .get(&(table.clone(), id.to_owned()))
                .unwrap_or_else(|| panic!("hot row {table}/{id} is missing from the replica"));
            assert_eq!(&Json::Object(held.clone()), row, "{table}/{id}");
        }
    }
    assert!(hot > 0, "the check compared no hot rows");
}

fn everything(_: &Json) -> bool {
    true
}

// ---------------------------------------------------------------------------------------------
// 1. Snapshot, then gap-free deltas under concurrent writers
// ---------------------------------------------------------------------------------------------

/// A terminal subscribes to the order tables (and, on the same connection, to the open orders
/// through a filter) while six writers serve orders over HTTP at once: the snapshot plus the
/// deltas, each based on the previous version, reproduce every row exactly as the edge
/// returns it, and every hot row is there. The same holds for six terminals that join while
/// the writers are under way, three of which leave and resume with `since` meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_then_gap_free_deltas_reproduce_the_edge_under_concurrent_writers() {
    const WRITERS: usize = 6;
    const ORDERS: usize = 10;
    let edge = EdgeProcess::start();
    let tokens = Tokens::mint(&edge);
    let staff = Staff::new(&edge, &tokens);
    // Something to snapshot: served orders, some of them closed (not hot any more).
    serve_concurrently(&staff, 100..102, 3).await;

    let open_statuses = json!({"status": ["open", "preparing", "ready", "served"]});
    let is_open = |r: &Json| r["status"] != "closed" && r["status"] != "cancelled";
    let mut client = connect(&edge, &tokens.admin, Wire::Json).await;
    client.subscribe("all", &ORDER_TABLES, None, None).await;
    client
        .subscribe("open", &["order_header"], Some(&open_statuses), None)
        .await;
    let mut subs = replicas(&["all", "open"]);
    for _ in 0..2 {
        let msg = client.next().await;
        assert_eq!(msg["type"], "snapshot", "{msg}");
        route(&mut subs, &msg);
    }
    let first = subs["all"].clone();
    assert!(
        first.rows.keys().any(|(t, _)| t == "order_line"),
        "the snapshot carries the open orders' lines"
    );
    assert!(
        !first.ids().contains("w100-o0"),
        "a closed order is not in the snapshot"
    );
    assert_eq!(
        subs["open"].ids(),
        first
            .rows
            .iter()
            .filter(|((t, _), r)| t == "order_header" && is_open(&Json::Object((*r).clone())))
            .map(|((_, id), _)| id.as_str())
            .collect(),
        "the filtered snapshot holds exactly the open orders"
    );

    // The terminal reads while the writers write.
    let start = subs["all"].version;
    let (target_tx, target_rx) = watch::channel(u64::MAX);
    let (progress_tx, mut progress) = watch::channel(start);
    let mut rx = target_rx.clone();
    let follower = tokio::spawn(async move {
        let seen = follow(&mut client, &mut subs, &mut rx, Some(&progress_tx)).await;
        (client, subs, seen.len())
    });
    let writers = {
        let staff = staff.clone();
        tokio::spawn(async move { serve_concurrently(&staff, 0..WRITERS, ORDERS).await })
    };
    // Terminals that join while the writers are under way: a snapshot, then gap-free
    // deltas. Every other one leaves after a while and comes back with `since` while the
    // writers go on. (Each order takes at least five commits, 300 in all, so every point
    // below is reached by the writers alone.)
    let mut late = Vec::new();
    for k in 1..=6u64 {
        let at = start + 40 * k;
        tokio::time::timeout(FRAME_DEADLINE, progress.wait_for(|v| *v >= at))
            .await
            .expect("the writers get under way")
            .expect("the follower runs");
        let (addr, token) = (edge.http_addr(), tokens.cashier.clone());
        let wire = if k % 3 == 0 {
            Wire::Postcard
        } else {
            Wire::Json
        };
        let resume = k % 2 == 0;
        let mut c = connect_to(addr, &token, wire).await;
        c.subscribe("all", &ORDER_TABLES, None, None).await;
        let mut rx = target_rx.clone();
        late.push(tokio::spawn(async move {
            let mut s = replicas(&["all"]);
            let mut seen = Vec::new();
            if resume {
                seen.extend(follow_to(&mut c, &mut s, at + 20).await);
                c.close().await;
                c = connect_to(addr, &token, wire).await;
                let since = s["all"].version;
                c.subscribe("all", &ORDER_TABLES, None, Some(since)).await;
                let first = c.next().await;
                assert_eq!(
                    first["type"], "delta",
                    "a resume under writes starts with a catch-up delta"
                );
                assert_eq!(
                    uint(&first["base"]),
                    since,
                    "the catch-up is based on `since`"
                );
                route(&mut s, &first);
            }
            seen.extend(follow(&mut c, &mut s, &mut rx, None).await);
            c.close().await;
            (s, uint(&seen[0]["version"]))
        }));
    }
    let conflicts = writers.await.expect("the writers");
    let last = marker(&staff.waiter, "marker").await;
    target_tx.send(last).expect("the followers are waiting");
    let (client, subs, frames) = tokio::time::timeout(FRAME_DEADLINE, follower)
        .await
        .expect("the terminal reaches the last write")
        .expect("the follower");
    client.close().await;
    let mut late_replicas = Vec::new();
    for l in late {
        let (s, snapshot_version) = tokio::time::timeout(FRAME_DEADLINE, l)
            .await
            .expect("a late terminal reaches the last write")
            .expect("a late terminal");
        assert!(
            start < snapshot_version && snapshot_version < last,
            "a late terminal's snapshot ({snapshot_version}) is from the middle of the writes ({start}..{last})"
        );
        late_replicas.push(s);
    }

    let all = &subs["all"];
    assert_eq!(all.version, last, "the marker is the last commit");
    for w in 0..WRITERS {
        for o in 0..ORDERS {
            let id = format!("w{w}-o{o}");
            let order = all.row("order_header", &id);
            let closed = o % 2 == 0;
            assert_eq!(
                order["status"],
                if closed { "closed" } else { "open" },
                "{id}"
            );
            assert_eq!(order["paid_amount"], order["total_amount"], "{id}");
            assert_eq!(
                all.row("order_line", &format!("{id}-grill"))["status"],
                "preparing"
            );
            assert_eq!(
                all.rows
                    .contains_key(&("order_line".into(), format!("{id}-bar"))),
                o % 4 != 1,
                "{id}: a deleted line is gone from the replica, the others are there"
            );
            assert_eq!(
                subs["open"]
                    .rows
                    .contains_key(&("order_header".into(), id.clone())),
                !closed,
                "{id}: the filtered replica follows the order out when it closes"
            );
        }
    }
    let logged = all
        .rows
        .keys()
        .filter(|(t, _)| t == "order_status_log" || t == "order_line_status_log")
        .count();
    assert!(
        logged >= WRITERS * ORDERS,
        "the status logs written by the edge reach the feed ({logged} rows)"
    );
    assert_matches_edge(all, &staff.admin, &ORDER_TABLES, everything).await;
    assert_matches_edge(&subs["open"], &staff.admin, &["order_header"], is_open).await;
    for l in &late_replicas {
        assert_eq!(l["all"].version, last);
        assert_matches_edge(&l["all"], &staff.admin, &ORDER_TABLES, everything).await;
    }
    // Where the time goes: every fanned-out commit has its lag from group start; every COMMIT
    // that wrote (groups that changed something, and the seals between) its time; and the
    // WAL fsyncs, at most one per such COMMIT since one fsync may cover several.
    let admin = &staff.admin;
    let fanned = admin.metric("outpost_feed_commits_total").await;
    assert!(
        fanned >= (WRITERS * ORDERS) as u64,
        "{fanned} commits fanned out"
    );
    assert_eq!(admin.metric("outpost_feed_lag_us_count").await, fanned);
    let groups = admin.metric("outpost_commit_groups_total").await;
    let commit_writes = admin.metric("outpost_commit_write_us_count").await;
    assert!(
        groups > 0 && commit_writes > 0,
        "{commit_writes} COMMIT timings for {groups} groups"
    );
    let fsyncs = admin.metric("outpost_wal_fsync_us_count").await;
    assert!(
        fsyncs > 0 && fsyncs <= commit_writes,
        "{fsyncs} fsyncs for {commit_writes} COMMITs"
    );
    eprintln!(
        "feed under concurrent writers: {frames} frames, {} + {} deltas, {} rows, {conflicts} compare-and-set conflicts",
        subs["all"].deltas,
        subs["open"].deltas,
        all.rows.len()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Resume with `since`
// ---------------------------------------------------------------------------------------------

/// The kitchen screen's filter of the resume tests.
fn grill_queue() -> Json {
    json!({"station_id": "grill", "status": ["queued", "preparing", "ready"]})
}

fn on_grill_queue(r: &Json) -> bool {
    r["station_id"] == "grill" && ["queued", "preparing", "ready"].contains(&text(&r["status"]))
}

/// Subscribes to `all` (the order tables) and `grill` (a filtered line queue), each from its
/// replica's version when it has one, and checks each subscription's first frame: a delta
/// based on `since` when resuming, else a snapshot.
async fn subscribe_both(client: &mut FeedClient, subs: &mut Replicas, resume: bool) {
    let since = |r: &Replica| resume.then_some(r.version);
    client
        .subscribe("all", &ORDER_TABLES, None, since(&subs["all"]))
        .await;
    client
        .subscribe(
            "grill",
            &["order_line"],
            Some(&grill_queue()),
            since(&subs["grill"]),
        )
        .await;
    let mut firsts = BTreeSet::new();
    while firsts.len() < 2 {
        let msg = client.next().await;
        let sub = text(&msg["sub"]).to_owned();
        if firsts.insert(sub.clone()) {
            if resume {
                assert_eq!(msg["type"], "delta", "a resume starts with a delta: {msg}");
                assert_eq!(
                    uint(&msg["base"]),
                    subs[&sub].version,
                    "the catch-up is based on `since`: {msg}"
                );
            } else {
                assert_eq!(msg["type"], "snapshot", "{msg}");
            }
        }
        route(subs, &msg);
    }
}

/// Changes, while the terminal is away, rows it holds: an order closed, a line taken back,
/// the marker's grill line through the kitchen and served, a note.
async fn change_held_rows(staff: &Staff, marker_name: &str) {
    let line = format!("{marker_name}-l");
    let l = staff
        .kitchen
        .update("order_line", &line, 1, json!({"status": "ready"}))
        .await;
    staff
        .cashier
        .update(
            "order_line",
            &line,
            uint(&l["version"]),
            json!({"status": "served"}),
        )
        .await;
    staff
        .waiter
        .update_current("order_header", marker_name, json!({"notes": "moved to T9"}))
        .await;
    staff.waiter.delete("order_line", "w1-o1-grill", 2).await;
    staff
        .cashier
        .insert(
            "order_payment",
            json!({"order_id": "w0-o1", "method": "cash", "amount": 1}),
        )
        .await;
}

/// A terminal follows, disconnects, misses writes (new orders, and changes to rows it holds),
/// and reconnects with `since` = its last version: each subscription's first frame is a delta
/// based on `since`, live deltas follow on without a gap, and the replicas equal the edge.
#[tokio::test(flavor = "multi_thread")]
async fn a_reconnecting_terminal_resumes_with_a_catch_up_delta() {
    let edge = EdgeProcess::start();
    let tokens = Tokens::mint(&edge);
    let staff = Staff::new(&edge, &tokens);
    serve_concurrently(&staff, 0..1, 2).await;

    // No feed without a known token.
    let refused =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?token=op_nope", edge.http_addr()))
            .await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401)
        }
        other => panic!("an unknown token is refused with 401, got {other:?}"),
    }
    let mut client = connect(&edge, &tokens.kitchen, Wire::Json).await;
    let mut subs = replicas(&["all", "grill"]);
    // The kitchen may not read payments: a subscription naming them is refused.
    client
        .subscribe("pay", &["order_payment"], None, None)
        .await;
    let refused = client.next().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["error"], "forbidden", "{refused}");
    assert_eq!(refused["sub"], "pay", "{refused}");
    client.close().await;
    let mut client = connect(&edge, &tokens.admin, Wire::Json).await;
    subscribe_both(&mut client, &mut subs, false).await;
    let m1 = marker(&staff.waiter, "m1").await;
    serve_concurrently(&staff, 1..3, 3).await;
    let m2 = marker(&staff.waiter, "m2").await;
    follow_to(&mut client, &mut subs, m2).await;
    assert!(subs["grill"].ids().contains("m1-l"));
    assert!(m1 < m2);
    let left_at = subs["all"].version;
    client.close().await;

    // Away: the others serve on, and rows the terminal holds change.
    serve_concurrently(&staff, 3..5, 3).await;
    change_held_rows(&staff, "m2").await;

    let mut client = connect(&edge, &tokens.admin, Wire::Json).await;
    subscribe_both(&mut client, &mut subs, true).await;
    assert!(
        subs["all"].version > left_at,
        "the catch-up brought the missed commits"
    );
    assert!(
        !subs["grill"].ids().contains("m2-l"),
        "the served line left the kitchen queue during the catch-up"
    );
    // Live again: deltas follow the catch-up without a gap.
    serve_concurrently(&staff, 5..7, 2).await;
    let m3 = marker(&staff.waiter, "m3").await;
    follow_to(&mut client, &mut subs, m3).await;
    // Resuming from the current version: an empty catch-up.
    client
        .subscribe("again", &ORDER_TABLES, None, Some(m3))
        .await;
    let empty = client.next().await;
    assert_eq!(
        (
            &empty["type"],
            &empty["sub"],
            &empty["base"],
            &empty["version"]
        ),
        (&json!("delta"), &json!("again"), &json!(m3), &json!(m3)),
        "{empty}"
    );
    assert_eq!(empty["changes"], json!([]), "{empty}");
    client.close().await;
    assert_eq!(
        subs["all"].row("order_header", "m2")["notes"],
        "moved to T9"
    );
    assert!(!subs["all"].ids().contains("w1-o1-grill"));
    assert_matches_edge(&subs["all"], &staff.admin, &ORDER_TABLES, everything).await;
    assert_matches_edge(
        &subs["grill"],
        &staff.admin,
        &["order_line"],
        on_grill_queue,
    )
    .await;
    assert!(staff.admin.metric("outpost_feed_catch_ups_total").await >= 2);
}

/// The same resume across a kill -9 and restart of the edge: versions are durable, so the
/// terminal's `since` from before the crash still gets a catch-up delta.
#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_resumes_across_an_edge_kill_9() {
    let mut edge = EdgeProcess::start();
    let tokens = Tokens::mint(&edge);
    let staff = Staff::new(&edge, &tokens);
    serve_concurrently(&staff, 0..2, 2).await;
    let mut client = connect(&edge, &tokens.admin, Wire::Json).await;
    let mut subs = replicas(&["all", "grill"]);
    subscribe_both(&mut client, &mut subs, false).await;
    serve_concurrently(&staff, 2..4, 2).await;
    let m1 = marker(&staff.waiter, "m1").await;
    follow_to(&mut client, &mut subs, m1).await;
    client.close().await;

    edge.kill9();
    edge.restart();
    let staff = Staff::new(&edge, &tokens);
    serve_concurrently(&staff, 4..6, 2).await;
    change_held_rows(&staff, "m1").await;

    let mut client = connect(&edge, &tokens.admin, Wire::Json).await;
    subscribe_both(&mut client, &mut subs, true).await;
    let m2 = marker(&staff.waiter, "m2").await;
    follow_to(&mut client, &mut subs, m2).await;
    client.close().await;
    assert!(m2 > m1, "versions go on from where they were");
    assert_matches_edge(&subs["all"], &staff.admin, &ORDER_TABLES, everything).await;
    assert_matches_edge(
        &subs["grill"],
        &staff.admin,
        &["order_line"],
        on_grill_queue,
    )
    .await;
}

/// A terminal away for longer than the edge replays (more than `CATCH_UP_CHANGES_MAX`
/// changes) is answered with a snapshot, which brings it back to the edge's state.
#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_too_far_behind_resumes_with_a_snapshot() {
    let edge = EdgeProcess::start();
    let tokens = Tokens::mint(&edge);
    let staff = Staff::new(&edge, &tokens);
    serve_concurrently(&staff, 0..2, 2).await;
    let mut client = connect(&edge, &tokens.admin, Wire::Json).await;
    let mut subs = replicas(&["all", "grill"]);
    subscribe_both(&mut client, &mut subs, false).await;
    let m1 = marker(&staff.waiter, "m1").await;
    follow_to(&mut client, &mut subs, m1).await;
    client.close().await;

    change_held_rows(&staff, "m1").await;
    staff
        .waiter
        .insert("order_header", json!({"id": "big", "table_id": "T-big"}))
        .await;
    let batches = edge::feed::CATCH_UP_CHANGES_MAX / 1000 + 1;
    for b in 0..batches {
        let ops: Vec<Json> = (0..1000)
            .map(|i| json!({"op": "insert", "table": "order_payment",
                "row": {"id": format!("big-{b}-{i}"), "order_id": "big", "method": "cash", "amount": 1}}))
            .collect();
        staff.cashier.batch(Json::Array(ops)).await;
    }
    let last = marker(&staff.waiter, "m2").await;

    let mut client = connect(&edge, &tokens.admin, Wire::Json).await;
    client
        .subscribe("all", &ORDER_TABLES, None, Some(subs["all"].version))
        .await;
    let first = client.next().await;
    assert_eq!(
        first["type"], "snapshot",
        "too far behind for a catch-up: {}",
        first["type"]
    );
    assert_eq!(uint(&first["version"]), last);
    route(&mut subs, &first);
    client.close().await;
    let all = &subs["all"];
    assert!(
        !all.ids().contains("w1-o1-grill"),
        "the snapshot replaced the replica"
    );
    assert_eq!(
        all.row("order_header", "big")["paid_amount"],
        json!(batches * 1000)
    );
    assert_matches_edge(all, &staff.admin, &ORDER_TABLES, everything).await;
}

// ---------------------------------------------------------------------------------------------
// 3. A stalled client
// ---------------------------------------------------------------------------------------------

/// One terminal subscribes and then reads nothing while 2000 payments of 8 KiB each go in
/// over HTTP, far more than its queue and the socket buffers hold. Another terminal, reading
/// all along, receives every delta. The stalled one, when it reads again, gets what was in
/// flight and then `resync` ("lagging"); subscribing again from its last version brings it
/// back to the edge's state.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_terminal_is_resynced_while_another_keeps_receiving() {
    const WRITERS: usize = 8;
    const PAYMENTS: usize = 2000;
    let edge = EdgeProcess::start();
    let tokens = Tokens::mint(&edge);
    let staff = Staff::new(&edge, &tokens);
    staff
        .waiter
        .insert("order_header", json!({"id": "o1", "table_id": "T1"}))
        .await;

    let mut stalled = connect(&edge, &tokens.cashier, Wire::Json).await;
    stalled.subscribe("s", &["order_payment"], None, None).await;
    let mut stalled_subs = replicas(&["s"]);
    // Its snapshot is read so that the subscription surely exists; then it reads nothing.
    let snap = stalled.next().await;
    assert_eq!(snap["type"], "snapshot", "{snap}");
    route(&mut stalled_subs, &snap);

    let mut live = connect(&edge, &tokens.cashier, Wire::Postcard).await;
    live.subscribe("s", &["order_payment", "order_header"], None, None)
        .await;
    let mut live_subs = replicas(&["s"]);
    let snap = live.next().await;
    assert_eq!(snap["type"], "snapshot", "{snap}");
    route(&mut live_subs, &snap);
    let (target_tx, mut target_rx) = watch::channel(u64::MAX);
    let follower = tokio::spawn(async move {
        follow(&mut live, &mut live_subs, &mut target_rx, None).await;
        (live, live_subs)
    });

    let reference = "x".repeat(8 * 1024);
    let next = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (cashier, next, reference) =
                (staff.cashier.clone(), next.clone(), reference.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= PAYMENTS {
                        return;
                    }
                    cashier
                        .insert(
                            "order_payment",
                            json!({"id": format!("p{i}"), "order_id": "o1", "method": "card",
                                "amount": 1, "reference": format!("{i}/{reference}")}),
                        )
                        .await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("a writer");
    }
    let last = uint(
        &staff
            .cashier
            .batch(json!([{"op": "insert", "table": "order_payment",
                "row": {"id": "p-last", "order_id": "o1", "method": "cash", "amount": 1}}]))
            .await["version"],
    );
    target_tx.send(last).expect("the follower is waiting");
    let (live, live_subs) = tokio::time::timeout(FRAME_DEADLINE, follower)
        .await
        .expect("the live terminal reaches the last write")
        .expect("the live terminal's task");
    live.close().await;
    let r = &live_subs["s"];
    let payments = r.rows.keys().filter(|(t, _)| t == "order_payment").count();
    assert_eq!(
        payments,
        PAYMENTS + 1,
        "the live terminal has every payment"
    );
    assert_eq!(
        r.row("order_header", "o1")["paid_amount"],
        json!(PAYMENTS + 1),
        "and the order's paid amount after each of them"
    );
    assert_matches_edge(
        r,
        &staff.cashier,
        &["order_payment", "order_header"],
        everything,
    )
    .await;

    // The stalled terminal reads again: what was in flight, then a resync.
    let mut in_flight = 0;
    loop {
        let msg = stalled.next().await;
        match msg["type"].as_str() {
            Some("delta") => {
                route(&mut stalled_subs, &msg);
                in_flight += 1;
            }
            Some("resync") => {
                assert_eq!(msg["sub"], "s", "{msg}");
                assert_eq!(msg["reason"], "lagging", "{msg}");
                break;
            }
            _ => panic!("expected deltas then a resync, got {msg}"),
        }
    }
    let at = stalled_subs["s"].version;
    assert!(at < last, "the stalled terminal had not reached the end");
    assert!(staff.admin.metric("outpost_feed_resyncs_total").await >= 1);
    // It subscribes again with its last version and catches up.
    stalled
        .subscribe("s", &["order_payment"], None, Some(at))
        .await;
    // About 12 MB of payments were missed: more than one catch-up frame may carry
    // (CATCH_UP_BYTES_MAX), so the edge answers with a snapshot; a smaller gap is a delta.
    let first = stalled.next().await;
    match first["type"].as_str() {
        Some("delta") => assert_eq!(uint(&first["base"]), at),
        Some("snapshot") => {}
        _ => panic!("a resume is a catch-up delta or a snapshot: {first}"),
    }
    route(&mut stalled_subs, &first);
    assert_eq!(stalled_subs["s"].version, last);
    stalled.close().await;
    let s = &stalled_subs["s"];
    assert_eq!(s.rows.len(), PAYMENTS + 1);
    assert_matches_edge(s, &staff.cashier, &["order_payment"], everything).await;
    eprintln!(
        "stalled terminal: {in_flight} deltas in flight before its resync at version {at} of {last}; \
         the live one read {} deltas",
        r.deltas
    );
}

// ---------------------------------------------------------------------------------------------
// 4. JSON and postcard
// ---------------------------------------------------------------------------------------------

/// A JSON and a postcard terminal (the latter also sending postcard client messages) make
/// the same subscriptions, a refused one included, and follow the same writes, then both
/// resume with `since`: converted to one form, every frame each received is the same.
#[tokio::test(flavor = "multi_thread")]
async fn json_and_postcard_terminals_receive_the_same_content() {
    let edge = EdgeProcess::start();
    let tokens = Tokens::mint(&edge);
    let staff = Staff::new(&edge, &tokens);
    serve_concurrently(&staff, 0..2, 3).await;

    let mut clients = [
        connect(&edge, &tokens.waiter, Wire::Json).await,
        connect(&edge, &tokens.waiter, Wire::Postcard).await,
    ];
    let mut subs = [replicas(&["all", "grill"]), replicas(&["all", "grill"])];
    let mut frames: [Vec<Json>; 2] = [Vec::new(), Vec::new()];
    for (c, s) in clients.iter_mut().zip(&mut subs) {
        c.subscribe("all", &ORDER_TABLES, None, None).await;
        c.subscribe("grill", &["order_line"], Some(&grill_queue()), None)
            .await;
        c.subscribe(
            "bad",
            &["order_line"],
            Some(&json!({"colour": "red"})),
            None,
        )
        .await;
        for _ in 0..2 {
            let msg = c.next().await;
            route(s, &msg);
        }
    }
    // The refused subscription's error, in both forms.
    for (c, f) in clients.iter_mut().zip(&mut frames) {
        let err = c.next().await;
        assert_eq!(err["type"], "error", "{err}");
        assert_eq!(err["error"], "unknown_column", "{err}");
        f.push(err);
    }
    assert_eq!(subs[0], subs[1], "the same snapshots");

    serve_concurrently(&staff, 2..5, 3).await;
    let m1 = marker(&staff.waiter, "m1").await;
    for ((c, s), f) in clients.iter_mut().zip(&mut subs).zip(&mut frames) {
        f.extend(follow_to(c, s, m1).await);
    }
    assert_eq!(subs[0], subs[1], "the same replicas");
    // Frame by frame per subscription (the order between two subscriptions' frames of one
    // commit is not part of the contract).
    let [json_frames, postcard_frames] = [by_sub(&frames[0]), by_sub(&frames[1])];
    assert_eq!(
        json_frames.keys().collect::<Vec<_>>(),
        postcard_frames.keys().collect::<Vec<_>>()
    );
    for (sub, a) in &json_frames {
        let b = &postcard_frames[sub];
        assert_eq!(a.len(), b.len(), "{sub}: as many frames");
        for (a, b) in a.iter().zip(b) {
            assert_eq!(a, b, "{sub}: a JSON frame and its postcard twin differ");
        }
    }
    assert!(
        frames[0].iter().any(|m| m["changes"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c.get("set").is_some()))),
        "some deltas carried only the changed columns"
    );

    // Both leave, miss the same writes and resume from the same version.
    let [json_client, postcard_client] = clients;
    json_client.close().await;
    postcard_client.close().await;
    serve_concurrently(&staff, 5..7, 2).await;
    change_held_rows(&staff, "m1").await;
    let mut clients = [
        connect(&edge, &tokens.waiter, Wire::Json).await,
        connect(&edge, &tokens.waiter, Wire::Postcard).await,
    ];
    let mut catch_ups: [Vec<Json>; 2] = [Vec::new(), Vec::new()];
    for ((c, s), f) in clients.iter_mut().zip(&mut subs).zip(&mut catch_ups) {
        let since = s["all"].version;
        c.subscribe("all", &ORDER_TABLES, None, Some(since)).await;
        let first = c.next().await;
        assert_eq!(first["type"], "delta", "{}", first["type"]);
        assert_eq!(uint(&first["base"]), since);
        route(s, &first);
        f.push(first);
    }
    assert_eq!(catch_ups[0], catch_ups[1], "the same catch-up");
    assert_eq!(subs[0], subs[1]);
    for c in clients {
        c.close().await;
    }
    assert_matches_edge(&subs[1]["all"], &staff.admin, &ORDER_TABLES, everything).await;
}

/// Messages by subscription, each subscription's in the order received.
fn by_sub(frames: &[Json]) -> BTreeMap<String, Vec<&Json>> {
    let mut out: BTreeMap<String, Vec<&Json>> = BTreeMap::new();
    for f in frames {
        let sub = f["sub"].as_str().unwrap_or("").to_owned();
        out.entry(sub).or_default().push(f);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 5. A kitchen screen
// ---------------------------------------------------------------------------------------------

/// Reads the next frame and checks it is a delta of `sub` with exactly these changes
/// (`(op, id)`, in order), then applies it.
#[track_caller]
fn check_delta(msg: &Json, sub: &str, changes: &[(&str, &str)]) {
    assert_eq!(msg["type"], "delta", "{msg}");
    assert_eq!(msg["sub"], sub, "{msg}");
    let got: Vec<(&str, &str)> = msg["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| (text(&c["op"]), text(&c["id"])))
        .collect();
    assert_eq!(got, changes, "{msg}");
}

/// A kitchen screen subscribes to the grill's unfinished lines. As waiters add lines, the
/// kitchen starts and finishes them, the cashier serves and cancels, and lines move between
/// stations, each line comes into the screen and leaves it exactly when it should; changes
/// elsewhere send nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_kitchen_screen_follows_its_lines_in_and_out() {
    let edge = EdgeProcess::start();
    let tokens = Tokens::mint(&edge);
    let staff = Staff::new(&edge, &tokens);
    let (waiter, kitchen, cashier) = (&staff.waiter, &staff.kitchen, &staff.cashier);
    let line = |id: &str, order: &str, station: &str| json!({"id": id, "order_id": order, "name": id, "quantity": 1, "unit_price": 900, "station_id": station});
    waiter
        .insert("order_header", json!({"id": "A", "table_id": "T1"}))
        .await;
    waiter.insert("order_line", line("a1", "A", "grill")).await;
    waiter.insert("order_line", line("a2", "A", "bar")).await;
    waiter.insert("order_line", line("a3", "A", "grill")).await;
    cashier
        .update("order_line", "a3", 1, json!({"status": "served"}))
        .await;

    let mut screen = connect(&edge, &tokens.kitchen, Wire::Json).await;
    screen
        .subscribe("k", &["order_line"], Some(&grill_queue()), None)
        .await;
    let mut r = Replica::default();
    r.apply(&screen.next().await);
    assert_eq!(r.ids(), BTreeSet::from(["a1"]), "the snapshot is filtered");
    let status = |r: &Replica, id: &str| r.row("order_line", id)["status"].clone();

    // A new grill line comes in whole.
    waiter.insert("order_line", line("b1", "A", "grill")).await;
    // A bar line sends nothing (checked by the next frame being the next grill change).
    waiter.insert("order_line", line("b2", "A", "bar")).await;
    let msg = screen.next().await;
    check_delta(&msg, "k", &[("insert", "b1")]);
    r.apply(&msg);
    assert_eq!(r.row("order_line", "b1")["station_id"], "grill");

    // The kitchen starts a1: only the changed columns.
    let a1 = kitchen
        .update("order_line", "a1", 1, json!({"status": "preparing"}))
        .await;
    kitchen
        .update("order_line", "a2", 1, json!({"status": "preparing"}))
        .await;
    let msg = screen.next().await;
    check_delta(&msg, "k", &[("update", "a1")]);
    let set = msg["changes"][0]["set"].as_object().expect("a set");
    assert_eq!(
        set.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from(["status", "updated_at"]),
        "{msg}"
    );
    r.apply(&msg);
    assert_eq!(status(&r, "a1"), "preparing");
    assert_eq!(Json::Object(r.row("order_line", "a1").clone()), a1);

    let a1 = kitchen
        .update(
            "order_line",
            "a1",
            uint(&a1["version"]),
            json!({"status": "ready"}),
        )
        .await;
    let msg = screen.next().await;
    check_delta(&msg, "k", &[("update", "a1")]);
    r.apply(&msg);
    assert_eq!(status(&r, "a1"), "ready");

    // Served: it leaves the screen.
    cashier
        .update(
            "order_line",
            "a1",
            uint(&a1["version"]),
            json!({"status": "served"}),
        )
        .await;
    let msg = screen.next().await;
    check_delta(&msg, "k", &[("delete", "a1")]);
    r.apply(&msg);
    assert_eq!(r.ids(), BTreeSet::from(["b1"]));

    // A line moved from the bar to the grill comes in whole; one moved away leaves.
    waiter
        .update("order_line", "b2", 1, json!({"station_id": "grill"}))
        .await;
    let msg = screen.next().await;
    check_delta(&msg, "k", &[("update", "b2")]);
    assert!(msg["changes"][0].get("row").is_some(), "{msg}");
    r.apply(&msg);
    waiter
        .update("order_line", "b1", 1, json!({"station_id": "bar"}))
        .await;
    let msg = screen.next().await;
    check_delta(&msg, "k", &[("delete", "b1")]);
    r.apply(&msg);
    assert_eq!(r.ids(), BTreeSet::from(["b2"]));

    // Cancelled: it leaves.
    cashier
        .update("order_line", "b2", 2, json!({"status": "cancelled"}))
        .await;
    let msg = screen.next().await;
    check_delta(&msg, "k", &[("delete", "b2")]);
    r.apply(&msg);
    assert!(r.rows.is_empty());

    // One commit with two grill lines and a bar line: one delta, at the batch's version.
    let batch = waiter
        .batch(json!([
            {"op": "insert", "table": "order_header", "row": {"id": "B", "table_id": "T2"}},
            {"op": "insert", "table": "order_line", "row": line("c1", "B", "grill")},
            {"op": "insert", "table": "order_line", "row": line("c2", "B", "bar")},
            {"op": "insert", "table": "order_line", "row": line("c3", "B", "grill")},
        ]))
        .await;
    let msg = screen.next().await;
    check_delta(&msg, "k", &[("insert", "c1"), ("insert", "c3")]);
    assert_eq!(msg["version"], batch["version"]);
    r.apply(&msg);
    // The kitchen starts both in one batch.
    let batch = kitchen
        .batch(json!([
            {"op": "update", "table": "order_line", "id": "c1", "version": 1, "set": {"status": "preparing"}},
            {"op": "update", "table": "order_line", "id": "c3", "version": 1, "set": {"status": "preparing"}},
        ]))
        .await;
    let msg = screen.next().await;
    check_delta(&msg, "k", &[("update", "c1"), ("update", "c3")]);
    assert_eq!(msg["version"], batch["version"]);
    r.apply(&msg);
    // Payments, order notes and a line taken back.
    cashier
        .insert(
            "order_payment",
            json!({"order_id": "B", "method": "cash", "amount": 900}),
        )
        .await;
    waiter
        .update_current("order_header", "B", json!({"notes": "allergy: nuts"}))
        .await;
    waiter.delete("order_line", "c3", 2).await;
    let msg = screen.next().await;
    check_delta(&msg, "k", &[("delete", "c3")]);
    r.apply(&msg);
    assert_eq!(r.ids(), BTreeSet::from(["c1"]));
    assert_eq!(status(&r, "c1"), "preparing");
    assert_matches_edge(&r, kitchen, &["order_line"], on_grill_queue).await;

    // Unsubscribed, the screen hears nothing more of `k`: the next frame is the new
    // subscription's snapshot, then its delta.
    screen.unsubscribe("k").await;
    screen
        .subscribe(
            "bar",
            &["order_line"],
            Some(&json!({"station_id": "bar"})),
            None,
        )
        .await;
    let snap = screen.next().await;
    assert_eq!(snap["type"], "snapshot", "{snap}");
    assert_eq!(snap["sub"], "bar", "{snap}");
    kitchen
        .update("order_line", "c1", 2, json!({"status": "ready"}))
        .await;
    kitchen
        .update("order_line", "c2", 1, json!({"status": "ready"}))
        .await;
    let msg = screen.next().await;
    check_delta(&msg, "bar", &[("update", "c2")]);
    screen.close().await;
}

/// A closed order is not hot, so a terminal that subscribes after it closed does not get it in
/// its snapshot. When the order changes later (a refund paid on it, a note), the terminal gets
/// the whole row, not changed columns of a row it never had; a hot order still gets only its
/// changed columns.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_the_snapshot_could_not_hold_comes_whole_when_it_changes() {
    let edge = EdgeProcess::start();
    let tokens = Tokens::mint(&edge);
    let staff = Staff::new(&edge, &tokens);
    let cashier = &staff.cashier;
    cashier
        .insert("order_header", json!({"id": "gone", "table_id": "T1"}))
        .await;
    cashier
        .update("order_header", "gone", 1, json!({"status": "closed"}))
        .await;
    cashier
        .insert("order_header", json!({"id": "hot", "table_id": "T2"}))
        .await;

    let mut till = connect(&edge, &tokens.cashier, Wire::Json).await;
    till.subscribe("o", &["order_header"], None, None).await;
    let mut r = Replica::default();
    r.apply(&till.next().await);
    assert_eq!(
        r.ids(),
        BTreeSet::from(["hot"]),
        "closed orders are not hot"
    );

    // A refund on the closed order changes its paid amount: the row comes whole.
    cashier
        .insert(
            "order_payment",
            json!({"id": "refund", "order_id": "gone", "method": "cash", "amount": -500}),
        )
        .await;
    let msg = till.next().await;
    check_delta(&msg, "o", &[("update", "gone")]);
    assert!(msg["changes"][0].get("set").is_none(), "{msg}");
    r.apply(&msg);
    assert_eq!(r.row("order_header", "gone")["paid_amount"], -500);
    // Still closed, so still whole the next time.
    cashier
        .update("order_header", "gone", 3, json!({"notes": "refunded"}))
        .await;
    let msg = till.next().await;
    check_delta(&msg, "o", &[("update", "gone")]);
    assert!(msg["changes"][0].get("row").is_some(), "{msg}");
    r.apply(&msg);

    // The hot order: its changed columns only.
    cashier
        .update("order_header", "hot", 1, json!({"notes": "window seat"}))
        .await;
    let msg = till.next().await;
    check_delta(&msg, "o", &[("update", "hot")]);
    assert!(msg["changes"][0].get("row").is_none(), "{msg}");
    r.apply(&msg);
    assert_matches_edge(&r, cashier, &["order_header"], everything).await;
    till.close().await;
}

/// What a terminal may send is bounded. A subscription names each table at most once (a
/// longer list is refused; a name given twice counts once), and a message over 64 KiB
/// closes the connection rather than being buffered; other connections keep working.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_subscriptions_and_messages_are_refused() {
    let edge = EdgeProcess::start();
    let tokens = Tokens::mint(&edge);
    let staff = Staff::new(&edge, &tokens);
    staff
        .cashier
        .insert("order_header", json!({"id": "o1", "table_id": "T1"}))
        .await;

    let mut client = connect(&edge, &tokens.kitchen, Wire::Json).await;
    let many = vec!["order_header"; 1_000];
    client.subscribe("many", &many, None, None).await;
    let refused = client.next().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["error"], "invalid_frame", "{refused}");
    assert_eq!(refused["sub"], "many", "{refused}");
    // The same table twice is one subscription to it: one delta change per commit.
    client
        .subscribe("twice", &["order_header", "order_header"], None, None)
        .await;
    let mut r = Replica::default();
    r.apply(&client.next().await);
    assert_eq!(r.ids(), BTreeSet::from(["o1"]));
    staff
        .cashier
        .update("order_header", "o1", 1, json!({"notes": "x"}))
        .await;
    let msg = client.next().await;
    check_delta(&msg, "twice", &[("update", "o1")]);

    // A 100 KiB message: the edge closes the connection (1009, message too big).
    let mut other = connect(&edge, &tokens.kitchen, Wire::Json).await;
    let big = json!({"type": "subscribe", "sub": "big", "tables": ["order_header"],
        "where": {"notes": "n".repeat(100 * 1024)}});
    let _ = other.ws.send(Message::Text(big.to_string().into())).await;
    let closed = loop {
        match tokio::time::timeout(FRAME_DEADLINE, other.ws.next())
            .await
            .expect("the edge answers within the deadline")
        {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m)) => panic!("the oversized message was answered: {m:?}"),
            None | Some(Err(_)) => break None,
        }
    };
    assert!(
        closed.is_none_or(|code| code == 1009),
        "closed with {closed:?}"
    );
    // The first connection still works.
    staff
        .cashier
        .update("order_header", "o1", 2, json!({"notes": "y"}))
        .await;
    check_delta(&client.next().await, "twice", &[("update", "o1")]);
    client.close().await;
}

/// A terminal that stops reading altogether (its receive window shut, as on a frozen tablet)
/// is disconnected once a burst of frames cannot reach its socket in time, instead of holding
/// its queue and buffers until the kernel gives up on it. The send timeout is shortened for
/// the test (`OUTPOST_WS_SEND_TIMEOUT_MS`); the writes go on until the edge lets go.
#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_that_never_reads_is_disconnected() {
    let edge = EdgeProcess::start_with_env(&[("OUTPOST_WS_SEND_TIMEOUT_MS", "300")]);
    let tokens = Tokens::mint(&edge);
    let staff = Staff::new(&edge, &tokens);
    let mut frozen = connect(&edge, &tokens.cashier, Wire::Json).await;
    frozen.subscribe("s", &["order_header"], None, None).await;
    assert_eq!(frozen.next().await["type"], "snapshot");
    assert_eq!(staff.cashier.metric("outpost_feed_connections").await, 1);
    // From here on the terminal reads nothing. Each batch commits 15 orders with 60 KiB of
    // notes, about 0.9 MiB of deltas; the loopback socket buffers hold a few MiB.
    let notes = "n".repeat(60 * 1024);
    let mut batches = 0;
    while staff.cashier.metric("outpost_feed_connections").await > 0 {
        assert!(
            batches < 100,
            "the edge still holds a terminal that read nothing for {batches} batches"
        );
        let ops: Vec<Json> = (0..15)
            .map(|i| {
                json!({"op": "insert", "table": "order_header",
                "row": {"id": format!("b{batches}-{i}"), "notes": notes}})
            })
            .collect();
        staff.cashier.batch(json!(ops)).await;
        batches += 1;
    }
    // The edge serves on: a new terminal subscribes and follows.
    let mut fresh = connect(&edge, &tokens.cashier, Wire::Json).await;
    fresh.subscribe("s", &["order_header"], None, None).await;
    assert_eq!(fresh.next().await["type"], "snapshot");
    staff
        .cashier
        .insert("order_header", json!({"id": "after", "table_id": "T9"}))
        .await;
    check_delta(&fresh.next().await, "s", &[("insert", "after")]);
    drop(frozen);
    fresh.close().await;
}

// ---------------------------------------------------------------------------------------------
// Connection limits (raw sockets: a client library would pool, retry and hide what the edge
// did)
// ---------------------------------------------------------------------------------------------

async fn open_raw(edge: &EdgeProcess) -> tokio::net::TcpStream {
    tokio::time::timeout(
        REQUEST_TIMEOUT,
        tokio::net::TcpStream::connect(edge.http_addr()),
    )
    .await
    .expect("a connection within the deadline")
    .expect("a TCP connection to the edge")
}

/// A TCP connection to the edge from the loopback address `from` (on Linux any of
/// 127.0.0.0/8 is this machine, so a test can be several clients).
#[cfg(target_os = "linux")]
async fn open_raw_from(edge: &EdgeProcess, from: [u8; 4]) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind((std::net::Ipv4Addr::from(from), 0).into())
        .expect("a loopback address to connect from");
    tokio::time::timeout(REQUEST_TIMEOUT, socket.connect(edge.http_addr()))
        .await
        .expect("a connection within the deadline")
        .expect("a TCP connection to the edge")
}

/// `GET path` on `tcp`, and its answer read whole: status and body. `None` when the edge
/// closed the connection instead of answering. The connection stays open.
async fn raw_get(tcp: &mut tokio::net::TcpStream, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nhost: edge\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut read = async |tcp: &mut tokio::net::TcpStream, answer: &mut Vec<u8>| {
        let n = tokio::time::timeout(REQUEST_TIMEOUT, tcp.read(&mut chunk))
            .await
            .expect("an answer within the deadline")
            .ok()?;
        answer.extend_from_slice(&chunk[..n]);
        (n > 0).then_some(())
    };
    let head_end = loop {
        if let Some(i) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read(tcp, &mut answer).await?;
    };
    let head = std::str::from_utf8(&answer[..head_end]).expect("a text head");
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no content-length in {head:?}"));
    while answer.len() < head_end + length {
        read(tcp, &mut answer).await?;
    }
    let body =
        String::from_utf8(answer[head_end..head_end + length].to_vec()).expect("a text body");
    Some((status, body))
}

/// Reads `tcp` until the edge closes it; returns what came first.
async fn read_until_closed(tcp: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match tokio::time::timeout(FRAME_DEADLINE, tcp.read(&mut chunk))
            .await
            .expect("the edge closes the connection within the deadline")
        {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A metric read from a `/metrics` page.
fn metric_in(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{page}"))
}

/// Asks `/healthz` on `tcp`, which must be answered 503 `too_many_connections` and then
/// closed by the edge; returns the error's message.
async fn refused_and_closed(mut tcp: tokio::net::TcpStream) -> String {
    let (status, body) = raw_get(&mut tcp, "/healthz")
        .await
        .expect("an answer to a connection that is refused");
    let body: Json = serde_json::from_str(&body).expect("a JSON error");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "too_many_connections");
    assert!(read_until_closed(&mut tcp).await.is_empty());
    body["message"].as_str().expect("a message").to_owned()
}

/// Opens connections until one is served (`/healthz` 200) and returns it; `refused` counts
/// the 503s on the way (a slot comes back once the edge has seen its connection close).
async fn admitted(edge: &EdgeProcess, refused: &mut u64) -> tokio::net::TcpStream {
    admitted_via(async || open_raw(edge).await, refused).await
}

/// [`admitted`], opening each connection with `connect`.
async fn admitted_via(
    connect: impl AsyncFn() -> tokio::net::TcpStream,
    refused: &mut u64,
) -> tokio::net::TcpStream {
    let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
    loop {
        let mut tcp = connect().await;
        if served(&mut tcp, refused).await {
            return tcp;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no connection slot came back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether `tcp` is served `/healthz`; a 503 `too_many_connections` is counted in `refused`.
async fn served(tcp: &mut tokio::net::TcpStream, refused: &mut u64) -> bool {
    match raw_get(tcp, "/healthz").await {
        Some((200, _)) => true,
        Some((503, body)) => {
            let body: Json = serde_json::from_str(&body).expect("a JSON error");
            assert_eq!(body["error"], "too_many_connections", "{body}");
            *refused += 1;
            false
        }
        other => panic!("GET /healthz: {other:?}"),
    }
}

/// The edge serves at most its cap of connections at once, WebSockets included: one more
/// is answered 503 `too_many_connections` and closed, and a connection that closes gives its
/// slot back.
#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_cap_are_refused_until_one_closes() {
    // (A share larger than the cap: this test is one client, refused for the cap itself.)
    let edge = EdgeProcess::start_with_env(&[
        ("OUTPOST_HTTP_CONNECTIONS_MAX", "3"),
        ("OUTPOST_HTTP_CONNECTIONS_PER_CLIENT", "10"),
    ]);
    let tokens = Tokens::mint(&edge);
    let mut refused = 0;
    let mut feed = connect(&edge, &tokens.cashier, Wire::Json).await;
    feed.subscribe("s", &["order_header"], None, None).await;
    assert_eq!(feed.next().await["type"], "snapshot");
    let a = admitted(&edge, &mut refused).await;
    let mut b = admitted(&edge, &mut refused).await;
    assert_eq!(refused, 0, "the cap is 3");

    // Full: a WebSocket and two keep-alive connections. One more is refused, and closed.
    let message = refused_and_closed(open_raw(&edge).await).await;
    assert!(message.contains("as it serves at once"), "{message}");
    refused += 1;
    // A WebSocket handshake is refused the same way.
    let url = format!("ws://{}/ws?token={}", edge.http_addr(), tokens.cashier);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
        }
        Err(e) => panic!("a WebSocket over the cap: {e}"),
        Ok(_) => panic!("a WebSocket over the cap was accepted"),
    }
    refused += 1;
    // The connections within the cap are served on.
    assert_eq!(raw_get(&mut b, "/healthz").await.map(|r| r.0), Some(200));

    // A keep-alive connection closes: its slot comes back.
    drop(a);
    let mut c = admitted(&edge, &mut refused).await;
    let (status, page) = raw_get(&mut c, "/metrics").await.expect("the metrics");
    assert_eq!(status, 200);
    assert_eq!(metric_in(&page, "outpost_http_connections"), 3);
    assert_eq!(
        metric_in(&page, "outpost_http_connections_refused_total"),
        refused
    );
    assert_eq!(metric_in(&page, "outpost_feed_connections"), 1);

    // So does a WebSocket's.
    feed.close().await;
    let _d = admitted(&edge, &mut refused).await;
    let (status, page) = raw_get(&mut c, "/metrics").await.expect("the metrics");
    assert_eq!(status, 200);
    assert_eq!(metric_in(&page, "outpost_http_connections"), 3);
    assert_eq!(metric_in(&page, "outpost_feed_connections"), 0);
    assert_eq!(
        metric_in(&page, "outpost_http_connections_refused_total"),
        refused
    );
}

/// One client address holds at most its share of the cap: beyond it that client is refused
/// 503 `too_many_connections` while another address is still served, and the share comes
/// back when one of its connections closes.
#[tokio::test(flavor = "multi_thread")]
#[cfg(target_os = "linux")]
async fn one_client_cannot_take_every_connection() {
    let edge = EdgeProcess::start_with_env(&[
        ("OUTPOST_HTTP_CONNECTIONS_MAX", "8"),
        ("OUTPOST_HTTP_CONNECTIONS_PER_CLIENT", "2"),
    ]);
    let (greedy, other) = ([127, 0, 0, 1], [127, 0, 0, 2]);
    let mut refused = 0;
    let a = admitted_via(async || open_raw_from(&edge, greedy).await, &mut refused).await;
    let _b = admitted_via(async || open_raw_from(&edge, greedy).await, &mut refused).await;
    assert_eq!(refused, 0, "the share is 2");

    let message = refused_and_closed(open_raw_from(&edge, greedy).await).await;
    assert!(message.contains("device"), "{message}");
    refused += 1;

    // Another terminal is served, with the cap far from full.
    let mut till = admitted_via(async || open_raw_from(&edge, other).await, &mut refused).await;
    assert_eq!(refused, 1);
    let (status, page) = raw_get(&mut till, "/metrics").await.expect("the metrics");
    assert_eq!(status, 200);
    assert_eq!(metric_in(&page, "outpost_http_connections"), 3);
    assert_eq!(
        metric_in(&page, "outpost_http_connections_refused_total"),
        1
    );
    assert_eq!(
        metric_in(&page, "outpost_http_connections_refused_client_total"),
        1
    );

    // The greedy client closes one: it may open one again.
    drop(a);
    let _c = admitted_via(async || open_raw_from(&edge, greedy).await, &mut refused).await;
    let (status, page) = raw_get(&mut till, "/metrics").await.expect("the metrics");
    assert_eq!(status, 200);
    assert_eq!(metric_in(&page, "outpost_http_connections"), 3);
    assert_eq!(
        metric_in(&page, "outpost_http_connections_refused_client_total"),
        refused
    );
}

/// A request head over 32 KiB is answered 431 and its connection closed, and every answer
/// tells the client how long an idle connection is kept.
#[tokio::test(flavor = "multi_thread")]
async fn request_heads_are_bounded_and_idle_time_is_announced() {
    use tokio::io::AsyncWriteExt;
    let edge = EdgeProcess::start();
    let mut tcp = open_raw(&edge).await;
    let request = "GET /healthz HTTP/1.1\r\nhost: edge\r\n\r\n";
    tcp.write_all(request.as_bytes()).await.expect("a request");
    let answer = read_head(&mut tcp).await.to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(
        answer.contains("\r\nkeep-alive: timeout=55\r\n"),
        "{answer}"
    );
    let length: usize = answer
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
        .expect("a content-length");
    let mut body = vec![0; length];
    tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut body)
        .await
        .expect("the body");

    let mut big = open_raw(&edge).await;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nhost: edge\r\nx-padding: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    // The edge may answer and close before it has read the whole head.
    let _ = big.write_all(request.as_bytes()).await;
    let answer = String::from_utf8_lossy(&read_until_closed(&mut big).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // The edge is still serving.
    assert_eq!(raw_get(&mut tcp, "/healthz").await.map(|r| r.0), Some(200));
}

/// Reads an answer's head (up to the blank line) from `tcp`.
async fn read_head(tcp: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut chunk = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(REQUEST_TIMEOUT, tcp.read(&mut chunk))
            .await
            .expect("an answer within the deadline")
            .expect("an answer");
        assert!(
            n > 0,
            "closed mid-answer: {}",
            String::from_utf8_lossy(&got)
        );
        got.push(chunk[0]);
    }
    String::from_utf8(got).expect("a text head")
}

/// A connection that does not send a whole request head within the head timeout is closed,
/// and so is a keep-alive connection idle that long: neither holds a slot for ever. (The
/// timeout covers request heads only: bodies and unread answers have their own limits.)
#[tokio::test(flavor = "multi_thread")]
async fn connections_without_a_whole_request_head_are_closed() {
    use tokio::io::AsyncWriteExt;
    let edge = EdgeProcess::start_with_env(&[
        ("OUTPOST_HTTP_HEAD_TIMEOUT_MS", "3000"),
        ("OUTPOST_HTTP_BODY_TIMEOUT_MS", "3000"),
    ]);
    // Minted first: minting runs subprocesses, which the idle timeouts below must not wait on.
    let tokens = Tokens::mint(&edge);
    let mut slow = open_raw(&edge).await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: edge\r\n")
        .await
        .expect("half a request head");
    let answer = read_until_closed(&mut slow).await;
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "half a head was answered: {}",
        String::from_utf8_lossy(&answer)
    );
    let mut idle = open_raw(&edge).await;
    assert_eq!(raw_get(&mut idle, "/healthz").await.map(|r| r.0), Some(200));
    assert!(read_until_closed(&mut idle).await.is_empty());
    // Both were counted (each right before its socket closed); this page's own connection
    // is not idle yet.
    let mut metrics = open_raw(&edge).await;
    let (status, page) = raw_get(&mut metrics, "/metrics")
        .await
        .expect("the metrics");
    assert_eq!(status, 200);
    assert_eq!(metric_in(&page, "outpost_http_head_timeouts_total"), 2);
    assert_eq!(metric_in(&page, "outpost_http_connections"), 1);

    // A body that stops coming is answered 408 `body_timeout` and its connection closed.
    drop(metrics);
    let mut stalled = open_raw(&edge).await;
    let path = edge
        .table_url("order_header")
        .replacen(&edge.base_url(), "", 1);
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: edge\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 200\r\n\r\n{{\"id\":",
        tokens.cashier
    );
    stalled
        .write_all(head.as_bytes())
        .await
        .expect("a head and a little body");
    let answer = String::from_utf8_lossy(&read_until_closed(&mut stalled).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"body_timeout\""), "{answer}");
    // The stalled connection's slot came back (the edge counts a connection closed before it
    // closes the socket): once the edge has seen `metrics` go, this page's is the only one.
    let mut metrics = open_raw(&edge).await;
    let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
    loop {
        let (status, page) = raw_get(&mut metrics, "/metrics")
            .await
            .expect("the metrics");
        assert_eq!(status, 200);
        let open = metric_in(&page, "outpost_http_connections");
        if open == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{open} connections still counted open"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
