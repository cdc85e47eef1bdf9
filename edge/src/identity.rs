//! The branch's identity on the sync link, as issued by `outpost-hub enroll`, and the QUIC
//! client configuration built from it.
//!
//! An enrollment directory holds `ca.pem` (the hub's CA: the only root the edge trusts),
//! `edge.pem` (the branch's certificate), `edge.key` (its private key, PKCS #8 PEM, mode
//! 0600) and `release.pub` (the hub's release-verifying ed25519 key: 64 hex digits and a
//! newline; optional). The branch id is read from the certificate's `outpost://branch/<ID>`
//! URI SAN (never from the common name), the rule the hub applies to the connected peer, so
//! an edge can refuse to start under another branch's name.
//!
//! The edge always dials the hub with the server name [`HUB_SERVER_NAME`], whatever address
//! it connects to.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::VerifyingKey;
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use shared::BranchId;
use shared::ids::IdError;
use shared::wire::ALPN;
pub use shared::wire::HUB_SERVER_NAME;

/// The hub's CA certificate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The branch's certificate.
pub const EDGE_CERT_FILE: &str = "edge.pem";
/// The branch's private key.
pub const EDGE_KEY_FILE: &str = "edge.key";
/// The hub's release-verifying key (hex).
pub const RELEASE_PUB_FILE: &str = "release.pub";
/// The URI SAN prefix that names a branch in its certificate.
pub const BRANCH_URI_PREFIX: &str = "outpost://branch/";

/// Interval of QUIC keep-alives: well within the idle timeout, and often enough that NAT
/// bindings on branch routers survive a quiet shop.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// QUIC idle timeout of the sync link (the hub uses the same). Short: an outage longer than
/// this closes the connection and the client reconnects and resumes, which costs one
/// handshake; a long timeout only delays noticing a hub that restarted (its new process
/// cannot reset the old connection).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// First RTT estimate: branch WAN links, not the spec's 333 ms, so a lost handshake packet is
/// retried after ~300 ms rather than ~1 s.
pub const INITIAL_RTT: Duration = Duration::from_millis(100);
/// Receive window of one stream: ~40 MB/s on a 100 ms path.
pub const STREAM_RECEIVE_WINDOW: u32 = 4 << 20;
/// Receive window of the whole connection.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 16 << 20;
/// Bytes the edge may have sent and not yet had acknowledged.
pub const SEND_WINDOW: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} does not hold a valid {what}: {reason}", path.display())]
    Invalid {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("{} does not belong to {}: {reason}", key.display(), cert.display())]
    Mismatch {
        key: PathBuf,
        cert: PathBuf,
        reason: &'static str,
    },
    #[error("invalid TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the TLS configuration cannot be used for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

fn invalid(path: &Path, what: &'static str, reason: impl fmt::Display) -> IdentityError {
    IdentityError::Invalid {
        path: path.to_owned(),
        what,
        reason: reason.to_string(),
    }
}

/// The branch's sync identity, loaded from an enrollment directory.
pub struct EdgeIdentity {
    /// The branch the certificate names.
    pub branch: BranchId,
    /// The hub's release-verifying key, when the enrollment carried one.
    pub release_key: Option<VerifyingKey>,
    /// blake3 of the certificate's DER (what the hub recorded at enrollment).
    pub fingerprint: [u8; 32],
    /// When the certificate stops being accepted.
    pub not_after: SystemTime,
    roots: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for EdgeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EdgeIdentity")
            .field("branch", &self.branch)
            .field("fingerprint", &hex::encode(self.fingerprint))
            .field("not_after", &self.not_after)
            .field(
                "release_key",
                &self.release_key.map(|k| hex::encode(k.as_bytes())),
            )
            .finish_non_exhaustive()
    }
}

impl EdgeIdentity {
    /// Loads `ca.pem`, `edge.pem`, `edge.key` and (if present) `release.pub` from `dir`, and
    /// checks that the key is the certificate's and that the certificate names a branch. An
    /// expired certificate loads (with a warning): the edge keeps serving its terminals, and
    /// the hub is the one that refuses it.
    pub fn load(dir: &Path) -> Result<EdgeIdentity, IdentityError> {
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = dir.join(EDGE_CERT_FILE);
        let key_path = dir.join(EDGE_KEY_FILE);
        let release_path = dir.join(RELEASE_PUB_FILE);

        let roots = certs(&ca_path, "CA certificate")?;
        let chain = certs(&cert_path, "branch certificate")?;
        if let Ok(meta) = fs::metadata(&key_path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %key_path.display(), "the branch's private key is readable by other users; it should be mode 0600");
        }
        let key = PrivateKeyDer::from_pem_slice(&read(&key_path)?)
            .map_err(|e| invalid(&key_path, "PEM private key", e))?;
        let signing_key = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| invalid(&key_path, "private key", e))?;
        match rustls::sign::CertifiedKey::new(chain.clone(), signing_key).keys_match() {
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(IdentityError::Mismatch {
                    key: key_path,
                    cert: cert_path,
                    reason: "the certificate carries another public key",
                });
            }
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) | Ok(()) => {}
            Err(e) => return Err(invalid(&cert_path, "branch certificate", e)),
        }

        let (branch, not_after) = read_certificate(&chain[0])
            .map_err(|reason| invalid(&cert_path, "branch certificate", reason))?;
        if not_after < SystemTime::now() {
            tracing::warn!(path = %cert_path.display(), %branch, "the branch certificate has expired; the hub will refuse it until the branch is enrolled again");
        }

        let release_key = match fs::read_to_string(&release_path) {
            Ok(text) => Some(
                parse_release_key(&text)
                    .map_err(|reason| invalid(&release_path, "release public key", reason))?,
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(IdentityError::Io {
                    path: release_path,
                    source,
                });
            }
        };
        Ok(EdgeIdentity {
            branch,
            release_key,
            fingerprint: *blake3::hash(&chain[0]).as_bytes(),
            not_after,
            roots,
            chain,
            key,
        })
    }

    /// The QUIC client configuration of the sync link: TLS 1.3 only, ALPN [`ALPN`], the hub's
    /// CA as the only root, this branch's certificate as the client certificate. Connect with
    /// server name [`HUB_SERVER_NAME`].
    pub fn client_config(&self) -> Result<quinn::ClientConfig, IdentityError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for root in &self.roots {
            roots.add(root.clone())?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        // The hub verifies every connection in full; tickets would only be wasted state.
        tls.resumption = rustls::client::Resumption::disabled();
        let quic = QuicClientConfig::try_from(tls)?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
            .max_idle_timeout(Some(
                IDLE_TIMEOUT
                    .try_into()
                    .expect("30 s is a valid idle timeout"),
            ))
            .initial_rtt(INITIAL_RTT)
            .stream_receive_window(STREAM_RECEIVE_WINDOW.into())
            .receive_window(CONNECTION_RECEIVE_WINDOW.into())
            .send_window(SEND_WINDOW);
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(|source| IdentityError::Io {
        path: path.to_owned(),
        source,
    })
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, what, e))?;
    if certs.is_empty() {
        return Err(invalid(path, what, "it holds no PEM certificate"));
    }
    Ok(certs)
}

/// The branch a certificate names in its one `outpost://branch/<ID>` URI SAN, and the end of
/// its validity.
fn read_certificate(der: &[u8]) -> Result<(BranchId, SystemTime), String> {
    use x509_parser::extensions::GeneralName;

    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let san = cert.subject_alternative_name().map_err(|e| e.to_string())?;
    let mut found = None;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        if let GeneralName::URI(uri) = name
            && let Some(id) = uri.strip_prefix(BRANCH_URI_PREFIX)
            && found.replace(id).is_some()
        {
            return Err("it names more than one branch".into());
        }
    }
    let id =
        found.ok_or_else(|| format!("it names no branch (no {BRANCH_URI_PREFIX}<ID> URI SAN)"))?;
    let branch = BranchId::parse(id).map_err(|e: IdError| e.to_string())?;
    let secs = cert.validity().not_after.timestamp();
    let not_after = u64::try_from(secs)
        .ok()
        .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        .unwrap_or(UNIX_EPOCH);
    Ok((branch, not_after))
}

fn parse_release_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = hex::decode(text.trim()).map_err(|e| e.to_string())?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "it is not 32 bytes (64 hex digits)".to_owned())?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| e.to_string())
}
