//! The terminal live feed over a real WebSocket: snapshot then gap-free deltas under concurrent
//! writers, resume with `since`, a stalled client resynced while others keep receiving, and
//! JSON and postcard clients seeing the same content.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use edge::store::{Op, Store, Txn};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value as Json, json};
use shared::Value;
use shared::feed::{FeedOp, FeedRow, POSTCARD_PROTOCOL, ServerMsg};
use shared::json::value_to_json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An edge serving on loopback in this process, with its admin token.
struct Edge {
    store: Store,
    addr: std::net::SocketAddr,
    token: String,
    _dir: tempfile::TempDir,
}

async fn start() -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let token = store.create_token(shared::Role::Admin).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = store.clone();
    tokio::spawn(async move {
        edge::server::serve_api(
            listener,
            served,
            shared::BranchId::parse("B001").unwrap(),
            None,
            std::future::pending(),
        )
        .await
    });
    Edge {
        store,
        addr,
        token,
        _dir: dir,
    }
}

async fn connect(edge: &Edge, postcard: bool) -> Ws {
    let mut req = format!("ws://{}/ws?token={}", edge.addr, edge.token)
        .into_client_request()
        .unwrap();
    if postcard {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", POSTCARD_PROTOCOL.parse().unwrap());
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    if postcard {
        assert_eq!(resp.headers()["sec-websocket-protocol"], POSTCARD_PROTOCOL);
    }
    ws
}

async fn subscribe(
    ws: &mut Ws,
    sub: &str,
    tables: &[&str],
    filter: Option<Json>,
    since: Option<u64>,
) {
    let mut msg = json!({"type": "subscribe", "sub": sub, "module": "pos", "tables": tables});
    if let Some(f) = filter {
        msg["where"] = f;
    }
    if let Some(s) = since {
        msg["since"] = json!(s);
    }
    ws.send(Message::Text(msg.to_string().into()))
        .await
        .unwrap();
}

/// The next server message as JSON (postcard frames are converted to the same JSON shape).
async fn next(ws: &mut Ws) -> Json {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a frame within the deadline")
            .expect("the connection stays open")
            .unwrap();
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Binary(b) => return postcard_to_json(postcard::from_bytes(&b).unwrap()),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

fn feed_row_json(row: &FeedRow) -> Json {
    Json::Object(
        row.iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn postcard_to_json(msg: ServerMsg) -> Json {
    match msg {
        ServerMsg::Snapshot { sub, version, rows } => json!({
            "type": "snapshot", "sub": sub, "version": version,
            "rows": rows.iter().map(|(t, rs)| (t.clone(), Json::Array(rs.iter().map(feed_row_json).collect()))).collect::<serde_json::Map<_, _>>(),
        }),
        ServerMsg::Delta {
            sub,
            base,
            version,
            changes,
        } => json!({
            "type": "delta", "sub": sub, "base": base, "version": version,
            "changes": changes.iter().map(|c| {
                let mut m = json!({"table": c.table, "id": c.id, "op": match c.op { FeedOp::Insert => "insert", FeedOp::Update => "update", FeedOp::Delete => "delete" }, "version": c.version});
                if let Some(r) = &c.row { m["row"] = feed_row_json(r); }
                if let Some(s) = &c.set { m["set"] = feed_row_json(s); }
                m
            }).collect::<Vec<_>>(),
        }),
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

/// A terminal's local copy: table -> id -> row, maintained from snapshot and deltas.
#[derive(Default, Debug, Clone, PartialEq)]
struct Replica {
    version: u64,
    rows: BTreeMap<(String, String), serde_json::Map<String, Json>>,
}

impl Replica {
    fn apply(&mut self, msg: &Json) {
        match msg["type"].as_str().unwrap() {
            "snapshot" => {
                self.version = msg["version"].as_u64().unwrap();
                self.rows.clear();
                for (t, rows) in msg["rows"].as_object().unwrap() {
                    for r in rows.as_array().unwrap() {
                        self.rows.insert(
                            (t.clone(), r["id"].as_str().unwrap().into()),
                            r.as_object().unwrap().clone(),
                        );
                    }
                }
            }
            "delta" => {
                assert_eq!(
                    msg["base"].as_u64().unwrap(),
                    self.version,
                    "deltas are gap-free: {msg}"
                );
                self.version = msg["version"].as_u64().unwrap();
                for c in msg["changes"].as_array().unwrap() {
                    let key = (
                        c["table"].as_str().unwrap().to_owned(),
                        c["id"].as_str().unwrap().to_owned(),
                    );
                    match (c["op"].as_str().unwrap(), c.get("row"), c.get("set")) {
                        ("delete", _, _) => {
                            self.rows.remove(&key);
                        }
                        (_, Some(row), _) => {
                            self.rows.insert(key, row.as_object().unwrap().clone());
                        }
                        ("update", None, Some(set)) => {
                            let row = self
                                .rows
                                .get_mut(&key)
                                .unwrap_or_else(|| panic!("update of a row never seen: {c}"));
                            row.extend(set.as_object().unwrap().clone());
                            row.insert("version".into(), c["version"].clone());
                        }
                        _ => panic!("malformed change {c}"),
                    }
                }
            }
            other => panic!("unexpected message {other}: {msg}"),
        }
    }
}

/// Checks a replica against the edge: every row it holds is the edge's current row, and every
/// hot row of the tables is in it.
fn assert_matches_edge(replica: &Replica, store: &Store, tables: &[&str]) {
    for ((t, id), row) in &replica.rows {
        let current = store
            .get(t, id)
            .unwrap()
            .unwrap_or_else(|| panic!("{t}/{id} is gone at the edge"));
        assert_eq!(row, &shared::json::row_to_json(&current), "{t}/{id}");
    }
    let snap = store.snapshot(Some(tables)).unwrap();
    for (t, rows) in &snap.tables {
        for r in rows {
            assert!(
                replica.rows.contains_key(&(t.clone(), r.id.clone())),
                "hot row {t}/{} missing",
                r.id
            );
        }
    }
}

async fn write_orders(store: Store, writer: usize, orders: usize) {
    for o in 0..orders {
        let id = format!("w{writer}-o{o}");
        store
            .commit(Txn::single(
                "t",
                insert("order_header", &id, &[("table_id", text("T1"))]),
            ))
            .await
            .unwrap();
        store
            .commit(Txn::single(
                "t",
                insert(
                    "order_line",
                    &format!("{id}-l"),
                    &[
                        ("order_id", text(&id)),
                        ("quantity", Value::Int(2)),
                        ("unit_price", Value::Int(300)),
                    ],
                ),
            ))
            .await
            .unwrap();
        store
            .commit(Txn::single(
                "t",
                insert(
                    "order_payment",
                    &format!("{id}-p"),
                    &[("order_id", text(&id)), ("amount", Value::Int(600))],
                ),
            ))
            .await
            .unwrap();
        if o % 2 == 0 {
            let order = store.get("order_header", &id).unwrap().unwrap();
            store
                .commit(Txn::single(
                    "t",
                    update(
                        "order_header",
                        &id,
                        order.version,
                        &[("status", text("closed"))],
                    ),
                ))
                .await
                .unwrap();
        }
    }
}

/// Reads frames until the replica reaches `version`.
async fn follow(ws: &mut Ws, replica: &mut Replica, version: u64) {
    while replica.version < version {
        let msg = next(ws).await;
        replica.apply(&msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_gap_free_deltas_reproduce_the_edge() {
    let edge = start().await;
    const TABLES: [&str; 3] = ["order_header", "order_line", "order_payment"];
    write_orders(edge.store.clone(), 99, 3).await;
    let mut json_ws = connect(&edge, false).await;
    let mut pc_ws = connect(&edge, true).await;
    subscribe(&mut json_ws, "s1", &TABLES, None, None).await;
    subscribe(&mut pc_ws, "s1", &TABLES, None, None).await;
    let (mut a, mut b) = (Replica::default(), Replica::default());
    a.apply(&next(&mut json_ws).await);
    b.apply(&next(&mut pc_ws).await);
    assert!(a == b, "JSON and postcard snapshots carry the same content");

    let writers: Vec<_> = (0..4)
        .map(|w| tokio::spawn(write_orders(edge.store.clone(), w, 10)))
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let last = edge.store.version().0;
    follow(&mut json_ws, &mut a, last).await;
    follow(&mut pc_ws, &mut b, last).await;
    assert_matches_edge(&a, &edge.store, &TABLES);
    assert!(a == b, "JSON and postcard clients see the same content");
}

/// Subscriptions whose first frame is read while commits are being fanned out: each gets the
/// commits after its snapshot or catch-up, none twice and none missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminals_subscribing_while_commits_stream_get_gap_free_feeds() {
    let edge = start().await;
    const TABLES: [&str; 3] = ["order_header", "order_line", "order_payment"];
    write_orders(edge.store.clone(), 99, 2).await;
    // 4 writers x 12 orders: at most 168 commits, under a connection's queue of frames, so
    // that followers read nothing until the end and still get no resync.
    let writers: Vec<_> = (0..4)
        .map(|w| tokio::spawn(write_orders(edge.store.clone(), w, 12)))
        .collect();
    let mut followers: Vec<(Ws, Replica)> = Vec::new();
    // One terminal after another until the writers are done (at least 6): every third
    // resumes from the version the one before it reached, with a copy of its rows.
    while followers.len() < 6 || (followers.len() < 64 && !writers.iter().all(|w| w.is_finished()))
    {
        let n = followers.len();
        let (since, mut replica) = match followers.last() {
            Some((_, r)) if n % 3 == 2 => (Some(r.version), r.clone()),
            _ => (None, Replica::default()),
        };
        let mut ws = connect(&edge, n % 2 == 1).await;
        subscribe(&mut ws, "s", &TABLES, None, since).await;
        let first = next(&mut ws).await;
        if since.is_some() {
            assert_eq!(first["type"], "delta", "a resume is a delta: {first}");
        }
        replica.apply(&first);
        followers.push((ws, replica));
    }
    for w in writers {
        w.await.unwrap();
    }
    let last = edge.store.version().0;
    for (ws, replica) in &mut followers {
        follow(ws, replica, last).await;
        assert_matches_edge(replica, &edge.store, &TABLES);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_subscription_follows_rows_in_and_out() {
    let edge = start().await;
    let mut ws = connect(&edge, false).await;
    // A kitchen screen: the grill's lines that are not served yet.
    let filter = json!({"station_id": "grill", "status": ["queued", "preparing", "ready"]});
    subscribe(&mut ws, "k", &["order_line"], Some(filter), None).await;
    let mut r = Replica::default();
    r.apply(&next(&mut ws).await);
    let s = &edge.store;
    s.commit(Txn::single("t", insert("order_header", "o1", &[])))
        .await
        .unwrap();
    for (id, station) in [("l1", "grill"), ("l2", "bar"), ("l3", "grill")] {
        s.commit(Txn::single(
            "t",
            insert(
                "order_line",
                id,
                &[("order_id", text("o1")), ("station_id", text(station))],
            ),
        ))
        .await
        .unwrap();
    }
    s.commit(Txn::single(
        "t",
        update("order_line", "l1", 1, &[("status", text("served"))]),
    ))
    .await
    .unwrap();
    s.commit(Txn::single(
        "t",
        update("order_line", "l3", 1, &[("status", text("preparing"))]),
    ))
    .await
    .unwrap();
    follow(&mut ws, &mut r, s.version().0).await;
    let ids: Vec<&str> = r.rows.keys().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids, vec!["l3"]);
    assert_eq!(
        r.rows[&("order_line".to_string(), "l3".to_string())]["status"],
        "preparing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_terminal_resumes_with_a_delta() {
    let edge = start().await;
    const TABLES: [&str; 2] = ["order_header", "order_line"];
    let mut ws = connect(&edge, false).await;
    subscribe(&mut ws, "s", &TABLES, None, None).await;
    let mut r = Replica::default();
    r.apply(&next(&mut ws).await);
    write_orders(edge.store.clone(), 1, 2).await;
    follow(&mut ws, &mut r, edge.store.version().0).await;
    drop(ws);

    // Offline for a while; then back with its last version.
    write_orders(edge.store.clone(), 2, 3).await;
    let mut ws = connect(&edge, false).await;
    subscribe(&mut ws, "s", &TABLES, None, Some(r.version)).await;
    let first = next(&mut ws).await;
    assert_eq!(
        first["type"], "delta",
        "a resume is a delta, not a snapshot: {first}"
    );
    assert_eq!(first["base"].as_u64(), Some(r.version));
    r.apply(&first);
    follow(&mut ws, &mut r, edge.store.version().0).await;
    assert_matches_edge(&r, &edge.store, &TABLES);
    // A version this edge never issued gets a snapshot.
    subscribe(&mut ws, "t", &TABLES, None, Some(10_000_000)).await;
    assert_eq!(next(&mut ws).await["type"], "snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_terminal_is_resynced_and_the_others_keep_receiving() {
    let edge = start().await;
    let mut stalled = connect(&edge, false).await;
    let mut live = connect(&edge, false).await;
    subscribe(&mut stalled, "s", &["order_payment"], None, None).await;
    subscribe(&mut live, "s", &["order_payment"], None, None).await;
    assert_eq!(next(&mut stalled).await["type"], "snapshot");
    let mut r = Replica::default();
    r.apply(&next(&mut live).await);
    edge.store
        .commit(Txn::single("t", insert("order_header", "o1", &[])))
        .await
        .unwrap();
    // Far more bytes than the stalled socket's queue and the kernel's buffers hold: it reads
    // nothing meanwhile. The live terminal reads as the payments arrive.
    let payments = 2000;
    let padding = "x".repeat(8 * 1024);
    let follower = tokio::spawn(async move {
        while r.rows.len() < payments {
            let msg = next(&mut live).await;
            r.apply(&msg);
        }
        r
    });
    for i in 0..payments {
        let op: Op = insert(
            "order_payment",
            &format!("p{i}"),
            &[
                ("order_id", text("o1")),
                ("amount", Value::Int(1)),
                ("reference", text(&padding)),
            ],
        );
        edge.store.commit(Txn::single("t", op)).await.unwrap();
    }
    let r = follower.await.unwrap();
    assert_eq!(r.rows.len(), payments);
    // The stalled terminal wakes up: after whatever was in flight, it is told to resync.
    loop {
        let msg = next(&mut stalled).await;
        if msg["type"] == "resync" {
            assert_eq!(msg["reason"], "lagging");
            break;
        }
        assert_eq!(msg["type"], "delta");
    }
    let metrics = reqwest_metrics(&edge).await;
    assert!(
        metrics.contains("outpost_feed_resyncs_total 1"),
        "{metrics}"
    );
    let route = "outpost_request_latency_us_count{method=\"GET\",route=\"/ws\"}";
    assert!(metrics.contains(route), "{metrics}");
}

/// A GET over a raw HTTP/1.1 request (no HTTP client needed for one GET).
async fn raw_get(edge: &Edge, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(edge.addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

async fn reqwest_metrics(edge: &Edge) -> String {
    raw_get(edge, "/metrics").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_the_feed_gets_a_json_error() {
    let edge = start().await;
    let resp = raw_get(&edge, &format!("/ws?token={}", edge.token)).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("\"error\":\"websocket_required\""), "{resp}");
    let resp = raw_get(&edge, "/ws?token=nope").await;
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_errors_and_the_connection_stays() {
    let edge = start().await;
    let mut ws = connect(&edge, false).await;
    for (frame, code) in [
        ("not json", "invalid_json"),
        (
            r#"{"type":"subscribe","tables":["order_header"]}"#,
            "invalid_frame",
        ),
        (
            r#"{"type":"subscribe","sub":"a","tables":["nope"]}"#,
            "unknown_table",
        ),
        (
            r#"{"type":"subscribe","sub":"a","module":"shop","tables":["order_header"]}"#,
            "unknown_module",
        ),
        (
            r#"{"type":"subscribe","sub":"a","tables":["order_header"],"where":{"colour":"red"}}"#,
            "unknown_column",
        ),
        (
            r#"{"type":"subscribe","sub":"a","tables":["order_header"],"since":-3}"#,
            "invalid_value",
        ),
        (r#"{"type":"dance","sub":"a"}"#, "invalid_frame"),
    ] {
        ws.send(Message::Text(frame.into())).await.unwrap();
        let msg = next(&mut ws).await;
        assert_eq!(msg["type"], "error", "{frame}");
        assert_eq!(msg["error"], code, "{frame}: {msg}");
    }
    subscribe(&mut ws, "ok", &["order_header"], None, None).await;
    assert_eq!(next(&mut ws).await["type"], "snapshot");
}
