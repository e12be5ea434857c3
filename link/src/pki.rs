//! A development PKI, so a first run works with no manual certificate work.
//!
//! [`ensure_dev_pki`] writes into one directory:
//!
//! ```text
//! ca.pem        ca.key        the dev CA (CN "mailbell dev CA <random hex>"), valid 10 years
//! agent.pem     agent.key     the GSM agent (serverAuth, SANs = the agent names), valid 2 years
//! mailhost.pem  mailhost.key  the mail host (clientAuth, DNS SAN and CN = the client name), 2 years
//! ```
//!
//! All keys are ECDSA P-256, written with mode 0600 (a new directory gets 0700). Certificates
//! are valid from one day before generation, to tolerate clock skew between hosts; the CA for
//! [`CA_VALIDITY_DAYS`] days and leaves for [`LEAF_VALIDITY_DAYS`] days. Existing files are
//! kept unless `force` is set; a missing leaf is re-issued by the existing CA, and a missing CA
//! means a new CA and new leaves. Production deployments should use the operator's own CA:
//! every TLS setting takes plain PEM paths.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::DnsName;
use tracing::info;

use crate::tls::{ClientTlsFiles, ServerTlsFiles};

/// How long the dev CA is valid: 10 years.
pub const CA_VALIDITY_DAYS: u64 = 3653;
/// How long a dev leaf certificate (agent or mail host) is valid: 2 years.
pub const LEAF_VALIDITY_DAYS: u64 = 731;
/// How far back `notBefore` is set, to tolerate clock skew between the two hosts.
const BACKDATE: Duration = Duration::from_secs(24 * 3600);
const DAY: u64 = 24 * 3600;

/// The CA's common name; a random suffix follows, so two dev CAs never share a subject (a
/// certificate from the other one is then an unknown issuer, not a bad signature).
const CA_NAME: &str = "mailbell dev CA";

/// The files of a dev PKI directory.
#[derive(Clone, Debug)]
pub struct DevPkiPaths {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub agent_cert: PathBuf,
    pub agent_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl DevPkiPaths {
    /// The standard file names in `dir` (nothing is read or written).
    pub fn in_dir(dir: &Path) -> Self {
        DevPkiPaths {
            dir: dir.to_owned(),
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            agent_cert: dir.join("agent.pem"),
            agent_key: dir.join("agent.key"),
            client_cert: dir.join("mailhost.pem"),
            client_key: dir.join("mailhost.key"),
        }
    }

    /// Whether all six files exist.
    pub fn exists(&self) -> bool {
        self.all().iter().all(|p| p.is_file())
    }

    /// The agent's TLS files, accepting the given client names (empty = any from the CA).
    pub fn server_files(&self, allowed: Vec<String>) -> ServerTlsFiles {
        ServerTlsFiles {
            ca: self.ca_cert.clone(),
            cert: self.agent_cert.clone(),
            key: self.agent_key.clone(),
            allowed_client_names: allowed,
        }
    }

    /// The mail host's TLS files.
    pub fn client_files(&self) -> ClientTlsFiles {
        ClientTlsFiles {
            ca: self.ca_cert.clone(),
            cert: self.client_cert.clone(),
            key: self.client_key.clone(),
        }
    }

    fn all(&self) -> [&PathBuf; 6] {
        [
            &self.ca_cert,
            &self.ca_key,
            &self.agent_cert,
            &self.agent_key,
            &self.client_cert,
            &self.client_key,
        ]
    }
}

/// Errors from generating or loading the dev PKI.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error("cannot create directory {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A CA certificate or key file that rcgen cannot parse.
    #[error("cannot load {}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("the CA key {} does not belong to the CA certificate {}", key.display(), cert.display())]
    CaKeyMismatch { cert: PathBuf, key: PathBuf },
    /// A name that is neither a valid DNS name nor (for the agent) an IP address.
    #[error("invalid certificate name {name:?}")]
    InvalidName { name: String },
    /// The name would overwrite one of the dev PKI's own files.
    #[error("certificate name {name:?} clashes with a dev PKI file")]
    ReservedName { name: String },
    #[error("no agent names given")]
    NoAgentNames,
    #[error("cannot generate the {what} certificate")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
}

/// The CA, loaded or fresh, ready to sign.
struct Ca {
    cert: Certificate,
    key: KeyPair,
}

/// Creates (or, unless `force`, keeps existing) ca.pem/ca.key, agent.pem/agent.key
/// (serverAuth, SANs = `agent_names`, e.g. `["localhost", "127.0.0.1"]`; IPs become IP SANs,
/// the first name is the CN), mailhost.pem/mailhost.key (clientAuth, DNS SAN and CN =
/// `client_name`). See the module docs for key type, modes and validity.
pub fn ensure_dev_pki(
    dir: &Path,
    agent_names: &[String],
    client_name: &str,
    force: bool,
) -> Result<DevPkiPaths, PkiError> {
    let agent_sans = agent_sans(agent_names)?;
    let client_san = dns_san(client_name)?;
    let paths = DevPkiPaths::in_dir(dir);
    if !force && paths.exists() {
        tracing::debug!(dir = %dir.display(), "keeping the existing dev PKI");
        return Ok(paths);
    }
    create_private_dir(dir)?;

    let new_ca = force || !(paths.ca_cert.is_file() && paths.ca_key.is_file());
    let ca = if new_ca {
        info!(dir = %dir.display(), "generating a dev CA");
        let ca = generate_ca()?;
        write_file(&paths.ca_key, &ca.key.serialize_pem(), true)?;
        write_file(&paths.ca_cert, &ca.cert.pem(), false)?;
        ca
    } else {
        load_ca(&paths)?
    };

    if new_ca || !(paths.agent_cert.is_file() && paths.agent_key.is_file()) {
        info!(dir = %dir.display(), names = ?agent_names, "issuing the dev agent certificate");
        let cn = agent_names.first().ok_or(PkiError::NoAgentNames)?;
        issue_leaf(
            &ca,
            "agent",
            agent_sans,
            cn,
            ExtendedKeyUsagePurpose::ServerAuth,
            &paths.agent_cert,
            &paths.agent_key,
        )?;
    }
    if new_ca || !(paths.client_cert.is_file() && paths.client_key.is_file()) {
        info!(dir = %dir.display(), name = client_name, "issuing the dev mail host certificate");
        issue_leaf(
            &ca,
            "mail host",
            vec![client_san],
            client_name,
            ExtendedKeyUsagePurpose::ClientAuth,
            &paths.client_cert,
            &paths.client_key,
        )?;
    }
    Ok(paths)
}

/// Issues one more client (clientAuth) leaf signed by the dev CA, with DNS SAN and CN `name`,
/// writing NAME.pem/NAME.key in the PKI directory (replacing any earlier pair of that name).
/// Returns (certificate path, key path).
pub fn issue_client_cert(paths: &DevPkiPaths, name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
    let san = dns_san(name)?;
    let cert_path = paths.dir.join(format!("{name}.pem"));
    let key_path = paths.dir.join(format!("{name}.key"));
    if paths
        .all()
        .iter()
        .any(|p| **p == cert_path || **p == key_path)
    {
        return Err(PkiError::ReservedName {
            name: name.to_owned(),
        });
    }
    let ca = load_ca(paths)?;
    info!(dir = %paths.dir.display(), name, "issuing a dev client certificate");
    issue_leaf(
        &ca,
        name,
        vec![san],
        name,
        ExtendedKeyUsagePurpose::ClientAuth,
        &cert_path,
        &key_path,
    )?;
    Ok((cert_path, key_path))
}

/// Agent names: IP addresses become IP SANs, anything else must be a valid DNS name.
fn agent_sans(names: &[String]) -> Result<Vec<SanType>, PkiError> {
    if names.is_empty() {
        return Err(PkiError::NoAgentNames);
    }
    names
        .iter()
        .map(|name| match name.parse() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => dns_san(name),
        })
        .collect()
}

fn dns_san(name: &str) -> Result<SanType, PkiError> {
    let invalid = || PkiError::InvalidName {
        name: name.to_owned(),
    };
    DnsName::try_from(name).map_err(|_| invalid())?;
    Ok(SanType::DnsName(name.try_into().map_err(|_| invalid())?))
}

fn distinguished_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "mailbell");
    dn.push(DnType::CommonName, cn);
    dn
}

/// Sets notBefore to [`BACKDATE`] ago and notAfter to `days` from now.
fn set_validity(params: &mut CertificateParams, days: u64) {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let now = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(since_epoch.as_secs());
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::from_secs(days * DAY);
}

fn generate_key(what: &str) -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| PkiError::Generate {
        what: what.to_owned(),
        source,
    })
}

fn generate_ca() -> Result<Ca, PkiError> {
    let key = generate_key("CA")?;
    let mut params = CertificateParams::default();
    let suffix: u32 = rand::random();
    params.distinguished_name = distinguished_name(&format!("{CA_NAME} {suffix:08x}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALIDITY_DAYS);
    let cert = params
        .self_signed(&key)
        .map_err(|source| PkiError::Generate {
            what: "CA".to_owned(),
            source,
        })?;
    Ok(Ca { cert, key })
}

/// Loads the CA from its PEM files. The certificate is re-signed in memory only: what matters
/// for issuing is its subject, key identifier and key, which are kept.
fn load_ca(paths: &DevPkiPaths) -> Result<Ca, PkiError> {
    let key_pem = read_file(&paths.ca_key)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::Load {
        path: paths.ca_key.clone(),
        source,
    })?;
    let cert_pem = read_file(&paths.ca_cert)?;
    let load_err = |source| PkiError::Load {
        path: paths.ca_cert.clone(),
        source,
    };
    let der = pem_der(&cert_pem).ok_or(load_err(rcgen::Error::CouldNotParseCertificate))?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der)
        .map_err(|_| load_err(rcgen::Error::CouldNotParseCertificate))?;
    if x509.public_key().raw != key.public_key_der().as_slice() {
        return Err(PkiError::CaKeyMismatch {
            cert: paths.ca_cert.clone(),
            key: paths.ca_key.clone(),
        });
    }
    let params = CertificateParams::from_ca_cert_pem(&cert_pem).map_err(load_err)?;
    let cert = params.self_signed(&key).map_err(load_err)?;
    Ok(Ca { cert, key })
}

/// The DER of the first certificate in a PEM text.
fn pem_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}

fn issue_leaf(
    ca: &Ca,
    what: &str,
    sans: Vec<SanType>,
    cn: &str,
    usage: ExtendedKeyUsagePurpose,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), PkiError> {
    let key = generate_key(what)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.distinguished_name = distinguished_name(cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, LEAF_VALIDITY_DAYS);
    let cert = params
        .signed_by(&key, &ca.cert, &ca.key)
        .map_err(|source| PkiError::Generate {
            what: what.to_owned(),
            source,
        })?;
    write_file(key_path, &key.serialize_pem(), true)?;
    write_file(cert_path, &cert.pem(), false)?;
    Ok(())
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| PkiError::CreateDir {
        path: dir.to_owned(),
        source,
    })
}

/// Writes through a temporary file and a rename, so a reader never sees half a file; a
/// private file is created with mode 0600 from the start.
fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(&tmp).map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    fn names() -> Vec<String> {
        vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
    }

    fn read_all(paths: &DevPkiPaths) -> Vec<Vec<u8>> {
        paths.all().iter().map(|p| fs::read(p).unwrap()).collect()
    }

    fn parse(path: &Path) -> Vec<u8> {
        pem_der(&fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn generates_all_files_and_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let pki_dir = dir.path().join("pki");
        let paths = DevPkiPaths::in_dir(&pki_dir);
        assert!(!paths.exists());
        let first = ensure_dev_pki(&pki_dir, &names(), "mailhost", false).unwrap();
        assert!(first.exists());
        let before = read_all(&first);

        let second = ensure_dev_pki(&pki_dir, &names(), "mailhost", false).unwrap();
        assert_eq!(
            before,
            read_all(&second),
            "a second call must keep the files"
        );

        let forced = ensure_dev_pki(&pki_dir, &names(), "mailhost", true).unwrap();
        let after = read_all(&forced);
        for (b, a) in before.iter().zip(&after) {
            assert_ne!(b, a, "force must regenerate every file");
        }
        // No temporary files are left behind.
        let leftovers: Vec<_> = fs::read_dir(&pki_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let paths = ensure_dev_pki(dir.path(), &names(), "mailhost", false).unwrap();
        let (extra_cert, extra_key) = issue_client_cert(&paths, "relay2").unwrap();
        for key in [
            &paths.ca_key,
            &paths.agent_key,
            &paths.client_key,
            &extra_key,
        ] {
            let mode = fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        for cert in [
            &paths.ca_cert,
            &paths.agent_cert,
            &paths.client_cert,
            &extra_cert,
        ] {
            let mode = fs::metadata(cert).unwrap().permissions().mode() & 0o077;
            assert_eq!(
                mode & 0o022,
                0,
                "{} is group/world writable",
                cert.display()
            );
        }
    }

    #[test]
    fn certificates_have_the_documented_contents() {
        let dir = tempfile::tempdir().unwrap();
        let paths = ensure_dev_pki(dir.path(), &names(), "relay.example", false).unwrap();
        let day = DAY as i64;

        let ca_der = parse(&paths.ca_cert);
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert!(ca.is_ca());
        let ca_days = ca.validity().time_to_expiration().unwrap().whole_seconds() / day;
        assert!((3650..=3653).contains(&ca_days), "{ca_days}");

        let agent_der = parse(&paths.agent_cert);
        let (_, agent) = x509_parser::parse_x509_certificate(&agent_der).unwrap();
        assert!(!agent.is_ca());
        assert_eq!(agent.issuer(), ca.subject());
        let eku = agent.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        let sans = &agent
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert!(sans.contains(&GeneralName::DNSName("localhost")));
        assert!(sans.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
        let leaf_days = agent
            .validity()
            .time_to_expiration()
            .unwrap()
            .whole_seconds()
            / day;
        assert!((728..=731).contains(&leaf_days), "{leaf_days}");
        assert!(
            agent.public_key().algorithm.algorithm
                == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );

        let client_der = parse(&paths.client_cert);
        let (_, client) = x509_parser::parse_x509_certificate(&client_der).unwrap();
        let eku = client.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let sans = &client
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(sans, &vec![GeneralName::DNSName("relay.example")]);
        let cn: Vec<_> = client
            .subject()
            .iter_common_name()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(cn, ["relay.example"]);
    }

    #[test]
    fn missing_leaf_is_reissued_by_the_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        let paths = ensure_dev_pki(dir.path(), &names(), "mailhost", false).unwrap();
        let ca_before = fs::read(&paths.ca_cert).unwrap();
        let agent_before = fs::read(&paths.agent_cert).unwrap();
        fs::remove_file(&paths.client_key).unwrap();
        ensure_dev_pki(dir.path(), &names(), "mailhost", false).unwrap();
        assert_eq!(ca_before, fs::read(&paths.ca_cert).unwrap());
        assert_eq!(agent_before, fs::read(&paths.agent_cert).unwrap());
        assert!(paths.exists());
        // The re-issued leaf chains to the CA on disk.
        let ca_der = parse(&paths.ca_cert);
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let client_der = parse(&paths.client_cert);
        let (_, client) = x509_parser::parse_x509_certificate(&client_der).unwrap();
        client.verify_signature(Some(ca.public_key())).unwrap();
        assert_eq!(client.issuer().as_raw(), ca.subject().as_raw());
    }

    #[test]
    fn missing_ca_means_new_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let paths = ensure_dev_pki(dir.path(), &names(), "mailhost", false).unwrap();
        let agent_before = fs::read(&paths.agent_cert).unwrap();
        fs::remove_file(&paths.ca_key).unwrap();
        ensure_dev_pki(dir.path(), &names(), "mailhost", false).unwrap();
        assert_ne!(agent_before, fs::read(&paths.agent_cert).unwrap());
    }

    #[test]
    fn issued_client_cert_chains_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let paths = ensure_dev_pki(dir.path(), &names(), "mailhost", false).unwrap();
        let (cert, key) = issue_client_cert(&paths, "relay2").unwrap();
        assert_eq!(cert, dir.path().join("relay2.pem"));
        assert_eq!(key, dir.path().join("relay2.key"));
        let ca_der = parse(&paths.ca_cert);
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let der = parse(&cert);
        let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
        leaf.verify_signature(Some(ca.public_key())).unwrap();
        assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = ensure_dev_pki(dir.path(), &[], "mailhost", false).unwrap_err();
        assert!(matches!(err, PkiError::NoAgentNames), "{err:?}");
        let err = ensure_dev_pki(dir.path(), &names(), "mail host", false).unwrap_err();
        assert_eq!(err.to_string(), "invalid certificate name \"mail host\"");
        let err =
            ensure_dev_pki(dir.path(), &["bad/name".to_owned()], "mailhost", false).unwrap_err();
        assert!(matches!(err, PkiError::InvalidName { .. }), "{err:?}");

        let paths = ensure_dev_pki(dir.path(), &names(), "mailhost", false).unwrap();
        for name in ["ca", "agent", "mailhost"] {
            let err = issue_client_cert(&paths, name).unwrap_err();
            assert!(
                matches!(err, PkiError::ReservedName { .. }),
                "{name}: {err:?}"
            );
        }
        for name in ["../escape", "a/b", ""] {
            let err = issue_client_cert(&paths, name).unwrap_err();
            assert!(
                matches!(err, PkiError::InvalidName { .. }),
                "{name}: {err:?}"
            );
        }
    }

    #[test]
    fn garbage_ca_files_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let paths = ensure_dev_pki(dir.path(), &names(), "mailhost", false).unwrap();
        let ca_pem = fs::read(&paths.ca_cert).unwrap();

        fs::remove_file(&paths.ca_cert).unwrap();
        let err = issue_client_cert(&paths, "relay2").unwrap_err();
        assert!(matches!(err, PkiError::Read { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("cannot read {}", paths.ca_cert.display())
        );

        fs::write(&paths.ca_cert, "garbage\n").unwrap();
        let err = issue_client_cert(&paths, "relay2").unwrap_err();
        assert!(matches!(err, PkiError::Load { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("cannot load {}", paths.ca_cert.display())
        );

        fs::write(&paths.ca_cert, ca_pem).unwrap();
        fs::write(&paths.ca_key, "garbage\n").unwrap();
        let err = issue_client_cert(&paths, "relay2").unwrap_err();
        assert!(matches!(err, PkiError::Load { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("cannot load {}", paths.ca_key.display())
        );
    }

    #[test]
    fn ca_key_from_another_pki_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let paths = ensure_dev_pki(dir.path(), &names(), "mailhost", false).unwrap();
        let rogue = ensure_dev_pki(other.path(), &names(), "mailhost", false).unwrap();
        fs::copy(&rogue.ca_key, &paths.ca_key).unwrap();
        fs::remove_file(&paths.client_cert).unwrap();
        let err = ensure_dev_pki(dir.path(), &names(), "mailhost", false).unwrap_err();
        assert!(matches!(err, PkiError::CaKeyMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("ca.key"), "{err}");
    }
}
