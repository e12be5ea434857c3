//! The `AT+CMGS` deadline a modem has earned, sans I/O: derived from how long its last
//! successful submits took, with the configured `submit_timeout` as the ceiling.
//!
//! ```text
//! samples < MIN_SAMPLES           timeout = ceiling                       (nothing known yet)
//! samples >= MIN_SAMPLES          timeout = clamp(p99 × FACTOR, floor, ceiling)
//! a submit times out              the window is forgotten: the ceiling applies again
//! ```
//!
//! A sample is one part's time from writing its PDU (after the `> ` prompt) to `+CMGS: <mr>`:
//! the wait for the SMSC, the part of a submit that `submit_timeout` bounds. A multipart
//! message gives one sample per part, and each part gets the deadline on its own. Error
//! answers are not samples: they say nothing about how long an accepted PDU takes.
//!
//! Why these numbers:
//! - [`WINDOW`] = 100 recent samples: a quarter of an hour of a busy modem at the default
//!   pacing of 8 a minute, so the estimate follows a change of network conditions within
//!   that time; p99 is then the nearest-rank 99th value, the second-slowest of the window.
//! - [`MIN_SAMPLES`] = 20: with fewer, the slowest sample is all the tail there is, and one
//!   quick run after a restart would set a deadline the next slow SMSC answer misses. 20
//!   samples is a few minutes of traffic on a busy modem; until then the ceiling applies,
//!   which is the old fixed behaviour.
//! - [`FACTOR`] = 3: a modem that answered in at most 4 s gets 12 s; an SMSC answer three
//!   times slower than nearly all recent ones is a modem or network in trouble.
//! - [`DEFAULT_FLOOR`] = 10 s: modems answer in 3–10 s (a cell reselection or a congested SMSC
//!   adds seconds), and a timeout is expensive — the PDU may have been sent (`maybe_sent`), the
//!   modem is re-initialised. A modem that answered in 200 ms for an hour still gets 10 s.
//! - Forgetting after a timeout: if the modem got slower for good, every submit would time
//!   out under the old estimate and no faster sample could ever correct it. With the ceiling
//!   back, the next submits succeed (slowly) and the window relearns.

use std::collections::VecDeque;
use std::time::Duration;

/// Successful submit durations kept per modem.
pub const WINDOW: usize = 100;
/// Samples needed before the timeout is derived rather than the ceiling.
pub const MIN_SAMPLES: usize = 20;
/// The derived timeout is this many times the 99th percentile.
pub const FACTOR: u32 = 3;
/// The default lowest derived timeout (`submit_timeout_floor`).
pub const DEFAULT_FLOOR: Duration = Duration::from_secs(10);

/// A bounded window of one modem's recent submit durations and the timeout they give.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmitTimes {
    samples: VecDeque<Duration>,
    floor: Duration,
    ceiling: Duration,
    /// [`SubmitTimes::timeout`], recomputed on every change.
    current: Duration,
    p99: Option<Duration>,
}

impl SubmitTimes {
    /// An empty window: the timeout is `ceiling` until [`MIN_SAMPLES`] submits succeeded. A
    /// `floor` above the ceiling is taken as the ceiling.
    pub fn new(floor: Duration, ceiling: Duration) -> Self {
        SubmitTimes {
            samples: VecDeque::with_capacity(WINDOW),
            floor: floor.min(ceiling),
            ceiling,
            current: ceiling,
            p99: None,
        }
    }

    /// One part was accepted `took` after its PDU was written.
    pub fn record(&mut self, took: Duration) {
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(took);
        self.update();
    }

    /// A submit timed out: what the window says no longer holds.
    pub fn forget(&mut self) {
        self.samples.clear();
        self.update();
    }

    /// The deadline from writing a PDU to its `+CMGS` answer, now.
    pub fn timeout(&self) -> Duration {
        self.current
    }

    /// The 99th percentile (nearest rank) of the window, once it has [`MIN_SAMPLES`].
    pub fn p99(&self) -> Option<Duration> {
        self.p99
    }

    /// Samples in the window.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when the window is empty.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    fn update(&mut self) {
        if self.samples.len() < MIN_SAMPLES {
            self.p99 = None;
            self.current = self.ceiling;
            return;
        }
        let mut sorted: Vec<Duration> = self.samples.iter().copied().collect();
        sorted.sort_unstable();
        // Nearest rank: the ceil(0.99 n)-th smallest, 1-based.
        let rank = (sorted.len() * 99).div_ceil(100).max(1);
        let p99 = sorted.get(rank - 1).copied().unwrap_or(self.ceiling);
        self.p99 = Some(p99);
        self.current = p99.saturating_mul(FACTOR).clamp(self.floor, self.ceiling);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOR: Duration = Duration::from_secs(10);
    const CEILING: Duration = Duration::from_secs(60);

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn empty_window_gives_the_ceiling() {
        let t = SubmitTimes::new(FLOOR, CEILING);
        assert_eq!(t.timeout(), CEILING);
        assert_eq!(t.p99(), None);
        assert!(t.is_empty());
    }

    #[test]
    fn too_few_samples_give_the_ceiling() {
        let mut t = SubmitTimes::new(FLOOR, CEILING);
        for _ in 0..MIN_SAMPLES - 1 {
            t.record(secs(4.0));
            assert_eq!(t.timeout(), CEILING);
        }
        t.record(secs(4.0));
        assert_eq!(t.len(), MIN_SAMPLES);
        assert_eq!(t.p99(), Some(secs(4.0)));
        assert_eq!(t.timeout(), secs(12.0), "p99 × 3 once MIN_SAMPLES are in");
    }

    #[test]
    fn derived_timeout_is_p99_times_three() {
        let mut t = SubmitTimes::new(FLOOR, CEILING);
        // 100 samples: 3.00 s .. 7.95 s in steps of 50 ms, shuffled order.
        let mut v: Vec<Duration> = (0..100)
            .map(|i| Duration::from_millis(3000 + 50 * i))
            .collect();
        v.reverse();
        v.swap(3, 70);
        for d in v {
            t.record(d);
        }
        // nearest rank 99 of 100: the second-largest, 7.90 s
        assert_eq!(t.p99(), Some(Duration::from_millis(7900)));
        assert_eq!(t.timeout(), Duration::from_millis(23_700));
    }

    #[test]
    fn fast_modem_gets_the_floor() {
        let mut t = SubmitTimes::new(FLOOR, CEILING);
        for _ in 0..MIN_SAMPLES {
            t.record(Duration::from_millis(200));
        }
        assert_eq!(t.timeout(), FLOOR);
    }

    #[test]
    fn slow_modem_is_capped_at_the_ceiling() {
        let mut t = SubmitTimes::new(FLOOR, CEILING);
        for _ in 0..MIN_SAMPLES {
            t.record(secs(30.0));
        }
        assert_eq!(t.p99(), Some(secs(30.0)));
        assert_eq!(t.timeout(), CEILING);
    }

    #[test]
    fn one_outlier_in_a_full_window_is_ignored_two_are_not() {
        let mut t = SubmitTimes::new(FLOOR, CEILING);
        for _ in 0..WINDOW - 1 {
            t.record(secs(4.0));
        }
        t.record(secs(50.0));
        assert_eq!(t.timeout(), secs(12.0), "the single slowest is above p99");
        t.record(secs(50.0));
        assert_eq!(t.timeout(), CEILING, "two slow ones are the tail");
    }

    #[test]
    fn window_is_bounded_and_follows_the_recent_past() {
        let mut t = SubmitTimes::new(FLOOR, CEILING);
        for _ in 0..WINDOW {
            t.record(secs(15.0));
        }
        assert_eq!(t.timeout(), secs(45.0));
        for _ in 0..WINDOW {
            t.record(secs(5.0));
        }
        assert_eq!(t.len(), WINDOW);
        assert_eq!(t.timeout(), secs(15.0), "the slow samples aged out");
    }

    #[test]
    fn forget_returns_to_the_ceiling() {
        let mut t = SubmitTimes::new(FLOOR, CEILING);
        for _ in 0..MIN_SAMPLES {
            t.record(secs(1.0));
        }
        assert_eq!(t.timeout(), FLOOR);
        t.forget();
        assert!(t.is_empty());
        assert_eq!(t.timeout(), CEILING);
        assert_eq!(t.p99(), None);
    }

    #[test]
    fn floor_above_the_ceiling_is_the_ceiling() {
        let ceiling = Duration::from_secs(5);
        let mut t = SubmitTimes::new(FLOOR, ceiling);
        for _ in 0..MIN_SAMPLES {
            t.record(Duration::from_millis(100));
        }
        assert_eq!(t.timeout(), ceiling);
    }

    #[test]
    fn huge_samples_do_not_overflow() {
        let mut t = SubmitTimes::new(FLOOR, CEILING);
        for _ in 0..MIN_SAMPLES {
            t.record(Duration::MAX);
        }
        assert_eq!(t.timeout(), CEILING);
    }
}
