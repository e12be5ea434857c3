//! `mailbell serve`: opens the stores, starts the intake, the link client and the listeners
//! (Stalwart endpoints, milter, admin API), and stops them all on the cancellation token.
//!
//! The HTTP listeners run on [`mailbell_link::http_server`] (header, idle, body and write
//! timeouts; a connection cap taken before accept). A task that cannot go on (a listener whose
//! socket fails, the intake scheduler) is reported through [`Running::failed`]: `serve` then
//! shuts everything down and returns the error, so the process exits non-zero and its
//! supervisor restarts it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, Context};
use mailbell_link::http_server::{HttpConfig, HttpStats};
use mailbell_link::listen::{Acceptor, ListenerStats};
use mailbell_link::net::{ClientSettings, ClientStats};
use mailbell_link::pki::ensure_dev_pki;
use mailbell_link::tls::{self, ClientTlsFiles};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::audit::AuditLog;
use crate::billing::Ledger;
use crate::config::{Config, LinkTls, MilterListen};
use crate::meter::MeterStore;
use crate::mta::stalwart::StalwartStats;
use crate::notify::intake::{IntakeStats, MailIntake};
use crate::notify::outbox::{Outbox, OutboxConfig};
use crate::notify::sender::AuditedOutbox;
use crate::retrieval::certs::CertStore;
use crate::retrieval::server;
use crate::users::UserStore;

/// The stores one daemon owns.
#[derive(Clone)]
pub struct Stores {
    pub outbox: Outbox,
    pub users: UserStore,
    pub audit: AuditLog,
    /// What the retrieval proxy's sessions retrieved.
    pub meter: MeterStore,
    /// The ledger of record (its own thread).
    pub ledger: Ledger,
}

impl Stores {
    /// Opens all five (blocking: call from `spawn_blocking` or before the runtime is busy).
    pub fn open(cfg: &Config) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("create data_dir {}", cfg.data_dir.display()))?;
        let outbox = Outbox::open(
            &cfg.outbox_path(),
            OutboxConfig {
                max_depth: cfg.outbox_max_depth,
                max_age: cfg.outbox_max_age,
                ..Default::default()
            },
        )?;
        let users = UserStore::open(&cfg.users_path())?.with_languages(&cfg.link.agent_languages);
        let audit = AuditLog::open(&cfg.audit_path(), cfg.audit.clone())?;
        // Written only by the retrieval proxy; without it the admin API still reads it.
        let meter = if cfg.retrieval.enabled() {
            MeterStore::open(&cfg.meter_path(), cfg.meter.clone())?
        } else {
            MeterStore::open_read_only(&cfg.meter_path())
        };
        let ledger = Ledger::open(&cfg.ledger_path())?;
        Ok(Self {
            outbox,
            users,
            audit,
            meter,
            ledger,
        })
    }

    /// Flushes and stops the committers.
    pub fn close(&self) {
        self.outbox.close();
        if let Err(e) = self.users.flush() {
            error!(error = %e, "user registry flush on close failed");
        }
        if let Err(e) = self.audit.flush() {
            error!(error = %e, "audit log flush on close failed");
        }
        if !self.meter.read_only() {
            if let Err(e) = self.meter.flush() {
                error!(error = %e, "meter store flush on close failed");
            }
        }
    }
}

/// The link's client certificate files: the configured ones, or the dev PKI (created once).
pub fn client_tls_files(tls: &LinkTls) -> anyhow::Result<ClientTlsFiles> {
    Ok(match tls {
        LinkTls::Files { ca, cert, key } => ClientTlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        },
        LinkTls::DevPki {
            dir,
            agent_names,
            client_name,
        } => ensure_dev_pki(dir, agent_names, client_name, false)
            .with_context(|| format!("dev PKI in {}", dir.display()))?
            .client_files(),
    })
}

/// Everything a running daemon exposes (tests and the demo read the bound addresses).
pub struct Running {
    pub http_addr: Option<SocketAddr>,
    /// The milter's bound address, when it listens on TCP.
    pub milter_addr: Option<SocketAddr>,
    /// The milter's socket, when it listens on a Unix-domain socket.
    pub milter_path: Option<PathBuf>,
    pub admin_addr: Option<SocketAddr>,
    /// The retrieval proxy's bound listeners, by name (`pop3`, `pop3s`, `imap`, `imaps`).
    pub retrieval_addrs: Vec<(&'static str, SocketAddr)>,
    /// The retrieval proxy's totals over ended sessions.
    pub retrieval_stats: Arc<crate::retrieval::server::RetrievalStats>,
    pub stores: Stores,
    pub intake: MailIntake,
    pub link_stats: Arc<ClientStats>,
    pub stalwart_stats: Arc<StalwartStats>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    failures: Failures,
    /// Bumped to reload what can be reloaded (the retrieval certificates, the zone and
    /// blocklist files): SIGHUP.
    reload: tokio::sync::watch::Sender<u64>,
    /// Zones and blocklist in force.
    pub policy: Arc<crate::policy::Policy>,
}

/// The first fatal error of any task; cancelling `failed` wakes [`Running::failed`].
#[derive(Clone, Default)]
struct Failures {
    failed: CancellationToken,
    first: Arc<Mutex<Option<String>>>,
}

impl Failures {
    fn fail(&self, what: String) {
        error!(error = %what, "a task cannot go on; shutting down");
        self.first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(what);
        self.failed.cancel();
    }

    fn error(&self) -> Option<String> {
        self.first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Running {
    /// Reloads what can change without a restart (the retrieval certificates, the zone and
    /// blocklist files), as SIGHUP does.
    pub fn reload(&self) {
        self.reload.send_modify(|generation| *generation += 1);
    }

    /// Resolves with the error once a listener or another essential task has failed for good.
    pub async fn failed(&self) -> anyhow::Error {
        self.failures.failed.cancelled().await;
        anyhow::anyhow!(self
            .failures
            .error()
            .unwrap_or_else(|| "a task failed".into()))
    }

    pub fn intake_stats(&self) -> &IntakeStats {
        &self.intake.stats
    }

    /// Stops every task and closes the stores.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        let stores = self.stores.clone();
        let _ = tokio::task::spawn_blocking(move || stores.close()).await;
    }
}

async fn bind(what: &str, addr: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => bind_tcp(what, addr).await.map(Some),
        None => Ok(None),
    }
}

async fn bind_tcp(what: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen for {what} on {addr}"))
}

/// What the milter needs to start on its own thread.
struct MilterStart<I> {
    intake: Arc<I>,
    cfg: crate::mta::milter::MilterConfig,
    stats: Arc<ListenerStats>,
    milter_stats: Arc<crate::mta::milter::MilterStats>,
    gate: crate::mta::milter::Gate,
    shutdown: CancellationToken,
    failures: Failures,
    thread: crate::mta::milter::MilterThread,
}

impl<I: crate::notify::arrival::Intake> MilterStart<I> {
    /// Serves `l` on the milter's thread; a listener that fails fails the daemon. `socket`
    /// (a Unix-domain socket's file) is removed when the milter stops.
    fn start<L: crate::mta::milter::MilterListener + Sync>(
        self,
        l: L,
        socket: Option<PathBuf>,
        tasks: &TaskTracker,
    ) -> anyhow::Result<()> {
        let Self {
            intake,
            cfg,
            stats,
            milter_stats,
            gate,
            shutdown,
            failures,
            thread,
        } = self;
        let done = crate::mta::milter::serve_on(&thread.handle, l, move |l| {
            crate::mta::milter::serve(l, intake, cfg, stats, milter_stats, gate, shutdown)
        })
        .context("cannot start the milter")?;
        tasks.spawn(async move {
            let result = done.await;
            drop(thread.keep);
            if let Some(path) = socket {
                let _ = std::fs::remove_file(path);
            }
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.fail(format!("milter listener failed: {e:#}")),
                Err(_) => failures.fail("the milter thread ended without an answer".into()),
            }
        });
        Ok(())
    }
}

/// Binds the milter's Unix-domain socket at `path` (`listen.milter = "unix:…"`) with
/// `[milter] socket_mode` and `socket_group`. A socket file left by a daemon that is gone is
/// replaced; a socket something still answers on, or a file that is not a socket, stops the
/// start.
fn bind_unix_milter(
    path: &Path,
    cfg: &crate::mta::milter::MilterConfig,
) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let shown = path.display();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "listen.milter unix:{shown}: the file exists and is not a socket; not replacing it"
            );
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => bail!(
                "listen.milter unix:{shown}: another process is listening on this socket (a mailbell already running?)"
            ),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).with_context(|| {
                    format!("listen.milter unix:{shown}: cannot remove the stale socket")
                })?;
                info!(path = %shown, "removed a stale milter socket");
            }
            Err(e) => bail!("listen.milter unix:{shown}: cannot check the existing socket: {e}"),
        }
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("listen for the milter on unix:{shown}"))?;
    let mode = cfg.socket_mode().map_err(anyhow::Error::msg)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("milter.socket_mode: cannot set {:o} on {shown}", mode))?;
    if let Some(group) = &cfg.socket_group {
        let gid = match nix::unistd::Group::from_name(group) {
            Ok(Some(g)) => g.gid.as_raw(),
            Ok(None) => bail!("milter.socket_group {group:?}: no such group"),
            Err(e) => bail!("milter.socket_group {group:?}: cannot look it up: {e}"),
        };
        std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
            format!("milter.socket_group {group:?}: cannot give {shown} to group {gid} (is the daemon's user a member?)")
        })?;
    }
    Ok(l)
}

/// Starts the daemon; returns once every listener is bound.
pub async fn start(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    // Paths and certificates first: a bad one stops the start before any store is created.
    cfg.check_paths()?;
    let tls_files = client_tls_files(&cfg.link.tls)?;
    let tls = tls::client_config(&tls_files).context("link TLS")?;
    let c = cfg.clone();
    let stores = tokio::task::spawn_blocking(move || Stores::open(&c)).await??;
    let accounts = crate::mta::stalwart_api::resolver(&cfg.stalwart_api)?;
    let accountant = crate::billing::accountant::Accountant {
        ledger_path: cfg.ledger_path(),
        meter: Some(stores.meter.clone()),
        users: crate::billing::accountant::Registry::Open(stores.users.clone()),
        accounts: accounts.clone(),
        settings: cfg.billing.run_settings(),
        audit: Some(stores.audit.clone()),
        notifier: Some(billing_notifier(&stores)),
        stalwart: if cfg.billing.stalwart_permissions {
            crate::mta::stalwart_api::Permissions::new(&cfg.stalwart_api)
                .map_err(anyhow::Error::msg)?
                .map(Arc::new)
        } else {
            None
        },
    };
    // With a milter, the intake's scheduler runs on the milter's thread (see MilterThread).
    let milter_thread = match cfg.milter_listen {
        Some(_) => Some(
            crate::mta::milter::MilterThread::start().context("cannot start the milter thread")?,
        ),
        None => None,
    };
    let (intake, intake_task) = {
        let _on_milter_thread = milter_thread.as_ref().map(|t| t.handle.enter());
        MailIntake::start(
            cfg.intake.clone(),
            stores.outbox.clone(),
            stores.users.clone(),
            stores.audit.clone(),
            accounts,
            Arc::new(|| chrono::Utc::now().timestamp_millis()),
            shutdown.clone(),
        )?
    };
    let tasks = TaskTracker::new();
    let failures = Failures::default();
    tasks.spawn(accountant.clone().schedule(
        cfg.billing.run_time().map_err(anyhow::Error::msg)?,
        shutdown.clone(),
    ));
    {
        let failures = failures.clone();
        // The milter's thread runs until the scheduler (and the milter) have ended.
        let keep = milter_thread.as_ref().map(|t| t.keep.clone());
        tasks.spawn(async move {
            if let Err(e) = intake_task.await {
                failures.fail(format!("intake scheduler failed: {e:#}"));
            }
            drop(keep);
        });
    }

    let settings = ClientSettings {
        agents: cfg.link.agents.clone(),
        tls,
        sender: cfg.link.sender.clone(),
        connect_timeout: cfg.link.connect_timeout,
        io_timeout: cfg.link.io_timeout,
        backoff_min: cfg.link.backoff_min,
        backoff_max: cfg.link.backoff_max,
    };
    let link_stats = Arc::new(ClientStats::default());
    let sender = Arc::new(
        AuditedOutbox::new(stores.outbox.clone(), stores.audit.clone())
            .resolving_users(intake.user_resolver()),
    );
    {
        let (failures, stop, stats) = (failures.clone(), shutdown.clone(), link_stats.clone());
        tasks.spawn(async move {
            mailbell_link::net::run_client(settings, sender, stop.clone(), stats).await;
            if !stop.is_cancelled() {
                failures.fail("the link client stopped".into());
            }
        });
    }

    let policy = Arc::new(
        crate::policy::Policy::load(
            cfg.zones.clone(),
            cfg.blocklist.clone(),
            Some(stores.audit.clone()),
        )
        .context("zone and blocklist files")?
        .with_spf(if cfg.zones.verify_spf {
            Some(
                crate::policy::spf::SpfCheck::new(&cfg.zones.nameservers, cfg.zones.dns_timeout)
                    .map_err(anyhow::Error::msg)?,
            )
        } else {
            None
        }),
    );
    let meter_ledger = cfg.billing.meter_deliveries.then(|| stores.ledger.clone());
    let intake_arc = Arc::new(intake.clone());
    let stalwart_stats = Arc::new(StalwartStats::default());
    let mut listener_stats: Vec<(&'static str, Arc<ListenerStats>)> = Vec::new();
    let mut http_stats: Vec<(&'static str, Arc<HttpStats>)> = Vec::new();
    let http = bind("the Stalwart endpoints", cfg.http_listen).await?;
    let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(l) = http {
        let router = crate::mta::stalwart::router_with_policy(
            intake_arc.clone(),
            cfg.stalwart.clone(),
            stalwart_stats.clone(),
            policy.clone(),
            meter_ledger.clone(),
        );
        // The hook answers 408 itself after stalwart.body_timeout; the connection's own body
        // deadline comes a little later so that answer gets out.
        let mut hc = cfg.http_stalwart.clone();
        hc.body_timeout = hc
            .body_timeout
            .max(cfg.stalwart.body_timeout + std::time::Duration::from_secs(1));
        let (ls, hs) = serve_http(
            &tasks,
            HttpListener {
                listener: l,
                name: "stalwart",
                router,
                cfg: hc,
            },
            &shutdown,
            &failures,
        );
        listener_stats.push(("stalwart", ls));
        http_stats.push(("stalwart", hs));
    }

    let milter_stats = Arc::new(crate::mta::milter::MilterStats::default());
    let (mut milter_addr, mut milter_path) = (None, None);
    if let (Some(at), Some(thread)) = (&cfg.milter_listen, milter_thread) {
        let stats = Arc::new(ListenerStats::default());
        listener_stats.push(("milter", stats.clone()));
        let milter = MilterStart {
            intake: intake_arc.clone(),
            cfg: cfg.milter.clone(),
            stats,
            milter_stats: milter_stats.clone(),
            gate: crate::mta::milter::Gate {
                policy: policy.clone(),
                ledger: meter_ledger.clone(),
                timeout: cfg.milter.timeout,
            },
            shutdown: shutdown.clone(),
            failures: failures.clone(),
            thread,
        };
        match at {
            MilterListen::Tcp(addr) => {
                let l = bind_tcp("the milter", *addr).await?;
                milter_addr = l.local_addr().ok();
                milter.start(l, None, &tasks)?;
            }
            MilterListen::Unix(path) => {
                let l = bind_unix_milter(path, &cfg.milter)?;
                milter_path = Some(path.clone());
                milter.start(l, Some(path.clone()), &tasks)?;
            }
        }
    }

    let retrieval_stats = Arc::new(crate::retrieval::server::RetrievalStats::default());
    let (reload, reload_rx) = tokio::sync::watch::channel(0u64);
    tasks.spawn(reload_policy(
        policy.clone(),
        reload_rx.clone(),
        shutdown.clone(),
    ));
    let (retrieval_addrs, retrieval_certs) = start_retrieval(
        &cfg,
        &stores,
        &tasks,
        &shutdown,
        &failures,
        &mut listener_stats,
        &retrieval_stats,
        reload_rx,
    )
    .await?;

    let admin = bind("the admin API", cfg.admin_listen).await?;
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    // The admin listener's counters exist before its router, which reports them.
    let admin_listener_stats = Arc::new(ListenerStats::default());
    let admin_http_stats = Arc::new(HttpStats::default());
    if admin.is_some() {
        listener_stats.push(("admin", admin_listener_stats.clone()));
        http_stats.push(("admin", admin_http_stats.clone()));
    }
    let running_stats = crate::admin::ops::Metrics {
        intake: intake.stats.clone(),
        link: link_stats.clone(),
        stalwart: stalwart_stats.clone(),
        outbox: stores.outbox.stats.clone(),
        audit: stores.audit.stats(),
        milter: cfg.milter_listen.as_ref().map(|_| milter_stats.clone()),
        retrieval: (!retrieval_addrs.is_empty()).then(|| retrieval_stats.clone()),
        meter: (!retrieval_addrs.is_empty()).then(|| stores.meter.stats()),
        agents: cfg.link.agents.iter().map(|a| a.addr.clone()).collect(),
        certificates: vec![
            ("cert", tls_files.cert.clone()),
            ("ca", tls_files.ca.clone()),
        ],
        served_certificates: retrieval_certs
            .into_iter()
            .map(|c| c as Arc<dyn mailbell_link::tls::ServedCertificates>)
            .collect(),
        listeners: listener_stats,
        http: http_stats,
        policy: policy.clone(),
    };
    if let Some(l) = admin {
        let token: Arc<str> = Arc::from(cfg.admin_token.as_str());
        let admin_routes = crate::admin::api::user_routes_with(
            stores.users.clone(),
            Some(crate::admin::api::LedgerLink {
                ledger: stores.ledger.clone(),
                default_class: cfg.billing.default_class.clone(),
            }),
        )
        .merge(crate::admin::ops::routes(
            stores.outbox.clone(),
            stores.audit.clone(),
        ))
        .merge(crate::admin::meter::routes(stores.meter.clone()))
        .merge(crate::admin::billing::routes(crate::admin::billing::Ops {
            ledger: stores.ledger.clone(),
            cfg: cfg.billing.clone(),
            accountant: accountant.clone(),
        }))
        .merge(crate::admin::billing::notice_routes(
            crate::admin::billing::NoticeOps {
                ledger: stores.ledger.clone(),
                outbox: stores.outbox.clone(),
                users: stores.users.clone(),
                audit: stores.audit.clone(),
            },
        ))
        .merge(crate::admin::billing_reports::routes(
            crate::admin::billing_reports::ReportOps {
                ledger: stores.ledger.clone(),
                audit: Some(stores.audit.clone()),
            },
        ));
        let router = crate::admin::api::protect(
            crate::admin::ops::audited(admin_routes, stores.audit.clone()),
            token,
        )
        .merge(crate::admin::ops::public_routes(
            stores.outbox.clone(),
            running_stats,
        ));
        spawn_http(
            &tasks,
            HttpListener {
                listener: l,
                name: "admin",
                router,
                cfg: cfg.http_admin.clone(),
            },
            admin_listener_stats,
            admin_http_stats,
            &shutdown,
            &failures,
        );
    }
    info!(
        http = ?http_addr,
        milter = ?milter_addr,
        milter_socket = ?milter_path,
        admin = ?admin_addr,
        retrieval = ?retrieval_addrs,
        agents = ?cfg.link.agents.iter().map(|a| a.addr.as_str()).collect::<Vec<_>>(),
        users = stores.users.len(),
        queued = stores.outbox.depth(),
        staged = stores.outbox.stats.staged.load(Ordering::Relaxed),
        "mailbell serving"
    );
    Ok(Running {
        http_addr,
        milter_addr,
        milter_path,
        admin_addr,
        retrieval_addrs,
        retrieval_stats,
        stores,
        intake,
        link_stats,
        stalwart_stats,
        tasks,
        shutdown,
        failures,
        reload,
        policy,
    })
}

/// Reloads the zone and blocklist files at every `reload` bump (SIGHUP). A refused reload is
/// logged with file and line, and the rules in force stay.
/// Sends the accounting run's arrears and warning SMS through the outbox
/// ([`crate::notify::billing`]); an effect is done once its notice is queued or skipped for
/// good (recorded in the audit log either way), and retried when the outbox failed.
fn billing_notifier(stores: &Stores) -> crate::billing::accountant::Notifier {
    use crate::billing::ledger::EffectKind;
    use crate::notify::billing::{send_billing_notices, BillingKind, BillingNotice};
    let (outbox, users, audit) = (
        stores.outbox.clone(),
        stores.users.clone(),
        stores.audit.clone(),
    );
    Arc::new(move |effects| {
        let (outbox, users, audit) = (outbox.clone(), users.clone(), audit.clone());
        Box::pin(async move {
            let (ids, notices): (Vec<i64>, Vec<BillingNotice>) = effects
                .into_iter()
                .filter_map(|e| {
                    let kind = match e.kind {
                        EffectKind::Arrears => BillingKind::Arrears { balance: e.balance },
                        EffectKind::Warning => BillingKind::Warning {
                            balance: e.balance,
                            threshold: e.threshold,
                        },
                        EffectKind::State => return None,
                    };
                    Some((
                        e.id,
                        BillingNotice {
                            login: e.login,
                            kind,
                            at_ms: e.at_ms,
                        },
                    ))
                })
                .unzip();
            match send_billing_notices(&outbox, &users, &audit, notices).await {
                Ok(outcomes) if outcomes.len() == ids.len() => {
                    ids.into_iter().map(|id| (id, true)).collect()
                }
                Ok(outcomes) => {
                    warn!(
                        notices = ids.len(),
                        outcomes = outcomes.len(),
                        "billing notices: outcomes do not match; retried"
                    );
                    ids.into_iter().map(|id| (id, false)).collect()
                }
                Err(e) => {
                    warn!(error = %e, "billing notices not queued; retried in a minute");
                    ids.into_iter().map(|id| (id, false)).collect()
                }
            }
        })
    })
}

/// The payment notice's `{balance}`: the account's available balance from the ledger (a
/// read-only connection of its own; one indexed read per login of an account in arrears).
struct LedgerBalances {
    path: std::path::PathBuf,
    conn: std::sync::Mutex<Option<crate::billing::ledger::sqlite::SqliteLedger>>,
}

impl crate::retrieval::notice::Balances for LedgerBalances {
    fn balance(&self, account: &str) -> Option<String> {
        use crate::billing::ledger::LedgerStore as _;
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if conn.is_none() {
            match crate::billing::ledger::sqlite::SqliteLedger::open_read_only(&self.path) {
                Ok(c) => *conn = Some(c),
                Err(e) => {
                    warn!(error = %e, "payment notice: cannot read the ledger for the balance");
                    return None;
                }
            }
        }
        let login = crate::users::address_key(account);
        match conn.as_ref()?.statement(&login) {
            Ok(s) => s.balance.available().ok().map(|b| b.to_string()),
            Err(crate::billing::ledger::LedgerError::UnknownUser(_)) => None,
            Err(e) => {
                warn!(user = %login, error = %e, "payment notice: cannot read the balance");
                *conn = None;
                None
            }
        }
    }
}

async fn reload_policy(
    policy: Arc<crate::policy::Policy>,
    mut reload: tokio::sync::watch::Receiver<u64>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = reload.changed() => if changed.is_err() { return },
        }
        let p = policy.clone();
        match tokio::task::spawn_blocking(move || p.reload()).await {
            Ok(Ok(())) => info!("zone and blocklist files reloaded"),
            Ok(Err(e)) => {
                warn!(error = %e, "zone and blocklist reload refused; the rules in force stay")
            }
            Err(e) => warn!(error = %e, "zone and blocklist reload failed"),
        }
    }
}

/// Binds and serves the retrieval proxy's listeners that are configured (none by default), and
/// keeps their certificates current (reloaded on `reload` and when their files change).
/// Returns the bound listeners and the certificates served.
#[allow(clippy::too_many_arguments)]
async fn start_retrieval(
    cfg: &Config,
    stores: &Stores,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
    failures: &Failures,
    listener_stats: &mut Vec<(&'static str, Arc<ListenerStats>)>,
    stats: &Arc<server::RetrievalStats>,
    reload: tokio::sync::watch::Receiver<u64>,
) -> anyhow::Result<(Vec<(&'static str, SocketAddr)>, Option<Arc<CertStore>>)> {
    use crate::retrieval::server::Listener;
    let r = &cfg.retrieval;
    let mut addrs = Vec::new();
    if !r.enabled() {
        return Ok((addrs, None));
    }
    let certs =
        Arc::new(CertStore::load(r.certificates.clone(), stats.clone()).context("retrieval TLS")?);
    let tls = tls::public_server_config_resolving(certs.clone()).context("retrieval TLS")?;
    let backend_tls = match &r.backend_tls {
        Some(b) => Some(tokio_rustls::TlsConnector::from(
            tls::public_client_config(&b.ca).context("retrieval.backend_ca")?,
        )),
        None => None,
    };
    tasks.spawn(crate::retrieval::certs::watch(
        certs.clone(),
        r.cert_check_interval,
        reload,
        shutdown.clone(),
    ));
    let mut r = r.clone();
    if let Some(path) = &r.notice_file {
        r.notice.text = std::fs::read_to_string(path)
            .with_context(|| format!("retrieval.notice_file {}", path.display()))?;
    }
    let shared = Arc::new(server::Shared {
        cfg: r.clone(),
        tls: tokio_rustls::TlsAcceptor::from(tls),
        backend_tls,
        stats: stats.clone(),
        meter: stores.meter.clone(),
        users: stores.users.clone(),
        balances: Some(Arc::new(LedgerBalances {
            path: cfg.ledger_path(),
            conn: std::sync::Mutex::new(None),
        })),
    });
    for (kind, addr) in [
        (Listener::Pop3, r.pop3),
        (Listener::Pop3s, r.pop3s),
        (Listener::Imap, r.imap),
        (Listener::Imaps, r.imaps),
    ] {
        let Some(l) = bind(kind.name(), addr).await? else {
            continue;
        };
        if let Ok(a) = l.local_addr() {
            addrs.push((kind.name(), a));
        }
        let stats = Arc::new(ListenerStats::default());
        listener_stats.push((kind.name(), stats.clone()));
        let (shared, stop, failures) = (shared.clone(), shutdown.clone(), failures.clone());
        tasks.spawn(async move {
            if let Err(e) = server::serve(l, kind, shared, stats, stop).await {
                failures.fail(format!("{} listener failed: {e:#}", kind.name()));
            }
        });
    }
    Ok((addrs, Some(certs)))
}

/// `mailbell serve`: runs until SIGTERM or Ctrl-C.
pub async fn serve(config: Option<&Path>) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    let shutdown = CancellationToken::new();
    let data_dir = cfg.data_dir.clone();
    let fresh = !data_dir.exists();
    let running = match start(cfg, shutdown.clone()).await {
        Ok(r) => r,
        Err(e) => {
            // A failed start leaves nothing behind: a data directory this start created goes.
            if fresh {
                let _ = std::fs::remove_dir_all(&data_dir);
            }
            return Err(e);
        }
    };
    // SIGHUP reloads (certificates) from now on instead of ending the process.
    let hangups = hangup_signal();
    // Every listener is bound: units ordered after this one (Postfix) may start.
    match mailbell_link::systemd::notify_ready() {
        Ok(sent) => debug!(sent, "readiness notification"),
        Err(e) => warn!(error = %e, "cannot tell systemd that mailbell is ready"),
    }
    let failure = tokio::select! {
        () = wait_for_signal() => None,
        e = running.failed() => Some(e),
        () = reload_on_hangup(hangups, &running) => None,
    };
    info!("shutting down");
    running.stop().await;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

/// SIGHUP, caught from here on (its default action would end the process).
fn hangup_signal() -> Hangups {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot catch SIGHUP; certificates reload on file changes only");
                None
            }
        }
    }
}

/// Reloads at every SIGHUP; never returns.
async fn reload_on_hangup(hangups: Hangups, running: &Running) {
    #[cfg(unix)]
    if let Some(mut hup) = hangups {
        while hup.recv().await.is_some() {
            info!("SIGHUP: reloading certificates, zone and blocklist files");
            running.reload();
        }
    }
    #[cfg(not(unix))]
    let () = hangups;
    std::future::pending::<()>().await;
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// One HTTP listener to serve.
struct HttpListener {
    listener: TcpListener,
    /// The `listener` label in /metrics and the name in logs.
    name: &'static str,
    router: axum::Router,
    cfg: HttpConfig,
}

/// Serves `l` with fresh counters, which it returns.
fn serve_http(
    tasks: &TaskTracker,
    l: HttpListener,
    shutdown: &CancellationToken,
    failures: &Failures,
) -> (Arc<ListenerStats>, Arc<HttpStats>) {
    let ls = Arc::new(ListenerStats::default());
    let hs = Arc::new(HttpStats::default());
    spawn_http(tasks, l, ls.clone(), hs.clone(), shutdown, failures);
    (ls, hs)
}

/// Serves `l` on the hardened HTTP server until `shutdown`, as a tracked task; a listener
/// failure is reported to `failures`.
fn spawn_http(
    tasks: &TaskTracker,
    l: HttpListener,
    listener_stats: Arc<ListenerStats>,
    http_stats: Arc<HttpStats>,
    shutdown: &CancellationToken,
    failures: &Failures,
) {
    let limits = l.cfg.limits(l.cfg.max_connections.unwrap_or(1));
    let acceptor = Acceptor::new(l.listener, limits, l.name, listener_stats);
    let (stop, failures) = (shutdown.clone(), failures.clone());
    tasks.spawn(async move {
        let r =
            mailbell_link::http_server::serve(acceptor, l.router, l.cfg, http_stats, stop).await;
        if let Err(e) = r {
            failures.fail(format!("{e}: {}", e.source));
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    fn milter_cfg(mode: &str, group: Option<&str>) -> crate::mta::milter::MilterConfig {
        crate::mta::milter::MilterConfig {
            socket_mode: mode.into(),
            socket_group: group.map(Into::into),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_milter_socket_is_created_with_its_mode_and_replaces_only_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("milter.sock");
        let l = bind_unix_milter(&path, &milter_cfg("0660", None)).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);

        // Something listens on it: the start stops, and the socket is left alone.
        let e = bind_unix_milter(&path, &milter_cfg("0660", None))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("listen.milter unix:") && e.contains("another process is listening"),
            "{e}"
        );

        // Its listener gone, the file is stale: replaced.
        drop(l);
        let l = bind_unix_milter(&path, &milter_cfg("0600", None)).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        drop(l);
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_or_an_unknown_group_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("milter.sock");
        std::fs::write(&path, "keep me").unwrap();
        let e = bind_unix_milter(&path, &milter_cfg("0660", None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");

        let other = dir.path().join("other.sock");
        let e = bind_unix_milter(&other, &milter_cfg("0660", Some("no-such-group-mb")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("milter.socket_group \"no-such-group-mb\": no such group"),
            "{e}"
        );

        let e = bind_unix_milter(
            &dir.path().join("missing/x.sock"),
            &milter_cfg("0660", None),
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("No such file or directory"),
            "{e:#}"
        );
    }
}
