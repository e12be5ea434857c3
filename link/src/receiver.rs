//! Sans-I/O receiver side of the link: handshake, in-session de-duplication, ACK/NACK and
//! heartbeats.
//!
//! An item is acknowledged only after the application reports it durable
//! ([`Receiver::complete`] with [`Outcome::Stored`] or [`Outcome::Duplicate`]). Cross-session
//! and cross-restart de-duplication is the durable store's job: it answers `Duplicate` for an
//! id it has seen; this state machine only keeps a second copy of an id that is still being
//! stored from being handed to the application twice.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::frame::{refuse, Frame, NackClass, DEFAULT_MAX_FRAME, MIN_MAX_FRAME};
use crate::heartbeat::Heartbeat;
use crate::id::NotifId;
use crate::PROTOCOL_VERSION;

/// Receiver tunables.
#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    /// Largest window granted to a sender.
    pub window: u16,
    pub max_frame: u32,
    /// Heartbeat interval announced to the sender and used for our own PINGs.
    pub heartbeat: Duration,
    /// Declare the peer dead after this long without receiving anything.
    pub dead_after: Duration,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            window: 1024,
            max_frame: DEFAULT_MAX_FRAME,
            heartbeat: Duration::from_secs(10),
            dead_after: Duration::from_secs(30),
        }
    }
}

/// What the application did with an item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Durable now: ACK.
    Stored,
    /// Seen before (durable already): ACK again, do nothing else.
    Duplicate,
    /// Not taken: NACK with this class.
    Rejected {
        class: NackClass,
        retry_after: Duration,
        reason: String,
    },
}

/// The session cannot go on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReceiverError {
    #[error("unexpected {0} frame from the sender")]
    Unexpected(&'static str),
    #[error("sender exceeded its window of {0} unacknowledged items")]
    WindowExceeded(usize),
    #[error("no frame from the sender for {0:?}")]
    Silent(Duration),
    #[error("sender closed the session: {0}")]
    Bye(String),
}

/// The agent's answer to a HELLO: a WELCOME and the agreed parameters, or a REFUSE to send
/// before closing.
pub fn accept_hello(cfg: &ReceiverConfig, frame: Frame) -> Result<(Frame, u16, String), Frame> {
    match frame {
        Frame::Hello {
            version,
            window,
            max_frame,
            name,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(Frame::Refuse {
                    code: refuse::UNSUPPORTED_VERSION,
                    reason: format!(
                        "unsupported protocol version {version}; this agent speaks version {PROTOCOL_VERSION}"
                    ),
                });
            }
            if window == 0 || max_frame < MIN_MAX_FRAME {
                return Err(Frame::Refuse {
                    code: refuse::BAD_HELLO,
                    reason: format!("invalid window {window} or frame size {max_frame}"),
                });
            }
            let window = window.min(cfg.window);
            let welcome = Frame::Welcome {
                version: PROTOCOL_VERSION,
                window,
                max_frame: cfg.max_frame.min(max_frame),
                heartbeat_ms: u32::try_from(cfg.heartbeat.as_millis()).unwrap_or(u32::MAX),
            };
            Ok((welcome, window, name))
        }
        other => Err(Frame::Refuse {
            code: refuse::BAD_HELLO,
            reason: format!("expected hello, got {}", other.kind()),
        }),
    }
}

/// The receiver state of one session.
pub struct Receiver {
    window: usize,
    pending: HashSet<NotifId>,
    beat: Heartbeat,
}

impl Receiver {
    pub fn new(cfg: ReceiverConfig, window: u16, now: Instant) -> Self {
        Self {
            window: usize::from(window.max(1)),
            pending: HashSet::new(),
            beat: Heartbeat::new(cfg.heartbeat, cfg.dead_after, now),
        }
    }

    /// Items handed to the application and not yet completed.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Handles one frame. Returns an item for the application to store, if any.
    pub fn on_frame(
        &mut self,
        frame: Frame,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<Option<(NotifId, Vec<u8>)>, ReceiverError> {
        self.beat.received(now);
        match frame {
            Frame::Notify { id, payload } => {
                if self.pending.contains(&id) {
                    // A resend of an item still being stored: its ACK will follow.
                    return Ok(None);
                }
                // A sender may resend a whole window after an ack timeout; allow slack for
                // that but not an unbounded flood.
                if self.pending.len() >= self.window * 2 {
                    return Err(ReceiverError::WindowExceeded(self.window));
                }
                self.pending.insert(id);
                Ok(Some((id, payload)))
            }
            Frame::Ping { nonce } => {
                self.beat.pong(nonce, now, out);
                Ok(None)
            }
            Frame::Pong { .. } => Ok(None),
            Frame::Bye { reason } => Err(ReceiverError::Bye(reason)),
            other => Err(ReceiverError::Unexpected(other.kind())),
        }
    }

    /// Reports what became of an item handed out by [`Receiver::on_frame`] and writes its ACK
    /// or NACK.
    pub fn complete(&mut self, id: NotifId, outcome: Outcome, now: Instant, out: &mut Vec<u8>) {
        self.pending.remove(&id);
        match outcome {
            Outcome::Stored | Outcome::Duplicate => Frame::Ack { id }.encode(out),
            Outcome::Rejected {
                class,
                retry_after,
                reason,
            } => Frame::Nack {
                id,
                class,
                retry_after_ms: u32::try_from(retry_after.as_millis()).unwrap_or(u32::MAX),
                reason,
            }
            .encode(out),
        }
        self.beat.sent(now);
    }

    /// Sends heartbeats and detects a silent sender.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<u8>) -> Result<(), ReceiverError> {
        if let Some(silent) = self.beat.silent(now) {
            return Err(ReceiverError::Silent(silent));
        }
        self.beat.ping_if_idle(now, out);
        Ok(())
    }

    pub fn next_deadline(&self) -> Instant {
        self.beat.deadline()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_with_unknown_version_is_refused_clearly() {
        let cfg = ReceiverConfig::default();
        let r = accept_hello(
            &cfg,
            Frame::Hello {
                version: 7,
                window: 128,
                max_frame: DEFAULT_MAX_FRAME,
                name: "mx".into(),
            },
        );
        let Err(Frame::Refuse { code, reason }) = r else {
            panic!("expected refuse")
        };
        assert_eq!(code, refuse::UNSUPPORTED_VERSION);
        assert!(
            reason.contains("unsupported protocol version 7"),
            "{reason}"
        );
        assert!(matches!(
            accept_hello(&cfg, Frame::Ping { nonce: 1 }),
            Err(Frame::Refuse {
                code: refuse::BAD_HELLO,
                ..
            })
        ));
    }

    #[test]
    fn window_is_the_smaller_of_both() {
        let cfg = ReceiverConfig {
            window: 64,
            ..Default::default()
        };
        let (w, window, name) = accept_hello(
            &cfg,
            Frame::Hello {
                version: PROTOCOL_VERSION,
                window: 128,
                max_frame: DEFAULT_MAX_FRAME,
                name: "mx".into(),
            },
        )
        .unwrap();
        assert_eq!(window, 64);
        assert_eq!(name, "mx");
        assert!(matches!(w, Frame::Welcome { window: 64, .. }));
    }

    #[test]
    fn duplicate_in_flight_is_handed_out_once_and_acked_after_durable() {
        let t = Instant::now();
        let mut r = Receiver::new(ReceiverConfig::default(), 4, t);
        let id = NotifId::random();
        let mut out = Vec::new();
        let f = Frame::Notify {
            id,
            payload: vec![1],
        };
        assert!(r.on_frame(f.clone(), t, &mut out).unwrap().is_some());
        assert!(r.on_frame(f, t, &mut out).unwrap().is_none());
        assert!(out.is_empty(), "nothing acknowledged before durable");
        r.complete(id, Outcome::Stored, t, &mut out);
        let (ack, _) = crate::frame::decode(&out, DEFAULT_MAX_FRAME)
            .unwrap()
            .unwrap();
        assert_eq!(ack, Frame::Ack { id });
    }

    #[test]
    fn window_flood_ends_the_session() {
        let t = Instant::now();
        let mut r = Receiver::new(ReceiverConfig::default(), 1, t);
        let mut out = Vec::new();
        for _ in 0..2 {
            r.on_frame(
                Frame::Notify {
                    id: NotifId::random(),
                    payload: vec![],
                },
                t,
                &mut out,
            )
            .unwrap();
        }
        assert_eq!(
            r.on_frame(
                Frame::Notify {
                    id: NotifId::random(),
                    payload: vec![]
                },
                t,
                &mut out
            ),
            Err(ReceiverError::WindowExceeded(1))
        );
    }
}
