//! Stalwart's two HTTP callers: the MTA hook (synchronous, one request per SMTP stage) and the
//! webhook tracer (asynchronous batches of telemetry events).
//!
//! ```text
//! POST <hook_path>      {"context":{"stage":"data","client":{"ip":..,"helo":..},"queue":{"id":"<hex>"}},
//!                        "envelope":{"from":{"address":..},"to":[{"address":..},..]},
//!                        "message":{"headers":[[name," raw value\r\n"],..],"contents":"<body>","size":N}}
//!                  <-   200 {"action":"accept"}
//!                  <-   200 {"action":"reject","response":{"status":451,"enhanced_status":"4.3.0",..}}
//! POST <webhook_path>   X-Signature: base64(HMAC-SHA256(signature_key, raw body))
//!                       {"events":[{"id":..,"createdAt":..,"type":"message-ingest.ham","data":{..}},..]}
//!                  <-   200 | 401 bad signature | 400 not a batch | 503 not recorded (Stalwart resends)
//! ```
//!
//! * The hook's `data` stage becomes an [`Arrival`](crate::notify::arrival::Arrival) for
//!   [`Intake::accept`]; the other stages are accepted at once (`hook.rs` keeps the seam for
//!   blocklists). The data-stage body carries the whole message (`message.contents`, up to
//!   Stalwart's 100 MB default), so it is parsed while it streams in and the body text is skipped
//!   without being stored (see `body.rs`).
//! * The webhook's `message-ingest.ham|spam|duplicate` events become [`Ingest`]s for
//!   [`Intake::confirm`]; every other event type is counted and dropped. The signature is checked
//!   on the raw body before any parsing; without a configured key every batch is refused.
//!
//! * Every field of a hook request other than `message.contents` has a size cap (`caps.rs`),
//!   enforced on the bytes before the parser copies anything: a request over one is answered
//!   413, a malformed one 400, so one request costs a few MB at most whatever its fields hold.
//!
//! Stalwart treats any non-2xx answer or timeout from the hook as an error (its hook client,
//! `smtp/src/inbound/hooks/client.rs`) and, with its default `options.tempfail-on-error =
//! true`, answers the SMTP client `451 4.3.5` (`hooks/message.rs`), so a 400 or 413 never loses
//! mail: the sending MTA retries. With `tempfail-on-error = false` Stalwart would accept the
//! message instead (no notice); keep the default. A non-2xx webhook answer makes Stalwart resend the whole batch.
//!
//! Logs: one span per request (`stalwart_hook` / `stalwart_webhook`, with `peer`, `stage`,
//! `queue_id`); warn for a peer mistake (bad request, bad signature) and for a refused arrival;
//! debug for every call; nothing from the message body is ever logged.
//!
//! [`Ingest`]: crate::notify::arrival::Ingest
//! [`Intake::accept`]: crate::notify::arrival::Intake::accept
//! [`Intake::confirm`]: crate::notify::arrival::Intake::confirm

mod body;
mod caps;
mod hook;
mod webhook;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use ring::hmac;
use serde::Deserialize;
use tokio::sync::Semaphore;

use mailbell_link::units::de_duration;

use crate::billing::Ledger;
use crate::notify::arrival::Intake;
use crate::policy::Policy;

/// `[stalwart]` section of the daemon's configuration.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StalwartConfig {
    /// Path of the MTA hook (Stalwart `session.hook.<id>.url`).
    pub hook_path: String,
    /// Path of the webhook receiver (Stalwart `webhook.<id>.url`).
    pub webhook_path: String,
    /// Stalwart's `webhook.<id>.signature-key`. Empty: every webhook is refused (401).
    pub signature_key: String,
    /// Largest webhook body accepted, bytes.
    pub max_webhook_body: u64,
    /// Largest MTA-hook body accepted, bytes. The data stage carries the whole message, JSON
    /// escaped, so this is above Stalwart's 100 MiB default message size limit.
    pub max_hook_body: u64,
    /// If set, MTA-hook requests must carry `Authorization: Bearer <token>` (Stalwart:
    /// `session.hook.<id>.headers = ["Authorization: Bearer <token>"]`).
    pub hook_token: Option<String>,
    /// Time allowed to receive a whole request body ("30s", "500ms", "2m" or seconds).
    #[serde(deserialize_with = "de_duration")]
    pub body_timeout: Duration,
    /// Time allowed to the intake to record an arrival or a batch; past it the hook answers
    /// tempfail and the webhook 503. Keep it below Stalwart's hook `timeout` (default 30s).
    #[serde(deserialize_with = "de_duration")]
    pub intake_timeout: Duration,
    /// Large hook bodies parsed at the same time (each holds a blocking thread while it
    /// streams); further ones wait up to `body_timeout`, then get 503.
    pub max_parallel_streams: usize,
}

impl Default for StalwartConfig {
    fn default() -> Self {
        Self {
            hook_path: "/stalwart/mta-hook".into(),
            webhook_path: "/stalwart/events".into(),
            signature_key: String::new(),
            max_webhook_body: 8 << 20,
            max_hook_body: 128 << 20,
            hook_token: None,
            body_timeout: Duration::from_secs(60),
            intake_timeout: Duration::from_secs(20),
            max_parallel_streams: 16,
        }
    }
}

impl fmt::Debug for StalwartConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StalwartConfig")
            .field("hook_path", &self.hook_path)
            .field("webhook_path", &self.webhook_path)
            .field("signature_key", &redacted(!self.signature_key.is_empty()))
            .field("max_webhook_body", &self.max_webhook_body)
            .field("max_hook_body", &self.max_hook_body)
            .field("hook_token", &redacted(self.hook_token.is_some()))
            .field("body_timeout", &self.body_timeout)
            .field("intake_timeout", &self.intake_timeout)
            .field("max_parallel_streams", &self.max_parallel_streams)
            .finish()
    }
}

fn redacted(set: bool) -> &'static str {
    if set {
        "<set>"
    } else {
        "<unset>"
    }
}

/// Counters for `/metrics`. All relaxed; read them with [`StalwartStats::snapshot`].
#[derive(Debug, Default)]
pub struct StalwartStats {
    hook_connect: AtomicU64,
    hook_ehlo: AtomicU64,
    hook_mail: AtomicU64,
    hook_rcpt: AtomicU64,
    hook_data: AtomicU64,
    hook_unknown_stage: AtomicU64,
    hook_intake_errors: AtomicU64,
    hook_bad_requests: AtomicU64,
    hook_unauthorized: AtomicU64,
    hook_too_large: AtomicU64,
    webhook_batches: AtomicU64,
    webhook_ingest_events: AtomicU64,
    webhook_ignored_events: AtomicU64,
    webhook_skipped_events: AtomicU64,
    webhook_bad_signatures: AtomicU64,
    webhook_bad_requests: AtomicU64,
    webhook_too_large: AtomicU64,
    webhook_confirm_errors: AtomicU64,
    delivery_records: AtomicU64,
    delivery_replays: AtomicU64,
}

/// A copy of [`StalwartStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Hook calls per stage.
    pub hook_connect: u64,
    pub hook_ehlo: u64,
    pub hook_mail: u64,
    pub hook_rcpt: u64,
    pub hook_data: u64,
    /// Hook calls with a stage we do not know (accepted).
    pub hook_unknown_stage: u64,
    /// Data-stage arrivals the intake could not record (answered tempfail).
    pub hook_intake_errors: u64,
    /// Hook requests answered 400/408 (malformed, incomplete, too slow).
    pub hook_bad_requests: u64,
    /// Hook requests without the configured bearer token (401).
    pub hook_unauthorized: u64,
    /// Hook requests over `max_hook_body` or with a field over its cap (413).
    pub hook_too_large: u64,
    /// Webhook batches with a valid signature and a well-formed body.
    pub webhook_batches: u64,
    /// `message-ingest.*` events handed to the intake.
    pub webhook_ingest_events: u64,
    /// Events of other types, dropped.
    pub webhook_ignored_events: u64,
    /// Ingest events without the keys they need, dropped.
    pub webhook_skipped_events: u64,
    /// Webhooks refused for a missing or wrong signature, or no configured key (401).
    pub webhook_bad_signatures: u64,
    /// Signed webhooks that are not a batch (400/408).
    pub webhook_bad_requests: u64,
    /// Webhooks over `max_webhook_body` (413).
    pub webhook_too_large: u64,
    /// Batches the intake or the delivery meter could not record (503, Stalwart resends).
    pub webhook_confirm_errors: u64,
    /// Delivery meter records made from webhook events.
    pub delivery_records: u64,
    /// Webhook deliveries already metered (a resent batch): not counted again.
    pub delivery_replays: u64,
}

/// One `/metrics` family of the Stalwart endpoint counters.
pub struct CounterFamily {
    /// Full name, `_total` included.
    pub name: &'static str,
    pub help: &'static str,
    /// The label that tells the series apart.
    pub label: &'static str,
    pub series: Vec<(&'static str, u64)>,
}

impl StatsSnapshot {
    /// The counters as `/metrics` shows them, one family per kind of thing counted: hook
    /// calls by stage, refused hook calls by reason, webhook events by outcome, refused
    /// webhooks by reason. Webhook batches are [`StatsSnapshot::webhook_batches`] alone.
    pub fn families(&self) -> [CounterFamily; 5] {
        [
            CounterFamily {
                name: "mailbell_stalwart_hook_calls_total",
                help: "MTA hook calls from Stalwart, by SMTP stage.",
                label: "stage",
                series: vec![
                    ("connect", self.hook_connect),
                    ("ehlo", self.hook_ehlo),
                    ("mail", self.hook_mail),
                    ("rcpt", self.hook_rcpt),
                    ("data", self.hook_data),
                    ("unknown", self.hook_unknown_stage),
                ],
            },
            CounterFamily {
                name: "mailbell_stalwart_hook_errors_total",
                help: "MTA hook calls not answered with a verdict, by reason.",
                label: "reason",
                series: vec![
                    ("intake", self.hook_intake_errors),
                    ("bad_request", self.hook_bad_requests),
                    ("unauthorized", self.hook_unauthorized),
                    ("too_large", self.hook_too_large),
                ],
            },
            CounterFamily {
                name: "mailbell_stalwart_webhook_events_total",
                help: "Events in Stalwart's webhook batches, by what became of them.",
                label: "outcome",
                series: vec![
                    ("ingest", self.webhook_ingest_events),
                    ("ignored", self.webhook_ignored_events),
                    ("skipped", self.webhook_skipped_events),
                ],
            },
            CounterFamily {
                name: "mailbell_stalwart_webhook_errors_total",
                help: "Webhook requests refused or not recorded, by reason.",
                label: "reason",
                series: vec![
                    ("bad_signature", self.webhook_bad_signatures),
                    ("bad_request", self.webhook_bad_requests),
                    ("too_large", self.webhook_too_large),
                    ("confirm", self.webhook_confirm_errors),
                ],
            },
            CounterFamily {
                name: "mailbell_delivery_meter_events_total",
                help: "Mailbox deliveries reported by Stalwart's webhooks, by what the delivery meter did.",
                label: "outcome",
                series: vec![
                    ("recorded", self.delivery_records),
                    ("replayed", self.delivery_replays),
                ],
            },
        ]
    }
}

impl StalwartStats {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            hook_connect: g(&self.hook_connect),
            hook_ehlo: g(&self.hook_ehlo),
            hook_mail: g(&self.hook_mail),
            hook_rcpt: g(&self.hook_rcpt),
            hook_data: g(&self.hook_data),
            hook_unknown_stage: g(&self.hook_unknown_stage),
            hook_intake_errors: g(&self.hook_intake_errors),
            hook_bad_requests: g(&self.hook_bad_requests),
            hook_unauthorized: g(&self.hook_unauthorized),
            hook_too_large: g(&self.hook_too_large),
            webhook_batches: g(&self.webhook_batches),
            webhook_ingest_events: g(&self.webhook_ingest_events),
            webhook_ignored_events: g(&self.webhook_ignored_events),
            webhook_skipped_events: g(&self.webhook_skipped_events),
            webhook_bad_signatures: g(&self.webhook_bad_signatures),
            webhook_bad_requests: g(&self.webhook_bad_requests),
            webhook_too_large: g(&self.webhook_too_large),
            webhook_confirm_errors: g(&self.webhook_confirm_errors),
            delivery_records: g(&self.delivery_records),
            delivery_replays: g(&self.delivery_replays),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

/// Both routes, with fresh counters (see [`router_with_stats`] to read them).
pub fn router<I: Intake>(intake: Arc<I>, cfg: StalwartConfig) -> Router {
    router_with_stats(intake, cfg, Arc::new(StalwartStats::new()))
}

/// Both routes, counting into `stats`.
pub fn router_with_stats<I: Intake>(
    intake: Arc<I>,
    cfg: StalwartConfig,
    stats: Arc<StalwartStats>,
) -> Router {
    router_with_policy(intake, cfg, stats, Arc::new(Policy::empty()), None)
}

/// Both routes, refusing what `policy`'s blocklist names at the connect, ehlo and mail stages,
/// and metering deliveries into `ledger` (none: no delivery meter).
pub fn router_with_policy<I: Intake>(
    intake: Arc<I>,
    cfg: StalwartConfig,
    stats: Arc<StalwartStats>,
    policy: Arc<Policy>,
    ledger: Option<Ledger>,
) -> Router {
    let webhook_key = (!cfg.signature_key.is_empty())
        .then(|| hmac::Key::new(hmac::HMAC_SHA256, cfg.signature_key.as_bytes()));
    if webhook_key.is_none() {
        tracing::warn!(
            path = %cfg.webhook_path,
            "stalwart webhook signature_key is not configured: every webhook will be refused"
        );
    }
    let shared = Arc::new(Shared {
        intake,
        policy,
        ledger,
        streams: Semaphore::new(cfg.max_parallel_streams.max(1)),
        webhook_key,
        stats,
        cfg,
    });
    Router::new()
        .route(&shared.cfg.hook_path, post(hook::handle::<I>))
        .route(&shared.cfg.webhook_path, post(webhook::handle::<I>))
        .with_state(shared)
}

/// What the handlers share.
struct Shared<I> {
    intake: Arc<I>,
    /// Blocklist and zones.
    policy: Arc<Policy>,
    /// The delivery meter's store; `None`: deliveries are not metered.
    ledger: Option<Ledger>,
    cfg: StalwartConfig,
    stats: Arc<StalwartStats>,
    /// `None` when no signature key is configured.
    webhook_key: Option<hmac::Key>,
    /// Permits for streamed (large) hook bodies.
    streams: Semaphore,
}

/// The peer's address, if the server was started with connect info.
fn peer_of<B>(req: &axum::http::Request<B>) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

/// The declared body length, if any and valid.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn json_response(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn text_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Shortens peer-supplied text for a log line or an error reply.
fn excerpt(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_parse() {
        let d = StalwartConfig::default();
        assert_eq!(d.hook_path, "/stalwart/mta-hook");
        assert_eq!(d.webhook_path, "/stalwart/events");
        assert!(d.signature_key.is_empty());
        assert!(d.max_hook_body > 100 * 1024 * 1024);

        let c: StalwartConfig = toml::from_str(
            r#"
            signature_key = "k"
            hook_token = "t"
            body_timeout = "90s"
            intake_timeout = 5
            max_webhook_body = 1024
            "#,
        )
        .unwrap();
        assert_eq!(c.signature_key, "k");
        assert_eq!(c.hook_token.as_deref(), Some("t"));
        assert_eq!(c.body_timeout, Duration::from_secs(90));
        assert_eq!(c.intake_timeout, Duration::from_secs(5));
        assert_eq!(c.max_webhook_body, 1024);
        assert_eq!(c.hook_path, d.hook_path);

        assert!(toml::from_str::<StalwartConfig>("spam_notifies = true").is_err());
        assert!(toml::from_str::<StalwartConfig>("body_timeout = \"soon\"").is_err());
    }

    #[test]
    fn debug_hides_secrets() {
        let c = StalwartConfig {
            signature_key: "s3cret-key".into(),
            hook_token: Some("t0ken".into()),
            ..Default::default()
        };
        let s = format!("{c:?}");
        assert!(!s.contains("s3cret-key") && !s.contains("t0ken"), "{s}");
        assert!(s.contains("<set>"));
    }

    #[test]
    fn token_check() {
        // The hook token is checked like the admin token.
        let allows = |h: &HeaderMap| crate::bearer::authorized(h, "abc");
        let mut h = HeaderMap::new();
        assert!(!allows(&h));
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert!(allows(&h));
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert!(allows(&h));
        h.insert(header::AUTHORIZATION, "Bearer abcd".parse().unwrap());
        assert!(!allows(&h));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert!(!allows(&h));
    }

    #[test]
    fn excerpt_cuts_on_char_boundary() {
        assert_eq!(excerpt("short"), "short");
        let long = "新".repeat(40);
        let e = excerpt(&long);
        assert!(e.ends_with('…'));
        assert!(e.len() <= 64 + '…'.len_utf8());
    }
}
