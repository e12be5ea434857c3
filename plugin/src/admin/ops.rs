//! Admin routes for the queue and the audit log (behind the admin token, see
//! [`crate::admin::api::protect`]), plus `/metrics` (Prometheus text, see [`Metrics::registry`])
//! and `/status` (JSON), which
//! carry no personal data and need no token.
//!
//! ```text
//! GET  /admin/v1/queue?limit=N            queued notices (phone numbers masked)
//! GET  /admin/v1/queue/held?limit=N       notices not queued yet: held (quiet hours, rate
//!                                         limit) or awaiting Stalwart's delivery confirmation
//! GET  /admin/v1/queue/dead?limit=N       dead letters
//! POST /admin/v1/queue/retry?id=HEX|all   dead letters back into the queue
//! POST /admin/v1/queue/purge?older_than=7d   delete dead letters (default: all)
//! GET  /admin/v1/log?user=U&notice=N&since=T&until=T&limit=N
//!                                         the newest `limit` (1000) matching records, oldest
//!                                         first, as a JSON array
//! GET  /admin/v1/log/page?…same…          the same as {"records":[…],"omitted":N,
//!                                         "omitted_exact":bool}: how many older ones matched
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mailbell_link::net::ClientStats;
use mailbell_link::NotifId;
use serde::{Deserialize, Serialize};

use mailbell_link::http_server::{HttpCollector, HttpStats};
use mailbell_link::listen::{ListenerCollector, ListenerStats};
use mailbell_link::metrics::{self, Collector, Registry};
use mailbell_link::tls::CertExpiryCollector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::admin::api::ApiError;
use crate::audit::{parse_since, AuditLog, AuditPage, AuditQuery, AuditRecord, AuditStats};
use crate::mta::milter::MilterStats;
use crate::mta::stalwart::StalwartStats;
use crate::notify::intake::{pending_notices, IntakeStats, PendingNotice};
use crate::notify::outbox::{DeadLetter, Outbox, OutboxStats, QueuedItem, Select};

/// Everything `/metrics` reports.
#[derive(Clone)]
pub struct Metrics {
    pub intake: Arc<IntakeStats>,
    pub link: Arc<ClientStats>,
    pub stalwart: Arc<StalwartStats>,
    pub outbox: Arc<OutboxStats>,
    pub audit: Arc<AuditStats>,
    /// The milter's sessions, messages, tempfails and latency (`None`: no milter listener).
    pub milter: Option<Arc<MilterStats>>,
    /// The retrieval proxy's totals (`None`: no retrieval listener).
    pub retrieval: Option<Arc<crate::retrieval::server::RetrievalStats>>,
    /// The meter store's writes (`None`: no retrieval listener).
    pub meter: Option<Arc<crate::meter::MeterStats>>,
    /// The configured agents' addresses, in `[[link.agent]]` order (`mailbell_link_up`).
    pub agents: Vec<String>,
    /// The link's certificate files by role ("cert", "ca"), for their expiry.
    pub certificates: Vec<(&'static str, std::path::PathBuf)>,
    /// Certificates served from memory and reloaded (the retrieval proxy's), for their expiry.
    pub served_certificates: Vec<Arc<dyn mailbell_link::tls::ServedCertificates>>,
    /// Every listener's accept counters, by `listener` label ("stalwart", "admin", "milter").
    pub listeners: Vec<(&'static str, Arc<ListenerStats>)>,
    /// Every HTTP listener's request and timeout counters, by `listener` label.
    pub http: Vec<(&'static str, Arc<HttpStats>)>,
    /// Blocklist refusals and list reloads.
    pub policy: Arc<crate::policy::Policy>,
}

#[derive(Clone)]
struct Ops {
    outbox: Outbox,
    audit: AuditLog,
}

/// Queue and log routes, unauthenticated: merge them before [`crate::admin::api::protect`].
pub fn routes(outbox: Outbox, audit: AuditLog) -> Router {
    Router::new()
        .route("/admin/v1/queue", get(queue_list))
        .route("/admin/v1/queue/held", get(held_list))
        .route("/admin/v1/queue/dead", get(dead_list))
        .route("/admin/v1/queue/retry", post(queue_retry))
        .route("/admin/v1/queue/purge", post(queue_purge))
        .route("/admin/v1/log", get(log_query))
        .route("/admin/v1/log/page", get(log_page))
        .with_state(Ops { outbox, audit })
}

/// Records every changing admin request (method, path, answer) in the audit log. Layer it on
/// the admin routes inside [`crate::admin::api::protect`], so only authorised requests are recorded.
pub fn audited(routes: Router, audit: AuditLog) -> Router {
    routes.layer(axum::middleware::from_fn_with_state(audit, audit_admin))
}

async fn audit_admin(
    State(audit): State<AuditLog>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().clone();
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    if method != axum::http::Method::GET && method != axum::http::Method::HEAD {
        audit.record(crate::audit::AuditEvent::Admin {
            actor: "admin-api".into(),
            action: format!("{method} -> {}", resp.status().as_u16()),
            target,
        });
    }
    resp
}

/// `/metrics` and `/status` (no token).
pub fn public_routes(outbox: Outbox, metrics: Metrics) -> Router {
    Router::new()
        .route(
            "/metrics",
            mailbell_link::metrics::route(metrics.registry(outbox.clone())),
        )
        .route("/status", get(status))
        .with_state((outbox, metrics))
}

/// Phone numbers are shown as both daemons show them (`+86138****8000`).
pub use mailbell_link::phone::mask_phone;

/// A queued notice or dead letter as the API shows it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone)]
pub struct QueueEntry {
    pub id: String,
    pub seq: u64,
    pub enqueued_at_ms: i64,
    pub attempts: u16,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub not_before_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dead_at_ms: Option<i64>,
    pub reason: String,
    /// `arrival`, `billing-arrears` or `billing-warning` (empty from a daemon that predates
    /// the field).
    #[serde(default)]
    pub kind: String,
    pub recipient: String,
    pub phone: String,
    pub subject: String,
    pub count: u32,
}

impl QueueEntry {
    fn from_parts(
        id: NotifId,
        seq: u64,
        payload: &[u8],
        enqueued_at_ms: i64,
        attempts: u16,
        reason: String,
    ) -> Self {
        let n = mailbell_link::Notification::decode_payload(id, payload).unwrap_or_default();
        Self {
            id: id.to_string(),
            seq,
            enqueued_at_ms,
            attempts,
            not_before_ms: None,
            dead_at_ms: None,
            reason,
            kind: n.kind.name().to_owned(),
            recipient: n.recipient,
            phone: mask_phone(&n.phone),
            subject: n.subject,
            count: n.count,
        }
    }
}

impl From<&QueuedItem> for QueueEntry {
    fn from(q: &QueuedItem) -> Self {
        let mut e = Self::from_parts(
            q.id,
            q.seq,
            &q.payload,
            q.enqueued_at_ms,
            q.attempts,
            q.last_reason.clone(),
        );
        e.not_before_ms = q.not_before_ms;
        e
    }
}

impl From<&DeadLetter> for QueueEntry {
    fn from(d: &DeadLetter) -> Self {
        let mut e = Self::from_parts(
            d.id,
            d.seq,
            &d.payload,
            d.enqueued_at_ms,
            d.attempts,
            d.reason.clone(),
        );
        e.dead_at_ms = Some(d.dead_at_ms);
        e
    }
}

#[derive(Deserialize)]
struct LimitQ {
    limit: Option<usize>,
}

const MAX_LIST: usize = 10_000;

fn internal(e: impl std::fmt::Display) -> Response {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
}

fn bad_request(e: impl std::fmt::Display) -> Response {
    ApiError::new(StatusCode::BAD_REQUEST, e.to_string()).into_response()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, Response> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(internal)?
        .map_err(internal)
}

async fn queue_list(State(o): State<Ops>, Query(q): Query<LimitQ>) -> Response {
    let limit = q.limit.unwrap_or(100).min(MAX_LIST);
    match blocking(move || o.outbox.list(limit).map_err(|e| e.to_string())).await {
        Ok(items) => Json(items.iter().map(QueueEntry::from).collect::<Vec<_>>()).into_response(),
        Err(r) => r,
    }
}

async fn held_list(State(o): State<Ops>, Query(q): Query<LimitQ>) -> Response {
    let limit = q.limit.unwrap_or(100).min(MAX_LIST);
    match blocking(move || {
        o.outbox
            .staged()
            .map(|r| pending_notices(&r, limit))
            .map_err(|e| e.to_string())
    })
    .await
    {
        Ok(items) => Json::<Vec<PendingNotice>>(items).into_response(),
        Err(r) => r,
    }
}

async fn dead_list(State(o): State<Ops>, Query(q): Query<LimitQ>) -> Response {
    let limit = q.limit.unwrap_or(100).min(MAX_LIST);
    match blocking(move || o.outbox.dead_letters(limit).map_err(|e| e.to_string())).await {
        Ok(items) => Json(items.iter().map(QueueEntry::from).collect::<Vec<_>>()).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct RetryQ {
    id: String,
}

/// Parses "all" or a 32-hex-digit notice id.
pub fn parse_select(s: &str) -> Result<Select, String> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(Select::All);
    }
    let b = hex::decode(s.trim())
        .map_err(|_| format!("{s:?} is not a notice id (32 hex digits) or \"all\""))?;
    let arr: [u8; 16] = b
        .try_into()
        .map_err(|_| format!("{s:?} is not a notice id (32 hex digits) or \"all\""))?;
    Ok(Select::Id(NotifId(arr)))
}

#[derive(Serialize, Deserialize)]
pub struct CountReply {
    pub count: usize,
}

async fn queue_retry(State(o): State<Ops>, Query(q): Query<RetryQ>) -> Response {
    let which = match parse_select(&q.id) {
        Ok(w) => w,
        Err(e) => return bad_request(e),
    };
    match blocking(move || o.outbox.retry_dead(which).map_err(|e| e.to_string())).await {
        Ok(count) => Json(CountReply { count }).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct PurgeQ {
    older_than: Option<String>,
}

async fn queue_purge(State(o): State<Ops>, Query(q): Query<PurgeQ>) -> Response {
    let older = match q.older_than.as_deref() {
        None | Some("") => Duration::ZERO,
        Some(s) => match mailbell_link::units::parse_duration(s) {
            Ok(d) => d,
            Err(e) => return bad_request(format!("older_than: {e}")),
        },
    };
    match blocking(move || o.outbox.purge_dead(older).map_err(|e| e.to_string())).await {
        Ok(count) => Json(CountReply { count }).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct LogQ {
    user: Option<String>,
    notice: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
}

/// The query of a `/admin/v1/log` request; the error is the bad request's message.
fn audit_query(q: LogQ) -> Result<AuditQuery, String> {
    let now = chrono::Utc::now().timestamp_millis();
    let since = q
        .since
        .as_deref()
        .map(|s| parse_since(s, now))
        .transpose()
        .map_err(|e| format!("since: {e}"))?;
    let until = q
        .until
        .as_deref()
        .map(|s| parse_since(s, now))
        .transpose()
        .map_err(|e| format!("until: {e}"))?;
    Ok(AuditQuery {
        user: q.user,
        notice: q.notice,
        since_ms: since,
        until_ms: until,
        limit: q.limit.unwrap_or(1000),
    })
}

async fn log_query(State(o): State<Ops>, Query(q): Query<LogQ>) -> Response {
    let query = match audit_query(q) {
        Ok(q) => q,
        Err(e) => return bad_request(e),
    };
    match blocking(move || o.audit.query_latest(&query).map_err(|e| e.to_string())).await {
        Ok(records) => Json::<Vec<AuditRecord>>(records).into_response(),
        Err(r) => r,
    }
}

async fn log_page(State(o): State<Ops>, Query(q): Query<LogQ>) -> Response {
    let query = match audit_query(q) {
        Ok(q) => q,
        Err(e) => return bad_request(e),
    };
    match blocking(move || o.audit.query_page(&query).map_err(|e| e.to_string())).await {
        Ok(page) => Json::<AuditPage>(page).into_response(),
        Err(r) => r,
    }
}

fn val(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Metrics {
    /// The registry `/metrics` encodes: the mail side's own figures, the milter's, and the
    /// listener, HTTP and certificate families shared with the agent.
    pub fn registry(&self, outbox: Outbox) -> Registry {
        let mut r = Registry::default();
        r.register_collector(Box::new(MailCollector {
            outbox,
            metrics: self.clone(),
        }));
        if let Some(milter) = &self.milter {
            r.register_collector(Box::new(milter.clone()));
        }
        if let Some(retrieval) = &self.retrieval {
            r.register_collector(Box::new(retrieval.clone()));
        }
        if let Some(meter) = &self.meter {
            r.register_collector(Box::new(meter.clone()));
        }
        r.register_collector(Box::new(CertExpiryCollector {
            files: self.certificates.clone(),
            served: self.served_certificates.clone(),
        }));
        r.register_collector(Box::new(ListenerCollector {
            listeners: self.listeners.clone(),
        }));
        r.register_collector(Box::new(HttpCollector {
            listeners: self.http.clone(),
        }));
        r
    }
}

/// Exposes the intake, outbox, link, audit and Stalwart figures, read at scrape time.
struct MailCollector {
    outbox: Outbox,
    metrics: Metrics,
}

impl std::fmt::Debug for MailCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailCollector").finish_non_exhaustive()
    }
}

impl Collector for MailCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let (m, i, l) = (&self.metrics, &self.metrics.intake, &self.metrics.link);
        for (name, help, v) in [
            (
                "mailbell_messages_total",
                "Messages the MTA endpoints handed to the intake.",
                &i.messages,
            ),
            (
                "mailbell_notices_created_total",
                "Notices created (one per notified recipient).",
                &i.notices_created,
            ),
            (
                "mailbell_unknown_recipients_total",
                "Recipients that are not registered users.",
                &i.unknown_recipients,
            ),
            (
                "mailbell_ineligible_recipients_total",
                "Registered recipients without notices (off, licence expired, no phone).",
                &i.ineligible_recipients,
            ),
            (
                "mailbell_notices_queued_total",
                "Notices queued for the agent.",
                &i.queued,
            ),
            (
                "mailbell_notices_coalesced_total",
                "Arrivals folded into a coalesced notice.",
                &i.coalesced,
            ),
            (
                "mailbell_notices_dropped_total",
                "Arrivals not notified (spam, duplicate, filtered, timeout policy, ineligible at release).",
                &i.dropped,
            ),
            (
                "mailbell_confirmations_total",
                "Stalwart delivery confirmations received.",
                &i.confirmations,
            ),
            (
                "mailbell_confirmations_unmatched_total",
                "Confirmations matching no waiting notice.",
                &i.unmatched_confirmations,
            ),
            (
                "mailbell_confirm_timeouts_total",
                "Notices whose confirmation did not come in time.",
                &i.confirm_timeouts,
            ),
            (
                "mailbell_store_errors_total",
                "Store errors answered with a temporary failure.",
                &i.store_errors,
            ),
            (
                "mailbell_outbox_commits_total",
                "Group commits (one fsync each).",
                &m.outbox.commits,
            ),
            (
                "mailbell_link_sessions_total",
                "Link sessions attempted.",
                &l.sessions,
            ),
            (
                "mailbell_link_connected_total",
                "Link sessions established.",
                &l.connected,
            ),
            (
                "mailbell_link_sent_total",
                "Notices sent to an agent (resends included).",
                &l.sent,
            ),
            (
                "mailbell_link_acked_total",
                "Notices acknowledged by an agent.",
                &l.acked,
            ),
            (
                "mailbell_link_dead_lettered_total",
                "Notices refused for good.",
                &l.dead_lettered,
            ),
            (
                "mailbell_link_retry_later_total",
                "Retry-later answers from agents.",
                &l.retry_later,
            ),
            (
                "mailbell_audit_dropped_total",
                "Audit events dropped (writer overloaded).",
                &m.audit.dropped,
            ),
        ] {
            metrics::counter(&mut enc, name, help, val(v))?;
        }
        let (held, max_depth) = self.outbox.held();
        for (name, help, v) in [
            (
                "mailbell_outbox_depth",
                "Notices queued for the agent.",
                self.outbox.depth(),
            ),
            (
                "mailbell_outbox_staged",
                "Arrivals staged (awaiting confirmation or held).",
                val(&m.outbox.staged),
            ),
            (
                "mailbell_outbox_staged_notices",
                "Notices the staged arrivals stand for (awaiting confirmation or held).",
                val(&m.outbox.staged_notices),
            ),
            (
                "mailbell_outbox_held",
                "Notices counted against [outbox] max_depth: queued, staged, and admitted arrivals still committing.",
                held,
            ),
            (
                "mailbell_outbox_max_depth",
                "[outbox] max_depth: above it arrivals get a temporary failure.",
                max_depth,
            ),
            ("mailbell_outbox_dead", "Dead letters held.", val(&m.outbox.dead)),
            (
                "mailbell_audit_stored_bytes",
                "Size of the audit log files.",
                val(&m.audit.stored_bytes),
            ),
        ] {
            metrics::gauge(&mut enc, name, help, v)?;
        }
        let up = l.up_agent();
        metrics::gauge_family(
            &mut enc,
            "mailbell_link_up",
            "Whether a link session is up with this agent (1) or not (0).",
            m.agents
                .iter()
                .enumerate()
                .map(|(n, agent)| ([("agent", agent.as_str())], u64::from(up == Some(n)))),
        )?;
        let stalwart = m.stalwart.snapshot();
        metrics::counter(
            &mut enc,
            "mailbell_stalwart_webhook_batches_total",
            "Webhook batches received from Stalwart.",
            stalwart.webhook_batches,
        )?;
        for f in stalwart.families() {
            metrics::counter_family(
                &mut enc,
                f.name,
                f.help,
                f.series.iter().map(|(v, n)| ([(f.label, *v)], *n)),
            )?;
        }
        let p = &m.policy.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        metrics::counter_family(
            &mut enc,
            "mailbell_blocklist_refusals_total",
            "SMTP sessions refused by the blocklist, by the stage whose list matched.",
            [
                ("connect", g(&p.refused_connect)),
                ("helo", g(&p.refused_helo)),
                ("mail", g(&p.refused_mail)),
            ]
            .map(|(v, n)| ([("stage", v)], n)),
        )?;
        metrics::counter_family(
            &mut enc,
            "mailbell_policy_reloads_total",
            "Reloads of the zone and blocklist files (SIGHUP), by outcome.",
            [("ok", g(&p.reloads)), ("refused", g(&p.reload_failures))]
                .map(|(v, n)| ([("outcome", v)], n)),
        )?;
        if let Some(spf) = m.policy.spf_stats() {
            metrics::counter_family(
                &mut enc,
                "mailbell_zone_spf_checks_total",
                "SPF checks of free-zone sender domains (zones.verify_spf), by result.",
                [
                    ("pass", g(&spf.pass)),
                    ("not_pass", g(&spf.not_pass)),
                    ("timed_out", g(&spf.timed_out)),
                ]
                .map(|(v, n)| ([("result", v)], n)),
            )?;
        }
        Ok(())
    }
}

/// `/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub outbox_depth: u64,
    pub staged: u64,
    /// Notices counted against `max_depth`, and the limit (0 from a daemon before they were
    /// reported).
    #[serde(default)]
    pub outbox_held: u64,
    #[serde(default)]
    pub outbox_max_depth: u64,
    pub dead: u64,
    /// The agent a link session is up with now (`None`: the link is down).
    pub link_up_agent: Option<String>,
    /// Link sessions established since the daemon started (a running total, not the sessions
    /// up now).
    pub link_sessions_established_total: u64,
    /// Since the daemon started, like every `_total` here.
    pub link_acked_total: u64,
    pub messages_total: u64,
    pub notices_queued_total: u64,
}

async fn status(State((outbox, m)): State<(Outbox, Metrics)>) -> Response {
    let (outbox_held, outbox_max_depth) = outbox.held();
    Json(Status {
        outbox_depth: outbox.depth(),
        staged: val(&m.outbox.staged),
        outbox_held,
        outbox_max_depth,
        dead: val(&m.outbox.dead),
        link_up_agent: m.link.up_agent().and_then(|i| m.agents.get(i).cloned()),
        link_sessions_established_total: val(&m.link.connected),
        link_acked_total: val(&m.link.acked),
        messages_total: val(&m.intake.messages),
        notices_queued_total: val(&m.intake.queued),
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_are_masked_but_the_tail_shows() {
        assert_eq!(mask_phone("+8613800138000"), "+86138****8000");
        assert_eq!(mask_phone("123"), "123");
    }

    #[test]
    fn select_parses_all_and_ids() {
        assert_eq!(parse_select("ALL"), Ok(Select::All));
        let id = NotifId::random();
        assert_eq!(parse_select(&id.to_string()), Ok(Select::Id(id)));
        assert!(parse_select("xyz").is_err());
        assert!(parse_select("abcd").is_err());
    }

    #[tokio::test]
    async fn mail_families_follow_the_stats() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("outbox"), Default::default()).unwrap();
        let metrics = Metrics {
            intake: Arc::default(),
            link: Arc::default(),
            stalwart: Arc::default(),
            outbox: outbox.stats.clone(),
            audit: Arc::default(),
            milter: Some(Arc::default()),
            retrieval: Some(Arc::default()),
            meter: Some(Arc::default()),
            agents: vec!["agent-a:7443".into(), "agent-b:7443".into()],
            certificates: vec![("cert", dir.path().join("missing.pem"))],
            served_certificates: Vec::new(),
            listeners: vec![("milter", Arc::default())],
            http: vec![("admin", Arc::default())],
            policy: Arc::new(crate::policy::Policy::empty()),
        };
        let registry = metrics.registry(outbox.clone());
        let before = mailbell_link::metrics::encode(&registry).unwrap();
        for line in [
            "mailbell_messages_total 0\n",
            "mailbell_outbox_depth 0\n",
            "mailbell_link_up{agent=\"agent-a:7443\"} 0\n",
            "mailbell_link_up{agent=\"agent-b:7443\"} 0\n",
            "mailbell_stalwart_webhook_errors_total{reason=\"confirm\"} 0\n",
            "mailbell_stalwart_hook_calls_total{stage=\"data\"} 0\n",
            "mailbell_stalwart_webhook_batches_total 0\n",
            "mailbell_delivery_meter_events_total{outcome=\"replayed\"} 0\n",
            "mailbell_blocklist_refusals_total{stage=\"helo\"} 0\n",
            "mailbell_policy_reloads_total{outcome=\"refused\"} 0\n",
            "mailbell_milter_sessions_total 0\n",
            "mailbell_retrieval_message_bytes_total 0\n",
            "mailbell_meter_records_total 0\n",
            "mailbell_meter_backlog 0\n",
            "mailbell_meter_commit_seconds_count 0\n",
            "mailbell_listener_connections_open{listener=\"milter\"} 0\n",
            "mailbell_http_requests_total{listener=\"admin\"} 0\n",
            // An unreadable certificate leaves its series out, not the family.
            "# TYPE mailbell_tls_cert_expiry_timestamp_seconds gauge\n",
        ] {
            assert!(before.contains(line), "{line:?} missing from:\n{before}");
        }
        // Every Stalwart counter in exactly one series.
        assert_eq!(
            before
                .lines()
                .filter(|l| l.starts_with("mailbell_stalwart_"))
                .count(),
            18
        );

        metrics.intake.messages.store(3, Ordering::Relaxed);
        metrics.intake.store_errors.store(1, Ordering::Relaxed);
        metrics.outbox.dead.store(2, Ordering::Relaxed);
        metrics.audit.dropped.store(6, Ordering::Relaxed);
        metrics.link.acked.store(8, Ordering::Relaxed);
        // Up with the second agent (its index plus one).
        metrics.link.up.store(2, Ordering::Relaxed);
        let n = mailbell_link::Notification {
            id: NotifId::random(),
            phone: "+8613800138000".into(),
            recipient: "zhang.wei@example.cn".into(),
            count: 1,
            ..Default::default()
        };
        outbox.enqueue(vec![n]).await.unwrap();
        let after = mailbell_link::metrics::encode(&registry).unwrap();
        for line in [
            "# TYPE mailbell_messages_total counter\n",
            "mailbell_messages_total 3\n",
            "mailbell_store_errors_total 1\n",
            "# TYPE mailbell_outbox_depth gauge\n",
            "mailbell_outbox_depth 1\n",
            "mailbell_outbox_dead 2\n",
            "mailbell_audit_dropped_total 6\n",
            "mailbell_link_acked_total 8\n",
            "mailbell_link_up{agent=\"agent-a:7443\"} 0\n",
            "mailbell_link_up{agent=\"agent-b:7443\"} 1\n",
        ] {
            assert!(after.contains(line), "{line:?} missing from:\n{after}");
        }
        // Each family once, whatever the number of collectors.
        let mut types: Vec<&str> = after.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let all = types.len();
        types.sort_unstable();
        types.dedup();
        assert_eq!(types.len(), all);
        outbox.close();
    }
}
