//! End-to-end test support: real Outpost processes, started and killed by the tests.
//!
//! [`EdgeProcess`] runs the `outpost-edge` binary that cargo built next to the test executable
//! (`target/<profile>/outpost-edge`; `cargo test --workspace` builds it because the `edge`
//! package has integration tests). Set `OUTPOST_EDGE_BIN` to use another binary.
//! [`HubProcess`] does the same for `outpost-hub` (`OUTPOST_HUB_BIN`).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
}

impl HubProcess {
    pub fn start() -> HubProcess {
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
