//! The load generator: N keep-alive HTTP clients run a till's order cycle (open an order with
//! its lines in one batch, the kitchen moves a line along, take the payment, close the order)
//! while M WebSocket subscribers follow the orders. Reports write throughput, request latency
//! percentiles, and feed delivery latency (receipt time minus the commit's `updated_at`, both
//! read from this machine's clock).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value as Json, json};
use tokio_tungstenite::tungstenite::Message;

pub struct LoadConfig {
    /// An edge to load; `None` starts one in this process on loopback.
    pub url: Option<String>,
    pub token: Option<String>,
    pub clients: usize,
    pub subscribers: usize,
    pub seconds: u64,
    /// Target writes per second across all clients; `None` runs flat out.
    pub rate: Option<f64>,
    pub ids: Ids,
}

/// How the tills name the rows they create (an order's lines and payment are named after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ids {
    /// Time-ordered UUIDv7, as the edge names rows itself and as terminals should.
    V7,
    /// `c<till>-o<cycle>`: each till's orders in a key range of their own, so a group's rows
    /// land on a different page per till in every B-tree keyed or indexed by id.
    Till,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub writes: u64,
    pub seconds: f64,
    pub request_us: Vec<u64>,
    pub delivery_us: Vec<u64>,
    pub frames: u64,
    pub errors: u64,
    pub encodes_per_commit: Option<f64>,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "durable writes       {} in {:.1} s = {:.0}/s",
            self.writes,
            self.seconds,
            self.writes as f64 / self.seconds
        )?;
        writeln!(
            f,
            "request latency ms   p50 {:.2}  p99 {:.2}  p99.9 {:.2}",
            percentile(&self.request_us, 0.5),
            percentile(&self.request_us, 0.99),
            percentile(&self.request_us, 0.999)
        )?;
        writeln!(
            f,
            "feed delivery ms     p50 {:.2}  p99 {:.2}  p99.9 {:.2}  ({} frames)",
            percentile(&self.delivery_us, 0.5),
            percentile(&self.delivery_us, 0.99),
            percentile(&self.delivery_us, 0.999),
            self.frames
        )?;
        if let Some(e) = self.encodes_per_commit {
            writeln!(f, "feed encodes/commit  {e:.2}")?;
        }
        write!(f, "errors               {}", self.errors)
    }
}

/// Starts an edge on loopback in this process; returns its URL and admin token.
async fn local_edge() -> Result<(String, String), String> {
    let dir = std::env::temp_dir().join(format!("outpost-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let branch = shared::BranchId::parse("B001").expect("valid id");
    let store = edge::server::open_data_dir(&dir, &branch, Arc::new(shared::pos::schema()))
        .map_err(|e| e.to_string())?;
    let token = store
        .create_token(shared::Role::Admin)
        .map_err(|e| e.to_string())?;
    let app = edge::server::router(store, branch, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = axum::serve(edge::server::no_delay(listener), app).await;
    });
    Ok((format!("http://{addr}"), token))
}

/// One till: order cycles until `stop`; returns (writes, latencies in µs, errors).
async fn till(
    http: reqwest::Client,
    base: String,
    token: String,
    n: usize,
    ids: Ids,
    // (first request after, then one every): paced tills start staggered across one period,
    // as terminals do, rather than in lockstep bursts that every group commit would absorb.
    pace: Option<(Duration, Duration)>,
    stop: Arc<AtomicBool>,
) -> (u64, Vec<u64>, u64) {
    let (mut writes, mut lat, mut errors) = (0u64, Vec::new(), 0u64);
    let mut ticker = pace.map(|(offset, period)| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut cycle = 0u64;
    let auth = format!("Bearer {token}");
    while !stop.load(Ordering::Relaxed) {
        cycle += 1;
        let order = match ids {
            Ids::V7 => uuid::Uuid::now_v7().to_string(),
            Ids::Till => format!("c{n}-o{cycle}"),
        };
        let mut call = async |method: reqwest::Method, path: String, body: Json| -> Option<Json> {
            if let Some(t) = ticker.as_mut() {
                t.tick().await;
            }
            let t = Instant::now();
            let r = http
                .request(method, format!("{base}{path}"))
                .header("Authorization", &auth)
                .json(&body)
                .send()
                .await;
            lat.push(t.elapsed().as_micros() as u64);
            match r {
                Ok(r) if r.status().is_success() => {
                    writes += 1;
                    r.json().await.ok()
                }
                _ => {
                    errors += 1;
                    None
                }
            }
        };
        let b = "/api/branches/B001/modules/pos";
        let lines: Vec<Json> = (0..3)
            .map(|l| json!({"op":"insert","table":"order_line","row":{"id": format!("{order}-l{l}"),"order_id": order,"item_id": format!("i{l}"),"quantity": 1 + l,"unit_price": 450 + 100 * l,"station_id": if l == 0 { "grill" } else { "bar" }}}))
            .collect();
        let mut ops = vec![
            json!({"op":"insert","table":"order_header","row":{"id": order, "table_id": format!("T{}", n % 40)}}),
        ];
        ops.extend(lines);
        let Some(opened) = call(
            reqwest::Method::POST,
            format!("{b}/batch"),
            json!({"ops": ops}),
        )
        .await
        else {
            continue;
        };
        let total = opened["results"][0]["total_amount"].as_i64().unwrap_or(0);
        let version = opened["results"][0]["version"].as_u64().unwrap_or(1);
        call(
            reqwest::Method::PATCH,
            format!("{b}/tables/order_line/{order}-l0"),
            json!({"version": 1, "set": {"status": "preparing"}}),
        )
        .await;
        call(reqwest::Method::POST, format!("{b}/tables/order_payment"), json!({"id": format!("{order}-p"), "order_id": order, "amount": total, "method": "card"})).await;
        call(
            reqwest::Method::PATCH,
            format!("{b}/tables/order_header/{order}"),
            json!({"version": version + 1, "set": {"status": "closed"}}),
        )
        .await;
    }
    (writes, lat, errors)
}

/// One subscriber: follows order headers; returns (frames, delivery latencies in µs).
async fn subscriber(ws_url: String, stop: Arc<AtomicBool>) -> Result<(u64, Vec<u64>), String> {
    // tungstenite clears its whole read buffer (128 KiB by default) on every read; with frames
    // of a few hundred bytes a small buffer keeps the generator's own cost down.
    let config =
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(8192);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(ws_url, Some(config), false)
        .await
        .map_err(|e| e.to_string())?;
    let sub = json!({"type":"subscribe","sub":"s","module":"pos","tables":["order_header"]});
    ws.send(Message::Text(sub.to_string().into()))
        .await
        .map_err(|e| e.to_string())?;
    let (mut frames, mut lat) = (0u64, Vec::new());
    while !stop.load(Ordering::Relaxed) {
        let msg = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Err(_) => continue,
            Ok(None) | Ok(Some(Err(_))) => break,
            Ok(Some(Ok(m))) => m,
        };
        let Message::Text(t) = msg else { continue };
        let now = shared::Timestamp(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_micros() as i64,
        );
        // A tablet would parse the frame; the generator only needs the commit stamp, and
        // parsing 100 clients' frames on the edge's own cores would distort what it measures.
        if !t.starts_with("{\"type\":\"delta\"") {
            continue;
        }
        frames += 1;
        const KEY: &str = "\"updated_at\":\"";
        let stamp = t
            .find(KEY)
            .and_then(|i| t.get(i + KEY.len()..i + KEY.len() + 27));
        if let Some(ts) = stamp.and_then(shared::Timestamp::parse_rfc3339) {
            lat.push((now.0 - ts.0).max(0) as u64);
        }
    }
    Ok((frames, lat))
}

async fn metric(http: &reqwest::Client, base: &str, name: &str) -> Option<f64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

pub async fn run(config: LoadConfig) -> Result<LoadReport, String> {
    let (base, token) = match (config.url, config.token) {
        (Some(u), Some(t)) => (u.trim_end_matches('/').to_owned(), t),
        (Some(_), None) => return Err("--url needs --token".into()),
        (None, _) => local_edge().await?,
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(config.clients)
        .build()
        .map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let ws_base = base.replacen("http://", "ws://", 1);
    let subs: Vec<_> = (0..config.subscribers)
        .map(|_| {
            tokio::spawn(subscriber(
                format!("{ws_base}/ws?token={token}"),
                stop.clone(),
            ))
        })
        .collect();
    let (commits0, encodes0) = (
        metric(&http, &base, "outpost_feed_commits_total").await,
        metric(&http, &base, "outpost_feed_encodes_total").await,
    );
    let started = Instant::now();
    let tills: Vec<_> = (0..config.clients)
        .map(|n| {
            let pace = config.rate.map(|r| {
                let period = Duration::from_secs_f64(config.clients as f64 / r);
                (period * n as u32 / config.clients as u32, period)
            });
            tokio::spawn(till(
                http.clone(),
                base.clone(),
                token.clone(),
                n,
                config.ids,
                pace,
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(config.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut report = LoadReport::default();
    for t in tills {
        let (w, lat, e) = t.await.map_err(|e| e.to_string())?;
        report.writes += w;
        report.request_us.extend(lat);
        report.errors += e;
    }
    report.seconds = started.elapsed().as_secs_f64();
    for s in subs {
        let (frames, lat) = s.await.map_err(|e| e.to_string())??;
        report.frames += frames;
        report.delivery_us.extend(lat);
    }
    report.request_us.sort_unstable();
    report.delivery_us.sort_unstable();
    let (commits1, encodes1) = (
        metric(&http, &base, "outpost_feed_commits_total").await,
        metric(&http, &base, "outpost_feed_encodes_total").await,
    );
    if let (Some(c0), Some(c1), Some(e0), Some(e1)) = (commits0, commits1, encodes0, encodes1)
        && c1 > c0
    {
        report.encodes_per_commit = Some((e1 - e0) / (c1 - c0));
    }
    Ok(report)
}
