//! Stalwart webhook tracer: signed batches of telemetry events.
//!
//! ```text
//! POST  content-type: application/json   x-signature: base64(HMAC-SHA256(key, raw body))
//! {"events":[{"id":"1795357815506","createdAt":"2026-11-22T14:30:15Z","type":"message-ingest.ham",
//!   "data":{"spanId":..,"accountId":2,"documentId":2,"mailboxId":[0],"messageId":"x@y","size":368,
//!           "queueId":341998967854203758,"queueName":"local","from":"..","to":["a@b",".."],..}},..]}
//! ```
//! Ids are JSON numbers above 2^53: they are read as u64, never through f64. `id` is not unique
//! and whole batches are resent, so the same delivery can arrive more than once: that is left
//! to the intake. `message-ingest.duplicate` carries no documentId.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use ring::hmac;
use serde::Deserialize;
use tokio::time::Instant;
use tracing::Instrument;

use super::body::{self, BodyError};
use super::{add, bump, content_length, excerpt, peer_of, text_response, Shared};
use crate::billing::ledger::Delivery;
use crate::notify::arrival::{Ingest, IngestKind, Intake};

/// Header carrying the signature.
const SIGNATURE_HEADER: &str = "x-signature";

/// Why a webhook is refused before its body is looked at (answered 401).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum SignatureError {
    #[error("no signature key configured")]
    NotConfigured,
    #[error("no X-Signature header")]
    Missing,
    #[error("X-Signature is not base64")]
    NotBase64,
    #[error("X-Signature does not match the body")]
    Mismatch,
}

/// Checks `X-Signature` against the raw body, in constant time.
pub(crate) fn verify_signature(
    key: &hmac::Key,
    body: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    let tag = base64::engine::general_purpose::STANDARD
        .decode(signature.trim_ascii())
        .map_err(|_| SignatureError::NotBase64)?;
    hmac::verify(key, body, &tag).map_err(|_| SignatureError::Mismatch)
}

/// A webhook body that is not a batch (answered 400).
#[derive(Debug, thiserror::Error)]
#[error("webhook body is not an event batch: {0}")]
pub(crate) struct BatchError(serde_json::Error);

/// What a batch holds for us.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Batch {
    /// Delivery reports, in body order (duplicates kept).
    pub ingests: Vec<Ingest>,
    /// Events of types we do not use.
    pub ignored: usize,
    /// Ingest events that could not be used, with why.
    pub skipped: Vec<Skipped>,
    /// Deliveries into a mailbox (`ham` and `spam` with an account and a size), for the
    /// delivery meter.
    pub deliveries: Vec<Delivery>,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Skipped {
    /// Position in the batch.
    pub index: usize,
    /// The event's type (cut short), or empty.
    pub kind: String,
    pub reason: String,
}

#[derive(Deserialize)]
struct WireBatch {
    events: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireIngest {
    queue_id: Option<u64>,
    account_id: Option<u64>,
    document_id: Option<u64>,
    message_id: Option<String>,
    to: Option<OneOrMany>,
    size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The delivery meter's key of a message Stalwart queued.
pub(crate) fn stalwart_message_key(queue_id: u64) -> String {
    format!("stalwart:{queue_id}")
}

/// Parses a (verified) batch body; `now_ms` stamps its deliveries.
pub(crate) fn parse_batch(body: &[u8], now_ms: i64) -> Result<Batch, BatchError> {
    let wire: WireBatch = serde_json::from_slice(body).map_err(BatchError)?;
    let mut batch = Batch::default();
    for (index, mut event) in wire.events.into_iter().enumerate() {
        let kind = match event.get("type").and_then(|t| t.as_str()) {
            Some("message-ingest.ham") => IngestKind::Ham,
            Some("message-ingest.spam") => IngestKind::Spam,
            Some("message-ingest.duplicate") => IngestKind::Duplicate,
            // 0.15 name; upstream 0.16 calls it queue.message-queued.
            Some("queue.queue-message" | "queue.message-queued") => IngestKind::Queued,
            Some(_) => {
                batch.ignored += 1;
                continue;
            }
            None => {
                batch.skipped.push(Skipped {
                    index,
                    kind: String::new(),
                    reason: "event without a type".into(),
                });
                continue;
            }
        };
        let kind_name = event
            .get("type")
            .and_then(|t| t.as_str())
            .map(excerpt)
            .unwrap_or_default();
        let skip = |reason: String| Skipped {
            index,
            kind: kind_name.clone(),
            reason,
        };
        let data = match event.get_mut("data").map(serde_json::Value::take) {
            Some(d @ serde_json::Value::Object(_)) => d,
            _ => {
                batch.skipped.push(skip("no data object".into()));
                continue;
            }
        };
        let wire: WireIngest = match serde_json::from_value(data) {
            Ok(w) => w,
            Err(e) => {
                batch.skipped.push(skip(format!("bad data: {e}")));
                continue;
            }
        };
        let Some(queue_id) = wire.queue_id else {
            batch.skipped.push(skip("no queueId".into()));
            continue;
        };
        let message_id = wire.message_id.unwrap_or_default();
        let message_id = message_id.trim();
        let message_id = message_id
            .strip_prefix('<')
            .and_then(|m| m.strip_suffix('>'))
            .unwrap_or(message_id)
            .to_owned();
        if let (IngestKind::Ham | IngestKind::Spam, Some(account), Some(bytes)) =
            (kind, wire.account_id, wire.size)
        {
            batch.deliveries.push(Delivery {
                message_key: stalwart_message_key(queue_id),
                account: format!("stalwart:{account}"),
                zone: None,
                bytes,
                at_ms: now_ms,
            });
        }
        batch.ingests.push(Ingest {
            kind,
            queue_id: Some(queue_id),
            account_id: wire.account_id,
            document_id: wire.document_id,
            message_id,
            to: match wire.to {
                None => Vec::new(),
                Some(OneOrMany::One(s)) => vec![s],
                Some(OneOrMany::Many(v)) => v,
            },
        });
    }
    Ok(batch)
}

// ---- handler -----------------------------------------------------------------------------

pub(crate) async fn handle<I: Intake>(State(sh): State<Arc<Shared<I>>>, req: Request) -> Response {
    let peer = peer_of(&req);
    let span = tracing::info_span!(
        "stalwart_webhook",
        peer = peer.map(tracing::field::display),
        events = tracing::field::Empty,
    );
    answer(&sh, req).instrument(span).await
}

async fn answer<I: Intake>(sh: &Shared<I>, req: Request) -> Response {
    let stats = &sh.stats;
    let refuse = |e: SignatureError| {
        bump(&stats.webhook_bad_signatures);
        match &e {
            SignatureError::NotConfigured => tracing::warn!(
                "webhook refused: stalwart signature_key is not configured (unsigned webhooks are never accepted)"
            ),
            e => tracing::warn!(error = %e, "webhook refused"),
        }
        text_response(StatusCode::UNAUTHORIZED, format!("webhook refused: {e}"))
    };
    let Some(key) = &sh.webhook_key else {
        return refuse(SignatureError::NotConfigured);
    };
    let Some(signature) = req.headers().get(SIGNATURE_HEADER).cloned() else {
        return refuse(SignatureError::Missing);
    };
    let limit = sh.cfg.max_webhook_body;
    let too_large = || {
        bump(&stats.webhook_too_large);
        tracing::warn!(limit, "webhook body over the limit");
        text_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("webhook body larger than {limit} bytes"),
        )
    };
    if content_length(req.headers()).is_some_and(|n| n > limit) {
        return too_large();
    }
    let deadline = Instant::now() + sh.cfg.body_timeout;
    let raw = match body::read_all(req.into_body(), limit, deadline).await {
        Ok(b) => b,
        Err(BodyError::TooLarge { .. }) => return too_large(),
        Err(e) => {
            bump(&stats.webhook_bad_requests);
            tracing::warn!(error = %e, "webhook body not received");
            let status = match e {
                BodyError::Timeout => StatusCode::REQUEST_TIMEOUT,
                _ => StatusCode::BAD_REQUEST,
            };
            return text_response(status, e.to_string());
        }
    };
    if let Err(e) = verify_signature(key, &raw, signature.as_bytes()) {
        return refuse(e);
    }
    let batch = match parse_batch(&raw, super::hook::now_ms()) {
        Ok(b) => b,
        Err(e) => {
            bump(&stats.webhook_bad_requests);
            tracing::warn!(error = %e, "signed webhook is not a batch");
            return text_response(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    bump(&stats.webhook_batches);
    add(&stats.webhook_ignored_events, batch.ignored);
    add(&stats.webhook_skipped_events, batch.skipped.len());
    for s in &batch.skipped {
        tracing::warn!(index = s.index, event = %s.kind, reason = %s.reason, "webhook event skipped");
    }
    let n = batch.ingests.len();
    tracing::Span::current().record("events", n);
    tracing::debug!(
        ingests = n,
        ignored = batch.ignored,
        skipped = batch.skipped.len(),
        "webhook batch"
    );
    if n == 0 {
        return StatusCode::OK.into_response();
    }
    if let Err(resp) = meter(sh, batch.deliveries).await {
        return resp;
    }
    match tokio::time::timeout(sh.cfg.intake_timeout, sh.intake.confirm(batch.ingests)).await {
        Ok(Ok(())) => {
            add(&stats.webhook_ingest_events, n);
            StatusCode::OK.into_response()
        }
        Ok(Err(e)) => {
            bump(&stats.webhook_confirm_errors);
            tracing::warn!(error = %e, "delivery reports not recorded: answering 503");
            text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not recorded: {e}"),
            )
        }
        Err(_) => {
            bump(&stats.webhook_confirm_errors);
            tracing::warn!(timeout = ?sh.cfg.intake_timeout, "delivery reports not recorded in time: answering 503");
            text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "not recorded in time".into(),
            )
        }
    }
}

/// Records the batch's deliveries in the delivery meter (if there is one) before the batch is
/// acknowledged; a failure is answered 503, so Stalwart resends the batch (and the records
/// already made count once).
async fn meter<I>(sh: &Shared<I>, deliveries: Vec<Delivery>) -> Result<(), Response> {
    let Some(ledger) = &sh.ledger else {
        return Ok(());
    };
    if deliveries.is_empty() {
        return Ok(());
    }
    let call = ledger.call(move |s| s.record_deliveries(&deliveries));
    let failed = |why: String| {
        bump(&sh.stats.webhook_confirm_errors);
        tracing::warn!(error = %why, "deliveries not metered: answering 503");
        text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not metered: {why}"),
        )
    };
    match tokio::time::timeout(sh.cfg.intake_timeout, call).await {
        Ok(Ok(r)) => {
            add(&sh.stats.delivery_records, r.added);
            add(&sh.stats.delivery_replays, r.replayed);
            tracing::debug!(added = r.added, replayed = r.replayed, "deliveries metered");
            Ok(())
        }
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(_) => Err(failed("the ledger did not answer in time".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(json: &str) -> (String, String) {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        (
            v["body_raw"].as_str().unwrap().to_owned(),
            v["signature_header"].as_str().unwrap().to_owned(),
        )
    }

    fn key() -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, b"test-secret")
    }

    const B06: &str = include_str!("../../../tests/fixtures/stalwart/webhook-batch-06.json");
    const B08: &str = include_str!("../../../tests/fixtures/stalwart/webhook-batch-08.json");
    const B04: &str = include_str!("../../../tests/fixtures/stalwart/webhook-batch-04.json");

    #[test]
    fn captured_batches_verify() {
        for f in [B04, B06, B08] {
            let (body, sig) = fixture(f);
            assert_eq!(
                verify_signature(&key(), body.as_bytes(), sig.as_bytes()),
                Ok(())
            );
        }
    }

    #[test]
    fn signature_failures() {
        let (body, sig) = fixture(B06);
        let other = hmac::Key::new(hmac::HMAC_SHA256, b"other");
        assert_eq!(
            verify_signature(&other, body.as_bytes(), sig.as_bytes()),
            Err(SignatureError::Mismatch)
        );
        let tampered = body.replacen("alice", "alicf", 1);
        assert_eq!(
            verify_signature(&key(), tampered.as_bytes(), sig.as_bytes()),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(&key(), body.as_bytes(), b"***"),
            Err(SignatureError::NotBase64)
        );
        assert_eq!(
            verify_signature(&key(), body.as_bytes(), b""),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn two_hams_with_exact_ids() {
        let (body, _) = fixture(B08);
        let mut b = parse_batch(body.as_bytes(), 0).unwrap();
        assert_eq!(b.ignored, 3);
        assert!(b.skipped.is_empty());
        // The batch also has the queue.queue-message of the same message.
        let queued: Vec<_> = b
            .ingests
            .iter()
            .filter(|i| i.kind == IngestKind::Queued)
            .collect();
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].queue_id, Some(341998967854203758));
        b.ingests.retain(|i| i.kind != IngestKind::Queued);
        let to = vec!["alice@test.local".to_string(), "bob@test.local".to_string()];
        assert_eq!(
            b.ingests,
            vec![
                Ingest {
                    kind: IngestKind::Ham,
                    queue_id: Some(341998967854203758),
                    account_id: Some(2),
                    document_id: Some(2),
                    message_id: "chinese-0002@remote.example".into(),
                    to: to.clone(),
                },
                Ingest {
                    kind: IngestKind::Ham,
                    queue_id: Some(341998967854203758),
                    account_id: Some(3),
                    document_id: Some(1),
                    message_id: "chinese-0002@remote.example".into(),
                    to,
                },
            ]
        );
    }

    #[test]
    fn kinds_skips_and_shapes() {
        let body = br#"{"events":[
            {"type":"message-ingest.spam","data":{"queueId":18446744073709551615,"accountId":9007199254740993,"documentId":1,"messageId":"<m@x>","to":"a@b"}},
            {"type":"message-ingest.duplicate","data":{"queueId":5,"accountId":1,"messageId":"d@x"}},
            {"type":"message-ingest.ham","data":{"accountId":1,"documentId":2}},
            {"type":"message-ingest.ham","data":{"queueId":3.5e17}},
            {"type":"message-ingest.ham","data":{"queueId":-1}},
            {"type":"message-ingest.ham"},
            {"data":{}},
            7,
            {"type":"message-ingest.imap-append","data":{"queueId":1}},
            {"type":"auth.success","data":{}}
        ]}"#;
        let b = parse_batch(body, 0).unwrap();
        assert_eq!(b.ignored, 2);
        assert_eq!(
            b.skipped.iter().map(|s| s.index).collect::<Vec<_>>(),
            [2, 3, 4, 5, 6, 7]
        );
        assert!(b.skipped[0].reason.contains("queueId"));
        assert_eq!(b.skipped[0].kind, "message-ingest.ham");
        assert_eq!(b.ingests.len(), 2);
        assert_eq!(b.ingests[0].kind, IngestKind::Spam);
        assert_eq!(b.ingests[0].queue_id, Some(u64::MAX));
        assert_eq!(b.ingests[0].account_id, Some(9007199254740993));
        assert_eq!(b.ingests[0].message_id, "m@x");
        assert_eq!(b.ingests[0].to, ["a@b"]);
        assert_eq!(b.ingests[1].kind, IngestKind::Duplicate);
        assert_eq!(b.ingests[1].document_id, None);
        assert!(b.ingests[1].to.is_empty());
    }

    #[test]
    fn not_a_batch() {
        for bad in [&b"nope"[..], b"{}", b"{\"events\":{}}", b"[]", b""] {
            assert!(
                parse_batch(bad, 0).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse_batch(br#"{"events":[],"more":1}"#, 0).unwrap(),
            Batch::default()
        );
    }
}
