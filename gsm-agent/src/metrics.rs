//! The agent's HTTP endpoint: `GET /metrics` (Prometheus text format) and `GET /status`
//! (JSON, read by `mailbell-gsm-agent status`). Bound to loopback by default.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use mailbell_link::net::ServerStats;
use serde::Serialize;

use crate::dispatch::DispatchStats;
use crate::inbox::InboxStats;
use crate::modem::driver::{ModemState, ModemStatus};

/// Everything the endpoint reports.
#[derive(Clone)]
pub struct Sources {
    pub inbox: Arc<InboxStats>,
    pub dispatch: Arc<DispatchStats>,
    pub link: Arc<ServerStats>,
    pub modems: Arc<dyn Fn() -> Vec<ModemStatus> + Send + Sync>,
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
        let _ = writeln!(o, "# HELP mailbell_agent_sms_failed_total SMS failures by error class.\n# TYPE mailbell_agent_sms_failed_total counter");
        for (class, n) in &s.failed_by_class {
            let _ = writeln!(
                o,
                "mailbell_agent_sms_failed_total{{class=\"{class}\"}} {n}"
            );
        }
        let _ = writeln!(o, "# HELP mailbell_modem_up Modem ready to send (1) or not (0).\n# TYPE mailbell_modem_up gauge");
        let modems = (self.modems)();
        for m in &modems {
            let up = u8::from(m.state == ModemState::Ready);
            let _ = writeln!(o, "mailbell_modem_up{{modem=\"{}\"}} {up}", escape(&m.name));
        }
        let _ = writeln!(o, "# HELP mailbell_modem_sent_total PDUs accepted by the SMSC per modem.\n# TYPE mailbell_modem_sent_total counter");
        for m in &modems {
            let _ = writeln!(
                o,
                "mailbell_modem_sent_total{{modem=\"{}\"}} {}",
                escape(&m.name),
                m.sent
            );
        }
        let _ = writeln!(o, "# HELP mailbell_modem_failed_total Failed submissions per modem.\n# TYPE mailbell_modem_failed_total counter");
        for m in &modems {
            let _ = writeln!(
                o,
                "mailbell_modem_failed_total{{modem=\"{}\"}} {}",
                escape(&m.name),
                m.failed
            );
        }
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

/// The router.
pub fn router(src: Sources) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(src)
}
