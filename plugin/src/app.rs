//! `mailbell serve`: opens the stores, starts the intake, the link client and the listeners
//! (Stalwart endpoints, milter, admin API), and stops them all on the cancellation token.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use mailbell_link::net::{ClientSettings, ClientStats};
use mailbell_link::pki::ensure_dev_pki;
use mailbell_link::tls::{self, ClientTlsFiles};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use crate::audit::AuditLog;
use crate::config::{Config, LinkTls};
use crate::intake::{IntakeStats, MailIntake};
use crate::outbox::{Outbox, OutboxConfig};
use crate::sender::AuditedOutbox;
use crate::stalwart::StalwartStats;
use crate::users::UserStore;

/// The stores one daemon owns.
#[derive(Clone)]
pub struct Stores {
    pub outbox: Outbox,
    pub users: UserStore,
    pub audit: AuditLog,
}

impl Stores {
    /// Opens all three (blocking: call from `spawn_blocking` or before the runtime is busy).
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
        let users = UserStore::open(&cfg.users_path())?;
        let audit = AuditLog::open(&cfg.audit_path(), cfg.audit.clone())?;
        Ok(Self {
            outbox,
            users,
            audit,
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
    pub milter_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub stores: Stores,
    pub intake: MailIntake,
    pub link_stats: Arc<ClientStats>,
    pub stalwart_stats: Arc<StalwartStats>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Running {
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
    let Some(addr) = addr else { return Ok(None) };
    Ok(Some(
        TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen for {what} on {addr}"))?,
    ))
}

/// Starts the daemon; returns once every listener is bound.
pub async fn start(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let c = cfg.clone();
    let stores = tokio::task::spawn_blocking(move || Stores::open(&c)).await??;
    let tls_files = client_tls_files(&cfg.link.tls)?;
    let tls = tls::client_config(&tls_files).context("link TLS")?;
    let accounts = crate::stalwart_api::resolver(&cfg.stalwart_api)?;
    let (intake, intake_task) = MailIntake::start(
        cfg.intake.clone(),
        stores.outbox.clone(),
        stores.users.clone(),
        stores.audit.clone(),
        accounts,
        Arc::new(|| chrono::Utc::now().timestamp_millis()),
        shutdown.clone(),
    )?;
    let tasks = TaskTracker::new();
    tasks.spawn(async move {
        if let Err(e) = intake_task.await {
            error!(error = %e, "intake scheduler failed");
        }
    });

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
    let sender = Arc::new(AuditedOutbox::new(
        stores.outbox.clone(),
        stores.audit.clone(),
    ));
    tasks.spawn(mailbell_link::net::run_client(
        settings,
        sender,
        shutdown.clone(),
        link_stats.clone(),
    ));

    let intake_arc = Arc::new(intake.clone());
    let stalwart_stats = Arc::new(StalwartStats::default());
    let http = bind("the Stalwart endpoints", cfg.http_listen).await?;
    let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(l) = http {
        let router = crate::stalwart::router_with_stats(
            intake_arc.clone(),
            cfg.stalwart.clone(),
            stalwart_stats.clone(),
        );
        serve_http(&tasks, l, router, &shutdown, "Stalwart endpoint");
    }

    let milter = bind("the milter", cfg.milter_listen).await?;
    let milter_addr = milter.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(l) = milter {
        let mc = cfg.milter.clone();
        let token = shutdown.clone();
        let i = intake_arc.clone();
        let stats = Arc::new(mailbell_link::listen::ListenerStats::default());
        tasks.spawn(async move {
            if let Err(e) = crate::milter::serve(l, i, mc, stats, token).await {
                error!(error = %e, "milter server failed");
            }
        });
    }

    let admin = bind("the admin API", cfg.admin_listen).await?;
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    let running_stats = crate::ops::Metrics {
        intake: intake.stats.clone(),
        link: link_stats.clone(),
        stalwart: stalwart_stats.clone(),
        outbox: stores.outbox.stats.clone(),
        audit: stores.audit.stats(),
    };
    if let Some(l) = admin {
        let token: Arc<str> = Arc::from(cfg.admin_token.as_str());
        let admin_routes = crate::admin::user_routes(stores.users.clone()).merge(
            crate::ops::routes(stores.outbox.clone(), stores.audit.clone()),
        );
        let router = crate::admin::protect(
            crate::ops::audited(admin_routes, stores.audit.clone()),
            token,
        )
        .merge(crate::ops::public_routes(
            stores.outbox.clone(),
            running_stats,
        ));
        serve_http(&tasks, l, router, &shutdown, "admin API");
    }
    info!(
        http = ?http_addr,
        milter = ?milter_addr,
        admin = ?admin_addr,
        agents = ?cfg.link.agents.iter().map(|a| a.addr.as_str()).collect::<Vec<_>>(),
        users = stores.users.len(),
        queued = stores.outbox.depth(),
        staged = stores.outbox.stats.staged.load(Ordering::Relaxed),
        "mailbell serving"
    );
    Ok(Running {
        http_addr,
        milter_addr,
        admin_addr,
        stores,
        intake,
        link_stats,
        stalwart_stats,
        tasks,
        shutdown,
    })
}

/// `mailbell serve`: runs until SIGTERM or Ctrl-C.
pub async fn serve(config: Option<&Path>) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    let shutdown = CancellationToken::new();
    let running = start(cfg, shutdown.clone()).await?;
    wait_for_signal().await;
    info!("shutting down");
    running.stop().await;
    Ok(())
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

/// Serves `router` on `listener` until `shutdown`, as a tracked task; `what` names it in the
/// error log.
fn serve_http(
    tasks: &TaskTracker,
    listener: TcpListener,
    router: axum::Router,
    shutdown: &CancellationToken,
    what: &'static str,
) {
    let token = shutdown.clone();
    tasks.spawn(async move {
        let r = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await;
        if let Err(e) = r {
            error!(error = %e, "{what} server failed");
        }
    });
}
