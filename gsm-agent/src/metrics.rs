//! The agent's HTTP endpoint, bound to loopback by default:
//! - `GET /metrics`: Prometheus text format;
//! - `GET /status`: JSON, read by `mailbell-gsm-agent status`;
//! - `GET /dead-letters`: the notices given up, with their reasons (phone numbers masked);
//! - `POST /dead-letters/requeue?seq=N` (or `seq=all`): send them again. Needs
//!   `Authorization: Bearer <metrics.admin_token>`; without a configured token it is refused.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use mailbell_link::http_server::HttpStats;
use mailbell_link::listen::ListenerStats;
use mailbell_link::net::ServerStats;
use serde::Serialize;

use crate::dispatch::DispatchStats;
use crate::inbox::{Change, Inbox, InboxStats};
use crate::modem::driver::ModemState;
use crate::modem::pool::PoolModemStatus;

/// Everything the endpoint reports.
#[derive(Clone)]
pub struct Sources {
    pub inbox: Arc<InboxStats>,
    pub dispatch: Arc<DispatchStats>,
    pub link: Arc<ServerStats>,
    pub modems: Arc<dyn Fn() -> Vec<PoolModemStatus> + Send + Sync>,
    /// For the dead-letter endpoints.
    pub store: Inbox,
    pub admin_token: Option<String>,
    /// Every listener's accept counters, by `listener` label ("status", "link").
    pub listeners: Vec<(&'static str, Arc<ListenerStats>)>,
    /// Every HTTP listener's request and timeout counters, by `listener` label.
    pub http: Vec<(&'static str, Arc<HttpStats>)>,
    /// The link's certificate files by role ("cert", "ca"), for their expiry.
    pub certificates: Vec<(&'static str, std::path::PathBuf)>,
}

/// One dead letter as the endpoint shows it.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct DeadLetter {
    pub seq: u64,
    pub id: String,
    pub reason: String,
    pub to: String,
    pub recipient: String,
    pub attempts: u16,
    pub received_at_ms: i64,
}

/// The `/status` document.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Status {
    pub queued: u64,
    pub dead_letters: u64,
    pub uncertain: u64,
    pub received: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub sent: u64,
    pub retried: u64,
    pub failed_by_class: std::collections::BTreeMap<String, u64>,
    pub link_sessions_active: u64,
    pub link_sessions_total: u64,
    pub link_tls_failures: u64,
    pub link_protocol_errors: u64,
    pub modems: Vec<serde_json::Value>,
}

impl Sources {
    pub fn status(&self) -> Status {
        let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Status {
            queued: r(&self.inbox.queued),
            dead_letters: r(&self.inbox.dead),
            uncertain: r(&self.inbox.uncertain),
            received: r(&self.inbox.stored),
            duplicates: r(&self.inbox.duplicates),
            rejected: r(&self.inbox.rejected),
            sent: r(&self.dispatch.sent),
            retried: r(&self.dispatch.retried),
            failed_by_class: self
                .dispatch
                .failed
                .lock()
                .map(|m| m.clone())
                .unwrap_or_default(),
            link_sessions_active: r(&self.link.sessions_active),
            link_sessions_total: r(&self.link.sessions_total),
            link_tls_failures: r(&self.link.tls_failures),
            link_protocol_errors: r(&self.link.protocol_errors),
            modems: (self.modems)()
                .into_iter()
                .filter_map(|m| serde_json::to_value(m).ok())
                .collect(),
        }
    }

    /// Prometheus text exposition.
    pub fn prometheus(&self) -> String {
        let s = self.status();
        let mut o = String::new();
        let mut g = |name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        g(
            "mailbell_agent_queue_depth",
            "Notices waiting in the inbox.",
            "gauge",
            s.queued,
        );
        g(
            "mailbell_agent_dead_letters",
            "Notices given up.",
            "gauge",
            s.dead_letters,
        );
        g(
            "mailbell_agent_uncertain_submits",
            "Submits in flight when the agent stopped.",
            "gauge",
            s.uncertain,
        );
        g(
            "mailbell_agent_received_total",
            "Notices stored from the link.",
            "counter",
            s.received,
        );
        g(
            "mailbell_agent_duplicates_total",
            "Notices received again and de-duplicated.",
            "counter",
            s.duplicates,
        );
        g(
            "mailbell_agent_rejected_total",
            "Notices refused with a NACK.",
            "counter",
            s.rejected,
        );
        g(
            "mailbell_agent_sms_sent_total",
            "SMS sent.",
            "counter",
            s.sent,
        );
        g(
            "mailbell_agent_sms_retried_total",
            "SMS rescheduled after a failure.",
            "counter",
            s.retried,
        );
        g(
            "mailbell_link_sessions_active",
            "Open link sessions.",
            "gauge",
            s.link_sessions_active,
        );
        g(
            "mailbell_link_sessions_total",
            "Link sessions accepted.",
            "counter",
            s.link_sessions_total,
        );
        g(
            "mailbell_link_tls_failures_total",
            "Link TLS handshakes or client checks that failed.",
            "counter",
            s.link_tls_failures,
        );
        g(
            "mailbell_link_protocol_errors_total",
            "Link sessions closed for a protocol error.",
            "counter",
            s.link_protocol_errors,
        );
        g(
            "mailbell_link_refused_busy_total",
            "Authorised link connections refused as busy: no session slot freed in time.",
            "counter",
            self.link.refused_busy.load(Ordering::Relaxed),
        );
        let _ = writeln!(o, "# HELP mailbell_agent_sms_failed_total SMS failures by error class, as the dispatcher saw them (a submit the pool sent through another modem at once counts only in mailbell_modem_failed_total).\n# TYPE mailbell_agent_sms_failed_total counter");
        for (class, n) in &s.failed_by_class {
            let _ = writeln!(
                o,
                "mailbell_agent_sms_failed_total{{class=\"{class}\"}} {n}"
            );
        }
        let _ = writeln!(o, "# HELP mailbell_modem_up Modem ready to send (1) or not (0).\n# TYPE mailbell_modem_up gauge");
        let modems = (self.modems)();
        for m in &modems {
            let up = u8::from(m.modem.state == ModemState::Ready);
            let _ = writeln!(
                o,
                "mailbell_modem_up{{modem=\"{}\"}} {up}",
                escape(&m.modem.name)
            );
        }
        let _ = writeln!(o, "# HELP mailbell_modem_alarm Modem taken out of use for a run of failures while other modems send (1), cleared by its next success.\n# TYPE mailbell_modem_alarm gauge");
        for m in &modems {
            let _ = writeln!(
                o,
                "mailbell_modem_alarm{{modem=\"{}\"}} {}",
                escape(&m.modem.name),
                u8::from(m.health.alarm)
            );
        }
        let _ = writeln!(o, "# HELP mailbell_modem_cooling_down_seconds Seconds until the pool uses the modem again (0 = in use).\n# TYPE mailbell_modem_cooling_down_seconds gauge");
        for m in &modems {
            let _ = writeln!(
                o,
                "mailbell_modem_cooling_down_seconds{{modem=\"{}\"}} {}",
                escape(&m.modem.name),
                m.health.cooling_down_s
            );
        }
        let _ = writeln!(o, "# HELP mailbell_modem_failure_streak Consecutive failed submits of the modem.\n# TYPE mailbell_modem_failure_streak gauge");
        for m in &modems {
            let _ = writeln!(
                o,
                "mailbell_modem_failure_streak{{modem=\"{}\"}} {}",
                escape(&m.modem.name),
                m.health.failure_streak
            );
        }
        let _ = writeln!(o, "# HELP mailbell_modem_sent_total PDUs accepted by the SMSC per modem.\n# TYPE mailbell_modem_sent_total counter");
        for m in &modems {
            let _ = writeln!(
                o,
                "mailbell_modem_sent_total{{modem=\"{}\"}} {}",
                escape(&m.modem.name),
                m.modem.sent
            );
        }
        let _ = writeln!(o, "# HELP mailbell_modem_failed_total Failed submissions per modem.\n# TYPE mailbell_modem_failed_total counter");
        for m in &modems {
            let _ = writeln!(
                o,
                "mailbell_modem_failed_total{{modem=\"{}\"}} {}",
                escape(&m.modem.name),
                m.modem.failed
            );
        }
        let listeners: Vec<(&str, &ListenerStats)> =
            self.listeners.iter().map(|(n, s)| (*n, &**s)).collect();
        mailbell_link::listen::write_prometheus_all(&mut o, &listeners);
        if !self.http.is_empty() {
            let http: Vec<(&str, &HttpStats)> = self.http.iter().map(|(n, s)| (*n, &**s)).collect();
            mailbell_link::http_server::write_prometheus(&mut o, &http);
        }
        let certs: Vec<(&str, &std::path::Path)> = self
            .certificates
            .iter()
            .map(|(r, p)| (*r, p.as_path()))
            .collect();
        mailbell_link::tls::write_cert_expiry(&mut o, &certs);
        o
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn metrics(State(src): State<Sources>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        src.prometheus(),
    )
}

async fn status(State(src): State<Sources>) -> Json<Status> {
    Json(src.status())
}

async fn dead_letters(
    State(src): State<Sources>,
) -> Result<Json<Vec<DeadLetter>>, (StatusCode, String)> {
    let inbox = src.store.clone();
    let list = tokio::task::spawn_blocking(move || inbox.dead_letters(10_000))
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(Json(
        list.into_iter()
            .map(|(seq, reason, r)| {
                let n = r.notification();
                DeadLetter {
                    seq,
                    id: r.id.to_string(),
                    reason,
                    to: n
                        .as_ref()
                        .and_then(|n| n.phone.parse::<crate::phone::E164>().ok())
                        .map(|p| p.masked())
                        .unwrap_or_else(|| "(invalid)".into()),
                    recipient: n.map(|n| n.recipient).unwrap_or_default(),
                    attempts: r.attempts,
                    received_at_ms: r.received_at_ms,
                }
            })
            .collect(),
    ))
}

#[derive(serde::Deserialize)]
struct RequeueQuery {
    seq: String,
}

async fn requeue(
    State(src): State<Sources>,
    headers: HeaderMap,
    Query(q): Query<RequeueQuery>,
) -> Result<String, (StatusCode, String)> {
    let Some(token) = src.admin_token.as_deref() else {
        return Err((
            StatusCode::FORBIDDEN,
            "requeue is disabled: set metrics.admin_token".into(),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given != Some(token) {
        return Err((
            StatusCode::UNAUTHORIZED,
            "bad or missing admin token".into(),
        ));
    }
    let seqs: Vec<u64> = if q.seq == "all" {
        let inbox = src.store.clone();
        tokio::task::spawn_blocking(move || inbox.dead_letters(usize::MAX))
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
            .into_iter()
            .map(|(seq, _, _)| seq)
            .collect()
    } else {
        vec![q.seq.parse().map_err(|_| {
            (
                StatusCode::BAD_REQUEST,
                format!("seq {:?} is not a number or \"all\"", q.seq),
            )
        })?]
    };
    let mut n = 0;
    for seq in seqs {
        src.store
            .change(Change::Requeue(seq))
            .await
            .map_err(|e| (StatusCode::NOT_FOUND, e.to_string()))?;
        n += 1;
    }
    tracing::info!(requeued = n, "dead letters requeued by an operator");
    Ok(format!("requeued {n}\n"))
}

/// The router.
pub fn router(src: Sources) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/dead-letters", get(dead_letters))
        .route("/dead-letters/requeue", axum::routing::post(requeue))
        .with_state(src)
}
