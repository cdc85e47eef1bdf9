//! End-to-end tests of the edge's terminal HTTP API (CONTRACT.md section 2) against the real
//! `outpost-edge` binary: concurrency (no lost update, compare-and-set), idempotent payment
//! retries, a table of bad requests with their status and error code, role permissions,
//! durability of acknowledged writes across kill -9, queries and event paging.
//!
//! Every test starts its own edge on its own data dir. Nothing waits on a timer: the tests
//! wait on responses, on counters of acknowledged writes, and on the harness's polling of
//! `ports.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::{Client, Method, StatusCode};
use serde_json::{Value as Json, json};
use tests::{Body, EdgeProcess, Reply};
use tokio::sync::{Barrier, Mutex, watch};

// ---------------------------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------------------------

/// A safety net against a hung server turning into a hung test; not a timing assertion.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

fn client() -> Client {
    Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("an HTTP client")
}

/// Who sends a request.
#[derive(Clone, Copy)]
enum Who<'a> {
    /// `Authorization: Bearer TOKEN`.
    Bearer(&'a str),
    /// This exact `Authorization` header.
    Header(&'a str),
    /// No `Authorization` header.
    Nobody,
}

async fn try_send(
    client: &Client,
    method: Method,
    url: &str,
    who: Who<'_>,
    body: Body,
) -> Result<Reply, reqwest::Error> {
    let mut req = client.request(method, url);
    req = match who {
        Who::Bearer(t) => req.bearer_auth(t),
        Who::Header(h) => req.header(reqwest::header::AUTHORIZATION, h),
        Who::Nobody => req,
    };
    Reply::read(body.attach(req).send().await?).await
}

async fn send(client: &Client, method: Method, url: &str, who: Who<'_>, body: Body) -> Reply {
    let what = format!("{method} {url}");
    try_send(client, method, url, who, body)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A terminal: an HTTP client with one role's token, talking to one edge run.
#[derive(Clone)]
struct Terminal {
    http: Client,
    /// `http://127.0.0.1:PORT`.
    base: String,
    /// The module base `B`.
    module: String,
    token: String,
}

impl Terminal {
    fn new(edge: &EdgeProcess, token: &str) -> Terminal {
        Terminal {
            http: client(),
            base: edge.base_url(),
            module: edge.module_url(),
            token: token.to_owned(),
        }
    }

    async fn try_call(
        &self,
        method: Method,
        url: String,
        body: Body,
    ) -> Result<Reply, reqwest::Error> {
        try_send(&self.http, method, &url, Who::Bearer(&self.token), body).await
    }

    async fn call(&self, method: Method, url: String, body: Body) -> Reply {
        send(&self.http, method, &url, Who::Bearer(&self.token), body).await
    }

    async fn insert(&self, table: &str, row: Json) -> Reply {
        self.call(
            Method::POST,
            format!("{}/tables/{table}", self.module),
            Body::Json(row),
        )
        .await
    }

    async fn get(&self, table: &str, id: &str) -> Reply {
        self.call(
            Method::GET,
            format!("{}/tables/{table}/{id}", self.module),
            Body::Empty,
        )
        .await
    }

    async fn patch(&self, table: &str, id: &str, version: u64, set: Json) -> Reply {
        self.call(
            Method::PATCH,
            format!("{}/tables/{table}/{id}", self.module),
            Body::Json(json!({ "version": version, "set": set })),
        )
        .await
    }

    async fn batch(&self, ops: Json) -> Reply {
        self.call(
            Method::POST,
            format!("{}/batch", self.module),
            Body::Json(json!({ "ops": ops })),
        )
        .await
    }

    async fn query(&self, q: Json) -> Reply {
        self.call(
            Method::POST,
            format!("{}/query", self.module),
            Body::Json(q),
        )
        .await
    }

    /// The rows of a query that must succeed, checking `meta`.
    async fn rows(&self, q: Json) -> Vec<Json> {
        let body = self.query(q.clone()).await.expect(200);
        let rows = body["rows"].as_array().expect("rows").clone();
        assert_eq!(body["meta"]["count"], json!(rows.len()), "{q}: {body}");
        rows
    }

    /// Every row of `table` matching `where`, paging through with `limit`/`offset`.
    async fn all_rows(&self, table: &str, filter: Json) -> Vec<Json> {
        let mut out = Vec::new();
        loop {
            let body = self
                .query(json!({
                    "table": table,
                    "where": filter,
                    "orderBy": [{"field": "id", "direction": "asc"}],
                    "limit": 1000,
                    "offset": out.len(),
                }))
                .await
                .expect(200);
            out.extend(body["rows"].as_array().expect("rows").iter().cloned());
            if body["meta"]["has_more"] != json!(true) {
                return out;
            }
        }
    }

    async fn events(&self, after: u64, limit: u64) -> Json {
        self.call(
            Method::GET,
            format!("{}/events?after={after}&limit={limit}", self.module),
            Body::Empty,
        )
        .await
        .expect(200)
    }

    async fn snapshot(&self) -> Json {
        self.call(Method::GET, self.module.clone(), Body::Empty)
            .await
            .expect(200)
    }

    async fn healthz(&self) -> Json {
        send(
            &self.http,
            Method::GET,
            &format!("{}/healthz", self.base),
            Who::Nobody,
            Body::Empty,
        )
        .await
        .expect(200)
    }

    /// A gauge or counter from `/metrics`.
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

    /// Walks the whole event log with pages of `limit`: every event, and the final `next`.
    async fn all_events(&self, limit: u64) -> (Vec<Json>, u64) {
        let mut after = 0;
        let mut out = Vec::new();
        for _ in 0..100_000 {
            let page = self.events(after, limit).await;
            let events = page["events"].as_array().expect("events");
            assert!(events.len() as u64 <= limit, "page over the limit: {page}");
            out.extend(events.iter().cloned());
            let next = page["next"].as_u64().expect("next");
            assert!(next >= after, "next went backwards: {after} -> {next}");
            after = next;
            if page["has_more"] != json!(true) {
                return (out, after);
            }
        }
        panic!("the event log never ends");
    }
}

/// Asserts a healthy edge of branch B001.
async fn assert_healthy(t: &Terminal) {
    let h = t.healthz().await;
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["role"], "edge", "{h}");
    assert_eq!(h["branch"], "B001", "{h}");
}

fn int(v: &Json) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

fn uint(v: &Json) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("not a non-negative integer: {v}"))
}

fn text(v: &Json) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// Asserts that `row` holds every member of `expected`.
#[track_caller]
fn assert_has(row: &Json, expected: &Json) {
    for (k, v) in expected.as_object().expect("an object") {
        assert_eq!(&row[k], v, "column {k:?} of {row}");
    }
}

/// Creates an order and returns its row.
async fn new_order(t: &Terminal, row: Json) -> Json {
    let body = t.insert("order_header", row).await.expect(201);
    assert_eq!(body["version"], 1, "{body}");
    assert_eq!(body["status"], "open", "{body}");
    body
}

// ---------------------------------------------------------------------------------------------
// Concurrency: no lost update, compare-and-set
// ---------------------------------------------------------------------------------------------

/// Per order, a cashier adds payments while a waiter adds lines and edits the order's notes
/// by compare-and-set, all orders at once. Every payment and line is there at the end, and
/// the order's derived totals count each of them exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_cashiers_and_waiters_lose_no_update() {
    const ORDERS: usize = 20;
    const ROUNDS: i64 = 5;
    let edge = EdgeProcess::start();
    let admin = Terminal::new(&edge, edge.admin_token());

    let amount = |o: usize, r: i64| 100 * (r + 1) + o as i64;
    let quantity = |r: i64| r + 1;
    let price = |o: usize, r: i64| 250 + 10 * o as i64 + r;

    let mut orders = Vec::new();
    for o in 0..ORDERS {
        let order = new_order(
            &admin,
            json!({"id": format!("lu-order-{o}"), "table_id": format!("T{o}")}),
        )
        .await;
        let cashier = Terminal::new(&edge, &edge.mint_token("cashier"));
        let waiter = Terminal::new(&edge, &edge.mint_token("waiter"));
        orders.push((text(&order["id"]).to_owned(), cashier, waiter));
    }

    let start = Arc::new(Barrier::new(2 * ORDERS));
    let conflicts = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (o, (order_id, cashier, waiter)) in orders.iter().cloned().enumerate() {
        let (id, go) = (order_id.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            go.wait().await;
            for r in 0..ROUNDS {
                let row = json!({
                    "id": format!("lu-pay-{o}-{r}"),
                    "order_id": id,
                    "method": if r % 2 == 0 { "cash" } else { "card" },
                    "amount": amount(o, r),
                });
                let stored = cashier
                    .insert("order_payment", row.clone())
                    .await
                    .expect(201);
                assert_has(&stored, &row);
                assert_eq!(stored["version"], 1);
                assert!(stored["seq"].as_u64().is_some(), "a log row has a seq");
            }
        }));
        let (id, go, conflicts) = (order_id, start.clone(), conflicts.clone());
        tasks.push(tokio::spawn(async move {
            go.wait().await;
            for r in 0..ROUNDS {
                let row = json!({
                    "id": format!("lu-line-{o}-{r}"),
                    "order_id": id,
                    "item_id": format!("item-{r}"),
                    "name": format!("dish {r}"),
                    "quantity": quantity(r),
                    "unit_price": price(o, r),
                });
                let stored = waiter.insert("order_line", row.clone()).await.expect(201);
                assert_has(&stored, &row);
                assert_eq!(stored["status"], "queued");
                // Read-modify-write of the order by compare-and-set, retried on conflict.
                let mut version =
                    uint(&waiter.get("order_header", &id).await.expect(200)["version"]);
                let notes = format!("round {r}");
                let mut done = false;
                for _ in 0..1000 {
                    let reply = waiter
                        .patch("order_header", &id, version, json!({"notes": notes}))
                        .await;
                    match reply.status.as_u16() {
                        200 => {
                            assert_eq!(reply.body["notes"], json!(notes));
                            assert_eq!(uint(&reply.body["version"]), version + 1);
                            done = true;
                            break;
                        }
                        409 => {
                            assert_eq!(reply.code(), "version_conflict", "{}", reply.text);
                            let current = uint(&reply.body["current"]["version"]);
                            assert!(current > version, "{}", reply.text);
                            version = current;
                            conflicts.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => panic!("PATCH order: {} {}", reply.status, reply.text),
                    }
                }
                assert!(done, "the notes update never won its compare-and-set");
            }
        }));
    }
    for t in tasks {
        t.await.expect("a client task");
    }

    for (o, (order_id, _, _)) in orders.iter().enumerate() {
        let order = admin.get("order_header", order_id).await.expect(200);
        let total: i64 = (0..ROUNDS).map(|r| quantity(r) * price(o, r)).sum();
        let paid: i64 = (0..ROUNDS).map(|r| amount(o, r)).sum();
        assert_eq!(int(&order["total_amount"]), total, "{order}");
        assert_eq!(int(&order["paid_amount"]), paid, "{order}");
        assert_eq!(
            order["notes"],
            json!(format!("round {}", ROUNDS - 1)),
            "{order}"
        );
        assert_eq!(order["status"], "open", "{order}");
        // +1 per update: each line and each payment changes the totals once, and each notes
        // edit once.
        assert_eq!(uint(&order["version"]), 1 + 3 * ROUNDS as u64, "{order}");

        let lines = admin
            .all_rows("order_line", json!({"order_id": order_id}))
            .await;
        let ids: BTreeSet<&str> = lines.iter().map(|l| text(&l["id"])).collect();
        let want: BTreeSet<String> = (0..ROUNDS).map(|r| format!("lu-line-{o}-{r}")).collect();
        assert_eq!(
            ids,
            want.iter().map(String::as_str).collect(),
            "lines of {order_id}"
        );
        for l in &lines {
            let r: i64 = text(&l["id"]).rsplit('-').next().unwrap().parse().unwrap();
            assert_eq!(int(&l["quantity"]), quantity(r));
            assert_eq!(int(&l["unit_price"]), price(o, r));
        }
        let payments = admin
            .all_rows("order_payment", json!({"order_id": order_id}))
            .await;
        let mut amounts: Vec<i64> = payments.iter().map(|p| int(&p["amount"])).collect();
        amounts.sort_unstable();
        assert_eq!(
            amounts,
            (0..ROUNDS).map(|r| amount(o, r)).collect::<Vec<_>>()
        );
    }
    let all = admin.all_rows("order_header", json!({})).await;
    assert_eq!(all.len(), ORDERS);
    assert_healthy(&admin).await;
    eprintln!(
        "lost-update test: {} compare-and-set conflicts were retried",
        conflicts.load(Ordering::Relaxed)
    );
}

/// Two terminals PATCH the same order with the same version at once: exactly one wins, the
/// other gets 409 `version_conflict` carrying the winner's row.
#[tokio::test(flavor = "multi_thread")]
async fn compare_and_set_has_exactly_one_winner() {
    const ORDERS: usize = 12;
    let edge = EdgeProcess::start();
    let a = Terminal::new(&edge, &edge.mint_token("cashier"));
    let b = Terminal::new(&edge, &edge.mint_token("waiter"));
    for o in 0..ORDERS {
        let order = new_order(&a, json!({"table_id": format!("T{o}")})).await;
        let id = text(&order["id"]).to_owned();
        let go = Arc::new(Barrier::new(2));
        let run = |t: Terminal, notes: &'static str, go: Arc<Barrier>, id: String| {
            tokio::spawn(async move {
                go.wait().await;
                t.patch(
                    "order_header",
                    &id,
                    1,
                    json!({"notes": notes, "customer_name": notes}),
                )
                .await
            })
        };
        let ra = run(a.clone(), "from A", go.clone(), id.clone());
        let rb = run(b.clone(), "from B", go, id.clone());
        let (ra, rb) = (ra.await.unwrap(), rb.await.unwrap());
        let (winner, loser) = match (ra.status.as_u16(), rb.status.as_u16()) {
            (200, 409) => (ra, rb),
            (409, 200) => (rb, ra),
            _ => panic!(
                "expected one 200 and one 409, got {} {} and {} {}",
                ra.status, ra.text, rb.status, rb.text
            ),
        };
        assert_eq!(winner.body["version"], 2, "{}", winner.text);
        assert_eq!(loser.code(), "version_conflict", "{}", loser.text);
        assert!(!text(&loser.body["message"]).is_empty());
        assert_eq!(
            loser.body["current"], winner.body,
            "the conflict carries the winner's row"
        );
        let stored = a.get("order_header", &id).await.expect(200);
        assert_eq!(stored, winner.body);
        assert_eq!(
            stored["notes"], stored["customer_name"],
            "no mix of both writes"
        );

        // A late writer with the old version also loses, and sees the same row.
        let late = b
            .patch("order_header", &id, 1, json!({"notes": "late"}))
            .await;
        assert_eq!(late.status, StatusCode::CONFLICT, "{}", late.text);
        assert_eq!(late.body["current"], winner.body);
        // With the current version it wins.
        let next = b
            .patch("order_header", &id, 2, json!({"notes": "late"}))
            .await
            .expect(200);
        assert_eq!(next["version"], 3);
        assert_eq!(next["customer_name"], winner.body["customer_name"]);
    }
}

// ---------------------------------------------------------------------------------------------
// Idempotent payment retries
// ---------------------------------------------------------------------------------------------

/// A payment POST retried with the same id (a terminal that lost the response) is applied
/// once: 200 with the identical stored row, the order's paid amount unchanged. The same id
/// with different content is 409 `id_conflict`.
#[tokio::test(flavor = "multi_thread")]
async fn retried_payment_is_applied_once() {
    let edge = EdgeProcess::start();
    let cashier = Terminal::new(&edge, &edge.mint_token("cashier"));
    let order = new_order(&cashier, json!({"table_id": "T7"})).await;
    let order_id = text(&order["id"]).to_owned();
    cashier
        .insert(
            "order_line",
            json!({"order_id": order_id, "name": "soup", "quantity": 2, "unit_price": 1500}),
        )
        .await
        .expect(201);

    let payment = json!({
        "id": "pay-retry-1",
        "order_id": order_id,
        "method": "card",
        "amount": 1200,
        "reference": "terminal-3/0001",
    });
    let first = cashier
        .insert("order_payment", payment.clone())
        .await
        .expect(201);
    assert_has(&first, &payment);
    let after_first = cashier.get("order_header", &order_id).await.expect(200);
    assert_eq!(after_first["paid_amount"], 1200);
    assert_eq!(after_first["total_amount"], 3000);

    // The retry: 200, the identical row.
    let again = cashier.insert("order_payment", payment.clone()).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text);
    assert_eq!(again.body, first);
    // Retries racing each other are all answered with the same row.
    let retries: Vec<_> = (0..8)
        .map(|_| {
            let (t, p) = (cashier.clone(), payment.clone());
            tokio::spawn(async move { t.insert("order_payment", p).await })
        })
        .collect();
    for r in retries {
        let r = r.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body, first);
    }
    // The same retry inside a batch.
    let batch = cashier
        .batch(json!([{"op": "insert", "table": "order_payment", "row": payment}]))
        .await
        .expect(200);
    assert_eq!(batch["results"][0], first, "{batch}");

    // Server-maintained members in the retried body are ignored, not "different content".
    let mut with_system = payment.clone();
    with_system["version"] = json!(7);
    with_system["seq"] = json!(99);
    let r = cashier.insert("order_payment", with_system).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body, first);

    // The same id with different content.
    for change in [
        json!({"amount": 1300}),
        json!({"method": "cash"}),
        json!({"reference": null}),
    ] {
        let mut other = payment.clone();
        for (k, v) in change.as_object().unwrap() {
            other[k] = v.clone();
        }
        let r = cashier.insert("order_payment", other).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{change}: {}", r.text);
        assert_eq!(r.code(), "id_conflict", "{}", r.text);
        assert!(!text(&r.body["message"]).is_empty());
    }

    let now = cashier.get("order_header", &order_id).await.expect(200);
    assert_eq!(now, after_first, "retries changed the order");
    let payments = cashier
        .all_rows("order_payment", json!({"order_id": order_id}))
        .await;
    assert_eq!(payments, vec![first.clone()]);
    assert_eq!(
        cashier
            .get("order_payment", "pay-retry-1")
            .await
            .expect(200),
        first
    );
    // The log holds the payment once.
    let (events, _) = cashier.all_events(1000).await;
    let logged = events
        .iter()
        .filter(|e| e["table"] == "order_payment" && e["row"]["id"] == "pay-retry-1")
        .count();
    assert_eq!(logged, 1);
}

// ---------------------------------------------------------------------------------------------
// Bad requests
// ---------------------------------------------------------------------------------------------

/// One row of the bad-request table.
struct Case {
    method: Method,
    path: String,
    who: Tok,
    body: Body,
    status: u16,
    code: &'static str,
    /// Further members the error must carry (e.g. `op_index`).
    extra: Vec<(&'static str, Json)>,
}

impl Case {
    fn with(mut self, key: &'static str, value: Json) -> Case {
        self.extra.push((key, value));
        self
    }
}

/// Who sends a row of the table.
#[derive(Clone, Copy, Debug)]
enum Tok {
    Admin,
    Cashier,
    Waiter,
    Kitchen,
    Nobody,
    Unknown,
    Basic,
}

fn case(
    method: Method,
    path: impl Into<String>,
    who: Tok,
    body: Body,
    status: u16,
    code: &'static str,
) -> Case {
    Case {
        method,
        path: path.into(),
        who,
        body,
        status,
        code,
        extra: Vec::new(),
    }
}

fn j(v: Json) -> Body {
    Body::Json(v)
}

fn raw(s: &str) -> Body {
    Body::Raw(s.as_bytes().to_vec())
}

const NONE: Body = Body::Empty;

/// Sends one request and returns its status, its `"error"` code (empty when there is none)
/// and its JSON body (`null` when the body is empty or not JSON).
async fn check(
    client: &Client,
    method: Method,
    url: &str,
    who: Who<'_>,
    body: Body,
) -> (u16, String, Json) {
    let reply = send(client, method, url, who, body).await;
    (reply.status.as_u16(), reply.code().to_owned(), reply.body)
}

/// A snapshot of everything a bad request could have changed.
async fn state_of(t: &Terminal) -> (Json, u64, Vec<Json>, Vec<Json>, Vec<Json>) {
    let snapshot = t.snapshot().await;
    let (_, next) = t.all_events(1000).await;
    let orders = t.all_rows("order_header", json!({})).await;
    let lines = t.all_rows("order_line", json!({})).await;
    let payments = t.all_rows("order_payment", json!({})).await;
    (snapshot, next, orders, lines, payments)
}

/// At least 40 bad requests, each answered with its status and error code and a message;
/// none of them changes anything, and the edge stays healthy.
#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_with_their_codes() {
    let edge = EdgeProcess::start();
    let admin_token = edge.admin_token().to_owned();
    let cashier_token = edge.mint_token("cashier");
    let waiter_token = edge.mint_token("waiter");
    let kitchen_token = edge.mint_token("kitchen");
    let admin = Terminal::new(&edge, &admin_token);

    // Fixtures: an unpaid open order with a line and a payment, an order at `ready`, and a
    // closed one.
    let o = text(&new_order(&admin, json!({"id": "ord-bad-1", "table_id": "T1"})).await["id"])
        .to_owned();
    let l = admin
        .insert(
            "order_line",
            json!({"id": "line-bad-1", "order_id": o, "name": "tea", "quantity": 2, "unit_price": 1500}),
        )
        .await
        .expect(201);
    admin
        .insert(
            "order_payment",
            json!({"id": "pay-bad-1", "order_id": o, "method": "cash", "amount": 1000}),
        )
        .await
        .expect(201);
    let ready = new_order(&admin, json!({"id": "ord-bad-2"})).await;
    admin
        .patch("order_header", "ord-bad-2", 1, json!({"status": "ready"}))
        .await
        .expect(200);
    let closed = new_order(&admin, json!({"id": "ord-bad-3"})).await;
    admin
        .patch("order_header", "ord-bad-3", 1, json!({"status": "closed"}))
        .await
        .expect(200);
    let ov = uint(&admin.get("order_header", &o).await.expect(200)["version"]);
    let lv = uint(&l["version"]);
    assert_eq!(ov, 3, "created, +line, +payment");
    assert_eq!(ready["id"], "ord-bad-2");
    assert_eq!(closed["id"], "ord-bad-3");

    let before = state_of(&admin).await;

    use Method as M;
    use Tok::*;
    let b = format!("/api/branches/{}/modules/pos", edge.branch());
    let t = |table: &str| format!("{b}/tables/{table}");
    let r = |table: &str, id: &str| format!("{b}/tables/{table}/{id}");
    let q = format!("{b}/query");
    let ev = |query: &str| format!("{b}/events?{query}");
    let batch = format!("{b}/batch");
    let sql_table = "order_header%3B%20DROP%20TABLE%20x";
    let sql_col = "notes\" OR 1=1 --";
    let line = |extra: Json| {
        let mut row = json!({"order_id": o, "name": "x", "quantity": 1, "unit_price": 100});
        for (k, v) in extra.as_object().unwrap() {
            row[k] = v.clone();
        }
        j(row)
    };
    let big = {
        let mut s = String::from("{\"notes\":\"");
        s.push_str(&"a".repeat(1024 * 1024 + 16));
        s.push_str("\"}");
        Body::Raw(s.into_bytes())
    };
    // Nesting far past the parser's depth limit is not accepted as JSON, whether it is the
    // body, a column's value or left unclosed.
    let nested = || format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep = Body::Raw(nested().into_bytes());
    let deep_value = Body::Raw(format!("{{\"notes\": {}}}", nested()).into_bytes());
    let deep_unclosed = Body::Raw(format!("{{\"notes\": {}", "[".repeat(100_000)).into_bytes());
    let many_ops = j(json!({
        "ops": (0..1001)
            .map(|_| json!({"op": "insert", "table": "order_header", "row": {}}))
            .collect::<Vec<_>>()
    }));

    #[rustfmt::skip]
    let cases = vec![
        // --- malformed bodies
        case(M::POST, t("order_header"), Admin, raw("{not json"),                            400, "invalid_json"),
        case(M::POST, t("order_header"), Admin, raw(""),                                     400, "invalid_json"),
        case(M::POST, t("order_header"), Admin, Body::Raw(vec![0xff, 0xfe, 0x7b]),           400, "invalid_json"),
        case(M::POST, t("order_header"), Admin, deep,                                        400, "invalid_json"),
        case(M::POST, t("order_header"), Admin, deep_value,                                  400, "invalid_json"),
        case(M::POST, t("order_header"), Admin, deep_unclosed,                               400, "invalid_json"),
        case(M::POST, t("order_header"), Admin, j(json!([1, 2])),                            400, "invalid_body"),
        case(M::POST, q.clone(),         Admin, raw("{\"table\": "),                         400, "invalid_json"),
        case(M::POST, batch.clone(),     Admin, raw("[]"),                                   400, "invalid_body"),
        // --- wrong types, money that is not an integer of minor units
        case(M::POST, t("order_line"),   Admin, line(json!({"quantity": "two"})),            400, "invalid_value"),
        case(M::POST, t("order_line"),   Admin, line(json!({"unit_price": 12.5})),           400, "invalid_value"),
        case(M::POST, t("order_line"),   Admin, line(json!({"unit_price": "1500"})),         400, "invalid_value"),
        case(M::POST, t("order_line"),   Admin, line(json!({"unit_price": 1_000_000_000_000_i64})), 400, "invalid_value"),
        case(M::POST, t("order_line"),   Admin, line(json!({"quantity": 1_000_000})),        400, "invalid_value"),
        case(M::POST, t("order_line"),   Admin, line(json!({"status": "eaten"})),            400, "invalid_value"),
        case(M::POST, t("order_payment"),Admin, j(json!({"order_id": o, "amount": 10.0})),   400, "invalid_value"),
        case(M::POST, t("order_payment"),Admin, j(json!({"order_id": o, "amount": 1e3})),    400, "invalid_value"),
        case(M::POST, t("order_payment"),Admin, j(json!({"order_id": o, "amount": true})),   400, "invalid_value"),
        case(M::POST, t("order_payment"),Admin, j(json!({"order_id": o, "method": "cash"})), 400, "invalid_value"),
        case(M::POST, t("order_header"), Admin, j(json!({"customer_name": 42})),             400, "invalid_value"),
        case(M::POST, t("order_header"), Admin, j(json!({"id": 5})),                         400, "invalid_value"),
        case(M::POST, t("order_header"), Admin, j(json!({"notes": "n".repeat(70_000)})),     400, "invalid_value"),
        case(M::PATCH, r("order_header", &o), Admin, j(json!({"version": ov, "set": {"status": null}})), 400, "invalid_value"),
        case(M::PATCH, r("order_line", "line-bad-1"), Admin, j(json!({"version": lv, "set": {"status": null}})), 400, "invalid_value"),
        case(M::PATCH, r("order_line", "line-bad-1"), Kitchen, j(json!({"version": lv, "set": {"status": null}})), 400, "invalid_value"),
        // --- unknown tables and columns, SQL in name positions
        case(M::POST, t("no_such_table"), Admin, j(json!({})),                               404, "unknown_table"),
        case(M::POST, t(sql_table),      Admin, j(json!({})),                                404, "unknown_table"),
        case(M::GET,  r(sql_table, "x"), Admin, NONE,                                        404, "unknown_table"),
        case(M::GET,  format!("{b}?tables=order_header,nope"), Admin, NONE,                  404, "unknown_table"),
        case(M::POST, t("order_header"), Admin, j(json!({"bogus": 1})),                      400, "unknown_column"),
        case(M::POST, t("order_header"), Admin, j(json!({sql_col: "x"})),                    400, "unknown_column"),
        case(M::PATCH, r("order_header", &o), Admin, j(json!({"version": ov, "set": {sql_col: "x"}})), 400, "unknown_column"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header; DROP TABLE x"})),   404, "unknown_table"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "sqlite_master"})),                404, "unknown_table"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "where": {sql_col: "x"}})), 400, "unknown_column"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "select": [sql_col]})), 400, "unknown_column"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "orderBy": [{"field": sql_col}]})), 400, "unknown_column"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "orderBy": [{"field": "id", "direction": "asc; DROP TABLE x"}]})), 400, "invalid_value"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "where": {"status": {"op": "regexp", "value": "x"}}})), 400, "invalid_value"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "where": {"total_amount": {"op": "like", "value": "1%"}}})), 400, "invalid_value"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "where": {"total_amount": "lots"}})), 400, "invalid_value"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "where": {"status": {"op": "<", "value": null}}})), 400, "invalid_value"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "where": {"status": vec!["x"; 1001]}})), 400, "invalid_parameter"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "having": "1=1"})), 400, "invalid_body"),
        case(M::POST, q.clone(), Admin, j(json!({"where": {}})),                             400, "invalid_body"),
        // --- limits and offsets
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "limit": -1})),    400, "invalid_parameter"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "limit": 1001})),  400, "invalid_parameter"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "limit": 1e20})),  400, "invalid_parameter"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "limit": "10"})),  400, "invalid_parameter"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "limit": 2.5})),   400, "invalid_parameter"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "offset": -5})),   400, "invalid_parameter"),
        case(M::POST, q.clone(), Admin, j(json!({"table": "order_header", "offset": u64::MAX})), 400, "invalid_parameter"),
        case(M::GET,  ev("limit=-1"),                Admin, NONE,                            400, "invalid_parameter"),
        case(M::GET,  ev("limit=0"),                 Admin, NONE,                            400, "invalid_parameter"),
        case(M::GET,  ev("limit=1001"),              Admin, NONE,                            400, "invalid_parameter"),
        case(M::GET,  ev("limit=99999999999999999999999"), Admin, NONE,                      400, "invalid_parameter"),
        case(M::GET,  ev("after=-1"),                Admin, NONE,                            400, "invalid_parameter"),
        case(M::GET,  ev("after=abc"),               Admin, NONE,                            400, "invalid_parameter"),
        case(M::GET,  ev("after=1;DROP%20TABLE%20x"), Admin, NONE,                           400, "invalid_parameter"),
        case(M::GET,  ev("after=99999999999999999999999"), Admin, NONE,                      400, "invalid_parameter"),
        // --- compare-and-set: version required and an integer
        case(M::PATCH, r("order_header", &o), Admin, j(json!({"set": {"notes": "x"}})),      400, "version_required"),
        case(M::PATCH, r("order_header", &o), Admin, j(json!({"version": null, "set": {"notes": "x"}})), 400, "version_required"),
        case(M::PATCH, r("order_header", &o), Admin, j(json!({"version": "3", "set": {"notes": "x"}})), 400, "invalid_value"),
        case(M::PATCH, r("order_header", &o), Admin, j(json!({"version": 2.5, "set": {"notes": "x"}})), 400, "invalid_value"),
        case(M::PATCH, r("order_header", &o), Admin, j(json!({"version": 0, "set": {"notes": "x"}})), 400, "invalid_value"),
        case(M::PATCH, r("order_header", &o), Admin, j(json!({"version": -3, "set": {"notes": "x"}})), 400, "invalid_value"),
        case(M::PATCH, r("order_header", &o), Admin, j(json!({"version": ov})),              400, "invalid_body"),
        case(M::PATCH, r("order_header", &o), Admin, j(json!({"version": ov, "set": [1]})),  400, "invalid_body"),
        case(M::DELETE, r("order_header", "ord-bad-2"), Admin, NONE,                         400, "version_required"),
        case(M::DELETE, format!("{}?version=abc", r("order_header", "ord-bad-2")), Admin, NONE, 400, "invalid_value"),
        case(M::DELETE, format!("{}?version=-1", r("order_header", "ord-bad-2")), Admin, NONE, 400, "invalid_value"),
        case(M::DELETE, format!("{}?version=1.0", r("order_header", "ord-bad-2")), Admin, NONE, 400, "invalid_value"),
        case(M::PATCH, r("order_header", &o), Admin, j(json!({"version": 1, "set": {"notes": "x"}})), 409, "version_conflict"),
        // --- server-owned columns
        case(M::POST, t("order_header"), Admin, j(json!({"total_amount": 100})),            400, "read_only_column"),
        case(M::POST, t("order_header"), Admin, j(json!({"paid_amount": 0})),               400, "read_only_column"),
        case(M::PATCH, r("order_header", &o), Admin, j(json!({"version": ov, "set": {"total_amount": 0}})), 400, "read_only_column"),
        case(M::PATCH, r("order_header", &o), Admin, j(json!({"version": ov, "set": {"paid_amount": 3000}})), 400, "read_only_column"),
        case(M::PATCH, r("order_header", &o), Admin, j(json!({"version": ov, "set": {"version": 9}})), 400, "read_only_column"),
        case(M::PATCH, r("order_header", &o), Admin, j(json!({"version": ov, "set": {"updated_at": "2026-01-01T00:00:00Z"}})), 400, "read_only_column"),
        // --- log tables are immutable; hub-owned and edge-written tables
        case(M::PATCH, r("order_payment", "pay-bad-1"), Admin, j(json!({"version": 1, "set": {"amount": 1}})), 405, "log_immutable"),
        case(M::DELETE, format!("{}?version=1", r("order_payment", "pay-bad-1")), Admin, NONE, 405, "log_immutable"),
        case(M::POST, t("menu_item"),    Admin, j(json!({"name": "pie", "price": 500})),      403, "hub_owned"),
        case(M::POST, t("employee"),     Admin, j(json!({"name": "Mallory", "role": "admin"})), 403, "hub_owned"),
        case(M::POST, t("order_status_log"), Admin, j(json!({"order_id": o, "status": "closed"})), 403, "forbidden"),
        // --- scope
        case(M::GET,  "/api/branches/B999/modules/pos",          Admin, NONE,                404, "unknown_branch"),
        case(M::POST, "/api/branches/B999/modules/pos/tables/order_header", Admin, j(json!({})), 404, "unknown_branch"),
        case(M::GET,  "/api/branches/B001/modules/inventory",    Admin, NONE,                404, "unknown_module"),
        case(M::POST, "/api/branches/B001/modules/inventory/query", Admin, j(json!({"table": "order_header"})), 404, "unknown_module"),
        // --- authentication and roles
        case(M::GET,  b.clone(),         Nobody,  NONE,                                      401, "unauthorized"),
        case(M::GET,  b.clone(),         Unknown, NONE,                                      401, "unauthorized"),
        case(M::GET,  b.clone(),         Basic,   NONE,                                      401, "unauthorized"),
        case(M::POST, t("order_header"), Nobody,  j(json!({})),                              401, "unauthorized"),
        case(M::POST, q.clone(),         Unknown, j(json!({"table": "order_header"})),       401, "unauthorized"),
        case(M::GET,  ev("after=0"),     Nobody,  NONE,                                      401, "unauthorized"),
        case(M::POST, t("order_payment"), Waiter, j(json!({"order_id": o, "amount": 100})),  403, "forbidden"),
        case(M::PATCH, r("order_line", "line-bad-1"), Kitchen, j(json!({"version": lv, "set": {"quantity": 3}})), 403, "forbidden"),
        case(M::PATCH, r("order_line", "line-bad-1"), Kitchen, j(json!({"version": lv, "set": {"status": "ready", "quantity": 3}})), 403, "forbidden"),
        // A column the role may not set is refused as such even when its value is also bad,
        // unknown or server-maintained.
        case(M::PATCH, r("order_line", "line-bad-1"), Kitchen, j(json!({"version": lv, "set": {"quantity": "three"}})), 403, "forbidden"),
        case(M::PATCH, r("order_line", "line-bad-1"), Kitchen, j(json!({"version": lv, "set": {"status": "ready", "tip": 1}})), 403, "forbidden"),
        case(M::PATCH, r("order_line", "line-bad-1"), Kitchen, j(json!({"version": lv, "set": {"id": "x"}})), 403, "forbidden"),
        case(M::POST, batch.clone(),     Kitchen, j(json!({"ops": [{"op": "update", "table": "order_line", "id": "line-bad-1", "version": lv, "set": {"quantity": 1.5}}]})), 403, "forbidden").with("op_index", json!(0)),
        // Its own column with a bad value is the value's error.
        case(M::PATCH, r("order_line", "line-bad-1"), Kitchen, j(json!({"version": lv, "set": {"status": 7}})), 400, "invalid_value"),
        case(M::POST, t("order_line"),   Kitchen, line(json!({})),                           403, "forbidden"),
        case(M::POST, q.clone(),         Kitchen, j(json!({"table": "order_payment"})),      403, "forbidden"),
        case(M::GET,  r("order_payment", "pay-bad-1"), Kitchen, NONE,                        403, "forbidden"),
        case(M::GET,  format!("{b}?tables=order_payment"), Kitchen, NONE,                    403, "forbidden"),
        case(M::POST, q.clone(),         Kitchen, j(json!({"table": "employee"})),           403, "forbidden"),
        case(M::PATCH, r("order_header", &o), Kitchen, j(json!({"version": ov, "set": {"notes": "x"}})), 403, "forbidden"),
        case(M::POST, t("table_lock"),   Cashier, j(json!({"locked_by": "c1"})),             403, "forbidden"),
        case(M::DELETE, format!("{}?version=1", r("order_header", "ord-bad-2")), Kitchen, NONE, 403, "forbidden"),
        case(M::POST, batch.clone(),     Waiter,  j(json!({"ops": [
            {"op": "insert", "table": "order_header", "row": {}},
            {"op": "insert", "table": "order_payment", "row": {"order_id": o, "amount": 5}},
        ]})),                                                                               403, "forbidden").with("op_index", json!(1)),
        // What no role may do is refused as such, whichever role asks.
        case(M::DELETE, format!("{}?version=1", r("order_payment", "pay-bad-1")), Cashier, NONE, 405, "log_immutable"),
        case(M::DELETE, format!("{}?version=1", r("order_payment", "pay-bad-1")), Kitchen, NONE, 405, "log_immutable"),
        case(M::PATCH, r("order_payment", "pay-bad-1"), Cashier, j(json!({"version": 1, "set": {"amount": 1}})), 405, "log_immutable"),
        case(M::POST, t("menu_item"),    Waiter,  j(json!({"name": "pie", "price": 500})),    403, "hub_owned"),
        case(M::POST, t("menu_item"),    Kitchen, j(json!({"name": "pie", "price": 500})),    403, "hub_owned"),
        // --- a batch answers with its first failing op, whether the store or the request's
        // own checks find it
        case(M::POST, batch.clone(),     Admin, j(json!({"ops": [
            {"op": "update", "table": "order_header", "id": o, "version": 1, "set": {"notes": "x"}},
            {"op": "insert", "table": "order_header", "row": {"bogus": 1}},
        ]})),                                                                               409, "version_conflict").with("op_index", json!(0)),
        case(M::POST, batch.clone(),     Admin, j(json!({"ops": [
            {"op": "update", "table": "order_header", "id": o, "version": ov, "set": {"notes": "x"}},
            {"op": "insert", "table": "order_line", "row": {"order_id": "no-such-order", "quantity": 1, "unit_price": 1}},
            {"op": "insert", "table": "order_header", "row": {"bogus": 1}},
        ]})),                                                                               400, "unknown_order").with("op_index", json!(1)),
        case(M::POST, batch.clone(),     Admin, j(json!({"ops": [
            {"op": "update", "table": "order_header", "id": o, "version": ov, "set": {"notes": "x"}},
            {"op": "insert", "table": "order_header", "row": {"bogus": 1}},
        ]})),                                                                               400, "unknown_column").with("op_index", json!(1)),
        // --- paths and query strings that do not decode, and a like pattern SQLite refuses
        case(M::GET,  r("order_header", "%FF"), Admin,  NONE,                                400, "invalid_path"),
        case(M::GET,  r("order_header", "%FF"), Nobody, NONE,                                401, "unauthorized"),
        case(M::DELETE, format!("{}?version=%FF", r("order_header", "ord-bad-2")), Admin, NONE, 400, "invalid_value"),
        case(M::POST, q.clone(),         Admin, j(json!({"table": "order_header", "where": {"notes": {"op": "like", "value": "%".repeat(60_000)}}})), 400, "invalid_value"),
        // --- size
        case(M::POST, t("order_header"), Admin, big,                                         413, "body_too_large"),
        case(M::POST, batch.clone(),     Admin, many_ops,                                    413, "too_large"),
        // --- pos rules
        case(M::POST, t("order_line"),   Admin, j(json!({"order_id": "no-such-order", "quantity": 1, "unit_price": 1})), 400, "unknown_order"),
        case(M::POST, t("order_line"),   Admin, j(json!({"quantity": 1, "unit_price": 1})),  400, "unknown_order"),
        case(M::POST, t("order_payment"), Cashier, j(json!({"order_id": "no-such-order", "amount": 100})), 400, "unknown_order"),
        case(M::POST, t("order_line"),   Admin, j(json!({"order_id": "ord-bad-3", "quantity": 1, "unit_price": 1})), 409, "order_closed"),
        case(M::PATCH, r("order_header", &o), Admin, j(json!({"version": ov, "set": {"status": "closed"}})), 409, "unpaid"),
        case(M::PATCH, r("order_header", "ord-bad-2"), Admin, j(json!({"version": 2, "set": {"status": "open"}})), 409, "illegal_transition"),
        case(M::PATCH, r("order_header", "ord-bad-2"), Admin, j(json!({"version": 2, "set": {"status": "eaten"}})), 400, "invalid_value"),
        case(M::PATCH, r("order_header", "ord-bad-3"), Admin, j(json!({"version": 2, "set": {"status": "cancelled"}})), 409, "illegal_transition"),
        case(M::DELETE, format!("{}?version={ov}", r("order_header", &o)), Admin, NONE,     409, "order_not_empty"),
        case(M::POST, t("order_header"), Admin, j(json!({"id": o})),                         409, "id_conflict"),
        case(M::POST, t("order_payment"), Admin, j(json!({"id": "pay-bad-1", "order_id": o, "method": "cash", "amount": 999})), 409, "id_conflict"),
        case(M::GET,  r("order_header", "no-such-order"), Admin, NONE,                       404, "not_found"),
        case(M::GET,  r("order_header", "x%27%20OR%20%271%27%3D%271"), Admin, NONE,          404, "not_found"),
        case(M::PATCH, r("order_header", "no-such-order"), Admin, j(json!({"version": 1, "set": {"notes": "x"}})), 404, "not_found"),
        // --- batches
        case(M::POST, batch.clone(),     Admin, j(json!({"ops": []})),                       400, "invalid_body"),
        case(M::POST, batch.clone(),     Admin, j(json!({})),                                400, "invalid_body"),
        case(M::POST, batch.clone(),     Admin, j(json!({"ops": {"op": "insert"}})),         400, "invalid_body"),
        case(M::POST, batch.clone(),     Admin, j(json!({"ops": [
            {"op": "insert", "table": "order_header", "row": {"id": "batch-bad-1"}},
            {"op": "insert", "table": "order_line", "row": {"order_id": "no-such-order", "quantity": 1, "unit_price": 1}},
        ]})),                                                                               400, "unknown_order").with("op_index", json!(1)),
        case(M::POST, batch.clone(),     Admin, j(json!({"ops": [
            {"op": "insert", "table": "order_header", "row": {"id": "batch-bad-2"}},
            {"op": "update", "table": "order_header", "id": o, "version": ov, "set": {"notes": "x"}},
            {"op": "insert", "table": "order_header", "row": {"bogus": 1}},
        ]})),                                                                               400, "unknown_column").with("op_index", json!(2)),
        case(M::POST, batch.clone(),     Admin, j(json!({"ops": [
            {"op": "update", "table": "order_header", "id": o, "version": ov, "set": {"notes": "x"}},
            {"op": "update", "table": "order_header", "id": "ord-bad-2", "version": 1, "set": {"notes": "x"}},
        ]})),                                                                               409, "version_conflict").with("op_index", json!(1)),
        case(M::POST, batch.clone(),     Admin, j(json!({"ops": [{"op": "upsert", "table": "order_header", "row": {}}]})), 400, "invalid_body").with("op_index", json!(0)),
        case(M::POST, batch.clone(),     Admin, j(json!({"ops": [{"op": "update", "table": "order_header", "id": o, "set": {"notes": "x"}}]})), 400, "version_required").with("op_index", json!(0)),
        case(M::POST, batch.clone(),     Admin, j(json!({"ops": [{"op": "delete", "table": "order_header"}]})), 400, "invalid_body").with("op_index", json!(0)),
        case(M::POST, batch.clone(),     Admin, j(json!({"ops": [{"op": "insert", "table": sql_table, "row": {}}]})), 404, "unknown_table").with("op_index", json!(0)),
        case(M::POST, batch.clone(),     Admin, j(json!({"ops": [
            {"op": "insert", "table": "order_header", "row": {"id": "batch-bad-3"}},
            {"op": "update", "table": "order_header", "id": "ord-bad-2", "version": 2, "set": {"status": "open"}},
        ]})),                                                                               409, "illegal_transition").with("op_index", json!(1)),
        // --- routes and methods
        case(M::GET,  "/no/such/route",               Nobody, NONE,                          404, "not_found"),
        case(M::GET,  "/api/branches/B001",            Admin,  NONE,                          404, "not_found"),
        case(M::GET,  format!("{b}/nothing"),          Admin,  NONE,                          404, "not_found"),
        case(M::PUT,  r("order_header", &o),           Admin,  j(json!({})),                  405, "method_not_allowed"),
        case(M::GET,  batch.clone(),                   Admin,  NONE,                          405, "method_not_allowed"),
        case(M::DELETE, q.clone(),                     Admin,  NONE,                          405, "method_not_allowed"),
        case(M::POST, ev("after=0"),                   Admin,  j(json!({})),                  405, "method_not_allowed"),
        case(M::PATCH, t("order_header"),              Admin,  j(json!({})),                  405, "method_not_allowed"),
    ];
    assert!(cases.len() >= 40, "the table has {} rows", cases.len());

    let http = client();
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let who = match c.who {
            Admin => Who::Bearer(&admin_token),
            Cashier => Who::Bearer(&cashier_token),
            Waiter => Who::Bearer(&waiter_token),
            Kitchen => Who::Bearer(&kitchen_token),
            Nobody => Who::Nobody,
            Unknown => {
                Who::Bearer("op_0000000000000000000000000000000000000000000000000000000000000000")
            }
            Basic => Who::Header("Basic YWRtaW46YWRtaW4="),
        };
        let (status, code, body) = check(
            &http,
            c.method.clone(),
            &edge.url(&c.path),
            who,
            c.body.clone(),
        )
        .await;
        let mut problems = Vec::new();
        if status != c.status {
            problems.push(format!("status {status}, want {}", c.status));
        }
        if code != c.code {
            problems.push(format!("error {code:?}, want {:?}", c.code));
        }
        if body["message"].as_str().is_none_or(str::is_empty) {
            problems.push("no message".to_owned());
        }
        for (k, v) in &c.extra {
            if &body[*k] != v {
                problems.push(format!("{k} = {}, want {v}", body[*k]));
            }
        }
        if !problems.is_empty() {
            let shown: String = body.to_string().chars().take(300).collect();
            failures.push(format!(
                "row {i}: {} {} as {:?}: {}; body {shown}",
                c.method,
                c.path.chars().take(120).collect::<String>(),
                c.who,
                problems.join(", ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad requests were answered wrongly:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // Nothing changed, and the edge is still up.
    let after = state_of(&admin).await;
    assert_eq!(after.0, before.0, "the snapshot changed");
    assert_eq!(after.1, before.1, "the event log grew");
    assert_eq!(after.2, before.2, "orders changed");
    assert_eq!(after.3, before.3, "lines changed");
    assert_eq!(after.4, before.4, "payments changed");
    for id in ["batch-bad-1", "batch-bad-2", "batch-bad-3"] {
        admin.get("order_header", id).await.expect(404);
    }
    assert_healthy(&admin).await;
    // And it still takes writes.
    admin
        .patch("order_header", &o, ov, json!({"notes": "still fine"}))
        .await
        .expect(200);
}

// ---------------------------------------------------------------------------------------------
// Role permissions: what each role may do
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn roles_may_do_what_the_contract_grants() {
    let edge = EdgeProcess::start();
    let cashier = Terminal::new(&edge, &edge.mint_token("cashier"));
    let waiter = Terminal::new(&edge, &edge.mint_token("waiter"));
    let kitchen = Terminal::new(&edge, &edge.mint_token("kitchen"));
    let manager = Terminal::new(&edge, &edge.mint_token("manager"));

    // The waiter opens an order and adds a line; the kitchen moves the line's status.
    let order = new_order(&waiter, json!({"table_id": "T4"})).await;
    let order_id = text(&order["id"]).to_owned();
    let line = waiter
        .insert(
            "order_line",
            json!({"order_id": order_id, "name": "curry", "quantity": 1, "unit_price": 1800, "station_id": "hot"}),
        )
        .await
        .expect(201);
    let line_id = text(&line["id"]).to_owned();
    let kitchen_sees = kitchen.get("order_line", &line_id).await.expect(200);
    assert_eq!(kitchen_sees, line);
    let moved = kitchen
        .patch("order_line", &line_id, 1, json!({"status": "preparing"}))
        .await
        .expect(200);
    assert_eq!(moved["status"], "preparing");
    assert_eq!(moved["version"], 2);
    let moved = kitchen
        .patch("order_line", &line_id, 2, json!({"status": "ready"}))
        .await
        .expect(200);
    assert_eq!(moved["quantity"], 1);
    // The status changes are logged with the actor.
    let log = kitchen
        .rows(json!({
            "table": "order_line_status_log",
            "where": {"line_id": line_id},
            "orderBy": [{"field": "seq", "direction": "asc"}],
        }))
        .await;
    let statuses: Vec<(&str, &str)> = log
        .iter()
        .map(|e| (text(&e["status"]), text(&e["actor"])))
        .collect();
    assert_eq!(
        statuses,
        [
            ("queued", "waiter"),
            ("preparing", "kitchen"),
            ("ready", "kitchen")
        ]
    );
    // The kitchen reads orders and menu data.
    kitchen.get("order_header", &order_id).await.expect(200);
    kitchen
        .rows(json!({"table": "menu_item", "where": {"active": true}}))
        .await;
    // Kitchen may set item availability.
    let avail = kitchen
        .insert(
            "item_availability",
            json!({"id": "item-42", "available": false, "reason": "sold out"}),
        )
        .await
        .expect(201);
    kitchen
        .patch(
            "item_availability",
            "item-42",
            uint(&avail["version"]),
            json!({"available": true, "reason": null}),
        )
        .await
        .expect(200);
    // The kitchen's snapshot leaves out what it may not read.
    let snap = kitchen.snapshot().await;
    let tables = snap["tables"].as_object().expect("tables");
    assert!(tables.contains_key("order_line"), "{snap}");
    assert!(!tables.contains_key("order_payment"), "{snap}");
    assert!(!tables.contains_key("employee"), "{snap}");

    // The cashier takes the payment and closes the order.
    let pay = cashier
        .insert(
            "order_payment",
            json!({"order_id": order_id, "method": "card", "amount": 1800}),
        )
        .await
        .expect(201);
    assert!(pay["id"].as_str().is_some_and(|s| !s.is_empty()), "{pay}");
    assert_eq!(pay["version"], 1);
    let o = cashier.get("order_header", &order_id).await.expect(200);
    assert_eq!(
        (int(&o["total_amount"]), int(&o["paid_amount"])),
        (1800, 1800)
    );
    let closed = cashier
        .patch(
            "order_header",
            &order_id,
            uint(&o["version"]),
            json!({"status": "closed"}),
        )
        .await
        .expect(200);
    assert_eq!(closed["status"], "closed");
    // The waiter reads payments, locks tables; the cashier opens a shift.
    waiter
        .get("order_payment", text(&pay["id"]))
        .await
        .expect(200);
    waiter
        .insert("table_lock", json!({"id": "T4", "locked_by": "waiter-1"}))
        .await
        .expect(201);
    cashier
        .insert(
            "pos_shift",
            json!({"pos_id": "till-1", "opened_by": "c1", "opened_at": "2026-11-22T08:00:00Z", "opening_cash": 20000}),
        )
        .await
        .expect(201);
    // A manager may delete an empty order.
    let empty = new_order(&manager, json!({})).await;
    let deleted = manager
        .call(
            Method::DELETE,
            format!(
                "{}/tables/order_header/{}?version=1",
                manager.module,
                text(&empty["id"])
            ),
            Body::Empty,
        )
        .await
        .expect(200);
    assert_eq!(deleted["deleted"], true, "{deleted}");
    manager
        .get("order_header", text(&empty["id"]))
        .await
        .expect(404);

    // The kitchen's event feed skips payments but still reaches the end of the log.
    let (k_events, k_next) = kitchen.all_events(3).await;
    let (all, next) = manager.all_events(1000).await;
    assert_eq!(k_next, next);
    assert!(k_events.iter().all(|e| e["table"] != "order_payment"));
    assert!(all.iter().any(|e| e["table"] == "order_payment"));
}

// ---------------------------------------------------------------------------------------------
// kill -9 under load
// ---------------------------------------------------------------------------------------------

/// A write the edge acknowledged with a 2xx.
#[derive(Debug, Clone)]
struct Ack {
    table: &'static str,
    id: String,
    row: Json,
}

/// A write that was in flight when the edge died: the writer never learnt whether it
/// committed. `path` is relative to the module base.
#[derive(Debug, Clone)]
struct InFlight {
    path: String,
    body: Json,
    tables: Vec<&'static str>,
}

/// Writers create orders, lines and payments (alone and in batches) and record every 2xx;
/// the edge is killed with SIGKILL in the middle. After a restart every acknowledged write is
/// there with its content; the writes that were in flight, retried as a terminal would, are
/// applied at most once; each order's totals match the lines and payments present.
#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_writes_survive_kill_9_under_load() {
    const WRITERS: usize = 6;
    const ROUNDS_MAX: usize = 2_000;
    const KILL_AFTER_ACKS: usize = 300;
    let mut edge = EdgeProcess::start();
    let token = edge.mint_token("cashier");
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let in_flight: Arc<Mutex<Vec<InFlight>>> = Arc::default();
    let refused: Arc<Mutex<Vec<String>>> = Arc::default();
    let (count_tx, mut count_rx) = watch::channel(0usize);
    let count_tx = Arc::new(count_tx);

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let t = Terminal::new(&edge, &token);
        let (acks, in_flight, refused, count_tx) = (
            acks.clone(),
            in_flight.clone(),
            refused.clone(),
            count_tx.clone(),
        );
        writers.push(tokio::spawn(async move {
            for i in 0..ROUNDS_MAX {
                let order_id = format!("k{w}-{i}");
                let order = json!({
                    "id": order_id, "table_id": format!("T{w}"), "customer_name": format!("guest {w}/{i}"),
                });
                let line = json!({
                    "id": format!("{order_id}-line"), "order_id": order_id, "name": "dish",
                    "quantity": 1 + i % 3, "unit_price": 100 + w as i64,
                });
                let pay = json!({
                    "id": format!("{order_id}-pay"), "order_id": order_id, "method": "cash",
                    "amount": 50 + i as i64,
                });
                // Odd rounds write the three rows in one batch, even rounds one by one.
                let steps: Vec<InFlight> = if i % 2 == 1 {
                    vec![InFlight {
                        path: "/batch".into(),
                        body: json!({"ops": [
                            {"op": "insert", "table": "order_header", "row": order},
                            {"op": "insert", "table": "order_line", "row": line},
                            {"op": "insert", "table": "order_payment", "row": pay},
                        ]}),
                        tables: vec!["order_header", "order_line", "order_payment"],
                    }]
                } else {
                    [
                        ("order_header", order),
                        ("order_line", line),
                        ("order_payment", pay),
                    ]
                    .into_iter()
                    .map(|(table, row)| InFlight {
                        path: format!("/tables/{table}"),
                        body: row,
                        tables: vec![table],
                    })
                    .collect()
                };
                for step in steps {
                    let url = format!("{}{}", t.module, step.path);
                    let reply = match t
                        .try_call(Method::POST, url.clone(), Body::Json(step.body.clone()))
                        .await
                    {
                        Ok(r) => r,
                        // The edge is gone: this writer is done, not knowing the outcome.
                        Err(_) => {
                            in_flight.lock().await.push(step);
                            return;
                        }
                    };
                    if !reply.status.is_success() {
                        refused
                            .lock()
                            .await
                            .push(format!("{url}: {} {}", reply.status, reply.text));
                        return;
                    }
                    let rows: Vec<Json> = if step.tables.len() == 1 {
                        vec![reply.body.clone()]
                    } else {
                        reply.body["results"].as_array().expect("results").clone()
                    };
                    assert_eq!(rows.len(), step.tables.len(), "{}", reply.text);
                    let new: Vec<Ack> = step
                        .tables
                        .iter()
                        .zip(rows)
                        .map(|(table, row)| Ack {
                            table,
                            id: text(&row["id"]).to_owned(),
                            row,
                        })
                        .collect();
                    let n = new.len();
                    acks.lock().await.extend(new);
                    count_tx.send_modify(|c| *c += n);
                }
            }
        }));
    }

    // Kill once enough writes were acknowledged, while the writers keep going.
    // (The borrow `wait_for` returns holds the channel's lock: drop it at once.)
    let reached = tokio::time::timeout(
        Duration::from_secs(120),
        count_rx.wait_for(|n| *n >= KILL_AFTER_ACKS),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(
        reached,
        "the writers never reached {KILL_AFTER_ACKS} acknowledged writes; refused: {:?}",
        refused.lock().await
    );
    tokio::task::block_in_place(|| edge.kill9());
    for w in writers {
        w.await.expect("a writer task");
    }
    let refused = refused.lock().await.clone();
    assert!(
        refused.is_empty(),
        "writes refused before the kill: {refused:?}"
    );
    let acks = acks.lock().await.clone();
    let in_flight = in_flight.lock().await.clone();
    assert!(acks.len() >= KILL_AFTER_ACKS);

    tokio::task::block_in_place(|| edge.restart());
    let t = Terminal::new(&edge, &token);
    assert_healthy(&t).await;

    // Every acknowledged write, with its content.
    let mut missing = Vec::new();
    for a in &acks {
        let got = t.get(a.table, &a.id).await;
        if got.status != StatusCode::OK {
            missing.push(format!("{} {}: {} {}", a.table, a.id, got.status, got.text));
            continue;
        }
        match a.table {
            // Lines and payments are not changed after their insert: identical rows.
            "order_line" | "order_payment" => {
                assert_eq!(got.body, a.row, "{} {} after the restart", a.table, a.id);
            }
            // Orders' totals move with later lines and payments; the rest is as written.
            _ => {
                for k in ["id", "created_at", "table_id", "customer_name", "status"] {
                    assert_eq!(got.body[k], a.row[k], "{k} of order {}", a.id);
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes were lost:\n{}",
        missing.len(),
        acks.len(),
        missing.join("\n")
    );

    // Retried acknowledged payments are recognised: 200 with the identical row.
    for a in acks.iter().filter(|a| a.table == "order_payment") {
        let mut body = a.row.clone();
        for k in ["version", "created_at", "updated_at", "seq"] {
            body.as_object_mut().unwrap().remove(k);
        }
        let again = t.insert("order_payment", body).await;
        assert_eq!(again.status, StatusCode::OK, "{}", again.text);
        assert_eq!(again.body, a.row);
    }

    // The writes in flight at the kill, retried as a terminal would: each is either applied
    // now or recognised as already there (payments: 200; state rows and batches: 409
    // id_conflict, all or nothing), and then present.
    let mut committed_unacknowledged = 0;
    for f in &in_flight {
        let url = format!("{}{}", t.module, f.path);
        let reply = t.call(Method::POST, url, Body::Json(f.body.clone())).await;
        let rows: Vec<(&str, Json)> = if f.tables.len() == 1 {
            vec![(f.tables[0], f.body.clone())]
        } else {
            f.tables
                .iter()
                .zip(f.body["ops"].as_array().unwrap())
                .map(|(table, op)| (*table, op["row"].clone()))
                .collect()
        };
        match (reply.status.as_u16(), f.tables.as_slice()) {
            (201, [_]) | (200, [_, _, ..]) => {}
            (200, ["order_payment"]) => committed_unacknowledged += 1,
            (409, _) if reply.code() == "id_conflict" && f.tables[0] != "order_payment" => {
                committed_unacknowledged += 1;
                if f.tables.len() > 1 {
                    assert_eq!(reply.body["op_index"], 0, "{}", reply.text);
                }
            }
            _ => panic!(
                "retrying {} {}: {} {}",
                f.path, f.body, reply.status, reply.text
            ),
        }
        for (table, row) in rows {
            let got = t.get(table, text(&row["id"])).await.expect(200);
            assert_has(&got, &row);
        }
    }

    // Derived totals agree with the lines and payments that are there (acknowledged or not).
    let lines = t.all_rows("order_line", json!({})).await;
    let payments = t.all_rows("order_payment", json!({})).await;
    let orders = t.all_rows("order_header", json!({})).await;
    let order_ids: BTreeSet<&str> = orders.iter().map(|o| text(&o["id"])).collect();
    for a in &acks {
        let listed = match a.table {
            "order_line" => &lines,
            "order_payment" => &payments,
            _ => &orders,
        };
        assert!(
            listed.iter().any(|r| r["id"] == json!(a.id)),
            "{} {} is not in the query",
            a.table,
            a.id
        );
    }
    let mut sums: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for l in &lines {
        sums.entry(text(&l["order_id"])).or_default().0 +=
            int(&l["quantity"]) * int(&l["unit_price"]);
    }
    for p in &payments {
        sums.entry(text(&p["order_id"])).or_default().1 += int(&p["amount"]);
    }
    for o in &orders {
        let (total, paid) = sums.get(text(&o["id"])).copied().unwrap_or_default();
        assert_eq!(int(&o["total_amount"]), total, "total of {o}");
        assert_eq!(int(&o["paid_amount"]), paid, "paid of {o}");
    }
    for l in lines.iter().chain(&payments) {
        assert!(order_ids.contains(text(&l["order_id"])), "{l} has no order");
    }

    // The event log is whole, and the edge takes writes again.
    let (events, next) = t.all_events(1000).await;
    for (i, e) in events.iter().enumerate() {
        assert_eq!(uint(&e["seq"]), i as u64 + 1, "the log has a gap: {e}");
    }
    assert_eq!(next, events.len() as u64);
    let order = new_order(&t, json!({"table_id": "after-restart"})).await;
    t.get("order_header", text(&order["id"])).await.expect(200);
    eprintln!(
        "kill -9 test: {} acknowledged writes before the kill, {} in flight ({} of them \
         committed), {} log entries after",
        acks.len(),
        in_flight.len(),
        committed_unacknowledged,
        events.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Query
// ---------------------------------------------------------------------------------------------

/// One order of the query test's data, as the test expects it.
#[derive(Debug, Clone)]
struct Expected {
    id: String,
    table_id: String,
    customer: Option<String>,
    total: i64,
    status: &'static str,
}

fn ids(rows: &[Json]) -> Vec<String> {
    rows.iter().map(|r| text(&r["id"]).to_owned()).collect()
}

fn ids_where(model: &[Expected], f: impl Fn(&Expected) -> bool) -> BTreeSet<String> {
    model
        .iter()
        .filter(|e| f(e))
        .map(|e| e.id.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn query_filters_orders_pages_and_projects() {
    const ORDERS: usize = 24;
    let edge = EdgeProcess::start();
    let t = Terminal::new(&edge, &edge.mint_token("cashier"));

    // The data: orders over four tables, some without a customer name, some preparing; a
    // line each (order 0 has none) so the totals differ.
    let mut model = Vec::new();
    for i in 0..ORDERS {
        let id = format!("q-{i:02}");
        let customer = match i % 3 {
            0 => None,
            1 => Some(format!("Ann {i}")),
            _ => Some(format!("Bob {i}")),
        };
        let table_id = format!("T{}", i % 4);
        new_order(
            &t,
            json!({"id": id, "table_id": table_id, "customer_name": customer}),
        )
        .await;
        let total = 100 * (i as i64 % 7);
        if total > 0 {
            t.insert(
                "order_line",
                json!({"order_id": id, "name": "x", "quantity": 1, "unit_price": total}),
            )
            .await
            .expect(201);
        }
        let mut status = "open";
        if i % 5 == 0 {
            let v = uint(&t.get("order_header", &id).await.expect(200)["version"]);
            t.patch("order_header", &id, v, json!({"status": "preparing"}))
                .await
                .expect(200);
            status = "preparing";
        }
        model.push(Expected {
            id,
            table_id,
            customer,
            total,
            status,
        });
    }

    let set = |rows: &[Json]| ids(rows).into_iter().collect::<BTreeSet<_>>();
    let q = |filter: Json| json!({"table": "order_header", "where": filter});

    // Equality, IN, IS NULL.
    let rows = t.rows(q(json!({"table_id": "T1"}))).await;
    assert_eq!(set(&rows), ids_where(&model, |e| e.table_id == "T1"));
    let rows = t.rows(q(json!({"table_id": ["T1", "T2"]}))).await;
    assert_eq!(
        set(&rows),
        ids_where(&model, |e| e.table_id == "T1" || e.table_id == "T2")
    );
    let rows = t.rows(q(json!({"customer_name": null}))).await;
    assert_eq!(set(&rows), ids_where(&model, |e| e.customer.is_none()));
    assert!(rows.iter().all(|r| r["customer_name"].is_null()));
    let rows = t
        .rows(q(json!({"customer_name": {"op": "=", "value": null}})))
        .await;
    assert_eq!(set(&rows), ids_where(&model, |e| e.customer.is_none()));
    // Operator objects, combined (AND).
    let rows = t
        .rows(q(json!({
            "total_amount": {"op": ">=", "value": 300},
            "status": {"op": "!=", "value": "preparing"},
        })))
        .await;
    assert_eq!(
        set(&rows),
        ids_where(&model, |e| e.total >= 300 && e.status != "preparing")
    );
    for (op, f) in [
        ("<", (|a, b| a < b) as fn(i64, i64) -> bool),
        ("<=", |a, b| a <= b),
        (">", |a, b| a > b),
        ("=", |a, b| a == b),
        ("!=", |a, b| a != b),
    ] {
        let rows = t
            .rows(q(json!({"total_amount": {"op": op, "value": 300}})))
            .await;
        assert_eq!(
            set(&rows),
            ids_where(&model, |e| f(e.total, 300)),
            "op {op}"
        );
    }
    let rows = t
        .rows(q(json!({"customer_name": {"op": "like", "value": "Ann%"}})))
        .await;
    assert_eq!(
        set(&rows),
        ids_where(&model, |e| e
            .customer
            .as_deref()
            .is_some_and(|c| c.starts_with("Ann")))
    );
    assert!(!rows.is_empty());
    // Values are bound: SQL in a value matches nothing and breaks nothing.
    for v in [
        "x' OR '1'='1",
        "%' OR 1=1 --",
        "\"; DROP TABLE t_order_header; --",
    ] {
        assert!(t.rows(q(json!({"customer_name": v}))).await.is_empty());
        assert!(
            t.rows(q(json!({"customer_name": {"op": "like", "value": v}})))
                .await
                .is_empty()
        );
    }

    // orderBy: two keys, checked against the model.
    let rows = t
        .rows(json!({
            "table": "order_header",
            "orderBy": [
                {"field": "table_id", "direction": "asc"},
                {"field": "total_amount", "direction": "desc"},
                {"field": "id", "direction": "asc"},
            ],
        }))
        .await;
    let mut sorted = model.clone();
    sorted.sort_by(|a, b| {
        a.table_id
            .cmp(&b.table_id)
            .then(b.total.cmp(&a.total))
            .then(a.id.cmp(&b.id))
    });
    assert_eq!(
        ids(&rows),
        sorted.iter().map(|e| e.id.clone()).collect::<Vec<_>>()
    );

    // limit / offset pages: together they are the whole ordered result; has_more on all but
    // the last.
    let order_by = json!([{"field": "total_amount", "direction": "desc"}, {"field": "id"}]);
    let mut paged = Vec::new();
    let mut pages = 0;
    loop {
        let body = t
            .query(json!({
                "table": "order_header",
                "orderBy": order_by,
                "limit": 5,
                "offset": paged.len(),
            }))
            .await
            .expect(200);
        let rows = body["rows"].as_array().unwrap();
        pages += 1;
        paged.extend(ids(rows));
        let more = paged.len() < ORDERS;
        assert_eq!(body["meta"]["has_more"], json!(more), "{body}");
        assert_eq!(body["meta"]["count"], json!(rows.len()));
        assert!(body["meta"]["query_ms"].as_f64().is_some(), "{body}");
        assert_eq!(body["table"], "order_header");
        if !more {
            break;
        }
        assert_eq!(rows.len(), 5);
    }
    assert_eq!(pages, ORDERS.div_ceil(5));
    let mut by_total = model.clone();
    by_total.sort_by(|a, b| b.total.cmp(&a.total).then(a.id.cmp(&b.id)));
    assert_eq!(
        paged,
        by_total.iter().map(|e| e.id.clone()).collect::<Vec<_>>()
    );
    // An offset past the end is an empty page.
    let body = t
        .query(json!({"table": "order_header", "offset": 1000}))
        .await
        .expect(200);
    assert_eq!(body["rows"], json!([]));
    assert_eq!(body["meta"]["has_more"], false);

    // select: only the chosen columns.
    let rows = t
        .rows(json!({
            "table": "order_header",
            "select": ["id", "total_amount"],
            "where": {"table_id": "T2"},
        }))
        .await;
    assert!(!rows.is_empty());
    for r in &rows {
        let keys: BTreeSet<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, BTreeSet::from(["id", "total_amount"]), "{r}");
        let e = model.iter().find(|e| e.id == text(&r["id"])).unwrap();
        assert_eq!(int(&r["total_amount"]), e.total);
    }

    // The default limit is 100, with has_more.
    let bulk = new_order(&t, json!({"id": "q-bulk", "table_id": "T9"})).await;
    let ops: Vec<Json> = (0..120)
        .map(|i| {
            json!({"op": "insert", "table": "order_line", "row": {
                "order_id": bulk["id"], "name": format!("item {i}"), "quantity": 1, "unit_price": 0,
            }})
        })
        .collect();
    let done = t.batch(json!(ops)).await.expect(200);
    assert_eq!(done["results"].as_array().unwrap().len(), 120);
    let body = t
        .query(json!({"table": "order_line", "where": {"order_id": "q-bulk"}}))
        .await
        .expect(200);
    assert_eq!(body["rows"].as_array().unwrap().len(), 100);
    assert_eq!(body["meta"]["has_more"], true);
    assert_eq!(
        t.all_rows("order_line", json!({"order_id": "q-bulk"}))
            .await
            .len(),
        120
    );
}

// ---------------------------------------------------------------------------------------------
// Event paging
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn events_pages_walk_the_whole_log_without_gaps() {
    let edge = EdgeProcess::start();
    let t = Terminal::new(&edge, edge.admin_token());
    let empty = t.events(0, 10).await;
    assert_eq!(empty, json!({"events": [], "next": 0, "has_more": false}));

    let mut payments = BTreeMap::new();
    for o in 0..10 {
        let order = new_order(&t, json!({"table_id": format!("T{o}")})).await;
        let id = text(&order["id"]).to_owned();
        for n in 0..2 {
            t.insert(
                "order_line",
                json!({"order_id": id, "name": format!("dish {n}"), "quantity": 1, "unit_price": 700}),
            )
            .await
            .expect(201);
        }
        let p = t
            .insert(
                "order_payment",
                json!({"order_id": id, "method": "cash", "amount": 1400}),
            )
            .await
            .expect(201);
        payments.insert(text(&p["id"]).to_owned(), p);
        let v = uint(&t.get("order_header", &id).await.expect(200)["version"]);
        t.patch("order_header", &id, v, json!({"status": "closed"}))
            .await
            .expect(200);
    }

    let last = t.metric("outpost_log_last_seq").await;
    assert!(last > 50, "{last} log entries");
    assert_eq!(uint(&t.healthz().await["unsynced"]), last);

    // Small pages: seqs 1..=last, in order, each page's next is its last seq.
    for limit in [1, 7, 50, 1000] {
        let mut after = 0;
        let mut seqs = Vec::new();
        let mut pages = 0;
        loop {
            let page = t.events(after, limit).await;
            pages += 1;
            let events = page["events"].as_array().unwrap();
            assert!(events.len() as u64 <= limit);
            for e in events {
                seqs.push(uint(&e["seq"]));
                assert!(e["table"].is_string() && e["op"].is_string() && e["row"].is_object());
            }
            let next = uint(&page["next"]);
            match events.last() {
                Some(e) => assert_eq!(next, uint(&e["seq"]), "{page}"),
                None => assert_eq!(next, after),
            }
            after = next;
            if page["has_more"] != json!(true) {
                break;
            }
            assert_eq!(events.len() as u64, limit, "a page before the end is full");
        }
        assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "limit {limit}");
        assert_eq!(after, last);
        assert_eq!(pages, last.div_ceil(limit).max(1), "limit {limit}");
    }
    // A page that ends exactly at the last entry has no more.
    let exact = t.events(0, last).await;
    assert_eq!(exact["has_more"], false, "limit = the log's length");
    assert_eq!(uint(&exact["next"]), last);
    let short = t.events(0, last - 1).await;
    assert_eq!(short["has_more"], true);
    let tail = t.events(last - 1, 10).await;
    assert_eq!(tail["events"].as_array().unwrap().len(), 1);
    assert_eq!(tail["has_more"], false);
    // Past the end: nothing, and next stays where it was.
    for after in [last, last + 100] {
        let page = t.events(after, 10).await;
        assert_eq!(
            page,
            json!({"events": [], "next": after, "has_more": false})
        );
    }

    // Each payment is in the log once, as it was stored.
    let (events, _) = t.all_events(13).await;
    for (id, p) in &payments {
        let found: Vec<&Json> = events
            .iter()
            .filter(|e| e["table"] == "order_payment" && e["row"]["id"] == json!(id))
            .collect();
        assert_eq!(found.len(), 1, "payment {id}");
        assert_eq!(found[0]["op"], "insert");
        assert_eq!(&found[0]["row"], p);
    }
    // Each order's status changes are in the log, open then closed.
    let statuses: Vec<&str> = events
        .iter()
        .filter(|e| e["table"] == "order_status_log")
        .map(|e| text(&e["row"]["status"]))
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == "open").count(), 10);
    assert_eq!(statuses.iter().filter(|s| **s == "closed").count(), 10);
    // Versions of events never go backwards.
    let versions: Vec<u64> = events.iter().map(|e| uint(&e["version"])).collect();
    assert!(versions.windows(2).all(|w| w[0] <= w[1]), "{versions:?}");
}

// ---------------------------------------------------------------------------------------------
// Fixed bugs
// ---------------------------------------------------------------------------------------------

/// Errors are JSON everywhere (CONTRACT 2): a wrong method on `/healthz` or `/metrics` once
/// got an empty 405, when only the `/api` router had the JSON method-not-allowed fallback.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_method_on_health_routes_is_a_json_error() {
    let edge = EdgeProcess::start();
    let http = client();
    for path in ["/healthz", "/metrics"] {
        let (status, code, body) =
            check(&http, Method::POST, &edge.url(path), Who::Nobody, NONE).await;
        assert_eq!(status, 405, "{path}");
        assert_eq!(code, "method_not_allowed", "{path}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}
