//! End-to-end test support: real Outpost processes, started and killed by the tests.
//!
//! [`EdgeProcess`] runs the `outpost-edge` binary that cargo built next to the test executable
//! (`target/<profile>/outpost-edge`; `cargo test --workspace` builds it because the `edge`
//! package has integration tests). Set `OUTPOST_EDGE_BIN` to use another binary.
//! [`HubProcess`] does the same for `outpost-hub` (`OUTPOST_HUB_BIN`).
//!
//! [`Http`] is the blocking HTTP client the synchronous tests talk to both with, and
//! [`uint`], [`int`], [`text`] and [`tail`] read what they answer.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Client, Method};
use serde_json::{Value as Json, json};

/// How long a start-up may take before the harness gives up (a safety net, not a timing
/// assertion: a healthy edge is up in milliseconds).
const START_DEADLINE: Duration = Duration::from_secs(60);
/// Pause between two looks at the data dir while waiting for `ports.json`.
const POLL_PAUSE: Duration = Duration::from_millis(5);

/// The default branch of the harness's edges.
pub const BRANCH: &str = "B001";
/// The edge's built-in module.
pub const MODULE: &str = "pos";

/// The path of a binary built by cargo for this workspace, next to the running test
/// executable (`target/<profile>/deps/test-xxxx` -> `target/<profile>/NAME`).
pub fn workspace_binary(name: &str, env_override: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_override) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{env_override}={} does not name a file",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("the test executable's directory");
    let profile_dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("target/<profile>")
    } else {
        deps
    };
    let path = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "the {name} binary is not at {} - build it first (`cargo build -p edge --bin {name}`, \
         or run `cargo test --workspace`, which builds it), or set {env_override} to its path",
        path.display()
    );
    path
}

/// The `outpost-edge` binary under test.
pub fn edge_binary() -> PathBuf {
    workspace_binary("outpost-edge", "OUTPOST_EDGE_BIN")
}

/// The `outpost-hub` binary under test.
pub fn hub_binary() -> PathBuf {
    workspace_binary("outpost-hub", "OUTPOST_HUB_BIN")
}

/// Polls `cond` until it holds, failing with `what` (and `context()`) after
/// [`SYNC_DEADLINE`]. This waits for a state the test then checks exactly; it is a safety
/// net, not a timing assertion.
#[track_caller]
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + SYNC_DEADLINE;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what} after {SYNC_DEADLINE:?}; {}",
            context()
        );
        std::thread::sleep(POLL_PAUSE * 4);
    }
}

/// How long sync may take to reach a state before a test gives up.
pub const SYNC_DEADLINE: Duration = Duration::from_secs(90);

/// Reads `ports.json` in `data_dir` once `child` has written it.
fn wait_for_ports(
    data_dir: &Path,
    child: &mut Option<Child>,
    name: &str,
    log: impl Fn() -> String,
) -> serde_json::Value {
    let path = data_dir.join("ports.json");
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            return serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("ports.json is not JSON ({e}): {text:?}"));
        }
        let c = child.as_mut().expect("a running child");
        if let Some(status) = c.try_wait().expect("the child's status") {
            *child = None;
            panic!(
                "{name} exited with {status} before writing ports.json; its log:\n{}",
                log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{name} wrote no ports.json within {START_DEADLINE:?}; its log:\n{}",
            log()
        );
        std::thread::sleep(POLL_PAUSE);
    }
}

fn remove_if_present(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot remove {}: {e}", path.display()),
    }
}

fn read_log(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// A real `outpost-hub serve` process on a temporary data dir. Its first start binds free
/// loopback ports; restarts bind the same ones, so edges find it again. Dropping it kills the
/// process (SIGKILL) and removes the data dir.
pub struct HubProcess {
    root: tempfile::TempDir,
    data_dir: PathBuf,
    log_path: PathBuf,
    binary: PathBuf,
    child: Option<Child>,
    http: SocketAddr,
    quic: SocketAddr,
    admin_token: String,
    /// Extra environment variables for the process (test hooks).
    env: Vec<(String, String)>,
}

impl HubProcess {
    pub fn start() -> HubProcess {
        HubProcess::start_with_env(&[])
    }

    /// Starts a hub with extra environment variables (test hooks).
    pub fn start_with_env(env: &[(&str, &str)]) -> HubProcess {
        let root = tempfile::Builder::new()
            .prefix("outpost-hub-test-")
            .tempdir()
            .expect("a temporary directory");
        let mut hub = HubProcess {
            data_dir: root.path().join("data"),
            log_path: root.path().join("hub.log"),
            binary: hub_binary(),
            child: None,
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            quic: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_token: String::new(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            root,
        };
        hub.spawn();
        hub
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the hub is already running");
        remove_if_present(&self.data_dir.join("ports.json"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("the hub's log file");
        let child = Command::new(&self.binary)
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--http",
                &self.http.to_string(),
                "--quic",
                &self.quic.to_string(),
            ])
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.child = Some(child);
        let log_path = self.log_path.clone();
        let ports = wait_for_ports(&self.data_dir, &mut self.child, "outpost-hub", || {
            read_log(&log_path)
        });
        let addr = |k: &str| -> SocketAddr {
            ports[k]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("ports.json has no {k:?}: {ports}"))
        };
        self.http = addr("http");
        self.quic = addr("quic");
        self.admin_token = std::fs::read_to_string(self.data_dir.join("admin.token"))
            .unwrap_or_else(|e| panic!("cannot read the hub's admin token: {e}"))
            .trim()
            .to_owned();
    }

    /// Issues `branch`'s identity into `out` with `outpost-hub enroll`.
    pub fn enroll(&self, branch: &str, out: &Path) {
        self.admin_command(&["enroll", "--branch", branch, "--out"], Some(out))
            .expect("enroll succeeds");
    }

    /// `outpost-hub revoke --branch ID`; the error is its stderr.
    pub fn revoke(&self, branch: &str) -> Result<(), String> {
        self.admin_command(&["revoke", "--branch", branch], None)
    }

    fn admin_command(&self, args: &[&str], path: Option<&Path>) -> Result<(), String> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg(args[0])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&args[1..]);
        if let Some(p) = path {
            cmd.arg(p);
        }
        let out = cmd
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run outpost-hub {}: {e}", args[0]));
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the hub again on the same data dir and ports (killing it first if it runs).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn quic_addr(&self) -> SocketAddr {
        self.quic
    }

    /// The head-office API's address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A real `outpost-edge serve` process on a temporary data dir, listening on a free loopback
/// port, standalone or syncing with a hub. Dropping it kills the process (SIGKILL) and
/// removes the data dir.
pub struct EdgeProcess {
    root: tempfile::TempDir,
    data_dir: PathBuf,
    log_path: PathBuf,
    binary: PathBuf,
    branch: String,
    child: Option<Child>,
    http: SocketAddr,
    admin_token: String,
    starts: u32,
    /// The hub's QUIC address and the identity dir, when syncing.
    hub: Option<(SocketAddr, PathBuf)>,
    env: Vec<(String, String)>,
}

impl EdgeProcess {
    /// Starts an edge for branch [`BRANCH`] on a fresh data dir.
    pub fn start() -> EdgeProcess {
        EdgeProcess::start_branch(BRANCH)
    }

    /// Starts an edge for `branch` syncing with `hub` (enrolled into the edge's temporary
    /// dir first), with extra environment variables (test hooks).
    pub fn start_synced(branch: &str, hub: &HubProcess, env: &[(&str, &str)]) -> EdgeProcess {
        let mut edge = EdgeProcess::prepare(branch);
        let identity = edge.root.path().join("identity");
        hub.enroll(branch, &identity);
        edge.hub = Some((hub.quic_addr(), identity));
        edge.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        edge.spawn();
        edge
    }

    /// Starts an edge for `branch` syncing with the hub at `hub_quic` using the identity in
    /// `identity` as it is (not enrolled here: e.g. one another hub issued), with extra
    /// environment variables (test hooks).
    pub fn start_with_identity(
        branch: &str,
        hub_quic: SocketAddr,
        identity: &Path,
        env: &[(&str, &str)],
    ) -> EdgeProcess {
        let mut edge = EdgeProcess::prepare(branch);
        edge.hub = Some((hub_quic, identity.to_owned()));
        edge.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        edge.spawn();
        edge
    }

    /// Starts a standalone edge for branch [`BRANCH`] with extra environment variables (test
    /// hooks).
    pub fn start_with_env(env: &[(&str, &str)]) -> EdgeProcess {
        let mut edge = EdgeProcess::prepare(BRANCH);
        edge.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        edge.spawn();
        edge
    }

    /// Starts an edge for `branch` on a fresh data dir.
    pub fn start_branch(branch: &str) -> EdgeProcess {
        let mut edge = EdgeProcess::prepare(branch);
        edge.spawn();
        edge
    }

    fn prepare(branch: &str) -> EdgeProcess {
        let root = tempfile::Builder::new()
            .prefix("outpost-edge-test-")
            .tempdir()
            .expect("a temporary directory");
        let data_dir = root.path().join("data");
        let log_path = root.path().join("edge.log");
        EdgeProcess {
            data_dir,
            log_path,
            binary: edge_binary(),
            branch: branch.to_owned(),
            child: None,
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_token: String::new(),
            starts: 0,
            hub: None,
            env: Vec::new(),
            root,
        }
    }

    /// Starts the process on the data dir and waits until it has bound its port.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the edge is already running");
        // A previous run's ports.json names a dead port: wait for the new one.
        remove_if_present(&self.ports_path());
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("the edge's log file");
        self.starts += 1;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--branch", &self.branch, "--http", "127.0.0.1:0"]);
        if let Some((addr, identity)) = &self.hub {
            cmd.args(["--hub", &addr.to_string()])
                .arg("--identity")
                .arg(identity);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.child = Some(child);
        self.http = self.wait_for_ports();
        self.admin_token = std::fs::read_to_string(self.data_dir.join("admin.token"))
            .unwrap_or_else(|e| panic!("cannot read the admin token: {e}"))
            .trim()
            .to_owned();
        assert!(!self.admin_token.is_empty(), "admin.token is empty");
    }

    fn ports_path(&self) -> PathBuf {
        self.data_dir.join("ports.json")
    }

    fn wait_for_ports(&mut self) -> SocketAddr {
        let log_path = self.log_path.clone();
        let ports = wait_for_ports(&self.data_dir, &mut self.child, "outpost-edge", || {
            read_log(&log_path)
        });
        let http = ports["http"]
            .as_str()
            .unwrap_or_else(|| panic!("ports.json has no \"http\": {ports}"));
        http.parse()
            .unwrap_or_else(|e| panic!("ports.json http {http:?}: {e}"))
    }

    /// The edge's stderr so far (all runs on this data dir).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The temporary directory holding the data dir and the log.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn branch(&self) -> &str {
        &self.branch
    }

    /// The bound HTTP address of the current run.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    /// The module base `B` of the contract: `.../api/branches/{branch}/modules/pos`.
    pub fn module_url(&self) -> String {
        self.url(&format!("/api/branches/{}/modules/{MODULE}", self.branch))
    }

    /// `B/tables/{table}`.
    pub fn table_url(&self, table: &str) -> String {
        format!("{}/tables/{table}", self.module_url())
    }

    /// `B/tables/{table}/{id}`.
    pub fn row_url(&self, table: &str, id: &str) -> String {
        format!("{}/tables/{table}/{id}", self.module_url())
    }

    /// The admin token from `DIR/admin.token`.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// A new bearer token for `role`, from `outpost-edge token --data-dir DIR --role ROLE`.
    pub fn mint_token(&self, role: &str) -> String {
        let out = Command::new(&self.binary)
            .arg("token")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--role", role])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run outpost-edge token: {e}"));
        assert!(
            out.status.success(),
            "outpost-edge token --role {role} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout)
            .expect("the token is UTF-8")
            .trim()
            .to_owned();
        assert!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "outpost-edge token printed {token:?}"
        );
        token
    }

    /// The process id of the current run.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("the child's status").is_none(),
            None => false,
        }
    }

    /// Kills the process with SIGKILL (no clean shutdown) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL on Unix.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the edge again on the same data dir (after [`EdgeProcess::kill9`], or killing
    /// it first if it still runs). The port changes; the tokens stay valid.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// How many times a process was started on this data dir.
    pub fn starts(&self) -> u32 {
        self.starts
    }
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An HTTP response as the tests read it: its status, its JSON body (`null` when the body is
/// empty or not JSON) and its text.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: reqwest::StatusCode,
    pub body: serde_json::Value,
    pub text: String,
}

impl Reply {
    /// Reads a response: its status, and its body as JSON and as text.
    pub async fn read(resp: reqwest::Response) -> Result<Reply, reqwest::Error> {
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Json::Null);
        Ok(Reply { status, body, text })
    }

    /// The body, after checking the status.
    #[track_caller]
    pub fn expect(&self, status: u16) -> serde_json::Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "expected {status}, got {}: {}",
            self.status,
            self.text
        );
        self.body.clone()
    }

    /// The error code of a JSON error body, or "".
    pub fn code(&self) -> &str {
        self.body["error"].as_str().unwrap_or("")
    }
}

/// A value of a JSON reply that must be a non-negative integer.
#[track_caller]
pub fn uint(v: &Json) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("not a non-negative integer: {v}"))
}

/// A value of a JSON reply that must be an integer.
#[track_caller]
pub fn int(v: &Json) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

/// A value of a JSON reply that must be a string.
#[track_caller]
pub fn text(v: &Json) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// The last `n` lines of a log.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// HTTP, blocking on a runtime of the test's own (so `wait_until` conditions can make requests)
// ---------------------------------------------------------------------------------------------

/// A safety net against a hung server turning into a hung test; not a timing assertion.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The same for an upload of a whole edge binary ([`Body::Bytes`]; ~160 MB in a debug build).
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// A request body.
#[derive(Debug, Clone)]
pub enum Body {
    /// No body.
    Empty,
    /// A JSON document, sent as `application/json`.
    Json(Json),
    /// These bytes as they are, labelled `application/json`: a body that is not JSON.
    Raw(Vec<u8>),
    /// Raw bytes (a release artifact), labelled `application/octet-stream`; the request may
    /// take [`UPLOAD_TIMEOUT`] instead of [`REQUEST_TIMEOUT`].
    Bytes(Vec<u8>),
}

impl Body {
    /// `req` with this body (and its content type).
    pub fn attach(self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Body::Empty => req,
            Body::Json(v) => req.json(&v),
            Body::Raw(bytes) => req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bytes),
            Body::Bytes(bytes) => req
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .timeout(UPLOAD_TIMEOUT)
                .body(bytes),
        }
    }
}

/// Where a test reaches an edge's terminal API (CONTRACT.md section 2), for the edge helpers
/// of [`Http`].
///
/// An [`EdgeProcess`] is reached at the port the harness read when it last started it
/// ([`EdgeProcess::url`]). A test whose edge moves to another port on its own (the keeper
/// starting a new worker after an update) implements this over the data dir's `ports.json`.
pub trait EdgeApi {
    /// The edge process: its branch and admin token.
    fn process(&self) -> &EdgeProcess;

    /// `http://ADDR{path}` at the edge.
    fn api_url(&self, path: &str) -> String;

    /// The module base `B` of the contract: `.../api/branches/{branch}/modules/pos`.
    fn api_module_url(&self) -> String {
        let branch = self.process().branch();
        self.api_url(&format!("/api/branches/{branch}/modules/{MODULE}"))
    }
}

impl EdgeApi for EdgeProcess {
    fn process(&self) -> &EdgeProcess {
        self
    }

    fn api_url(&self, path: &str) -> String {
        self.url(path)
    }
}

impl<T: EdgeApi + ?Sized> EdgeApi for &T {
    fn process(&self) -> &EdgeProcess {
        (**self).process()
    }

    fn api_url(&self, path: &str) -> String {
        (**self).api_url(path)
    }

    fn api_module_url(&self) -> String {
        (**self).api_module_url()
    }
}

/// An HTTP client whose calls block on a current-thread tokio runtime the test owns, so that
/// plain `#[test]` functions, and the conditions of [`wait_until`], can make requests. The
/// same runtime drives whatever else the test runs with [`Http::block_on`] (WebSockets, QUIC
/// connections), also while it waits for a response.
///
/// Every request has a [`REQUEST_TIMEOUT`] ([`UPLOAD_TIMEOUT`] for [`Body::Bytes`]).
/// [`Http::send`] fails the test when a request gets no response; [`Http::try_send`] returns
/// the error instead. The body of a response is read as JSON into [`Reply::body`] (`null` when
/// it is not JSON) and as text into [`Reply::text`].
///
/// The edge helpers take any [`EdgeApi`] and send the edge's admin token; the hub helpers
/// send the hub's admin token.
pub struct Http {
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl Default for Http {
    fn default() -> Http {
        Http::new()
    }
}

impl Http {
    /// A client on a new current-thread runtime.
    pub fn new() -> Http {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let client = {
            let _guard = rt.enter();
            Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .build()
                .expect("an HTTP client")
        };
        Http { rt, client }
    }

    /// Runs `future` to completion on the client's runtime.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.rt.block_on(future)
    }

    /// Sends a request, with `token` as a bearer token when there is one; the error when no
    /// response arrives (refused, reset, timed out).
    pub fn try_send(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        body: Body,
    ) -> Result<Reply, reqwest::Error> {
        self.rt.block_on(async {
            let mut req = self.client.request(method, url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            Reply::read(body.attach(req).send().await?).await
        })
    }

    /// [`Http::try_send`], failing the test when no response arrives.
    #[track_caller]
    pub fn send(&self, method: Method, url: &str, token: Option<&str>, body: Body) -> Reply {
        let what = format!("{method} {url}");
        self.try_send(method, url, token, body)
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    /// A GET's status and body as text, or why it failed (for the context of a failed wait).
    pub fn describe(&self, url: &str, token: Option<&str>) -> String {
        match self.try_send(Method::GET, url, token, Body::Empty) {
            Ok(r) => format!("{} {}", r.status, r.text.trim()),
            Err(e) => format!("unreachable ({e})"),
        }
    }

    /// A counter or gauge from a Prometheus text page (the status must be 200).
    #[track_caller]
    pub fn metric_at(&self, url: &str, name: &str) -> u64 {
        let reply = self.send(Method::GET, url, None, Body::Empty);
        assert_eq!(reply.status, 200, "GET {url}: {}", reply.text);
        reply
            .text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{}", reply.text))
    }

    // --- an edge (terminal API, CONTRACT 2) ---

    /// The edge's `/healthz` body (the status must be 200).
    #[track_caller]
    pub fn healthz(&self, edge: &impl EdgeApi) -> Json {
        self.send(Method::GET, &edge.api_url("/healthz"), None, Body::Empty)
            .expect(200)
    }

    /// A counter or gauge from the edge's `/metrics`.
    #[track_caller]
    pub fn edge_metric(&self, edge: &impl EdgeApi, name: &str) -> u64 {
        self.metric_at(&edge.api_url("/metrics"), name)
    }

    /// `POST B/tables/{table}` with `row`.
    #[track_caller]
    pub fn insert(&self, edge: &impl EdgeApi, table: &str, row: Json) -> Reply {
        let url = format!("{}/tables/{table}", edge.api_module_url());
        let token = Some(edge.process().admin_token());
        self.send(Method::POST, &url, token, Body::Json(row))
    }

    /// `POST B/batch` with `ops` (all or nothing).
    #[track_caller]
    pub fn batch(&self, edge: &impl EdgeApi, ops: Json) -> Reply {
        let url = format!("{}/batch", edge.api_module_url());
        let body = Body::Json(json!({ "ops": ops }));
        self.send(Method::POST, &url, Some(edge.process().admin_token()), body)
    }

    /// `GET B/tables/{table}/{id}`.
    #[track_caller]
    pub fn get_row(&self, edge: &impl EdgeApi, table: &str, id: &str) -> Reply {
        let url = format!("{}/tables/{table}/{id}", edge.api_module_url());
        let token = Some(edge.process().admin_token());
        self.send(Method::GET, &url, token, Body::Empty)
    }

    /// Every row of `table` at the edge, keyed by id (each id once).
    #[track_caller]
    pub fn edge_rows(&self, edge: &impl EdgeApi, table: &str) -> BTreeMap<String, Json> {
        let url = format!("{}/query", edge.api_module_url());
        let token = edge.process().admin_token();
        let mut out = BTreeMap::new();
        loop {
            let q = json!({
                "table": table,
                "orderBy": [{"field": "id", "direction": "asc"}],
                "limit": 1000,
                "offset": out.len(),
            });
            let body = self
                .send(Method::POST, &url, Some(token), Body::Json(q))
                .expect(200);
            for row in body["rows"].as_array().expect("rows") {
                let id = text(&row["id"]).to_owned();
                assert!(
                    out.insert(id.clone(), row.clone()).is_none(),
                    "{table} {id} twice at the edge"
                );
            }
            if body["meta"]["has_more"] != json!(true) {
                return out;
            }
        }
    }

    // --- the hub (head office, CONTRACT 3) ---

    /// A counter or gauge from the hub's `/metrics`.
    #[track_caller]
    pub fn hub_metric(&self, hub: &HubProcess, name: &str) -> u64 {
        self.metric_at(&hub.url("/metrics"), name)
    }

    /// The hub's `/api/branches` (the status must be 200, the body a list).
    #[track_caller]
    pub fn branches(&self, hub: &HubProcess) -> Vec<Json> {
        let body = self
            .send(
                Method::GET,
                &hub.url("/api/branches"),
                Some(hub.admin_token()),
                Body::Empty,
            )
            .expect(200);
        body.as_array()
            .unwrap_or_else(|| panic!("/api/branches is not a list: {body}"))
            .clone()
    }

    /// The hub's entry for `branch` in `/api/branches` (`null` when it has none).
    #[track_caller]
    pub fn branch_info(&self, hub: &HubProcess, branch: &str) -> Json {
        self.branches(hub)
            .into_iter()
            .find(|b| b["branch"] == branch)
            .unwrap_or(Json::Null)
    }

    /// `POST /api/query` at the hub.
    #[track_caller]
    pub fn hub_query(&self, hub: &HubProcess, q: Json) -> Reply {
        let url = hub.url("/api/query");
        self.send(Method::POST, &url, Some(hub.admin_token()), Body::Json(q))
    }

    /// Every row of a plain query at the hub, paging with `offset`, keyed by (branch, id):
    /// a key twice fails the test.
    #[track_caller]
    pub fn hub_rows(&self, hub: &HubProcess, q: Json) -> BTreeMap<(String, String), Json> {
        self.hub_rows_checking(hub, q, |_, _| {})
    }

    /// [`Http::hub_rows`], calling `check` with each page's query and response body (once
    /// the body is known to hold a list of rows) before it takes the page's rows.
    #[track_caller]
    pub fn hub_rows_checking(
        &self,
        hub: &HubProcess,
        q: Json,
        mut check: impl FnMut(&Json, &Json),
    ) -> BTreeMap<(String, String), Json> {
        let mut out = BTreeMap::new();
        loop {
            let mut page = q.clone();
            page["orderBy"] = json!([{"field": "id", "direction": "asc"}]);
            page["limit"] = json!(1000);
            page["offset"] = json!(out.len());
            let body = self.hub_query(hub, page.clone()).expect(200);
            let rows = body["rows"].as_array().expect("rows");
            check(&page, &body);
            for row in rows {
                let key = (text(&row["branch"]).to_owned(), text(&row["id"]).to_owned());
                assert!(
                    out.insert(key.clone(), row.clone()).is_none(),
                    "{key:?} twice at the hub: {row}"
                );
            }
            if body["meta"]["has_more"] != json!(true) {
                return out;
            }
        }
    }
}

/// Opens an order at `edge` with one line of `quantity` × `unit_price` (one batch; the status
/// must be 200).
#[track_caller]
pub fn open_order(http: &Http, edge: &impl EdgeApi, id: &str, quantity: i64, unit_price: i64) {
    http.batch(
        edge,
        json!([
            {"op": "insert", "table": "order_header", "row": {"id": id, "table_id": "T1"}},
            {"op": "insert", "table": "order_line", "row": {"id": format!("{id}-l1"), "order_id": id,
                "item_id": "burger", "name": "burger", "quantity": quantity, "unit_price": unit_price,
                "station_id": "grill"}},
        ]),
    )
    .expect(200);
}

/// The hub's count and sum of `branch`'s payments (a grouped query) are those of `at_edge`,
/// the edge's payments.
#[track_caller]
pub fn assert_hub_payment_totals(
    http: &Http,
    hub: &HubProcess,
    branch: &str,
    at_edge: &BTreeMap<String, Json>,
) {
    let sum: i64 = at_edge.values().map(|r| int(&r["amount"])).sum();
    let grouped = http
        .hub_query(
            hub,
            json!({"table": "order_payment", "branch": branch, "groupBy": ["branch"],
                "aggregates": [{"fn": "count", "as": "n"}, {"fn": "sum", "field": "amount", "as": "total"}]}),
        )
        .expect(200);
    assert_eq!(
        grouped["rows"],
        json!([{"branch": branch, "n": at_edge.len(), "total": sum}]),
        "{grouped}"
    );
}

/// What a failed sync wait shows: the edge's `/healthz`, the hub's `/api/branches` and the
/// ends of both logs.
pub fn sync_context(http: &Http, hub: &HubProcess, edge: &EdgeProcess) -> String {
    format!(
        "edge {} healthz: {}\nhub branches: {}\nedge log:\n{}\nhub log:\n{}",
        edge.branch(),
        http.describe(&edge.url("/healthz"), None),
        http.describe(&hub.url("/api/branches"), Some(hub.admin_token())),
        tail(&edge.log(), 20),
        tail(&hub.log(), 20),
    )
}
