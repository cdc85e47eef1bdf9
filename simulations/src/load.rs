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
use serde_json::json;
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
    /// The edge's own account of the run, from its `/metrics` before and after.
    pub edge: Option<EdgeStages>,
}

/// Where a commit's time went on the edge during the run: means over the run.
#[derive(Debug, Default, Clone, Copy)]
pub struct EdgeStages {
    pub group_size: f64,
    /// Applying a group and its COMMIT statement (the fsync runs beside the next group).
    pub group_commit_ms: f64,
    /// The COMMIT statement alone: writing the WAL frames.
    pub commit_write_ms: f64,
    /// One WAL fsync, and how many groups each covered.
    pub fsync_ms: f64,
    pub groups_per_fsync: f64,
    /// From the start of a commit's group to its fan-out to terminal queues.
    pub feed_lag_ms: Option<f64>,
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
        if let Some(s) = self.edge {
            write!(
                f,
                "edge, means          groups of {:.1}, group {:.2} ms (its COMMIT {:.2} ms), fsync {:.2} ms ({:.1} groups each)",
                s.group_size, s.group_commit_ms, s.commit_write_ms, s.fsync_ms, s.groups_per_fsync
            )?;
            if let Some(lag) = s.feed_lag_ms {
                write!(f, ", commit to feed fan-out {lag:.2} ms")?;
            }
            writeln!(f)?;
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        edge::server::serve_api(listener, store, branch, None, std::future::pending()).await;
    });
    Ok((format!("http://{addr}"), token))
}

/// What the cycle reads from the batch that opens an order: the header's total and version.
#[derive(serde::Deserialize)]
struct Opened {
    results: Vec<OpenedHeader>,
}

/// A row of that answer: the header first, then its lines (which have no total).
#[derive(serde::Deserialize)]
struct OpenedHeader {
    total_amount: Option<i64>,
    version: Option<u64>,
}

/// One keep-alive HTTP/1.1 connection, driven by hyper's own client connection: no pool, no
/// URL parsing per request, so the generator takes as little as it can of the cores it
/// shares with the edge. It reconnects after an error.
struct Conn {
    addr: String,
    auth: http::HeaderValue,
    host: http::HeaderValue,
    sender: Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>>,
}

impl Conn {
    fn new(base: &str, token: &str) -> Result<Conn, String> {
        let addr = base
            .strip_prefix("http://")
            .ok_or_else(|| format!("the load generator speaks plain http://, not {base}"))?
            .trim_end_matches('/')
            .to_owned();
        let header = |v: String| http::HeaderValue::try_from(v).map_err(|e| e.to_string());
        Ok(Conn {
            auth: header(format!("Bearer {token}"))?,
            host: header(addr.clone())?,
            addr,
            sender: None,
        })
    }

    /// Sends one request; `Some(body)` when it succeeded (2xx).
    async fn call(
        &mut self,
        method: http::Method,
        path: &str,
        body: String,
    ) -> Option<bytes::Bytes> {
        use http_body_util::BodyExt;
        if self.sender.is_none() {
            let tcp = tokio::net::TcpStream::connect(&self.addr).await.ok()?;
            tcp.set_nodelay(true).ok()?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .ok()?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut()?;
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.host.clone())
            .header(http::header::AUTHORIZATION, self.auth.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .ok()?;
        let answer = async {
            sender.ready().await.ok()?;
            let response = sender.send_request(request).await.ok()?;
            let ok = response.status().is_success();
            let body = response.into_body().collect().await.ok()?.to_bytes();
            Some((ok, body))
        }
        .await;
        match answer {
            Some((ok, body)) => ok.then_some(body),
            None => {
                self.sender = None;
                None
            }
        }
    }
}

/// One till: order cycles until `stop`; returns (writes, latencies in µs, errors).
async fn till(
    mut conn: Conn,
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
    while !stop.load(Ordering::Relaxed) {
        cycle += 1;
        let order = match ids {
            Ids::V7 => uuid::Uuid::now_v7().to_string(),
            Ids::Till => format!("c{n}-o{cycle}"),
        };
        // Bodies are formatted straight to text and only the one answer the cycle needs is
        // parsed (into a typed struct): the generator shares the edge's two cores, and every
        // microsecond it spends is one the edge does not get.
        let mut call = async |method: http::Method, path: String, body: String| {
            if let Some(t) = ticker.as_mut() {
                t.tick().await;
            }
            let t = Instant::now();
            let r = conn.call(method, &path, body).await;
            lat.push(t.elapsed().as_micros() as u64);
            if r.is_some() {
                writes += 1;
            } else {
                errors += 1;
            }
            r
        };
        let b = "/api/branches/B001/modules/pos";
        let mut ops = format!(
            r#"{{"ops":[{{"op":"insert","table":"order_header","row":{{"id":"{order}","table_id":"T{}"}}}}"#,
            n % 40
        );
        for l in 0..3 {
            let station = if l == 0 { "grill" } else { "bar" };
            ops.push_str(&format!(
                r#",{{"op":"insert","table":"order_line","row":{{"id":"{order}-l{l}","order_id":"{order}","item_id":"i{l}","quantity":{},"unit_price":{},"station_id":"{station}"}}}}"#,
                1 + l,
                450 + 100 * l
            ));
        }
        ops.push_str("]}");
        let Some(opened) = call(http::Method::POST, format!("{b}/batch"), ops).await else {
            continue;
        };
        let header = serde_json::from_slice::<Opened>(&opened)
            .ok()
            .and_then(|o| o.results.into_iter().next());
        let total = header.as_ref().and_then(|h| h.total_amount).unwrap_or(0);
        let version = header.and_then(|h| h.version).unwrap_or(1);
        call(
            http::Method::PATCH,
            format!("{b}/tables/order_line/{order}-l0"),
            r#"{"version":1,"set":{"status":"preparing"}}"#.to_owned(),
        )
        .await;
        call(
            http::Method::POST,
            format!("{b}/tables/order_payment"),
            format!(
                r#"{{"id":"{order}-p","order_id":"{order}","amount":{total},"method":"card"}}"#
            ),
        )
        .await;
        call(
            http::Method::PATCH,
            format!("{b}/tables/order_header/{order}"),
            format!(
                r#"{{"version":{},"set":{{"status":"closed"}}}}"#,
                version + 1
            ),
        )
        .await;
    }
    (writes, lat, errors)
}

/// One subscriber: follows order headers; returns (frames, delivery latencies in µs).
async fn subscriber(
    ws_url: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(u64, Vec<u64>), String> {
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
    loop {
        // Stopping is signalled rather than polled with a timeout: a timer armed per frame
        // costs the cores the edge shares.
        let msg = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            m = ws.next() => match m {
                None | Some(Err(_)) => break,
                Some(Ok(m)) => m,
            },
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

/// The edge's unlabelled metric values (counters, histogram sums and counts).
async fn metrics(http: &reqwest::Client, base: &str) -> std::collections::HashMap<String, f64> {
    let Ok(r) = http.get(format!("{base}/metrics")).send().await else {
        return Default::default();
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// What the edge counted between two `/metrics` readings.
struct Counted {
    before: std::collections::HashMap<String, f64>,
    after: std::collections::HashMap<String, f64>,
}

impl Counted {
    fn delta(&self, name: &str) -> Option<f64> {
        Some(self.after.get(name)? - self.before.get(name)?)
    }

    fn ratio(&self, num: &str, den: &str) -> Option<f64> {
        let d = self.delta(den)?;
        (d > 0.0).then(|| self.delta(num).map(|n| n / d)).flatten()
    }

    fn stages(&self) -> Option<EdgeStages> {
        Some(EdgeStages {
            group_size: self.ratio(
                "outpost_commit_requests_total",
                "outpost_commit_groups_total",
            )?,
            group_commit_ms: self.ratio(
                "outpost_commit_latency_us_sum",
                "outpost_commit_latency_us_count",
            )? / 1000.0,
            commit_write_ms: self.ratio(
                "outpost_commit_write_us_sum",
                "outpost_commit_write_us_count",
            )? / 1000.0,
            fsync_ms: self.ratio("outpost_wal_fsync_us_sum", "outpost_wal_fsync_us_count")?
                / 1000.0,
            groups_per_fsync: self
                .ratio("outpost_commit_groups_total", "outpost_wal_fsync_us_count")?,
            feed_lag_ms: self
                .ratio("outpost_feed_lag_us_sum", "outpost_feed_lag_us_count")
                .map(|us| us / 1000.0),
        })
    }
}

pub async fn run(config: LoadConfig) -> Result<LoadReport, String> {
    let (base, token) = match (config.url, config.token) {
        (Some(u), Some(t)) => (u.trim_end_matches('/').to_owned(), t),
        (Some(_), None) => return Err("--url needs --token".into()),
        (None, _) => local_edge().await?,
    };
    // For /metrics; the tills drive connections of their own.
    let client = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    let (stop_subscribers, subscribers_stop) = tokio::sync::watch::channel(false);
    let ws_base = base.replacen("http://", "ws://", 1);
    let subs: Vec<_> = (0..config.subscribers)
        .map(|_| {
            tokio::spawn(subscriber(
                format!("{ws_base}/ws?token={token}"),
                subscribers_stop.clone(),
            ))
        })
        .collect();
    let before = metrics(&client, &base).await;
    let started = Instant::now();
    let tills: Vec<_> = (0..config.clients)
        .map(|n| -> Result<_, String> {
            let conn = Conn::new(&base, &token)?;
            let pace = config.rate.map(|r| {
                let period = Duration::from_secs_f64(config.clients as f64 / r);
                (period * n as u32 / config.clients as u32, period)
            });
            Ok(tokio::spawn(till(conn, n, config.ids, pace, stop.clone())))
        })
        .collect::<Result<_, String>>()?;
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
    let _ = stop_subscribers.send(true);
    for s in subs {
        let (frames, lat) = s.await.map_err(|e| e.to_string())??;
        report.frames += frames;
        report.delivery_us.extend(lat);
    }
    report.request_us.sort_unstable();
    report.delivery_us.sort_unstable();
    let counted = Counted {
        before,
        after: metrics(&client, &base).await,
    };
    report.encodes_per_commit =
        counted.ratio("outpost_feed_encodes_total", "outpost_feed_commits_total");
    report.edge = counted.stages();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short run against an edge in this process: every till write succeeds (the payment
    /// takes the total parsed from the batch's answer, and the close needs it paid in full),
    /// the subscriber receives deltas, and every request is timed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_run_writes_every_cycle_without_errors() {
        let report = run(LoadConfig {
            url: None,
            token: None,
            clients: 2,
            subscribers: 1,
            seconds: 1,
            rate: None,
            ids: Ids::V7,
        })
        .await
        .expect("the run");
        assert_eq!(report.errors, 0, "{report}");
        assert!(report.writes >= 4, "at least one whole cycle: {report}");
        assert_eq!(report.request_us.len() as u64, report.writes);
        assert!(report.frames >= 1, "the subscriber saw deltas: {report}");
        let stages = report.edge.expect("the edge's /metrics were read");
        assert!(stages.group_size >= 1.0, "{stages:?}");
    }

    #[tokio::test]
    async fn only_plain_http_urls_are_taken() {
        let refused = Conn::new("https://edge.example:9090", "t").err();
        assert!(
            refused.is_some_and(|e| e.contains("plain http://")),
            "an https URL is refused with a clear error"
        );
    }
}
