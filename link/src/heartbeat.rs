//! Liveness, shared by both ends of a session: send a PING after `interval` without sending
//! anything, declare the peer dead after `dead_after` without receiving anything, answer a
//! PING with a PONG. Sans-I/O: time is an argument, frames go into a caller's buffer.

use std::time::{Duration, Instant};

use crate::frame::Frame;

/// Heartbeat state of one session.
#[derive(Debug)]
pub struct Heartbeat {
    interval: Duration,
    dead_after: Duration,
    last_rx: Instant,
    last_tx: Instant,
    nonce: u64,
}

impl Heartbeat {
    pub fn new(interval: Duration, dead_after: Duration, now: Instant) -> Self {
        Self {
            interval,
            dead_after,
            last_rx: now,
            last_tx: now,
            nonce: 0,
        }
    }

    /// Something arrived from the peer.
    pub fn received(&mut self, now: Instant) {
        self.last_rx = now;
    }

    /// Something was sent to the peer.
    pub fn sent(&mut self, now: Instant) {
        self.last_tx = now;
    }

    /// Answers a PING.
    pub fn pong(&mut self, nonce: u64, now: Instant, out: &mut Vec<u8>) {
        Frame::Pong { nonce }.encode(out);
        self.sent(now);
    }

    /// How long the peer has been silent, if that is too long.
    pub fn silent(&self, now: Instant) -> Option<Duration> {
        let silent = now.saturating_duration_since(self.last_rx);
        (silent >= self.dead_after).then_some(silent)
    }

    /// Sends a PING if nothing was sent for `interval`.
    pub fn ping_if_idle(&mut self, now: Instant, out: &mut Vec<u8>) {
        if now.saturating_duration_since(self.last_tx) >= self.interval {
            self.nonce += 1;
            Frame::Ping { nonce: self.nonce }.encode(out);
            self.sent(now);
        }
    }

    /// When [`Heartbeat::silent`] or [`Heartbeat::ping_if_idle`] next has something to do.
    pub fn deadline(&self) -> Instant {
        (self.last_tx + self.interval).min(self.last_rx + self.dead_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode, DEFAULT_MAX_FRAME};

    #[test]
    fn pings_when_idle_and_detects_silence() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(Duration::from_secs(5), Duration::from_secs(15), t0);
        let mut out = Vec::new();
        h.ping_if_idle(t0 + Duration::from_secs(4), &mut out);
        assert!(out.is_empty());
        assert_eq!(h.deadline(), t0 + Duration::from_secs(5));
        h.ping_if_idle(t0 + Duration::from_secs(5), &mut out);
        assert_eq!(
            decode(&out, DEFAULT_MAX_FRAME).unwrap().unwrap().0,
            Frame::Ping { nonce: 1 }
        );
        assert_eq!(h.silent(t0 + Duration::from_secs(14)), None);
        h.received(t0 + Duration::from_secs(14));
        assert_eq!(h.silent(t0 + Duration::from_secs(28)), None);
        assert_eq!(
            h.silent(t0 + Duration::from_secs(29)),
            Some(Duration::from_secs(15))
        );
    }
}
