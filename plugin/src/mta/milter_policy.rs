//! What the milter does with the [`Policy`]: refuse blocklisted sources at connect, HELO and
//! MAIL, and meter each accepted message's deliveries.
//!
//! The milter otherwise answers no stage before end of message (NR_*, issue 8: a reply per
//! stage costs Postfix a round trip). Replies are negotiated back only for the stages whose
//! list is non-empty when the connection negotiates; a list loaded later, for a stage that
//! negotiated no reply, is applied at the next stage that answers (end of message at the
//! latest).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use indymilter::ProtoOpts;
use tracing::warn;

use crate::mta::milter_wire::{self as wire, Reply};

use crate::billing::ledger::Delivery;
use crate::billing::Ledger;
use crate::notify::arrival::Arrival;
use crate::policy::blocklist::Refusal;
use crate::policy::zones::Source;
use crate::policy::Policy;

/// Reply code and enhanced status code of a refusal.
const REFUSE_CODE: &str = "550";
const REFUSE_XCODE: &str = "5.7.1";

/// The milter's policy and delivery meter.
#[derive(Clone)]
pub struct Gate {
    pub policy: Arc<Policy>,
    /// The delivery meter's store; `None`: accepted messages are not metered.
    pub ledger: Option<Ledger>,
    /// Longest wait for the meter before the message is tempfailed.
    pub timeout: Duration,
}

impl Gate {
    /// No blocklist, no meter.
    pub fn none() -> Self {
        Self {
            policy: Arc::new(Policy::empty()),
            ledger: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// The NR_* options to leave out so the blocklist can answer at its stages.
    pub(crate) fn replies_needed(&self) -> ProtoOpts {
        let (connect, helo, mail) = self.policy.blocklist().stages();
        let mut need = ProtoOpts::empty();
        if connect {
            need |= ProtoOpts::NOREPLY_CONNECT;
        }
        if helo {
            need |= ProtoOpts::NOREPLY_HELO;
        }
        if mail {
            need |= ProtoOpts::NOREPLY_MAIL;
        }
        need
    }

    /// The blocklist's verdict on what the session has shown so far.
    pub(crate) fn refusal(
        &self,
        ip: Option<IpAddr>,
        helo: Option<&str>,
        from: Option<&str>,
    ) -> Option<Refusal> {
        let list = self.policy.blocklist();
        if list.is_empty() {
            return None;
        }
        list.connect(ip)
            .or_else(|| helo.and_then(|h| list.helo(h)))
            .or_else(|| from.and_then(|f| list.mail(f)))
    }

    /// Counts, audits and answers a refusal.
    pub(crate) fn reject(&self, ip: Option<IpAddr>, r: &Refusal) -> Reply {
        let text = super::milter::reply_text(&self.policy.refused("milter", ip, r));
        Reply::Reject(Some(wire::reply_line(REFUSE_CODE, REFUSE_XCODE, &text)))
    }

    /// The deliveries an accepted message makes (one per recipient), or `None` when there
    /// is no meter. Keyed by the MTA's queue id; a message without one (no `{i}` macro) is
    /// keyed by its Message-ID, and one with neither is not metered (logged).
    pub(crate) async fn deliveries(&self, a: &Arrival) -> Option<Vec<Delivery>> {
        self.ledger.as_ref()?;
        let key = match (&a.mta_queue_id, a.headers.message_id.as_str()) {
            (Some(q), _) if !q.is_empty() => format!("milter:{q}"),
            (_, m) if !m.is_empty() => format!("milter-msgid:{m}"),
            _ => {
                warn!("message with neither a queue id ({{i}}) nor a Message-ID: not metered");
                return None;
            }
        };
        let src = Source {
            client_ip: a.client_ip,
            env_from: &a.env_from,
            auth_results: &a.headers.auth_results,
        };
        let zone = self.policy.zone_of(&src, &a.helo).await;
        Some(
            a.rcpts
                .iter()
                .map(|r| Delivery {
                    message_key: key.clone(),
                    account: r.to_ascii_lowercase(),
                    zone: Some(zone),
                    bytes: a.size,
                    at_ms: a.received_at_ms,
                })
                .collect(),
        )
    }

    /// Records deliveries, durable on return; returns how many were new.
    pub(crate) async fn meter(&self, batch: Vec<Delivery>) -> Result<usize, String> {
        let Some(ledger) = &self.ledger else {
            return Ok(0);
        };
        if batch.is_empty() {
            return Ok(0);
        }
        let call = ledger.call(move |s| s.record_deliveries(&batch));
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(r)) => Ok(r.added),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the ledger did not answer in time".into()),
        }
    }
}
