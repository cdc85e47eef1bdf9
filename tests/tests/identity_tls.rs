//! Real QUIC handshakes on loopback between a hub identity and enrolled edges: who gets in,
//! who is refused, and on which side the refusal shows. A refused client certificate may
//! surface on the client only at its first stream I/O after `connect().await` succeeded, so
//! the client side is judged on a whole request/answer exchange, never on `connect` alone.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use edge::identity::EdgeIdentity;
use hub::identity::{HubIdentity, PeerBranch, peer_branch};
use quinn::{ConnectionError, Endpoint};
use shared::BranchId;
use shared::wire::{ALPN, HUB_SERVER_NAME};
use tempfile::TempDir;

/// Guards against a hang; a healthy exchange takes milliseconds.
const GUARD: Duration = Duration::from_secs(10);
const HELLO: &[u8] = b"hello from the branch";
const WELCOME: &[u8] = b"welcome";

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Hub {
    dir: TempDir,
    identity: HubIdentity,
}

impl Hub {
    fn new() -> Hub {
        let dir = tempfile::tempdir().unwrap();
        let identity = HubIdentity::init_or_load(&dir.path().join("hub")).unwrap();
        Hub { dir, identity }
    }

    /// Enrolls `branch` into a fresh directory and returns that directory.
    fn enroll(&self, branch: &str) -> (PathBuf, [u8; 32]) {
        let out = self.dir.path().join("enroll").join(branch);
        let enrolled = self
            .identity
            .enroll(
                &BranchId::parse(branch).unwrap(),
                &out,
                Duration::from_secs(86_400),
            )
            .unwrap();
        (out, enrolled.fingerprint)
    }

    fn endpoint(&self) -> (Endpoint, SocketAddr) {
        let endpoint = Endpoint::server(
            self.identity.server_config().unwrap(),
            (Ipv4Addr::LOCALHOST, 0).into(),
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap();
        (endpoint, addr)
    }
}

fn client(config: quinn::ClientConfig) -> Endpoint {
    let mut endpoint = Endpoint::client((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
}

fn edge_client(dir: &Path) -> Endpoint {
    client(EdgeIdentity::load(dir).unwrap().client_config().unwrap())
}

/// The hub's side of one exchange: accepts a connection, identifies the branch, reads its
/// request to the end, answers, and waits for the client to close.
async fn serve_one(server: &Endpoint) -> Result<(PeerBranch, Vec<u8>), ConnectionError> {
    let incoming = server.accept().await.expect("the server endpoint is open");
    let conn = incoming.await?;
    let peer = peer_branch(&conn).expect("an authenticated peer names its branch");
    let (mut send, mut recv) = conn.accept_bi().await?;
    let request = recv.read_to_end(1024).await.expect("the request");
    send.write_all(WELCOME).await.expect("the answer");
    send.finish().expect("the stream is open");
    // The client closes once it has the answer; dropping the connection earlier could lose it.
    conn.closed().await;
    Ok((peer, request))
}

/// The hub's side when it must refuse: the handshake fails, and the reason.
async fn refuse_one(server: &Endpoint) -> ConnectionError {
    let incoming = server.accept().await.expect("the server endpoint is open");
    match incoming.await {
        Ok(conn) => panic!(
            "the hub accepted a connection from {:?}",
            peer_branch(&conn)
        ),
        Err(e) => e,
    }
}

/// The edge's side of one exchange: connect, send a request, read the answer to the end.
async fn exchange(client: &Endpoint, addr: SocketAddr) -> Result<Vec<u8>, Error> {
    let conn = client.connect(addr, HUB_SERVER_NAME)?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(HELLO).await?;
    send.finish()?;
    let answer = recv.read_to_end(1024).await?;
    conn.close(0u32.into(), b"done");
    Ok(answer)
}

/// The local TLS failure behind a connection error (`TransportError` is what the side that
/// detected the problem sees; the other side sees the peer's close).
fn local_reason(e: &ConnectionError) -> &str {
    match e {
        ConnectionError::TransportError(t) => &t.reason,
        other => panic!("expected a locally detected TLS error, got {other:?}"),
    }
}

/// The connection error behind a failed exchange on the edge's side.
fn connection_error(err: &Error) -> ConnectionError {
    use quinn::{ReadError, ReadToEndError, WriteError};
    if let Some(e) = err.downcast_ref::<ConnectionError>() {
        e.clone()
    } else if let Some(WriteError::ConnectionLost(e)) = err.downcast_ref::<WriteError>() {
        e.clone()
    } else if let Some(ReadToEndError::Read(ReadError::ConnectionLost(e))) =
        err.downcast_ref::<ReadToEndError>()
    {
        e.clone()
    } else {
        panic!("expected a lost connection, got {err}")
    }
}

/// Checks that the hub refused the edge (a TLS error it detected) and that the edge learnt
/// why from the hub's close, whichever step of its exchange that reached.
fn assert_hub_refused(refused: &ConnectionError, answered: Result<Vec<u8>, Error>) -> String {
    let reason = local_reason(refused).to_owned();
    let err = answered.expect_err("the branch got an answer");
    match connection_error(&err) {
        ConnectionError::ConnectionClosed(close) => {
            assert_eq!(
                close.reason,
                reason.as_bytes(),
                "the edge saw another reason"
            )
        }
        other => panic!("the edge did not see the hub's close: {other:?}"),
    }
    reason
}

#[tokio::test]
async fn enrolled_edge_is_admitted_and_identified() {
    let hub = Hub::new();
    let (dir, fingerprint) = hub.enroll("B001");
    let edge = EdgeIdentity::load(&dir).unwrap();
    assert_eq!(edge.branch.as_str(), "B001");
    assert_eq!(edge.fingerprint, fingerprint);
    assert_eq!(edge.release_key, Some(hub.identity.release_public_key()));

    let (server, addr) = hub.endpoint();
    let client = client(edge.client_config().unwrap());
    // Twice: a reconnection is a full handshake again (no resumption) and identifies the
    // branch the same way.
    for _ in 0..2 {
        let (served, answered) = tokio::time::timeout(GUARD, async {
            tokio::join!(serve_one(&server), exchange(&client, addr))
        })
        .await
        .expect("the exchange finished in time");

        let (peer, request) = served.unwrap();
        assert_eq!(request, HELLO);
        assert_eq!(peer.branch, BranchId::parse("B001").unwrap());
        assert_eq!(peer.fingerprint, fingerprint);
        assert_eq!(answered.unwrap(), WELCOME);
    }
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let hub = Hub::new();
    let other = Hub::new();
    // A branch enrolled by another hub, which trusts our CA (so only our check can stop it).
    let (dir, _) = other.enroll("B001");
    fs::write(dir.join("ca.pem"), hub.identity.ca_cert_pem()).unwrap();

    let (server, addr) = hub.endpoint();
    let client = edge_client(&dir);
    let (refused, answered) = tokio::time::timeout(GUARD, async {
        tokio::join!(refuse_one(&server), exchange(&client, addr))
    })
    .await
    .expect("the exchange finished in time");

    let reason = assert_hub_refused(&refused, answered);
    assert!(reason.contains("UnknownIssuer"), "{reason}");
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let hub = Hub::new();
    let (dir, _) = hub.enroll("B001");
    let now = SystemTime::now();
    let expired = hub
        .identity
        .issue_client_certificate(
            &BranchId::parse("B001").unwrap(),
            now - Duration::from_secs(2 * 86_400),
            now - Duration::from_secs(86_400),
        )
        .unwrap();
    fs::write(dir.join("edge.pem"), &expired.cert_pem).unwrap();
    fs::write(dir.join("edge.key"), &expired.key_pem).unwrap();
    let edge = EdgeIdentity::load(&dir).unwrap();
    assert!(edge.not_after < now);

    let (server, addr) = hub.endpoint();
    let client = client(edge.client_config().unwrap());
    let (refused, answered) = tokio::time::timeout(GUARD, async {
        tokio::join!(refuse_one(&server), exchange(&client, addr))
    })
    .await
    .expect("the exchange finished in time");

    let reason = assert_hub_refused(&refused, answered);
    assert!(reason.contains("expired"), "{reason}");
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let hub = Hub::new();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(hub.identity.ca_cert_der().clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();

    let (server, addr) = hub.endpoint();
    let client = client(quinn::ClientConfig::new(Arc::new(quic)));
    let (refused, answered) = tokio::time::timeout(GUARD, async {
        tokio::join!(refuse_one(&server), exchange(&client, addr))
    })
    .await
    .expect("the exchange finished in time");

    let reason = assert_hub_refused(&refused, answered);
    assert!(reason.contains("no certificates"), "{reason}");
}

#[tokio::test]
async fn edge_trusting_another_ca_refuses_the_hub() {
    let hub = Hub::new();
    let other = Hub::new();
    // A valid enrollment with our hub, but the edge trusts the other hub's CA.
    let (dir, _) = hub.enroll("B001");
    fs::write(dir.join("ca.pem"), other.identity.ca_cert_pem()).unwrap();

    let (server, addr) = hub.endpoint();
    let client = edge_client(&dir);
    let (refused, answered) = tokio::time::timeout(GUARD, async {
        tokio::join!(refuse_one(&server), exchange(&client, addr))
    })
    .await
    .expect("the exchange finished in time");

    // The edge is the side that detected the problem, during `connect`.
    let err = answered.expect_err("the branch talked to a hub it does not trust");
    let conn_err = err
        .downcast_ref::<ConnectionError>()
        .unwrap_or_else(|| panic!("expected the connect to fail, got {err}"));
    let reason = local_reason(conn_err);
    assert!(reason.contains("UnknownIssuer"), "{reason}");
    // The hub saw the edge's alert, not a failure of its own.
    assert!(
        matches!(refused, ConnectionError::ConnectionClosed(_)),
        "{refused:?}"
    );
}

#[test]
fn edge_identity_load_checks_its_files() {
    use edge::identity::IdentityError;

    let hub = Hub::new();
    let (b001, _) = hub.enroll("B001");
    let (b002, _) = hub.enroll("B002");

    // release.pub is optional.
    fs::remove_file(b001.join("release.pub")).unwrap();
    let edge = EdgeIdentity::load(&b001).unwrap();
    assert_eq!(edge.branch.as_str(), "B001");
    assert_eq!(edge.release_key, None);

    // A key from another enrollment does not belong to the certificate.
    fs::copy(b002.join("edge.key"), b001.join("edge.key")).unwrap();
    let err = EdgeIdentity::load(&b001).unwrap_err();
    assert!(matches!(err, IdentityError::Mismatch { .. }), "{err}");

    // A missing file is named.
    fs::remove_file(b002.join("edge.pem")).unwrap();
    let err = EdgeIdentity::load(&b002).unwrap_err();
    assert!(matches!(err, IdentityError::Io { .. }), "{err}");
    assert!(err.to_string().contains("edge.pem"), "{err}");
}
