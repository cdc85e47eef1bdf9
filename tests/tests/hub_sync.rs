//! End-to-end tests of branch-to-hub sync (CONTRACT.md sections 3 and 4) with the real
//! `outpost-hub` and `outpost-edge` binaries over QUIC with mutual TLS: exactly once at the
//! hub from two branches, head-office menu rows reaching the right edges and their terminal
//! feeds, offline-first with the hub killed, resume (not restart) after a hub crash in the
//! middle of a catch-up, a corrupted segment refused and re-sent, identities from another
//! hub, another branch's identity and a revoked branch refused, and the head-office API's
//! errors.
//!
//! Nothing waits on a timer: every wait is [`wait_until`] on a state the test then checks
//! exactly (healthz positions, the hub's branch table, metrics, rows, frames). The deadlines
//! are safety nets, never timing assertions. A hub killed with SIGKILL sends no close, so an
//! edge that was connected ends that connection only at its QUIC idle timeout (a restarted
//! hub cannot reset it either); the tests that kill the hub wait for that, so they take at
//! least that long.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value as Json, json};
use tests::{
    Body, EdgeProcess, Http, HubProcess, Reply, SYNC_DEADLINE, assert_hub_payment_totals,
    edge_binary, int, open_order, sync_context, tail, text, uint, wait_until,
};
use tokio_tungstenite::tungstenite::Message;

/// Safety net for one expected WebSocket frame.
const FRAME_DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Requests only these tests make, on the shared blocking client
// ---------------------------------------------------------------------------------------------

/// What these tests ask of the edge and the hub beyond [`Http`]'s shared requests.
trait SyncApi {
    /// `PATCH B/tables/{table}/{id}` at the edge: `set`, if the row is at `version`.
    fn patch(&self, edge: &EdgeProcess, table: &str, id: &str, version: u64, set: Json) -> Reply;

    /// [`Http::hub_rows`], also checking that each page's `meta.count` is its number of rows.
    fn counted_hub_rows(&self, hub: &HubProcess, q: Json) -> BTreeMap<(String, String), Json>;

    /// `PUT /api/modules/pos/tables/{table}/{id}` at the hub, for every branch or, with
    /// `scope`, for one.
    fn hub_put(
        &self,
        hub: &HubProcess,
        table: &str,
        id: &str,
        scope: Option<&str>,
        row: Json,
    ) -> Reply;
}

impl SyncApi for Http {
    fn patch(&self, edge: &EdgeProcess, table: &str, id: &str, version: u64, set: Json) -> Reply {
        let body = Body::Json(json!({ "version": version, "set": set }));
        let token = Some(edge.admin_token());
        self.send(Method::PATCH, &edge.row_url(table, id), token, body)
    }

    fn counted_hub_rows(&self, hub: &HubProcess, q: Json) -> BTreeMap<(String, String), Json> {
        self.hub_rows_checking(hub, q, |page, body| {
            let rows = body["rows"].as_array().expect("rows");
            assert_eq!(body["meta"]["count"], json!(rows.len()), "{page}: {body}");
        })
    }

    fn hub_put(
        &self,
        hub: &HubProcess,
        table: &str,
        id: &str,
        scope: Option<&str>,
        row: Json,
    ) -> Reply {
        let mut url = hub.url(&format!("/api/modules/pos/tables/{table}/{id}"));
        if let Some(b) = scope {
            url.push_str(&format!("?branch={b}"));
        }
        self.send(Method::PUT, &url, Some(hub.admin_token()), Body::Json(row))
    }
}

// ---------------------------------------------------------------------------------------------
// Waits
// ---------------------------------------------------------------------------------------------

/// Waits until every edge has everything it wrote acknowledged by the hub and the hub's
/// durable position for its branch is the edge's last seq. Returns each edge's last seq.
fn wait_synced(http: &Http, hub: &HubProcess, edges: &[&EdgeProcess]) -> Vec<u64> {
    edges
        .iter()
        .map(|edge| {
            let mut last = 0;
            wait_until(
                &format!("{} fully synced with the hub", edge.branch()),
                || {
                    let h = http.healthz(edge);
                    last = uint(&h["last_seq"]);
                    uint(&h["synced_seq"]) == last
                        && http.branch_info(hub, edge.branch())["synced_seq"] == json!(last)
                },
                || sync_context(http, hub, edge),
            );
            last
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Writes
// ---------------------------------------------------------------------------------------------

fn payment(order: &str, id: &str, amount: i64) -> Json {
    json!({"id": id, "order_id": order, "method": "card", "amount": amount})
}

/// Inserts a new payment (201); returns the stored row.
fn pay(http: &Http, edge: &EdgeProcess, order: &str, id: &str, amount: i64) -> Json {
    http.insert(edge, "order_payment", payment(order, id, amount))
        .expect(201)
}

/// `n` payments against `order` in one batch (all or nothing); their ids and amounts.
fn pay_batch(
    http: &Http,
    edge: &EdgeProcess,
    order: &str,
    prefix: &str,
    n: usize,
) -> Vec<(String, i64)> {
    let payments: Vec<(String, i64)> = (0..n)
        .map(|i| (format!("{prefix}-{i:03}"), 100 + i as i64))
        .collect();
    let ops: Vec<Json> = payments
        .iter()
        .map(|(id, amount)| {
            json!({"op": "insert", "table": "order_payment", "row": payment(order, id, *amount)})
        })
        .collect();
    http.batch(edge, Json::Array(ops)).expect(200);
    payments
}

/// The edge's payments and the hub's payments for its branch are the same rows: same ids,
/// each once, same order, amount, method and seq (the edge's log order). Also checks the
/// hub's grouped count and sum for the branch. Returns the number of payments.
fn assert_payments_at_hub(http: &Http, hub: &HubProcess, edge: &EdgeProcess) -> usize {
    let branch = edge.branch();
    let at_edge = http.edge_rows(edge, "order_payment");
    let at_hub = http.counted_hub_rows(hub, json!({"table": "order_payment", "branch": branch}));
    let edge_ids: BTreeSet<&String> = at_edge.keys().collect();
    let hub_ids: BTreeSet<&String> = at_hub.keys().map(|(_, id)| id).collect();
    assert_eq!(hub_ids.len(), at_hub.len(), "each payment once at the hub");
    let missing: Vec<_> = edge_ids.difference(&hub_ids).collect();
    let extra: Vec<_> = hub_ids.difference(&edge_ids).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{branch}: payments missing at the hub {missing:?}, not at the edge {extra:?}"
    );
    for (id, row) in &at_edge {
        let h = &at_hub[&(branch.to_owned(), id.clone())];
        assert_eq!(h["branch"], branch, "{h}");
        for col in ["order_id", "method", "amount", "seq", "version"] {
            assert_eq!(
                h[col], row[col],
                "{branch} payment {id} {col}: hub {h}, edge {row}"
            );
        }
    }
    assert_hub_payment_totals(http, hub, branch, &at_edge);
    at_edge.len()
}

// ---------------------------------------------------------------------------------------------
// 1. Exactly once from two branches
// ---------------------------------------------------------------------------------------------

#[test]
fn two_edges_reach_the_hub_exactly_once() {
    let http = Http::new();
    let hub = HubProcess::start();
    let b1 = EdgeProcess::start_synced("B001", &hub, &[]);
    let b2 = EdgeProcess::start_synced("B002", &hub, &[]);

    // What each branch wrote: (branch, payment id) -> amount.
    let mut written: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut retried = Vec::new();
    for (edge, orders) in [(&b1, 12), (&b2, 9)] {
        let branch = edge.branch().to_owned();
        for o in 0..orders {
            let order = format!("{branch}-o{o:02}");
            open_order(&http, edge, &order, 1 + o % 3, 1250);
            for p in 0..2 {
                let id = format!("{order}-p{p}");
                let amount = 1000 + 37 * o + p;
                let stored = pay(&http, edge, &order, &id, amount);
                assert_eq!(stored["amount"], amount, "{stored}");
                if o == 3 && p == 1 {
                    // A terminal that lost the answer sends the same payment again.
                    let again = http
                        .insert(edge, "order_payment", payment(&order, &id, amount))
                        .expect(200);
                    assert_eq!(again, stored, "a retried payment answers the stored row");
                    retried.push((branch.clone(), id.clone()));
                }
                written.insert((branch.clone(), id), amount);
            }
            if o % 4 == 1 {
                // A state change too: the order is taken back.
                let version =
                    uint(&http.get_row(edge, "order_header", &order).expect(200)["version"]);
                http.patch(
                    edge,
                    "order_header",
                    &order,
                    version,
                    json!({"status": "cancelled"}),
                )
                .expect(200);
            }
        }
    }
    assert_eq!(retried.len(), 2);

    let lasts = wait_synced(&http, &hub, &[&b1, &b2]);
    let health = http
        .send(Method::GET, &hub.url("/healthz"), None, Body::Empty)
        .expect(200);
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["branches"], 2, "{health}");

    // Count and sum per branch at the hub equal what each branch wrote.
    let grouped = http
        .hub_query(
            &hub,
            json!({"table": "order_payment", "groupBy": ["branch"],
                "aggregates": [{"fn": "count", "as": "n"}, {"fn": "sum", "field": "amount", "as": "total"}]}),
        )
        .expect(200);
    let mut groups: Vec<Json> = grouped["rows"].as_array().expect("rows").clone();
    groups.sort_by(|a, b| a["branch"].as_str().cmp(&b["branch"].as_str()));
    let want: Vec<Json> = ["B001", "B002"]
        .iter()
        .map(|b| {
            let mine: Vec<i64> = written
                .iter()
                .filter(|((br, _), _)| br == b)
                .map(|(_, a)| *a)
                .collect();
            json!({"branch": b, "n": mine.len(), "total": mine.iter().sum::<i64>()})
        })
        .collect();
    assert_eq!(groups, want, "{grouped}");

    // Every payment exactly once, with its amount, and nothing else.
    let at_hub = http.counted_hub_rows(&hub, json!({"table": "order_payment"}));
    let got: BTreeMap<(String, String), i64> = at_hub
        .iter()
        .map(|(k, row)| (k.clone(), int(&row["amount"])))
        .collect();
    assert_eq!(got, written);
    for (branch, id) in &retried {
        let rows = http
            .hub_query(&hub, json!({"table": "order_payment", "where": {"id": id}}))
            .expect(200);
        assert_eq!(rows["meta"]["count"], 1, "the retried payment once: {rows}");
        assert_eq!(rows["rows"][0]["branch"], json!(branch), "{rows}");
    }

    // Per branch: the hub's rows are the edge's rows (log order included), orders converge.
    for edge in [&b1, &b2] {
        assert_payments_at_hub(&http, &hub, edge);
        let orders = http.edge_rows(edge, "order_header");
        let hub_orders = http.counted_hub_rows(
            &hub,
            json!({"table": "order_header", "branch": edge.branch()}),
        );
        assert_eq!(hub_orders.len(), orders.len());
        for (id, row) in &orders {
            let h = &hub_orders[&(edge.branch().to_owned(), id.clone())];
            for col in ["version", "status", "total_amount", "paid_amount"] {
                assert_eq!(h[col], row[col], "order {id} {col}: hub {h}, edge {row}");
            }
        }
    }

    // The hub stored each entry once: what it persisted is exactly the two logs.
    assert_eq!(
        http.hub_metric(&hub, "outpost_hub_entries_persisted_total"),
        lasts.iter().sum::<u64>(),
        "entries persisted at the hub vs the branches' logs {lasts:?}"
    );
    assert_eq!(
        http.hub_metric(&hub, "outpost_hub_segments_refused_total"),
        0
    );
    for edge in [&b1, &b2] {
        let info = http.branch_info(&hub, edge.branch());
        assert_eq!(info["connected"], true, "{info}");
        assert_eq!(info["revoked"], false, "{info}");
        assert!(!text(&info["chain_head"]).is_empty(), "{info}");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Head-office menu rows: to every branch, to one branch, and into a terminal's live feed
// ---------------------------------------------------------------------------------------------

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next JSON text frame.
fn next_frame(http: &Http, ws: &mut Ws) -> Json {
    http.block_on(async {
        loop {
            let msg = tokio::time::timeout(FRAME_DEADLINE, ws.next())
                .await
                .expect("a frame within the deadline")
                .expect("the socket is open")
                .expect("a frame");
            match msg {
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("a JSON frame ({e}): {t}"));
                }
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
    })
}

/// Whether a delta's change of `menu_item` `id` carries `price`.
fn carries_price(change: &Json, id: &str, price: i64) -> bool {
    change["table"] == "menu_item"
        && change["id"] == id
        && (change["row"]["price"] == price || change["set"]["price"] == price)
}

#[test]
fn menu_price_reaches_the_right_edges_and_their_feeds() {
    let http = Http::new();
    let hub = HubProcess::start();
    let b1 = EdgeProcess::start_synced("B001", &hub, &[]);
    let b2 = EdgeProcess::start_synced("B002", &hub, &[]);
    let burger = |price: i64| json!({"name": "Burger", "price": price, "category_id": "mains", "station_id": "grill", "active": true});

    // m1 for every branch.
    let put = http
        .hub_put(&hub, "menu_item", "m1", None, burger(1250))
        .expect(200);
    assert_eq!(put["row"]["id"], "m1", "{put}");
    assert_eq!(put["row"]["price"], 1250, "{put}");
    let reached: BTreeSet<&str> = put["branches"]
        .as_array()
        .expect("branches")
        .iter()
        .map(text)
        .collect();
    assert_eq!(reached, BTreeSet::from(["B001", "B002"]), "{put}");
    for edge in [&b1, &b2] {
        wait_until(
            &format!("menu_item m1 at {}", edge.branch()),
            || http.get_row(edge, "menu_item", "m1").status == 200,
            || sync_context(&http, &hub, edge),
        );
        let row = http.get_row(edge, "menu_item", "m1").expect(200);
        assert_eq!(row["price"], 1250, "{row}");
        assert_eq!(row["name"], "Burger", "{row}");
    }

    // m2 for B001 only.
    let put = http
        .hub_put(
            &hub,
            "menu_item",
            "m2",
            Some("B001"),
            json!({"name": "Local special", "price": 990, "category_id": "mains", "station_id": "grill", "active": true}),
        )
        .expect(200);
    assert_eq!(put["branches"], json!(["B001"]), "{put}");
    wait_until(
        "menu_item m2 at B001",
        || http.get_row(&b1, "menu_item", "m2").status == 200,
        || sync_context(&http, &hub, &b1),
    );
    assert_eq!(
        http.get_row(&b1, "menu_item", "m2").expect(200)["price"],
        990
    );
    // B002 has applied everything in its feed (m1 at least): m2's absence there means it
    // was never sent, not that it is still on its way.
    wait_until(
        "B002 has acknowledged its whole feed",
        || {
            let info = http.branch_info(&hub, "B002");
            uint(&info["feed_seq"]) > 0 && info["feed_acked_seq"] == info["feed_seq"]
        },
        || sync_context(&http, &hub, &b2),
    );
    let absent = http.get_row(&b2, "menu_item", "m2");
    assert_eq!(absent.status, 404, "m2 is B001's only: {}", absent.text);
    let m2_at_hub =
        http.counted_hub_rows(&hub, json!({"table": "menu_item", "where": {"id": "m2"}}));
    assert_eq!(
        m2_at_hub.keys().cloned().collect::<Vec<_>>(),
        vec![("B001".to_owned(), "m2".to_owned())]
    );

    // A terminal at B001 watching the menu sees a new price arrive from head office.
    let url = format!("ws://{}/ws?token={}", b1.http_addr(), b1.admin_token());
    let mut ws: Ws = http.block_on(async {
        let (ws, _) = tokio::time::timeout(FRAME_DEADLINE, tokio_tungstenite::connect_async(url))
            .await
            .expect("the WebSocket handshake within the deadline")
            .expect("the WebSocket handshake");
        ws
    });
    let subscribe =
        json!({"type": "subscribe", "sub": "menu", "module": "pos", "tables": ["menu_item"]});
    http.block_on(ws.send(Message::Text(subscribe.to_string().into())))
        .expect("send the subscribe frame");
    let snapshot = next_frame(&http, &mut ws);
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    assert_eq!(snapshot["sub"], "menu", "{snapshot}");
    let items = snapshot["rows"]["menu_item"].as_array().expect("menu rows");
    let m1 = items
        .iter()
        .find(|r| r["id"] == "m1")
        .unwrap_or_else(|| panic!("m1 in the snapshot: {snapshot}"));
    assert_eq!(m1["price"], 1250, "{snapshot}");
    assert!(items.iter().any(|r| r["id"] == "m2"), "{snapshot}");
    let mut version = uint(&snapshot["version"]);

    http.hub_put(&hub, "menu_item", "m1", None, burger(1500))
        .expect(200);
    loop {
        let frame = next_frame(&http, &mut ws);
        assert_eq!(frame["type"], "delta", "{frame}");
        assert_eq!(
            uint(&frame["base"]),
            version,
            "deltas are gap-free: {frame}"
        );
        version = uint(&frame["version"]);
        let changes = frame["changes"].as_array().expect("changes");
        if changes.iter().any(|c| carries_price(c, "m1", 1500)) {
            break;
        }
    }
    assert_eq!(
        http.get_row(&b1, "menu_item", "m1").expect(200)["price"],
        1500
    );
    wait_until(
        "the new m1 price at B002",
        || http.get_row(&b2, "menu_item", "m1").body["price"] == 1500,
        || sync_context(&http, &hub, &b2),
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Offline-first: the hub dies, the branch keeps serving, everything arrives later
// ---------------------------------------------------------------------------------------------

#[test]
fn offline_first_then_everything_arrives() {
    let http = Http::new();
    let mut hub = HubProcess::start();
    let edge = EdgeProcess::start_synced("B001", &hub, &[]);
    open_order(&http, &edge, "o-before", 2, 1250);
    pay(&http, &edge, "o-before", "p-before", 2500);
    wait_synced(&http, &hub, &[&edge]);
    assert_eq!(http.healthz(&edge)["hub"], "connected");

    hub.kill9();
    // The branch keeps serving while the hub is gone, before and after it notices.
    let mut n = 0;
    let mut write_some = |count: usize| {
        for _ in 0..count {
            let order = format!("o-off{n:03}");
            open_order(&http, &edge, &order, 1, 800);
            pay(&http, &edge, &order, &format!("{order}-p1"), 300);
            pay(&http, &edge, &order, &format!("{order}-p2"), 500);
            n += 1;
        }
    };
    write_some(15);
    wait_until(
        "the edge notices the hub is gone",
        || http.healthz(&edge)["hub"] == "disconnected",
        || {
            format!(
                "healthz: {}\nedge log:\n{}",
                http.describe(&edge.url("/healthz"), None),
                tail(&edge.log(), 20)
            )
        },
    );
    write_some(15);
    let health = http.healthz(&edge);
    assert_eq!(health["hub"], "disconnected", "{health}");
    assert!(uint(&health["unsynced"]) > 0, "{health}");
    assert_eq!(
        uint(&health["unsynced"]),
        uint(&health["last_seq"]) - uint(&health["synced_seq"]),
        "{health}"
    );

    hub.restart();
    wait_synced(&http, &hub, &[&edge]);
    assert_eq!(http.healthz(&edge)["unsynced"], 0);
    let payments = assert_payments_at_hub(&http, &hub, &edge);
    assert_eq!(payments, 1 + 2 * 30);
    // The edge tells the hub its backlog is gone (the dashboard's sync lag).
    wait_until(
        "the edge reports an empty backlog",
        || {
            let b = http.branch_info(&hub, "B001");
            b["unsynced_reported"] == 0 && b["oldest_unsynced_payment"].is_null()
        },
        || format!("{}", http.branch_info(&hub, "B001")),
    );
}

/// What an edge reports of its backlog (`Frame::Status`) reaches head office, with the age
/// of the oldest unsynced payment growing from the time the edge gave. A raw QUIC client
/// with the branch's enrolled identity plays the edge, so the backlog is exactly known.
#[test]
fn backlog_report_reaches_head_office() {
    use shared::wire::{Frame, FrameReader, HUB_SERVER_NAME, PROTOCOL_VERSION, Position};
    let http = Http::new();
    let hub = HubProcess::start();
    let dir = hub.root().join("id-B007");
    hub.enroll("B007", &dir);
    let identity = edge::identity::EdgeIdentity::load(&dir).expect("the enrolled identity");
    let taken = shared::Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_micros() as i64
            - 90_000_000,
    );
    // The connection stays open (driven by the runtime the HTTP calls below run on) until
    // the hub shows the report.
    let _link = http.block_on(async {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(identity.client_config().unwrap());
        let conn = endpoint
            .connect(hub.quic_addr(), HUB_SERVER_NAME)
            .unwrap()
            .await
            .expect("the hub admits its enrolled branch");
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let origin = shared::OriginId::parse("B007").unwrap();
        let hello = Frame::Hello {
            protocol: PROTOCOL_VERSION,
            software: "0.1.0".into(),
            vector: vec![Position::genesis(&origin)],
        };
        send.write_all(&hello.encode()).await.unwrap();
        let mut reader = FrameReader::default();
        let welcome = loop {
            if let Some(f) = reader.next_frame().expect("the hub's frames decode") {
                break f;
            }
            let chunk = recv
                .read_chunk(64 * 1024, true)
                .await
                .unwrap()
                .expect("a welcome");
            reader.push(&chunk.bytes);
        };
        assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
        let status = Frame::Status {
            unsynced: 7,
            oldest_unsynced_payment: Some(taken.0),
        };
        send.write_all(&status.encode()).await.unwrap();
        (endpoint, conn, send, recv)
    });
    wait_until(
        "head office sees the branch's backlog",
        || http.branch_info(&hub, "B007")["unsynced_reported"] == 7,
        || format!("{}", http.branch_info(&hub, "B007")),
    );
    let b = http.branch_info(&hub, "B007");
    assert_eq!(b["oldest_unsynced_payment"], taken.to_rfc3339(), "{b}");
    let age = b["oldest_unsynced_payment_age_s"].as_f64().expect("an age");
    assert!(
        age >= 90.0,
        "the payment was taken 90 s before the report: {b}"
    );
    // The dashboard lists the field.
    let page = http.send(Method::GET, &hub.url("/"), None, Body::Empty);
    assert!(
        page.text.contains("oldest unsynced payment"),
        "{}",
        page.text
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Resume, not restart: a hub crash in the middle of a catch-up
// ---------------------------------------------------------------------------------------------

#[test]
fn resume_not_restart() {
    const BATCHES: usize = 20;
    const PER_BATCH: usize = 100;
    let http = Http::new();
    let mut hub = HubProcess::start();
    // The hub is down from the start: the branch's log piles up in sealed segments.
    hub.kill9();
    let edge = EdgeProcess::start_synced("B001", &hub, &[]);
    open_order(&http, &edge, "o1", 1, 100);
    let mut written = Vec::new();
    for b in 0..BATCHES {
        written.extend(pay_batch(
            &http,
            &edge,
            "o1",
            &format!("p{b:02}"),
            PER_BATCH,
        ));
    }
    let health = http.healthz(&edge);
    let last = uint(&health["last_seq"]);
    assert_eq!(uint(&health["synced_seq"]), 0, "{health}");
    assert!(last > (BATCHES * PER_BATCH) as u64, "{health}");

    // The hub comes back; once it has stored part of the log (with luck, not all of it yet),
    // it dies again. `held` is read just before the kill: the hub held at least that much
    // durably when it died.
    hub.restart();
    let mut held = 0;
    wait_until(
        "the hub holds part of the branch's log",
        || {
            held = uint(&http.branch_info(&hub, "B001")["synced_seq"]);
            held > 0
        },
        || sync_context(&http, &hub, &edge),
    );
    let reconnects = http.edge_metric(&edge, "outpost_sync_reconnects_total");
    hub.kill9();
    // The edge's connection ends (at its QUIC idle timeout: a killed hub sends no close; its
    // healthz says "disconnected" earlier, once acks stall). Whatever the edge sent until
    // then went to that connection; everything it sends from now on goes to the next one.
    wait_until(
        "the edge's connection to the killed hub has ended",
        || http.edge_metric(&edge, "outpost_sync_reconnects_total") > reconnects,
        || tail(&edge.log(), 20),
    );
    assert_ne!(http.healthz(&edge)["hub"], "connected");
    let sent_before = http.edge_metric(&edge, "outpost_sync_entries_sent_total");
    let connects_before = http.edge_metric(&edge, "outpost_sync_connects_total");
    hub.restart();
    let lasts = wait_synced(&http, &hub, &[&edge]);
    assert_eq!(lasts, [last], "nothing was written meanwhile");

    let counters = || {
        let edge_counters = [
            "outpost_sync_entries_sent_total",
            "outpost_sync_segments_sent_total",
            "outpost_sync_segments_rejected_total",
            "outpost_sync_connects_total",
            "outpost_sync_reconnects_total",
        ]
        .map(|m| format!("{m} {}", http.edge_metric(&edge, m)));
        let hub_counters = [
            "outpost_hub_segments_persisted_total",
            "outpost_hub_entries_persisted_total",
            "outpost_hub_segments_refused_total",
        ]
        .map(|m| format!("{m} {}", http.hub_metric(&hub, m)));
        format!(
            "log of {last}, the hub held {held} when it died, the edge had sent {sent_before} \
             entries before; edge: {edge_counters:?}\nhub since its restart: {hub_counters:?}\n{}",
            sync_context(&http, &hub, &edge)
        )
    };
    let sent = http.edge_metric(&edge, "outpost_sync_entries_sent_total");
    assert!(
        sent >= last,
        "every entry went out at least once; {}",
        counters()
    );
    // At most one new connection (none if the hub had the whole log when it died).
    let connects = http.edge_metric(&edge, "outpost_sync_connects_total");
    assert!(
        connects <= connects_before + 1,
        "{connects} connections; {}",
        counters()
    );
    // Resume, not restart: the new connection carried only what the hub did not hold (at
    // most `last - held`), never the whole history (`last`), and the restarted hub stored
    // only that. If the kill landed after the hub had the whole log, nothing at all was sent
    // or stored after the restart. (The edge's total also counts what it sent to the dead
    // connection before its idle timeout; that is not a resend over a reconnect.)
    assert!(
        sent - sent_before <= last - held,
        "the edge sent {} entries after reconnecting; {}",
        sent - sent_before,
        counters()
    );
    let persisted = http.hub_metric(&hub, "outpost_hub_entries_persisted_total");
    assert!(
        persisted <= last - held,
        "the restarted hub stored {persisted} entries; {}",
        counters()
    );

    let payments = assert_payments_at_hub(&http, &hub, &edge);
    assert_eq!(payments, written.len());
    let at_hub = http.counted_hub_rows(&hub, json!({"table": "order_payment", "branch": "B001"}));
    for (id, amount) in &written {
        assert_eq!(
            at_hub[&("B001".to_owned(), id.clone())]["amount"],
            *amount,
            "{id}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Integrity: a corrupted segment is refused, reported and re-sent, never stored
// ---------------------------------------------------------------------------------------------

#[test]
fn corrupted_segment_is_rejected_and_resent() {
    let http = Http::new();
    let hub = HubProcess::start();
    let edge = EdgeProcess::start_synced("B001", &hub, &[("OUTPOST_FAULT_CORRUPT_SEGMENT", "1")]);
    let mut written = BTreeMap::new();
    for o in 0..10 {
        let order = format!("o{o:02}");
        open_order(&http, &edge, &order, 2, 1250);
        for p in 0..3 {
            let id = format!("{order}-p{p}");
            let amount = 700 + 11 * o + p;
            pay(&http, &edge, &order, &id, amount);
            written.insert(id, amount);
        }
    }
    let lasts = wait_synced(&http, &hub, &[&edge]);

    assert!(
        edge.log().contains("test hook: corrupting segment 1"),
        "the fault hook fired:\n{}",
        tail(&edge.log(), 30)
    );
    assert!(http.hub_metric(&hub, "outpost_hub_segments_refused_total") >= 1);
    assert!(http.edge_metric(&edge, "outpost_sync_segments_rejected_total") >= 1);
    // Only verified segments were stored, each entry once.
    assert_eq!(
        http.hub_metric(&hub, "outpost_hub_entries_persisted_total"),
        lasts[0]
    );
    assert_payments_at_hub(&http, &hub, &edge);
    let at_hub = http.counted_hub_rows(&hub, json!({"table": "order_payment", "branch": "B001"}));
    let got: BTreeMap<String, i64> = at_hub
        .iter()
        .map(|((_, id), row)| (id.clone(), int(&row["amount"])))
        .collect();
    assert_eq!(got, written);
}

// ---------------------------------------------------------------------------------------------
// 6. Security: foreign identities, another branch's identity, revocation
// ---------------------------------------------------------------------------------------------

#[test]
fn edge_with_another_hubs_identity_never_connects() {
    let http = Http::new();
    let hub = HubProcess::start();
    let other = HubProcess::start();
    // The hub knows B001, but this edge's identity comes from another hub's CA.
    hub.enroll("B001", &hub.root().join("b001-unused"));
    let foreign = other.root().join("b001-foreign");
    other.enroll("B001", &foreign);
    let edge = EdgeProcess::start_with_identity("B001", hub.quic_addr(), &foreign, &[]);

    open_order(&http, &edge, "o1", 1, 1250);
    pay(&http, &edge, "o1", "p1", 1250);
    wait_until(
        "the edge has tried to connect at least twice",
        || http.edge_metric(&edge, "outpost_sync_reconnects_total") >= 2,
        || sync_context(&http, &hub, &edge),
    );
    let refused = || {
        http.hub_metric(&hub, "outpost_hub_refused_connections_total") >= 1
            || hub
                .log()
                .lines()
                .any(|l| l.contains("handshake") && l.contains("failed"))
    };
    wait_until("the hub reports a refused connection", refused, || {
        tail(&hub.log(), 30)
    });

    let health = http.healthz(&edge);
    assert_ne!(health["hub"], "connected", "{health}");
    assert_eq!(health["synced_seq"], 0, "{health}");
    assert_eq!(
        http.edge_metric(&edge, "outpost_sync_connects_total"),
        0,
        "no handshake completed"
    );
    let info = http.branch_info(&hub, "B001");
    assert_eq!(info["connected"], false, "{info}");
    assert_eq!(info["synced_seq"], 0, "{info}");
    assert_eq!(
        http.hub_query(&hub, json!({"table": "order_payment"}))
            .expect(200)["meta"]["count"],
        0
    );
    assert_eq!(
        http.hub_metric(&hub, "outpost_hub_entries_persisted_total"),
        0
    );
}

/// Kills a child process when dropped (a failed assertion must not leave it running).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn edge_refuses_to_start_with_another_branchs_identity() {
    let hub = HubProcess::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let identity = dir.path().join("b001");
    hub.enroll("B001", &identity);
    let child = Command::new(edge_binary())
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--branch", "B002", "--http", "127.0.0.1:0"])
        .args(["--hub", &hub.quic_addr().to_string()])
        .arg("--identity")
        .arg(&identity)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start outpost-edge");
    let mut child = Reaped(child);
    let deadline = Instant::now() + SYNC_DEADLINE;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("the child's status") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "an edge started as B002 with B001's identity kept running"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(
        child.0.stderr.as_mut().expect("stderr is piped"),
        &mut stderr,
    )
    .expect("read stderr");
    assert_eq!(
        status.code(),
        Some(2),
        "exit status {status}; stderr:\n{stderr}"
    );
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.contains("B001") && last.contains("B002"),
        "the error names both branches: {stderr}"
    );
    assert!(
        hub.log().lines().all(|l| !l.contains("edge connected")),
        "{}",
        hub.log()
    );
    // Nothing is listening for it either.
    let ports = std::fs::read_to_string(dir.path().join("data").join("ports.json"));
    if let Ok(p) = ports {
        let p: Json = serde_json::from_str(&p).expect("ports.json");
        let addr = text(&p["http"]).to_owned();
        assert!(
            TcpStream::connect(&addr).is_err(),
            "the refused edge still serves on {addr}"
        );
    }
}

#[test]
fn revoked_branch_is_cut_off() {
    let http = Http::new();
    let hub = HubProcess::start();
    let edge = EdgeProcess::start_synced("B001", &hub, &[]);
    open_order(&http, &edge, "o1", 2, 1250);
    pay(&http, &edge, "o1", "p1", 1000);
    wait_synced(&http, &hub, &[&edge]);

    hub.revoke("B001").expect("revoke B001");
    wait_until(
        "the revoked edge is disconnected",
        || {
            http.healthz(&edge)["hub"] != "connected"
                && http.branch_info(&hub, "B001")["connected"] == false
        },
        || sync_context(&http, &hub, &edge),
    );
    let held = uint(&http.branch_info(&hub, "B001")["synced_seq"]);
    let reconnects = http.edge_metric(&edge, "outpost_sync_reconnects_total");

    // The branch keeps serving, but nothing more reaches the hub.
    pay(&http, &edge, "o1", "p2", 1500);
    open_order(&http, &edge, "o2", 1, 990);
    pay(&http, &edge, "o2", "p3", 990);
    wait_until(
        "the revoked edge has tried again twice",
        || http.edge_metric(&edge, "outpost_sync_reconnects_total") >= reconnects + 2,
        || sync_context(&http, &hub, &edge),
    );
    let health = http.healthz(&edge);
    assert_ne!(health["hub"], "connected", "{health}");
    assert!(uint(&health["last_seq"]) > held, "{health}");
    assert!(uint(&health["unsynced"]) > 0, "{health}");
    let info = http.branch_info(&hub, "B001");
    assert_eq!(info["revoked"], true, "{info}");
    assert_eq!(info["connected"], false, "{info}");
    assert_eq!(uint(&info["synced_seq"]), held, "{info}");
    assert!(http.hub_metric(&hub, "outpost_hub_refused_connections_total") >= 1);
    let at_hub = http.counted_hub_rows(&hub, json!({"table": "order_payment", "branch": "B001"}));
    let ids: Vec<&str> = at_hub.keys().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids, ["p1"], "only the payment from before the revocation");
}

// ---------------------------------------------------------------------------------------------
// 7. Head-office API errors
// ---------------------------------------------------------------------------------------------

#[test]
fn hub_api_errors() {
    let http = Http::new();
    let hub = HubProcess::start();
    let identity = tempfile::tempdir().expect("a temporary directory");
    hub.enroll("B001", identity.path());
    let before = http.branches(&hub);
    assert_eq!(before.len(), 1, "{before:?}");

    let token = Some(hub.admin_token());
    let put_url = |table: &str, id: &str| hub.url(&format!("/api/modules/pos/tables/{table}/{id}"));
    let item = json!({"name": "Burger", "price": 1250, "category_id": "mains", "station_id": "grill", "active": true});

    // Authentication.
    for (who, t) in [("no token", None), ("a wrong token", Some("not-the-token"))] {
        for (method, url) in [
            (Method::GET, hub.url("/api/branches")),
            (Method::POST, hub.url("/api/query")),
            (Method::PUT, put_url("menu_item", "m1")),
        ] {
            let r = http.send(method.clone(), &url, t, Body::Json(item.clone()));
            assert_eq!(r.status, 401, "{method} {url} with {who}: {}", r.text);
            assert_eq!(r.code(), "unauthorized", "{}", r.text);
        }
    }

    // Writes head office may not make, or that name nothing.
    let cases: Vec<(&str, String, Body, u16, &str)> = vec![
        (
            "a branch-owned table",
            put_url("order_header", "o1"),
            Body::Json(json!({"table_id": "T1"})),
            403,
            "not_hub_owned",
        ),
        (
            "a branch-owned log table",
            put_url("order_payment", "p1"),
            Body::Json(json!({"order_id": "o1", "method": "card", "amount": 100})),
            403,
            "not_hub_owned",
        ),
        (
            "an unknown table",
            put_url("no_such_table", "x1"),
            Body::Json(item.clone()),
            404,
            "unknown_table",
        ),
        (
            "an unknown column",
            put_url("menu_item", "m1"),
            Body::Json(json!({"name": "Burger", "colour": "red"})),
            400,
            "unknown_column",
        ),
        (
            "a non-integer price",
            put_url("menu_item", "m1"),
            Body::Json(json!({"name": "Burger", "price": 12.5})),
            400,
            "invalid_value",
        ),
        (
            "a branch that is not enrolled",
            format!("{}?branch=B999", put_url("menu_item", "m1")),
            Body::Json(item.clone()),
            404,
            "unknown_branch",
        ),
        (
            "malformed JSON",
            put_url("menu_item", "m1"),
            Body::Raw(b"{\"name\": \"Burger\", ".to_vec()),
            400,
            "malformed_json",
        ),
    ];
    for (what, url, body, status, code) in cases {
        let r = http.send(Method::PUT, &url, token, body);
        assert_eq!(r.status, status, "PUT {what}: {}", r.text);
        assert_eq!(r.code(), code, "PUT {what}: {}", r.text);
        assert!(r.body["message"].is_string(), "PUT {what}: {}", r.text);
    }

    // Queries that name nothing, or are not JSON.
    let queries: Vec<(&str, Body, u16, &str)> = vec![
        (
            "an unknown table",
            Body::Json(json!({"table": "no_such_table"})),
            404,
            "unknown_table",
        ),
        (
            "an unknown column in where",
            Body::Json(json!({"table": "order_payment", "where": {"colour": "red"}})),
            400,
            "unknown_column",
        ),
        (
            "an unknown column in select",
            Body::Json(json!({"table": "order_payment", "select": ["colour"]})),
            400,
            "unknown_column",
        ),
        (
            "an unknown groupBy column",
            Body::Json(json!({"table": "order_payment", "groupBy": ["colour"]})),
            400,
            "unknown_column",
        ),
        (
            "a sum over text",
            Body::Json(
                json!({"table": "order_payment", "aggregates": [{"fn": "sum", "field": "method", "as": "s"}]}),
            ),
            400,
            "bad_aggregate",
        ),
        (
            "malformed JSON",
            Body::Raw(b"{\"table\": ".to_vec()),
            400,
            "malformed_json",
        ),
    ];
    for (what, body, status, code) in queries {
        let r = http.send(Method::POST, &hub.url("/api/query"), token, body);
        assert_eq!(r.status, status, "query with {what}: {}", r.text);
        assert_eq!(r.code(), code, "query with {what}: {}", r.text);
    }

    // Nothing changed, nothing was stored, and the hub is fine.
    assert_eq!(http.branches(&hub), before);
    assert_eq!(
        http.hub_query(&hub, json!({"table": "menu_item"}))
            .expect(200)["meta"]["count"],
        0
    );
    let health = http
        .send(Method::GET, &hub.url("/healthz"), None, Body::Empty)
        .expect(200);
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["branches"], 1, "{health}");
}

/// `GET path` on a keep-alive connection; the answer's status and body, or `None` if the
/// server closed the connection instead of answering.
fn raw_get(tcp: &mut TcpStream, path: &str) -> Option<(u16, String)> {
    use std::io::{BufRead, BufReader, Read, Write};
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("a read timeout");
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nhost: hub\r\n\r\n").as_bytes())
        .ok()?;
    let mut reader = BufReader::new(tcp);
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let status = line.get(9..12)?.parse().ok()?;
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((status, String::from_utf8(body).ok()?))
}

/// The head-office API runs on the edge's HTTP server, with its limits: connections beyond
/// the cap are answered 503 `too_many_connections` and closed, a closed connection gives its
/// slot back, and `/metrics` counts both.
#[test]
fn the_hub_caps_its_http_connections() {
    let hub = HubProcess::start_with_env(&[
        ("OUTPOST_HTTP_CONNECTIONS_MAX", "2"),
        ("OUTPOST_HTTP_CONNECTIONS_PER_CLIENT", "10"),
    ]);
    let connect = || TcpStream::connect(hub.http_addr()).expect("a connection to the hub");
    let mut a = connect();
    assert_eq!(raw_get(&mut a, "/healthz").map(|r| r.0), Some(200));
    let mut b = connect();
    assert_eq!(raw_get(&mut b, "/healthz").map(|r| r.0), Some(200));

    let mut over = connect();
    let (status, body) = raw_get(&mut over, "/healthz").expect("an answer over the cap");
    assert_eq!(status, 503, "{body}");
    let body: Json = serde_json::from_str(&body).expect("a JSON error");
    assert_eq!(body["error"], "too_many_connections");

    // `a` closes: its slot comes back once the hub has seen it go.
    drop(a);
    let mut refused = 1;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut c = loop {
        let mut c = connect();
        match raw_get(&mut c, "/metrics") {
            Some((200, page)) => break (c, page),
            Some((503, _)) | None => refused += 1,
            Some(other) => panic!("GET /metrics: {other:?}"),
        }
        assert!(Instant::now() < deadline, "no slot came back");
        std::thread::sleep(Duration::from_millis(5));
    };
    let metric = |page: &str, name: &str| -> u64 {
        page.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{page}"))
    };
    let page = c.1;
    assert_eq!(metric(&page, "outpost_http_connections"), 2);
    assert_eq!(
        metric(&page, "outpost_http_connections_refused_total"),
        refused
    );
    assert_eq!(raw_get(&mut b, "/healthz").map(|r| r.0), Some(200));
    assert_eq!(raw_get(&mut c.0, "/healthz").map(|r| r.0), Some(200));
}
