//! The mail side's configuration: TOML parsed once into typed values. Every key has a default,
//! so an empty file (or none) runs a local instance: Stalwart endpoints, milter and admin API on
//! loopback, a dev PKI, and one agent on 127.0.0.1:7465. config/mailbell.example.toml lists
//! every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mailbell_link::http_server::HttpConfig;
use mailbell_link::net::Endpoint;
use mailbell_link::paths;
pub use mailbell_link::units::ConfigError;
use mailbell_link::units::{de_duration, parse_toml, read_config};
use serde::Deserialize;

use crate::audit::AuditConfig;
use crate::billing::BillingConfig;
use crate::meter::MeterConfig;
use crate::mta::milter::MilterConfig;
use crate::mta::stalwart::StalwartConfig;
use crate::notify::intake::IntakeConfig;
use crate::policy::blocklist::BlocklistConfig;
use crate::policy::zones::ZonesConfig;
use crate::retrieval::certs::CertFiles;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    mailbell: RawMain,
    listen: RawListen,
    admin: RawAdmin,
    stalwart: StalwartConfig,
    stalwart_api: StalwartApi,
    milter: MilterConfig,
    intake: IntakeConfig,
    link: RawLink,
    outbox: RawOutbox,
    audit: AuditConfig,
    http: RawHttp,
    retrieval: RawRetrieval,
    meter: MeterConfig,
    billing: BillingConfig,
    zones: ZonesConfig,
    blocklist: BlocklistConfig,
}

/// `[retrieval]`: the POP3/IMAP proxy in front of the backend's listeners (all off by default).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRetrieval {
    pop3: String,
    pop3s: String,
    imap: String,
    imaps: String,
    backend_pop3: String,
    backend_imap: String,
    proxy_protocol: bool,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    certificates: Vec<RawCertificate>,
    #[serde(deserialize_with = "de_duration")]
    cert_check_interval: Duration,
    backend_tls: bool,
    backend_ca: Option<PathBuf>,
    backend_server_name: String,
    allow_plaintext_login: bool,
    pass_through_opaque_sasl: bool,
    default_realm: String,
    max_connections: usize,
    #[serde(deserialize_with = "de_duration")]
    prelogin_timeout: Duration,
    #[serde(deserialize_with = "de_duration")]
    pop3_idle_timeout: Duration,
    #[serde(deserialize_with = "de_duration")]
    imap_idle_timeout: Duration,
    #[serde(deserialize_with = "de_duration")]
    connect_timeout: Duration,
    unwelcome_text: String,
    network_text: String,
    arrears_text: String,
    notice_subject: String,
    notice_text: String,
    notice_file: Option<PathBuf>,
    notice_from: String,
}

impl Default for RawRetrieval {
    fn default() -> Self {
        Self {
            pop3: String::new(),
            pop3s: String::new(),
            imap: String::new(),
            imaps: String::new(),
            backend_pop3: "127.0.0.1:110".into(),
            backend_imap: "127.0.0.1:143".into(),
            proxy_protocol: true,
            cert: None,
            key: None,
            certificates: Vec::new(),
            cert_check_interval: Duration::from_secs(5),
            backend_tls: false,
            backend_ca: None,
            backend_server_name: String::new(),
            allow_plaintext_login: false,
            pass_through_opaque_sasl: false,
            default_realm: String::new(),
            max_connections: 1024,
            prelogin_timeout: Duration::from_secs(60),
            pop3_idle_timeout: Duration::from_secs(10 * 60),
            imap_idle_timeout: Duration::from_secs(30 * 60),
            connect_timeout: Duration::from_secs(5),
            unwelcome_text: DEFAULT_UNWELCOME_TEXT.into(),
            network_text: DEFAULT_NETWORK_TEXT.into(),
            arrears_text: DEFAULT_ARREARS_TEXT.into(),
            notice_subject: crate::retrieval::notice::DEFAULT_SUBJECT.into(),
            notice_text: crate::retrieval::notice::DEFAULT_TEXT.into(),
            notice_file: None,
            notice_from: String::new(),
        }
    }
}

/// Default `retrieval.unwelcome_text`.
pub const DEFAULT_UNWELCOME_TEXT: &str =
    "This account is closed. Please contact your mail provider.";
/// Default `retrieval.network_text`.
pub const DEFAULT_NETWORK_TEXT: &str = "Logins to this account are not allowed from your network.";
/// Default `retrieval.arrears_text`.
pub const DEFAULT_ARREARS_TEXT: &str = "This account is in arrears: your mail is kept, but only \
    the payment notice can be read until it is paid. Please contact your mail provider.";

/// The operator's words at the retrieval proxy's gate (one line each).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateTexts {
    /// A login of an `unwelcome` account (`-ERR [AUTH]`, `NO [ALERT]`).
    pub unwelcome: String,
    /// A login from outside the account's networks (`-ERR [AUTH]`, `NO [AUTHORIZATIONFAILED]`).
    pub network: String,
    /// An IMAP login of an account in arrears (`NO [ALERT]`), and a live session whose account
    /// went into arrears.
    pub arrears: String,
}

/// `[[retrieval.certificates]]`: one certificate of several, chosen by SNI.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    names: Vec<String>,
}

/// TLS from the proxy to the backend (`backend_tls = true`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendTls {
    /// PEM file with the CA certificate(s) the backend's certificate must chain to.
    pub ca: PathBuf,
    /// The name the backend's certificate must carry; `None`: the host of its address.
    pub server_name: Option<String>,
}

/// The retrieval proxy's settings (`[retrieval]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrievalConfig {
    /// Plain POP3 with STLS.
    pub pop3: Option<SocketAddr>,
    /// POP3 over implicit TLS.
    pub pop3s: Option<SocketAddr>,
    /// Plain IMAP with STARTTLS.
    pub imap: Option<SocketAddr>,
    /// IMAP over implicit TLS.
    pub imaps: Option<SocketAddr>,
    /// The backend's POP3 listener, host:port.
    pub backend_pop3: String,
    /// The backend's IMAP listener, host:port.
    pub backend_imap: String,
    /// Open each backend connection with a PROXY protocol v2 header.
    pub proxy_protocol: bool,
    /// The listeners' certificates (PEM chain and key, SNI names), the first the default;
    /// at least one is required when a listener is on.
    pub certificates: Vec<CertFiles>,
    /// How often the certificate files are checked for a new version.
    pub cert_check_interval: Duration,
    /// TLS to the backend, after the PROXY v2 header (`None`: plaintext).
    pub backend_tls: Option<BackendTls>,
    /// Allow USER/PASS, LOGIN and AUTH PLAIN/LOGIN before TLS.
    pub allow_plaintext_login: bool,
    /// Let SASL mechanisms that hide the account (SCRAM-*, OAUTHBEARER, XOAUTH2, GSSAPI, ...)
    /// through, advertised and forwarded; such sessions are metered without an account and
    /// are not gated. Off: they are removed from the capabilities and refused.
    pub pass_through_opaque_sasl: bool,
    /// The domain a login without one belongs to (Dovecot's `auth_default_realm`): a login
    /// "alice" is gated, metered and billed as "alice@<realm>" (the backend still gets
    /// "alice"). Empty: logins are taken as they are.
    pub default_realm: String,
    /// Per listener: connections not logged in yet (slots taken before accept, the oldest
    /// evicted when all are taken), and separately logged-in sessions.
    pub max_connections: usize,
    /// Longest silence (either way) before login, and the longest TLS handshake.
    pub prelogin_timeout: Duration,
    /// Longest silence (either way) after login on POP3.
    pub pop3_idle_timeout: Duration,
    /// Longest silence after login on IMAP (RFC 9051 lets IDLE last 30 minutes).
    pub imap_idle_timeout: Duration,
    /// Longest wait for the backend: TCP connection, TLS handshake, greeting and the PROXY check.
    pub connect_timeout: Duration,
    /// What refused logins are told.
    pub texts: GateTexts,
    /// The payment notice of accounts in arrears (`notice_text`, replaced by the contents of
    /// `notice_file` when the daemon starts, if that is set).
    pub notice: crate::retrieval::notice::NoticeTemplate,
    /// A file holding the notice text (resolved against the config file's directory).
    pub notice_file: Option<PathBuf>,
}

impl RetrievalConfig {
    /// Whether any listener is on.
    pub fn enabled(&self) -> bool {
        self.pop3.is_some() || self.pop3s.is_some() || self.imap.is_some() || self.imaps.is_some()
    }
}

fn host_port(key: &str, s: &str) -> Result<String, ConfigError> {
    if s.rsplit_once(':')
        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(ConfigError::Invalid(format!(
            "retrieval.{key} {s:?} is not host:port"
        )));
    }
    Ok(s.to_owned())
}

/// An operator text that goes on one protocol line: not empty, no line breaks, at most 400
/// characters.
fn one_line_text(key: &str, s: String) -> Result<String, ConfigError> {
    let t = s.trim();
    let why = if t.is_empty() {
        "must not be empty"
    } else if t.chars().any(char::is_control) {
        "must be one line (no line breaks or control characters)"
    } else if t.chars().count() > 400 {
        "must be at most 400 characters"
    } else {
        return Ok(t.to_owned());
    };
    Err(ConfigError::Invalid(format!("retrieval.{key} {why}")))
}

fn realm(s: &str) -> Result<String, ConfigError> {
    let t = s.trim().trim_start_matches('@').to_ascii_lowercase();
    if t.chars()
        .any(|c| c.is_whitespace() || c == '@' || c.is_control())
        || t.len() > 253
    {
        return Err(ConfigError::Invalid(format!(
            "retrieval.default_realm {s:?} is not a domain name"
        )));
    }
    Ok(t)
}

impl RetrievalConfig {
    /// The account a login stands for: the login, with `@default_realm` added when it names
    /// no domain and a realm is set.
    pub fn account_of(&self, login: &str) -> String {
        if self.default_realm.is_empty() || login.contains('@') {
            login.to_owned()
        } else {
            format!("{login}@{}", self.default_realm)
        }
    }
}

fn retrieval(r: RawRetrieval) -> Result<RetrievalConfig, ConfigError> {
    let inv = ConfigError::Invalid;
    let on = |key: &str, s: &str| -> Result<Option<SocketAddr>, ConfigError> {
        if s.trim().is_empty() {
            return Ok(None);
        }
        s.trim().parse().map(Some).map_err(|_| {
            inv(format!(
                "retrieval.{key} {s:?} is not ip:port (or \"\" to turn it off)"
            ))
        })
    };
    let c = RetrievalConfig {
        pop3: on("pop3", &r.pop3)?,
        pop3s: on("pop3s", &r.pop3s)?,
        imap: on("imap", &r.imap)?,
        imaps: on("imaps", &r.imaps)?,
        backend_pop3: host_port("backend_pop3", &r.backend_pop3)?,
        backend_imap: host_port("backend_imap", &r.backend_imap)?,
        proxy_protocol: r.proxy_protocol,
        certificates: certificates(r.cert, r.key, r.certificates)?,
        cert_check_interval: r.cert_check_interval,
        backend_tls: backend_tls(
            r.backend_tls,
            r.backend_ca,
            &r.backend_server_name,
            [&r.backend_pop3, &r.backend_imap],
        )?,
        allow_plaintext_login: r.allow_plaintext_login,
        pass_through_opaque_sasl: r.pass_through_opaque_sasl,
        default_realm: realm(&r.default_realm)?,
        max_connections: r.max_connections,
        prelogin_timeout: r.prelogin_timeout,
        pop3_idle_timeout: r.pop3_idle_timeout,
        imap_idle_timeout: r.imap_idle_timeout,
        connect_timeout: r.connect_timeout,
        texts: GateTexts {
            unwelcome: one_line_text("unwelcome_text", r.unwelcome_text)?,
            network: one_line_text("network_text", r.network_text)?,
            arrears: one_line_text("arrears_text", r.arrears_text)?,
        },
        notice: crate::retrieval::notice::NoticeTemplate {
            subject: one_line_text("notice_subject", r.notice_subject)?,
            text: r.notice_text,
            from: r.notice_from.trim().to_owned(),
        },
        notice_file: r.notice_file.filter(|p| !p.as_os_str().is_empty()),
    };
    if c.max_connections == 0 {
        return Err(inv("retrieval.max_connections must be at least 1".into()));
    }
    for (key, d) in [
        ("prelogin_timeout", c.prelogin_timeout),
        ("pop3_idle_timeout", c.pop3_idle_timeout),
        ("imap_idle_timeout", c.imap_idle_timeout),
        ("connect_timeout", c.connect_timeout),
        ("cert_check_interval", c.cert_check_interval),
    ] {
        if d.is_zero() {
            return Err(inv(format!("retrieval.{key} must be above zero")));
        }
    }
    if c.enabled() && c.certificates.is_empty() {
        return Err(inv(
            "retrieval.cert and retrieval.key (or [[retrieval.certificates]]) are required when \
             a retrieval listener is on (STLS/STARTTLS and the implicit TLS ports need them)"
                .into(),
        ));
    }
    Ok(c)
}

/// The one-certificate form (`cert`, `key`) or the list, not both.
fn certificates(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    list: Vec<RawCertificate>,
) -> Result<Vec<CertFiles>, ConfigError> {
    let inv = ConfigError::Invalid;
    let one = match (cert, key) {
        (Some(cert), Some(key)) => Some(CertFiles {
            cert,
            key,
            names: Vec::new(),
        }),
        (None, None) => None,
        _ => {
            return Err(inv(
                "set both retrieval.cert and retrieval.key, or neither".into()
            ))
        }
    };
    if one.is_some() && !list.is_empty() {
        return Err(inv(
            "retrieval.cert/key and [[retrieval.certificates]] are two forms of one setting: \
             use one"
                .into(),
        ));
    }
    let mut out: Vec<CertFiles> = one.into_iter().collect();
    for (i, c) in list.into_iter().enumerate() {
        if let Some(bad) = c.names.iter().find(|n| !valid_sni_name(n)) {
            return Err(inv(format!(
                "retrieval.certificates[{i}].names: {bad:?} is not a DNS name or *.domain"
            )));
        }
        out.push(CertFiles {
            cert: c.cert,
            key: c.key,
            names: c.names,
        });
    }
    Ok(out)
}

/// A DNS name, or `*.` and a DNS name.
fn valid_sni_name(n: &str) -> bool {
    let name = n.strip_prefix("*.").unwrap_or(n);
    !name.is_empty()
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

/// The host part of `host:port` (`[v6]` without brackets).
pub fn backend_host(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

fn backend_tls(
    on: bool,
    ca: Option<PathBuf>,
    server_name: &str,
    addrs: [&str; 2],
) -> Result<Option<BackendTls>, ConfigError> {
    let inv = ConfigError::Invalid;
    if !on {
        return Ok(None);
    }
    let Some(ca) = ca else {
        return Err(inv(
            "retrieval.backend_ca is required with backend_tls = true (the CA file the \
             backend's certificate chains to; /etc/ssl/certs/ca-certificates.crt for a public CA)"
                .into(),
        ));
    };
    let server_name = (!server_name.is_empty()).then(|| server_name.to_owned());
    let names: Vec<&str> = match &server_name {
        Some(n) => vec![n],
        None => addrs.iter().map(|a| backend_host(a)).collect(),
    };
    for n in names {
        if rustls::pki_types::ServerName::try_from(n).is_err() {
            return Err(inv(format!(
                "retrieval.backend_server_name: {n:?} is not a DNS name or IP address"
            )));
        }
    }
    Ok(Some(BackendTls { ca, server_name }))
}

/// `[http.stalwart]` and `[http.admin]`: each HTTP listener's timeouts and connection cap.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawHttp {
    stalwart: HttpConfig,
    admin: HttpConfig,
}

/// Connections open at once on the Stalwart endpoints when `[http.stalwart] max_connections`
/// is not set (Stalwart opens one per hook call and per webhook batch).
pub const STALWART_MAX_CONNECTIONS: usize = 512;
/// Connections open at once on the admin API and /metrics by default.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMain {
    data_dir: PathBuf,
}

impl Default for RawMain {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("var/mailbell"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawListen {
    http: String,
    milter: String,
    admin: String,
}

impl Default for RawListen {
    fn default() -> Self {
        Self {
            http: "127.0.0.1:8025".into(),
            milter: "127.0.0.1:8901".into(),
            admin: "127.0.0.1:8026".into(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    token: String,
}

/// Stalwart's management API, used only to learn which addresses belong to an account id
/// (webhook confirmations name accounts by number).
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StalwartApi {
    /// e.g. "http://127.0.0.1:8080"; empty = no account map (a confirmation then applies to
    /// every waiting recipient of that message).
    pub url: String,
    pub user: String,
    pub secret: String,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    addr: String,
    #[serde(default = "default_server_name")]
    server_name: String,
}

fn default_server_name() -> String {
    "localhost".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLink {
    agent: Vec<RawAgent>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    dev_pki: bool,
    dev_pki_dir: Option<PathBuf>,
    agent_names: Vec<String>,
    client_name: String,
    agent_languages: Vec<String>,
    window: u16,
    #[serde(deserialize_with = "de_duration")]
    ack_timeout: Duration,
    max_resends: u32,
    #[serde(deserialize_with = "de_duration")]
    heartbeat: Duration,
    #[serde(deserialize_with = "de_duration")]
    dead_after: Duration,
    #[serde(deserialize_with = "de_duration")]
    connect_timeout: Duration,
    #[serde(deserialize_with = "de_duration")]
    io_timeout: Duration,
    #[serde(deserialize_with = "de_duration")]
    backoff_min: Duration,
    #[serde(deserialize_with = "de_duration")]
    backoff_max: Duration,
}

impl Default for RawLink {
    fn default() -> Self {
        let s = mailbell_link::sender::SenderConfig::default();
        Self {
            agent: vec![RawAgent {
                addr: "127.0.0.1:7465".into(),
                server_name: default_server_name(),
            }],
            ca: None,
            cert: None,
            key: None,
            dev_pki: true,
            dev_pki_dir: None,
            agent_names: vec!["localhost".into(), "127.0.0.1".into()],
            client_name: "mailhost".into(),
            agent_languages: Vec::new(),
            window: s.window,
            ack_timeout: s.ack_timeout,
            max_resends: s.max_resends,
            heartbeat: s.heartbeat,
            dead_after: s.dead_after,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawOutbox {
    max_depth: u64,
    #[serde(deserialize_with = "de_duration")]
    max_age: Duration,
}

impl Default for RawOutbox {
    fn default() -> Self {
        let d = crate::notify::outbox::OutboxConfig::default();
        Self {
            max_depth: d.max_depth,
            max_age: d.max_age,
        }
    }
}

/// Where the link's certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkTls {
    Files {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    /// Generate (once) a development CA and certificates in `dir`.
    DevPki {
        dir: PathBuf,
        agent_names: Vec<String>,
        client_name: String,
    },
}

/// The link to the GSM agents.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub agents: Vec<Endpoint>,
    /// Languages the agents have `[sms.templates.<lang>]` for besides the built-in zh and
    /// en: users may be registered with them.
    pub agent_languages: Vec<String>,
    pub tls: LinkTls,
    pub sender: mailbell_link::sender::SenderConfig,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

/// The parsed configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Stalwart MTA hook + webhook listener.
    pub http_listen: Option<SocketAddr>,
    pub milter_listen: Option<MilterListen>,
    /// Admin API and /metrics.
    pub admin_listen: Option<SocketAddr>,
    pub admin_token: String,
    pub stalwart: StalwartConfig,
    pub stalwart_api: StalwartApi,
    pub milter: MilterConfig,
    pub intake: IntakeConfig,
    pub link: LinkConfig,
    pub outbox_max_depth: u64,
    pub outbox_max_age: Duration,
    pub audit: AuditConfig,
    /// The Stalwart endpoints' HTTP server (`max_connections` always set).
    pub http_stalwart: HttpConfig,
    /// The admin API's HTTP server (`max_connections` always set).
    pub http_admin: HttpConfig,
    /// The POP3/IMAP retrieval proxy.
    pub retrieval: RetrievalConfig,
    /// The meter store the retrieval proxy writes (`[meter]`).
    pub meter: MeterConfig,
    /// The ledger of record (`[billing]`).
    pub billing: BillingConfig,
    /// Source zones (`[zones]`), reloaded on SIGHUP.
    pub zones: ZonesConfig,
    /// The SMTP-time blocklist (`[blocklist]`), reloaded on SIGHUP.
    pub blocklist: BlocklistConfig,
}

fn listen(key: &str, s: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    s.trim().parse().map(Some).map_err(|_| {
        ConfigError::Invalid(format!(
            "listen.{key} {s:?} is not ip:port{} (or \"\" to turn it off)",
            if key == "milter" {
                " or unix:/path"
            } else {
                ""
            }
        ))
    })
}

/// Where the milter listens (`listen.milter`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MilterListen {
    /// `ip:port`.
    Tcp(SocketAddr),
    /// `unix:/absolute/path`: a Unix-domain socket, for an MTA on the same host (Postfix
    /// `smtpd_milters = unix:/path`), created with `[milter] socket_mode` / `socket_group`.
    Unix(PathBuf),
}

impl std::fmt::Display for MilterListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// `listen.milter`: `ip:port`, `unix:/absolute/path`, or `""` (off).
fn milter_listen(s: &str) -> Result<Option<MilterListen>, ConfigError> {
    let Some(path) = s.trim().strip_prefix("unix:") else {
        return Ok(listen("milter", s)?.map(MilterListen::Tcp));
    };
    let path = Path::new(path);
    if !path.is_absolute() || path.file_name().is_none() {
        return Err(ConfigError::Invalid(format!(
            "listen.milter {s:?}: a Unix-domain socket needs an absolute path (unix:/run/mailbell/milter.sock)"
        )));
    }
    Ok(Some(MilterListen::Unix(path.to_owned())))
}

/// Where the daemon and the admin commands look without `--config` or `MAILBELL_CONFIG`.
pub const DEFAULT_PATH: &str = "/etc/mailbell/mailbell.toml";

/// The configuration file to use: the one named (`--config`, `MAILBELL_CONFIG`), else
/// `default` ([`DEFAULT_PATH`]) when it exists. Nothing else: without a file the commands would
/// create state under the current directory, which the daemon never sees.
pub fn locate(named: Option<&Path>, default: &Path) -> Result<PathBuf, ConfigError> {
    match named {
        Some(p) => Ok(p.to_owned()),
        None if default.exists() => Ok(default.to_owned()),
        None => Err(ConfigError::Invalid(format!(
            "no configuration file: {} does not exist; give one with --config FILE or \
             MAILBELL_CONFIG=FILE (config/mailbell.example.toml lists every key)",
            default.display()
        ))),
    }
}

impl Config {
    /// Reads a file; a missing `path` means all defaults. Relative paths in the file resolve
    /// against the file's directory.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (text, origin) = read_config(path)?;
        let mut c = Self::from_toml(&text, &origin)?;
        if let Some(p) = path {
            c.resolve_paths(&paths::base_dir(p));
        }
        Ok(c)
    }

    /// Makes every path key absolute against `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        self.data_dir = paths::resolve(base, &self.data_dir);
        match &mut self.link.tls {
            LinkTls::Files { ca, cert, key } => {
                for p in [ca, cert, key] {
                    *p = paths::resolve(base, p);
                }
            }
            LinkTls::DevPki { dir, .. } => *dir = paths::resolve(base, dir),
        }
        for c in &mut self.retrieval.certificates {
            c.cert = paths::resolve(base, &c.cert);
            c.key = paths::resolve(base, &c.key);
        }
        if let Some(b) = &mut self.retrieval.backend_tls {
            b.ca = paths::resolve(base, &b.ca);
        }
        if let Some(f) = &mut self.retrieval.notice_file {
            *f = paths::resolve(base, f);
        }
    }

    /// Checks, before anything is created, that the certificate files can be read and that
    /// the data directory (and the dev PKI's) exists or can be created. An error names the key
    /// and the path.
    pub fn check_paths(&self) -> Result<(), ConfigError> {
        paths::check_dir_creatable("mailbell.data_dir", &self.data_dir)?;
        match &self.link.tls {
            LinkTls::Files { ca, cert, key } => {
                paths::check_readable_file("link.ca", ca)?;
                paths::check_readable_file("link.cert", cert)?;
                paths::check_readable_file("link.key", key)?;
            }
            LinkTls::DevPki { dir, .. } => paths::check_dir_creatable("link.dev_pki_dir", dir)?,
        }
        if self.retrieval.enabled() {
            for c in &self.retrieval.certificates {
                paths::check_readable_file("retrieval.cert", &c.cert)?;
                paths::check_readable_file("retrieval.key", &c.key)?;
            }
            if let Some(b) = &self.retrieval.backend_tls {
                paths::check_readable_file("retrieval.backend_ca", &b.ca)?;
            }
        }
        if let (true, Some(f)) = (self.retrieval.enabled(), &self.retrieval.notice_file) {
            paths::check_readable_file("retrieval.notice_file", f)?;
        }
        let lists = [
            ("zones.free_networks", &self.zones.free_networks),
            ("zones.free_domains", &self.zones.free_domains),
            ("blocklist.networks", &self.blocklist.networks),
            ("blocklist.helo", &self.blocklist.helo),
            ("blocklist.sender_domains", &self.blocklist.sender_domains),
        ];
        for (key, files) in lists {
            for f in files {
                paths::check_readable_file(key, f)?;
            }
        }
        Ok(())
    }

    /// Parses TOML text (`origin` names it in errors).
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_toml(text, origin)?;
        let inv = ConfigError::Invalid;
        let data_dir = raw.mailbell.data_dir;
        let l = raw.link;
        if l.agent.is_empty() {
            return Err(inv("link.agent: at least one agent is required".into()));
        }
        let mut agents = Vec::new();
        for a in &l.agent {
            if a.addr
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(inv(format!(
                    "link.agent addr {:?} is not host:port",
                    a.addr
                )));
            }
            agents.push(Endpoint {
                addr: a.addr.clone(),
                server_name: a.server_name.clone(),
            });
        }
        let tls = match (l.ca, l.cert, l.key) {
            (Some(ca), Some(cert), Some(key)) => LinkTls::Files { ca, cert, key },
            (None, None, None) if l.dev_pki => LinkTls::DevPki {
                dir: l.dev_pki_dir.unwrap_or_else(|| data_dir.join("pki")),
                agent_names: l.agent_names,
                client_name: l.client_name.clone(),
            },
            (None, None, None) => {
                return Err(inv(
                    "link.ca, link.cert and link.key are required when link.dev_pki = false".into(),
                ))
            }
            _ => {
                return Err(inv(
                    "set all of link.ca, link.cert and link.key, or none of them".into(),
                ))
            }
        };
        if l.window == 0 {
            return Err(inv("link.window must be at least 1".into()));
        }
        for lang in &l.agent_languages {
            let ok = !lang.is_empty()
                && lang.len() <= 16
                && lang
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(inv(format!(
                    "link.agent_languages: {lang:?} is not a language tag such as fr or pt-BR"
                )));
            }
        }
        if raw.intake.max_recipients == 0 {
            return Err(inv("intake.max_recipients must be at least 1".into()));
        }
        mailbell_link::units::parse_utc_offset(&raw.intake.timezone)
            .map_err(|e| inv(format!("intake.timezone: {e}")))?;
        if raw.milter.timeout.is_zero()
            || raw.milter.negotiate_timeout.is_zero()
            || raw.milter.command_timeout.is_zero()
        {
            return Err(inv(
                "milter.timeout, milter.negotiate_timeout and milter.command_timeout must be above zero"
                    .into(),
            ));
        }
        if raw.stalwart.body_timeout.is_zero() || raw.stalwart.intake_timeout.is_zero() {
            return Err(inv(
                "stalwart.body_timeout and stalwart.intake_timeout must be above zero".into(),
            ));
        }
        let mut http_stalwart = raw.http.stalwart;
        http_stalwart.validate("http.stalwart").map_err(inv)?;
        http_stalwart
            .max_connections
            .get_or_insert(STALWART_MAX_CONNECTIONS);
        let mut http_admin = raw.http.admin;
        http_admin.validate("http.admin").map_err(inv)?;
        http_admin
            .max_connections
            .get_or_insert(ADMIN_MAX_CONNECTIONS);
        if raw.outbox.max_depth == 0 {
            return Err(inv("outbox.max_depth must be at least 1".into()));
        }
        let retrieval = retrieval(raw.retrieval)?;
        raw.meter.validate().map_err(inv)?;
        raw.billing.validate().map_err(inv)?;
        if raw.zones.verify_spf
            && (raw.zones.dns_timeout.is_zero()
                || raw.zones.dns_timeout > std::time::Duration::from_secs(30))
        {
            return Err(inv(
                "zones.dns_timeout must be above 0 and at most 30s (it holds the MTA's reply)"
                    .into(),
            ));
        }
        if raw.billing.stalwart_permissions && raw.stalwart_api.url.trim().is_empty() {
            return Err(inv(
                "billing.stalwart_permissions needs stalwart_api.url (the management API)".into(),
            ));
        }
        raw.blocklist.validate().map_err(inv)?;
        raw.milter.socket_mode().map_err(inv)?;
        Ok(Self {
            data_dir,
            http_listen: listen("http", &raw.listen.http)?,
            milter_listen: milter_listen(&raw.listen.milter)?,
            admin_listen: listen("admin", &raw.listen.admin)?,
            admin_token: raw.admin.token,
            stalwart: raw.stalwart,
            stalwart_api: raw.stalwart_api,
            milter: raw.milter,
            intake: raw.intake,
            link: LinkConfig {
                agents,
                agent_languages: l.agent_languages,
                tls,
                sender: mailbell_link::sender::SenderConfig {
                    window: l.window,
                    ack_timeout: l.ack_timeout,
                    max_resends: l.max_resends,
                    heartbeat: l.heartbeat,
                    dead_after: l.dead_after,
                    name: l.client_name,
                },
                connect_timeout: l.connect_timeout,
                io_timeout: l.io_timeout,
                backoff_min: l.backoff_min,
                backoff_max: l.backoff_max.max(l.backoff_min),
            },
            outbox_max_depth: raw.outbox.max_depth,
            outbox_max_age: raw.outbox.max_age,
            audit: raw.audit,
            http_stalwart,
            http_admin,
            retrieval,
            meter: raw.meter,
            billing: raw.billing,
            zones: raw.zones,
            blocklist: raw.blocklist,
        })
    }

    pub fn outbox_path(&self) -> PathBuf {
        self.data_dir.join("outbox")
    }

    pub fn users_path(&self) -> PathBuf {
        self.data_dir.join("users")
    }

    pub fn audit_path(&self) -> PathBuf {
        self.data_dir.join("audit")
    }

    pub fn meter_path(&self) -> PathBuf {
        self.data_dir.join("meter")
    }

    /// The ledger of record: `<data_dir>/billing/ledger.sqlite`.
    pub fn ledger_path(&self) -> PathBuf {
        crate::billing::ledger_path(&self.data_dir)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn empty_file_runs_locally() {
        let c = Config::from_toml("", "t").unwrap();
        assert_eq!(c.http_listen, Some("127.0.0.1:8025".parse().unwrap()));
        assert_eq!(
            c.milter_listen,
            Some(MilterListen::Tcp("127.0.0.1:8901".parse().unwrap()))
        );
        assert_eq!(c.link.agents[0].addr, "127.0.0.1:7465");
        assert!(matches!(c.link.tls, LinkTls::DevPki { .. }));
        assert!(c.admin_token.is_empty());
        assert_eq!(c.http_stalwart.header_timeout, Duration::from_secs(10));
        assert_eq!(c.http_stalwart.idle_timeout, Duration::from_secs(15));
        assert_eq!(
            c.http_stalwart.max_connections,
            Some(STALWART_MAX_CONNECTIONS)
        );
        assert_eq!(c.http_admin.max_connections, Some(ADMIN_MAX_CONNECTIONS));
        let c = Config::from_toml(
            "[http.admin]\nheader_timeout = \"2s\"\nmax_connections = 8\nmax_per_source = 4",
            "t",
        )
        .unwrap();
        assert_eq!(c.http_admin.header_timeout, Duration::from_secs(2));
        assert_eq!(c.http_admin.limits(1).max_pending, 8);
        assert_eq!(c.http_admin.limits(1).max_per_source, Some(4));
        assert_eq!(c.http_stalwart.limits(1).max_per_source, None);
    }

    /// An error as `main` prints it: the message and its causes (`{:#}` of the anyhow chain).
    fn chain(e: ConfigError) -> String {
        format!("{:#}", anyhow::Error::from(e))
    }

    #[test]
    fn the_shipped_example_parses_and_equals_the_defaults() {
        let text = include_str!("../../config/mailbell.example.toml");
        let c = Config::from_toml(text, "example").unwrap();
        let d = Config::from_toml("", "defaults").unwrap();
        assert_eq!(format!("{c:?}"), format!("{d:?}"));
    }

    #[test]
    fn errors_name_the_key() {
        let e = |t: &str| {
            Config::from_toml(t, "t")
                .map_err(chain)
                .unwrap_err()
                .to_string()
        };
        assert!(e("[listen]\nmilter = \"nope\"").contains("listen.milter"));
        assert!(e("[link]\nagent = []").contains("link.agent"));
        assert!(e("[link]\nca = \"/x\"").contains("link.ca"));
        assert!(e("[intake]\ntimezone = \"CET\"").contains("intake.timezone"));
        assert!(e("[intake]\nbogus = 1").contains("bogus"));
        assert!(e("[blocklist]\nreply = \"\"").contains("blocklist.reply"));
        assert!(e("[zones]\nfree_nets = []").contains("free_nets"));
        assert!(e("[link]\nack_timeout = \"soon\"").contains("duration"));
        assert!(e("[link]\nack_timeout = \"10\"").contains("no unit"));
        assert!(e("[link]\nagent_languages = [\"fr ca\"]").contains("link.agent_languages"));
        assert!(e("[milter]\ntimeout = \"0s\"").contains("milter.timeout"));
        assert!(e("[milter]\nnegotiate_timeout = \"0s\"").contains("milter.negotiate_timeout"));
        assert!(e("[milter]\ncommand_timeout = 0").contains("milter.command_timeout"));
        assert!(e("[stalwart]\nintake_timeout = 0").contains("stalwart.body_timeout"));
        assert!(e("[http.admin]\nidle_timeout = \"0s\"").contains("http.admin.idle_timeout"));
        assert!(e("[http.stalwart]\nmax_connections = 0").contains("http.stalwart.max_connections"));
        assert!(e("[http.stalwart]\nkeepalive = 1").contains("keepalive"));
        assert!(e("[retrieval]\npop3 = \"110\"").contains("retrieval.pop3"));
        assert!(e("[retrieval]\nbackend_imap = \"host\"").contains("retrieval.backend_imap"));
        assert!(e("[retrieval]\ncert = \"c.pem\"").contains("retrieval.key"));
        assert!(e("[retrieval]\nimaps = \"127.0.0.1:993\"").contains("retrieval.cert"));
        assert!(e("[retrieval]\nmax_connections = 0").contains("retrieval.max_connections"));
        assert!(e("[retrieval]\nprelogin_timeout = 0").contains("retrieval.prelogin_timeout"));
        assert!(e("[retrieval]\ndefault_realm = \"a b\"").contains("retrieval.default_realm"));
        let c = Config::from_toml("[retrieval]\ndefault_realm = \"@Uni.Example\"", "t").unwrap();
        assert_eq!(c.retrieval.account_of("alice"), "alice@uni.example");
        assert_eq!(
            c.retrieval.account_of("bob@other.example"),
            "bob@other.example"
        );
        let c = Config::from_toml("", "t").unwrap();
        assert_eq!(c.retrieval.account_of("alice"), "alice");
        assert!(e("[retrieval]\nsmtp = \"\"").contains("smtp"));
        assert!(e("[meter]\nflush_interval = 0").contains("meter.flush_interval"));
        assert!(e("[meter]\nflush_interval = \"2m\"").contains("meter.flush_interval"));
        assert!(e("[meter]\nsync = \"never\"").contains("expected `interval` or `per-session`"));
        assert!(e("[billing]\nmax_price_per_mb = \"0\"").contains("billing.max_price_per_mb"));
        assert!(e("[billing]\nmax_price_per_mb = \"1.005\"").contains("more than 2 digits"));
        assert!(e("[billing]\nmax_price_per_mb = 5").contains("max_price_per_mb"));
        assert!(e("[billing]\ndefault_class = \"\"").contains("billing.default_class"));
        assert!(e("[retrieval]\nunwelcome_text = \"\"").contains("retrieval.unwelcome_text"));
        assert!(e("[retrieval]\nnetwork_text = \"a\\nb\"").contains("retrieval.network_text"));
        assert!(e("[retrieval]\nnotice_subject = \"a\\r\\nBcc: x\"")
            .contains("retrieval.notice_subject"));
    }

    #[test]
    fn the_file_is_named_or_the_default_never_the_current_directory() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("mailbell.toml");
        let named = Path::new("/elsewhere/m.toml");
        assert_eq!(locate(Some(named), &default).unwrap(), named);
        let e = locate(None, &default).unwrap_err().to_string();
        assert!(
            e.contains("--config") && e.contains("MAILBELL_CONFIG"),
            "{e}"
        );
        assert!(e.contains(&default.display().to_string()), "{e}");
        std::fs::write(&default, "").unwrap();
        assert_eq!(locate(None, &default).unwrap(), default);
        assert_eq!(locate(Some(named), &default).unwrap(), named);
    }

    #[test]
    fn relative_paths_resolve_against_the_config_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mailbell.toml");
        std::fs::write(
            &file,
            "[mailbell]\ndata_dir = \"state\"\n[link]\nca = \"pki/ca.pem\"\n\
             cert = \"/abs/c.pem\"\nkey = \"pki/c.key\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&file)).unwrap();
        assert_eq!(c.data_dir, dir.path().join("state"));
        assert_eq!(
            c.link.tls,
            LinkTls::Files {
                ca: dir.path().join("pki/ca.pem"),
                cert: PathBuf::from("/abs/c.pem"),
                key: dir.path().join("pki/c.key"),
            }
        );
        let e = c.check_paths().unwrap_err().to_string();
        let ca = dir.path().join("pki/ca.pem").display().to_string();
        assert!(e.starts_with(&format!("link.ca {ca}: ")), "{e}");
        assert!(!dir.path().join("state").exists());
        // Text without a file keeps its paths as written.
        let c = Config::from_toml("[mailbell]\ndata_dir = \"state\"", "t").unwrap();
        assert_eq!(c.data_dir, Path::new("state"));
    }

    #[test]
    fn retrieval_is_off_by_default_and_its_paths_resolve() {
        let c = Config::from_toml("", "t").unwrap();
        assert_eq!(c.meter.flush_interval, Duration::from_millis(200));
        assert_eq!(c.billing.max_price_per_mb.minor(), 10_000);
        assert_eq!(c.ledger_path(), c.data_dir.join("billing/ledger.sqlite"));
        assert_eq!(c.meter.sync, crate::meter::Sync::Interval);
        assert_eq!(c.meter_path(), c.data_dir.join("meter"));
        let m =
            Config::from_toml("[meter]\nsync = \"per-session\"\nretention_days = 0", "t").unwrap();
        assert_eq!(m.meter.sync, crate::meter::Sync::PerSession);
        assert_eq!(m.meter.retention_days, 0);
        assert!(!c.retrieval.enabled());
        assert!(c.retrieval.proxy_protocol);
        assert!(!c.retrieval.allow_plaintext_login);
        assert!(!c.retrieval.pass_through_opaque_sasl);
        assert_eq!(c.retrieval.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.retrieval.imap_idle_timeout, Duration::from_secs(1800));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mailbell.toml");
        std::fs::write(
            &file,
            "[retrieval]\nimap = \"127.0.0.1:1143\"\nbackend_imap = \"[::1]:143\"\n\
             cert = \"tls/cert.pem\"\nkey = \"/abs/key.pem\"\nprelogin_timeout = \"5s\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&file)).unwrap();
        assert_eq!(c.retrieval.imap, Some("127.0.0.1:1143".parse().unwrap()));
        assert_eq!(c.retrieval.pop3, None);
        assert_eq!(
            c.retrieval.certificates,
            [CertFiles {
                cert: dir.path().join("tls/cert.pem"),
                key: PathBuf::from("/abs/key.pem"),
                names: Vec::new(),
            }]
        );
        assert_eq!(c.retrieval.prelogin_timeout, Duration::from_secs(5));
        assert_eq!(c.retrieval.cert_check_interval, Duration::from_secs(5));
        assert_eq!(c.retrieval.backend_tls, None);
        let e = c.check_paths().unwrap_err().to_string();
        assert!(e.starts_with("retrieval.cert"), "{e}");
    }

    #[test]
    fn the_notice_file_resolves_and_a_missing_one_is_named() {
        let c = Config::from_toml("", "t").unwrap();
        assert_eq!(
            c.retrieval.notice.subject,
            crate::retrieval::notice::DEFAULT_SUBJECT
        );
        assert_eq!(c.retrieval.texts.unwelcome, DEFAULT_UNWELCOME_TEXT);
        assert_eq!(c.retrieval.notice_file, None);
        let dir = tempfile::tempdir().unwrap();
        for f in ["cert.pem", "key.pem"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let file = dir.path().join("mailbell.toml");
        std::fs::write(
            &file,
            "[retrieval]\npop3s = \"127.0.0.1:995\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
             notice_file = \"notice.txt\"\nnotice_from = \" billing@isp.example \"\n",
        )
        .unwrap();
        let c = Config::load(Some(&file)).unwrap();
        let notice = dir.path().join("notice.txt");
        assert_eq!(c.retrieval.notice_file.as_deref(), Some(notice.as_path()));
        assert_eq!(c.retrieval.notice.from, "billing@isp.example");
        let e = c.check_paths().unwrap_err().to_string();
        assert!(
            e.starts_with("retrieval.notice_file") && e.contains(&notice.display().to_string()),
            "{e}"
        );
        std::fs::write(&notice, "Pay, {address}.").unwrap();
        c.check_paths().unwrap();
    }

    #[test]
    fn retrieval_certificates_by_sni_and_tls_to_the_backend() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mailbell.toml");
        std::fs::write(
            &file,
            "[retrieval]
imaps = \"127.0.0.1:993\"\nbackend_imap = \"dovecot.lan:993\"\n\
             backend_tls = true\nbackend_ca = \"ca.pem\"\ncert_check_interval = \"1s\"\n\
             [[retrieval.certificates]]\ncert = \"a.pem\"\nkey = \"a.key\"\n\
             [[retrieval.certificates]]\ncert = \"b.pem\"\nkey = \"b.key\"\n\
             names = [\"mail.b.test\", \"*.b.test\"]\n",
        )
        .unwrap();
        let c = Config::load(Some(&file)).unwrap();
        let r = &c.retrieval;
        assert_eq!(r.certificates.len(), 2);
        assert_eq!(r.certificates[0].cert, dir.path().join("a.pem"));
        assert_eq!(r.certificates[1].names, ["mail.b.test", "*.b.test"]);
        assert_eq!(r.cert_check_interval, Duration::from_secs(1));
        assert_eq!(
            r.backend_tls,
            Some(BackendTls {
                ca: dir.path().join("ca.pem"),
                server_name: None
            })
        );
        assert_eq!(backend_host("[::1]:993"), "::1");
        assert_eq!(backend_host("dovecot.lan:993"), "dovecot.lan");

        let e = |t: &str| Config::from_toml(t, "t").unwrap_err().to_string();
        let both = "[retrieval]\ncert = \"c\"\nkey = \"k\"\n\
                    [[retrieval.certificates]]\ncert = \"a\"\nkey = \"b\"\n";
        assert!(e(both).contains("use one"), "{}", e(both));
        let bad_name = "[[retrieval.certificates]]\ncert = \"a\"\nkey = \"b\"\nnames = [\"a b\"]";
        assert!(e(bad_name).contains("retrieval.certificates[0].names"));
        assert!(e("[retrieval]\nbackend_tls = true").contains("retrieval.backend_ca"));
        let bad_sni = "[retrieval]\nbackend_tls = true\nbackend_ca = \"c\"\n\
                       backend_server_name = \"a b\"";
        assert!(e(bad_sni).contains("retrieval.backend_server_name"));
        assert!(e("[retrieval]\ncert_check_interval = 0").contains("cert_check_interval"));

        // Every certificate file, and the backend CA, must be readable before anything starts.
        let e = c.check_paths().unwrap_err().to_string();
        assert!(e.starts_with("retrieval.cert"), "{e}");
        for f in ["a.pem", "a.key", "b.pem", "b.key"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let e = c.check_paths().unwrap_err().to_string();
        let ca = dir.path().join("ca.pem").display().to_string();
        assert!(e.starts_with(&format!("retrieval.backend_ca {ca}")), "{e}");
    }

    #[test]
    fn empty_listen_turns_an_endpoint_off() {
        let c = Config::from_toml("[listen]\nmilter = \"\"\nhttp = \"\"", "t").unwrap();
        assert_eq!(c.milter_listen, None);
        assert_eq!(c.http_listen, None);
    }

    #[test]
    fn the_milter_listens_on_a_unix_socket_given_by_absolute_path() {
        let c = Config::from_toml("[listen]\nmilter = \"unix:/run/mailbell/milter.sock\"", "t")
            .unwrap();
        assert_eq!(
            c.milter_listen,
            Some(MilterListen::Unix("/run/mailbell/milter.sock".into()))
        );
        for bad in ["unix:milter.sock", "unix:", "unix:/"] {
            let e = Config::from_toml(&format!("[listen]\nmilter = {bad:?}"), "t")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("listen.milter") && e.contains("absolute path"),
                "{bad}: {e}"
            );
        }
        let e = Config::from_toml("[listen]\nmilter = \"localhost\"", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not ip:port or unix:/path"), "{e}");
    }
}
