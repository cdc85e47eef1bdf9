//! The hub's side of edge auto-update, in process over real HTTP and real QUIC: publishing
//! (validation, the one-version-once rule, signing), rollout rings and promotion, offers on a
//! live session, downloads (whole, resumed, refused) and update reports, and the metrics.
//! The edges here are hand-driven QUIC clients speaking the sync frames.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hub::identity::HubIdentity;
use hub::releases::{RELEASES_DIR, ReleaseFiles};
use hub::store::{HubStore, SqliteHubStore};
use hub::sync::SyncServer;
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value as Json, json};
use shared::BranchId;
use shared::release::{UpdateOutcome, UpdateReport, signed_message, this_target};
use shared::wire::{ALPN, Frame, FrameReader, HUB_SERVER_NAME, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Guards against a hang; every step takes milliseconds.
const GUARD: Duration = Duration::from_secs(10);
/// How long to listen to be sure a frame does not come.
const QUIET: Duration = Duration::from_millis(400);
const TOKEN: &str = "test-admin-token";

struct TestHub {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    identity: Arc<HubIdentity>,
    store: Arc<dyn HubStore>,
    http: SocketAddr,
    quic: SocketAddr,
}

impl TestHub {
    async fn start() -> TestHub {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("hub");
        let identity = Arc::new(HubIdentity::init_or_load(&data).unwrap());
        let store: Arc<dyn HubStore> = Arc::new(
            SqliteHubStore::open(&data.join("hub.db"), Arc::new(shared::pos::schema())).unwrap(),
        );
        let files = ReleaseFiles::open(&data, identity.clone()).unwrap();
        let sync = SyncServer::with_releases(store.clone(), Arc::new(files));
        let endpoint = SyncServer::bind(&identity, (Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        let quic = endpoint.local_addr().unwrap();
        tokio::spawn(sync.clone().serve(endpoint));
        let app = hub::api::router(hub::api::Hub {
            store: store.clone(),
            sync,
            admin_token_hash: *blake3::hash(TOKEN.as_bytes()).as_bytes(),
            connections: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let http = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        TestHub {
            _dir: dir,
            data,
            identity,
            store,
            http,
            quic,
        }
    }

    /// Enrolls `branch` and returns a QUIC client endpoint that connects as it.
    fn enroll(&self, branch: &str) -> quinn::Endpoint {
        let id = BranchId::parse(branch).unwrap();
        let now = SystemTime::now();
        let issued = self
            .identity
            .issue_client_certificate(
                &id,
                now - Duration::from_secs(60),
                now + Duration::from_secs(86_400),
            )
            .unwrap();
        self.store.enroll(&id, issued.fingerprint).unwrap();
        let certs = vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.identity.ca_cert_der().clone()).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        let mut endpoint = quinn::Endpoint::client((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        endpoint.set_default_client_config(config);
        endpoint
    }

    /// One HTTP/1.1 request; the status and the body.
    async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: &[u8],
    ) -> (u16, Vec<u8>) {
        let mut stream = tokio::net::TcpStream::connect(self.http).await.unwrap();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: hub\r\n{auth}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        read_response(stream).await
    }

    async fn json(&self, method: &str, path: &str, body: Option<Json>) -> (u16, Json) {
        let body = body.map_or(Vec::new(), |b| b.to_string().into_bytes());
        let (status, bytes) = self
            .request(method, path, Some(TOKEN), "application/json", &body)
            .await;
        let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            panic!(
                "{method} {path}: {status} {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, json)
    }

    async fn publish(&self, query: &str, artifact: &[u8]) -> (u16, Json) {
        let (status, bytes) = self
            .request(
                "POST",
                &format!("/api/releases?{query}"),
                Some(TOKEN),
                "application/octet-stream",
                artifact,
            )
            .await;
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    async fn metric(&self, name: &str) -> u64 {
        let (status, body) = self
            .request("GET", "/metrics", None, "text/plain", b"")
            .await;
        assert_eq!(status, 200);
        let text = String::from_utf8(body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in /metrics"))
            .parse()
            .unwrap()
    }

    /// The files under the releases directory, as `<target>/<name>` (or `<name>` at its top).
    fn artifact_files(&self) -> Vec<String> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(self.data.join(RELEASES_DIR)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            if e.file_type().unwrap().is_dir() {
                for f in std::fs::read_dir(e.path()).unwrap() {
                    names.push(format!(
                        "{name}/{}",
                        f.unwrap().file_name().into_string().unwrap()
                    ));
                }
            } else {
                names.push(name);
            }
        }
        names.sort();
        names
    }

    /// Where the hub keeps release `version`'s artifact for this platform.
    fn artifact_path(&self, version: &str) -> std::path::PathBuf {
        self.data
            .join(RELEASES_DIR)
            .join(this_target())
            .join(format!("{version}.artifact"))
    }
}

async fn read_response(mut stream: tokio::net::TcpStream) -> (u16, Vec<u8>) {
    let mut raw = Vec::new();
    tokio::time::timeout(GUARD, stream.read_to_end(&mut raw))
        .await
        .expect("an answer in time")
        .unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let len =
                usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16).unwrap();
            if len == 0 {
                break;
            }
            out.extend_from_slice(&rest[line_end + 2..line_end + 2 + len]);
            rest = &rest[line_end + 4 + len..];
        }
        body = out;
    }
    (status, body)
}

/// A hand-driven edge session: the control stream and its frames.
struct Edge {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    reader: FrameReader,
}

impl Edge {
    /// Connects, says hello as `software` on this platform, and reads the welcome.
    async fn connect(endpoint: &quinn::Endpoint, hub: SocketAddr, software: &str) -> Edge {
        Edge::connect_as(endpoint, hub, software, PROTOCOL_VERSION).await
    }

    /// [`Edge::connect`] speaking `protocol` (1: no `Platform` after the hello).
    async fn connect_as(
        endpoint: &quinn::Endpoint,
        hub: SocketAddr,
        software: &str,
        protocol: u16,
    ) -> Edge {
        let conn = endpoint
            .connect(hub, HUB_SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let hello = Frame::Hello {
            protocol,
            software: software.to_owned(),
            vector: Vec::new(),
        };
        send.write_all(&hello.encode()).await.unwrap();
        if protocol >= 2 {
            let platform = Frame::Platform {
                target: this_target(),
            };
            send.write_all(&platform.encode()).await.unwrap();
        }
        let mut edge = Edge {
            conn,
            send,
            recv,
            reader: FrameReader::default(),
        };
        let welcome = edge.next(GUARD).await;
        assert!(
            matches!(welcome, Some(Frame::Welcome { protocol: p, .. }) if p == protocol),
            "{welcome:?}"
        );
        edge
    }

    /// The next control frame within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(f) = self.reader.next_frame().unwrap() {
                return Some(f);
            }
            let chunk = tokio::time::timeout_at(deadline, self.recv.read_chunk(1 << 16, true))
                .await
                .ok()?
                .unwrap()
                .expect("the control stream stays open");
            self.reader.push(&chunk.bytes);
        }
    }

    async fn send(&mut self, frame: Frame) {
        self.send.write_all(&frame.encode()).await.unwrap();
    }

    /// One download for this platform: the answer's first frame and the bytes after it.
    async fn fetch(&self, version: &str, offset: u64) -> (Frame, Vec<u8>) {
        self.request(Frame::FetchFor {
            version: version.to_owned(),
            target: this_target(),
            offset,
        })
        .await
    }

    /// One download asked with `fetch` (a `Fetch` or `FetchFor`).
    async fn request(&self, fetch: Frame) -> (Frame, Vec<u8>) {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        send.write_all(&fetch.encode()).await.unwrap();
        send.finish().unwrap();
        let all = tokio::time::timeout(GUARD, recv.read_to_end(64 << 20))
            .await
            .expect("the download ends in time")
            .unwrap();
        let (frame, used) = Frame::decode(&all).unwrap().expect("a whole frame");
        (frame, all[used..].to_vec())
    }
}

fn offered_versions(frame: Option<Frame>) -> Vec<String> {
    match frame {
        Some(Frame::Releases { offers }) => offers.into_iter().map(|o| o.version).collect(),
        other => panic!("expected release offers, got {other:?}"),
    }
}

/// A recognisable artifact of `len` bytes (over the API's 1 MiB JSON body limit).
fn artifact(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_roll_out_download_and_report() {
    let hub = TestHub::start().await;
    let general = hub.enroll("B001");
    let canary = hub.enroll("B002");
    let bytes = artifact(3 << 20, 5);

    // Bad input is refused and leaves nothing behind.
    let (status, _) = hub
        .request(
            "POST",
            "/api/releases?version=0.2.0&ring=all",
            None,
            "application/octet-stream",
            b"x",
        )
        .await;
    assert_eq!(status, 401);
    for (query, body, status, code) in [
        ("version=0.2&ring=all", &b"x"[..], 400, "invalid_version"),
        ("ring=all", b"x", 400, "invalid_version"),
        ("version=0.2.0&ring=beta", b"x", 400, "invalid_ring"),
        ("version=0.2.0", b"x", 400, "invalid_ring"),
        (
            "version=0.2.0&ring=all&target=a/b",
            b"x",
            400,
            "invalid_target",
        ),
        ("version=0.2.0&ring=all", b"", 400, "empty_artifact"),
    ] {
        let (got, body) = hub.publish(query, body).await;
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(code)),
            "{query}"
        );
        assert!(body["message"].is_string());
    }
    // Too large by its declared length: refused before the body is read.
    let mut stream = tokio::net::TcpStream::connect(hub.http).await.unwrap();
    let head = format!(
        "POST /api/releases?version=0.2.0&ring=all HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        (1u64 << 30) + 1
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (status, body) = read_response(stream).await;
    let body: Json = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("artifact_too_large"))
    );
    let (_, listed) = hub.json("GET", "/api/releases", None).await;
    assert_eq!(listed["releases"], json!([]));
    assert!(hub.artifact_files().is_empty());

    // Publish to the canary ring: stored, hashed, signed with the release key.
    let (status, release) = hub.publish("version=0.2.0&ring=canary", &bytes).await;
    assert_eq!(status, 201, "{release}");
    assert_eq!(release["version"], "0.2.0");
    assert_eq!(release["target"], this_target());
    assert_eq!(release["size"], bytes.len());
    assert_eq!(release["ring"], "canary");
    let hash = *blake3::hash(&bytes).as_bytes();
    assert_eq!(release["hash"], hex::encode(hash));
    assert!(shared::Timestamp::parse_rfc3339(release["published_at"].as_str().unwrap()).is_some());
    let signature: [u8; 64] = hex::decode(release["signature"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    hub.identity
        .release_public_key()
        .verify_strict(
            &signed_message("0.2.0", &this_target(), bytes.len() as u64, &hash),
            &ed25519_dalek::Signature::from_bytes(&signature),
        )
        .expect("the release key signed the release");
    assert_eq!(
        hub.artifact_files(),
        [format!("{}/0.2.0.artifact", this_target())]
    );
    let on_disk = std::fs::read(hub.artifact_path("0.2.0")).unwrap();
    assert_eq!(on_disk, bytes);

    // The same version again is refused and changes nothing.
    let (status, body) = hub
        .publish("version=0.2.0&ring=all", &artifact(1000, 9))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("release_exists"))
    );
    let on_disk = std::fs::read(hub.artifact_path("0.2.0")).unwrap();
    assert_eq!(on_disk, bytes);
    assert_eq!(
        hub.artifact_files(),
        [format!("{}/0.2.0.artifact", this_target())]
    );

    // Rings.
    let (status, body) = hub
        .json(
            "PUT",
            "/api/branches/B002/ring",
            Some(json!({"ring": "canary"})),
        )
        .await;
    assert_eq!(
        (status, body),
        (200, json!({"branch": "B002", "ring": "canary"}))
    );
    let (status, body) = hub
        .json(
            "PUT",
            "/api/branches/B999/ring",
            Some(json!({"ring": "canary"})),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("unknown_branch"))
    );
    let (status, body) = hub
        .json(
            "PUT",
            "/api/branches/B001/ring",
            Some(json!({"ring": "beta"})),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_ring"))
    );

    // The canary branch is offered the release after its welcome, and downloads it.
    let mut b2 = Edge::connect(&canary, hub.quic, "0.1.0").await;
    assert_eq!(offered_versions(b2.next(GUARD).await), ["0.2.0"]);
    let (header, body) = b2.fetch("0.2.0", 0).await;
    assert_eq!(
        header,
        Frame::Artifact {
            version: "0.2.0".into(),
            size: bytes.len() as u64,
            offset: 0
        }
    );
    assert_eq!(body, bytes);
    // Resumed from an offset; an offset at the end sends nothing more.
    let (header, body) = b2.fetch("0.2.0", 1_000_000).await;
    assert!(matches!(
        header,
        Frame::Artifact {
            offset: 1_000_000,
            ..
        }
    ));
    assert_eq!(body, bytes[1_000_000..]);
    // Past the end, or an unknown release: refused with a reason.
    for (version, offset) in [("0.2.0", bytes.len() as u64 + 1), ("9.9.9", 0)] {
        let (header, body) = b2.fetch(version, offset).await;
        assert!(matches!(header, Frame::Close { .. }), "{header:?}");
        assert!(body.is_empty());
    }

    // The general branch is offered nothing and may not download the canary release.
    let mut b1 = Edge::connect(&general, hub.quic, "0.1.0").await;
    assert_eq!(b1.next(QUIET).await, None);
    let (header, _) = b1.fetch("0.2.0", 0).await;
    assert!(matches!(header, Frame::Close { .. }), "{header:?}");

    // Promotion reaches the live general session; the canary's offers did not change.
    let (status, body) = hub.json("POST", "/api/releases/0.2.0/promote", None).await;
    assert_eq!((status, body["ring"].as_str()), (200, Some("all")));
    assert_eq!(body["targets"][0]["hash"], release["hash"]);
    assert_eq!(body["targets"].as_array().map(Vec::len), Some(1));
    assert_eq!(offered_versions(b1.next(GUARD).await), ["0.2.0"]);
    assert_eq!(b2.next(QUIET).await, None);
    let (status, body) = hub.json("POST", "/api/releases/9.9.9/promote", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("unknown_release"))
    );

    // A newer canary release reaches the canary branch only.
    let (status, _) = hub
        .publish("version=0.3.0-rc.1&ring=canary", &artifact(10, 1))
        .await;
    assert_eq!(status, 201);
    assert_eq!(
        offered_versions(b2.next(GUARD).await),
        ["0.3.0-rc.1", "0.2.0"]
    );
    assert_eq!(b1.next(QUIET).await, None);

    // Update reports are kept and shown.
    let at = 1_700_000_000_000_000;
    b1.send(Frame::UpdateReports {
        reports: vec![UpdateReport {
            version: "0.2.0".into(),
            from: "0.1.0".into(),
            outcome: UpdateOutcome::RolledBack,
            detail: "exited with status 3 on start, 3 times".into(),
            at,
        }],
    })
    .await;
    let deadline = tokio::time::Instant::now() + GUARD;
    let listed = loop {
        let (status, listed) = hub.json("GET", "/api/releases", None).await;
        assert_eq!(status, 200);
        if !listed["branches"][0]["last_outcome"].is_null() {
            break listed;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the report was kept"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let versions: Vec<&str> = listed["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["0.3.0-rc.1", "0.2.0"]);
    let outcome = json!({
        "version": "0.2.0",
        "from": "0.1.0",
        "outcome": "rolled_back",
        "detail": "exited with status 3 on start, 3 times",
        "at": shared::Timestamp(at).to_rfc3339(),
    });
    assert_eq!(
        listed["branches"],
        json!([
            {
                "branch": "B001",
                "ring": "all",
                "installed": "0.1.0",
                "target": this_target(),
                "connected": true,
                "last_outcome": outcome,
                "outcomes": [outcome],
            },
            {
                "branch": "B002",
                "ring": "canary",
                "installed": "0.1.0",
                "target": this_target(),
                "connected": true,
                "last_outcome": null,
                "outcomes": [],
            },
        ])
    );

    // Metrics.
    let size = bytes.len() as u64;
    assert_eq!(hub.metric("outpost_hub_release_fetches_total").await, 2);
    assert_eq!(
        hub.metric("outpost_hub_release_fetches_resumed_total")
            .await,
        1
    );
    assert_eq!(
        hub.metric("outpost_hub_release_bytes_served_total").await,
        size + (size - 1_000_000)
    );
    assert_eq!(hub.metric("outpost_hub_update_reports_total").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_change_reaches_a_live_session() {
    let hub = TestHub::start().await;
    let endpoint = hub.enroll("B001");
    let (status, _) = hub
        .publish("version=1.1.0&ring=canary", &artifact(100, 3))
        .await;
    assert_eq!(status, 201);
    let mut edge = Edge::connect(&endpoint, hub.quic, "1.0.0").await;
    assert_eq!(edge.next(QUIET).await, None);
    let (status, _) = hub
        .json(
            "PUT",
            "/api/branches/B001/ring",
            Some(json!({"ring": "canary"})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(offered_versions(edge.next(GUARD).await), ["1.1.0"]);
    // Back to the general ring: the offer is withdrawn (an empty list).
    let (status, _) = hub
        .json(
            "PUT",
            "/api/branches/B001/ring",
            Some(json!({"ring": "all"})),
        )
        .await;
    assert_eq!(status, 200);
    assert!(offered_versions(edge.next(GUARD).await).is_empty());
    // An edge already running the newest release is offered nothing.
    drop(edge);
    let (status, _) = hub.json("POST", "/api/releases/1.1.0/promote", None).await;
    assert_eq!(status, 200);
    let mut edge = Edge::connect(&endpoint, hub.quic, "1.1.0").await;
    assert_eq!(edge.next(QUIET).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_1_edge_still_syncs_and_updates() {
    let hub = TestHub::start().await;
    let endpoint = hub.enroll("B001");
    let ours = artifact(300, 5);
    let (status, _) = hub.publish("version=0.2.0&ring=all", &ours).await;
    assert_eq!(status, 201);
    let (status, _) = hub
        .publish(
            "version=0.2.0&ring=all&target=aarch64-linux",
            &artifact(200, 6),
        )
        .await;
    assert_eq!(status, 201);

    // A protocol 2 edge is offered its own platform's build, and may fetch only that.
    let mut v2 = Edge::connect(&endpoint, hub.quic, "0.1.0").await;
    let offers = match v2.next(GUARD).await {
        Some(Frame::Releases { offers }) => offers,
        other => panic!("{other:?}"),
    };
    assert_eq!(offers.len(), 1);
    assert_eq!(offers[0].target, this_target());
    let (header, _) = v2
        .request(Frame::FetchFor {
            version: "0.2.0".into(),
            target: "aarch64-linux".into(),
            offset: 0,
        })
        .await;
    assert!(matches!(header, Frame::Close { .. }), "{header:?}");
    let platform = |branches: &Json| branches.as_array().unwrap()[0]["edge_target"].clone();
    let (_, branches) = hub.json("GET", "/api/branches", None).await;
    assert_eq!(platform(&branches), json!(this_target()), "{branches}");
    drop(v2);

    // The release before `Platform`: welcomed in its protocol, offered every platform's build
    // (it picks its own), and its `Fetch` without a target gets the hub's platform's build.
    let mut v1 = Edge::connect_as(&endpoint, hub.quic, "0.1.0", 1).await;
    let offers = match v1.next(GUARD).await {
        Some(Frame::Releases { offers }) => offers,
        other => panic!("{other:?}"),
    };
    assert_eq!(offers.len(), 2, "{offers:?}");
    let (header, body) = v1
        .request(Frame::Fetch {
            version: "0.2.0".into(),
            offset: 0,
        })
        .await;
    assert_eq!(
        header,
        Frame::Artifact {
            version: "0.2.0".into(),
            size: ours.len() as u64,
            offset: 0
        }
    );
    assert_eq!(body, ours);
    // An older edge names no platform: the hub shows none rather than the last one's.
    let (_, branches) = hub.json("GET", "/api/branches", None).await;
    assert_eq!(platform(&branches), Json::Null, "{branches}");
}
