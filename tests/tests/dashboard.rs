//! End-to-end test of the head-office dashboard (`GET /` on the hub) in a real headless
//! Chromium: two branches sync orders and payments to a hub, the page (given the admin token
//! in its fragment) shows each branch's orders and sales, picks up a new payment on its own
//! 2 s refresh without a reload, and a screenshot of it is written to `target/dashboard.png`
//! (and `docs/dashboard.png` with `OUTPOST_UPDATE_SCREENSHOT=1`).
//!
//! The browser is driven over the Chrome DevTools Protocol with a minimal client written
//! here (JSON commands over one WebSocket, responses matched by id). Without Chromium the
//! test prints a skip line and passes, unless `OUTPOST_REQUIRE_BROWSER` is set (CI), in which
//! case it fails. `OUTPOST_CHROMIUM` names another browser binary.
//!
//! Nothing waits on a timer: every wait is [`wait_until`] on a state the test then checks
//! exactly (healthz positions, the hub's branch table, the page's DOM). The deadlines are
//! safety nets, never timing assertions.

use std::cell::{Cell, RefCell};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value as Json, json};
use tests::{Body, EdgeProcess, Http, HubProcess, sync_context, tail, wait_until};
use tokio_tungstenite::tungstenite::Message;

/// Safety net for the browser's start and for one DevTools command.
const BROWSER_DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Sync
// ---------------------------------------------------------------------------------------------

/// Waits until each edge has everything it wrote acknowledged and the hub's durable position
/// for its branch is the edge's last seq.
fn wait_synced(http: &Http, hub: &HubProcess, edges: &[&EdgeProcess]) {
    for edge in edges {
        wait_until(
            &format!("{} fully synced with the hub", edge.branch()),
            || {
                let h = http.healthz(edge);
                let last = h["last_seq"].as_u64();
                last.is_some()
                    && h["synced_seq"].as_u64() == last
                    && http.branch_info(hub, edge.branch())["synced_seq"].as_u64() == last
            },
            || sync_context(http, hub, edge),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Chromium and a minimal DevTools Protocol client
// ---------------------------------------------------------------------------------------------

/// The browser binary: `OUTPOST_CHROMIUM`, else the first of the usual names on `PATH`.
fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("OUTPOST_CHROMIUM") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "OUTPOST_CHROMIUM={} does not name a file",
            p.display()
        );
        return Some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let names = ["chromium", "chromium-browser", "google-chrome", "chrome"];
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// A headless Chromium on a temporary profile, in a process group of its own. Dropping it
/// kills the whole group (the browser and its renderers) and reaps the browser.
struct Browser {
    child: Option<Child>,
    /// `127.0.0.1:PORT` of the DevTools HTTP endpoint.
    devtools: String,
    /// The browser's stderr lines so far (a thread drains the pipe).
    stderr: mpsc::Receiver<String>,
    seen: RefCell<Vec<String>>,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn launch(binary: &Path) -> Browser {
        let profile = tempfile::Builder::new()
            .prefix("outpost-chromium-")
            .tempdir()
            .expect("a temporary profile directory");
        let mut child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--lang=en-US",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            // The page formats money with the default locale: make it the same everywhere.
            .env("LANG", "en_US.UTF-8")
            .env("LANGUAGE", "en_US")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let pipe = child.stderr.take().expect("the browser's stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut browser = Browser {
            child: Some(child),
            devtools: String::new(),
            stderr: rx,
            seen: RefCell::new(Vec::new()),
            _profile: profile,
        };
        let deadline = Instant::now() + BROWSER_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match browser.stderr.recv_timeout(left) {
                Ok(line) => {
                    browser.seen.borrow_mut().push(line.clone());
                    if let Some(rest) = line.split("DevTools listening on ws://").nth(1) {
                        let host = rest.split('/').next().unwrap_or_default();
                        assert!(!host.is_empty(), "no DevTools address in {line:?}");
                        browser.devtools = host.to_owned();
                        return browser;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "Chromium did not announce its DevTools address within \
                     {BROWSER_DEADLINE:?}; its stderr:\n{}",
                    browser.stderr_text()
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = browser.child.as_mut().and_then(|c| c.wait().ok());
                    panic!(
                        "Chromium exited ({status:?}) without announcing its DevTools \
                         address; its stderr:\n{}",
                        browser.stderr_text()
                    )
                }
            }
        }
    }

    /// The browser's stderr so far (for failure messages).
    fn stderr_text(&self) -> String {
        let mut seen = self.seen.borrow_mut();
        seen.extend(self.stderr.try_iter());
        tail(&seen.join("\n"), 40)
    }

    /// Opens a new tab on `url` (`PUT /json/new?URL`) and returns its WebSocket address.
    fn open_tab(&self, http: &Http, url: &str) -> String {
        let endpoint = format!("http://{}/json/new?{}", self.devtools, percent_encode(url));
        let reply = http.send(Method::PUT, &endpoint, None, Body::Empty);
        let body = reply.expect(200);
        body["webSocketDebuggerUrl"]
            .as_str()
            .unwrap_or_else(|| panic!("PUT /json/new returned no webSocketDebuggerUrl: {body}"))
            .to_owned()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The group holds the browser and every process it started (renderers, zygote).
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One page's DevTools session: commands as JSON text frames, responses matched by id, events
/// ignored.
struct Page<'a> {
    http: &'a Http,
    ws: RefCell<Socket>,
    next_id: Cell<u64>,
}

impl<'a> Page<'a> {
    fn connect(http: &'a Http, ws_url: &str) -> Page<'a> {
        let (ws, _) = http
            .block_on(async {
                tokio::time::timeout(BROWSER_DEADLINE, tokio_tungstenite::connect_async(ws_url))
                    .await
            })
            .unwrap_or_else(|_| panic!("no WebSocket connection to {ws_url}"))
            .unwrap_or_else(|e| panic!("cannot connect to {ws_url}: {e}"));
        Page {
            http,
            ws: RefCell::new(ws),
            next_id: Cell::new(1),
        }
    }

    /// Sends one command and returns its `result` (a DevTools error fails the test).
    fn call(&self, method: &str, params: Json) -> Json {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let command = json!({"id": id, "method": method, "params": params}).to_string();
        let mut ws = self.ws.borrow_mut();
        let reply = self.http.block_on(async {
            tokio::time::timeout(BROWSER_DEADLINE, async {
                ws.send(Message::text(command))
                    .await
                    .unwrap_or_else(|e| panic!("{method}: cannot send: {e}"));
                loop {
                    let frame = ws
                        .next()
                        .await
                        .unwrap_or_else(|| panic!("{method}: the DevTools socket closed"))
                        .unwrap_or_else(|e| panic!("{method}: DevTools socket error: {e}"));
                    let Message::Text(text) = frame else { continue };
                    let msg: Json = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("{method}: a frame is not JSON ({e}): {text}"));
                    if msg["id"] == id {
                        return msg;
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{method}: no response within {BROWSER_DEADLINE:?}"))
        });
        assert!(
            reply["error"].is_null(),
            "{method} failed: {}",
            reply["error"]
        );
        reply["result"].clone()
    }

    /// Evaluates `expression` in the page and returns its value (a thrown exception fails).
    fn eval(&self, expression: &str) -> Json {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        assert!(
            result["exceptionDetails"].is_null(),
            "evaluating {expression} threw: {}",
            result["exceptionDetails"]
        );
        result["result"]["value"].clone()
    }

    /// `[branch, orders text, sales text]` for each branch row of `#branches`.
    fn branch_rows(&self) -> Vec<(String, String, String)> {
        let value = self.eval(
            "JSON.stringify([...document.querySelectorAll('#branches tbody tr[data-branch]')]\
             .map(r => [r.dataset.branch, r.querySelector('.orders').textContent, \
             r.querySelector('.sales').textContent]))",
        );
        let text = value.as_str().expect("the rows as a JSON string");
        serde_json::from_str(text).unwrap_or_else(|e| panic!("rows are not JSON ({e}): {text}"))
    }

    /// What the page shows, for failure messages.
    fn describe(&self) -> String {
        let value = self.eval(
            "JSON.stringify({url: location.href, updated: document.getElementById('updated')\
             ?.textContent, error: document.getElementById('error')?.textContent, \
             branches: document.querySelector('#branches tbody')?.innerText})",
        );
        value.as_str().unwrap_or_default().to_owned()
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Decodes standard base64 (padding optional, no whitespace expected).
fn base64_decode(s: &str) -> Vec<u8> {
    let sextet = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {:?}", c as char),
        }
    };
    let data = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    for chunk in data.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= sextet(c) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

/// The minor units a sales cell shows: it must have exactly two fraction digits after a
/// decimal separator; the digits (grouping separators aside) are then the amount in minor
/// units, whatever the locale's separators.
fn shown_minor_units(cell: &str) -> Option<i64> {
    let cell = cell.trim();
    let chars: Vec<char> = cell.chars().collect();
    let n = chars.len();
    let two_decimals = n >= 4
        && chars[n - 1].is_ascii_digit()
        && chars[n - 2].is_ascii_digit()
        && !chars[n - 3].is_ascii_digit()
        && chars[n - 4].is_ascii_digit();
    if !two_decimals {
        return None;
    }
    let digits: String = chars.iter().filter(|c| c.is_ascii_digit()).collect();
    let grouping_ok = chars[..n - 3]
        .iter()
        .all(|c| c.is_ascii_digit() || [',', '.', '\'', ' ', '\u{a0}', '\u{202f}'].contains(c));
    if grouping_ok {
        digits.parse().ok()
    } else {
        None
    }
}

/// What en-US `toLocaleString` with two fraction digits shows for `minor` units.
fn en_us_money(minor: i64) -> String {
    let units = (minor / 100).to_string();
    let mut grouped = String::new();
    for (i, c) in units.chars().enumerate() {
        if i > 0 && (units.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{grouped}.{:02}", minor % 100)
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

/// Creates order `o1` with one payment of `amount` at `edge`.
fn order_with_payment(http: &Http, edge: &EdgeProcess, amount: i64) {
    let order = http
        .insert(edge, "order_header", json!({"id": "o1", "status": "open"}))
        .expect(201);
    assert_eq!(order["id"], "o1", "{order}");
    let payment = json!({"id": "p1", "order_id": "o1", "method": "card", "amount": amount});
    http.insert(edge, "order_payment", payment).expect(201);
}

/// Polls the page until its branch rows are exactly `expected` (`(branch, orders, sales in
/// minor units)`), then checks the sales cells' exact text.
fn wait_for_rows(page: &Page<'_>, browser: &Browser, what: &str, expected: &[(&str, u64, i64)]) {
    let mut shown = Vec::new();
    wait_until(
        what,
        || {
            shown = page.branch_rows();
            let parsed: Vec<_> = shown
                .iter()
                .map(|(b, o, s)| (b.as_str(), o.trim().parse().ok(), shown_minor_units(s)))
                .collect();
            let want: Vec<_> = expected
                .iter()
                .map(|&(b, o, s)| (b, Some(o), Some(s)))
                .collect();
            parsed == want
        },
        || {
            format!(
                "the page shows {}\nbrowser stderr:\n{}",
                page.describe(),
                browser.stderr_text()
            )
        },
    );
    // The browser runs in en-US: the exact text, grouping included.
    for ((branch, _, sales), &(_, _, minor)) in shown.iter().zip(expected) {
        assert_eq!(sales, &en_us_money(minor), "{branch}'s sales cell");
    }
}

#[test]
fn dashboard_shows_branches_and_refreshes_live() {
    let Some(chromium) = find_chromium() else {
        assert!(
            std::env::var_os("OUTPOST_REQUIRE_BROWSER").is_none(),
            "OUTPOST_REQUIRE_BROWSER is set but no Chromium was found (looked for chromium, \
             chromium-browser, google-chrome, chrome on PATH; set OUTPOST_CHROMIUM to its path)"
        );
        eprintln!(
            "dashboard test skipped: chromium not found (set OUTPOST_REQUIRE_BROWSER to fail instead)"
        );
        return;
    };
    let http = Http::new();

    // 1. A hub and two branches, each with an order and a payment, fully synced.
    let hub = HubProcess::start();
    let b1 = EdgeProcess::start_synced("B001", &hub, &[]);
    let b2 = EdgeProcess::start_synced("B002", &hub, &[]);
    let (sales1, sales2) = (1250, 3475);
    order_with_payment(&http, &b1, sales1);
    order_with_payment(&http, &b2, sales2);
    wait_synced(&http, &hub, &[&b1, &b2]);

    // 2. The dashboard, with the admin token in the fragment, shows both branches.
    let browser = Browser::launch(&chromium);
    let url = format!("{}#token={}", hub.url("/"), hub.admin_token());
    let ws_url = browser.open_tab(&http, &url);
    let page = Page::connect(&http, &ws_url);
    page.call("Runtime.enable", json!({}));
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": 720, "deviceScaleFactor": 1, "mobile": false}),
    );
    wait_for_rows(
        &page,
        &browser,
        "the dashboard to show both branches' orders and sales",
        &[("B001", 1, sales1), ("B002", 1, sales2)],
    );
    // The page moved the token out of the address bar.
    let href = page.eval("location.href");
    assert_eq!(href, json!(hub.url("/")), "the token stays in the address");
    assert_eq!(
        page.eval("document.getElementById('error').textContent"),
        ""
    );

    // 3. A new payment at B001 appears without a reload (the page's own refresh).
    page.eval("window.__outpostNoReload = true");
    let extra = 123_456;
    let payment = json!({"id": "p2", "order_id": "o1", "method": "cash", "amount": extra});
    http.insert(&b1, "order_payment", payment).expect(201);
    wait_synced(&http, &hub, &[&b1]);
    wait_for_rows(
        &page,
        &browser,
        "the dashboard to show B001's new sales total",
        &[("B001", 1, sales1 + extra), ("B002", 1, sales2)],
    );
    assert_eq!(
        page.eval("window.__outpostNoReload === true"),
        true,
        "the page was reloaded"
    );
    let totals = page.eval(
        "JSON.stringify([...document.querySelectorAll('#branches tbody tr.totals td')]\
         .map(td => td.textContent))",
    );
    let totals: Vec<String> = serde_json::from_str(totals.as_str().expect("a string")).unwrap();
    assert_eq!(
        totals.first().map(String::as_str),
        Some("all"),
        "{totals:?}"
    );
    assert_eq!(
        totals[totals.len() - 2..],
        ["2".to_owned(), en_us_money(sales1 + extra + sales2)],
        "the totals row: {totals:?}"
    );

    // 4. A screenshot for the README.
    let shot = page.call("Page.captureScreenshot", json!({"format": "png"}));
    let png = base64_decode(shot["data"].as_str().expect("base64 PNG data"));
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "the screenshot is not a PNG"
    );
    assert!(
        png.len() > 10 * 1024,
        "the screenshot is only {} bytes",
        png.len()
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    // The artifact always goes to target/; the README's copy in docs/ is refreshed only when
    // asked (`OUTPOST_UPDATE_SCREENSHOT=1`), so a test run leaves the checkout unchanged.
    let mut dirs = vec![root.join("target")];
    if std::env::var_os("OUTPOST_UPDATE_SCREENSHOT").is_some() {
        dirs.push(root.join("docs"));
    }
    for dir in dirs {
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let path = dir.join("dashboard.png");
        std::fs::write(&path, &png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    // The guard kills the browser and its renderers.
    drop(page);
    drop(browser);
}
