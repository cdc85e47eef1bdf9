//! `outpost-sim fleet`: many edges syncing with one hub at once, as real processes on
//! loopback. Each edge takes payments over HTTP at a steady rate; the harness samples every
//! edge's `/healthz` and measures, for each sampled `last_seq`, how long until the hub's
//! acknowledgement covers it (`synced_seq`), and the hub process's CPU time.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::demo::{err, json_get, json_send};
use crate::partition::{binary, start_edge, start_hub};

pub struct FleetReport {
    pub edges: usize,
    pub seconds: f64,
    pub entries: u64,
    pub payments_failed: u64,
    /// Hub CPU time over the measured window, as a share of one core.
    pub hub_cpu: f64,
    /// Acknowledgement latency samples in milliseconds, sorted.
    pub ack_ms: Vec<f64>,
}

impl FleetReport {
    pub fn percentile(&self, p: f64) -> f64 {
        if self.ack_ms.is_empty() {
            return f64::NAN;
        }
        self.ack_ms[((self.ack_ms.len() - 1) as f64 * p).round() as usize]
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

pub async fn run(
    edges: usize,
    entries_per_s: f64,
    seconds: u64,
    bin_dir: &Path,
) -> Result<FleetReport, String> {
    let hub_bin = binary(bin_dir, "outpost-hub")?;
    let edge_bin = binary(bin_dir, "outpost-edge")?;
    let root = tempfile::Builder::new()
        .prefix("outpost-fleet-")
        .tempdir()
        .map_err(err)?;
    let mut hub = start_hub(&hub_bin, root.path())?;
    let hub_pid = hub.proc.child.as_ref().map(|c| c.id()).ok_or("no hub")?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(err)?;
    let mut procs = Vec::new();
    let mut targets = Vec::new();
    for i in 1..=edges {
        let branch = format!("B{i:03}");
        let (p, url, token) = start_edge(&edge_bin, &hub, root.path(), &branch, hub.quic)?;
        let base = format!("{url}/api/branches/{branch}/modules/pos");
        json_send(
            &http,
            reqwest::Method::POST,
            &format!("{base}/tables/order_header"),
            &token,
            json!({"id": "o1", "status": "open"}),
        )
        .await?;
        procs.push(p);
        targets.push((url, base, token));
    }

    // Steady writers: each payment is two entries (the payment, the order's totals).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut writers = Vec::new();
    for (k, (_, base, token)) in targets.iter().enumerate() {
        let (http, base, token, stop, failed) = (
            http.clone(),
            base.clone(),
            token.clone(),
            stop.clone(),
            failed.clone(),
        );
        let period = Duration::from_secs_f64(2.0 / entries_per_s);
        writers.push(tokio::spawn(async move {
            // Spread the edges' ticks over one period.
            tokio::time::sleep(period.mul_f64(k as f64 / 50.0)).await;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                n += 1;
                let r = json_send(
                    &http,
                    reqwest::Method::POST,
                    &format!("{base}/tables/order_payment"),
                    &token,
                    json!({"id": format!("p{n}"), "order_id": "o1", "method": "card", "amount": 100}),
                )
                .await;
                if r.is_err() {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }

    // Sample: when was each last_seq first seen, and when did the hub's ack cover it.
    let warmup = Duration::from_secs(2);
    tokio::time::sleep(warmup).await;
    let cpu0 = cpu_seconds(hub_pid).ok_or("cannot read the hub's CPU time")?;
    let started = Instant::now();
    let mut pending: Vec<VecDeque<(u64, Instant)>> = vec![VecDeque::new(); targets.len()];
    let mut first_seq = vec![None; targets.len()];
    let mut last_seq = vec![0u64; targets.len()];
    let mut ack_ms = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        let round = Instant::now();
        for (i, (url, _, token)) in targets.iter().enumerate() {
            let Ok(h) = json_get(&http, &format!("{url}/healthz"), token).await else {
                continue;
            };
            let (last, synced) = (
                h["last_seq"].as_u64().unwrap_or(0),
                h["synced_seq"].as_u64().unwrap_or(0),
            );
            let now = Instant::now();
            first_seq[i].get_or_insert(last);
            last_seq[i] = last;
            if pending[i].back().is_none_or(|(s, _)| *s < last) {
                pending[i].push_back((last, now));
            }
            while pending[i].front().is_some_and(|(s, _)| *s <= synced) {
                let (_, at) = pending[i].pop_front().expect("peeked");
                ack_ms.push(now.duration_since(at).as_secs_f64() * 1000.0);
            }
        }
        let pause = Duration::from_millis(100).saturating_sub(round.elapsed());
        tokio::time::sleep(pause).await;
    }
    let secs = started.elapsed().as_secs_f64();
    if ack_ms.is_empty() {
        let b = json_get(&http, &format!("http://{}/api/branches", hub.http), "").await;
        eprintln!(
            "no acknowledgement seen; hub branches: {b:?}; hub log: {}",
            std::fs::read_to_string(&hub.proc.log)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
        if let Some((url, _, token)) = targets.first() {
            eprintln!(
                "first edge: {:?}",
                json_get(&http, &format!("{url}/healthz"), token).await
            );
        }
        if let Some(p) = procs.first() {
            eprintln!(
                "edge log: {}",
                std::fs::read_to_string(&p.log)
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    let cpu1 = cpu_seconds(hub_pid).ok_or("cannot read the hub's CPU time")?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    ack_ms.sort_by(f64::total_cmp);
    let entries = last_seq
        .iter()
        .zip(&first_seq)
        .map(|(l, f)| l - f.unwrap_or(*l))
        .sum();
    drop(procs);
    hub.proc.kill9();
    Ok(FleetReport {
        edges,
        seconds: secs,
        entries,
        payments_failed: failed.load(std::sync::atomic::Ordering::Relaxed),
        hub_cpu: (cpu1 - cpu0) / secs,
        ack_ms,
    })
}
