//! The cluster CA, node certificates, and mutual-TLS QUIC endpoints.
//!
//! Every node has one certificate, issued by the cluster CA, whose DNS name is the node's name.
//! It serves both as the participant's server certificate and as the coordinator's client
//! certificate when `txmap` runs on that node. A participant accepts a connection only when the
//! client's chain ends at the cluster CA *and* the certificate names a configured node; a
//! coordinator accepts a participant only when its certificate names the node it dialled.
//! TLS 1.3 only (QUIC requires it), with ring as the one crypto provider.

use crate::config::Config;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// TLS and certificate errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// File.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// A file holds no usable certificate or key.
    #[error("{}: {detail}", path.display())]
    BadFile {
        /// File.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Certificate generation or TLS setup failed.
    #[error("{0}")]
    Setup(String),
    /// Refusing to overwrite existing key material.
    #[error("{} already exists; refusing to overwrite key material", path.display())]
    Exists {
        /// File.
        path: PathBuf,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn setup<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> TlsError {
    move |e| TlsError::Setup(format!("{what}: {e}"))
}

/// File names inside a CA directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key (mode 0600).
pub const CA_KEY: &str = "ca.key";

/// The CA's parameters are a pure function, so issuing later only needs the CA key.
fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "txmap cluster CA");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                TlsError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                io(path)(e)
            }
        })?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io(path))
}

/// Creates `DIR/ca.pem` and `DIR/ca.key`. Refuses to overwrite.
pub fn init_ca(dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let key = KeyPair::generate().map_err(setup("generate CA key"))?;
    let cert = ca_params()
        .self_signed(&key)
        .map_err(setup("self-sign CA"))?;
    let (cp, kp) = (dir.join(CA_CERT), dir.join(CA_KEY));
    write_new(&kp, &key.serialize_pem(), 0o600)?;
    write_new(&cp, &cert.pem(), 0o644)?;
    Ok((cp, kp))
}

/// Issues `OUT/<node>.pem` and `OUT/<node>.key` signed by the CA in `ca_dir`.
pub fn issue_node(ca_dir: &Path, node: &str, out: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    if !crate::config::valid_node_name(node) {
        return Err(TlsError::Setup(format!(
            "`{node}` is not a valid node (DNS) name"
        )));
    }
    let kp_path = ca_dir.join(CA_KEY);
    let ca_key_pem = std::fs::read_to_string(&kp_path).map_err(io(&kp_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::BadFile {
        path: kp_path.clone(),
        detail: format!("not a CA key: {e}"),
    })?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut p = CertificateParams::new(vec![node.to_string()]).map_err(setup("node name"))?;
    p.distinguished_name.push(DnType::CommonName, node);
    p.use_authority_key_identifier_extension = true;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().map_err(setup("generate node key"))?;
    let cert = p
        .signed_by(&key, &issuer)
        .map_err(setup("sign node certificate"))?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let (cp, kp) = (
        out.join(format!("{node}.pem")),
        out.join(format!("{node}.key")),
    );
    write_new(&kp, &key.serialize_pem(), 0o600)?;
    write_new(&cp, &cert.pem(), 0o644)?;
    Ok((cp, kp))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(io(path))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::BadFile {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadFile {
            path: path.to_path_buf(),
            detail: "no certificate in file".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(io(path))?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| TlsError::BadFile {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?
        .ok_or_else(|| TlsError::BadFile {
            path: path.to_path_buf(),
            detail: "no private key in file".into(),
        })
}

fn roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        store.add(c).map_err(|e| TlsError::BadFile {
            path: ca.to_path_buf(),
            detail: e.to_string(),
        })?;
    }
    Ok(Arc::new(store))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Tables are streamed in one go: a generous window keeps loopback and LAN transfers fast.
    t.stream_receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024));
    t.send_window(64 * 1024 * 1024);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.keep_alive_interval(Some(std::time::Duration::from_secs(2)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(std::time::Duration::from_secs(10)) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// The participant's QUIC server config: mutual TLS against the cluster CA.
pub fn server_config(cfg: &Config) -> Result<quinn::ServerConfig, TlsError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&cfg.ca)?, provider())
            .build()
            .map_err(setup("client verifier"))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(setup("TLS versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&cfg.cert)?, load_key(&cfg.key)?)
        .map_err(setup("server certificate"))?;
    tls.alpn_protocols = crate::proto::alpn_protocols();
    tls.max_early_data_size = 0;
    let quic =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(setup("QUIC server"))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(quic));
    sc.transport_config(transport());
    Ok(sc)
}

/// The coordinator's QUIC client config: this node's certificate, the cluster CA as only root.
pub fn client_config(cfg: &Config) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(setup("TLS versions"))?
        .with_root_certificates(roots(&cfg.ca)?)
        .with_client_auth_cert(load_certs(&cfg.cert)?, load_key(&cfg.key)?)
        .map_err(setup("client certificate"))?;
    tls.alpn_protocols = crate::proto::alpn_protocols();
    let quic =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(setup("QUIC client"))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(quic));
    cc.transport_config(transport());
    Ok(cc)
}

/// Which configured node a connected peer's certificate names (the chain was already verified
/// against the cluster CA by the handshake). `None`: the peer is not a configured node.
pub fn peer_node(conn: &quinn::Connection, cfg: &Config) -> Option<String> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let leaf = chain.first()?;
    let ee = webpki::EndEntityCert::try_from(leaf).ok()?;
    cfg.nodes.iter().find_map(|n| {
        let name = ServerName::try_from(n.name.as_str()).ok()?;
        ee.verify_is_valid_for_subject_name(&name)
            .ok()
            .map(|_| n.name.clone())
    })
}

/// Why a QUIC handshake with a peer did not give a usable connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// This side's TLS refused the peer (no certificate, not from the cluster CA, wrong name):
    /// a security event, worth a warning.
    Refused(String),
    /// The peer's TLS refused this side's certificate (another CA, another name).
    RefusedByPeer(String),
    /// The peer went away or was too slow (it gave up, a timeout, a reset): not a refusal. A
    /// node that resumes after a pause finds many of these, from clients that gave up long ago.
    GaveUp(String),
}

impl std::fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeFailure::Refused(r) => write!(f, "{r}"),
            HandshakeFailure::RefusedByPeer(r) => {
                write!(f, "the peer refused this node's certificate: {r}")
            }
            HandshakeFailure::GaveUp(r) => write!(f, "handshake not completed: {r}"),
        }
    }
}

/// QUIC reserves transport error codes 0x100..0x1ff for TLS alerts.
fn is_tls_alert(code: u64) -> bool {
    (0x100..0x200).contains(&code)
}

/// Classifies a failed handshake (on either side), with the reason in words.
pub fn classify_handshake(e: &quinn::ConnectionError) -> HandshakeFailure {
    use quinn::ConnectionError as E;
    match e {
        E::TransportError(t) if is_tls_alert(u64::from(t.code)) => {
            HandshakeFailure::Refused(tls_reason(&t.reason, u64::from(t.code)))
        }
        E::ConnectionClosed(c) if is_tls_alert(u64::from(c.error_code)) => {
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            HandshakeFailure::RefusedByPeer(tls_reason(&reason, u64::from(c.error_code)))
        }
        E::TransportError(t) => HandshakeFailure::Refused(format!("protocol error: {t}")),
        other => HandshakeFailure::GaveUp(other.to_string()),
    }
}

/// The reason rustls gives, in an operator's words where it is a known case.
fn tls_reason(reason: &str, code: u64) -> String {
    let alert = code & 0xff;
    let plain = if reason.contains("UnknownIssuer") || reason.contains("BadSignature") {
        "the certificate is not from the cluster CA"
    } else if reason.contains("NotValidForName") {
        "the certificate does not name the node dialled"
    } else if reason.contains("Expired") {
        "the certificate has expired"
    } else if reason.contains("NotValidYet") {
        "the certificate is not valid yet (clock?)"
    } else if reason.contains("no certificates") || reason.contains("NoCertificatesPresented") {
        "no client certificate was presented"
    } else if reason.is_empty() {
        return format!("TLS alert {alert}");
    } else {
        return format!("TLS alert {alert}: {reason}");
    };
    format!("{plain} (TLS alert {alert})")
}

/// Remembers refusals already logged, so that a peer that keeps trying is logged once (and
/// then once an hour, with the number of attempts since), not once per attempt.
#[derive(Debug, Default)]
pub struct RefusalLog {
    seen: std::sync::Mutex<std::collections::HashMap<(String, String), (std::time::Instant, u64)>>,
}

impl RefusalLog {
    /// How long a logged refusal stays quiet.
    pub const QUIET: std::time::Duration = std::time::Duration::from_secs(3600);
    /// At most this many distinct refusals are remembered (older ones are forgotten).
    const MAX: usize = 1024;

    /// Notes a refusal of `who` (an address or a node name) for `reason`. `Some(n)`: log it
    /// now, `n` similar refusals having been kept quiet since the last line; `None`: already
    /// logged within [`RefusalLog::QUIET`].
    pub fn note(&self, who: &str, reason: &str) -> Option<u64> {
        self.note_at(who, reason, std::time::Instant::now())
    }

    fn note_at(&self, who: &str, reason: &str, now: std::time::Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let key = (who.to_string(), reason.to_string());
        if let Some((at, quiet)) = seen.get_mut(&key) {
            if now.duration_since(*at) < Self::QUIET {
                *quiet += 1;
                return None;
            }
            let n = *quiet;
            *at = now;
            *quiet = 0;
            return Some(n);
        }
        if seen.len() >= Self::MAX {
            seen.retain(|_, (at, _)| now.duration_since(*at) < Self::QUIET);
            if seen.len() >= Self::MAX {
                seen.clear();
            }
        }
        seen.insert(key, (now, 0));
        Some(0)
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    #[test]
    fn a_refusal_is_logged_once_then_once_per_quiet_period_with_a_count() {
        let log = RefusalLog::default();
        let t0 = std::time::Instant::now();
        assert_eq!(log.note_at("192.0.2.9", "not from the CA", t0), Some(0));
        for _ in 0..26 {
            assert_eq!(log.note_at("192.0.2.9", "not from the CA", t0), None);
        }
        // Another peer, or another reason, is logged at once.
        assert_eq!(log.note_at("192.0.2.10", "not from the CA", t0), Some(0));
        assert_eq!(log.note_at("192.0.2.9", "no certificate", t0), Some(0));
        let later = t0 + RefusalLog::QUIET;
        assert_eq!(log.note_at("192.0.2.9", "not from the CA", later), Some(26));
    }

    #[test]
    fn tls_reasons_are_put_in_words() {
        assert_eq!(
            tls_reason("invalid peer certificate: UnknownIssuer", 0x12a),
            "the certificate is not from the cluster CA (TLS alert 42)"
        );
        assert_eq!(
            tls_reason("peer sent no certificates", 0x174),
            "no client certificate was presented (TLS alert 116)"
        );
        assert_eq!(tls_reason("", 0x128), "TLS alert 40");
    }
}
