//! What the MTA endpoints hand to the intake: the facts about one accepted message, and the
//! delivery confirmations Stalwart's webhooks report later.
//!
//! The endpoints (Stalwart MTA hook, milter) build an [`Arrival`] and call
//! [`Intake::accept`], which returns only once the notices it creates are durable; the endpoint
//! then answers the MTA. An error means "tempfail": the MTA keeps the message and retries, so
//! nothing accepted is ever without its notice.

use std::future::Future;
use std::net::IpAddr;

/// Where an arrival was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Stalwart's MTA hook, data stage. Delivery into the mailbox is confirmed later by a
    /// `message-ingest.*` webhook event carrying the same queue id.
    Stalwart { queue_id: u64 },
    /// A milter client (Postfix, Sendmail, Stalwart) at end of message: accepted means queued,
    /// there is no later confirmation.
    Milter,
}

/// One message the MTA is about to accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub origin: Origin,
    pub client_ip: Option<IpAddr>,
    /// HELO/EHLO name the client gave (may be empty).
    pub helo: String,
    /// Envelope sender (MAIL FROM), without angle brackets; empty for the null sender.
    pub env_from: String,
    /// Envelope recipients (RCPT TO), without angle brackets, in the order given.
    pub rcpts: Vec<String>,
    /// Facts from the header block.
    pub headers: HeaderFacts,
    /// Message size in bytes as the MTA received it.
    pub size: u64,
    /// When the message arrived, Unix milliseconds.
    pub received_at_ms: i64,
    /// The queue id a milter client gave (Postfix's `{i}` macro), for the audit log; `None`
    /// when it sent none, and for Stalwart (its queue id is in [`Origin::Stalwart`]).
    pub mta_queue_id: Option<String>,
}

/// The header fields a notice needs, decoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderFacts {
    /// Display name of the From header, RFC 2047 decoded (empty if none).
    pub from_name: String,
    /// Address of the From header (empty if missing or unparseable).
    pub from_addr: String,
    /// Subject, RFC 2047 decoded (empty if none).
    pub subject: String,
    /// Message-ID without angle brackets (empty if none).
    pub message_id: String,
    /// Date header as Unix milliseconds, if present and parseable.
    pub date_ms: Option<i64>,
    /// Raw values of the `Authentication-Results` fields, topmost first (at most
    /// [`crate::mta::headers::MAX_AUTH_RESULTS`]); the zone rules trust only their own
    /// authserv-id's.
    pub auth_results: Vec<String>,
}

/// What Stalwart reported about one delivery into a mailbox (`message-ingest.*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ingest {
    pub kind: IngestKind,
    /// The queue id (decimal in events; the MTA hook shows it in hex).
    pub queue_id: Option<u64>,
    /// Stalwart account id of the mailbox owner.
    pub account_id: Option<u64>,
    pub document_id: Option<u64>,
    /// Message-ID header value, without angle brackets.
    pub message_id: String,
    /// Recipients of the delivery attempt (all of them, not only this account's).
    pub to: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngestKind {
    /// Stored in the inbox.
    Ham,
    /// Stored in the junk folder.
    Spam,
    /// Suppressed as a duplicate: nothing stored.
    Duplicate,
    /// `queue.queue-message`: Stalwart queued the message (it passed every later filter and was
    /// accepted). Not a delivery yet, but the evidence a confirmation timeout needs.
    Queued,
}

/// How the intake answered an arrival.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Notices recorded (one per notifying recipient).
    pub notices: usize,
}

/// Why the intake could not record an arrival. Every variant means: answer the MTA with a
/// temporary failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IntakeError {
    #[error("notice store unavailable: {0}")]
    Store(String),
    #[error("notice store full: {0}")]
    Full(String),
    #[error("mailbell is shutting down")]
    ShuttingDown,
}

/// The one intake both endpoints feed.
pub trait Intake: Send + Sync + 'static {
    /// Records the notices this arrival creates; resolves once they are durable.
    fn accept(
        &self,
        arrival: Arrival,
    ) -> impl Future<Output = Result<Accepted, IntakeError>> + Send;
    /// Applies delivery confirmations from a webhook batch; resolves once they are durable.
    fn confirm(&self, events: Vec<Ingest>) -> impl Future<Output = Result<(), IntakeError>> + Send;
}
