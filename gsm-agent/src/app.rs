//! Wires the agent together: `serve`, `send-test`, `status`, `demo` and `pki`.
//!
//! A listener that cannot go on (its socket failed) stops the whole agent, and `serve` returns
//! the error so that the process exits non-zero and its supervisor restarts it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use mailbell_link::http_server::HttpStats;
use mailbell_link::listen::{Acceptor, ListenerStats};
use mailbell_link::memory::{MemoryOutbox, Settled};
use mailbell_link::net::{
    self, ClientSettings, ClientStats, Endpoint, OutItem, Outbox, ServerStats, SessionEvent,
    StoreError,
};
use mailbell_link::pki::{ensure_dev_pki, DevPkiPaths};
use mailbell_link::sender::SenderConfig;
use mailbell_link::tls::{self, ClientTlsFiles};
use mailbell_link::{NotifId, Notification};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, LinkTls, ModemEntry};
use crate::dispatch::{DispatchStats, Dispatcher, History, SinkFailure, SmsSink};
use crate::inbox::{Inbox, Validator};
use crate::modem::driver::{self, ModemConfig, ModemHandle};
use crate::modem::pool::{Pacing, Pool, PoolModemStatus};
use crate::phone::E164;
use crate::render::Renderer;
use crate::sim::{SimModem, SimOptions};

/// The modem pool as the dispatcher's sink.
struct PoolSink {
    pool: Pool,
    wait: Duration,
}

impl SmsSink for PoolSink {
    async fn submit(
        &self,
        pdus: Vec<(usize, String)>,
        avoid: Vec<String>,
    ) -> Result<String, SinkFailure> {
        self.pool
            .submit_avoiding(pdus, self.wait, &avoid)
            .await
            .map(|r| r.modem)
            .map_err(|e| e.into_sink_failure())
    }
}

/// A running agent.
pub struct Running {
    pub link_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    /// The in-process simulated modem, when no serial modem is configured.
    pub sim: Option<SimModem>,
    pub dev_pki: Option<DevPkiPaths>,
    pub inbox: Inbox,
    pub dispatch_stats: Arc<DispatchStats>,
    pub link_stats: Arc<ServerStats>,
    modems: Vec<ModemHandle>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    failures: Failures,
}

/// The first fatal error of any task (a listener that cannot go on). Recording one also
/// cancels the agent's shutdown token, so everything stops.
#[derive(Clone)]
struct Failures {
    shutdown: CancellationToken,
    first: Arc<std::sync::Mutex<Option<String>>>,
}

impl Failures {
    fn fail(&self, what: String) {
        error!(error = %what, "a listener failed; shutting down");
        self.first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert(what);
        self.shutdown.cancel();
    }

    fn error(&self) -> Option<String> {
        self.first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Running {
    /// Stops accepting, lets in-flight work finish (bounded), and closes the inbox.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(20), self.tracker.wait())
            .await
            .is_err()
        {
            warn!("tasks still running at shutdown");
        }
        for m in &self.modems {
            m.shutdown().await;
        }
        self.inbox.close();
        if let Some(sim) = self.sim {
            sim.close();
        }
        info!("agent stopped");
    }

    /// A token that stops the agent when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The error of the listener that failed, if one did (the shutdown token is then
    /// cancelled too).
    pub fn failure(&self) -> Option<anyhow::Error> {
        self.failures.error().map(|e| anyhow!(e))
    }
}

fn validator(renderer: Arc<Renderer>) -> Validator {
    Arc::new(move |n: &Notification| {
        n.phone
            .parse::<E164>()
            .map_err(|e| format!("invalid phone number: {e}"))?;
        match &n.text {
            Some(t) if t.trim().is_empty() => Err("empty text".to_string()),
            Some(t) => renderer.check_literal(n, t).map_err(|e| e.to_string()),
            None => renderer
                .render(n)
                .map(|_| ())
                .map_err(|e| format!("cannot render SMS: {e}")),
        }
    })
}

/// Starts every part of the agent and returns once it is listening.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    // Everything that can be checked is checked before the data directory and the stores are
    // created, so that a failed start leaves nothing behind.
    // Modems: the configured serial ports, or one simulated modem on a pseudo-terminal when
    // the configuration asks for it (never as a silent fallback).
    let mut entries = cfg.modems.clone();
    let mut sim = None;
    match (entries.is_empty(), cfg.simulator.enable) {
        (true, false) => anyhow::bail!(
            "no modem configured: add a [[modem]] section (name, device) for each GSM modem, \
             or set [simulator] enable = true (or serve --simulate) to run on a simulated modem \
             (nothing reaches a phone)"
        ),
        (false, true) => anyhow::bail!(
            "[simulator] enable = true and {} [[modem]] section(s): a simulated modem does not \
             run beside real ones; remove one of the two",
            entries.len()
        ),
        _ => {}
    }
    cfg.check_paths()?;
    let renderer = Arc::new(Renderer::new(cfg.sms.render.clone()).context("sms templates")?);
    for kind in renderer.missing_billing_templates() {
        warn!(
            language = %cfg.sms.render.default_language,
            "no {kind} template for the default language: billing notices in a language without \
             one are refused; add `{kind} = \"…\"` to [sms.templates.<language>]"
        );
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("create agent.data_dir {}", cfg.data_dir.display()))?;
    let (files, dev_pki) = crate::server::resolve_tls(&cfg.link)?;
    let settings = crate::server::settings(&cfg.link, &files)?;
    let inbox = Inbox::open(
        &cfg.data_dir.join("inbox"),
        cfg.inbox.clone(),
        validator(renderer.clone()),
    )?;

    if entries.is_empty() {
        let opts = SimOptions {
            submit_delay: cfg.simulator.submit_delay,
            pdu_log: Some(
                cfg.simulator
                    .pdu_log
                    .clone()
                    .unwrap_or_else(|| cfg.data_dir.join("sim-pdus.jsonl")),
            ),
            // Only `send-test` and the demo look at them; the PDU log keeps every one.
            keep_received: Some(1_000),
            ..SimOptions::default()
        };
        let s = SimModem::spawn(opts).context("start the simulated modem")?;
        warn!(device = %s.device_path().display(), "[simulator] enable = true: SMS go to a simulated modem, not to phones");
        let mut modem = ModemConfig::new("sim0", s.device_path());
        modem.submit_timeout = Duration::from_secs(30);
        modem.reopen_backoff_max = Duration::from_secs(5);
        entries.push(ModemEntry {
            modem,
            pacing: Pacing {
                per_minute: cfg.simulator.per_minute,
                per_day: cfg.simulator.per_day,
            },
        });
        sim = Some(s);
    }
    let mut handles = Vec::new();
    let mut pool_modems = Vec::new();
    for e in &entries {
        let h = driver::spawn(e.modem.clone());
        handles.push(h.clone());
        pool_modems.push((h, e.pacing.clone()));
    }
    let pool = Pool::new(pool_modems);
    let status_pool = pool.clone();
    let modem_status: Arc<dyn Fn() -> Vec<PoolModemStatus> + Send + Sync> =
        Arc::new(move || status_pool.health());

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let failures = Failures {
        shutdown: shutdown.clone(),
        first: Arc::default(),
    };
    let dispatch_stats = Arc::new(DispatchStats::default());
    let dispatcher = Arc::new(Dispatcher {
        inbox: inbox.clone(),
        sink: Arc::new(PoolSink {
            pool,
            wait: cfg.sms.submit_wait,
        }),
        renderer,
        sms: cfg.sms.clone(),
        concurrency: entries.len(),
        resend_uncertain: cfg.inbox.resend_uncertain,
        stats: dispatch_stats.clone(),
        history: History::default(),
    });
    tracker.spawn(dispatcher.run(shutdown.clone()));

    let listener = crate::server::bind(&cfg.link).await?;
    let link_addr = listener.local_addr()?;
    let link_stats = Arc::new(ServerStats::default());
    {
        let (inbox, shutdown, stats) = (inbox.clone(), shutdown.clone(), link_stats.clone());
        let failures = failures.clone();
        tracker.spawn(async move {
            // `serve` retries resource errors (EMFILE, ...) itself; an error here means the
            // listening socket is unusable: stop, and exit non-zero so the supervisor restarts us.
            if let Err(e) =
                mailbell_link::net::serve(listener, settings, inbox, shutdown.clone(), stats).await
            {
                failures.fail(format!("link listener failed: {e}"));
            }
        });
    }
    info!(addr = %link_addr, "link listening");

    let metrics_addr = match cfg.metrics_listen {
        None => None,
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind metrics listener on {addr}"))?;
            let a = l.local_addr()?;
            let listener_stats = Arc::new(ListenerStats::default());
            let http_stats = Arc::new(HttpStats::default());
            let router = crate::metrics::router(crate::metrics::Sources {
                inbox: inbox.stats.clone(),
                dispatch: dispatch_stats.clone(),
                link: link_stats.clone(),
                modems: modem_status,
                store: inbox.clone(),
                admin_token: cfg.admin_token.clone(),
                listeners: vec![
                    ("link", link_stats.listener.clone()),
                    ("status", listener_stats.clone()),
                ],
                http: vec![("status", http_stats.clone())],
                certificates: vec![("cert", files.cert.clone()), ("ca", files.ca.clone())],
            });
            let hc = cfg.metrics_http.clone();
            let limits = hc.limits(hc.max_connections.unwrap_or(1));
            let acceptor = Acceptor::new(l, limits, "status", listener_stats);
            let (stop, failures) = (shutdown.clone(), failures.clone());
            tracker.spawn(async move {
                let r =
                    mailbell_link::http_server::serve(acceptor, router, hc, http_stats, stop).await;
                if let Err(e) = r {
                    failures.fail(format!("status listener failed: {e}: {}", e.source));
                }
            });
            info!(addr = %a, "metrics listening");
            Some(a)
        }
    };

    // Purge old dedupe entries once an hour.
    {
        let (inbox, stop, retention) =
            (inbox.clone(), shutdown.clone(), cfg.inbox.dedupe_retention);
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                }
                let inbox = inbox.clone();
                match tokio::task::spawn_blocking(move || inbox.purge_seen(retention)).await {
                    Ok(Ok(n)) if n > 0 => info!(purged = n, "expired dedupe entries purged"),
                    Ok(Err(e)) => error!(error = %e, "dedupe purge failed"),
                    _ => {}
                }
            }
        });
    }

    Ok(Running {
        link_addr,
        metrics_addr,
        sim,
        dev_pki,
        inbox,
        dispatch_stats,
        link_stats,
        modems: handles,
        shutdown,
        tracker,
        failures,
    })
}

/// `serve`: runs until SIGTERM or Ctrl-C.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let data_dir = cfg.data_dir.clone();
    let fresh = !data_dir.exists();
    let running = match start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            // A failed start leaves nothing behind: a data directory this start created goes.
            if fresh {
                let _ = std::fs::remove_dir_all(&data_dir);
            }
            return Err(e);
        }
    };
    // Every listener is bound: units ordered after this one may start.
    match mailbell_link::systemd::notify_ready() {
        Ok(sent) => tracing::debug!(sent, "readiness notification"),
        Err(e) => warn!(error = %e, "cannot tell systemd that the agent is ready"),
    }
    let stop = running.shutdown_token();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupt received; shutting down"),
        _ = term.recv() => info!("SIGTERM received; shutting down"),
        _ = stop.cancelled() => error!("a listener failed; shutting down"),
    }
    let failure = running.failure();
    running.stop().await;
    match failure {
        // Non-zero exit: the supervisor restarts the agent.
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Client-side TLS for `send-test`: explicit files, or the client certificate of the dev PKI
/// the config points at. The dev PKI must exist already (the agent creates it when it starts):
/// a client that made its own CA would only fail the handshake.
pub fn client_tls(
    cfg: &Config,
    explicit: Option<ClientTlsFiles>,
) -> anyhow::Result<ClientTlsFiles> {
    if let Some(f) = explicit {
        return Ok(f);
    }
    match &cfg.link.tls {
        LinkTls::DevPki { dir, .. } => {
            let files = DevPkiPaths::in_dir(dir).client_files();
            for f in [&files.ca, &files.cert, &files.key] {
                if !f.is_file() {
                    bail!(
                        "no dev PKI client certificate at {} (the agent creates its dev PKI when \
                         it first starts): start the agent with this config first, or pass \
                         --ca, --cert and --key",
                        f.display()
                    );
                }
            }
            Ok(files)
        }
        LinkTls::Files { .. } => bail!(
            "the agent uses operator certificates: pass --ca, --cert and --key for a client certificate"
        ),
    }
}

/// An outbox for one send that also keeps the first failure to reach the agent, so a caller
/// can report it at once instead of retrying until its deadline.
struct OneShot {
    inner: Arc<MemoryOutbox>,
    unreachable: std::sync::Mutex<Option<String>>,
}

impl OneShot {
    fn unreachable(&self) -> Option<String> {
        self.unreachable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Whether a failure to reach the agent is the answer (connection refused, a name that does
/// not resolve, a certificate one side does not trust) rather than something that may pass
/// (a timeout or a reset while the agent is busy), which is retried until the deadline.
fn is_final(reason: &str) -> bool {
    let r = reason.to_ascii_lowercase();
    [
        "refused",
        "certificate",
        "alert",
        "failed to lookup",
        "dns name",
    ]
    .iter()
    .any(|w| r.contains(w))
}

impl Outbox for OneShot {
    fn ready(&self, after: Option<u64>, max: usize) -> Result<Vec<OutItem>, StoreError> {
        self.inner.ready(after, max)
    }
    fn acked(&self, ids: &[NotifId]) -> Result<(), StoreError> {
        self.inner.acked(ids)
    }
    fn dead_letter(&self, id: NotifId, reason: &str) -> Result<(), StoreError> {
        self.inner.dead_letter(id, reason)
    }
    fn retry_later(&self, id: NotifId, after: Duration, reason: &str) -> Result<(), StoreError> {
        self.inner.retry_later(id, after, reason)
    }
    fn notifier(&self) -> Arc<tokio::sync::Notify> {
        self.inner.notifier()
    }
    fn session_event(&self, event: SessionEvent<'_>) {
        if let SessionEvent::Failed { reason, .. } = event {
            let reason = reason.to_string();
            if is_final(&reason) {
                self.unreachable
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_or_insert(reason);
                self.inner.settled.notify_waiters();
            }
        }
    }
}

/// Sends one notice through the real link and waits for the agent's ACK or NACK.
pub async fn send_one(
    agent: &str,
    server_name: &str,
    tls_files: &ClientTlsFiles,
    n: Notification,
    timeout: Duration,
) -> anyhow::Result<()> {
    let outbox = MemoryOutbox::new();
    let id = n.id;
    outbox.push(id, n.encode_payload().context("encode notification")?);
    let oneshot = Arc::new(OneShot {
        inner: outbox.clone(),
        unreachable: std::sync::Mutex::new(None),
    });
    let settings = ClientSettings {
        agents: vec![Endpoint {
            addr: agent.to_string(),
            server_name: server_name.to_string(),
        }],
        tls: tls::client_config(tls_files)?,
        sender: SenderConfig {
            name: "send-test".into(),
            ..SenderConfig::default()
        },
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(10),
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_secs(2),
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(net::run_client(
        settings,
        oneshot.clone(),
        stop.clone(),
        Arc::new(ClientStats::default()),
    ));
    let waited = tokio::time::timeout(timeout, async {
        loop {
            let settled = outbox.settled.notified();
            if let Some(o) = outbox.outcome(&id) {
                return Ok(o);
            }
            if let Some(reason) = oneshot.unreachable() {
                return Err(reason);
            }
            settled.await;
        }
    })
    .await;
    stop.cancel();
    let _ = task.await;
    match waited {
        Err(_) => bail!("no answer from the agent at {agent} within {timeout:?}"),
        Ok(Ok(Settled::Acked)) => Ok(()),
        Ok(Ok(Settled::Dead(reason))) => bail!("agent refused the notice: {reason}"),
        Ok(Err(reason)) if reason.contains("certificate") => bail!(
            "cannot reach the agent at {agent}: {reason} (is the CA the one that signed the \
             agent's certificate, and does the certificate name {server_name}?)"
        ),
        Ok(Err(reason)) => bail!("cannot reach the agent at {agent}: {reason}"),
    }
}

/// `status`: prints the agent's status document.
pub async fn status(addr: SocketAddr) -> anyhow::Result<crate::metrics::Status> {
    let body = http_get(addr, "/status").await?;
    serde_json::from_str(&body).context("parse status document")
}

/// A minimal HTTP/1.0 GET (loopback status endpoint only), with a timeout.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    http_request(addr, "GET", path, None).await
}

/// A request to the agent's own endpoint; anything but 200 is an error carrying the answer.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
) -> anyhow::Result<String> {
    let auth = bearer.map(|t| format!("Bearer {t}"));
    let r = mailbell_link::http::request(
        addr,
        method,
        path,
        auth.as_deref(),
        None,
        Duration::from_secs(10),
    )
    .await
    .with_context(|| format!("the agent's status endpoint {addr}"))?;
    if r.status != 200 {
        bail!("status endpoint answered {}: {}", r.status, r.body.trim());
    }
    Ok(r.body)
}

/// The notice `send-test` sends: a literal text to `phone`, for no mailbox.
pub fn test_notification(phone: &str, text: String, max_parts: Option<u8>) -> Notification {
    Notification {
        id: NotifId::random(),
        phone: phone.to_string(),
        received_at_ms: chrono::Utc::now().timestamp_millis(),
        count: 1,
        max_parts: max_parts.unwrap_or(0),
        text: Some(text),
        ..Notification::default()
    }
}

/// A sample notice like the mail host would send.
pub fn sample_notification(phone: &str) -> Notification {
    Notification {
        id: NotifId::random(),
        phone: phone.to_string(),
        recipient: "alice@example.com".into(),
        sole_address: true,
        from_name: "张伟".into(),
        from_addr: "zhang.wei@example.cn".into(),
        subject: "关于下周项目评审会议的安排 (Project review next week)".into(),
        received_at_ms: chrono::Utc::now().timestamp_millis(),
        language: "zh".into(),
        count: 1,
        max_parts: 0,
        text: None,
        ..Notification::default()
    }
}

/// `demo`: runs an agent on a simulated modem, sends a sample notice through the real link and
/// prints the SMS that reached the modem.
pub async fn demo(dir: &Path) -> anyhow::Result<()> {
    let mut cfg = Config::from_toml("", "(defaults)")?;
    cfg.simulator.enable = true;
    cfg.data_dir = dir.to_path_buf();
    cfg.link.listen = "127.0.0.1:0".parse()?;
    cfg.metrics_listen = Some("127.0.0.1:0".parse()?);
    if let LinkTls::DevPki { dir: d, .. } = &mut cfg.link.tls {
        *d = dir.join("pki");
    }
    let running = start(cfg.clone()).await?;
    let sim = running
        .sim
        .as_ref()
        .ok_or_else(|| anyhow!("demo needs the simulated modem"))?;
    let before = sim.received().len();
    let tls_files = client_tls(&cfg, None)?;
    let n = sample_notification("+8613800138000");
    println!("mailbell demo");
    println!(
        "  agent link      : {} (mutual TLS, dev PKI in {})",
        running.link_addr,
        dir.join("pki").display()
    );
    if let Some(m) = running.metrics_addr {
        println!("  metrics         : http://{m}/metrics");
    }
    println!("  simulated modem : {}", sim.device_path().display());
    println!(
        "  notice          : {} -> {} ({}), subject {:?}",
        n.from_addr,
        n.recipient,
        E164_MASK(&n.phone),
        n.subject
    );
    send_one(
        &running.link_addr.to_string(),
        "localhost",
        &tls_files,
        n,
        Duration::from_secs(10),
    )
    .await?;
    println!("  link            : ACK (durable in the agent inbox)");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let pdus = loop {
        let got = sim.received();
        if got.len() > before {
            break got[before..].to_vec();
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the simulated modem received nothing within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for p in &pdus {
        let d = crate::modem::pdu::decode_submit(&p.hex)?;
        println!(
            "  modem received  : AT+CMGS={} ({:?}, to {})",
            p.tpdu_len,
            d.alphabet,
            E164_MASK(&d.destination)
        );
        println!("  PDU             : {}", p.hex);
        println!("  SMS text        : {}", d.text);
    }
    running.stop().await;
    Ok(())
}

#[allow(non_snake_case)]
fn E164_MASK(phone: &str) -> String {
    phone
        .parse::<E164>()
        .map(|p| p.masked())
        .unwrap_or_else(|_| "(invalid)".into())
}

/// `pki`: creates (or keeps) a dev PKI and prints the file paths.
pub fn pki(
    dir: &Path,
    agent_names: &[String],
    client: &str,
    force: bool,
) -> anyhow::Result<DevPkiPaths> {
    Ok(ensure_dev_pki(dir, agent_names, client, force)?)
}

/// The default data directory for `demo`.
pub fn default_demo_dir() -> PathBuf {
    PathBuf::from("var/demo")
}
