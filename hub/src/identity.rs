//! The hub's identities: a private certificate authority that enrolls branches, the hub's QUIC
//! server certificate, and the ed25519 key that signs releases; the TLS configuration of the
//! sync link, and who a connected peer is.
//!
//! Files in the hub's data dir (all PEM unless said otherwise):
//!
//! | file          | what                                                        | mode |
//! |---------------|-------------------------------------------------------------|------|
//! | `ca.pem`      | the CA certificate (self-signed, ECDSA P-256)               | 0644 |
//! | `ca.key`      | the CA's private key (PKCS #8)                              | 0600 |
//! | `hub.pem`     | the hub's server certificate, signed by the CA              | 0644 |
//! | `hub.key`     | its private key (PKCS #8)                                   | 0600 |
//! | `release.key` | the release-signing ed25519 seed: 64 hex digits and a newline | 0600 |
//! | `release.pub` | its public key: 64 hex digits and a newline                 | 0644 |
//!
//! Each file is written atomically (temporary file, fsync, rename) and `ca.pem` is written
//! last, after the directory has been synced: it is the commit point. A data dir without
//! `ca.pem` has no identity (whatever an interrupted first start left is replaced); a data dir
//! with `ca.pem` must hold every other file, or loading fails rather than minting a new CA
//! that no enrolled branch would trust.
//!
//! A branch certificate names its branch in a URI subject alternative name
//! `outpost://branch/<ID>` ([`BRANCH_URI_PREFIX`]); that SAN, never the common name, is what
//! [`peer_branch`] reads. The common name carries the same id for people reading the
//! certificate.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use quinn::crypto::rustls::QuicServerConfig;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use shared::BranchId;
use shared::ids::IdError;
use shared::wire::{ALPN, HUB_SERVER_NAME};
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{OID_X509_COMMON_NAME, OID_X509_ORGANIZATION_NAME};
use x509_parser::time::ASN1Time;

/// The CA certificate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA's private key.
pub const CA_KEY_FILE: &str = "ca.key";
/// The hub's server certificate.
pub const HUB_CERT_FILE: &str = "hub.pem";
/// The hub's server key.
pub const HUB_KEY_FILE: &str = "hub.key";
/// The release-signing key (hex seed).
pub const RELEASE_KEY_FILE: &str = "release.key";
/// The release-verifying key (hex), also given to every enrolled branch.
pub const RELEASE_PUB_FILE: &str = "release.pub";
/// The branch's certificate, in an enrollment directory.
pub const EDGE_CERT_FILE: &str = "edge.pem";
/// The branch's private key, in an enrollment directory.
pub const EDGE_KEY_FILE: &str = "edge.key";

/// The URI SAN prefix that names a branch in its certificate.
pub const BRANCH_URI_PREFIX: &str = "outpost://branch/";
/// How long a new CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 86_400);
/// How long the hub's server certificate is valid (there is no rotation yet).
pub const HUB_CERT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// A sensible validity for a branch certificate when the operator gives none.
pub const BRANCH_CERT_VALIDITY_DEFAULT: Duration = Duration::from_secs(2 * 365 * 86_400);
/// Certificates start this long before they are issued, so a branch whose clock is behind
/// still accepts them (and the hub accepts its certificate).
pub const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// QUIC idle timeout of the sync link (the edge sends keep-alives well within it).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// First RTT estimate: branch WAN links, not the spec's 333 ms, so a lost handshake packet is
/// retried after ~300 ms rather than ~1 s.
pub const INITIAL_RTT: Duration = Duration::from_millis(100);
/// Receive window of one stream: ~40 MB/s on a 100 ms path.
pub const STREAM_RECEIVE_WINDOW: u32 = 4 << 20;
/// Receive window of a whole connection, which bounds the hub's buffering per branch.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 16 << 20;
/// Bytes a side may have sent and not yet had acknowledged, per connection.
pub const SEND_WINDOW: u64 = 16 << 20;
/// Concurrent bidirectional streams a peer may open.
pub const BIDI_STREAMS_MAX: u32 = 64;
/// Concurrent unidirectional streams a peer may open.
pub const UNI_STREAMS_MAX: u32 = 64;

const SECRET_MODE: u32 = 0o600;
const PUBLIC_MODE: u32 = 0o644;
const CA_KEY_USAGES: [KeyUsagePurpose; 3] = [
    KeyUsagePurpose::KeyCertSign,
    KeyUsagePurpose::CrlSign,
    KeyUsagePurpose::DigitalSignature,
];
/// Every file of a hub identity; `ca.pem` is the commit point and is written last.
const HUB_FILES: [&str; 6] = [
    CA_KEY_FILE,
    HUB_KEY_FILE,
    HUB_CERT_FILE,
    RELEASE_KEY_FILE,
    RELEASE_PUB_FILE,
    CA_CERT_FILE,
];
const TEMP_MARKER: &str = ".tmp-";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "the hub identity in {} is incomplete: {missing} is missing although {CA_CERT_FILE} \
         exists; restore it from a backup (creating a new CA would cut off every enrolled branch)",
        dir.display()
    )]
    Incomplete { dir: PathBuf, missing: &'static str },
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
    #[error("cannot create a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("a certificate validity ends outside the representable range ({0:?} from now)")]
    Validity(Duration),
    #[error("the system has no randomness for a key: {0}")]
    Random(getrandom::Error),
    #[error("invalid TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the TLS configuration cannot be used for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("the peer's certificate does not parse: {0}")]
    PeerCertificate(String),
    #[error("the peer's certificate names no branch (no {BRANCH_URI_PREFIX}<ID> URI SAN)")]
    NoBranch,
    #[error("the peer's certificate names more than one branch")]
    AmbiguousBranch,
    #[error("the peer's certificate names an invalid branch: {0}")]
    BadBranch(IdError),
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IdentityError {
    let path = path.to_owned();
    move |source| IdentityError::Io {
        action,
        path,
        source,
    }
}

fn invalid(path: &Path, what: &'static str, reason: impl fmt::Display) -> IdentityError {
    IdentityError::Invalid {
        path: path.to_owned(),
        what,
        reason: reason.to_string(),
    }
}

/// The hub's CA, server certificate and release key, as loaded from its data dir.
pub struct HubIdentity {
    dir: PathBuf,
    ca_cert_pem: String,
    ca_cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    hub_chain: Vec<CertificateDer<'static>>,
    hub_key: PrivateKeyDer<'static>,
    release_key: SigningKey,
}

impl fmt::Debug for HubIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubIdentity")
            .field("dir", &self.dir)
            .field("ca_fingerprint", &hex::encode(fingerprint(&self.ca_cert)))
            .field(
                "release_public_key",
                &hex::encode(self.release_public_key().as_bytes()),
            )
            .finish_non_exhaustive()
    }
}

/// What [`HubIdentity::enroll`] issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    /// blake3 of the certificate's DER: what the hub records for the branch.
    pub fingerprint: [u8; 32],
}

/// A client certificate and its new key, as PEM.
#[derive(Clone)]
pub struct IssuedCertificate {
    pub cert_pem: String,
    pub key_pem: String,
    /// blake3 of the certificate's DER.
    pub fingerprint: [u8; 32],
}

impl fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("fingerprint", &hex::encode(self.fingerprint))
            .finish_non_exhaustive()
    }
}

/// Who is at the other end of a sync connection, from its verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerBranch {
    pub branch: BranchId,
    /// blake3 of the leaf certificate's DER.
    pub fingerprint: [u8; 32],
}

impl HubIdentity {
    /// Loads the identity in `data_dir`, creating it (and the directory) on first use.
    pub fn init_or_load(data_dir: &Path) -> Result<HubIdentity, IdentityError> {
        fs::create_dir_all(data_dir).map_err(io_error("create the directory", data_dir))?;
        let ca_path = data_dir.join(CA_CERT_FILE);
        let exists = ca_path
            .try_exists()
            .map_err(io_error("look for", &ca_path))?;
        if !exists {
            create(data_dir)?;
            tracing::info!(dir = %data_dir.display(), "created the hub's CA, server certificate and release key");
        }
        Self::load(data_dir)
    }

    /// Loads an existing identity; fails if `data_dir` has none or an incomplete one.
    pub fn load(data_dir: &Path) -> Result<HubIdentity, IdentityError> {
        // ca.pem first: without it there is no identity at all, rather than an incomplete one.
        for name in HUB_FILES.iter().rev().copied() {
            let path = data_dir.join(name);
            if !path.try_exists().map_err(io_error("look for", &path))? {
                if name == CA_CERT_FILE {
                    return Err(IdentityError::Io {
                        action: "read",
                        path,
                        source: io::ErrorKind::NotFound.into(),
                    });
                }
                return Err(IdentityError::Incomplete {
                    dir: data_dir.to_owned(),
                    missing: name,
                });
            }
        }
        let ca_path = data_dir.join(CA_CERT_FILE);
        let ca_key_path = data_dir.join(CA_KEY_FILE);
        let hub_path = data_dir.join(HUB_CERT_FILE);
        let hub_key_path = data_dir.join(HUB_KEY_FILE);

        let ca_cert_pem = read_text(&ca_path)?;
        let ca_cert = one_cert(&ca_path, ca_cert_pem.as_bytes())?;
        let ca_key = read_key_pair(&ca_key_path)?;
        key_matches(&ca_cert, &ca_key, &ca_key_path, &ca_path)?;
        let issuer = rebuild_issuer(&ca_cert, ca_key, &ca_path)?;

        let hub_chain = certs(&hub_path, read_text(&hub_path)?.as_bytes())?;
        let hub_key = read_key_pair(&hub_key_path)?;
        key_matches(&hub_chain[0], &hub_key, &hub_key_path, &hub_path)?;
        let hub_key = PrivateKeyDer::Pkcs8(hub_key.serialize_der().into());

        let release_key_path = data_dir.join(RELEASE_KEY_FILE);
        let release_pub_path = data_dir.join(RELEASE_PUB_FILE);
        warn_if_readable(&release_key_path);
        let seed = read_hex32(&release_key_path, "release signing key")?;
        let release_key = SigningKey::from_bytes(&seed);
        let public = read_hex32(&release_pub_path, "release public key")?;
        if public != release_key.verifying_key().to_bytes() {
            return Err(IdentityError::Mismatch {
                key: release_key_path,
                cert: release_pub_path,
                reason: "the public key is not the signing key's",
            });
        }
        Ok(HubIdentity {
            dir: data_dir.to_owned(),
            ca_cert_pem,
            ca_cert,
            issuer,
            hub_chain,
            hub_key,
            release_key,
        })
    }

    /// The data dir the identity was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate, PEM (what every enrolled branch trusts).
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// The CA certificate, DER.
    pub fn ca_cert_der(&self) -> &CertificateDer<'static> {
        &self.ca_cert
    }

    /// Issues `branch` a client certificate valid from now (less [`CLOCK_SKEW`]) for
    /// `valid_for`, and writes `ca.pem`, `edge.pem`, `edge.key` (0600) and `release.pub` into
    /// `out`, creating it if needed. Files already there are replaced, each atomically; the
    /// hub should record the returned fingerprint as the branch's only accepted certificate.
    pub fn enroll(
        &self,
        branch: &BranchId,
        out: &Path,
        valid_for: Duration,
    ) -> Result<Enrolled, IdentityError> {
        let now = SystemTime::now();
        let not_after = now
            .checked_add(valid_for)
            .ok_or(IdentityError::Validity(valid_for))?;
        let issued = self.issue_client_certificate(branch, now - CLOCK_SKEW, not_after)?;
        fs::create_dir_all(out).map_err(io_error("create the directory", out))?;
        remove_stale_temp_files(out);
        let release_pub = format!("{}\n", hex::encode(self.release_public_key().as_bytes()));
        write_atomic(
            &out.join(EDGE_KEY_FILE),
            issued.key_pem.as_bytes(),
            SECRET_MODE,
        )?;
        write_atomic(
            &out.join(EDGE_CERT_FILE),
            issued.cert_pem.as_bytes(),
            PUBLIC_MODE,
        )?;
        write_atomic(
            &out.join(RELEASE_PUB_FILE),
            release_pub.as_bytes(),
            PUBLIC_MODE,
        )?;
        write_atomic(
            &out.join(CA_CERT_FILE),
            self.ca_cert_pem.as_bytes(),
            PUBLIC_MODE,
        )?;
        sync_dir(out)?;
        tracing::info!(%branch, out = %out.display(), fingerprint = %hex::encode(issued.fingerprint), "enrolled a branch");
        Ok(Enrolled {
            fingerprint: issued.fingerprint,
        })
    }

    /// Issues `branch` a client certificate with a new key, valid from `not_before` to
    /// `not_after`, without writing anything. [`enroll`](Self::enroll) uses it; tests use it
    /// for certificates that are already expired or not yet valid.
    pub fn issue_client_certificate(
        &self,
        branch: &BranchId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCertificate, IdentityError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, branch.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Outpost branch");
        let uri = format!("{BRANCH_URI_PREFIX}{branch}");
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = asn1_time(not_before)?.to_datetime();
        params.not_after = asn1_time(not_after)?.to_datetime();
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            fingerprint: fingerprint(cert.der()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The QUIC server configuration of the sync link: TLS 1.3 only, ALPN [`ALPN`], the hub's
    /// certificate, a client certificate signed by our CA required (and verified on every
    /// connection: no session resumption, no 0-RTT), transport tuned for branch WAN links.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, IdentityError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_cert.clone())?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.hub_chain.clone(), self.hub_key.clone_key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        // No session resumption: a resumed session would skip the client certificate's
        // verification (its expiry included). A full handshake costs under a millisecond.
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;
        let quic = QuicServerConfig::try_from(tls)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(transport_config()));
        Ok(config)
    }

    /// The public half of the release-signing key (also in every enrollment's `release.pub`).
    pub fn release_public_key(&self) -> VerifyingKey {
        self.release_key.verifying_key()
    }

    /// Signs `msg` with the release-signing key.
    pub fn sign_release(&self, msg: &[u8]) -> ed25519_dalek::Signature {
        self.release_key.sign(msg)
    }
}

/// The transport settings the hub applies to every sync connection. Keep-alives are the
/// edge's job.
fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .expect("30 s is a valid idle timeout"),
    ))
    .initial_rtt(INITIAL_RTT)
    .max_concurrent_bidi_streams(BIDI_STREAMS_MAX.into())
    .max_concurrent_uni_streams(UNI_STREAMS_MAX.into())
    .stream_receive_window(STREAM_RECEIVE_WINDOW.into())
    .receive_window(CONNECTION_RECEIVE_WINDOW.into())
    .send_window(SEND_WINDOW);
    t
}

/// The branch and certificate fingerprint of a connection's peer. The TLS layer has already
/// verified the certificate against our CA; this reads the branch from its
/// `outpost://branch/<ID>` URI SAN (the common name is not consulted).
pub fn peer_branch(conn: &quinn::Connection) -> Result<PeerBranch, IdentityError> {
    let identity = conn
        .peer_identity()
        .ok_or(IdentityError::NoPeerCertificate)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| IdentityError::NoPeerCertificate)?;
    let leaf = chain.first().ok_or(IdentityError::NoPeerCertificate)?;
    Ok(PeerBranch {
        branch: branch_of_certificate(leaf)?,
        fingerprint: fingerprint(leaf),
    })
}

/// The branch a certificate (DER) names in its `outpost://branch/<ID>` URI SAN. Exactly one
/// such SAN must be present and its id must be a valid [`BranchId`].
pub fn branch_of_certificate(der: &[u8]) -> Result<BranchId, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::PeerCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::PeerCertificate(e.to_string()))?;
    let mut found = None;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        if let GeneralName::URI(uri) = name
            && let Some(id) = uri.strip_prefix(BRANCH_URI_PREFIX)
            && found.replace(id).is_some()
        {
            return Err(IdentityError::AmbiguousBranch);
        }
    }
    BranchId::parse(found.ok_or(IdentityError::NoBranch)?).map_err(IdentityError::BadBranch)
}

/// blake3 of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    *blake3::hash(der).as_bytes()
}

/// Creates every file of a new identity in `dir`, `ca.pem` last.
fn create(dir: &Path) -> Result<(), IdentityError> {
    remove_stale_temp_files(dir);
    let now = SystemTime::now();
    let later = |d: Duration| now.checked_add(d).ok_or(IdentityError::Validity(d));

    let ca_key = KeyPair::generate()?;
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(IdentityError::Random)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("Outpost hub CA {}", hex::encode(id)),
    );
    ca.distinguished_name
        .push(DnType::OrganizationName, "Outpost");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = CA_KEY_USAGES.to_vec();
    ca.serial_number = Some(random_serial()?);
    ca.not_before = asn1_time(now - CLOCK_SKEW)?.to_datetime();
    ca.not_after = asn1_time(later(CA_VALIDITY)?)?.to_datetime();
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let hub_key = KeyPair::generate()?;
    let mut hub = CertificateParams::default();
    hub.distinguished_name = DistinguishedName::new();
    hub.distinguished_name
        .push(DnType::CommonName, HUB_SERVER_NAME);
    hub.subject_alt_names = vec![
        SanType::DnsName(HUB_SERVER_NAME.try_into()?),
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    ];
    hub.is_ca = IsCa::ExplicitNoCa;
    hub.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    hub.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    hub.use_authority_key_identifier_extension = true;
    hub.serial_number = Some(random_serial()?);
    hub.not_before = asn1_time(now - CLOCK_SKEW)?.to_datetime();
    hub.not_after = asn1_time(later(HUB_CERT_VALIDITY)?)?.to_datetime();
    let hub_cert = hub.signed_by(&hub_key, &issuer)?;

    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(IdentityError::Random)?;
    let release = SigningKey::from_bytes(&seed);
    let release_hex = format!("{}\n", hex::encode(seed));
    seed.fill(0);

    let path = |name| dir.join(name);
    write_atomic(
        &path(CA_KEY_FILE),
        issuer.key().serialize_pem().as_bytes(),
        SECRET_MODE,
    )?;
    write_atomic(
        &path(HUB_KEY_FILE),
        hub_key.serialize_pem().as_bytes(),
        SECRET_MODE,
    )?;
    write_atomic(&path(HUB_CERT_FILE), hub_cert.pem().as_bytes(), PUBLIC_MODE)?;
    write_atomic(&path(RELEASE_KEY_FILE), release_hex.as_bytes(), SECRET_MODE)?;
    let release_pub = format!("{}\n", hex::encode(release.verifying_key().as_bytes()));
    write_atomic(&path(RELEASE_PUB_FILE), release_pub.as_bytes(), PUBLIC_MODE)?;
    // Everything else is durable before the commit point appears.
    sync_dir(dir)?;
    write_atomic(&path(CA_CERT_FILE), ca_cert.pem().as_bytes(), PUBLIC_MODE)?;
    sync_dir(dir)
}

/// Rebuilds the CA's [`Issuer`] from its certificate and key: the subject name (which every
/// issued certificate repeats as its issuer) is read back from the certificate and checked to
/// encode to the same bytes; the key identifier is derived from the key as when it was made.
fn rebuild_issuer(
    ca_cert: &CertificateDer<'static>,
    ca_key: KeyPair,
    path: &Path,
) -> Result<Issuer<'static, KeyPair>, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(ca_cert)
        .map_err(|e| invalid(path, "CA certificate", e))?;
    let mut name = DistinguishedName::new();
    for attr in cert.subject().iter_attributes() {
        let ty = if *attr.attr_type() == OID_X509_COMMON_NAME {
            DnType::CommonName
        } else if *attr.attr_type() == OID_X509_ORGANIZATION_NAME {
            DnType::OrganizationName
        } else {
            return Err(invalid(
                path,
                "CA certificate",
                format!("unexpected subject attribute {}", attr.attr_type()),
            ));
        };
        let value = attr
            .as_str()
            .map_err(|e| invalid(path, "CA certificate", e))?;
        name.push(ty, value);
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = CA_KEY_USAGES.to_vec();
    let probe = params.self_signed(&ca_key)?;
    let (_, probe) = x509_parser::parse_x509_certificate(probe.der())
        .map_err(|e| invalid(path, "CA certificate", e))?;
    if probe.subject().as_raw() != cert.subject().as_raw() {
        return Err(invalid(
            path,
            "CA certificate",
            "its subject name cannot be reproduced to issue certificates",
        ));
    }
    Ok(Issuer::new(params, ca_key))
}

/// Fails unless `key` is the key of `cert`.
fn key_matches(
    cert: &CertificateDer<'_>,
    key: &KeyPair,
    key_path: &Path,
    cert_path: &Path,
) -> Result<(), IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| invalid(cert_path, "certificate", e))?;
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(IdentityError::Mismatch {
            key: key_path.to_owned(),
            cert: cert_path.to_owned(),
            reason: "the certificate carries another public key",
        });
    }
    Ok(())
}

fn read_text(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(io_error("read", path))
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, "PEM certificate", e))?;
    if certs.is_empty() {
        return Err(invalid(path, "PEM certificate", "it holds no certificate"));
    }
    Ok(certs)
}

fn one_cert(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, IdentityError> {
    let mut certs = certs(path, pem)?;
    if certs.len() != 1 {
        return Err(invalid(
            path,
            "CA certificate",
            "it holds more than one certificate",
        ));
    }
    Ok(certs.remove(0))
}

fn read_key_pair(path: &Path) -> Result<KeyPair, IdentityError> {
    warn_if_readable(path);
    KeyPair::from_pem(&read_text(path)?).map_err(|e| invalid(path, "PEM private key", e))
}

fn read_hex32(path: &Path, what: &'static str) -> Result<[u8; 32], IdentityError> {
    let text = read_text(path)?;
    let bytes = hex::decode(text.trim()).map_err(|e| invalid(path, what, e))?;
    bytes
        .try_into()
        .map_err(|_| invalid(path, what, "it is not 32 bytes (64 hex digits)"))
}

/// Logs a warning when a private key file can be read by others than its owner.
fn warn_if_readable(path: &Path) {
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "a private key file is readable by other users; it should be mode 0600");
    }
}

fn asn1_time(t: SystemTime) -> Result<ASN1Time, IdentityError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok());
    let out_of_range = || {
        IdentityError::Validity(
            t.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
        )
    };
    let secs = secs.ok_or_else(out_of_range)?;
    ASN1Time::from_timestamp(secs).map_err(|_| out_of_range())
}

/// A random positive 128-bit serial number.
fn random_serial() -> Result<SerialNumber, IdentityError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(IdentityError::Random)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Writes `bytes` to `path` atomically: a temporary file with `mode` in the same directory,
/// fsynced, then renamed over `path`. The caller syncs the directory.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("identity file names are UTF-8");
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(IdentityError::Random)?;
    let tmp = dir.join(format!(".{name}{TEMP_MARKER}{}", hex::encode(nonce)));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_error("write", path)(e));
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_error("replace", path)(e)
    })
}

fn sync_dir(dir: &Path) -> Result<(), IdentityError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync the directory", dir))
}

/// Removes temporary files an interrupted write left in `dir` (best effort).
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = [EDGE_CERT_FILE, EDGE_KEY_FILE]
            .iter()
            .chain(HUB_FILES.iter())
            .any(|f| {
                name.strip_prefix('.')
                    .and_then(|n| n.strip_prefix(f))
                    .is_some_and(|rest| rest.starts_with(TEMP_MARKER))
            });
        if ours {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn parse(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn identity_init_creates_files_and_loads_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("hub");
        let first = HubIdentity::init_or_load(&data).unwrap();
        for name in HUB_FILES {
            assert!(data.join(name).is_file(), "{name} was not written");
        }
        for name in [CA_KEY_FILE, HUB_KEY_FILE, RELEASE_KEY_FILE] {
            assert_eq!(mode(&data.join(name)), 0o600, "{name}");
        }
        let leftovers: Vec<_> = fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains(TEMP_MARKER))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

        let second = HubIdentity::init_or_load(&data).unwrap();
        assert_eq!(first.ca_cert_pem(), second.ca_cert_pem());
        assert_eq!(first.release_public_key(), second.release_public_key());
        assert_eq!(first.hub_chain, second.hub_chain);

        // release.pub holds the verifying key in hex, and signatures verify with it.
        let text = fs::read_to_string(data.join(RELEASE_PUB_FILE)).unwrap();
        assert_eq!(
            text.trim(),
            hex::encode(second.release_public_key().as_bytes())
        );
        let sig = second.sign_release(b"outpost-edge 0.2.0");
        second
            .release_public_key()
            .verify_strict(b"outpost-edge 0.2.0", &sig)
            .unwrap();
    }

    #[test]
    fn identity_reloaded_ca_issues_certificates_naming_it_as_issuer() {
        let dir = tempfile::tempdir().unwrap();
        HubIdentity::init_or_load(dir.path()).unwrap();
        let hub = HubIdentity::load(dir.path()).unwrap();
        let branch = BranchId::parse("B001").unwrap();
        let now = SystemTime::now();
        let issued = hub
            .issue_client_certificate(&branch, now, now + Duration::from_secs(60))
            .unwrap();
        let leaf_der = parse(&issued.cert_pem);
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(hub.ca_cert_der()).unwrap();
        assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
        let aki = leaf
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.clone()
                }
                _ => None,
            })
            .expect("an authority key identifier");
        let ski = ca
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                    Some(k.clone())
                }
                _ => None,
            })
            .expect("a subject key identifier");
        assert_eq!(aki.0, ski.0);
    }

    #[test]
    fn identity_missing_file_is_an_error_not_a_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        let first = HubIdentity::init_or_load(dir.path()).unwrap();
        fs::remove_file(dir.path().join(HUB_KEY_FILE)).unwrap();
        let err = HubIdentity::init_or_load(dir.path()).unwrap_err();
        assert!(
            matches!(err, IdentityError::Incomplete { missing, .. } if missing == HUB_KEY_FILE),
            "{err}"
        );
        assert!(err.to_string().contains("hub.key"), "{err}");
        // The CA was left alone.
        let pem = fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap();
        assert_eq!(pem, first.ca_cert_pem());
    }

    #[test]
    fn identity_load_without_identity_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CA_KEY_FILE), "half").unwrap();
        let err = HubIdentity::load(dir.path()).unwrap_err();
        assert!(
            matches!(&err, IdentityError::Io { path, source, .. }
                if path.ends_with(CA_CERT_FILE) && source.kind() == io::ErrorKind::NotFound),
            "{err}"
        );
    }

    #[test]
    fn identity_interrupted_init_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        // A first start that died before its commit point: keys but no ca.pem.
        fs::write(dir.path().join(CA_KEY_FILE), "half").unwrap();
        fs::write(dir.path().join(".hub.key.tmp-0011223344556677"), "half").unwrap();
        let hub = HubIdentity::init_or_load(dir.path()).unwrap();
        assert!(hub.ca_cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!dir.path().join(".hub.key.tmp-0011223344556677").exists());
    }

    #[test]
    fn identity_mismatched_key_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        HubIdentity::init_or_load(a.path()).unwrap();
        HubIdentity::init_or_load(b.path()).unwrap();
        fs::copy(b.path().join(CA_KEY_FILE), a.path().join(CA_KEY_FILE)).unwrap();
        let err = HubIdentity::load(a.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn identity_enroll_writes_files_naming_the_branch() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubIdentity::init_or_load(&dir.path().join("hub")).unwrap();
        let out = dir.path().join("enroll").join("B042");
        let branch = BranchId::parse("B042").unwrap();
        let enrolled = hub
            .enroll(&branch, &out, Duration::from_secs(86_400))
            .unwrap();
        for name in [
            CA_CERT_FILE,
            EDGE_CERT_FILE,
            EDGE_KEY_FILE,
            RELEASE_PUB_FILE,
        ] {
            assert!(out.join(name).is_file(), "{name} was not written");
        }
        assert_eq!(mode(&out.join(EDGE_KEY_FILE)), 0o600);
        assert_eq!(
            fs::read_to_string(out.join(CA_CERT_FILE)).unwrap(),
            hub.ca_cert_pem()
        );
        assert_eq!(
            fs::read_to_string(out.join(RELEASE_PUB_FILE)).unwrap(),
            fs::read_to_string(hub.dir().join(RELEASE_PUB_FILE)).unwrap()
        );

        let der = parse(&fs::read_to_string(out.join(EDGE_CERT_FILE)).unwrap());
        assert_eq!(branch_of_certificate(&der).unwrap(), branch);
        assert_eq!(fingerprint(&der), enrolled.fingerprint);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "B042");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let now = ASN1Time::now().timestamp();
        let validity = cert.validity();
        assert!(validity.not_before.timestamp() <= now - 3000);
        assert!((validity.not_after.timestamp() - (now + 86_400)).abs() < 60);
        // The key in edge.key is the certificate's.
        let key = KeyPair::from_pem(&fs::read_to_string(out.join(EDGE_KEY_FILE)).unwrap()).unwrap();
        assert_eq!(
            cert.public_key().raw,
            key.subject_public_key_info().as_slice()
        );

        // Enrolling again replaces the certificate: a new fingerprint.
        let again = hub
            .enroll(&branch, &out, Duration::from_secs(86_400))
            .unwrap();
        assert_ne!(again.fingerprint, enrolled.fingerprint);
    }

    #[test]
    fn identity_expired_certificate_helper() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubIdentity::init_or_load(dir.path()).unwrap();
        let now = SystemTime::now();
        let branch = BranchId::parse("B001").unwrap();
        let issued = hub
            .issue_client_certificate(
                &branch,
                now - Duration::from_secs(2 * 86_400),
                now - Duration::from_secs(86_400),
            )
            .unwrap();
        let der = parse(&issued.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(cert.validity().not_after.timestamp() < ASN1Time::now().timestamp());
        assert!(!cert.validity().is_valid());
        assert_eq!(branch_of_certificate(&der).unwrap(), branch);
        assert!(!format!("{issued:?}").contains("PRIVATE"));
    }

    #[test]
    fn identity_certificate_without_branch_is_refused() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["B001".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "B001");
        let cert = params.self_signed(&key).unwrap();
        assert!(matches!(
            branch_of_certificate(cert.der()),
            Err(IdentityError::NoBranch)
        ));

        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI("outpost://branch/B001".try_into().unwrap()),
            SanType::URI("outpost://branch/B002".try_into().unwrap()),
        ];
        let cert = params.self_signed(&key).unwrap();
        assert!(matches!(
            branch_of_certificate(cert.der()),
            Err(IdentityError::AmbiguousBranch)
        ));

        params.subject_alt_names = vec![SanType::URI("outpost://branch/B 1".try_into().unwrap())];
        let cert = params.self_signed(&key).unwrap();
        assert!(matches!(
            branch_of_certificate(cert.der()),
            Err(IdentityError::BadBranch(_))
        ));
        assert!(matches!(
            branch_of_certificate(b"not a certificate"),
            Err(IdentityError::PeerCertificate(_))
        ));
    }
}
