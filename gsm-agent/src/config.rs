//! The agent's configuration: TOML parsed once into typed values. Every key has a default, so
//! an empty file (or none) runs a local agent with a dev PKI and a simulated modem.
//! config/gsm-agent.example.toml lists every key.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::modem::cms::{ErrorClass, RetryPolicy};
use crate::modem::driver::ModemConfig;
use crate::modem::pool::Pacing;
use crate::render::{builtin_templates, RenderConfig, Template};

use mailbell_link::http_server::HttpConfig;
use mailbell_link::paths;
pub use mailbell_link::units::{de_duration, parse_duration, parse_utc_offset, ConfigError};
use mailbell_link::units::{parse_toml, read_config};

/// The environment variable that names the configuration file when `--config` is not given.
pub const CONFIG_ENV: &str = "MAILBELL_GSM_AGENT_CONFIG";

/// The configuration file used when neither `--config` nor [`CONFIG_ENV`] names one.
pub const DEFAULT_CONFIG: &str = "/etc/mailbell/gsm-agent.toml";

/// The configuration file a command uses: the one named (by `--config` or [`CONFIG_ENV`]),
/// else `default` when it exists. Never nothing: an agent without a file would keep its state
/// in the current directory, where the running daemon never looks.
pub fn resolve_path(named: Option<&Path>, default: &Path) -> Result<PathBuf, ConfigError> {
    if let Some(p) = named {
        return Ok(p.to_path_buf());
    }
    if default.is_file() {
        return Ok(default.to_path_buf());
    }
    Err(ConfigError::Invalid(format!(
        "no configuration file: {} does not exist; pass --config FILE or set {CONFIG_ENV} \
         (config/gsm-agent.example.toml lists every key; `mailbell-gsm-agent demo` runs \
         without one)",
        default.display()
    )))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    agent: RawAgent,
    link: RawLink,
    inbox: RawInbox,
    sms: RawSms,
    metrics: RawMetrics,
    simulator: RawSimulator,
    modem: Vec<RawModem>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAgent {
    data_dir: PathBuf,
}

impl Default for RawAgent {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("var/gsm-agent"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLink {
    listen: String,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    dev_pki: bool,
    dev_pki_dir: Option<PathBuf>,
    agent_names: Vec<String>,
    allowed_clients: Vec<String>,
    window: u16,
    max_frame: u32,
    #[serde(deserialize_with = "de_duration")]
    heartbeat: Duration,
    #[serde(deserialize_with = "de_duration")]
    dead_after: Duration,
    #[serde(deserialize_with = "de_duration")]
    handshake_timeout: Duration,
    #[serde(deserialize_with = "de_duration")]
    io_timeout: Duration,
    max_sessions: usize,
    #[serde(deserialize_with = "de_duration")]
    tls_handshake_timeout: Duration,
    max_handshakes: usize,
    max_handshakes_per_source: usize,
    #[serde(deserialize_with = "de_duration")]
    session_wait: Duration,
}

impl Default for RawLink {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7465".into(),
            ca: None,
            cert: None,
            key: None,
            dev_pki: true,
            dev_pki_dir: None,
            agent_names: vec!["localhost".into(), "127.0.0.1".into()],
            allowed_clients: vec![],
            window: 1024,
            max_frame: mailbell_link::frame::DEFAULT_MAX_FRAME,
            heartbeat: Duration::from_secs(10),
            dead_after: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(10),
            max_sessions: 64,
            tls_handshake_timeout: Duration::from_secs(10),
            max_handshakes: 128,
            max_handshakes_per_source: 8,
            session_wait: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawInbox {
    #[serde(deserialize_with = "de_duration")]
    dedupe_retention: Duration,
    max_queued: u64,
    resend_uncertain: bool,
    /// sled's page cache, in MB.
    cache_mb: u64,
}

impl Default for RawInbox {
    fn default() -> Self {
        let d = crate::inbox::InboxConfig::default();
        Self {
            dedupe_retention: d.dedupe_retention,
            max_queued: d.max_queued,
            resend_uncertain: d.resend_uncertain,
            cache_mb: d.cache_bytes / (1024 * 1024),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSms {
    default_language: String,
    utc_offset: String,
    time_format: String,
    default_max_parts: u8,
    max_parts_cap: u8,
    #[serde(deserialize_with = "de_duration")]
    validity: Duration,
    status_report: bool,
    templates: BTreeMap<String, Template>,
    /// Attempts per notice before it is dead-lettered, whatever the error class allows.
    max_attempts: u16,
    /// How long a notice may wait for a free modem before this is logged as an alarm.
    #[serde(deserialize_with = "de_duration")]
    submit_wait: Duration,
    /// Per error class overrides of the retry policy, e.g. `[sms.retry.transient]`.
    retry: BTreeMap<String, RawRetry>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    attempts: Option<u32>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    base_delay: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    max_delay: Option<Duration>,
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// The error class a `[sms.retry.<name>]` table names.
pub fn parse_error_class(name: &str) -> Option<ErrorClass> {
    let n: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_lowercase();
    Some(match n.as_str() {
        "permanent" => ErrorClass::Permanent,
        "destinationunavailable" => ErrorClass::DestinationUnavailable,
        "transient" => ErrorClass::Transient,
        "bug" => ErrorClass::Bug,
        "modemfault" => ErrorClass::ModemFault,
        "networkpause" => ErrorClass::NetworkPause,
        "unknown" => ErrorClass::Unknown,
        "busy" => ErrorClass::Busy,
        _ => return None,
    })
}

impl Default for RawSms {
    fn default() -> Self {
        let r = RenderConfig::default();
        Self {
            default_language: r.default_language,
            utc_offset: "+08:00".into(),
            time_format: r.time_format,
            default_max_parts: r.default_max_parts,
            max_parts_cap: r.max_parts_cap,
            validity: Duration::from_secs(86_400),
            status_report: false,
            templates: BTreeMap::new(),
            max_attempts: 10,
            submit_wait: Duration::from_secs(120),
            retry: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMetrics {
    listen: Option<String>,
    admin_token: Option<String>,
    http: HttpConfig,
}

/// Connections open at once on the status/metrics endpoint when `[metrics.http]
/// max_connections` is not set.
pub const STATUS_MAX_CONNECTIONS: usize = 64;

/// Upper bound of `[inbox] cache_mb` (sled's page cache): 4 GiB.
pub const MAX_CACHE_MB: u64 = 4096;

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            listen: Some("127.0.0.1:9465".into()),
            admin_token: None,
            http: HttpConfig::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSimulator {
    enable: bool,
    #[serde(deserialize_with = "de_duration")]
    submit_delay: Duration,
    pdu_log: Option<PathBuf>,
    per_minute: u32,
    per_day: u32,
}

impl Default for RawSimulator {
    fn default() -> Self {
        Self {
            enable: false,
            submit_delay: Duration::ZERO,
            pdu_log: None,
            per_minute: 0,
            per_day: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModem {
    name: String,
    device: PathBuf,
    #[serde(default = "default_baud")]
    baud: u32,
    #[serde(default)]
    pin: Option<String>,
    #[serde(default = "default_cmd_timeout", deserialize_with = "de_duration")]
    command_timeout: Duration,
    #[serde(default = "default_submit_timeout", deserialize_with = "de_duration")]
    submit_timeout: Duration,
    #[serde(default = "default_submit_floor", deserialize_with = "de_duration")]
    submit_timeout_floor: Duration,
    #[serde(default)]
    init_commands: Vec<String>,
    #[serde(default = "default_reopen_max", deserialize_with = "de_duration")]
    reopen_backoff_max: Duration,
    #[serde(default = "default_per_minute")]
    per_minute: u32,
    #[serde(default)]
    per_day: u32,
}

fn default_baud() -> u32 {
    115_200
}
fn default_cmd_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_submit_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_submit_floor() -> Duration {
    crate::modem::submit_time::DEFAULT_FLOOR
}
fn default_reopen_max() -> Duration {
    Duration::from_secs(60)
}
fn default_per_minute() -> u32 {
    8
}

/// TLS material for the link listener.
#[derive(Clone, Debug)]
pub enum LinkTls {
    /// Operator-provided files.
    Files {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    /// A dev PKI generated (once) in this directory.
    DevPki { dir: PathBuf, names: Vec<String> },
}

/// The link listener.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub listen: SocketAddr,
    pub tls: LinkTls,
    pub allowed_clients: Vec<String>,
    pub receiver: mailbell_link::receiver::ReceiverConfig,
    /// The HELLO wait, from the end of the TLS handshake.
    pub handshake_timeout: Duration,
    pub io_timeout: Duration,
    pub max_sessions: usize,
    /// From accept to an authorised TLS session.
    pub tls_handshake_timeout: Duration,
    /// Connections in the TLS handshake at once (the pending pool).
    pub max_handshakes: usize,
    /// Connections in the TLS handshake at once from one source address (`None`: no cap).
    pub max_handshakes_per_source: Option<usize>,
    /// How long an authorised connection waits for a session slot before REFUSE BUSY.
    pub session_wait: Duration,
}

/// One serial modem: the driver's settings (its `Debug` hides the PIN) and the SIM's pacing.
#[derive(Clone, Debug)]
pub struct ModemEntry {
    pub modem: ModemConfig,
    pub pacing: Pacing,
}

/// The simulated modem, which runs only when asked for (`[simulator] enable = true`) and no
/// `[[modem]]` is configured: an agent with no modem never falls back to it silently.
#[derive(Clone, Debug)]
pub struct SimulatorConfig {
    pub enable: bool,
    pub submit_delay: Duration,
    pub pdu_log: Option<PathBuf>,
    pub per_minute: u32,
    pub per_day: u32,
}

/// SMS rendering and submit policy.
#[derive(Clone, Debug)]
pub struct SmsConfig {
    pub render: RenderConfig,
    pub validity: Option<Duration>,
    pub status_report: bool,
    pub max_attempts: u16,
    pub submit_wait: Duration,
    /// Retry policy per error class (built-in defaults with the configured overrides).
    pub retry: HashMap<ErrorClass, RetryPolicy>,
}

impl SmsConfig {
    /// The retry policy for a class.
    pub fn policy(&self, class: ErrorClass) -> RetryPolicy {
        self.retry
            .get(&class)
            .copied()
            .unwrap_or_else(|| class.retry_policy())
    }
}

/// The whole agent configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub link: LinkConfig,
    pub inbox: crate::inbox::InboxConfig,
    pub sms: SmsConfig,
    pub metrics_listen: Option<SocketAddr>,
    /// Bearer token for the endpoint's write operations (requeue); none disables them.
    pub admin_token: Option<String>,
    /// The status/metrics endpoint's HTTP server (`max_connections` always set).
    pub metrics_http: HttpConfig,
    pub modems: Vec<ModemEntry>,
    pub simulator: SimulatorConfig,
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
        if let Some(p) = &mut self.simulator.pdu_log {
            *p = paths::resolve(base, p);
        }
        for m in &mut self.modems {
            m.modem.device = paths::resolve(base, &m.modem.device);
        }
    }

    /// Checks, before anything is created, that the certificate files can be read and that
    /// the data directory (and the dev PKI's, and the simulator's PDU log's) exists or can be
    /// created. An error names the key and the path.
    pub fn check_paths(&self) -> Result<(), ConfigError> {
        paths::check_dir_creatable("agent.data_dir", &self.data_dir)?;
        match &self.link.tls {
            LinkTls::Files { ca, cert, key } => {
                paths::check_readable_file("link.ca", ca)?;
                paths::check_readable_file("link.cert", cert)?;
                paths::check_readable_file("link.key", key)?;
            }
            LinkTls::DevPki { dir, .. } => paths::check_dir_creatable("link.dev_pki_dir", dir)?,
        }
        if let Some(p) = &self.simulator.pdu_log {
            paths::check_file_creatable("simulator.pdu_log", p)?;
        }
        Ok(())
    }

    /// Parses TOML text (`origin` names it in errors).
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_toml(text, origin)?;
        let inv = ConfigError::Invalid;
        let listen: SocketAddr = raw
            .link
            .listen
            .parse()
            .map_err(|_| inv(format!("link.listen {:?} is not ip:port", raw.link.listen)))?;
        let tls = match (raw.link.ca, raw.link.cert, raw.link.key) {
            (Some(ca), Some(cert), Some(key)) => LinkTls::Files { ca, cert, key },
            (None, None, None) if raw.link.dev_pki => LinkTls::DevPki {
                dir: raw
                    .link
                    .dev_pki_dir
                    .unwrap_or_else(|| raw.agent.data_dir.join("pki")),
                names: raw.link.agent_names,
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
        if raw.link.max_sessions == 0 {
            return Err(inv("link.max_sessions must be at least 1".into()));
        }
        if raw.link.max_handshakes == 0 {
            return Err(inv("link.max_handshakes must be at least 1".into()));
        }
        if raw.link.tls_handshake_timeout.is_zero() {
            return Err(inv("link.tls_handshake_timeout must be above 0".into()));
        }
        if raw.link.window == 0 {
            return Err(inv("link.window must be at least 1".into()));
        }
        if raw.link.max_frame < mailbell_link::frame::MIN_MAX_FRAME
            || raw.link.max_frame > mailbell_link::frame::DEFAULT_MAX_FRAME
        {
            return Err(inv(format!(
                "link.max_frame must be between {} and {}",
                mailbell_link::frame::MIN_MAX_FRAME,
                mailbell_link::frame::DEFAULT_MAX_FRAME
            )));
        }
        if !(1..=MAX_CACHE_MB).contains(&raw.inbox.cache_mb) {
            return Err(inv(format!(
                "inbox.cache_mb must be between 1 and {MAX_CACHE_MB} (got {})",
                raw.inbox.cache_mb
            )));
        }
        let mut templates = builtin_templates();
        templates.extend(raw.sms.templates);
        let render = RenderConfig {
            default_language: raw.sms.default_language,
            templates,
            utc_offset_minutes: parse_utc_offset(&raw.sms.utc_offset).map_err(inv)?,
            time_format: raw.sms.time_format,
            default_max_parts: raw.sms.default_max_parts,
            max_parts_cap: raw.sms.max_parts_cap,
        };
        let metrics_listen = match raw.metrics.listen {
            None => None,
            Some(s) if s.is_empty() => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|_| inv(format!("metrics.listen {s:?} is not ip:port")))?,
            ),
        };
        let mut metrics_http = raw.metrics.http;
        metrics_http.validate("metrics.http").map_err(inv)?;
        metrics_http
            .max_connections
            .get_or_insert(STATUS_MAX_CONNECTIONS);
        let mut names = std::collections::HashSet::new();
        let mut modems = Vec::new();
        for m in raw.modem {
            if !names.insert(m.name.clone()) {
                return Err(inv(format!("modem name {:?} is used twice", m.name)));
            }
            let mut modem = ModemConfig::new(m.name, m.device);
            modem.baud = m.baud;
            modem.pin = m.pin;
            modem.command_timeout = m.command_timeout;
            modem.submit_timeout = m.submit_timeout;
            modem.submit_timeout_floor = m.submit_timeout_floor;
            modem.init_commands = m.init_commands;
            modem.reopen_backoff_max = m.reopen_backoff_max;
            modems.push(ModemEntry {
                modem,
                pacing: Pacing {
                    per_minute: m.per_minute,
                    per_day: m.per_day,
                },
            });
        }
        let mut retry = HashMap::new();
        for (name, r) in raw.sms.retry {
            let class = parse_error_class(&name).ok_or_else(|| {
                inv(format!(
                    "sms.retry.{name}: unknown error class (permanent, destination-unavailable, \
                     transient, bug, modem-fault, network-pause, unknown, busy)"
                ))
            })?;
            let mut p = class.retry_policy();
            if let Some(a) = r.attempts {
                if a == 0 {
                    return Err(inv(format!("sms.retry.{name}.attempts must be at least 1")));
                }
                p.max_attempts = a;
            }
            if let Some(b) = r.base_delay {
                p.base_delay = b;
            }
            if let Some(m) = r.max_delay {
                p.max_delay = m;
            }
            retry.insert(class, p);
        }
        if raw.sms.max_attempts == 0 {
            return Err(inv("sms.max_attempts must be at least 1".into()));
        }
        Ok(Config {
            data_dir: raw.agent.data_dir,
            link: LinkConfig {
                listen,
                tls,
                allowed_clients: raw.link.allowed_clients,
                receiver: mailbell_link::receiver::ReceiverConfig {
                    window: raw.link.window,
                    max_frame: raw.link.max_frame,
                    heartbeat: raw.link.heartbeat,
                    dead_after: raw.link.dead_after,
                },
                handshake_timeout: raw.link.handshake_timeout,
                io_timeout: raw.link.io_timeout,
                max_sessions: raw.link.max_sessions,
                tls_handshake_timeout: raw.link.tls_handshake_timeout,
                max_handshakes: raw.link.max_handshakes,
                max_handshakes_per_source: (raw.link.max_handshakes_per_source > 0)
                    .then_some(raw.link.max_handshakes_per_source),
                session_wait: raw.link.session_wait,
            },
            inbox: crate::inbox::InboxConfig {
                dedupe_retention: raw.inbox.dedupe_retention,
                max_queued: raw.inbox.max_queued,
                resend_uncertain: raw.inbox.resend_uncertain,
                cache_bytes: raw.inbox.cache_mb * 1024 * 1024,
                ..Default::default()
            },
            sms: SmsConfig {
                render,
                validity: (!raw.sms.validity.is_zero()).then_some(raw.sms.validity),
                status_report: raw.sms.status_report,
                max_attempts: raw.sms.max_attempts,
                submit_wait: raw.sms.submit_wait,
                retry,
            },
            metrics_listen,
            admin_token: raw.metrics.admin_token.filter(|t| !t.is_empty()),
            metrics_http,
            modems,
            simulator: SimulatorConfig {
                enable: raw.simulator.enable,
                submit_delay: raw.simulator.submit_delay,
                pdu_log: raw.simulator.pdu_log,
                per_minute: raw.simulator.per_minute,
                per_day: raw.simulator.per_day,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_path_named_then_default_then_an_error_naming_the_options() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("gsm-agent.toml");
        let named = dir.path().join("other.toml");
        // Named wins, whether or not the default exists (reading it reports a missing file).
        assert_eq!(resolve_path(Some(&named), &default).unwrap(), named);
        let e = resolve_path(None, &default).unwrap_err().to_string();
        assert!(
            e.contains(&default.display().to_string())
                && e.contains("--config")
                && e.contains(CONFIG_ENV),
            "{e}"
        );
        std::fs::write(&default, "").unwrap();
        assert_eq!(resolve_path(None, &default).unwrap(), default);
        assert_eq!(resolve_path(Some(&named), &default).unwrap(), named);
    }

    #[test]
    fn relative_paths_resolve_against_the_config_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gsm-agent.toml");
        std::fs::write(
            &file,
            "[agent]\ndata_dir = \"state\"\n[simulator]\npdu_log = \"log/pdus.jsonl\"\n\
             [[modem]]\nname = \"m0\"\ndevice = \"/dev/ttyUSB0\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&file)).unwrap();
        assert_eq!(c.data_dir, dir.path().join("state"));
        assert!(
            matches!(&c.link.tls, LinkTls::DevPki { dir: d, .. } if *d == dir.path().join("state/pki"))
        );
        assert_eq!(c.simulator.pdu_log, Some(dir.path().join("log/pdus.jsonl")));
        assert_eq!(c.modems[0].modem.device, Path::new("/dev/ttyUSB0"));
        // Text without a file keeps its paths as written.
        let c = Config::from_toml("[agent]\ndata_dir = \"state\"", "t").unwrap();
        assert_eq!(c.data_dir, Path::new("state"));
    }

    #[test]
    fn empty_file_gives_working_defaults() {
        let c = Config::from_toml("", "t").unwrap();
        assert_eq!(c.link.listen.port(), 7465);
        assert!(matches!(c.link.tls, LinkTls::DevPki { .. }));
        assert!(c.modems.is_empty());
        assert!(c.sms.render.templates.contains_key("zh"));
        assert_eq!(c.sms.render.utc_offset_minutes, 480);
        assert_eq!(c.link.max_handshakes, 128);
        assert_eq!(c.link.max_handshakes_per_source, Some(8));
        assert_eq!(c.link.tls_handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.link.session_wait, Duration::from_secs(5));
    }

    /// An error as `main` prints it: the message and its causes (`{:#}` of the anyhow chain).
    fn chain(e: ConfigError) -> String {
        format!("{:#}", anyhow::Error::from(e))
    }

    #[test]
    fn handshake_limits_parse() {
        let c = Config::from_toml(
            "[link]\ntls_handshake_timeout = \"2s\"\nmax_handshakes = 16\nmax_handshakes_per_source = 0\nsession_wait = \"250ms\"",
            "t",
        )
        .unwrap();
        assert_eq!(c.link.tls_handshake_timeout, Duration::from_secs(2));
        assert_eq!(c.link.max_handshakes, 16);
        assert_eq!(
            c.link.max_handshakes_per_source, None,
            "0: no per-source cap"
        );
        assert_eq!(c.link.session_wait, Duration::from_millis(250));
    }

    #[test]
    fn inbox_cache_is_bounded_by_default_and_validated() {
        let c = Config::from_toml("", "t").unwrap();
        assert_eq!(c.inbox.cache_bytes, 4 * 1024 * 1024);
        let c = Config::from_toml("[inbox]\ncache_mb = 64", "t").unwrap();
        assert_eq!(c.inbox.cache_bytes, 64 * 1024 * 1024);
        for bad in ["0", "4097"] {
            let e = Config::from_toml(&format!("[inbox]\ncache_mb = {bad}"), "t")
                .map_err(chain)
                .unwrap_err();
            assert!(e.contains("inbox.cache_mb"), "{e}");
        }
        let e = Config::from_toml("[inbox]\ncache_mb = \"16MB\"", "t")
            .map_err(chain)
            .unwrap_err();
        assert!(e.contains("cache_mb"), "{e}");
    }

    #[test]
    fn status_http_defaults_and_keys() {
        let c = Config::from_toml("", "t").unwrap();
        assert_eq!(c.metrics_http.header_timeout, Duration::from_secs(10));
        assert_eq!(c.metrics_http.max_connections, Some(STATUS_MAX_CONNECTIONS));
        let c = Config::from_toml("[metrics.http]\nidle_timeout = \"3s\"", "t").unwrap();
        assert_eq!(c.metrics_http.idle_timeout, Duration::from_secs(3));
        let e = Config::from_toml("[metrics.http]\nbody_timeout = \"0s\"", "t")
            .map_err(chain)
            .unwrap_err();
        assert!(e.to_string().contains("metrics.http.body_timeout"), "{e}");
    }

    /// `key = value` or a `[table]` header, as opposed to prose.
    fn looks_like_toml(line: &str) -> bool {
        let key_ok = |k: &str| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c))
        };
        if let Some((k, _)) = line.split_once(" = ") {
            return key_ok(k.trim_end());
        }
        let header = line.split(" #").next().unwrap_or("").trim_end();
        let t = header.trim_start_matches('[').trim_end_matches(']');
        header.starts_with('[') && header.ends_with(']') && key_ok(t)
    }

    #[test]
    fn shipped_example_parses_to_the_defaults() {
        let text = include_str!("../../config/gsm-agent.example.toml");
        let ex = Config::from_toml(text, "gsm-agent.example.toml").unwrap();
        let d = Config::from_toml("", "t").unwrap();
        assert_eq!(format!("{:?}", ex.link), format!("{:?}", d.link));
        assert_eq!(format!("{:?}", ex.inbox), format!("{:?}", d.inbox));
        assert_eq!(
            format!("{:?}", ex.sms.render.templates),
            format!("{:?}", d.sms.render.templates)
        );
        assert_eq!(ex.sms.retry, d.sms.retry);
        assert_eq!(ex.metrics_listen, d.metrics_listen);
        assert_eq!(ex.metrics_http, d.metrics_http);
        assert_eq!(ex.data_dir, d.data_dir);
        assert!(ex.modems.is_empty());
        // Every commented-out key parses too.
        let uncommented: String = text
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|r| looks_like_toml(r))
                    .unwrap_or(l)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        if let Err(e) = Config::from_toml(&uncommented, "uncommented example") {
            panic!("{e}");
        }
    }

    #[test]
    fn durations_and_offsets() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert!(parse_duration("ten seconds").is_err());
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("10").is_err());
        let e = Config::from_toml("[link]\nheartbeat = \"10\"", "t").unwrap_err();
        let e = format!(
            "{e}: {}",
            std::error::Error::source(&e)
                .map(ToString::to_string)
                .unwrap_or_default()
        );
        assert!(e.contains("no unit"), "{e}");
        assert_eq!(parse_utc_offset("-05:30"), Ok(-330));
        assert!(parse_utc_offset("08:00").is_err());
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        let e = Config::from_toml("[link]\nlisten = \"nowhere\"", "t")
            .map_err(chain)
            .unwrap_err();
        assert!(e.to_string().contains("link.listen"), "{e}");
        let e = Config::from_toml("[link]\nlisen = \"x\"", "t")
            .map_err(chain)
            .unwrap_err();
        assert!(e.to_string().contains("lisen"), "{e}");
        let e = Config::from_toml("[link]\nmax_handshakes = 0", "t")
            .map_err(chain)
            .unwrap_err();
        assert!(e.to_string().contains("link.max_handshakes"), "{e}");
        let e = Config::from_toml("[link]\nca = \"ca.pem\"", "t")
            .map_err(chain)
            .unwrap_err();
        assert!(e.to_string().contains("none of them"), "{e}");
        let e = Config::from_toml(
            "[[modem]]\nname = \"a\"\ndevice = \"/dev/ttyUSB0\"\n[[modem]]\nname = \"a\"\ndevice = \"/dev/ttyUSB1\"",
            "t",
        )
        .map_err(chain).unwrap_err();
        assert!(e.to_string().contains("used twice"), "{e}");
    }

    #[test]
    fn retry_overrides() {
        let c = Config::from_toml(
            "[sms.retry.transient]\nattempts = 2\nbase_delay = \"100ms\"\n[sms.retry.Unknown]\nmax_delay = \"1s\"",
            "t",
        )
        .unwrap();
        let t = c.sms.policy(ErrorClass::Transient);
        assert_eq!(
            (t.max_attempts, t.base_delay),
            (2, Duration::from_millis(100))
        );
        assert_eq!(
            c.sms.policy(ErrorClass::Unknown).max_delay,
            Duration::from_secs(1)
        );
        assert_eq!(
            c.sms.policy(ErrorClass::Busy),
            ErrorClass::Busy.retry_policy()
        );
        let e = Config::from_toml("[sms.retry.sometimes]\nattempts = 2", "t")
            .map_err(chain)
            .unwrap_err();
        assert!(e.to_string().contains("unknown error class"), "{e}");
    }

    #[test]
    fn modems_and_templates_parse() {
        let c = Config::from_toml(
            r#"
[sms.templates.en]
single = "Mail for {recipient}: {subject}"
coalesced = "{count} mails for {recipient}"
[[modem]]
name = "gsm0"
device = "/dev/ttyUSB0"
pin = "1234"
per_minute = 6
per_day = 500
submit_timeout = "90s"
[[modem]]
name = "gsm1"
device = "/dev/ttyUSB1"
submit_timeout_floor = "4s"
"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.modems[0].pacing.per_day, 500);
        assert_eq!(c.modems[0].modem.submit_timeout, Duration::from_secs(90));
        assert_eq!(
            c.modems[0].modem.submit_timeout_floor,
            Duration::from_secs(10)
        );
        assert_eq!(c.modems[1].modem.submit_timeout, Duration::from_secs(60));
        assert_eq!(
            c.modems[1].modem.submit_timeout_floor,
            Duration::from_secs(4)
        );
        assert_eq!(c.modems[0].modem.baud, 115_200);
        assert!(
            !format!("{:?}", c.modems[0]).contains("1234"),
            "the PIN never shows in Debug"
        );
        assert_eq!(
            c.sms.render.templates["en"].single,
            "Mail for {recipient}: {subject}"
        );
    }

    #[test]
    fn billing_templates_parse_and_are_checked() {
        let c = Config::from_toml(
            r#"
[sms.templates.en]
single = "Mail: {subject}"
coalesced = "{count} mails"
arrears = "{address} owes {balance}"
"#,
            "t",
        )
        .unwrap();
        let en = &c.sms.render.templates["en"];
        assert_eq!(en.arrears.as_deref(), Some("{address} owes {balance}"));
        assert_eq!(en.warning, None, "left to the built-in text");
        let r = crate::render::Renderer::new(c.sms.render.clone()).unwrap();
        assert!(r.missing_billing_templates().is_empty());
        // A misspelt key is refused by name.
        let e = Config::from_toml(
            "[sms.templates.en]\nsingle = \"a\"\ncoalesced = \"b\"\narears = \"c\"",
            "t",
        )
        .map_err(chain)
        .unwrap_err();
        assert!(e.to_string().contains("arears"), "{e}");
        // A placeholder the kind does not have is refused when the agent builds its renderer.
        let c = Config::from_toml(
            "[sms.templates.en]\nsingle = \"a\"\ncoalesced = \"b\"\nwarning = \"{subject}\"",
            "t",
        )
        .unwrap();
        let e = crate::render::Renderer::new(c.sms.render).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown placeholder {subject} in the warning template for language \"en\""
        );
    }
}
