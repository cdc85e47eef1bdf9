//! The newcomer's first command: a hub and several branches on loopback, in this process,
//! with embedded storage and no configuration. Each branch is a real edge (store, terminal
//! HTTP API, sync client over QUIC with mutual TLS through a UDP relay); simulated tills run a
//! rush hour over HTTP, kitchens mark items sold out (a shared table), head office changes a
//! price. A third of the way in one branch is cut off from the hub; later the link heals.
//! At the end everything must have arrived exactly once: the report checks it against the
//! hub's query API and every edge, then prints the dashboard's address.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edge::identity::EdgeIdentity;
use edge::store::{Store, StoreConfig};
use edge::sync::{SyncClient, SyncStatus};
use hub::identity::HubIdentity;
use hub::store::{HubStore, SqliteHubStore};
use hub::sync::SyncServer;
use parking_lot::Mutex;
use serde_json::{Value as Json, json};
use shared::BranchId;

use crate::proxy::UdpRelay;

pub struct DemoConfig {
    /// Where to keep the databases (a temporary directory by default).
    pub data_dir: Option<PathBuf>,
    pub branches: usize,
    pub duration: Duration,
    /// Tills per branch.
    pub tills: usize,
    /// Each till starts an order this often (a busy till; the load generator runs flat out).
    pub pace: Duration,
    /// Print progress lines while it runs.
    pub progress: bool,
}

/// What one branch's tills got acknowledged (2xx): the truth the hub is checked against.
#[derive(Debug, Default)]
pub(crate) struct Accepted {
    pub(crate) orders: u64,
    pub(crate) payments: BTreeMap<String, i64>,
    /// Payments whose answer never came (the edge was killed mid-request): they may or may
    /// not have committed.
    pub(crate) in_doubt: BTreeMap<String, i64>,
    pub(crate) errors: u64,
}

/// The demo's final state and checks.
pub struct Report {
    pub branches: Vec<BranchLine>,
    pub seconds: f64,
    pub partitioned: String,
    pub dropped_packets: u64,
    pub failures: Vec<String>,
    pub dashboard: String,
    pub hub_url: String,
    pub token: String,
}

pub struct BranchLine {
    pub branch: String,
    pub orders: u64,
    pub payments: usize,
    pub takings: i64,
    pub last_seq: u64,
    pub hub_seq: u64,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "\n== Outpost demo: {} branches, {:.0} s of rush hour ==",
            self.branches.len(),
            self.seconds
        )?;
        writeln!(
            f,
            "{:<7} {:>7} {:>9} {:>12} {:>10} {:>10}",
            "branch", "orders", "payments", "takings", "edge seq", "hub seq"
        )?;
        for b in &self.branches {
            writeln!(
                f,
                "{:<7} {:>7} {:>9} {:>9}.{:02} {:>10} {:>10}",
                b.branch,
                b.orders,
                b.payments,
                b.takings / 100,
                b.takings % 100,
                b.last_seq,
                b.hub_seq
            )?;
        }
        writeln!(
            f,
            "partition: {} was cut off from the hub for a third of the run ({} packets dropped) and kept serving",
            self.partitioned, self.dropped_packets
        )?;
        if self.ok() {
            writeln!(
                f,
                "checks: all passed (every acknowledged payment at the hub exactly once, sums per branch, \
                 synced_seq = edge last seq, chains verified, menu price and shared rows everywhere)"
            )?;
        } else {
            for e in &self.failures {
                writeln!(f, "FAILED: {e}")?;
            }
        }
        writeln!(f, "dashboard: {}", self.dashboard)?;
        write!(
            f,
            "head-office API: {} (Authorization: Bearer {})",
            self.hub_url, self.token
        )
    }
}

struct Branch {
    id: BranchId,
    store: Store,
    url: String,
    token: String,
    relay: UdpRelay,
    sync: Arc<SyncStatus>,
    accepted: Arc<Mutex<Accepted>>,
}

pub(crate) fn err(e: impl fmt::Display) -> String {
    e.to_string()
}

/// One till: open an order with lines (one batch), pay it, close it; again until `stop`.
pub(crate) async fn till(
    http: reqwest::Client,
    b: (String, String, String),
    n: usize,
    accepted: Arc<Mutex<Accepted>>,
    stop: Arc<AtomicBool>,
    pace: Duration,
) {
    let mut ticker = tokio::time::interval(pace);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (url, token, branch) = b;
    let base = format!("{url}/api/branches/{branch}/modules/pos");
    let auth = format!("Bearer {token}");
    let mut cycle = 0u64;
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        cycle += 1;
        let order = format!("{branch}-t{n}-o{cycle}");
        let post = |path: String, body: Json| {
            http.post(format!("{base}{path}"))
                .header("Authorization", &auth)
                .json(&body)
                .send()
        };
        let lines = 1 + (cycle as usize + n) % 4;
        let mut ops = vec![
            json!({"op":"insert","table":"order_header","row":{"id": order, "table_id": format!("T{}", (cycle as usize + n) % 30)}}),
        ];
        for l in 0..lines {
            ops.push(json!({"op":"insert","table":"order_line","row":{
                "id": format!("{order}-l{l}"), "order_id": order, "item_id": format!("m{}", l % 5),
                "quantity": 1 + l % 3, "unit_price": 450 + 125 * (l % 4) as i64,
                "station_id": if l % 2 == 0 { "grill" } else { "bar" }}}));
        }
        let opened = match post("/batch".into(), json!({"ops": ops})).await {
            Ok(r) if r.status().is_success() => r.json::<Json>().await.ok(),
            _ => None,
        };
        let Some(opened) = opened else {
            accepted.lock().errors += 1;
            continue;
        };
        accepted.lock().orders += 1;
        let total = opened["results"][0]["total_amount"].as_i64().unwrap_or(0);
        let version = opened["results"][0]["version"].as_u64().unwrap_or(1);
        let pay = format!("{order}-p");
        let paid = post(
            "/tables/order_payment".into(),
            json!({"id": pay, "order_id": order, "amount": total, "method": if cycle.is_multiple_of(3) { "cash" } else { "card" }}),
        )
        .await;
        match paid {
            Ok(r) if r.status().is_success() => {
                accepted.lock().payments.insert(pay, total);
            }
            Ok(_) => {
                accepted.lock().errors += 1;
                continue;
            }
            Err(_) => {
                let mut a = accepted.lock();
                a.errors += 1;
                a.in_doubt.insert(pay, total);
                continue;
            }
        }
        let closed = http
            .patch(format!("{base}/tables/order_header/{order}"))
            .header("Authorization", &auth)
            .json(&json!({"version": version + 1, "set": {"status": "closed"}}))
            .send()
            .await;
        if !closed.is_ok_and(|r| r.status().is_success()) {
            accepted.lock().errors += 1;
        }
    }
}

pub(crate) async fn json_get(
    http: &reqwest::Client,
    url: &str,
    token: &str,
) -> Result<Json, String> {
    http.get(url)
        .header("Authorization", format!("Bearer {token}"))
        .send()
        .await
        .map_err(err)?
        .json()
        .await
        .map_err(err)
}

pub(crate) async fn json_send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Json,
) -> Result<Json, String> {
    let r = http
        .request(method, url)
        .header("Authorization", format!("Bearer {token}"))
        .json(&body)
        .send()
        .await
        .map_err(err)?;
    let status = r.status();
    let body: Json = r.json().await.map_err(err)?;
    if !status.is_success() {
        return Err(format!("{url}: {status} {body}"));
    }
    Ok(body)
}

/// The hub's query API, for the end-of-run checks.
pub(crate) struct HubQuery<'a> {
    pub http: &'a reqwest::Client,
    pub url: &'a str,
    pub token: &'a str,
}

/// The hub's payment count and sum per branch, from one query.
pub(crate) async fn hub_payment_totals(hub: &HubQuery<'_>) -> Result<Json, String> {
    json_send(
        hub.http,
        reqwest::Method::POST,
        &format!("{}/api/query", hub.url),
        hub.token,
        json!({"table": "order_payment", "groupBy": ["branch"],
               "aggregates": [{"fn": "count", "as": "n"}, {"fn": "sum", "field": "amount", "as": "total"}]}),
    )
    .await
}

/// Checks one branch's payments at the hub against what its tills were told: every
/// acknowledged payment id is there, and the count and the sum are the acknowledged ones plus
/// at most the payments in doubt (their answer was lost, e.g. to a kill -9: committed or not).
/// `totals` is [`hub_payment_totals`]' answer. Violations are pushed to `violations`; returns
/// the hub's count and sum for the branch.
pub(crate) async fn check_payments_at_hub(
    hub: &HubQuery<'_>,
    branch: &str,
    totals: &Json,
    acknowledged: &BTreeMap<String, i64>,
    in_doubt: &BTreeMap<String, i64>,
    violations: &mut Vec<String>,
) -> Result<(u64, i64), String> {
    let row = totals["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["branch"] == branch));
    let (n, total) = row.map_or((0, 0), |r| {
        (
            r["n"].as_u64().unwrap_or(0),
            r["total"].as_i64().unwrap_or(0),
        )
    });
    let takings: i64 = acknowledged.values().sum();
    let doubt_n = in_doubt.len() as u64;
    let doubt_sum: i64 = in_doubt.values().sum();
    let count_ok = n >= acknowledged.len() as u64 && n <= acknowledged.len() as u64 + doubt_n;
    let sum_ok = total >= takings && total <= takings + doubt_sum;
    if !count_ok || !sum_ok {
        violations.push(format!(
            "{branch}: the hub holds {n} payments summing {total}; {} summing {takings} were \
             acknowledged and {doubt_n} summing {doubt_sum} are in doubt",
            acknowledged.len()
        ));
    }
    // Every acknowledged payment id is at the hub (ids are unique per branch there).
    let ids: Vec<&String> = acknowledged.keys().collect();
    for chunk in ids.chunks(1000) {
        let found = json_send(
            hub.http,
            reqwest::Method::POST,
            &format!("{}/api/query", hub.url),
            hub.token,
            json!({"table": "order_payment", "branch": branch, "where": {"id": chunk},
                   "aggregates": [{"fn": "count", "as": "n"}]}),
        )
        .await?;
        let n = found["rows"][0]["n"].as_u64().unwrap_or(0);
        if n != chunk.len() as u64 {
            violations.push(format!(
                "{branch}: only {n} of {} acknowledged payment ids are at the hub",
                chunk.len()
            ));
        }
    }
    Ok((n, total))
}

/// A kitchen marks an item available or sold out (a shared row: insert it the first time,
/// compare-and-set it after). A lost race with another writer is simply skipped.
pub(crate) async fn set_availability(
    http: &reqwest::Client,
    (base, branch, token): (&str, &str, &str),
    item: &str,
    available: bool,
) {
    let url = format!("{base}/api/branches/{branch}/modules/pos/tables/item_availability");
    let current = json_get(http, &format!("{url}/{item}"), token).await;
    let body = json!({"available": available, "reason": format!("kitchen {branch}")});
    let _ = match current {
        Ok(row) if row["version"].is_u64() => {
            json_send(
                http,
                reqwest::Method::PATCH,
                &format!("{url}/{item}"),
                token,
                json!({"version": row["version"], "set": body}),
            )
            .await
        }
        _ => {
            let mut row = body;
            row["id"] = json!(item);
            json_send(http, reqwest::Method::POST, &url, token, row).await
        }
    };
}

/// Serves the hub's `router` on a free loopback port with the same HTTP server (and limits)
/// as `outpost-hub`, counting its connections in `connections` (the edges serve theirs with
/// `edge::server::serve_api`, as `outpost-edge serve` does).
async fn serve_http(
    router: axum::Router,
    connections: std::sync::Arc<edge::http::ConnMetrics>,
) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(err)?;
    let addr = listener.local_addr().map_err(err)?;
    let limits = edge::http::Limits::for_this_process();
    tokio::spawn(edge::http::serve(
        listener,
        router,
        limits,
        connections,
        std::future::pending(),
    ));
    Ok(addr)
}

/// A running demo: the hub, the branches, and what stops them.
pub struct Demo {
    pub report: Report,
    stop_sync: tokio::sync::watch::Sender<bool>,
    syncs: Vec<tokio::task::JoinHandle<Result<(), String>>>,
    stores: Vec<Store>,
    _dir: Option<tempfile::TempDir>,
}

impl Demo {
    /// Stops the sync clients and closes the stores.
    pub async fn shutdown(self) {
        let _ = self.stop_sync.send(true);
        for s in self.syncs {
            let _ = s.await;
        }
        for s in self.stores {
            let _ = tokio::task::spawn_blocking(move || s.close()).await;
        }
    }
}

pub async fn run(config: DemoConfig) -> Result<Demo, String> {
    let (tmp, root) = match &config.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(err)?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("outpost-demo-")
                .tempdir()
                .map_err(err)?;
            let p = t.path().to_owned();
            (Some(t), p)
        }
    };
    let schema = Arc::new(shared::pos::schema());
    let say = |s: String| {
        if config.progress {
            println!("{s}");
        }
    };

    // The hub.
    let hub_dir = root.join("hub");
    let identity = HubIdentity::init_or_load(&hub_dir).map_err(err)?;
    let store: Arc<dyn HubStore> =
        Arc::new(SqliteHubStore::open(&hub_dir.join("hub.db"), schema.clone()).map_err(err)?);
    let server = SyncServer::new(store.clone());
    let endpoint =
        SyncServer::bind(&identity, "127.0.0.1:0".parse().expect("address")).map_err(err)?;
    let quic = endpoint.local_addr().map_err(err)?;
    tokio::spawn(server.clone().serve(endpoint));
    let mut token_bytes = [0u8; 16];
    getrandom::fill(&mut token_bytes).map_err(err)?;
    let hub_token: String = token_bytes.iter().map(|b| format!("{b:02x}")).collect();
    let connections = std::sync::Arc::<edge::http::ConnMetrics>::default();
    let hub_http = serve_http(
        hub::api::router(hub::api::Hub {
            store: store.clone(),
            sync: server.clone(),
            admin_token_hash: *blake3::hash(hub_token.as_bytes()).as_bytes(),
            connections: connections.clone(),
        }),
        connections,
    )
    .await?;
    let hub_url = format!("http://{hub_http}");
    say(format!("hub: {hub_url} (QUIC {quic})"));

    // Branches, each through a relay that can cut it off.
    let (stop_sync, sync_stopped) = tokio::sync::watch::channel(false);
    let mut branches = Vec::new();
    let mut syncs = Vec::new();
    for i in 1..=config.branches {
        let id = BranchId::parse(&format!("B{i:03}")).map_err(err)?;
        let dir = root.join(id.as_str());
        let enrolled = identity
            .enroll(&id, &dir.join("identity"), Duration::from_secs(86_400))
            .map_err(err)?;
        store.enroll(&id, enrolled.fingerprint).map_err(err)?;
        let edge_store = Store::open(StoreConfig::new(
            dir.join("edge.db"),
            id.clone(),
            schema.clone(),
        ))
        .map_err(err)?;
        let token = edge_store.create_token(shared::Role::Admin).map_err(err)?;
        let relay = UdpRelay::start(quic).await.map_err(err)?;
        let client = SyncClient::new(
            edge_store.clone(),
            EdgeIdentity::load(&dir.join("identity")).map_err(err)?,
            relay.addr(),
            env!("CARGO_PKG_VERSION"),
        );
        let sync = client.status.clone();
        syncs.push(tokio::spawn(client.run(sync_stopped.clone())));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(err)?;
        let http = listener.local_addr().map_err(err)?;
        tokio::spawn(edge::server::serve_api(
            listener,
            edge_store.clone(),
            id.clone(),
            Some(sync.clone()),
            std::future::pending(),
        ));
        say(format!("edge {id}: http://{http}"));
        branches.push(Branch {
            id,
            store: edge_store,
            url: format!("http://{http}"),
            token,
            relay,
            sync,
            accepted: Arc::new(Mutex::new(Accepted::default())),
        });
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .map_err(err)?;

    // Head office's menu, before the rush.
    for (m, name, price) in [
        ("m0", "Soup", 450),
        ("m1", "Burger", 1250),
        ("m2", "Salad", 875),
        ("m3", "Lemonade", 300),
        ("m4", "Cake", 550),
    ] {
        json_send(
            &http,
            reqwest::Method::PUT,
            &format!("{hub_url}/api/modules/pos/tables/menu_item/{m}"),
            &hub_token,
            json!({"name": name, "price": price, "station_id": "grill", "active": true}),
        )
        .await?;
    }

    // The rush hour.
    let stop = Arc::new(AtomicBool::new(false));
    let mut tills = Vec::new();
    for b in &branches {
        for n in 0..config.tills {
            tills.push(tokio::spawn(till(
                http.clone(),
                (b.url.clone(), b.token.clone(), b.id.to_string()),
                n,
                b.accepted.clone(),
                stop.clone(),
                config.pace,
            )));
        }
    }
    let started = Instant::now();
    let cut_target = branches.get(1).or(branches.first()).expect("a branch");
    let partitioned = cut_target.id.to_string();
    let third = config.duration / 3;
    let mut cut_done = false;
    let mut healed = false;
    let mut price_set = false;
    let sold_out_seq = AtomicU64::new(0);
    while started.elapsed() < config.duration {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let t = started.elapsed();
        if !cut_done && t >= third {
            cut_target.relay.set_cut(true);
            cut_done = true;
            say(format!("-- {partitioned} is cut off from the hub --"));
        }
        if cut_done && !healed && t >= third * 2 {
            cut_target.relay.set_cut(false);
            healed = true;
            say(format!("-- {partitioned}'s link heals --"));
        }
        if !price_set && t >= config.duration / 2 {
            // Head office raises a price while one branch is unreachable.
            json_send(
                &http,
                reqwest::Method::PUT,
                &format!("{hub_url}/api/modules/pos/tables/menu_item/m1"),
                &hub_token,
                json!({"price": 1350}),
            )
            .await?;
            price_set = true;
            say("-- head office raises the burger to 13.50 --".into());
        }
        // A kitchen marks an item sold out, or back; head office too, now and then.
        let k = sold_out_seq.fetch_add(1, Ordering::Relaxed);
        let b = &branches[k as usize % branches.len()];
        set_availability(
            &http,
            (&b.url, b.id.as_str(), &b.token),
            &format!("m{}", k % 5),
            k.is_multiple_of(2),
        )
        .await;
        if k.is_multiple_of(4) {
            let _ = json_send(
                &http,
                reqwest::Method::PUT,
                &format!(
                    "{hub_url}/api/modules/pos/tables/item_availability/m{}",
                    k % 5
                ),
                &hub_token,
                json!({"available": k.is_multiple_of(8), "reason": "head office"}),
            )
            .await;
        }
        if config.progress {
            let mut line = format!("{:>4.0} s ", t.as_secs_f64());
            for b in &branches {
                let a = b.accepted.lock();
                let status = b.store.log_status();
                line.push_str(&format!(
                    " | {} {:>5} orders {:>5} paid {:>5} unsynced {}",
                    b.id,
                    a.orders,
                    a.payments.len(),
                    status.last_seq.0.saturating_sub(status.acked_seq.0),
                    if b.sync.connected.load(Ordering::Relaxed) {
                        "up  "
                    } else {
                        "DOWN"
                    }
                ));
            }
            println!("{line}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tills {
        let _ = t.await;
    }
    cut_target.relay.set_cut(false);
    let seconds = started.elapsed().as_secs_f64();
    say("-- rush hour over; waiting for every branch to sync --".into());

    // Quiescence: every edge's log is at the hub and acknowledged, and the feeds are applied.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut failures = Vec::new();
    loop {
        let infos = {
            let s = store.clone();
            tokio::task::spawn_blocking(move || s.branches())
                .await
                .map_err(err)?
                .map_err(err)?
        };
        let synced = branches.iter().all(|b| {
            let st = b.store.log_status();
            let hub = infos.iter().find(|i| i.branch == b.id);
            st.sealed_seq == st.last_seq
                && st.acked_seq == st.last_seq
                && hub.is_some_and(|h| {
                    h.synced_seq == st.last_seq
                        && h.materialised_seq == h.synced_seq
                        && h.feed_acked_seq == h.feed_seq
                })
        });
        if synced {
            break;
        }
        if Instant::now() > deadline {
            failures.push("the branches did not converge within 120 s after healing".into());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Checks against the real APIs.
    let hub = HubQuery {
        http: &http,
        url: &hub_url,
        token: &hub_token,
    };
    let q = hub_payment_totals(&hub).await?;
    let infos = {
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.branches())
            .await
            .map_err(err)?
            .map_err(err)?
    };
    let mut lines = Vec::new();
    for b in &branches {
        let (orders, payments, in_doubt) = {
            let a = b.accepted.lock();
            (a.orders, a.payments.clone(), a.in_doubt.clone())
        };
        let takings: i64 = payments.values().sum();
        check_payments_at_hub(&hub, b.id.as_str(), &q, &payments, &in_doubt, &mut failures).await?;
        let st = b.store.log_status();
        let hub_seq = infos
            .iter()
            .find(|i| i.branch == b.id)
            .map_or(0, |i| i.synced_seq.0);
        if hub_seq != st.last_seq.0 {
            failures.push(format!(
                "{}: the hub's synced_seq {hub_seq} is not the edge's last seq {}",
                b.id, st.last_seq
            ));
        }
        {
            let s = b.store.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || s.verify_log())
                .await
                .map_err(err)?
            {
                failures.push(format!("{}: the edge's chain does not verify: {e}", b.id));
            }
        }
        let m1 = json_get(
            &http,
            &format!(
                "{}/api/branches/{}/modules/pos/tables/menu_item/m1",
                b.url, b.id
            ),
            &b.token,
        )
        .await?;
        if m1["price"] != 1350 {
            failures.push(format!(
                "{}: the burger costs {} at the edge, not head office's 1350",
                b.id, m1["price"]
            ));
        }
        lines.push(BranchLine {
            branch: b.id.to_string(),
            orders,
            payments: payments.len(),
            takings,
            last_seq: st.last_seq.0,
            hub_seq,
        });
    }
    // Shared rows agree everywhere.
    let hub_avail = json_send(
        &http,
        reqwest::Method::POST,
        &format!("{hub_url}/api/query"),
        &hub_token,
        json!({"table": "item_availability", "limit": 1000, "orderBy": [{"field": "id", "direction": "asc"}]}),
    )
    .await?;
    let strip = |rows: &Json| -> Vec<(String, Json, Json)> {
        rows.as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        (
                            r["id"].as_str().unwrap_or("").to_owned(),
                            r["available"].clone(),
                            r["reason"].clone(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let hub_rows = strip(&hub_avail["rows"]);
    for b in &branches {
        let edge_avail = json_send(
            &http,
            reqwest::Method::POST,
            &format!("{}/api/branches/{}/modules/pos/query", b.url, b.id),
            &b.token,
            json!({"table": "item_availability", "limit": 1000, "orderBy": [{"field": "id", "direction": "asc"}]}),
        )
        .await?;
        if strip(&edge_avail["rows"]) != hub_rows {
            failures.push(format!(
                "{}: its shared rows differ from the hub's: {} vs {}",
                b.id, edge_avail["rows"], hub_avail["rows"]
            ));
        }
    }
    let report = Report {
        branches: lines,
        seconds,
        partitioned,
        dropped_packets: cut_target.relay.dropped.load(Ordering::Relaxed),
        failures,
        dashboard: format!("{hub_url}/#token={hub_token}"),
        hub_url,
        token: hub_token,
    };
    Ok(Demo {
        report,
        stop_sync,
        syncs,
        stores: branches.iter().map(|b| b.store.clone()).collect(),
        _dir: tmp,
    })
}
