//! `outpost-sim partition`: real processes through fault proxies. It starts a real
//! `outpost-hub` and N real `outpost-edge` processes (temporary data dirs, enrolled
//! identities, free loopback ports), each edge talking to the hub through its own UDP
//! [`FaultProxy`]. Tills load every edge over HTTP and a screen per edge follows shared and
//! head-office rows over WebSocket, the whole run, partitions included. A scenario's timeline
//! cuts and heals links, changes their faults, and kill -9s and restarts edges or the hub.
//! At the end everything heals, the load stops, the harness waits for quiescence and checks
//! the invariants against the real APIs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use tokio_tungstenite::tungstenite::Message;

use crate::demo::{
    Accepted, HubQuery, check_payments_at_hub, err, hub_payment_totals, json_get, json_send,
    set_availability, till,
};
use crate::faultproxy::{Direction, FaultProxy, LinkFaults};

/// A scenario file (TOML).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub branches: usize,
    pub duration_s: u64,
    #[serde(default = "default_tills")]
    pub tills: usize,
    #[serde(default = "default_pace")]
    pub pace_ms: u64,
    /// The faults every link starts with (both directions).
    #[serde(default)]
    pub link: LinkFaults,
    #[serde(default)]
    pub events: Vec<Event>,
}

fn default_tills() -> usize {
    3
}

fn default_pace() -> u64 {
    100
}

/// One moment of the timeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Seconds after the start (fractions allowed).
    pub at_s: f64,
    pub action: Action,
    /// The branch (`B001`...) for link and edge actions.
    #[serde(default)]
    pub branch: Option<String>,
    /// For `link`: `up` (edge to hub), `down`, or both when absent.
    #[serde(default)]
    pub direction: Option<String>,
    /// For `link`: the faults from now on.
    #[serde(default)]
    pub faults: Option<LinkFaults>,
    /// For `publish_release`: the version the edge binary is published as (ring `all`).
    #[serde(default)]
    pub version: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Cut,
    Heal,
    Link,
    KillEdge,
    RestartEdge,
    KillHub,
    RestartHub,
    /// Head office publishes the run's edge binary as a new release: every edge must end up
    /// running it, through the faults, with no acknowledged write lost in the handover.
    PublishRelease,
}

/// The scenarios that ship with the harness.
pub const SHIPPED: &[(&str, &str)] = &[
    (
        "rush-hour-partition",
        include_str!("../scenarios/rush-hour-partition.toml"),
    ),
    (
        "flapping-wan",
        include_str!("../scenarios/flapping-wan.toml"),
    ),
    ("hub-crash", include_str!("../scenarios/hub-crash.toml")),
    (
        "edge-crash-mid-segment",
        include_str!("../scenarios/edge-crash-mid-segment.toml"),
    ),
    ("ci-smoke", include_str!("../scenarios/ci-smoke.toml")),
    (
        "rolling-update",
        include_str!("../scenarios/rolling-update.toml"),
    ),
];

impl Scenario {
    /// A shipped scenario by name, or a file.
    pub fn load(name_or_path: &str) -> Result<Scenario, String> {
        let text = match SHIPPED.iter().find(|(n, _)| *n == name_or_path) {
            Some((_, t)) => (*t).to_owned(),
            None => std::fs::read_to_string(name_or_path).map_err(|e| {
                let names: Vec<&str> = SHIPPED.iter().map(|(n, _)| *n).collect();
                format!(
                    "{name_or_path}: {e} (shipped scenarios: {})",
                    names.join(", ")
                )
            })?,
        };
        let s: Scenario = toml::from_str(&text).map_err(|e| format!("{name_or_path}: {e}"))?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), String> {
        if !(1..=16).contains(&self.branches) {
            return Err("branches is 1 to 16".into());
        }
        if self.duration_s == 0 || self.duration_s > 3600 {
            return Err("duration_s is 1 to 3600".into());
        }
        self.link.validate()?;
        for e in &self.events {
            if !(0.0..=self.duration_s as f64).contains(&e.at_s) {
                return Err(format!("an event at {} s is outside the run", e.at_s));
            }
            let needs_branch = !matches!(
                e.action,
                Action::KillHub | Action::RestartHub | Action::PublishRelease
            );
            if e.action == Action::PublishRelease {
                let v = e
                    .version
                    .as_deref()
                    .ok_or("a publish_release event needs a version")?;
                shared::release::parse_version(v)?;
            }
            match &e.branch {
                Some(b) if needs_branch => {
                    let n = b
                        .strip_prefix('B')
                        .and_then(|n| n.parse::<usize>().ok())
                        .filter(|n| (1..=self.branches).contains(n));
                    if n.is_none() {
                        return Err(format!("no branch {b} in a run of {}", self.branches));
                    }
                }
                None if needs_branch => {
                    return Err(format!("{:?} at {} s needs a branch", e.action, e.at_s));
                }
                _ => {}
            }
            if e.action == Action::Link {
                e.faults
                    .as_ref()
                    .ok_or("a link event needs faults")?
                    .validate()?;
            }
            if let Some(d) = &e.direction
                && d != "up"
                && d != "down"
            {
                return Err(format!("direction is up or down, not {d}"));
            }
        }
        Ok(())
    }
}

/// One process of the run, restartable on the same ports.
pub(crate) struct Proc {
    pub(crate) binary: PathBuf,
    pub(crate) args: Vec<String>,
    pub(crate) data_dir: PathBuf,
    pub(crate) log: PathBuf,
    pub(crate) child: Option<Child>,
}

impl Proc {
    pub(crate) fn spawn(&mut self) -> Result<Json, String> {
        let _ = std::fs::remove_file(self.data_dir.join("ports.json"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(err)?;
        let child = Command::new(&self.binary)
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("OUTPOST_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(t) = std::fs::read_to_string(self.data_dir.join("ports.json"))
                && let Ok(v) = serde_json::from_str::<Json>(&t)
            {
                return Ok(v);
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!(
                    "{} exited with {status}; its log: {}",
                    self.binary.display(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("{} did not start", self.binary.display()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Where the binaries are: `--bin-dir`, or beside this executable.
pub fn binary(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found; build it first (`cargo build --release --bins`) or pass --bin-dir",
            p.display()
        ))
    }
}

pub(crate) fn free_port() -> Result<SocketAddr, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(err)?;
    l.local_addr().map_err(err)
}

pub(crate) fn free_udp_port() -> Result<SocketAddr, String> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(err)?;
    s.local_addr().map_err(err)
}

/// The result of a run.
#[derive(Debug, Serialize)]
pub struct PartitionReport {
    pub scenario: String,
    pub seconds: f64,
    pub branches: Vec<BranchReport>,
    pub packets_dropped: u64,
    pub packets_duplicated: u64,
    pub packets_reordered: u64,
    pub violations: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct BranchReport {
    pub branch: String,
    pub orders: u64,
    pub payments_acknowledged: usize,
    pub payments_at_hub: u64,
    pub takings: i64,
    pub edge_last_seq: u64,
    pub hub_synced_seq: u64,
    pub till_errors: u64,
    pub screen_changes: u64,
    /// The release the edge runs at the end (`/healthz` version).
    pub release: String,
}

impl PartitionReport {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

impl std::fmt::Display for PartitionReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "== scenario {}: {:.1} s ==", self.scenario, self.seconds)?;
        writeln!(
            f,
            "{:<6} {:>7} {:>9} {:>9} {:>12} {:>9} {:>9} {:>7} {:>8}  release",
            "branch",
            "orders",
            "payments",
            "at hub",
            "takings",
            "edge seq",
            "hub seq",
            "errors",
            "screen"
        )?;
        for b in &self.branches {
            writeln!(
                f,
                "{:<6} {:>7} {:>9} {:>9} {:>9}.{:02} {:>9} {:>9} {:>7} {:>8}  {}",
                b.branch,
                b.orders,
                b.payments_acknowledged,
                b.payments_at_hub,
                b.takings / 100,
                b.takings % 100,
                b.edge_last_seq,
                b.hub_synced_seq,
                b.till_errors,
                b.screen_changes,
                b.release
            )?;
        }
        writeln!(
            f,
            "packets dropped {}, duplicated {}, reordered {}",
            self.packets_dropped, self.packets_duplicated, self.packets_reordered
        )?;
        if self.ok() {
            write!(
                f,
                "all invariants hold: every acknowledged payment at the hub exactly once, sums per branch, \
                 synced_seq = edge last seq, shared rows equal everywhere, screens equal a final read"
            )
        } else {
            for v in &self.violations {
                writeln!(f, "VIOLATION: {v}")?;
            }
            Ok(())
        }
    }
}

struct EdgeRun {
    branch: String,
    proc: Proc,
    url: String,
    token: String,
    proxy: FaultProxy,
    accepted: Arc<Mutex<Accepted>>,
    screen: Arc<Mutex<Screen>>,
}

/// A screen's view of the rows it follows, from a snapshot and deltas.
#[derive(Debug, Default)]
struct Screen {
    rows: BTreeMap<(String, String), Json>,
    version: Option<u64>,
    changes: u64,
}

const SCREEN_TABLES: [&str; 2] = ["item_availability", "menu_item"];

/// A screen following shared and head-office rows; reconnects (with `since`) whenever the
/// edge goes away, and resubscribes when told to resync.
async fn screen(base: String, token: String, view: Arc<Mutex<Screen>>, stop: Arc<AtomicBool>) {
    let ws_url = format!("{}/ws?token={token}", base.replace("http://", "ws://"));
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(&ws_url).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let subscribe = |since: Option<u64>| {
            let mut m =
                json!({"type": "subscribe", "sub": "s", "module": "pos", "tables": SCREEN_TABLES});
            if let Some(v) = since {
                m["since"] = json!(v);
            }
            Message::Text(m.to_string().into())
        };
        let since = view.lock().version;
        if ws.send(subscribe(since)).await.is_err() {
            continue;
        }
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let msg = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(_))) => continue,
                Ok(_) => break,
            };
            let Ok(frame) = serde_json::from_str::<Json>(&msg) else {
                continue;
            };
            let resync = {
                let mut v = view.lock();
                match frame["type"].as_str() {
                    Some("snapshot") => {
                        v.rows.clear();
                        if let Some(tables) = frame["rows"].as_object() {
                            for (t, rows) in tables {
                                for r in rows.as_array().into_iter().flatten() {
                                    let id = r["id"].as_str().unwrap_or("").to_owned();
                                    v.rows.insert((t.clone(), id), r.clone());
                                }
                            }
                        }
                        v.version = frame["version"].as_u64();
                        None
                    }
                    Some("delta") => {
                        for c in frame["changes"].as_array().into_iter().flatten() {
                            let key = (
                                c["table"].as_str().unwrap_or("").to_owned(),
                                c["id"].as_str().unwrap_or("").to_owned(),
                            );
                            v.changes += 1;
                            match c["op"].as_str() {
                                Some("delete") => {
                                    v.rows.remove(&key);
                                }
                                _ if c["row"].is_object() => {
                                    v.rows.insert(key, c["row"].clone());
                                }
                                _ => {
                                    if let (Some(row), Some(set)) =
                                        (v.rows.get_mut(&key), c["set"].as_object())
                                    {
                                        for (k, val) in set {
                                            row[k] = val.clone();
                                        }
                                        row["version"] = c["version"].clone();
                                    }
                                }
                            }
                        }
                        v.version = frame["version"].as_u64();
                        None
                    }
                    Some("resync") => Some(v.version),
                    _ => None,
                }
            };
            if let Some(since) = resync
                && ws.send(subscribe(since)).await.is_err()
            {
                break;
            }
        }
    }
}

/// A hub process on free loopback ports, with its admin token.
pub(crate) struct HubRun {
    pub(crate) proc: Proc,
    pub(crate) http: SocketAddr,
    pub(crate) quic: SocketAddr,
    pub(crate) token: String,
    dir: PathBuf,
}

/// Starts `outpost-hub serve` on a fresh data dir under `root`.
pub(crate) fn start_hub(bin: &Path, root: &Path) -> Result<HubRun, String> {
    let dir = root.join("hub");
    let (http, quic) = (free_port()?, free_udp_port()?);
    let mut proc = Proc {
        binary: bin.to_owned(),
        args: vec![
            "serve".into(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--http".into(),
            http.to_string(),
            "--quic".into(),
            quic.to_string(),
        ],
        data_dir: dir.clone(),
        log: root.join("hub.log"),
        child: None,
    };
    let ports = tokio::task::block_in_place(|| proc.spawn())?;
    let quic = ports["quic"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or("the hub wrote no QUIC address")?;
    let token = std::fs::read_to_string(dir.join("admin.token"))
        .map_err(err)?
        .trim()
        .to_owned();
    Ok(HubRun {
        proc,
        http,
        quic,
        token,
        dir,
    })
}

/// Enrolls `branch` at `hub` and starts its edge under `root`, syncing with `hub_addr` (the
/// hub, or a proxy in front of it). Returns the process, its HTTP base URL and admin token.
pub(crate) fn start_edge(
    edge_bin: &Path,
    hub: &HubRun,
    root: &Path,
    branch: &str,
    hub_addr: SocketAddr,
) -> Result<(Proc, String, String), String> {
    let dir = root.join(branch);
    let id_dir = dir.join("identity");
    let out = Command::new(&hub.proc.binary)
        .args(["enroll", "--data-dir"])
        .arg(&hub.dir)
        .args(["--branch", branch, "--out"])
        .arg(&id_dir)
        .env("RUST_LOG", "warn")
        .output()
        .map_err(err)?;
    if !out.status.success() {
        return Err(format!(
            "enroll {branch}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let http = free_port()?;
    let data = dir.join("data");
    let mut proc = Proc {
        binary: edge_bin.to_owned(),
        args: vec![
            "serve".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--branch".into(),
            branch.to_owned(),
            "--http".into(),
            http.to_string(),
            "--hub".into(),
            hub_addr.to_string(),
            "--identity".into(),
            id_dir.display().to_string(),
        ],
        data_dir: data.clone(),
        log: dir.join("edge.log"),
        child: None,
    };
    tokio::task::block_in_place(|| proc.spawn())?;
    let token = std::fs::read_to_string(data.join("admin.token"))
        .map_err(err)?
        .trim()
        .to_owned();
    Ok((proc, format!("http://{http}"), token))
}

/// Runs `scenario` with the binaries in `bin_dir`.
pub async fn run(scenario: &Scenario, bin_dir: &Path) -> Result<PartitionReport, String> {
    let hub_bin = binary(bin_dir, "outpost-hub")?;
    let edge_bin = binary(bin_dir, "outpost-edge")?;
    let root = tempfile::Builder::new()
        .prefix("outpost-partition-")
        .tempdir()
        .map_err(err)?;
    let mut hub = start_hub(&hub_bin, root.path())?;
    let hub_url = format!("http://{}", hub.http);
    let hub_token = hub.token.clone();
    let mut edges = Vec::new();
    for i in 1..=scenario.branches {
        let branch = format!("B{i:03}");
        let proxy = FaultProxy::start(hub.quic, scenario.link.clone(), 0x9E37_79B9 + i as u64)
            .await
            .map_err(err)?;
        let (proc, url, token) = start_edge(&edge_bin, &hub, root.path(), &branch, proxy.addr())?;
        edges.push(EdgeRun {
            branch,
            proc,
            url,
            token,
            proxy,
            accepted: Arc::new(Mutex::new(Accepted::default())),
            screen: Arc::new(Mutex::new(Screen::default())),
        });
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(err)?;
    json_send(
        &http,
        reqwest::Method::PUT,
        &format!("{hub_url}/api/modules/pos/tables/menu_item/m1"),
        &hub_token,
        json!({"name": "Burger", "price": 1250, "active": true}),
    )
    .await?;

    // Load for the whole run.
    let stop = Arc::new(AtomicBool::new(false));
    let screens_stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let mut screens = Vec::new();
    for e in &edges {
        for n in 0..scenario.tills {
            tasks.push(tokio::spawn(till(
                http.clone(),
                (e.url.clone(), e.token.clone(), e.branch.clone()),
                n,
                e.accepted.clone(),
                stop.clone(),
                Duration::from_millis(scenario.pace_ms.max(1)),
            )));
        }
        screens.push(tokio::spawn(screen(
            e.url.clone(),
            e.token.clone(),
            e.screen.clone(),
            screens_stop.clone(),
        )));
    }
    {
        // Kitchens mark items now and then; head office changes a price.
        let (http, stop) = (http.clone(), stop.clone());
        let targets: Vec<(String, String, String)> = edges
            .iter()
            .map(|e| (e.url.clone(), e.branch.clone(), e.token.clone()))
            .collect();
        let (hub_url, hub_token) = (hub_url.clone(), hub_token.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(400)).await;
                k += 1;
                let (u, b, t) = &targets[k as usize % targets.len()];
                set_availability(
                    &http,
                    (u, b, t),
                    &format!("m{}", k % 3),
                    k.is_multiple_of(2),
                )
                .await;
                if k.is_multiple_of(5) {
                    let _ = json_send(
                        &http,
                        reqwest::Method::PUT,
                        &format!("{hub_url}/api/modules/pos/tables/menu_item/m1"),
                        &hub_token,
                        json!({"price": 1250 + k as i64}),
                    )
                    .await;
                }
            }
        }));
    }

    // The timeline.
    let mut published: Option<String> = None;
    let started = Instant::now();
    let mut events = scenario.events.clone();
    events.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    let edge_index = |b: &Option<String>| -> usize {
        b.as_deref()
            .and_then(|b| b.strip_prefix('B'))
            .and_then(|n| n.parse::<usize>().ok())
            .map_or(0, |n| n - 1)
    };
    for ev in &events {
        let at = Duration::from_secs_f64(ev.at_s);
        if let Some(wait) = at.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        match ev.action {
            Action::Cut => edges[edge_index(&ev.branch)]
                .proxy
                .cut(true, &scenario.link),
            Action::Heal => edges[edge_index(&ev.branch)]
                .proxy
                .cut(false, &scenario.link),
            Action::Link => edges[edge_index(&ev.branch)].proxy.set(
                ev.direction.as_deref().map(|d| {
                    if d == "up" {
                        Direction::Up
                    } else {
                        Direction::Down
                    }
                }),
                ev.faults.clone().unwrap_or_default(),
            ),
            Action::KillEdge => edges[edge_index(&ev.branch)].proc.kill9(),
            Action::RestartEdge => {
                let e = &mut edges[edge_index(&ev.branch)];
                e.proc.kill9();
                tokio::task::block_in_place(|| e.proc.spawn())?;
            }
            Action::KillHub => hub.proc.kill9(),
            Action::RestartHub => {
                hub.proc.kill9();
                tokio::task::block_in_place(|| hub.proc.spawn())?;
            }
            Action::PublishRelease => {
                let version = ev.version.clone().unwrap_or_default();
                let artifact = tokio::fs::read(&edge_bin).await.map_err(err)?;
                let r = http
                    .post(format!("{hub_url}/api/releases?version={version}&ring=all"))
                    .bearer_auth(&hub_token)
                    .timeout(Duration::from_secs(300))
                    .body(artifact)
                    .send()
                    .await
                    .map_err(err)?;
                if !r.status().is_success() {
                    return Err(format!(
                        "publishing release {version}: {} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    ));
                }
                published = Some(version);
            }
        }
    }
    if let Some(rest) = Duration::from_secs(scenario.duration_s).checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }

    // Heal everything and stop the load.
    for e in &mut edges {
        e.proxy.cut(false, &LinkFaults::default());
        if !e.proc.running() {
            tokio::task::block_in_place(|| e.proc.spawn())?;
        }
    }
    if !hub.proc.running() {
        tokio::task::block_in_place(|| hub.proc.spawn())?;
    }
    let seconds = started.elapsed().as_secs_f64();
    // Let the screens catch the last changes, then stop everything.
    let quiet_deadline = Instant::now() + Duration::from_secs(120);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let mut violations = Vec::new();
    let mut finals = BTreeMap::new();
    let mut releases = BTreeMap::new();
    loop {
        let branches = json_get(&http, &format!("{hub_url}/api/branches"), &hub_token).await;
        let mut all = true;
        for e in &edges {
            let health = json_get(&http, &format!("{}/healthz", e.url), &e.token).await;
            let (Ok(h), Ok(b)) = (&health, &branches) else {
                all = false;
                continue;
            };
            let last = h["last_seq"].as_u64().unwrap_or(u64::MAX);
            let at_hub = b
                .as_array()
                .and_then(|a| a.iter().find(|x| x["branch"] == e.branch.as_str()));
            let synced = at_hub.and_then(|x| x["synced_seq"].as_u64());
            // Rows are materialised (and shared rows relayed) behind the acks: wait for
            // that too, then for the feeds to be applied.
            let feed_done = at_hub.is_some_and(|x| {
                x["materialised_seq"] == x["synced_seq"] && x["feed_acked_seq"] == x["feed_seq"]
            });
            finals.insert(e.branch.clone(), (last, synced.unwrap_or(0)));
            releases.insert(
                e.branch.clone(),
                h["version"].as_str().unwrap_or("?").to_owned(),
            );
            // After a publish, every edge also runs the new release.
            let updated = published.as_deref().is_none_or(|v| h["version"] == v);
            all &= synced == Some(last)
                && h["synced_seq"].as_u64() == Some(last)
                && feed_done
                && updated;
        }
        if all {
            break;
        }
        if Instant::now() > quiet_deadline {
            violations.push(format!(
                "no quiescence within 120 s after healing: {finals:?} (edge last seq, hub synced seq){}",
                published.as_deref().map_or(String::new(), |v| format!(", or not every edge runs release {v}"))
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The checks, against the real APIs.
    let hub = HubQuery {
        http: &http,
        url: &hub_url,
        token: &hub_token,
    };
    let totals = hub_payment_totals(&hub).await?;
    let hub_shared = json_send(
        &http,
        reqwest::Method::POST,
        &format!("{hub_url}/api/query"),
        &hub_token,
        json!({"table": "item_availability", "limit": 1000, "orderBy": [{"field": "id", "direction": "asc"}]}),
    )
    .await?;
    let shared_view = |rows: &Json| -> Vec<(String, Json)> {
        rows.as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                (
                    r["id"].as_str().unwrap_or("").to_owned(),
                    r["available"].clone(),
                )
            })
            .collect()
    };
    let mut reports = Vec::new();
    for e in &edges {
        let (orders, payments, in_doubt, errors) = {
            let a = e.accepted.lock();
            (a.orders, a.payments.clone(), a.in_doubt.clone(), a.errors)
        };
        let takings: i64 = payments.values().sum();
        let (n, _) = check_payments_at_hub(
            &hub,
            &e.branch,
            &totals,
            &payments,
            &in_doubt,
            &mut violations,
        )
        .await?;
        let (last, synced) = finals.get(&e.branch).copied().unwrap_or((0, 0));
        if last != synced {
            violations.push(format!(
                "{}: the hub's synced_seq {synced} is not the edge's last seq {last}",
                e.branch
            ));
        }
        // Shared rows come to agree with the hub's (relays may still be on their way).
        let shared_deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let edge_shared = json_send(
                &http,
                reqwest::Method::POST,
                &format!("{}/api/branches/{}/modules/pos/query", e.url, e.branch),
                &e.token,
                json!({"table": "item_availability", "limit": 1000, "orderBy": [{"field": "id", "direction": "asc"}]}),
            )
            .await?;
            if shared_view(&edge_shared["rows"]) == shared_view(&hub_shared["rows"]) {
                break;
            }
            if Instant::now() > shared_deadline {
                violations.push(format!(
                    "{}: shared rows differ from the hub's: {} vs {}",
                    e.branch, edge_shared["rows"], hub_shared["rows"]
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The screen's view (snapshot plus deltas) comes to equal a final read of the same
        // tables (its last deltas may still be on their way).
        let strip = |m: &BTreeMap<(String, String), Json>| -> BTreeMap<(String, String), Json> {
            m.iter()
                .map(|(k, v)| {
                    let mut v = v.clone();
                    if let Some(o) = v.as_object_mut() {
                        o.remove("updated_at");
                        o.remove("created_at");
                    }
                    (k.clone(), v)
                })
                .collect()
        };
        let mut read = BTreeMap::new();
        let screen_deadline = Instant::now() + Duration::from_secs(30);
        loop {
            read.clear();
            for t in SCREEN_TABLES {
                let rows = json_send(
                    &http,
                    reqwest::Method::POST,
                    &format!("{}/api/branches/{}/modules/pos/query", e.url, e.branch),
                    &e.token,
                    json!({"table": t, "limit": 1000}),
                )
                .await?;
                for r in rows["rows"].as_array().into_iter().flatten() {
                    read.insert(
                        (t.to_owned(), r["id"].as_str().unwrap_or("").to_owned()),
                        r.clone(),
                    );
                }
            }
            let shown = strip(&e.screen.lock().rows);
            if shown == strip(&read) {
                break;
            }
            if Instant::now() > screen_deadline {
                violations.push(format!(
                    "{}: the screen shows {} rows that differ from a final read of {} rows: {:?} vs {:?}",
                    e.branch,
                    shown.len(),
                    read.len(),
                    shown,
                    strip(&read)
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let screen = e.screen.lock();
        reports.push(BranchReport {
            branch: e.branch.clone(),
            orders,
            payments_acknowledged: payments.len(),
            payments_at_hub: n,
            takings,
            edge_last_seq: last,
            hub_synced_seq: synced,
            till_errors: errors,
            screen_changes: screen.changes,
            release: releases.get(&e.branch).cloned().unwrap_or_default(),
        });
    }
    let sum = |f: fn(&crate::faultproxy::ProxyStats) -> u64| -> u64 {
        edges.iter().map(|e| f(&e.proxy.stats)).sum()
    };
    let report = Ok(PartitionReport {
        scenario: scenario.name.clone(),
        seconds,
        branches: reports,
        packets_dropped: sum(|s| s.dropped.load(Ordering::Relaxed)),
        packets_duplicated: sum(|s| s.duplicated.load(Ordering::Relaxed)),
        packets_reordered: sum(|s| s.reordered.load(Ordering::Relaxed)),
        violations,
    });
    screens_stop.store(true, Ordering::Relaxed);
    for t in screens {
        let _ = t.await;
    }
    report
}
