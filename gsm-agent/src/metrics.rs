//! The agent's HTTP endpoint, bound to loopback by default:
//! - `GET /metrics`: Prometheus text format (collectors of `mailbell_link::metrics`);
//! - `GET /status`: JSON, read by `mailbell-gsm-agent status`;
//! - `GET /dead-letters`: the notices given up, with their reasons (phone numbers masked);
//! - `POST /dead-letters/requeue?seq=N` (or `seq=all`): send them again. Needs
//!   `Authorization: Bearer <metrics.admin_token>`; without a configured token it is refused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use mailbell_link::http_server::{HttpCollector, HttpStats};
use mailbell_link::listen::{ListenerCollector, ListenerStats};
use mailbell_link::metrics::{self, Collector, Registry};
use mailbell_link::net::ServerStats;
use mailbell_link::tls::CertExpiryCollector;
use prometheus_client::encoding::DescriptorEncoder;
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

    /// The registry `/metrics` encodes: the agent's own figures and the listener, HTTP and
    /// certificate families shared with the mail side.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        r.register_collector(Box::new(AgentCollector {
            inbox: self.inbox.clone(),
            dispatch: self.dispatch.clone(),
            link: self.link.clone(),
            modems: self.modems.clone(),
        }));
        r.register_collector(Box::new(ListenerCollector {
            listeners: self.listeners.clone(),
        }));
        r.register_collector(Box::new(HttpCollector {
            listeners: self.http.clone(),
        }));
        r.register_collector(Box::new(CertExpiryCollector {
            files: self.certificates.clone(),
            served: Vec::new(),
        }));
        r
    }
}

/// Exposes the inbox, dispatch, link-server and modem figures, read at scrape time.
struct AgentCollector {
    inbox: Arc<InboxStats>,
    dispatch: Arc<DispatchStats>,
    link: Arc<ServerStats>,
    modems: Arc<dyn Fn() -> Vec<PoolModemStatus> + Send + Sync>,
}

impl std::fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCollector").finish_non_exhaustive()
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (i, l) = (&self.inbox, &self.link);
        for (name, help, v) in [
            (
                "mailbell_agent_queue_depth",
                "Notices waiting in the inbox.",
                &i.queued,
            ),
            ("mailbell_agent_dead_letters", "Notices given up.", &i.dead),
            (
                "mailbell_agent_uncertain_submits",
                "Submits in flight when the agent stopped.",
                &i.uncertain,
            ),
            (
                "mailbell_link_sessions_active",
                "Open link sessions.",
                &l.sessions_active,
            ),
        ] {
            metrics::gauge(&mut enc, name, help, r(v))?;
        }
        for (name, help, v) in [
            (
                "mailbell_agent_received_total",
                "Notices stored from the link.",
                &i.stored,
            ),
            (
                "mailbell_agent_duplicates_total",
                "Notices received again and de-duplicated.",
                &i.duplicates,
            ),
            (
                "mailbell_agent_rejected_total",
                "Notices refused with a NACK.",
                &i.rejected,
            ),
            (
                "mailbell_agent_sms_sent_total",
                "SMS sent.",
                &self.dispatch.sent,
            ),
            (
                "mailbell_agent_sms_retried_total",
                "SMS rescheduled after a failure.",
                &self.dispatch.retried,
            ),
            (
                "mailbell_link_sessions_total",
                "Link sessions accepted.",
                &l.sessions_total,
            ),
            (
                "mailbell_link_tls_failures_total",
                "Link TLS handshakes or client checks that failed.",
                &l.tls_failures,
            ),
            (
                "mailbell_link_protocol_errors_total",
                "Link sessions closed for a protocol error.",
                &l.protocol_errors,
            ),
            (
                "mailbell_link_refused_busy_total",
                "Authorised link connections refused as busy: no session slot freed in time.",
                &l.refused_busy,
            ),
        ] {
            metrics::counter(&mut enc, name, help, r(v))?;
        }
        let failed = self
            .dispatch
            .failed
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        metrics::counter_family(
            &mut enc,
            "mailbell_agent_sms_failed_total",
            "SMS failures by error class.",
            failed
                .iter()
                .map(|(class, n)| ([("class", class.as_str())], *n)),
        )?;
        let modems = (self.modems)();
        let by_modem = |v: fn(&PoolModemStatus) -> u64| {
            modems
                .iter()
                .map(move |m| ([("modem", m.modem.name.as_str())], v(m)))
        };
        metrics::gauge_family(
            &mut enc,
            "mailbell_modem_up",
            "Modem ready to send (1) or not (0).",
            by_modem(|m| u64::from(m.modem.state == ModemState::Ready)),
        )?;
        metrics::counter_family(
            &mut enc,
            "mailbell_modem_sent_total",
            "PDUs accepted by the SMSC per modem.",
            by_modem(|m| m.modem.sent),
        )?;
        metrics::counter_family(
            &mut enc,
            "mailbell_modem_failed_total",
            "Failed submissions per modem.",
            by_modem(|m| m.modem.failed),
        )?;
        metrics::gauge_family(
            &mut enc,
            "mailbell_modem_alarm",
            "Modem taken out of use for a run of failures while other modems send (1), cleared by its next success.",
            by_modem(|m| u64::from(m.health.alarm)),
        )?;
        metrics::gauge_family(
            &mut enc,
            "mailbell_modem_cooling_down_seconds",
            "Seconds until the pool uses the modem again (0 = in use).",
            by_modem(|m| m.health.cooling_down_s),
        )?;
        metrics::gauge_family(
            &mut enc,
            "mailbell_modem_failure_streak",
            "Consecutive failed submits of the modem.",
            by_modem(|m| u64::from(m.health.failure_streak)),
        )?;
        metrics::gauge_family(
            &mut enc,
            "mailbell_modem_submit_timeout_seconds",
            "The AT+CMGS deadline in force per modem: submit_timeout until the modem has shown its submit times, then p99 x 3 of them, clamped.",
            modems.iter().map(|m| {
                (
                    [("modem", m.modem.name.as_str())],
                    m.modem.submit_timeout_ms as f64 / 1000.0,
                )
            }),
        )
    }
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
        .route("/metrics", metrics::route(src.registry()))
        .route("/status", get(status))
        .route("/dead-letters", get(dead_letters))
        .route("/dead-letters/requeue", axum::routing::post(requeue))
        .with_state(src)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::modem::driver::ModemStatus;
    use crate::modem::pool::ModemHealth;

    fn modem(name: &str, state: ModemState, sent: u64, failed: u64) -> PoolModemStatus {
        PoolModemStatus {
            modem: driver_status(name, state, sent, failed),
            health: ModemHealth::default(),
        }
    }

    fn driver_status(name: &str, state: ModemState, sent: u64, failed: u64) -> ModemStatus {
        ModemStatus {
            name: name.into(),
            state,
            sent,
            failed,
            last_error: None,
            signal: None,
            inits: 1,
            submit_timeout_ms: 60_000,
            submit_p99_ms: None,
        }
    }

    #[test]
    fn agent_families_follow_the_stats() {
        let inbox = Arc::new(InboxStats::default());
        let dispatch = Arc::new(DispatchStats::default());
        let link = Arc::new(ServerStats::default());
        let modems = Arc::new(Mutex::new(vec![modem(
            "ttyUSB0",
            ModemState::Initialising,
            0,
            0,
        )]));
        let m = modems.clone();
        let collector = AgentCollector {
            inbox: inbox.clone(),
            dispatch: dispatch.clone(),
            link: link.clone(),
            modems: Arc::new(move || m.lock().unwrap().clone()),
        };
        let collector = Arc::new(collector);
        let before = metrics::encode_one(collector.clone());
        for line in [
            "mailbell_agent_queue_depth 0\n",
            "mailbell_agent_sms_sent_total 0\n",
            "mailbell_modem_up{modem=\"ttyUSB0\"} 0\n",
            // No failure yet: the family is declared, without samples.
            "# TYPE mailbell_agent_sms_failed_total counter\n",
        ] {
            assert!(before.contains(line), "{line:?} missing from:\n{before}");
        }
        assert!(!before.contains("mailbell_agent_sms_failed_total{"));

        inbox.queued.store(7, Ordering::Relaxed);
        inbox.stored.store(9, Ordering::Relaxed);
        dispatch.sent.store(5, Ordering::Relaxed);
        dispatch
            .failed
            .lock()
            .unwrap()
            .insert("ModemFault".into(), 2);
        link.sessions_active.store(1, Ordering::Relaxed);
        link.refused_busy.store(4, Ordering::Relaxed);
        *modems.lock().unwrap() = vec![
            PoolModemStatus {
                modem: ModemStatus {
                    submit_timeout_ms: 2500,
                    ..driver_status("ttyUSB0", ModemState::Ready, 12, 1)
                },
                health: ModemHealth::default(),
            },
            PoolModemStatus {
                modem: driver_status("a\"b", ModemState::Faulty("no SIM".into()), 0, 3),
                health: ModemHealth {
                    failure_streak: 4,
                    cooling_down_s: 30,
                    escalation: 1,
                    alarm: true,
                },
            },
        ];
        let after = metrics::encode_one(collector);
        for line in [
            "# TYPE mailbell_agent_queue_depth gauge\n",
            "mailbell_agent_queue_depth 7\n",
            "# TYPE mailbell_agent_received_total counter\n",
            "mailbell_agent_received_total 9\n",
            "mailbell_agent_sms_sent_total 5\n",
            "mailbell_agent_sms_failed_total{class=\"ModemFault\"} 2\n",
            "mailbell_link_sessions_active 1\n",
            "mailbell_link_refused_busy_total 4\n",
            "mailbell_modem_up{modem=\"ttyUSB0\"} 1\n",
            "mailbell_modem_up{modem=\"a\\\"b\"} 0\n",
            "mailbell_modem_sent_total{modem=\"ttyUSB0\"} 12\n",
            "mailbell_modem_failed_total{modem=\"a\\\"b\"} 3\n",
            "# TYPE mailbell_modem_submit_timeout_seconds gauge\n",
            "mailbell_modem_submit_timeout_seconds{modem=\"ttyUSB0\"} 2.5\n",
            "mailbell_modem_alarm{modem=\"a\\\"b\"} 1\n",
            "mailbell_modem_alarm{modem=\"ttyUSB0\"} 0\n",
            "mailbell_modem_cooling_down_seconds{modem=\"a\\\"b\"} 30\n",
            "mailbell_modem_failure_streak{modem=\"a\\\"b\"} 4\n",
        ] {
            assert!(after.contains(line), "{line:?} missing from:\n{after}");
        }
        // Every family once.
        assert_eq!(after.matches("# TYPE ").count(), 21, "{after}");
    }
}
