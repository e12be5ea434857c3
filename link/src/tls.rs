//! Mutual TLS for the link: rustls configurations for both ends and the client check that
//! follows the handshake.
//!
//! The GSM agent is the TLS server, the mail host the TLS client. Both present a certificate
//! issued by the operator's CA, and there is no plaintext mode:
//!
//! - only TLS 1.3 is offered or accepted, with the ring crypto provider;
//! - the agent ([`server_config`]) requires a client certificate that chains to its configured
//!   CA (rustls `WebPkiClientVerifier`), and after the handshake [`authorize_client`] checks the
//!   certificate's names (DNS SANs, then CN) against an optional allow-list;
//! - the mail host ([`client_config`]) trusts only the CA file it is given (no system roots) and
//!   checks the agent's name, passed as the [`ServerName`] to the connector
//!   (see [`agent_server_name`]);
//! - both sides offer the ALPN protocol [`ALPN`].
//!
//! Certificates and keys are PEM files (keys in PKCS#8, SEC1 or PKCS#1 form). Every error that
//! comes from a file names it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ResolvesServerCert, VerifierBuilderError, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig, ServerConnection, SupportedProtocolVersion,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// The ALPN protocol name both ends offer.
pub const ALPN: &[u8] = b"mailbell/1";

/// The only protocol version the link speaks.
const VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The agent's (TLS server's) certificate files.
#[derive(Clone, Debug)]
pub struct ServerTlsFiles {
    /// PEM file with the CA certificate(s) that client certificates must chain to.
    pub ca: PathBuf,
    /// PEM file with the agent's certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with the agent's private key.
    pub key: PathBuf,
    /// Client names (DNS SAN or CN, ASCII case-insensitive) allowed to connect; empty means any
    /// certificate issued by the CA.
    pub allowed_client_names: Vec<String>,
}

/// The mail host's (TLS client's) certificate files.
#[derive(Clone, Debug)]
pub struct ClientTlsFiles {
    /// PEM file with the CA certificate(s) the agent's certificate must chain to.
    pub ca: PathBuf,
    /// PEM file with the mail host's certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with the mail host's private key.
    pub key: PathBuf,
}

/// Errors from building TLS configurations or authorizing a client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file has a malformed PEM section.
    #[error("invalid PEM in {}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    /// A certificate file holds no `CERTIFICATE` section.
    #[error("no certificates in {}", path.display())]
    NoCertificates { path: PathBuf },
    /// A key file holds no private key section.
    #[error("no private key in {}", path.display())]
    NoKey { path: PathBuf },
    /// A CA file holds a certificate that cannot be used as a trust anchor.
    #[error("unusable CA certificate in {}", path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// A certificate and key that cannot be used together (mismatch, unsupported key type).
    #[error("cannot use certificate {} with key {}", cert.display(), key.display())]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the configuration.
    #[error("invalid tls configuration")]
    Rustls(#[source] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("cannot build the client certificate verifier")]
    Verifier(#[source] VerifierBuilderError),
    /// The client's certificate chains to the CA but none of its names is allowed.
    #[error("client certificate names {names:?} are not in the allowed list")]
    ClientNotAllowed { names: Vec<String> },
    /// The connection carries no client certificate (the handshake is not complete).
    #[error("client presented no certificate")]
    NoPeerCertificate,
    /// The client's certificate could not be parsed.
    #[error("client certificate cannot be parsed: {0}")]
    BadPeerCertificate(String),
    /// A certificate file's first certificate cannot be parsed.
    #[error("certificate in {} cannot be parsed: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    /// The agent name is neither a DNS name nor an IP address.
    #[error("invalid agent name {name:?}")]
    InvalidServerName { name: String },
}

/// The crypto provider used on both ends (ring), independent of any process default.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Loads every certificate in a PEM file; at least one is required.
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// When the first certificate in a PEM file expires (`notAfter`), in Unix seconds. Both
/// daemons report it for each of their TLS files as
/// `mailbell_tls_cert_expiry_timestamp_seconds`, read again at every scrape so that a rotated
/// file shows at once.
pub fn cert_not_after(path: &Path) -> Result<i64, TlsError> {
    let certs = load_certs(path)?;
    let bad = |reason: String| TlsError::BadCertificate {
        path: path.to_owned(),
        reason,
    };
    let first = certs.first().ok_or_else(|| bad("no certificate".into()))?;
    let (_, x509) = x509_parser::parse_x509_certificate(first).map_err(|e| bad(e.to_string()))?;
    Ok(x509.validity().not_after.timestamp())
}

/// Certificates a server holds in memory and swaps on reload (the retrieval proxy's): the
/// expiry metric reports those it serves, not what a file holds now, so a replacement that did
/// not load leaves the old (served) expiry in place.
pub trait ServedCertificates: std::fmt::Debug + Send + Sync {
    /// The `file` label and `notAfter` (Unix seconds) of each certificate served.
    fn expiries(&self) -> Vec<(String, i64)>;
}

/// Exposes `mailbell_tls_cert_expiry_timestamp_seconds{file=...}` for each certificate file
/// (`file` is the role: "ca", "cert"), read again at every scrape so that a rotated file shows
/// at once; a file that cannot be read is left out and logged at debug (the missing series is
/// what an alert sees). `served` adds the certificates a reloading server holds.
#[derive(Debug, Clone, Default)]
pub struct CertExpiryCollector {
    pub files: Vec<(&'static str, PathBuf)>,
    pub served: Vec<Arc<dyn ServedCertificates>>,
}

impl crate::metrics::Collector for CertExpiryCollector {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        let files = self
            .files
            .iter()
            .filter_map(|(role, path)| match cert_not_after(path) {
                Ok(t) => Some(([("file", (*role).to_owned())], t)),
                Err(e) => {
                    tracing::debug!(error = %e, role, "certificate expiry not reported");
                    None
                }
            });
        let served = self
            .served
            .iter()
            .flat_map(|s| s.expiries())
            .map(|(role, t)| ([("file", role)], t));
        crate::metrics::gauge_family(
            &mut enc,
            "mailbell_tls_cert_expiry_timestamp_seconds",
            "When a TLS certificate expires (notAfter, Unix seconds).",
            files.chain(served),
        )
    }
}

/// Loads the first private key in a PEM file.
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        source => TlsError::Pem {
            path: path.to_owned(),
            source,
        },
    })
}

/// Loads a CA file as the only trust anchors.
fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// The agent's configuration: TLS 1.3 only, a client certificate issued by `files.ca` required,
/// ALPN [`ALPN`]. The name allow-list is not part of it: call [`authorize_client`] after the
/// handshake.
pub fn server_config(files: &ServerTlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let roots = Arc::new(load_roots(&files.ca)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider))
        .build()
        .map_err(TlsError::Verifier)?;
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(TlsError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Identity {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// A public-facing TLS server (the retrieval proxy's POP3/IMAP listeners): TLS 1.2 and 1.3 with
/// the ring provider, no client certificate, one certificate chain and key from PEM files (for
/// example the ones certbot manages). Unlike the link, mail clients still speak TLS 1.2.
pub fn public_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(cert)?;
    let private = load_key(key)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Rustls)?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|source| TlsError::Identity {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        })?;
    Ok(Arc::new(config))
}

/// A public-facing TLS server like [`public_server_config`] whose certificate `resolver`
/// chooses for each handshake (by SNI, and swapped on reload by its owner).
pub fn public_server_config_resolving(
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Rustls)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    Ok(Arc::new(config))
}

/// A TLS client to a server that has no client certificate to check (the retrieval proxy to
/// its backend): TLS 1.2 and 1.3, only the CAs in `ca` trusted (a private CA, or the system's
/// bundle file for a public one).
pub fn public_client_config(ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Rustls)?
        .with_root_certificates(load_roots(ca)?)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A certificate chain and its private key from PEM files, checked to belong together (the
/// key's public half is the leaf's), ready for a certificate resolver.
pub fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let certs = load_certs(cert)?;
    let private = load_key(key)?;
    let identity = |source| TlsError::Identity {
        cert: cert.to_owned(),
        key: key.to_owned(),
        source,
    };
    let signing = provider()
        .key_provider
        .load_private_key(private)
        .map_err(identity)?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(identity)?;
    Ok(certified)
}

/// A leaf certificate's DNS names (subjectAltName dNSName entries, lowercase) and its
/// `notAfter` in Unix seconds; `path` names the file in the error.
pub fn leaf_facts(cert: &CertificateDer<'_>, path: &Path) -> Result<(Vec<String>, i64), TlsError> {
    let bad = |reason: String| TlsError::BadCertificate {
        path: path.to_owned(),
        reason,
    };
    let (_, x509) = x509_parser::parse_x509_certificate(cert).map_err(|e| bad(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| bad(e.to_string()))?;
    let names = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect();
    Ok((names, x509.validity().not_after.timestamp()))
}

/// The mail host's configuration: TLS 1.3 only, only `files.ca` trusted, the client
/// certificate presented, ALPN [`ALPN`]. The agent's name is checked against the
/// [`ServerName`] given to the connector.
pub fn client_config(files: &ClientTlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(&files.ca)?;
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(TlsError::Rustls)?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|source| TlsError::Identity {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Parses the agent's name (a DNS name or an IP address) as configured on the mail host, for
/// `tokio_rustls::TlsConnector::connect`.
pub fn agent_server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::InvalidServerName {
        name: name.to_owned(),
    })
}

/// After the handshake: the client's certificate names (DNS SANs, then CN), checked against
/// the allowed list. Returns the name to log: the allowed name that matched, or with an empty
/// list the first name (the subject if the certificate has no name).
pub fn authorize_client(conn: &ServerConnection, allowed: &[String]) -> Result<String, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    let (names, subject) = certificate_names(leaf)?;
    if allowed.is_empty() {
        return Ok(names.into_iter().next().unwrap_or(subject));
    }
    names
        .iter()
        .find(|name| allowed.iter().any(|a| a.eq_ignore_ascii_case(name)))
        .cloned()
        .ok_or(TlsError::ClientNotAllowed { names })
}

/// The names in a certificate, DNS SANs first, then CNs, without duplicates; and the subject
/// as text.
fn certificate_names(cert: &CertificateDer<'_>) -> Result<(Vec<String>, String), TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::BadPeerCertificate(e.to_string()))?;
    Ok((names_of(&x509)?, x509.subject().to_string()))
}

fn names_of(x509: &X509Certificate<'_>) -> Result<Vec<String>, TlsError> {
    let mut names: Vec<String> = Vec::new();
    let san = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::BadPeerCertificate(e.to_string()))?;
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    for cn in x509.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            names.push(cn.to_owned());
        }
    }
    let mut unique: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        if !unique.iter().any(|u| u.eq_ignore_ascii_case(&name)) {
            unique.push(name);
        }
    }
    Ok(unique)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::pki::{ensure_dev_pki, issue_client_cert, DevPkiPaths};
    use rustls::{ClientConnection, ProtocolVersion};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const BOUND: Duration = Duration::from_secs(10);

    fn dev_pki() -> (tempfile::TempDir, DevPkiPaths) {
        let dir = tempfile::tempdir().unwrap();
        let names = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        let paths = ensure_dev_pki(dir.path(), &names, "mailhost", false).unwrap();
        (dir, paths)
    }

    #[test]
    fn cert_expiry_is_reported_per_file() {
        let (_dir, p) = dev_pki();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let leaf = cert_not_after(&p.agent_cert).unwrap();
        assert!(leaf > now + 86_400, "{leaf} vs {now}");
        let out = crate::metrics::encode_one(CertExpiryCollector {
            files: vec![
                ("cert", p.agent_cert.clone()),
                ("ca", PathBuf::from("/nonexistent")),
            ],
            ..Default::default()
        });
        assert!(
            out.contains(&format!(
                "mailbell_tls_cert_expiry_timestamp_seconds{{file=\"cert\"}} {leaf}\n"
            )),
            "{out}"
        );
        assert!(!out.contains("file=\"ca\""), "{out}");

        // Read again at every scrape: a rotated file shows at once.
        let rotated = p.dir.join("rotated.pem");
        std::fs::copy(&p.agent_cert, &rotated).unwrap();
        let collector = CertExpiryCollector {
            files: vec![("cert", rotated.clone())],
            ..Default::default()
        };
        let line =
            |t: i64| format!("mailbell_tls_cert_expiry_timestamp_seconds{{file=\"cert\"}} {t}\n");
        assert!(crate::metrics::encode_one(collector.clone()).contains(&line(leaf)));
        std::fs::copy(&p.ca_cert, &rotated).unwrap();
        let ca = cert_not_after(&p.ca_cert).unwrap();
        assert_ne!(ca, leaf);
        assert!(crate::metrics::encode_one(collector).contains(&line(ca)));
    }

    type ServerStream = tokio_rustls::server::TlsStream<tokio::io::DuplexStream>;
    type ClientStream = tokio_rustls::client::TlsStream<tokio::io::DuplexStream>;

    /// Runs both handshakes over an in-memory pipe.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        agent_name: &str,
    ) -> (io::Result<ServerStream>, io::Result<ClientStream>) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let name = agent_server_name(agent_name).unwrap();
        let accept = TlsAcceptor::from(server).accept(s);
        let connect = TlsConnector::from(client).connect(name, c);
        tokio::time::timeout(BOUND, async { tokio::join!(accept, connect) })
            .await
            .expect("handshake timed out")
    }

    /// A client whose handshake "succeeded" (TLS 1.3 finishes before the server has judged the
    /// client certificate) must then see the server's rejection on its first read.
    async fn assert_client_refused(client: io::Result<ClientStream>) {
        if let Ok(mut stream) = client {
            let _ = stream.write_all(b"hello\n").await;
            let mut buf = [0u8; 16];
            let read = tokio::time::timeout(BOUND, stream.read(&mut buf))
                .await
                .expect("read timed out");
            assert!(
                matches!(read, Err(_) | Ok(0)),
                "client read data from a server that should have refused it: {read:?}"
            );
        }
    }

    /// The rustls error inside a handshake's I/O error.
    fn rustls_error(err: &io::Error) -> &rustls::Error {
        err.get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .unwrap_or_else(|| panic!("not a rustls error: {err:?}"))
    }

    fn config_pair(
        paths: &DevPkiPaths,
        allowed: Vec<String>,
    ) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        (
            server_config(&paths.server_files(allowed)).unwrap(),
            client_config(&paths.client_files()).unwrap(),
        )
    }

    #[test]
    fn configs_build_from_dev_pki_files() {
        let (_dir, paths) = dev_pki();
        let (server, client) = config_pair(&paths, vec![]);
        assert_eq!(server.alpn_protocols, vec![ALPN.to_vec()]);
        assert_eq!(client.alpn_protocols, vec![ALPN.to_vec()]);
    }

    #[test]
    fn missing_file_error_names_the_file() {
        let (dir, paths) = dev_pki();
        let mut files = paths.client_files();
        files.cert = dir.path().join("nope.pem");
        let err = client_config(&files).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.pem"), "{err}");
        assert_eq!(
            err.to_string(),
            format!("cannot read {}", files.cert.display())
        );
    }

    #[test]
    fn garbage_pem_errors_name_the_file() {
        let (dir, paths) = dev_pki();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "this is not a certificate\n").unwrap();

        let mut files = paths.server_files(vec![]);
        files.ca = garbage.clone();
        let err = server_config(&files).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificates { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("no certificates in {}", garbage.display())
        );

        let mut files = paths.client_files();
        files.key = garbage.clone();
        let err = client_config(&files).unwrap_err();
        assert!(matches!(err, TlsError::NoKey { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("no private key in {}", garbage.display())
        );

        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let mut files = paths.client_files();
        files.cert = broken.clone();
        let err = client_config(&files).unwrap_err();
        assert!(matches!(err, TlsError::Pem { .. }), "{err:?}");
        assert!(err.to_string().contains("broken.pem"), "{err}");
    }

    #[test]
    fn mismatched_key_is_reported_with_both_files() {
        let (_dir, paths) = dev_pki();
        let mut files = paths.client_files();
        files.key = paths.agent_key.clone();
        let err = client_config(&files).unwrap_err();
        assert!(matches!(err, TlsError::Identity { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("mailhost.pem") && msg.contains("agent.key"),
            "{msg}"
        );
    }

    #[test]
    fn agent_names_parse() {
        assert!(agent_server_name("localhost").is_ok());
        assert!(agent_server_name("127.0.0.1").is_ok());
        assert!(matches!(
            agent_server_name("not a name"),
            Err(TlsError::InvalidServerName { .. })
        ));
    }

    #[test]
    fn names_are_dns_sans_then_cn() {
        let (_dir, paths) = dev_pki();
        let cert = CertificateDer::from_pem_file(&paths.agent_cert).unwrap();
        let (names, subject) = certificate_names(&cert).unwrap();
        // The IP SAN is not a client name; the CN (first agent name) is a duplicate.
        assert_eq!(names, vec!["localhost".to_owned()]);
        assert!(subject.contains("localhost"), "{subject}");
    }

    #[tokio::test]
    async fn good_client_is_authorized() {
        let (_dir, paths) = dev_pki();
        let (server, client) = config_pair(&paths, vec![]);
        let (s, c) = handshake(server, client, "localhost").await;
        let mut s = s.unwrap();
        let mut c = c.unwrap();
        let conn = s.get_ref().1;
        assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        assert_eq!(conn.alpn_protocol(), Some(ALPN));
        assert_eq!(authorize_client(conn, &[]).unwrap(), "mailhost");
        assert_eq!(
            authorize_client(conn, &["other".to_owned(), "MailHost".to_owned()]).unwrap(),
            "mailhost"
        );
        let cconn: &ClientConnection = c.get_ref().1;
        assert_eq!(cconn.alpn_protocol(), Some(ALPN));

        c.write_all(b"ping\n").await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping\n");
    }

    #[tokio::test]
    async fn client_reaches_agent_by_ip() {
        let (_dir, paths) = dev_pki();
        let (server, client) = config_pair(&paths, vec![]);
        let (s, c) = handshake(server, client, "127.0.0.1").await;
        s.unwrap();
        c.unwrap();
    }

    #[tokio::test]
    async fn client_from_another_ca_is_refused() {
        let (_dir, paths) = dev_pki();
        let (_rogue_dir, rogue) = dev_pki();
        // The rogue client trusts the real CA (so it would accept the agent) but its own
        // certificate comes from another CA.
        let mut files = rogue.client_files();
        files.ca = paths.ca_cert.clone();
        let client = client_config(&files).unwrap();
        let server = server_config(&paths.server_files(vec![])).unwrap();
        let (s, c) = handshake(server, client, "localhost").await;
        let err = s.unwrap_err();
        assert!(
            matches!(
                rustls_error(&err),
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{err}"
        );
        assert_client_refused(c).await;
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let (_dir, paths) = dev_pki();
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&paths.ca_cert).unwrap())
            .unwrap();
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server = server_config(&paths.server_files(vec![])).unwrap();
        let (s, c) = handshake(server, Arc::new(client), "localhost").await;
        assert!(s.is_err());
        assert_client_refused(c).await;
    }

    #[tokio::test]
    async fn tls12_client_is_refused() {
        let (_dir, paths) = dev_pki();
        let files = paths.client_files();
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&files.ca).unwrap())
            .unwrap();
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(&files.cert).unwrap()],
                PrivateKeyDer::from_pem_file(&files.key).unwrap(),
            )
            .unwrap();
        let server = server_config(&paths.server_files(vec![])).unwrap();
        let (s, c) = handshake(server, Arc::new(client), "localhost").await;
        assert!(s.is_err());
        assert!(c.is_err());
    }

    #[tokio::test]
    async fn client_not_in_allowed_list_is_refused() {
        let (_dir, paths) = dev_pki();
        let (server, client) = config_pair(&paths, vec![]);
        let (s, c) = handshake(server, client, "localhost").await;
        let s = s.unwrap();
        c.unwrap();
        let err = authorize_client(s.get_ref().1, &["relay.example".to_owned()]).unwrap_err();
        match &err {
            TlsError::ClientNotAllowed { names } => assert_eq!(names, &vec!["mailhost".to_owned()]),
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("mailhost"), "{err}");
    }

    #[tokio::test]
    async fn second_client_name_is_authorized_by_name() {
        let (dir, paths) = dev_pki();
        let (cert, key) = issue_client_cert(&paths, "relay2").unwrap();
        assert_eq!(cert, dir.path().join("relay2.pem"));
        let files = ClientTlsFiles {
            ca: paths.ca_cert.clone(),
            cert,
            key,
        };
        let client = client_config(&files).unwrap();
        let allowed = vec!["relay2".to_owned()];
        let server = server_config(&paths.server_files(allowed.clone())).unwrap();
        let (s, c) = handshake(server, client, "localhost").await;
        let s = s.unwrap();
        c.unwrap();
        assert_eq!(authorize_client(s.get_ref().1, &allowed).unwrap(), "relay2");
        assert!(matches!(
            authorize_client(s.get_ref().1, &["mailhost".to_owned()]),
            Err(TlsError::ClientNotAllowed { .. })
        ));
    }

    #[tokio::test]
    async fn client_checking_the_wrong_agent_name_refuses() {
        let (_dir, paths) = dev_pki();
        let (server, client) = config_pair(&paths, vec![]);
        let (s, c) = handshake(server, client, "wrong.example").await;
        let err = c.unwrap_err();
        assert!(
            matches!(
                rustls_error(&err),
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{err}"
        );
        assert!(s.is_err());
    }

    #[tokio::test]
    async fn client_with_another_ca_refuses_the_agent() {
        let (_dir, paths) = dev_pki();
        let (_rogue_dir, rogue) = dev_pki();
        let mut files = paths.client_files();
        files.ca = rogue.ca_cert.clone();
        let client = client_config(&files).unwrap();
        let server = server_config(&paths.server_files(vec![])).unwrap();
        let (s, c) = handshake(server, client, "localhost").await;
        let err = c.unwrap_err();
        assert!(
            matches!(
                rustls_error(&err),
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{err}"
        );
        assert!(s.is_err());
    }
}
