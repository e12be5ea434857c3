//! Sans-I/O sender side of the link: the window, ack timeouts, resends and heartbeats.
//!
//! The sender never forgets an item except on ACK (or on a NACK that hands it back to the
//! outbox with its class). It takes time as an argument and writes frames into a caller-owned
//! buffer; the async shell in [`crate::net`] moves the bytes.
//!
//! Rules:
//! - at most `window` NOTIFY frames are unacknowledged at once;
//! - an item unacknowledged after `ack_timeout` is sent again on the same session (the receiver
//!   de-duplicates); after `max_resends` resends of one item the session is declared dead and
//!   the caller reconnects;
//! - an ACK for an id that is not in flight is ignored: it can only be a second ACK for a resent
//!   item, and it must never delete anything from the outbox;
//! - on disconnect every in-flight id is returned, oldest first, to be sent again first.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::frame::{Frame, NackClass, DEFAULT_MAX_FRAME};
use crate::heartbeat::Heartbeat;
use crate::id::NotifId;
use crate::PROTOCOL_VERSION;

/// Sender tunables.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    pub window: u16,
    pub ack_timeout: Duration,
    pub max_resends: u32,
    /// Send a PING after this long without sending anything.
    pub heartbeat: Duration,
    /// Declare the peer dead after this long without receiving anything.
    pub dead_after: Duration,
    pub name: String,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            window: 128,
            ack_timeout: Duration::from_secs(10),
            max_resends: 3,
            heartbeat: Duration::from_secs(10),
            dead_after: Duration::from_secs(30),
            name: "mailbell".into(),
        }
    }
}

/// What an ACK or NACK means for the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SenderEvent {
    /// Durable at the receiver: delete it.
    Acked(NotifId),
    /// The receiver will never take it: move it to the dead letters.
    DeadLetter { id: NotifId, reason: String },
    /// The receiver could not take it now: offer it again after `after`.
    RetryLater {
        id: NotifId,
        after: Duration,
        reason: String,
    },
}

/// The session cannot go on; the caller closes it and reconnects.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionError {
    #[error("unexpected {0} frame from the agent")]
    Unexpected(&'static str),
    #[error("agent refused the session (code {code}): {reason}")]
    Refused { code: u16, reason: String },
    #[error("agent speaks protocol version {0}, this sender speaks {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("agent announced an invalid window or frame size")]
    BadWelcome,
    #[error("no frame from the peer for {0:?}")]
    Silent(Duration),
    #[error("item {id} unacknowledged after {resends} resends")]
    AckTimeout { id: NotifId, resends: u32 },
    #[error("peer closed the session: {0}")]
    Bye(String),
}

/// Session parameters both sides agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub window: u16,
    pub max_frame: u32,
    pub heartbeat: Duration,
}

/// The HELLO a sender opens with.
pub fn hello(cfg: &SenderConfig) -> Frame {
    Frame::Hello {
        version: PROTOCOL_VERSION,
        window: cfg.window,
        max_frame: DEFAULT_MAX_FRAME,
        name: cfg.name.clone(),
    }
}

/// Checks the agent's answer to HELLO.
pub fn check_welcome(cfg: &SenderConfig, frame: Frame) -> Result<Negotiated, SessionError> {
    match frame {
        Frame::Welcome {
            version,
            window,
            max_frame,
            heartbeat_ms,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(SessionError::Version(version));
            }
            if window == 0 || max_frame < crate::frame::MIN_MAX_FRAME {
                return Err(SessionError::BadWelcome);
            }
            Ok(Negotiated {
                window: window.min(cfg.window),
                max_frame: max_frame.min(DEFAULT_MAX_FRAME),
                heartbeat: Duration::from_millis(u64::from(heartbeat_ms.max(100)))
                    .min(cfg.heartbeat),
            })
        }
        Frame::Refuse { code, reason } => Err(SessionError::Refused { code, reason }),
        other => Err(SessionError::Unexpected(other.kind())),
    }
}

struct InFlight {
    payload: Vec<u8>,
    sent_at: Instant,
    resends: u32,
}

/// The sender state of one session.
pub struct Sender {
    cfg: SenderConfig,
    window: usize,
    inflight: HashMap<NotifId, InFlight>,
    /// Send order; may hold ids already acknowledged (skipped lazily).
    order: VecDeque<NotifId>,
    beat: Heartbeat,
    ignored_acks: u64,
}

impl Sender {
    pub fn new(cfg: SenderConfig, negotiated: Negotiated, now: Instant) -> Self {
        let window = usize::from(negotiated.window.max(1));
        Self {
            beat: Heartbeat::new(negotiated.heartbeat, cfg.dead_after, now),
            cfg,
            window,
            inflight: HashMap::with_capacity(window),
            order: VecDeque::with_capacity(window * 2),
            ignored_acks: 0,
        }
    }

    /// How many more items may be sent now.
    pub fn capacity(&self) -> usize {
        self.window.saturating_sub(self.inflight.len())
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    pub fn is_in_flight(&self, id: &NotifId) -> bool {
        self.inflight.contains_key(id)
    }

    /// ACKs received for ids not in flight (late duplicates), for metrics.
    pub fn ignored_acks(&self) -> u64 {
        self.ignored_acks
    }

    /// Sends one item. The caller checks [`Sender::capacity`] first; an id already in flight is
    /// not sent twice.
    pub fn send(&mut self, id: NotifId, payload: Vec<u8>, now: Instant, out: &mut Vec<u8>) {
        if self.inflight.contains_key(&id) {
            return;
        }
        encode_notify(id, &payload, out);
        self.inflight.insert(
            id,
            InFlight {
                payload,
                sent_at: now,
                resends: 0,
            },
        );
        self.order.push_back(id);
        self.beat.sent(now);
    }

    /// Handles one frame from the agent.
    pub fn on_frame(
        &mut self,
        frame: Frame,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<Option<SenderEvent>, SessionError> {
        self.beat.received(now);
        match frame {
            Frame::Ack { id } => {
                if self.inflight.remove(&id).is_some() {
                    self.prune_order();
                    Ok(Some(SenderEvent::Acked(id)))
                } else {
                    self.ignored_acks += 1;
                    Ok(None)
                }
            }
            Frame::Nack {
                id,
                class,
                retry_after_ms,
                reason,
            } => {
                if self.inflight.remove(&id).is_none() {
                    self.ignored_acks += 1;
                    return Ok(None);
                }
                self.prune_order();
                Ok(Some(match class {
                    NackClass::Permanent => SenderEvent::DeadLetter { id, reason },
                    NackClass::RetryLater => SenderEvent::RetryLater {
                        id,
                        after: Duration::from_millis(u64::from(retry_after_ms)),
                        reason,
                    },
                }))
            }
            Frame::Ping { nonce } => {
                self.beat.pong(nonce, now, out);
                Ok(None)
            }
            Frame::Pong { .. } => Ok(None),
            Frame::Bye { reason } => Err(SessionError::Bye(reason)),
            other => Err(SessionError::Unexpected(other.kind())),
        }
    }

    /// Drops settled ids from the front of the send order, so that the order holds about one
    /// window and [`Sender::next_deadline`] stays O(1) however long the session runs.
    fn prune_order(&mut self) {
        while let Some(front) = self.order.front() {
            if self.inflight.contains_key(front) {
                break;
            }
            self.order.pop_front();
        }
    }

    /// Resends timed-out items and sends heartbeats. Call at [`Sender::next_deadline`].
    pub fn poll(&mut self, now: Instant, out: &mut Vec<u8>) -> Result<(), SessionError> {
        if let Some(silent) = self.beat.silent(now) {
            return Err(SessionError::Silent(silent));
        }
        // Resend in send order; `order` is oldest first, so stop at the first fresh item.
        let mut resent = Vec::new();
        while let Some(id) = self.order.front().copied() {
            let Some(item) = self.inflight.get_mut(&id) else {
                self.order.pop_front();
                continue;
            };
            if now.saturating_duration_since(item.sent_at) < self.cfg.ack_timeout {
                break;
            }
            if item.resends >= self.cfg.max_resends {
                return Err(SessionError::AckTimeout {
                    id,
                    resends: item.resends,
                });
            }
            item.resends += 1;
            item.sent_at = now;
            encode_notify(id, &item.payload, out);
            self.order.pop_front();
            resent.push(id);
        }
        if !resent.is_empty() {
            self.beat.sent(now);
        }
        self.order.extend(resent);
        self.beat.ping_if_idle(now, out);
        Ok(())
    }

    /// When [`Sender::poll`] next has something to do.
    pub fn next_deadline(&self) -> Instant {
        let mut t = self.beat.deadline();
        if let Some(first) = self.order.iter().find_map(|id| self.inflight.get(id)) {
            t = t.min(first.sent_at + self.cfg.ack_timeout);
        }
        t
    }

    /// Ends the session; returns the ids still unacknowledged, oldest first.
    pub fn disconnect(self) -> Vec<NotifId> {
        let mut seen = std::collections::HashSet::new();
        self.order
            .into_iter()
            .filter(|id| self.inflight.contains_key(id) && seen.insert(*id))
            .collect()
    }
}

fn encode_notify(id: NotifId, payload: &[u8], out: &mut Vec<u8>) {
    let len = (1 + 16 + payload.len()) as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.push(4);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::decode;

    fn neg() -> Negotiated {
        Negotiated {
            window: 2,
            max_frame: DEFAULT_MAX_FRAME,
            heartbeat: Duration::from_secs(5),
        }
    }

    fn frames(buf: &[u8]) -> Vec<Frame> {
        let mut s = buf;
        let mut out = Vec::new();
        while let Some((f, n)) = decode(s, DEFAULT_MAX_FRAME).unwrap() {
            out.push(f);
            s = &s[n..];
        }
        out
    }

    #[test]
    fn notify_encoding_matches_the_frame_codec() {
        let id = NotifId::random();
        let mut a = Vec::new();
        encode_notify(id, b"xyz", &mut a);
        let mut b = Vec::new();
        Frame::Notify {
            id,
            payload: b"xyz".to_vec(),
        }
        .encode(&mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn window_limits_and_acks_free_slots() {
        let t0 = Instant::now();
        let mut s = Sender::new(SenderConfig::default(), neg(), t0);
        let (a, b) = (NotifId::random(), NotifId::random());
        let mut out = Vec::new();
        s.send(a, vec![1], t0, &mut out);
        s.send(b, vec![2], t0, &mut out);
        assert_eq!(s.capacity(), 0);
        assert_eq!(frames(&out).len(), 2);
        let ev = s.on_frame(Frame::Ack { id: a }, t0, &mut out).unwrap();
        assert_eq!(ev, Some(SenderEvent::Acked(a)));
        assert_eq!(s.capacity(), 1);
        // A second ACK for the same id, or one for an id never sent, changes nothing.
        assert_eq!(
            s.on_frame(Frame::Ack { id: a }, t0, &mut out).unwrap(),
            None
        );
        assert_eq!(
            s.on_frame(
                Frame::Ack {
                    id: NotifId::random()
                },
                t0,
                &mut out
            )
            .unwrap(),
            None
        );
        assert_eq!(s.ignored_acks(), 2);
        assert_eq!(s.disconnect(), vec![b]);
    }

    #[test]
    fn send_order_stays_one_window_long_in_a_long_session() {
        let t0 = Instant::now();
        let mut s = Sender::new(SenderConfig::default(), neg(), t0);
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let id = NotifId::random();
            s.send(id, vec![], t0, &mut out);
            s.on_frame(Frame::Ack { id }, t0, &mut out).unwrap();
        }
        assert!(s.order.len() <= 2, "order grew to {}", s.order.len());
        // Out-of-order ACKs: the oldest unacknowledged id keeps the rest until it settles.
        let (a, b) = (NotifId::random(), NotifId::random());
        s.send(a, vec![], t0, &mut out);
        s.send(b, vec![], t0, &mut out);
        s.on_frame(Frame::Ack { id: b }, t0, &mut out).unwrap();
        assert_eq!(s.order.len(), 2);
        assert_eq!(
            s.next_deadline(),
            (t0 + SenderConfig::default().ack_timeout).min(s.beat.deadline())
        );
        s.on_frame(Frame::Ack { id: a }, t0, &mut out).unwrap();
        assert!(s.order.is_empty());
    }

    #[test]
    fn timeout_resends_then_gives_up() {
        let t0 = Instant::now();
        let cfg = SenderConfig {
            ack_timeout: Duration::from_secs(1),
            max_resends: 2,
            dead_after: Duration::from_secs(100),
            heartbeat: Duration::from_secs(100),
            ..Default::default()
        };
        let mut s = Sender::new(cfg, neg(), t0);
        let a = NotifId::random();
        let mut out = Vec::new();
        s.send(a, vec![9], t0, &mut out);
        out.clear();
        s.poll(t0 + Duration::from_millis(500), &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(s.next_deadline(), t0 + Duration::from_secs(1));
        s.poll(t0 + Duration::from_secs(1), &mut out).unwrap();
        assert_eq!(
            frames(&out),
            vec![Frame::Notify {
                id: a,
                payload: vec![9]
            }]
        );
        out.clear();
        s.poll(t0 + Duration::from_secs(2), &mut out).unwrap();
        assert_eq!(frames(&out).len(), 1);
        assert_eq!(
            s.poll(t0 + Duration::from_secs(3), &mut out),
            Err(SessionError::AckTimeout { id: a, resends: 2 })
        );
    }

    #[test]
    fn nack_classes_map_to_events() {
        let t0 = Instant::now();
        let mut s = Sender::new(SenderConfig::default(), neg(), t0);
        let (a, b) = (NotifId::random(), NotifId::random());
        let mut out = Vec::new();
        s.send(a, vec![], t0, &mut out);
        s.send(b, vec![], t0, &mut out);
        let ev = s
            .on_frame(
                Frame::Nack {
                    id: a,
                    class: NackClass::Permanent,
                    retry_after_ms: 0,
                    reason: "invalid phone".into(),
                },
                t0,
                &mut out,
            )
            .unwrap();
        assert_eq!(
            ev,
            Some(SenderEvent::DeadLetter {
                id: a,
                reason: "invalid phone".into()
            })
        );
        let ev = s
            .on_frame(
                Frame::Nack {
                    id: b,
                    class: NackClass::RetryLater,
                    retry_after_ms: 2500,
                    reason: "inbox full".into(),
                },
                t0,
                &mut out,
            )
            .unwrap();
        assert_eq!(
            ev,
            Some(SenderEvent::RetryLater {
                id: b,
                after: Duration::from_millis(2500),
                reason: "inbox full".into()
            })
        );
        assert!(s.disconnect().is_empty());
    }

    #[test]
    fn heartbeat_and_silence() {
        let t0 = Instant::now();
        let cfg = SenderConfig {
            heartbeat: Duration::from_secs(5),
            dead_after: Duration::from_secs(15),
            ..Default::default()
        };
        let mut s = Sender::new(cfg, neg(), t0);
        let mut out = Vec::new();
        s.poll(t0 + Duration::from_secs(5), &mut out).unwrap();
        assert_eq!(frames(&out), vec![Frame::Ping { nonce: 1 }]);
        assert!(matches!(
            s.poll(t0 + Duration::from_secs(15), &mut out),
            Err(SessionError::Silent(_))
        ));
    }

    #[test]
    fn welcome_negotiation() {
        let cfg = SenderConfig::default();
        let n = check_welcome(
            &cfg,
            Frame::Welcome {
                version: PROTOCOL_VERSION,
                window: 1024,
                max_frame: 8192,
                heartbeat_ms: 2000,
            },
        )
        .unwrap();
        assert_eq!(n.window, 128);
        assert_eq!(n.max_frame, 8192);
        assert_eq!(n.heartbeat, Duration::from_secs(2));
        assert_eq!(
            check_welcome(
                &cfg,
                Frame::Refuse {
                    code: 1,
                    reason: "unsupported protocol version 1".into()
                }
            ),
            Err(SessionError::Refused {
                code: 1,
                reason: "unsupported protocol version 1".into()
            })
        );
        assert_eq!(
            check_welcome(
                &cfg,
                Frame::Ack {
                    id: NotifId::random()
                }
            ),
            Err(SessionError::Unexpected("ack"))
        );
    }
}
