//! End-to-end tests of edge auto-update with the real `outpost-hub` and `outpost-edge`
//! binaries: a release published at the hub's admin API reaches a syncing edge over QUIC, is
//! verified (ed25519 signature with the branch identity's `release.pub`, size, blake3),
//! self-checked, switched to and reported back to the hub.
//!
//! What the file proves:
//! - a connected edge installs a published release (the edge's own binary published as a
//!   higher version) with the keeper process still running, its data still served, writes
//!   and sync going on, and the hub told `installed`;
//! - an edge that was down when the release was published gets it when it comes back;
//! - a download cut in the middle resumes from what arrived instead of starting over;
//! - an artifact altered on the hub's disk, a release signed by another hub's key and a
//!   binary that fails its self-check are refused, reported `refused`, and the edge keeps
//!   running its release and serving writes;
//! - a release that passes its self-check but does not come up is rolled back: the previous
//!   release serves again and the hub is told `rolled_back`;
//! - rollout rings: a canary release reaches only the canary branch until it is promoted;
//! - the release API's errors, with their exact statuses and codes.
//!
//! Nothing waits on a timer: every wait is [`wait_until`] on a state the test then checks
//! exactly (the edge's `/healthz` version, the hub's `/api/releases`, metrics). The deadlines
//! are safety nets, never timing assertions.
//!
//! A worker that installs a release exits and the keeper starts the new one, which binds a
//! new port (the tests pass `--http 127.0.0.1:0`): every request to an edge here reads the
//! current port from the data dir's `ports.json` instead of [`EdgeProcess::url`], which keeps
//! the port of the first start: the shared [`Http`] helpers are given the edge as a [`Worker`].

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use reqwest::Method;
use serde_json::{Value as Json, json};
use tests::{
    Body, EdgeApi, EdgeProcess, Http, HubProcess, Reply, assert_hub_payment_totals, edge_binary,
    open_order, tail, text, uint, wait_until,
};

// ---------------------------------------------------------------------------------------------
// Requests only these tests make, on the shared blocking client
// ---------------------------------------------------------------------------------------------

/// What these tests ask of the edge and the hub beyond [`Http`]'s shared requests: the
/// version the edge's current worker runs, and the hub's release API.
trait UpdateApi {
    /// The version the edge's worker reports in `/healthz`, or `None` while no worker answers
    /// (between two releases, `ports.json` still names the old worker's port).
    fn running_version(&self, edge: &EdgeProcess) -> Option<String>;
    /// `POST /api/releases?version=V&ring=R` with the artifact as the body.
    fn publish(&self, hub: &HubProcess, version: &str, ring: &str, artifact: Vec<u8>) -> Reply;
    /// `POST /api/releases/{version}/promote`.
    fn promote(&self, hub: &HubProcess, version: &str) -> Reply;
    /// `PUT /api/branches/{branch}/ring`.
    fn set_ring(&self, hub: &HubProcess, branch: &str, ring: &str) -> Reply;
    /// `GET /api/releases`.
    fn releases(&self, hub: &HubProcess) -> Json;
    /// `branch`'s entry in `GET /api/releases` (`null` when it has none).
    fn rollout(&self, hub: &HubProcess, branch: &str) -> Json;
}

impl UpdateApi for Http {
    fn running_version(&self, edge: &EdgeProcess) -> Option<String> {
        let url = format!("{}/healthz", edge_base(edge)?);
        let reply = self.try_send(Method::GET, &url, None, Body::Empty).ok()?;
        (reply.status == 200).then(|| reply.body["version"].as_str().map(str::to_owned))?
    }

    fn publish(&self, hub: &HubProcess, version: &str, ring: &str, artifact: Vec<u8>) -> Reply {
        let url = hub.url(&format!("/api/releases?version={version}&ring={ring}"));
        self.send(
            Method::POST,
            &url,
            Some(hub.admin_token()),
            Body::Bytes(artifact),
        )
    }

    fn promote(&self, hub: &HubProcess, version: &str) -> Reply {
        let url = hub.url(&format!("/api/releases/{version}/promote"));
        self.send(Method::POST, &url, Some(hub.admin_token()), Body::Empty)
    }

    fn set_ring(&self, hub: &HubProcess, branch: &str, ring: &str) -> Reply {
        let url = hub.url(&format!("/api/branches/{branch}/ring"));
        let body = Body::Json(json!({ "ring": ring }));
        self.send(Method::PUT, &url, Some(hub.admin_token()), body)
    }

    fn releases(&self, hub: &HubProcess) -> Json {
        self.send(
            Method::GET,
            &hub.url("/api/releases"),
            Some(hub.admin_token()),
            Body::Empty,
        )
        .expect(200)
    }

    fn rollout(&self, hub: &HubProcess, branch: &str) -> Json {
        let body = self.releases(hub);
        body["branches"]
            .as_array()
            .unwrap_or_else(|| panic!("/api/releases has no branch list: {body}"))
            .iter()
            .find(|b| b["branch"] == branch)
            .cloned()
            .unwrap_or(Json::Null)
    }
}

fn is_hex(v: &Json, digits: usize) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() == digits && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A log without its ANSI colour sequences (`ESC [ ... m`), so its fields read `key=value`.
fn strip_ansi(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The edge's data dir: where its worker listens, its releases
// ---------------------------------------------------------------------------------------------

/// `http://ADDR` of the edge's current worker, from `data/ports.json` (`None` while it is
/// missing or unreadable).
fn edge_base(edge: &EdgeProcess) -> Option<String> {
    let text = std::fs::read_to_string(edge.data_dir().join("ports.json")).ok()?;
    let ports: Json = serde_json::from_str(&text).ok()?;
    Some(format!("http://{}", ports["http"].as_str()?))
}

/// `http://ADDR{path}` at the edge's current worker.
#[track_caller]
fn edge_url(edge: &EdgeProcess, path: &str) -> String {
    let base = edge_base(edge).unwrap_or_else(|| {
        panic!(
            "{} has no readable ports.json; log:\n{}",
            edge.data_dir().display(),
            tail(&edge.log(), 30)
        )
    });
    format!("{base}{path}")
}

/// The edge as its current worker serves it: every request goes to the port in `ports.json`
/// (read anew each time) instead of [`EdgeProcess::url`]'s, which stays the first start's.
struct Worker<'a>(&'a EdgeProcess);

impl EdgeApi for Worker<'_> {
    fn process(&self) -> &EdgeProcess {
        self.0
    }

    fn api_url(&self, path: &str) -> String {
        edge_url(self.0, path)
    }
}

fn releases_dir(edge: &EdgeProcess) -> PathBuf {
    edge.data_dir().join("releases")
}

/// The version `data/releases/current` names (its first line), checking that it is in service
/// (no second `trial` line).
fn current_release(edge: &EdgeProcess) -> String {
    let path = releases_dir(edge).join("current");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut lines = text.lines();
    let version = lines.next().unwrap_or_default().trim().to_owned();
    assert_eq!(
        lines.next(),
        None,
        "releases/current still holds a trial: {text:?}"
    );
    version
}

/// The edge binary under test, as the bytes of a release artifact.
fn edge_artifact() -> Vec<u8> {
    let path = edge_binary();
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A shell script artifact.
fn script(body: &str) -> Vec<u8> {
    format!("#!/bin/sh\n{body}").into_bytes()
}

// ---------------------------------------------------------------------------------------------
// Waits
// ---------------------------------------------------------------------------------------------

/// What a failed wait shows: both sides' view and the ends of both logs.
fn context(http: &Http, hub: &HubProcess, edge: &EdgeProcess) -> String {
    let healthz = match edge_base(edge) {
        Some(base) => http.describe(&format!("{base}/healthz"), None),
        None => "no ports.json".to_owned(),
    };
    format!(
        "edge {} healthz: {healthz}\nreleases/current: {:?}\nhub releases: {}\nhub branches: {}\n\
         edge log:\n{}\nhub log:\n{}",
        edge.branch(),
        std::fs::read_to_string(releases_dir(edge).join("current")),
        http.describe(&hub.url("/api/releases"), Some(hub.admin_token())),
        http.describe(&hub.url("/api/branches"), Some(hub.admin_token())),
        tail(&edge.log(), 30),
        tail(&hub.log(), 20),
    )
}

/// Waits until the edge's worker answers `/healthz` connected to the hub and returns the
/// version it runs.
fn wait_connected(http: &Http, hub: &HubProcess, edge: &EdgeProcess) -> String {
    let mut version = String::new();
    wait_until(
        &format!("{} connected to the hub", edge.branch()),
        || {
            let Some(base) = edge_base(edge) else {
                return false;
            };
            let url = format!("{base}/healthz");
            match http.try_send(Method::GET, &url, None, Body::Empty) {
                Ok(r) if r.status == 200 && r.body["hub"] == "connected" => {
                    version = text(&r.body["version"]).to_owned();
                    http.branch_info(hub, edge.branch())["connected"] == true
                }
                _ => false,
            }
        },
        || context(http, hub, edge),
    );
    version
}

/// Waits until the edge runs `version` and the hub lists `branch` as having installed it,
/// with `installed` as the latest outcome. Returns the branch's entry in `/api/releases`.
fn wait_installed(http: &Http, hub: &HubProcess, edge: &EdgeProcess, version: &str) -> Json {
    let mut entry = Json::Null;
    wait_until(
        &format!("{} runs and reports release {version}", edge.branch()),
        || {
            if http.running_version(edge).as_deref() != Some(version) {
                return false;
            }
            entry = http.rollout(hub, edge.branch());
            entry["installed"] == version
                && entry["last_outcome"]["version"] == version
                && entry["last_outcome"]["outcome"] == "installed"
        },
        || context(http, hub, edge),
    );
    entry
}

/// Waits until the hub's latest outcome for `edge`'s branch is `outcome` for `version`.
/// Returns the branch's entry in `/api/releases`.
fn wait_outcome(
    http: &Http,
    hub: &HubProcess,
    edge: &EdgeProcess,
    version: &str,
    outcome: &str,
) -> Json {
    let mut entry = Json::Null;
    wait_until(
        &format!("{} reports release {version} {outcome}", edge.branch()),
        || {
            entry = http.rollout(hub, edge.branch());
            entry["last_outcome"]["version"] == version
                && entry["last_outcome"]["outcome"] == outcome
        },
        || context(http, hub, edge),
    );
    entry
}

/// Waits until the edge has everything it wrote acknowledged by the hub and the hub's
/// durable position for its branch is the edge's last seq. Returns the edge's last seq.
fn wait_synced(http: &Http, hub: &HubProcess, edge: &EdgeProcess) -> u64 {
    let mut last = 0;
    wait_until(
        &format!("{} fully synced with the hub", edge.branch()),
        || {
            let Some(base) = edge_base(edge) else {
                return false;
            };
            let Ok(r) = http.try_send(Method::GET, &format!("{base}/healthz"), None, Body::Empty)
            else {
                return false;
            };
            if r.status != 200 {
                return false;
            }
            last = uint(&r.body["last_seq"]);
            uint(&r.body["synced_seq"]) == last
                && http.branch_info(hub, edge.branch())["synced_seq"] == json!(last)
        },
        || context(http, hub, edge),
    );
    last
}

// ---------------------------------------------------------------------------------------------
// Writes
// ---------------------------------------------------------------------------------------------

/// Inserts a new payment (201); returns the stored row.
fn pay(http: &Http, edge: &EdgeProcess, order: &str, id: &str, amount: i64) -> Json {
    let row = json!({"id": id, "order_id": order, "method": "card", "amount": amount});
    let stored = http.insert(&Worker(edge), "order_payment", row).expect(201);
    assert_eq!(stored["amount"], amount, "{stored}");
    stored
}

/// The edge's payments and the hub's payments for its branch are the same rows: same ids,
/// each once, same order, amount, method and seq. Also checks the hub's grouped count and
/// sum for the branch. Returns the number of payments.
fn assert_payments_at_hub(http: &Http, hub: &HubProcess, edge: &EdgeProcess) -> usize {
    let branch = edge.branch();
    let at_edge = http.edge_rows(&Worker(edge), "order_payment");
    let at_hub = http.hub_rows(hub, json!({"table": "order_payment", "branch": branch}));
    let edge_ids: BTreeSet<&String> = at_edge.keys().collect();
    let hub_ids: BTreeSet<&String> = at_hub.keys().map(|(_, id)| id).collect();
    assert_eq!(hub_ids.len(), at_hub.len(), "each payment once at the hub");
    assert_eq!(
        edge_ids, hub_ids,
        "{branch}: the payments at the edge and at the hub"
    );
    for (id, row) in &at_edge {
        let h = &at_hub[&(branch.to_owned(), id.clone())];
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

/// The edge serves what was written before (the rows are unchanged), takes new writes, and
/// everything reaches the hub.
fn assert_serves_and_syncs(
    http: &Http,
    hub: &HubProcess,
    edge: &EdgeProcess,
    before: &[(&str, &str, &Json)],
    new_payment: &str,
) {
    for (table, id, row) in before {
        let now = http.get_row(&Worker(edge), table, id).expect(200);
        assert_eq!(&now, *row, "{table} {id} after the update");
    }
    let order = format!("{new_payment}-order");
    open_order(http, &Worker(edge), &order, 1, 990);
    pay(http, edge, &order, new_payment, 990);
    assert_eq!(
        http.get_row(&Worker(edge), "order_payment", new_payment)
            .expect(200)["amount"],
        990
    );
    wait_synced(http, hub, edge);
    let payments = assert_payments_at_hub(http, hub, edge);
    assert_eq!(
        payments,
        before
            .iter()
            .filter(|(t, ..)| *t == "order_payment")
            .count()
            + 1
    );
}

/// Checks a published release's description.
fn assert_release(body: &Json, version: &str, ring: &str, size: usize) {
    assert_eq!(body["version"], version, "{body}");
    assert_eq!(body["ring"], ring, "{body}");
    assert_eq!(body["target"], shared::release::this_target(), "{body}");
    assert_eq!(body["size"], json!(size), "{body}");
    assert!(is_hex(&body["hash"], 64), "a blake3 hash in hex: {body}");
    assert!(
        is_hex(&body["signature"], 128),
        "an ed25519 signature in hex: {body}"
    );
    assert!(body["published_at"].is_string(), "{body}");
}

// ---------------------------------------------------------------------------------------------
// 1. A connected edge installs a release
// ---------------------------------------------------------------------------------------------

#[test]
fn connected_edge_installs_a_published_release() {
    let http = Http::new();
    let hub = HubProcess::start();
    let mut edge = EdgeProcess::start_synced("B001", &hub, &[]);
    let keeper = edge.pid().expect("the keeper's pid");

    // The first start installed the running binary as the first release.
    let before = wait_connected(&http, &hub, &edge);
    assert_ne!(before, "0.2.0", "the edge under test already runs 0.2.0");
    assert_eq!(current_release(&edge), before);
    assert!(
        releases_dir(&edge)
            .join(&before)
            .join("outpost-edge")
            .is_file(),
        "releases/{before}/outpost-edge"
    );

    open_order(&http, &Worker(&edge), "o1", 2, 1250);
    pay(&http, &edge, "o1", "p1", 1000);
    pay(&http, &edge, "o1", "p2", 1500);
    wait_synced(&http, &hub, &edge);
    assert_eq!(
        http.branch_info(&hub, "B001")["edge_version"],
        before.as_str()
    );
    let rows: Vec<(&str, &str, Json)> = [
        ("order_header", "o1"),
        ("order_payment", "p1"),
        ("order_payment", "p2"),
    ]
    .into_iter()
    .map(|(t, id)| (t, id, http.get_row(&Worker(&edge), t, id).expect(200)))
    .collect();

    let artifact = edge_artifact();
    let size = artifact.len();
    let published = http.publish(&hub, "0.2.0", "all", artifact).expect(201);
    assert_release(&published, "0.2.0", "all", size);

    let entry = wait_installed(&http, &hub, &edge, "0.2.0");
    let outcome = &entry["last_outcome"];
    assert_eq!(outcome["from"], before.as_str(), "{entry}");
    assert!(outcome["detail"].is_string(), "{entry}");
    assert!(outcome["at"].is_string(), "{entry}");
    assert_eq!(
        entry["outcomes"].as_array().map(Vec::len),
        Some(1),
        "one update, one outcome: {entry}"
    );
    assert_eq!(entry["connected"], true, "{entry}");

    // The switch happened under the same keeper process.
    assert_eq!(current_release(&edge), "0.2.0");
    let staged = releases_dir(&edge).join("0.2.0").join("outpost-edge");
    assert_eq!(
        std::fs::metadata(&staged)
            .unwrap_or_else(|e| panic!("{}: {e}", staged.display()))
            .len(),
        size as u64
    );
    assert_eq!(edge.pid(), Some(keeper));
    assert!(edge.is_running(), "the keeper still runs");
    assert_eq!(edge.starts(), 1, "the test started the edge once");
    let health = http.healthz(&Worker(&edge));
    assert_eq!(health["version"], "0.2.0", "{health}");
    assert_eq!(health["hub"], "connected", "{health}");
    assert_eq!(
        http.branch_info(&hub, "B001")["edge_version"],
        "0.2.0",
        "the hub learnt the new version from the edge's hello"
    );

    // One clean download of the whole artifact.
    assert_eq!(
        http.hub_metric(&hub, "outpost_hub_release_fetches_total"),
        1
    );
    assert_eq!(
        http.hub_metric(&hub, "outpost_hub_release_fetches_resumed_total"),
        0
    );
    assert_eq!(
        http.hub_metric(&hub, "outpost_hub_release_bytes_served_total"),
        size as u64
    );

    // The data from before is served, writes work, and sync goes on.
    let before_rows: Vec<(&str, &str, &Json)> =
        rows.iter().map(|(t, id, r)| (*t, *id, r)).collect();
    assert_serves_and_syncs(&http, &hub, &edge, &before_rows, "p3");

    // A second release: installed the same way, and the disk keeps the current and the
    // previous release only.
    let p3 = http
        .get_row(&Worker(&edge), "order_payment", "p3")
        .expect(200);
    let mut before_rows = before_rows;
    before_rows.push(("order_payment", "p3", &p3));
    http.publish(&hub, "0.3.0", "all", edge_artifact())
        .expect(201);
    wait_installed(&http, &hub, &edge, "0.3.0");
    let mut kept: Vec<String> = std::fs::read_dir(releases_dir(&edge))
        .expect("the releases dir")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    kept.sort();
    assert_eq!(kept, ["0.2.0", "0.3.0"], "{before} was removed");
    assert_eq!(edge.pid(), Some(keeper));
    assert_serves_and_syncs(&http, &hub, &edge, &before_rows, "p4");
}

// ---------------------------------------------------------------------------------------------
// 2. An edge that was down gets the release when it comes back
// ---------------------------------------------------------------------------------------------

#[test]
fn offline_edge_gets_the_release_on_reconnect() {
    let http = Http::new();
    let hub = HubProcess::start();
    let mut edge = EdgeProcess::start_synced("B001", &hub, &[]);
    let before = wait_connected(&http, &hub, &edge);
    assert_ne!(before, "0.2.0", "the edge under test already runs 0.2.0");
    open_order(&http, &Worker(&edge), "o1", 1, 1250);
    pay(&http, &edge, "o1", "p1", 1250);
    wait_synced(&http, &hub, &edge);
    let p1 = http
        .get_row(&Worker(&edge), "order_payment", "p1")
        .expect(200);

    edge.kill9();
    let artifact = edge_artifact();
    let size = artifact.len();
    let published = http.publish(&hub, "0.2.0", "all", artifact).expect(201);
    assert_release(&published, "0.2.0", "all", size);
    // Nobody has fetched it: the only branch is down.
    assert_eq!(
        http.hub_metric(&hub, "outpost_hub_release_fetches_total"),
        0
    );

    edge.restart();
    let entry = wait_installed(&http, &hub, &edge, "0.2.0");
    assert_eq!(entry["last_outcome"]["from"], before.as_str(), "{entry}");
    assert_eq!(current_release(&edge), "0.2.0");
    assert!(edge.is_running(), "the keeper still runs");
    let health = http.healthz(&Worker(&edge));
    assert_eq!(health["version"], "0.2.0", "{health}");
    assert_eq!(
        http.hub_metric(&hub, "outpost_hub_release_bytes_served_total"),
        size as u64
    );
    assert_serves_and_syncs(&http, &hub, &edge, &[("order_payment", "p1", &p1)], "p2");
}

// ---------------------------------------------------------------------------------------------
// 3. A download cut in the middle resumes
// ---------------------------------------------------------------------------------------------

/// Where the test hook cuts the first download (the debug `outpost-edge` artifact is ~30 MB).
const CUT_AT: u64 = 10_000_000;

#[test]
fn interrupted_download_resumes() {
    let http = Http::new();
    let hub = HubProcess::start();
    let cut = CUT_AT.to_string();
    let edge = EdgeProcess::start_synced(
        "B001",
        &hub,
        &[("OUTPOST_FAULT_CUT_DOWNLOAD", cut.as_str())],
    );
    let before = wait_connected(&http, &hub, &edge);
    assert_ne!(before, "0.2.0", "the edge under test already runs 0.2.0");

    let artifact = edge_artifact();
    let size = artifact.len() as u64;
    assert!(
        size > 2 * CUT_AT,
        "the artifact ({size} bytes) is large enough to cut at {CUT_AT}"
    );
    http.publish(&hub, "0.2.0", "all", artifact).expect(201);
    let entry = wait_installed(&http, &hub, &edge, "0.2.0");
    assert_eq!(entry["last_outcome"]["from"], before.as_str(), "{entry}");
    assert_eq!(current_release(&edge), "0.2.0");

    let log = strip_ansi(&edge.log());
    assert!(
        log.contains("test hook: cutting the hub link mid-download"),
        "the fault hook fired:\n{}",
        tail(&log, 40)
    );
    let resumed_line = log
        .lines()
        .find(|l| l.contains("resuming"))
        .unwrap_or_else(|| panic!("the edge log mentions resuming:\n{}", tail(&log, 40)));
    // The download went on from what had arrived before the cut, not from the start.
    let offset: u64 = resumed_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("offset=")?.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {resumed_line:?}"));
    assert!(
        (CUT_AT..size).contains(&offset),
        "resumed at {offset}: {resumed_line}"
    );

    // The edge's own counters started again with the new release: the hub's tell.
    let fetches = http.hub_metric(&hub, "outpost_hub_release_fetches_total");
    let resumed = http.hub_metric(&hub, "outpost_hub_release_fetches_resumed_total");
    let served = http.hub_metric(&hub, "outpost_hub_release_bytes_served_total");
    let counters = format!("fetches {fetches}, resumed {resumed}, bytes served {served} of {size}");
    assert!(fetches >= 2, "{counters}");
    assert!(resumed >= 1, "{counters}");
    // Started over, the hub would have sent the whole artifact after what preceded the cut.
    assert!(served >= size && served < size + CUT_AT, "{counters}");
    assert_eq!(
        http.healthz(&Worker(&edge))["version"],
        "0.2.0",
        "the resumed download installed"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Refusals: a tampered artifact, a foreign signature, a failing self-check
// ---------------------------------------------------------------------------------------------

/// After a refusal: the edge still runs `before` under the same keeper, the refused release
/// left nothing behind, and the branch still serves and syncs.
fn assert_refused_and_serving(
    http: &Http,
    hub: &HubProcess,
    edge: &mut EdgeProcess,
    before: &str,
    refused: &str,
    entry: &Json,
) {
    assert_eq!(entry["last_outcome"]["from"], before, "{entry}");
    assert_eq!(entry["installed"], before, "{entry}");
    assert_eq!(
        entry["outcomes"].as_array().map(Vec::len),
        Some(1),
        "{entry}"
    );
    let health = http.healthz(&Worker(edge));
    assert_eq!(health["version"], before, "{health}");
    assert_eq!(health["hub"], "connected", "{health}");
    assert!(edge.is_running(), "the keeper still runs");
    assert_eq!(current_release(edge), before);
    assert!(
        !releases_dir(edge).join(refused).exists(),
        "nothing of the refused release is staged"
    );
    assert!(
        !releases_dir(edge).join(format!("{refused}.part")).exists(),
        "no partial download is kept"
    );
    assert_eq!(
        http.edge_metric(&Worker(edge), "outpost_update_refused_total"),
        1
    );
    assert_eq!(
        http.edge_metric(&Worker(edge), "outpost_update_staged_total"),
        0
    );
    let p0 = http
        .get_row(&Worker(edge), "order_payment", "p0")
        .expect(200);
    assert_serves_and_syncs(http, hub, edge, &[("order_payment", "p0", &p0)], "p1");
}

/// A synced edge with one payment (`p0`), connected; returns it and the version it runs.
fn synced_edge(http: &Http, hub: &HubProcess) -> (EdgeProcess, String) {
    let edge = EdgeProcess::start_synced("B001", hub, &[]);
    let before = wait_connected(http, hub, &edge);
    open_order(http, &Worker(&edge), "o0", 1, 1250);
    pay(http, &edge, "o0", "p0", 1250);
    wait_synced(http, hub, &edge);
    (edge, before)
}

#[test]
fn tampered_artifact_is_refused() {
    let http = Http::new();
    let hub = HubProcess::start();
    let (mut edge, before) = synced_edge(&http, &hub);
    assert_ne!(before, "0.2.0", "the edge under test already runs 0.2.0");
    edge.kill9();

    let artifact = edge_artifact();
    let size = artifact.len() as u64;
    http.publish(&hub, "0.2.0", "all", artifact).expect(201);
    // Alter 4 KiB in the middle of the artifact on the hub's disk, same length.
    let path = hub
        .data_dir()
        .join("releases")
        .join(shared::release::this_target())
        .join("0.2.0.artifact");
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut chunk = vec![0u8; 4096];
        f.seek(SeekFrom::Start(size / 2)).expect("seek");
        f.read_exact(&mut chunk).expect("read the artifact");
        for b in &mut chunk {
            *b ^= 0xA5;
        }
        f.seek(SeekFrom::Start(size / 2)).expect("seek");
        f.write_all(&chunk).expect("write the artifact");
        f.sync_all().expect("sync the artifact");
    }
    assert_eq!(std::fs::metadata(&path).expect("the artifact").len(), size);

    edge.restart();
    let entry = wait_outcome(&http, &hub, &edge, "0.2.0", "refused");
    let detail = text(&entry["last_outcome"]["detail"]);
    assert!(
        detail.contains("hash"),
        "the detail names the hash: {entry}"
    );
    // The whole artifact was fetched once, then refused, and never fetched again.
    assert_eq!(
        http.hub_metric(&hub, "outpost_hub_release_fetches_total"),
        1
    );
    assert_eq!(
        http.hub_metric(&hub, "outpost_hub_release_bytes_served_total"),
        size
    );
    assert_refused_and_serving(&http, &hub, &mut edge, &before, "0.2.0", &entry);
}

#[test]
fn release_signed_by_another_key_is_refused() {
    let http = Http::new();
    let hub = HubProcess::start();
    let other = HubProcess::start();
    let (mut edge, before) = synced_edge(&http, &hub);
    assert_ne!(before, "0.2.0", "the edge under test already runs 0.2.0");
    edge.kill9();

    // The edge now trusts the other hub's release key.
    let foreign = tempfile::tempdir().expect("a temporary directory");
    other.enroll("B001", foreign.path());
    let ours = edge.root().join("identity").join("release.pub");
    let theirs = foreign.path().join("release.pub");
    let (ours_key, theirs_key) = (
        std::fs::read_to_string(&ours).expect("the edge's release.pub"),
        std::fs::read_to_string(&theirs).expect("the other hub's release.pub"),
    );
    assert_ne!(ours_key, theirs_key, "two hubs, two release keys");
    std::fs::copy(&theirs, &ours).expect("replace release.pub");

    http.publish(&hub, "0.2.0", "all", edge_artifact())
        .expect(201);
    edge.restart();
    let entry = wait_outcome(&http, &hub, &edge, "0.2.0", "refused");
    let detail = text(&entry["last_outcome"]["detail"]);
    assert!(
        detail.contains("signature"),
        "the detail names the signature: {entry}"
    );
    // Refused on the offer: nothing was downloaded.
    assert_eq!(
        http.hub_metric(&hub, "outpost_hub_release_fetches_total"),
        0
    );
    assert_refused_and_serving(&http, &hub, &mut edge, &before, "0.2.0", &entry);
}

#[test]
fn self_check_failure_is_refused() {
    let http = Http::new();
    let hub = HubProcess::start();
    let (mut edge, before) = synced_edge(&http, &hub);
    assert_ne!(before, "0.3.0", "the edge under test already runs 0.3.0");

    let artifact = script("exit 1\n");
    let size = artifact.len();
    let published = http.publish(&hub, "0.3.0", "all", artifact).expect(201);
    assert_release(&published, "0.3.0", "all", size);
    let entry = wait_outcome(&http, &hub, &edge, "0.3.0", "refused");
    let detail = text(&entry["last_outcome"]["detail"]);
    assert!(
        detail.contains("self-check"),
        "the detail names the self-check: {entry}"
    );
    assert_refused_and_serving(&http, &hub, &mut edge, &before, "0.3.0", &entry);
}

// ---------------------------------------------------------------------------------------------
// 5. A release that does not come up is rolled back
// ---------------------------------------------------------------------------------------------

#[test]
fn failing_release_is_rolled_back() {
    let http = Http::new();
    let hub = HubProcess::start();
    let (mut edge, before) = synced_edge(&http, &hub);
    assert_ne!(before, "0.3.0", "the edge under test already runs 0.3.0");
    let keeper = edge.pid();
    let p0 = http
        .get_row(&Worker(&edge), "order_payment", "p0")
        .expect(200);

    // Passes its self-check, but exits with 3 when asked to serve.
    let artifact = script(
        "if [ \"$1\" = self-check ]; then echo \"outpost-edge 0.3.0\"; exit 0; fi\nexit 3\n",
    );
    let size = artifact.len();
    let published = http.publish(&hub, "0.3.0", "all", artifact).expect(201);
    assert_release(&published, "0.3.0", "all", size);

    let entry = wait_outcome(&http, &hub, &edge, "0.3.0", "rolled_back");
    assert_eq!(entry["last_outcome"]["from"], before.as_str(), "{entry}");
    assert_eq!(
        entry["outcomes"].as_array().map(Vec::len),
        Some(1),
        "{entry}"
    );
    // The previous release serves again (a new worker: ports.json names its port).
    assert_eq!(current_release(&edge), before);
    let health = http.healthz(&Worker(&edge));
    assert_eq!(health["version"], before.as_str(), "{health}");
    assert_eq!(health["hub"], "connected", "{health}");
    assert_eq!(entry["installed"], before.as_str(), "{entry}");
    assert_eq!(
        http.branch_info(&hub, "B001")["edge_version"],
        before.as_str()
    );
    assert_eq!(edge.pid(), keeper);
    assert!(edge.is_running(), "the keeper still runs");
    assert_serves_and_syncs(&http, &hub, &edge, &[("order_payment", "p0", &p0)], "p1");
}

/// Probation deadline for the test below: what is under test, not a synchronisation.
const PROBATION_S: &str = "3";

#[test]
fn release_not_healthy_in_time_is_rolled_back() {
    let http = Http::new();
    let hub = HubProcess::start();
    let edge =
        EdgeProcess::start_synced("B001", &hub, &[("OUTPOST_UPDATE_DEADLINE_S", PROBATION_S)]);
    let before = wait_connected(&http, &hub, &edge);
    assert_ne!(before, "0.3.0", "the edge under test already runs 0.3.0");
    open_order(&http, &Worker(&edge), "o0", 1, 1250);
    pay(&http, &edge, "o0", "p0", 1250);
    wait_synced(&http, &hub, &edge);
    let p0 = http
        .get_row(&Worker(&edge), "order_payment", "p0")
        .expect(200);

    // Passes its self-check, then never becomes healthy: it only waits for the keeper's
    // `stop` on its stdin.
    let artifact = script(
        "if [ \"$1\" = self-check ]; then echo \"outpost-edge 0.3.0\"; exit 0; fi\nread line\nexit 0\n",
    );
    http.publish(&hub, "0.3.0", "all", artifact).expect(201);
    let entry = wait_outcome(&http, &hub, &edge, "0.3.0", "rolled_back");
    assert_eq!(entry["last_outcome"]["from"], before.as_str(), "{entry}");
    assert_eq!(current_release(&edge), before);
    let health = http.healthz(&Worker(&edge));
    assert_eq!(health["version"], before.as_str(), "{health}");
    assert_eq!(health["hub"], "connected", "{health}");
    assert_eq!(entry["installed"], before.as_str(), "{entry}");
    assert_serves_and_syncs(&http, &hub, &edge, &[("order_payment", "p0", &p0)], "p1");
}

/// `releases/current` as text.
fn current_text(edge: &EdgeProcess) -> String {
    std::fs::read_to_string(releases_dir(edge).join("current")).unwrap_or_default()
}

#[test]
fn a_service_stop_during_a_trial_does_not_count_as_a_failed_start() {
    let http = Http::new();
    let hub = HubProcess::start();
    let mut edge = EdgeProcess::start_synced("B001", &hub, &[]);
    let before = wait_connected(&http, &hub, &edge);
    // Passes its self-check, then never becomes healthy until the deadline (120 s).
    let artifact = script(
        "if [ \"$1\" = self-check ]; then echo \"outpost-edge 0.3.0\"; exit 0; fi\nread line\nexit 0\n",
    );
    http.publish(&hub, "0.3.0", "all", artifact).expect(201);
    wait_until(
        "0.3.0 started on trial",
        || current_text(&edge).contains("\"attempts\":1"),
        || context(&http, &hub, &edge),
    );
    assert!(
        current_text(&edge).starts_with("0.3.0\ntrial "),
        "{}",
        current_text(&edge)
    );
    // A service stop (SIGTERM to the keeper): the worker is asked to stop, and that start is
    // not held against the release.
    let pid = edge.pid().expect("the keeper's pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let log = releases_dir(&edge);
    wait_until(
        "the keeper stopped",
        || !edge.is_running(),
        || format!("the keeper still runs; releases in {}", log.display()),
    );
    let text = current_text(&edge);
    assert!(text.starts_with("0.3.0\ntrial "), "{text}");
    assert!(text.contains("\"attempts\":0"), "{text}");
    assert!(
        text.contains(&format!("\"previous\":\"{before}\"")),
        "{text}"
    );
}

#[test]
fn release_that_cannot_reach_the_hub_is_rolled_back_and_tried_again() {
    let http = Http::new();
    let hub = HubProcess::start();
    let mut edge =
        EdgeProcess::start_synced("B001", &hub, &[("OUTPOST_UPDATE_DEADLINE_S", PROBATION_S)]);
    let before = wait_connected(&http, &hub, &edge);
    assert_ne!(before, "0.3.0", "the edge under test already runs 0.3.0");

    // The real edge, except that it looks for the hub where none listens: its store opens and
    // its API listens, but the hub never welcomes it (as when the link drops during a switch).
    let body = format!(
        "if [ \"$1\" = self-check ]; then echo \"outpost-edge 0.3.0\"; exit 0; fi\n\
         prev=\n\
         for a do\n  shift\n  p=$a\n  if [ \"$prev\" = --hub ]; then a=127.0.0.1:9; fi\n  \
         set -- \"$@\" \"$a\"\n  prev=$p\ndone\n\
         exec '{}' \"$@\"\n",
        edge_binary().display()
    );
    let artifact = script(&body);
    let size = artifact.len() as u64;
    http.publish(&hub, "0.3.0", "all", artifact).expect(201);

    // Rolled back, but not refused: tried again on the next connection, CRASHES_MAX (3) times
    // in all, and then refused for good. The hub keeps each branch's latest outcome per version.
    let mut entry = Json::Null;
    wait_until(
        "the third rollback of 0.3.0 reported",
        || {
            entry = http.rollout(&hub, "B001");
            entry["last_outcome"]["version"] == "0.3.0"
                && entry["last_outcome"]["outcome"] == "rolled_back"
                && text(&entry["last_outcome"]["detail"]).contains("3 of 3")
        },
        || context(&http, &hub, &edge),
    );
    let detail = text(&entry["last_outcome"]["detail"]);
    assert!(detail.contains("did not reach the hub"), "{entry}");
    let state: Json = serde_json::from_slice(
        &std::fs::read(releases_dir(&edge).join("state.json")).expect("state.json"),
    )
    .expect("state.json is JSON");
    assert!(state["refused"]["0.3.0"].is_string(), "{state}");
    // Fetched once: the later tries reuse the staged, verified binary.
    assert_eq!(
        http.hub_metric(&hub, "outpost_hub_release_fetches_total"),
        1
    );
    assert_eq!(
        http.hub_metric(&hub, "outpost_hub_release_bytes_served_total"),
        size
    );
    wait_connected(&http, &hub, &edge);
    assert_eq!(current_release(&edge), before);
    assert_eq!(http.healthz(&Worker(&edge))["version"], before.as_str());
    assert!(edge.is_running(), "the keeper still runs");
}

#[test]
fn keeper_serves_with_its_own_binary_when_the_release_cannot_start() {
    let http = Http::new();
    let hub = HubProcess::start();
    let (mut edge, before) = synced_edge(&http, &hub);
    let p0 = http
        .get_row(&Worker(&edge), "order_payment", "p0")
        .expect(200);
    edge.kill9();
    // The release's binary can no longer be run (damaged, or its mode lost): a new file, so
    // the test binary it was hard-linked from is untouched.
    let binary = releases_dir(&edge).join(&before).join("outpost-edge");
    std::fs::remove_file(&binary).expect("remove the release binary");
    std::fs::write(&binary, b"not a program").expect("write a file that cannot run");
    edge.restart();
    assert_eq!(wait_connected(&http, &hub, &edge), before);
    assert!(
        strip_ansi(&edge.log()).contains("release cannot start"),
        "the keeper says why it runs its own binary:\n{}",
        tail(&edge.log(), 20)
    );
    assert_serves_and_syncs(&http, &hub, &edge, &[("order_payment", "p0", &p0)], "p1");
}

// ---------------------------------------------------------------------------------------------
// 6. Rollout rings
// ---------------------------------------------------------------------------------------------

#[test]
fn canary_ring_first() {
    let http = Http::new();
    let hub = HubProcess::start();
    let b1 = EdgeProcess::start_synced("B001", &hub, &[]);
    let b2 = EdgeProcess::start_synced("B002", &hub, &[]);
    let before = wait_connected(&http, &hub, &b1);
    assert_eq!(wait_connected(&http, &hub, &b2), before);
    assert_ne!(before, "0.2.0", "the edges under test already run 0.2.0");

    let set = http.set_ring(&hub, "B001", "canary").expect(200);
    assert_eq!(set["ring"], "canary", "{set}");
    assert_eq!(http.rollout(&hub, "B001")["ring"], "canary");
    assert_eq!(http.rollout(&hub, "B002")["ring"], "all");

    let artifact = edge_artifact();
    let size = artifact.len();
    let published = http.publish(&hub, "0.2.0", "canary", artifact).expect(201);
    assert_release(&published, "0.2.0", "canary", size);
    wait_installed(&http, &hub, &b1, "0.2.0");

    // B002 was connected all along and was offered nothing.
    let b2_entry = http.rollout(&hub, "B002");
    assert_eq!(b2_entry["connected"], true, "{b2_entry}");
    assert_eq!(http.branch_info(&hub, "B002")["connected"], true);
    assert_eq!(b2_entry["installed"], before.as_str(), "{b2_entry}");
    assert_eq!(b2_entry["outcomes"], json!([]), "{b2_entry}");
    assert_eq!(b2_entry["last_outcome"], Json::Null, "{b2_entry}");
    assert_eq!(http.healthz(&Worker(&b2))["version"], before.as_str());
    assert_eq!(current_release(&b2), before);
    assert_eq!(
        http.hub_metric(&hub, "outpost_hub_release_fetches_total"),
        1,
        "only the canary fetched the release"
    );

    let promoted = http.promote(&hub, "0.2.0").expect(200);
    assert_eq!(promoted["ring"], "all", "{promoted}");
    assert_eq!(promoted["version"], "0.2.0", "{promoted}");
    let entry = wait_installed(&http, &hub, &b2, "0.2.0");
    assert_eq!(entry["last_outcome"]["from"], before.as_str(), "{entry}");
    assert_eq!(current_release(&b2), "0.2.0");
    let listed = http.releases(&hub);
    assert_eq!(listed["releases"][0]["version"], "0.2.0", "{listed}");
    assert_eq!(listed["releases"][0]["ring"], "all", "{listed}");
    // B001 stays on 0.2.0 with its single outcome.
    let b1_entry = http.rollout(&hub, "B001");
    assert_eq!(b1_entry["installed"], "0.2.0", "{b1_entry}");
    assert_eq!(
        b1_entry["outcomes"].as_array().map(Vec::len),
        Some(1),
        "{b1_entry}"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. The release API's errors
// ---------------------------------------------------------------------------------------------

#[test]
fn release_api_errors() {
    let http = Http::new();
    let hub = HubProcess::start();
    let identity = tempfile::tempdir().expect("a temporary directory");
    hub.enroll("B001", identity.path());
    let token = Some(hub.admin_token());
    let publish_url = |query: &str| hub.url(&format!("/api/releases{query}"));
    let artifact_dir = hub.data_dir().join("releases");
    // The files under the hub's releases directory, as `<target>/<name>` or `<name>`.
    let artifacts = || -> BTreeSet<String> {
        let names = |dir: &std::path::Path| -> Vec<(String, bool)> {
            std::fs::read_dir(dir)
                .map(|d| {
                    d.map(|e| {
                        let e = e.expect("a dir entry");
                        let is_dir = e.file_type().expect("a file type").is_dir();
                        (e.file_name().into_string().expect("UTF-8"), is_dir)
                    })
                    .collect()
                })
                .unwrap_or_default()
        };
        let mut all = BTreeSet::new();
        for (name, is_dir) in names(&artifact_dir) {
            if is_dir {
                for (inner, _) in names(&artifact_dir.join(&name)) {
                    all.insert(format!("{name}/{inner}"));
                }
            } else {
                all.insert(name);
            }
        }
        all
    };
    let here = shared::release::this_target();

    // Authentication, on every release route.
    for (who, t) in [("no token", None), ("a wrong token", Some("not-the-token"))] {
        for (method, url, body) in [
            (
                Method::POST,
                publish_url("?version=1.0.0&ring=all"),
                Body::Bytes(b"artifact".to_vec()),
            ),
            (Method::GET, publish_url(""), Body::Empty),
            (
                Method::POST,
                hub.url("/api/releases/1.0.0/promote"),
                Body::Empty,
            ),
            (
                Method::PUT,
                hub.url("/api/branches/B001/ring"),
                Body::Json(json!({"ring": "canary"})),
            ),
        ] {
            let r = http.send(method.clone(), &url, t, body);
            assert_eq!(r.status, 401, "{method} {url} with {who}: {}", r.text);
            assert_eq!(r.code(), "unauthorized", "{}", r.text);
        }
    }
    assert_eq!(http.releases(&hub)["releases"], json!([]));

    // Publishing what is not a release.
    let cases: Vec<(&str, &str, &[u8], u16, &str)> = vec![
        (
            "a version that is not semver",
            "?version=banana&ring=all",
            b"x",
            400,
            "invalid_version",
        ),
        (
            "a two-part version",
            "?version=1.2&ring=all",
            b"x",
            400,
            "invalid_version",
        ),
        ("no version", "?ring=all", b"x", 400, "invalid_version"),
        (
            "an unknown ring",
            "?version=1.0.0&ring=beta",
            b"x",
            400,
            "invalid_ring",
        ),
        ("no ring", "?version=1.0.0", b"x", 400, "invalid_ring"),
        (
            "an empty artifact",
            "?version=1.0.0&ring=all",
            b"",
            400,
            "empty_artifact",
        ),
    ];
    for (what, query, body, status, code) in cases {
        let r = http.send(
            Method::POST,
            &publish_url(query),
            token,
            Body::Bytes(body.to_vec()),
        );
        assert_eq!(r.status, status, "publish with {what}: {}", r.text);
        assert_eq!(r.code(), code, "publish with {what}: {}", r.text);
        assert!(
            r.body["message"].is_string(),
            "publish with {what}: {}",
            r.text
        );
    }
    // None of it left a release or a file behind.
    assert_eq!(http.releases(&hub)["releases"], json!([]));
    assert_eq!(
        artifacts(),
        BTreeSet::new(),
        "no artifact from a refused publish"
    );

    // A release, then the same version again.
    let first = http
        .publish(&hub, "1.0.0", "canary", b"the first artifact".to_vec())
        .expect(201);
    assert_release(&first, "1.0.0", "canary", b"the first artifact".len());
    let again = http.publish(&hub, "1.0.0", "all", b"another artifact".to_vec());
    assert_eq!(again.status, 409, "{}", again.text);
    assert_eq!(again.code(), "release_exists", "{}", again.text);
    assert!(again.body["message"].is_string(), "{}", again.text);
    // The first release is unchanged, on record and on disk.
    let listed = http.releases(&hub);
    assert_eq!(listed["releases"], json!([first.clone()]), "{listed}");
    assert_eq!(
        std::fs::read(artifact_dir.join(&here).join("1.0.0.artifact")).expect("the artifact"),
        b"the first artifact"
    );
    assert_eq!(
        artifacts(),
        BTreeSet::from([format!("{here}/1.0.0.artifact")]),
        "only the first release's artifact"
    );

    // Promoting what was never published.
    let r = http.promote(&hub, "9.9.9");
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(r.code(), "unknown_release", "{}", r.text);
    assert!(r.body["message"].is_string(), "{}", r.text);

    // A ring that does not exist.
    let r = http.set_ring(&hub, "B001", "beta");
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.code(), "invalid_ring", "{}", r.text);
    assert_eq!(http.rollout(&hub, "B001")["ring"], "all");

    // Nothing changed; the release API still works.
    assert_eq!(http.releases(&hub)["releases"], json!([first]));

    // The same version for another platform is another release; for the same one, again 409.
    let arm_url = publish_url("?version=1.0.0&ring=canary&target=aarch64-linux");
    let arm = http
        .send(
            Method::POST,
            &arm_url,
            token,
            Body::Bytes(b"arm build".to_vec()),
        )
        .expect(201);
    assert_eq!(arm["target"], "aarch64-linux", "{arm}");
    assert_ne!(arm["signature"], first["signature"], "{arm}");
    let again = http.send(Method::POST, &arm_url, token, Body::Bytes(b"x".to_vec()));
    assert_eq!(again.status, 409, "{}", again.text);
    assert_eq!(again.code(), "release_exists", "{}", again.text);
    assert_eq!(
        artifacts(),
        BTreeSet::from([
            format!("{here}/1.0.0.artifact"),
            "aarch64-linux/1.0.0.artifact".to_owned()
        ])
    );
    // Promotion moves the version on every platform.
    let promoted = http.promote(&hub, "1.0.0").expect(200);
    assert_eq!(promoted["ring"], "all", "{promoted}");
    assert_eq!(promoted["version"], "1.0.0", "{promoted}");
    let targets = promoted["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 2, "{promoted}");
    let mine = targets
        .iter()
        .find(|t| t["target"] == here.as_str())
        .expect("this platform's release");
    assert_eq!(mine["hash"], first["hash"], "{promoted}");
    assert_eq!(mine["signature"], first["signature"], "{promoted}");
    assert!(targets.iter().all(|t| t["ring"] == "all"), "{promoted}");
    // A third platform's build joins the version's ring, or is refused before its upload.
    let riscv = http.send(
        Method::POST,
        &publish_url("?version=1.0.0&ring=canary&target=riscv64-linux"),
        token,
        Body::Bytes(b"riscv build".to_vec()),
    );
    assert_eq!(riscv.status, 409, "{}", riscv.text);
    assert_eq!(riscv.code(), "ring_mismatch", "{}", riscv.text);
    assert!(
        riscv.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("ring all")),
        "{}",
        riscv.text
    );
    assert_eq!(artifacts().len(), 2, "nothing stored for the refused build");
}
