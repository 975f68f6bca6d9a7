//! Inspecting this node's TLS files before they are used: `txmap check-config`, `txmapd` at
//! start and `txmap check` all ask the same questions (does the certificate parse, chain to the
//! cluster CA, match the key, name this node, and when does it expire?).
//!
//! The handshake itself would catch most of these, but only when a peer connects, and with a
//! message about the peer: an operator needs them named by config key, before the daemon runs.

use rustls::pki_types::{CertificateDer, UnixTime};
use std::path::Path;
use x509_parser::extensions::GeneralName;

/// One problem with the TLS files, named by the config key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertProblem {
    /// Config key (`tls.cert`, `tls.key`, `tls.ca`).
    pub key: &'static str,
    /// What is wrong.
    pub detail: String,
}

fn problem(key: &'static str, detail: impl Into<String>) -> CertProblem {
    CertProblem {
        key,
        detail: detail.into(),
    }
}

/// Every certificate (DER) in a PEM file.
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in file", path.display()));
    }
    Ok(certs)
}

/// When a certificate (DER) stops being valid, in ms since the Unix epoch (0 if before it).
pub fn not_after_ms(der: &[u8]) -> Result<u64, String> {
    let (_, c) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok((c.validity().not_after.timestamp().max(0) as u64).saturating_mul(1000))
}

/// Expiry (ms since the epoch) of the certificate a connected peer presented.
pub fn peer_not_after_ms(conn: &quinn::Connection) -> Option<u64> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    not_after_ms(chain.first()?).ok()
}

/// Expiry (ms since the epoch) of the first certificate in a PEM file.
pub fn file_not_after_ms(path: &Path) -> Result<u64, String> {
    let certs = read_pem_certs(path)?;
    not_after_ms(&certs[0]).map_err(|e| format!("{}: {e}", path.display()))
}

/// Checks the CA certificate, the node's certificate and its key, as `node` at `now_ms`:
/// parse, chain to the CA, key matches, name matches, not expired; and the key file's mode
/// (no access for group or others). Returns every problem found.
pub fn check_node_tls(
    ca: &Path,
    cert: &Path,
    key: &Path,
    node: &str,
    now_ms: u64,
) -> Vec<CertProblem> {
    let mut out = Vec::new();
    let ca_der = match read_pem_certs(ca) {
        Ok(v) => Some(v[0].clone()),
        Err(e) => {
            out.push(problem("tls.ca", e));
            None
        }
    };
    if let Some(d) = &ca_der {
        match x509_parser::parse_x509_certificate(d) {
            Err(e) => out.push(problem(
                "tls.ca",
                format!("{}: not an X.509 certificate: {e}", ca.display()),
            )),
            Ok((_, c)) if !c.is_ca() => out.push(problem(
                "tls.ca",
                format!("{}: not a CA certificate", ca.display()),
            )),
            Ok(_) => {}
        }
    }
    let cert_der = match read_pem_certs(cert) {
        Ok(v) => Some(v[0].clone()),
        Err(e) => {
            out.push(problem("tls.cert", e));
            None
        }
    };
    let parsed = cert_der
        .as_ref()
        .and_then(|d| match x509_parser::parse_x509_certificate(d) {
            Ok((_, c)) => Some(c),
            Err(e) => {
                out.push(problem(
                    "tls.cert",
                    format!("{}: not an X.509 certificate: {e}", cert.display()),
                ));
                None
            }
        });
    if let Some(c) = &parsed {
        let names: Vec<String> = c
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|g| match g {
                        GeneralName::DNSName(n) => Some(n.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !names.iter().any(|n| n.eq_ignore_ascii_case(node)) {
            out.push(problem(
                "tls.cert",
                format!(
                    "{} names {} but this node is `{node}` (key `node`): peers would refuse it",
                    cert.display(),
                    if names.is_empty() {
                        "no DNS name".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            ));
        }
        let end = c.validity().not_after.timestamp().max(0) as u64 * 1000;
        if end <= now_ms {
            out.push(problem(
                "tls.cert",
                format!(
                    "{} expired on {}",
                    cert.display(),
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(end)
                    )
                ),
            ));
        }
    }
    // Chain to the CA (signature, validity, usage), as a peer would check it.
    if let (Some(ca_der), Some(cert_der)) = (&ca_der, &cert_der) {
        if let (Ok(anchor), Ok(ee)) = (
            webpki::anchor_from_trusted_cert(ca_der),
            webpki::EndEntityCert::try_from(cert_der),
        ) {
            let time = UnixTime::since_unix_epoch(std::time::Duration::from_millis(now_ms));
            let anchors = [anchor];
            let r = ee.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &[],
                time,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            );
            let r = r.map(|_| ());
            match r {
                Ok(()) => {}
                Err(webpki::Error::CertExpired { .. }) => {} // reported above
                Err(webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey) => out.push(
                    problem(
                        "tls.cert",
                        format!(
                            "{} is not issued by the CA in {} (key `tls.ca`): peers would refuse it",
                            cert.display(),
                            ca.display()
                        ),
                    ),
                ),
                Err(e) => out.push(problem(
                    "tls.cert",
                    format!(
                        "{} does not verify against the CA in {}: {e}",
                        cert.display(),
                        ca.display()
                    ),
                )),
            }
        }
    }
    // The key: readable, PEM, only for its owner, and the certificate's.
    match std::fs::read(key) {
        Err(e) => out.push(problem(
            "tls.key",
            format!("cannot read {}: {e}", key.display()),
        )),
        Ok(pem) => {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(key) {
                let mode = m.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    out.push(problem(
                        "tls.key",
                        format!(
                            "{} is mode {mode:04o}: a private key must be readable by its owner only (chmod 0600)",
                            key.display()
                        ),
                    ));
                }
            }
            let text = String::from_utf8_lossy(&pem);
            match rcgen::KeyPair::from_pem(&text) {
                Err(e) => out.push(problem(
                    "tls.key",
                    format!("{}: not a usable private key: {e}", key.display()),
                )),
                Ok(kp) => {
                    if let Some(c) = &parsed {
                        if kp.public_key_raw() != &*c.public_key().subject_public_key.data {
                            out.push(problem(
                                "tls.key",
                                format!(
                                    "{} is not the key of the certificate {} (key `tls.cert`)",
                                    key.display(),
                                    cert.display()
                                ),
                            ));
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_node_certificate_has_no_problem_and_a_foreign_one_is_named() {
        let dir =
            std::env::temp_dir().join(format!("txmap-certs-{}", crate::proto::TxId::random()));
        let ca = dir.join("ca");
        let other = dir.join("other");
        crate::tls::init_ca(&ca).unwrap();
        crate::tls::init_ca(&other).unwrap();
        crate::tls::issue_node(&ca, "node1", &dir.join("a")).unwrap();
        crate::tls::issue_node(&other, "node1", &dir.join("b")).unwrap();
        let now = crate::now_ms();
        let good = check_node_tls(
            &ca.join("ca.pem"),
            &dir.join("a/node1.pem"),
            &dir.join("a/node1.key"),
            "node1",
            now,
        );
        assert!(good.is_empty(), "{good:?}");
        let wrong_name = check_node_tls(
            &ca.join("ca.pem"),
            &dir.join("a/node1.pem"),
            &dir.join("a/node1.key"),
            "node2",
            now,
        );
        assert_eq!(wrong_name.len(), 1, "{wrong_name:?}");
        assert!(
            wrong_name[0].detail.contains("names node1"),
            "{wrong_name:?}"
        );
        let foreign = check_node_tls(
            &ca.join("ca.pem"),
            &dir.join("b/node1.pem"),
            &dir.join("a/node1.key"),
            "node1",
            now,
        );
        let all: Vec<_> = foreign.iter().map(|p| p.detail.clone()).collect();
        assert!(
            all.iter().any(|d| d.contains("not issued by the CA")),
            "{all:?}"
        );
        assert!(all.iter().any(|d| d.contains("not the key")), "{all:?}");
        assert!(file_not_after_ms(&dir.join("a/node1.pem")).unwrap() > now);
        let _ = std::fs::remove_dir_all(dir);
    }
}
