//! Stalwart MTA hook: one JSON request per SMTP stage, answered with an action.
//!
//! ```text
//! {"context":{"stage":"connect|ehlo|mail|rcpt|data",
//!             "client":{"ip":"127.0.0.1","port":48216,"ptr":null,"helo":"client.example","activeConnections":1},
//!             "server":{..},"queue":{"id":"4bf063ec5c0016e"},"protocol":{"version":1}},   queue: data only
//!  "envelope":{"from":{"address":"carol@remote.example"},"to":[{"address":"alice@test.local"}]},  mail..data
//!  "message":{"headers":[["From"," Carol <carol@remote.example>\r\n"],..],
//!             "contents":"<body, up to ~100 MB>","size":334}}                                  data only
//! ```
//! The queue id is lower-case hex here and decimal in webhook events (`queueId`).
//! Unknown keys are ignored (Stalwart adds fields). `message.contents` and the values of header
//! fields we do not decode are skipped by the parser without being stored.

use std::io::BufRead;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use tokio::time::Instant;
use tracing::Instrument;

use super::body::{self, BodyError, StreamError};
use super::caps::{CapExceeded, CappedReader, FieldCaps};
use super::{bump, content_length, excerpt, json_response, peer_of, text_response, Shared};
use crate::mta::headers::HeaderCollector;
use crate::notify::arrival::{Arrival, Intake, Origin};
use crate::policy::zones::{Source, Zone};

/// Most envelope recipients kept from one request (Stalwart's default limit is 100); the rest
/// are dropped with a warning.
pub(crate) const MAX_RCPTS: usize = 1000;

/// Bodies up to this size (by Content-Length) are read whole and parsed in place; larger or
/// unsized ones are streamed.
const INLINE_BODY: u64 = 256 * 1024;

pub(crate) const ACCEPT: &str = r#"{"action":"accept"}"#;
pub(crate) const REJECT_TEMPFAIL: &str = r#"{"action":"reject","response":{"status":451,"enhanced_status":"4.3.0","message":"mailbell: cannot record the arrival notice, try again later","disconnect":false}}"#;

/// The SMTP stage a hook call is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    Connect,
    Ehlo,
    Mail,
    Rcpt,
    Data,
    /// A stage this code does not know (cut to a few dozen bytes).
    Other(String),
}

impl Stage {
    fn parse(s: &str) -> Self {
        match s {
            "connect" => Stage::Connect,
            "ehlo" => Stage::Ehlo,
            "mail" => Stage::Mail,
            "rcpt" => Stage::Rcpt,
            "data" => Stage::Data,
            other => Stage::Other(excerpt(other)),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            Stage::Connect => "connect",
            Stage::Ehlo => "ehlo",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
            Stage::Other(s) => s,
        }
    }
}

/// Why a hook request cannot be used. Each is answered 400, except `TooLarge` (413).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum HookError {
    #[error(transparent)]
    TooLarge(CapExceeded),
    #[error("invalid hook request JSON: {0}")]
    Json(serde_json::Error),
    #[error("data stage without context.queue.id")]
    MissingQueueId,
    #[error("context.queue.id {0:?} is not a hexadecimal queue id")]
    BadQueueId(String),
    #[error("data stage without envelope")]
    MissingEnvelope,
    #[error("data stage without message")]
    MissingMessage,
    #[error("data stage without message.size")]
    MissingSize,
}

/// A parsed hook request: everything we use, nothing of the body.
#[derive(Debug)]
pub(crate) struct HookRequest {
    pub stage: Stage,
    queue_id: Option<String>,
    client_ip: Option<String>,
    helo: Option<String>,
    envelope: Option<WireEnvelope>,
    message: Option<WireMessage>,
}

impl HookRequest {
    pub(crate) fn from_slice(body: &[u8]) -> Result<Self, HookError> {
        FieldCaps::new().feed(body).map_err(HookError::TooLarge)?;
        serde_json::from_slice::<Wire>(body)
            .map(Self::from)
            .map_err(HookError::Json)
    }

    /// Parses from a reader without holding the body (see `body.rs`); stops reading at the
    /// first field over its cap (see `caps.rs`).
    pub(crate) fn from_reader(r: &mut dyn BufRead) -> Result<Self, HookError> {
        let mut capped = CappedReader::new(r);
        let parsed = serde_json::from_reader::<_, Wire>(&mut capped);
        if let Some(e) = capped.exceeded() {
            return Err(HookError::TooLarge(e.clone()));
        }
        parsed.map(Self::from).map_err(HookError::Json)
    }

    /// Recipients beyond [`MAX_RCPTS`] that were dropped.
    pub(crate) fn rcpts_dropped(&self) -> usize {
        self.envelope.as_ref().map_or(0, |e| e.to.dropped)
    }

    /// The arrival of a data-stage request.
    pub(crate) fn into_arrival(self, received_at_ms: i64) -> Result<Arrival, HookError> {
        let queue_id = parse_queue_id(self.queue_id.as_deref().ok_or(HookError::MissingQueueId)?)?;
        let envelope = self.envelope.ok_or(HookError::MissingEnvelope)?;
        let message = self.message.ok_or(HookError::MissingMessage)?;
        let size = message.size.ok_or(HookError::MissingSize)?;
        Ok(Arrival {
            origin: Origin::Stalwart { queue_id },
            client_ip: self.client_ip.as_deref().and_then(parse_ip),
            helo: self.helo.unwrap_or_default(),
            env_from: envelope
                .from
                .map(|a| strip_angles(&a.address).to_owned())
                .unwrap_or_default(),
            rcpts: envelope
                .to
                .kept
                .iter()
                .map(|a| strip_angles(a).to_owned())
                .collect(),
            headers: message.headers.0.finish(),
            size,
            received_at_ms,
            mta_queue_id: None,
        })
    }
}

impl From<Wire> for HookRequest {
    fn from(w: Wire) -> Self {
        let client = w.context.client.unwrap_or_default();
        HookRequest {
            stage: Stage::parse(&w.context.stage),
            queue_id: w.context.queue.and_then(|q| q.id),
            client_ip: client.ip,
            helo: client.helo,
            envelope: w.envelope,
            message: w.message,
        }
    }
}

/// `u64::from_str_radix` alone would also take a leading `+`.
fn parse_queue_id(hex: &str) -> Result<u64, HookError> {
    if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(HookError::BadQueueId(excerpt(hex)));
    }
    u64::from_str_radix(hex, 16).map_err(|_| HookError::BadQueueId(excerpt(hex)))
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    let ip = s.trim().parse().ok();
    if ip.is_none() {
        tracing::warn!(ip = %excerpt(s), "hook context.client.ip is not an IP address");
    }
    ip
}

fn strip_angles(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(s)
}

// ---- wire format -------------------------------------------------------------------------

#[derive(Deserialize)]
struct Wire {
    context: WireContext,
    envelope: Option<WireEnvelope>,
    message: Option<WireMessage>,
}

#[derive(Deserialize)]
struct WireContext {
    stage: String,
    client: Option<WireClient>,
    queue: Option<WireQueue>,
}

#[derive(Deserialize, Default)]
struct WireClient {
    ip: Option<String>,
    helo: Option<String>,
}

#[derive(Deserialize)]
struct WireQueue {
    id: Option<String>,
}

#[derive(Deserialize, Debug)]
struct WireEnvelope {
    from: Option<WireAddr>,
    #[serde(default)]
    to: Rcpts,
}

#[derive(Deserialize, Debug)]
struct WireAddr {
    #[serde(default)]
    address: String,
}

#[derive(Deserialize, Debug)]
struct WireMessage {
    #[serde(default)]
    headers: Headers,
    /// The body: skipped by the parser, never stored.
    #[serde(rename = "contents", default)]
    _contents: IgnoredAny,
    size: Option<u64>,
}

/// `envelope.to`: the first [`MAX_RCPTS`] addresses.
#[derive(Debug, Default)]
struct Rcpts {
    kept: Vec<String>,
    dropped: usize,
}

impl<'de> Deserialize<'de> for Rcpts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Rcpts;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of {\"address\": ...} objects")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Rcpts, A::Error> {
                let mut r = Rcpts::default();
                while r.kept.len() < MAX_RCPTS {
                    match seq.next_element::<WireAddr>()? {
                        Some(a) => r.kept.push(a.address),
                        None => return Ok(r),
                    }
                }
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    r.dropped += 1;
                }
                Ok(r)
            }
        }
        d.deserialize_seq(V)
    }
}

/// `message.headers`: `[[name, value], ...]` fed straight into a [`HeaderCollector`]; values
/// of fields [`crate::mta::headers::wants`] does not name are skipped unread.
#[derive(Debug, Default)]
struct Headers(HeaderCollector);

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Headers;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of [name, value] header fields")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Headers, A::Error> {
                let mut c = HeaderCollector::new();
                while seq.next_element_seed(Field(&mut c))?.is_some() {}
                Ok(Headers(c))
            }
        }
        d.deserialize_seq(V)
    }
}

/// One `[name, value]` pair.
struct Field<'a>(&'a mut HeaderCollector);

impl<'de> DeserializeSeed<'de> for Field<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Field<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a [name, value] header field")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let name: String = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(0, &"a [name, value] header field"))?;
        if crate::mta::headers::wants(&name) {
            let value: String = seq
                .next_element()?
                .ok_or_else(|| de::Error::invalid_length(1, &"a [name, value] header field"))?;
            self.0.add(&name, value.as_bytes());
        } else if seq.next_element::<IgnoredAny>()?.is_none() {
            return Err(de::Error::invalid_length(
                1,
                &"a [name, value] header field",
            ));
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

// ---- handler -----------------------------------------------------------------------------

pub(crate) async fn handle<I: Intake>(State(sh): State<Arc<Shared<I>>>, req: Request) -> Response {
    let peer = peer_of(&req);
    let span = tracing::info_span!(
        "stalwart_hook",
        peer = peer.map(tracing::field::display),
        stage = tracing::field::Empty,
        queue_id = tracing::field::Empty,
    );
    answer(&sh, req).instrument(span).await
}

async fn answer<I: Intake>(sh: &Shared<I>, req: Request) -> Response {
    let stats = &sh.stats;
    if let Some(token) = &sh.cfg.hook_token {
        if !crate::bearer::authorized(req.headers(), token) {
            bump(&stats.hook_unauthorized);
            tracing::warn!("hook request without the configured bearer token");
            return text_response(
                StatusCode::UNAUTHORIZED,
                "bad or missing bearer token".into(),
            );
        }
    }
    let req = match read_request(sh, req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let span = tracing::Span::current();
    span.record("stage", req.stage.as_str());
    match &req.stage {
        Stage::Connect => bump(&stats.hook_connect),
        Stage::Ehlo => bump(&stats.hook_ehlo),
        Stage::Mail => bump(&stats.hook_mail),
        Stage::Rcpt => bump(&stats.hook_rcpt),
        Stage::Data => bump(&stats.hook_data),
        Stage::Other(s) => {
            bump(&stats.hook_unknown_stage);
            tracing::warn!(stage = %s, "hook call for an unknown stage: accepted");
            return json_response(StatusCode::OK, ACCEPT);
        }
    }
    if let Some(refused) = refusal(sh, &req) {
        return refused;
    }
    if req.stage != Stage::Data {
        tracing::debug!("accepted");
        return json_response(StatusCode::OK, ACCEPT);
    }
    if req.rcpts_dropped() > 0 {
        tracing::warn!(
            dropped = req.rcpts_dropped(),
            kept = MAX_RCPTS,
            "data stage with too many recipients: the rest get no notice"
        );
    }
    let arrival = match req.into_arrival(now_ms()) {
        Ok(a) => a,
        Err(e) => {
            bump(&stats.hook_bad_requests);
            tracing::warn!(error = %e, "unusable data-stage hook request");
            return text_response(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    if let Origin::Stalwart { queue_id } = arrival.origin {
        span.record("queue_id", queue_id);
    }
    if let Err(e) = remember_zone(sh, &arrival).await {
        bump(&stats.hook_intake_errors);
        tracing::warn!(error = %e, "message zone not recorded: answering tempfail");
        return json_response(StatusCode::OK, REJECT_TEMPFAIL);
    }
    let rcpts = arrival.rcpts.len();
    let size = arrival.size;
    match tokio::time::timeout(sh.cfg.intake_timeout, sh.intake.accept(arrival)).await {
        Ok(Ok(accepted)) => {
            tracing::debug!(rcpts, size, notices = accepted.notices, "arrival recorded");
            json_response(StatusCode::OK, ACCEPT)
        }
        Ok(Err(e)) => {
            bump(&stats.hook_intake_errors);
            tracing::warn!(error = %e, "arrival not recorded: answering tempfail");
            json_response(StatusCode::OK, REJECT_TEMPFAIL)
        }
        Err(_) => {
            bump(&stats.hook_intake_errors);
            tracing::warn!(
                timeout = ?sh.cfg.intake_timeout,
                "arrival not recorded in time: answering tempfail"
            );
            json_response(StatusCode::OK, REJECT_TEMPFAIL)
        }
    }
}

/// The blocklist's verdict on what this stage shows (the client address at every stage, the
/// HELO name from ehlo on, the envelope sender from mail on), as a 550 reply; `None` to go on.
/// Nothing is looked at when no blocklist is configured.
fn refusal<I>(sh: &Shared<I>, req: &HookRequest) -> Option<Response> {
    let list = sh.policy.blocklist();
    if list.is_empty() {
        return None;
    }
    let ip = req.client_ip.as_deref().and_then(parse_ip);
    let helo = || match req.stage {
        Stage::Connect => None,
        _ => req.helo.as_deref().and_then(|h| list.helo(h)),
    };
    let from = || {
        let from = req.envelope.as_ref()?.from.as_ref()?;
        list.mail(&from.address)
    };
    let r = list.connect(ip).or_else(helo).or_else(from)?;
    let text = sh.policy.refused("stalwart", ip, &r);
    // After a refused connect or HELO the session has nothing more to offer.
    let disconnect = r.stage != crate::policy::blocklist::Check::Mail;
    let body = serde_json::json!({
        "action": "reject",
        "response": {"status": 550, "enhanced_status": "5.7.1", "message": text, "disconnect": disconnect},
    });
    Some(
        (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response(),
    )
}

/// Remembers the zone of a data-stage message for its deliveries, when it is not the default
/// (foreign): with no zone rules or no delivery meter this does nothing.
async fn remember_zone<I>(sh: &Shared<I>, a: &Arrival) -> Result<(), String> {
    let (Some(ledger), Origin::Stalwart { queue_id }) = (&sh.ledger, a.origin) else {
        return Ok(());
    };
    if sh.policy.zones().is_empty() {
        return Ok(());
    }
    let src = Source {
        client_ip: a.client_ip,
        env_from: &a.env_from,
        auth_results: &a.headers.auth_results,
    };
    let zone = sh.policy.zone_of(&src, &a.helo).await;
    tracing::debug!(zone = zone.as_str(), "message zone");
    if zone == Zone::Foreign {
        return Ok(());
    }
    let key = super::webhook::stalwart_message_key(queue_id);
    let at = a.received_at_ms;
    let call = ledger.call(move |s| s.remember_source(&key, zone, at));
    match tokio::time::timeout(sh.cfg.intake_timeout, call).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the ledger did not answer in time".into()),
    }
}

/// Reads and parses the request, small bodies in place, large or unsized ones streamed.
async fn read_request<I: Intake>(sh: &Shared<I>, req: Request) -> Result<HookRequest, Response> {
    let stats = &sh.stats;
    let limit = sh.cfg.max_hook_body;
    let deadline = Instant::now() + sh.cfg.body_timeout;
    let declared = content_length(req.headers());
    if declared.is_some_and(|n| n > limit) {
        bump(&stats.hook_too_large);
        return Err(too_large(limit));
    }
    let body = req.into_body();
    let parsed = if declared.is_some_and(|n| n <= INLINE_BODY) {
        match body::read_all(body, limit, deadline).await {
            Ok(bytes) => HookRequest::from_slice(&bytes).map_err(StreamError::Parse),
            Err(e) => Err(StreamError::Body(e)),
        }
    } else {
        let permit = tokio::time::timeout_at(deadline, sh.streams.acquire()).await;
        let Ok(Ok(_permit)) = permit else {
            tracing::warn!("too many large hook bodies at once: answering 503");
            return Err(text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many large hook requests at once".into(),
            ));
        };
        body::parse_streaming(body, limit, deadline, HookRequest::from_reader).await
    };
    parsed.map_err(|e| {
        let (status, text) = match &e {
            StreamError::Body(BodyError::TooLarge { .. }) => {
                bump(&stats.hook_too_large);
                return too_large(limit);
            }
            StreamError::Parse(HookError::TooLarge(cap)) => {
                bump(&stats.hook_too_large);
                tracing::warn!(error = %cap, "hook field over its cap");
                return text_response(StatusCode::PAYLOAD_TOO_LARGE, cap.to_string());
            }
            StreamError::Body(BodyError::Timeout) => (StatusCode::REQUEST_TIMEOUT, e.to_string()),
            StreamError::Task(_) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            _ => (StatusCode::BAD_REQUEST, e.to_string()),
        };
        bump(&stats.hook_bad_requests);
        tracing::warn!(error = %text, status = status.as_u16(), "bad hook request");
        text_response(status, text)
    })
}

fn too_large(limit: u64) -> Response {
    tracing::warn!(limit, "hook body over the limit");
    text_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("hook body larger than {limit} bytes"),
    )
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::arrival::HeaderFacts;
    use bytes::Bytes;
    use std::net::Ipv4Addr;
    use tokio::sync::mpsc;

    fn fixture_body(json: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        v["body_raw"].as_str().unwrap().to_owned()
    }

    const PLAIN: &str = include_str!("../../../tests/fixtures/stalwart/mta-hook-data-plain.json");
    const CHINESE: &str =
        include_str!("../../../tests/fixtures/stalwart/mta-hook-data-chinese.json");
    const CONNECT: &str = include_str!("../../../tests/fixtures/stalwart/mta-hook-connect.json");
    const RCPT2: &str =
        include_str!("../../../tests/fixtures/stalwart/mta-hook-rcpt-chinese-2.json");

    #[test]
    fn plain_data_stage() {
        let r = HookRequest::from_slice(fixture_body(PLAIN).as_bytes()).unwrap();
        assert_eq!(r.stage, Stage::Data);
        let a = r.into_arrival(7).unwrap();
        assert_eq!(
            a,
            Arrival {
                origin: Origin::Stalwart {
                    queue_id: 341998963378880878
                },
                client_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                helo: "client.remote.example".into(),
                env_from: "carol@remote.example".into(),
                rcpts: vec!["alice@test.local".into()],
                headers: HeaderFacts {
                    from_name: "Carol Sender".into(),
                    from_addr: "carol@remote.example".into(),
                    subject: "Plain ASCII test message".into(),
                    message_id: "plain-0001@remote.example".into(),
                    date_ms: Some(1795357800000),
                    auth_results: Vec::new(),
                },
                size: 334,
                received_at_ms: 7,
                mta_queue_id: None,
            }
        );
    }

    #[test]
    fn chinese_data_stage() {
        let a = HookRequest::from_slice(fixture_body(CHINESE).as_bytes())
            .unwrap()
            .into_arrival(0)
            .unwrap();
        assert_eq!(
            a.origin,
            Origin::Stalwart {
                queue_id: 0x4bf063fd080036e
            }
        );
        assert_eq!(a.headers.subject, "新邮件到达通知测试");
        assert_eq!(a.headers.from_name, "张三");
        assert_eq!(a.rcpts, ["alice@test.local", "bob@test.local"]);
        assert_eq!(a.size, 368);
    }

    #[test]
    fn other_stages() {
        let r = HookRequest::from_slice(fixture_body(CONNECT).as_bytes()).unwrap();
        assert_eq!(r.stage, Stage::Connect);
        assert!(matches!(r.into_arrival(0), Err(HookError::MissingQueueId)));
        let r = HookRequest::from_slice(fixture_body(RCPT2).as_bytes()).unwrap();
        assert_eq!(r.stage, Stage::Rcpt);
        let r =
            HookRequest::from_slice(br#"{"context":{"stage":"auth","x":1},"new":[1]}"#).unwrap();
        assert_eq!(r.stage, Stage::Other("auth".into()));
    }

    /// The same input split at every byte position parses the same through the streaming reader.
    #[test]
    fn chunk_split_streaming() {
        let body = fixture_body(CHINESE);
        let whole = HookRequest::from_slice(body.as_bytes())
            .unwrap()
            .into_arrival(0)
            .unwrap();
        let bytes = Bytes::from(body);
        for cut in 0..=bytes.len() {
            let (tx, rx) = mpsc::channel(4);
            let parser = std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(body::ChannelReader::new(rx));
                HookRequest::from_reader(&mut r).map(|h| h.into_arrival(0))
            });
            // A send fails only if the parser already gave up; its result says why.
            let _ = tx.blocking_send(bytes.slice(..cut));
            let _ = tx.blocking_send(bytes.slice(cut..));
            drop(tx);
            let got = parser.join().unwrap().unwrap().unwrap();
            assert_eq!(got, whole, "split at {cut}");
        }
    }

    #[test]
    fn required_keys_and_bad_values() {
        let data = |ctx: &str, rest: &str| {
            HookRequest::from_slice(
                format!(r#"{{"context":{{"stage":"data"{ctx}}}{rest}}}"#).as_bytes(),
            )
            .unwrap()
            .into_arrival(0)
        };
        let env = r#","envelope":{"from":{"address":""},"to":[]}"#;
        let msg = r#","message":{"headers":[],"size":5}"#;
        let q = r#","queue":{"id":"ff"}"#;
        assert!(matches!(
            data("", &format!("{env}{msg}")),
            Err(HookError::MissingQueueId)
        ));
        for bad in ["", "+ff", "xyz", "12345678901234567"] {
            let q = format!(r#","queue":{{"id":"{bad}"}}"#);
            assert!(
                matches!(
                    data(&q, &format!("{env}{msg}")),
                    Err(HookError::BadQueueId(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(data(q, msg), Err(HookError::MissingEnvelope)));
        assert!(matches!(data(q, env), Err(HookError::MissingMessage)));
        assert!(matches!(
            data(q, &format!(r#"{env},"message":{{"headers":[]}}"#)),
            Err(HookError::MissingSize)
        ));
        let a = data(q, &format!("{env}{msg}")).unwrap();
        assert_eq!(a.origin, Origin::Stalwart { queue_id: 255 });
        assert_eq!(a.env_from, "");
        assert_eq!(a.client_ip, None);
        assert_eq!(a.headers, HeaderFacts::default());

        for bad in [
            &b"{}"[..],
            b"{\"context\":{}}",
            b"not json",
            b"{\"context\":{\"stage\":\"data\"},\"message\":{\"headers\":[[\"From\"]]}}",
            b"{\"context\":{\"stage\":\"data\"},\"message\":{\"headers\":[[\"Subject\",7]]}}",
            b"{\"context\":{\"stage\":\"data\"},\"message\":{\"size\":-1}}",
        ] {
            assert!(
                matches!(HookRequest::from_slice(bad), Err(HookError::Json(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn recipients_are_capped() {
        let to: Vec<String> = (0..MAX_RCPTS + 3)
            .map(|i| format!(r#"{{"address":"u{i}@x"}}"#))
            .collect();
        let body = format!(
            r#"{{"context":{{"stage":"data","queue":{{"id":"1"}}}},"envelope":{{"from":{{"address":"<a@b>"}},"to":[{}]}},"message":{{"headers":[],"size":1}}}}"#,
            to.join(",")
        );
        let r = HookRequest::from_slice(body.as_bytes()).unwrap();
        assert_eq!(r.rcpts_dropped(), 3);
        let a = r.into_arrival(0).unwrap();
        assert_eq!(a.rcpts.len(), MAX_RCPTS);
        assert_eq!(a.env_from, "a@b");
    }

    #[test]
    fn unwanted_header_values_and_extra_items_are_skipped() {
        let body = r#"{"context":{"stage":"data","queue":{"id":"a"}},"envelope":{"to":[{"address":"x@y"}]},
            "message":{"headers":[["X-Big",{"any":["thing"]}],["subject"," Hi\r\n","extra"],["Subject"," second\r\n"]],
            "contents":"body","size":3,"future":true}}"#;
        let a = HookRequest::from_slice(body.as_bytes())
            .unwrap()
            .into_arrival(0)
            .unwrap();
        assert_eq!(a.headers.subject, "Hi");
        assert_eq!(a.env_from, "");
    }

    /// A prefix, then `fill` bytes up to `total`, counting what was read.
    struct Endless {
        prefix: Vec<u8>,
        fill: u8,
        total: usize,
        pos: usize,
    }

    impl std::io::Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.total - self.pos);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = self.prefix.get(self.pos + i).copied().unwrap_or(self.fill);
            }
            self.pos += n;
            Ok(n)
        }
    }

    /// An oversized field stops the parser at its cap: it neither reads nor keeps the rest
    /// (before the caps, serde_json copied the whole 64 MB string before any check).
    #[test]
    fn the_parser_stops_reading_at_a_field_cap() {
        let data = r#"{"context":{"stage":"data","queue":{"id":"1"}},"envelope":{"from":{"address":"a@b"},"to":[{"address":""#;
        let cases = [
            (
                r#"{"context":{"stage":""#,
                "stage",
                super::super::caps::MAX_SHORT,
            ),
            (
                r#"{"context":{"stage":"ehlo","client":{"helo":""#,
                "helo",
                super::super::caps::MAX_ADDRESS,
            ),
            (data, "address", super::super::caps::MAX_ADDRESS),
            (
                r#"{"context":{"stage":"data"},"message":{"headers":[["Subject",""#,
                "headers item",
                super::super::caps::MAX_STRING,
            ),
        ];
        for (prefix, field, limit) in cases {
            let mut src = Endless {
                prefix: prefix.as_bytes().to_vec(),
                fill: b'a',
                total: 64 << 20,
                pos: 0,
            };
            let r = {
                let mut r = std::io::BufReader::new(&mut src);
                HookRequest::from_reader(&mut r)
            };
            let Err(HookError::TooLarge(e)) = r else {
                panic!("{field}: {r:?}");
            };
            assert!(e.to_string().contains(field), "{e}");
            let read = src.pos as u64;
            assert!(
                read <= prefix.len() as u64 + limit + 8192,
                "{field}: read {read} bytes for a cap of {limit}"
            );
        }
        // The body itself is not capped: it is skipped as it streams.
        let mut body = br#"{"context":{"stage":"data","queue":{"id":"1"}},"envelope":{"to":[]},"message":{"headers":[],"size":1,"contents":""#.to_vec();
        body.extend(std::iter::repeat_n(b'a', 1 << 20));
        body.extend(br#""}}"#);
        let mut r = std::io::BufReader::new(&body[..]);
        assert!(HookRequest::from_reader(&mut r)
            .unwrap()
            .into_arrival(0)
            .is_ok());
        assert!(HookRequest::from_slice(&body).is_ok());
        // The inline path has the same caps.
        let helo = format!(
            r#"{{"context":{{"stage":"ehlo","client":{{"helo":"{}"}}}}}}"#,
            "h".repeat(2000)
        );
        assert!(matches!(
            HookRequest::from_slice(helo.as_bytes()),
            Err(HookError::TooLarge(_))
        ));
    }

    #[test]
    fn reply_bodies_are_what_stalwart_expects() {
        let r: serde_json::Value = serde_json::from_str(REJECT_TEMPFAIL).unwrap();
        assert_eq!(r["action"], "reject");
        assert_eq!(r["response"]["status"], 451);
        assert_eq!(r["response"]["enhanced_status"], "4.3.0");
        assert_eq!(r["response"]["disconnect"], false);
        let a: serde_json::Value = serde_json::from_str(ACCEPT).unwrap();
        assert_eq!(a["action"], "accept");
    }
}
