//! Several modems in one agent: pacing per SIM, least-recently-used choice, failover.
//!
//! [`Selector`] is the sans-I/O part: it is told the time, the local date, which modems are
//! ready and which already failed this message, and answers which modem to use or how long to
//! wait. [`Pool`] is the async shell around it and the driver handles.
//!
//! ```text
//! submit(pdus, max_wait)
//!   └─ loop: pick a Ready modem that is not busy, not cooling down, not tried for this
//!            message, with per-minute and per-day budget left (least recently used first)
//!        ├─ none: wait (≤ max_wait in total) for budget, a cool-down to end or a modem to
//!        │        become ready → PoolError::NoModem
//!        └─ submit on it
//!             ├─ ok → PoolReceipt { modem, message_refs }
//!             ├─ modem at fault (ModemFault, NetworkPause, Timeout/Disconnected/NotReady),
//!             │  nothing possibly sent → cool that modem down, try the next one
//!             ├─ Busy after the driver's own retries → try the next one
//!             └─ anything else (Permanent, Bug, DestinationUnavailable, Transient, Unknown,
//!                or maybe_sent / some parts sent) → PoolError::Submit, the caller decides
//! ```
//!
//! Pacing counts SMS parts: a three-part message spends three of the minute's budget. A
//! message larger than a whole budget is still sent when the modem's window is empty.
//! Per-day counters reset at the local day boundary.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::cms::ErrorClass;
use super::driver::{ModemHandle, ModemState, ModemStatus, SubmitError, SubmitErrorKind};
use crate::dispatch::SinkFailure;

/// How often a waiting submit looks again at modem states.
const POLL: Duration = Duration::from_millis(100);
const MINUTE: Duration = Duration::from_secs(60);
/// Default time a modem that failed at the modem level is left alone.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(60);

/// Sending limits of one SIM (carriers flag machine-like bursts and cap "unlimited" plans).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Pacing {
    /// SMS parts per rolling minute; 0 = unlimited.
    #[serde(default)]
    pub per_minute: u32,
    /// SMS parts per local calendar day; 0 = unlimited.
    #[serde(default)]
    pub per_day: u32,
}

/// The modems of a pool with their pacing.
pub struct PoolConfig {
    pub modems: Vec<(ModemHandle, Pacing)>,
}

impl From<Vec<(ModemHandle, Pacing)>> for PoolConfig {
    fn from(modems: Vec<(ModemHandle, Pacing)>) -> Self {
        PoolConfig { modems }
    }
}

/// Where a message went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolReceipt {
    /// The modem that sent it.
    pub modem: String,
    /// One message reference per part.
    pub message_refs: Vec<u8>,
}

/// Why the pool did not send a message.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// A modem answered with a failure that is the message's (or the caller's) to handle,
    /// or the message may have been sent partly or wholly, so it was not retried elsewhere.
    #[error("modem {modem}: {error}")]
    Submit { modem: String, error: SubmitError },
    /// No modem could take the message: all down, failed, busy or paced out until `max_wait`.
    /// `last` is the last modem-level failure seen, if any.
    #[error("no modem could take the message within {waited:?}")]
    NoModem {
        waited: Duration,
        last: Option<(String, SubmitError)>,
    },
    /// The pool has no modems.
    #[error("the modem pool is empty")]
    Empty,
}

impl PoolError {
    /// The class the caller's retry schedule should follow.
    pub fn class(&self) -> ErrorClass {
        match self {
            PoolError::Submit { error, .. } => error.class,
            PoolError::NoModem {
                last: Some((_, e)), ..
            } => e.class,
            PoolError::NoModem { last: None, .. } => ErrorClass::Transient,
            PoolError::Empty => ErrorClass::ModemFault,
        }
    }

    /// The message may have gone out: do not resend blindly.
    pub fn maybe_sent(&self) -> bool {
        match self {
            PoolError::Submit { error, .. } => error.maybe_sent || error.parts_sent > 0,
            _ => false,
        }
    }

    /// For the dispatcher.
    pub fn into_sink_failure(self) -> SinkFailure {
        SinkFailure {
            class: self.class(),
            maybe_sent: self.maybe_sent(),
            no_modem: matches!(self, PoolError::NoModem { .. } | PoolError::Empty),
            reason: self.to_string(),
        }
    }
}

/// What [`Selector::pick`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// Use this modem; its budget is reserved and it is marked busy until
    /// [`Selector::finish`].
    Use(usize),
    /// Nothing now; a per-minute budget or a cool-down frees up at this instant.
    WaitUntil(Instant),
    /// Nothing now; only per-day budgets stand in the way.
    WaitNextDay,
    /// Nothing now, and no known time: modems are busy, not ready, or already tried.
    Unavailable,
}

#[derive(Debug)]
struct Slot {
    pacing: Pacing,
    /// One entry per part sent in the last minute, oldest first.
    minute: VecDeque<Instant>,
    day: Option<NaiveDate>,
    day_count: u32,
    cool_until: Option<Instant>,
    /// The driver's `inits` when the failed submit was picked: a later init ends the cool-down.
    cool_inits: u64,
    in_flight: bool,
    last_used: Option<Instant>,
}

impl Slot {
    /// None when `parts` fit into the rolling minute now, else when they will.
    fn minute_wait(&mut self, now: Instant, parts: u32) -> Option<Instant> {
        let limit = self.pacing.per_minute as usize;
        if limit == 0 {
            return None;
        }
        while self.minute.front().is_some_and(|&t| t + MINUTE <= now) {
            self.minute.pop_front();
        }
        let count = self.minute.len();
        let parts = parts as usize;
        if count == 0 || count + parts <= limit {
            return None;
        }
        // the entries that must expire first
        let k = (count + parts - limit).min(count);
        self.minute.get(k - 1).map(|&t| t + MINUTE)
    }

    fn day_fits(&mut self, today: NaiveDate, parts: u32) -> bool {
        if self.day != Some(today) {
            self.day = Some(today);
            self.day_count = 0;
        }
        let limit = self.pacing.per_day;
        limit == 0 || self.day_count == 0 || self.day_count.saturating_add(parts) <= limit
    }
}

/// The pool's choice logic, without I/O or clocks.
#[derive(Debug)]
pub struct Selector {
    slots: Vec<Slot>,
}

impl Selector {
    /// One slot per modem, in pool order.
    pub fn new(pacings: impl IntoIterator<Item = Pacing>) -> Self {
        let slots = pacings
            .into_iter()
            .map(|pacing| Slot {
                pacing,
                minute: VecDeque::new(),
                day: None,
                day_count: 0,
                cool_until: None,
                cool_inits: 0,
                in_flight: false,
                last_used: None,
            })
            .collect();
        Selector { slots }
    }

    /// Picks a modem for a message of `parts` parts and reserves its budget. `ready[i]` says
    /// whether modem `i`'s driver is Ready; `exclude` lists modems already tried for this
    /// message.
    pub fn pick(
        &mut self,
        now: Instant,
        today: NaiveDate,
        parts: u32,
        ready: &[bool],
        exclude: &[usize],
    ) -> Pick {
        let parts = parts.max(1);
        let mut best: Option<usize> = None;
        let mut wait_until: Option<Instant> = None;
        let mut day_limited = false;
        let last_used: Vec<Option<Instant>> = self.slots.iter().map(|s| s.last_used).collect();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if !ready.get(i).copied().unwrap_or(false) || exclude.contains(&i) || slot.in_flight {
                continue;
            }
            if let Some(until) = slot.cool_until {
                if now < until {
                    wait_until = Some(wait_until.map_or(until, |w| w.min(until)));
                    continue;
                }
                slot.cool_until = None;
            }
            if !slot.day_fits(today, parts) {
                day_limited = true;
                continue;
            }
            if let Some(t) = slot.minute_wait(now, parts) {
                wait_until = Some(wait_until.map_or(t, |w| w.min(t)));
                continue;
            }
            // least recently used first; never used before anything
            let better = match best {
                None => true,
                Some(b) => match (slot.last_used, last_used[b]) {
                    (None, Some(_)) => true,
                    (Some(a), Some(c)) => a < c,
                    _ => false,
                },
            };
            if better {
                best = Some(i);
            }
        }
        if let Some(i) = best {
            if let Some(slot) = self.slots.get_mut(i) {
                slot.minute.extend(std::iter::repeat_n(now, parts as usize));
                slot.day_count = slot.day_count.saturating_add(parts);
                slot.in_flight = true;
                slot.last_used = Some(now);
                return Pick::Use(i);
            }
        }
        match (wait_until, day_limited) {
            (Some(t), _) => Pick::WaitUntil(t),
            (None, true) => Pick::WaitNextDay,
            (None, false) => Pick::Unavailable,
        }
    }

    /// Ends the use of modem `i`: `reserved` parts were counted at [`Selector::pick`], `used`
    /// of them actually count (sent or possibly sent); the rest is given back.
    pub fn finish(&mut self, i: usize, reserved: u32, used: u32) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        let refund = reserved.max(1).saturating_sub(used);
        for _ in 0..refund {
            slot.minute.pop_back();
        }
        slot.day_count = slot.day_count.saturating_sub(refund);
        slot.in_flight = false;
    }

    /// Leaves modem `i` alone until `until`, or until its driver reports an initialisation
    /// count above `inits` (it went through a re-init since; see [`Selector::observe`]).
    pub fn cool_down(&mut self, i: usize, until: Instant, inits: u64) {
        if let Some(slot) = self.slots.get_mut(i) {
            slot.cool_until = Some(until);
            slot.cool_inits = inits;
        }
    }

    /// Tells the selector modem `i`'s driver has initialised `inits` times: a modem cooling
    /// down since a failure that has been re-initialised since is usable again.
    pub fn observe(&mut self, i: usize, inits: u64) {
        if let Some(slot) = self.slots.get_mut(i) {
            if slot.cool_until.is_some() && inits > slot.cool_inits {
                slot.cool_until = None;
            }
        }
    }

    /// Whether modem `i` is cooling down at `now`.
    pub fn is_cooling(&self, i: usize, now: Instant) -> bool {
        self.slots
            .get(i)
            .and_then(|s| s.cool_until)
            .is_some_and(|until| now < until)
    }
}

fn today() -> NaiveDate {
    chrono::Local::now().date_naive()
}

fn lock(selector: &Mutex<Selector>) -> MutexGuard<'_, Selector> {
    selector.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The modem failed, not the message.
fn modem_at_fault(e: &SubmitError) -> bool {
    matches!(
        e.kind,
        SubmitErrorKind::Timeout | SubmitErrorKind::Disconnected | SubmitErrorKind::NotReady
    ) || e.class.is_modem_level()
}

struct Inner {
    modems: Vec<ModemHandle>,
    selector: Mutex<Selector>,
    changed: Notify,
    cooldown: Duration,
}

/// Gives a picked modem back to the selector, also when the submit future is dropped.
struct Reservation<'a> {
    inner: &'a Inner,
    index: usize,
    parts: u32,
    used: Option<u32>,
}

impl Reservation<'_> {
    fn finish(mut self, used: u32) {
        self.used = Some(used);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        // Dropped mid-submit: the driver still runs the request, so count it as used.
        let used = self.used.unwrap_or(self.parts);
        lock(&self.inner.selector).finish(self.index, self.parts, used);
        self.inner.changed.notify_waiters();
    }
}

/// A set of modems used as one. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("modems", &self.inner.modems)
            .finish()
    }
}

impl Pool {
    /// A pool over `cfg`'s modems (a [`PoolConfig`] or a `Vec<(ModemHandle, Pacing)>`).
    pub fn new(cfg: impl Into<PoolConfig>) -> Pool {
        Pool::with_cooldown(cfg, DEFAULT_COOLDOWN)
    }

    /// Like [`Pool::new`], leaving a modem that failed at the modem level alone for
    /// `cooldown`.
    pub fn with_cooldown(cfg: impl Into<PoolConfig>, cooldown: Duration) -> Pool {
        let cfg = cfg.into();
        let (modems, pacings): (Vec<_>, Vec<_>) = cfg.modems.into_iter().unzip();
        Pool {
            inner: Arc::new(Inner {
                modems,
                selector: Mutex::new(Selector::new(pacings)),
                changed: Notify::new(),
                cooldown,
            }),
        }
    }

    /// The modems, in configuration order.
    pub fn modems(&self) -> &[ModemHandle] {
        &self.inner.modems
    }

    /// A status snapshot of every modem.
    pub fn status(&self) -> Vec<ModemStatus> {
        self.inner.modems.iter().map(ModemHandle::status).collect()
    }

    /// Stops every modem's driver.
    pub async fn shutdown(&self) {
        for m in &self.inner.modems {
            m.shutdown().await;
        }
    }

    /// Sends one message (its PDUs, `(tpdu_len, hex)` per part) through one modem, failing
    /// over to another when the modem is at fault. Waits at most `max_wait` for a modem to be
    /// free; the submit itself is bounded by the driver's timeouts. Do not drop the future
    /// mid-submit: the modem would still send and the outcome would be lost.
    pub async fn submit(
        &self,
        pdus: Vec<(usize, String)>,
        max_wait: Duration,
    ) -> Result<PoolReceipt, PoolError> {
        let inner = &*self.inner;
        if inner.modems.is_empty() {
            return Err(PoolError::Empty);
        }
        let parts = u32::try_from(pdus.len()).unwrap_or(u32::MAX).max(1);
        let start = tokio::time::Instant::now();
        let deadline = start + max_wait;
        let mut tried: Vec<usize> = Vec::new();
        let mut last: Option<(String, SubmitError)> = None;
        loop {
            if tried.len() >= inner.modems.len() {
                return Err(PoolError::NoModem {
                    waited: start.elapsed(),
                    last,
                });
            }
            let statuses: Vec<ModemStatus> = inner.modems.iter().map(ModemHandle::status).collect();
            let ready: Vec<bool> = statuses
                .iter()
                .map(|s| s.state == ModemState::Ready)
                .collect();
            let now = tokio::time::Instant::now();
            let pick = {
                let mut selector = lock(&inner.selector);
                for (i, s) in statuses.iter().enumerate() {
                    selector.observe(i, s.inits);
                }
                selector.pick(now.into_std(), today(), parts, &ready, &tried)
            };
            let index = match pick {
                Pick::Use(i) => i,
                other => {
                    if now >= deadline {
                        return Err(PoolError::NoModem {
                            waited: start.elapsed(),
                            last,
                        });
                    }
                    let mut until = (now + POLL).min(deadline);
                    if let Pick::WaitUntil(t) = other {
                        until = until.min(tokio::time::Instant::from_std(t));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        _ = inner.changed.notified() => {}
                    }
                    continue;
                }
            };
            let (Some(modem), Some(picked)) = (inner.modems.get(index), statuses.get(index)) else {
                return Err(PoolError::Empty);
            };
            let inits_at_pick = picked.inits;
            let reservation = Reservation {
                inner,
                index,
                parts,
                used: None,
            };
            let result = modem.submit(pdus.clone()).await;
            let name = modem.name().to_string();
            match result {
                Ok(receipt) => {
                    reservation.finish(parts);
                    debug!(modem = %name, parts, "pool: sent");
                    return Ok(PoolReceipt {
                        modem: name,
                        message_refs: receipt.message_refs,
                    });
                }
                Err(error) => {
                    let used = u32::try_from(error.parts_sent)
                        .unwrap_or(u32::MAX)
                        .saturating_add(u32::from(error.maybe_sent));
                    let at_fault = modem_at_fault(&error);
                    if at_fault {
                        let until = tokio::time::Instant::now() + inner.cooldown;
                        lock(&inner.selector).cool_down(index, until.into_std(), inits_at_pick);
                        warn!(modem = %name, error = %error, cooldown = ?inner.cooldown, "modem failed; using the others meanwhile");
                    }
                    reservation.finish(used);
                    let nothing_sent = !error.maybe_sent && error.parts_sent == 0;
                    if (at_fault || error.class == ErrorClass::Busy) && nothing_sent {
                        tried.push(index);
                        last = Some((name, error));
                        continue;
                    }
                    return Err(PoolError::Submit { modem: name, error });
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::modem::driver::{self, ModemConfig};
    use crate::modem::pdu::{encode_submit, SubmitOptions};
    use crate::phone::E164;
    use crate::sim::{Fault, SimModem, SimOptions};

    fn day(d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2025, 3, d).unwrap()
    }

    fn pacing(per_minute: u32, per_day: u32) -> Pacing {
        Pacing {
            per_minute,
            per_day,
        }
    }

    const ALL: &[bool] = &[true, true, true];

    #[test]
    fn per_minute_budget_is_a_rolling_window() {
        let t0 = Instant::now();
        let mut s = Selector::new([pacing(2, 0)]);
        assert_eq!(s.pick(t0, day(1), 1, ALL, &[]), Pick::Use(0));
        // busy until finished
        assert_eq!(s.pick(t0, day(1), 1, ALL, &[]), Pick::Unavailable);
        s.finish(0, 1, 1);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(s.pick(t1, day(1), 1, ALL, &[]), Pick::Use(0));
        s.finish(0, 1, 1);
        // third in the same minute waits for the first to age out
        assert_eq!(
            s.pick(t1, day(1), 1, ALL, &[]),
            Pick::WaitUntil(t0 + MINUTE)
        );
        assert_eq!(s.pick(t0 + MINUTE, day(1), 1, ALL, &[]), Pick::Use(0));
        s.finish(0, 1, 1);
        // a two-part message needs two free slots: both t1 and t0+60 must age out
        let t2 = t0 + MINUTE + Duration::from_secs(1);
        assert_eq!(
            s.pick(t2, day(1), 2, ALL, &[]),
            Pick::WaitUntil(t0 + MINUTE + MINUTE)
        );
        // a message larger than the whole budget goes once the window is empty
        let mut s = Selector::new([pacing(2, 0)]);
        assert_eq!(s.pick(t0, day(1), 5, ALL, &[]), Pick::Use(0));
        s.finish(0, 5, 5);
        assert_eq!(
            s.pick(t0, day(1), 1, ALL, &[]),
            Pick::WaitUntil(t0 + MINUTE)
        );
    }

    #[test]
    fn per_day_budget_resets_on_a_new_local_day() {
        let t0 = Instant::now();
        let mut s = Selector::new([pacing(0, 3)]);
        for k in 0..3 {
            let t = t0 + Duration::from_secs(k);
            assert_eq!(s.pick(t, day(1), 1, ALL, &[]), Pick::Use(0));
            s.finish(0, 1, 1);
        }
        assert_eq!(s.pick(t0, day(1), 1, ALL, &[]), Pick::WaitNextDay);
        assert_eq!(s.pick(t0, day(2), 1, ALL, &[]), Pick::Use(0));
        s.finish(0, 1, 1);
        // parts count: 2 of the remaining 2
        assert_eq!(s.pick(t0, day(2), 2, ALL, &[]), Pick::Use(0));
        s.finish(0, 2, 2);
        assert_eq!(s.pick(t0, day(2), 1, ALL, &[]), Pick::WaitNextDay);
    }

    #[test]
    fn unused_budget_is_given_back() {
        let t0 = Instant::now();
        let mut s = Selector::new([pacing(2, 2)]);
        assert_eq!(s.pick(t0, day(1), 2, ALL, &[]), Pick::Use(0));
        s.finish(0, 2, 0); // the modem failed before sending anything
        assert_eq!(s.pick(t0, day(1), 2, ALL, &[]), Pick::Use(0));
        s.finish(0, 2, 1); // one part went out
        assert_eq!(s.pick(t0, day(1), 1, ALL, &[]), Pick::Use(0));
        s.finish(0, 1, 1);
        assert_eq!(s.pick(t0, day(1), 1, ALL, &[]), Pick::WaitNextDay);
    }

    #[test]
    fn least_recently_used_and_pacing_spread_the_load() {
        let t0 = Instant::now();
        let mut s = Selector::new([pacing(0, 0), pacing(0, 0), pacing(1, 0)]);
        let mut order = Vec::new();
        for k in 0..6 {
            let t = t0 + Duration::from_millis(k);
            match s.pick(t, day(1), 1, ALL, &[]) {
                Pick::Use(i) => {
                    order.push(i);
                    s.finish(i, 1, 1);
                }
                other => panic!("{other:?}"),
            }
        }
        // 0,1,2 once each (never-used first), then modem 2 is paced out for the minute
        assert_eq!(order, vec![0, 1, 2, 0, 1, 0]);
    }

    #[test]
    fn readiness_exclusion_busy_and_cool_down() {
        let t0 = Instant::now();
        let mut s = Selector::new([pacing(0, 0), pacing(0, 0)]);
        assert_eq!(s.pick(t0, day(1), 1, &[false, true], &[]), Pick::Use(1));
        s.finish(1, 1, 1);
        assert_eq!(s.pick(t0, day(1), 1, &[true, true], &[0]), Pick::Use(1));
        // modem 1 busy, modem 0 excluded: nothing
        assert_eq!(
            s.pick(t0, day(1), 1, &[true, true], &[0]),
            Pick::Unavailable
        );
        s.finish(1, 1, 1);
        s.cool_down(0, t0 + Duration::from_secs(30), 1);
        s.observe(0, 1); // not re-initialised yet: still cooling
        assert!(s.is_cooling(0, t0));
        assert_eq!(
            s.pick(t0, day(1), 1, &[true, false], &[]),
            Pick::WaitUntil(t0 + Duration::from_secs(30))
        );
        assert_eq!(s.pick(t0, day(1), 1, &[true, true], &[]), Pick::Use(1));
        s.finish(1, 1, 1);
        let later = t0 + Duration::from_secs(30);
        assert!(!s.is_cooling(0, later));
        assert_eq!(s.pick(later, day(1), 1, &[true, true], &[]), Pick::Use(0));
        s.finish(0, 1, 1);
        // a re-initialisation ends the cool-down early
        s.cool_down(0, later + Duration::from_secs(60), 1);
        assert!(s.is_cooling(0, later));
        s.observe(0, 2);
        assert!(!s.is_cooling(0, later));
        // short ready slice: missing entries count as not ready
        let mut s = Selector::new([pacing(0, 0)]);
        assert_eq!(s.pick(t0, day(1), 1, &[], &[]), Pick::Unavailable);
    }

    #[test]
    fn pool_errors_map_to_sink_failures() {
        let e = PoolError::Submit {
            modem: "m".into(),
            error: SubmitError::new(SubmitErrorKind::Cms(21), 0, false),
        };
        assert_eq!(e.class(), ErrorClass::Permanent);
        let f = e.into_sink_failure();
        assert!(!f.no_modem && !f.maybe_sent);
        let e = PoolError::Submit {
            modem: "m".into(),
            error: SubmitError::new(SubmitErrorKind::Timeout, 0, true),
        };
        assert!(e.maybe_sent());
        let e = PoolError::NoModem {
            waited: Duration::ZERO,
            last: None,
        };
        let f = e.into_sink_failure();
        assert!(f.no_modem);
        assert_eq!(f.class, ErrorClass::Transient);
    }

    // ---- with simulated modems on real ptys ----------------------------------------------

    const WAIT: Duration = Duration::from_secs(10);

    fn msg(text: &str) -> Vec<(usize, String)> {
        let dest: E164 = "+8613800138000".parse().unwrap();
        encode_submit(&dest, text, &SubmitOptions::default())
            .unwrap()
            .into_iter()
            .map(|p| (p.tpdu_len, p.hex))
            .collect()
    }

    async fn modem(name: &str, sim: &SimModem) -> ModemHandle {
        let h = driver::spawn(ModemConfig {
            command_timeout: Duration::from_millis(1000),
            submit_timeout: Duration::from_millis(2000),
            reopen_backoff_max: Duration::from_millis(100),
            ..ModemConfig::new(name, sim.device_path())
        });
        let st = h.wait_for_state(WAIT, |s| *s == ModemState::Ready).await;
        assert!(st.is_ok(), "{st:?}");
        h
    }

    #[tokio::test]
    async fn fails_over_from_a_faulty_modem() {
        let (sa, sb) = (
            SimModem::spawn(SimOptions::default()).unwrap(),
            SimModem::spawn(SimOptions::default()).unwrap(),
        );
        let pool = Pool::new(vec![
            (modem("a", &sa).await, Pacing::default()),
            (modem("b", &sb).await, Pacing::default()),
        ]);
        // SIM trouble on a (CMS 313 "SIM failure"): b sends instead
        sa.inject(Fault::CmsError(313));
        let r = pool.submit(msg("one"), WAIT).await.unwrap();
        assert_eq!(r.modem, "b");
        assert_eq!((sa.received().len(), sb.received().len()), (0, 1));
        // a cools down: the next ones go to b even though a is least recently used
        let r = pool.submit(msg("two"), WAIT).await.unwrap();
        assert_eq!(r.modem, "b");
        let st = pool.status();
        assert_eq!(st.len(), 2);
        assert_eq!(st[0].failed, 1);
        assert_eq!(st[1].sent, 2);
        // once a's driver has re-initialised, a is back (long before the 60 s cool-down)
        let a = &pool.modems()[0];
        let back = a
            .wait_for_state(WAIT, |s| *s == ModemState::Ready)
            .await
            .unwrap();
        assert!(back.inits >= 2, "{back:?}");
        let r = pool.submit(msg("three"), WAIT).await.unwrap();
        assert_eq!(r.modem, "a");
    }

    #[tokio::test]
    async fn a_single_modem_is_used_again_as_soon_as_it_recovers() {
        let sa = SimModem::spawn(SimOptions::default()).unwrap();
        let pool = Pool::new(vec![(modem("a", &sa).await, Pacing::default())]);
        sa.inject(Fault::Silence);
        let e = pool.submit(msg("lost"), WAIT).await.unwrap_err();
        assert!(
            matches!(&e, PoolError::NoModem { last: Some((_, err)), .. } if err.kind == SubmitErrorKind::Timeout),
            "{e:?}"
        );
        sa.clear_faults();
        // WAIT is far below the 60 s cool-down: only the re-init can let this through
        let r = pool.submit(msg("again"), WAIT).await.unwrap();
        assert_eq!(r.modem, "a");
    }

    #[tokio::test]
    async fn destination_failures_go_back_to_the_caller() {
        let (sa, sb) = (
            SimModem::spawn(SimOptions::default()).unwrap(),
            SimModem::spawn(SimOptions::default()).unwrap(),
        );
        let pool = Pool::new(vec![
            (modem("a", &sa).await, Pacing::default()),
            (modem("b", &sb).await, Pacing::default()),
        ]);
        sa.set_rejected_number("8613800138000");
        let e = pool.submit(msg("x"), WAIT).await.unwrap_err();
        assert!(
            matches!(&e, PoolError::Submit { modem, .. } if modem == "a"),
            "{e:?}"
        );
        assert_eq!(e.class(), ErrorClass::Permanent);
        assert!(
            sb.received().is_empty(),
            "no failover for a destination failure"
        );
        sa.set_rejected_number("0");
        sa.inject(Fault::CmsError(41));
        sb.inject(Fault::CmsError(41));
        // a was used last, so b goes first now
        let e = pool.submit(msg("y"), WAIT).await.unwrap_err();
        assert_eq!(e.class(), ErrorClass::Transient);
        assert!(
            matches!(&e, PoolError::Submit { modem, .. } if modem == "b"),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_hanging_modem_does_not_block_the_others() {
        let (sa, sb) = (
            SimModem::spawn(SimOptions::default()).unwrap(),
            SimModem::spawn(SimOptions::default()).unwrap(),
        );
        let pool = Pool::new(vec![
            (modem("a", &sa).await, Pacing::default()),
            (modem("b", &sb).await, Pacing::default()),
        ]);
        sa.inject(Fault::Silence);
        let p1 = pool.clone();
        let slow = tokio::spawn(async move { p1.submit(msg("first"), WAIT).await });
        // the first submit took a (never used, first in order); wait until it is in flight
        let deadline = Instant::now() + WAIT;
        while !sa.commands().iter().any(|c| c.starts_with("AT+CMGS")) {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let fast = pool.submit(msg("second"), WAIT).await.unwrap();
        assert_eq!(fast.modem, "b");
        assert!(!slow.is_finished(), "a is still timing out");
        // the first one fails over to b after a's timeout
        let first = slow.await.unwrap().unwrap();
        assert_eq!(first.modem, "b");
        assert_eq!(sb.received().len(), 2);
        assert!(sa.received().is_empty());
    }

    #[tokio::test]
    async fn paced_out_modems_send_elsewhere_then_make_callers_wait() {
        let (sa, sb) = (
            SimModem::spawn(SimOptions::default()).unwrap(),
            SimModem::spawn(SimOptions::default()).unwrap(),
        );
        let pool = Pool::new(vec![
            (modem("a", &sa).await, pacing(1, 0)),
            (modem("b", &sb).await, pacing(0, 1)),
        ]);
        assert_eq!(pool.submit(msg("1"), WAIT).await.unwrap().modem, "a");
        assert_eq!(pool.submit(msg("2"), WAIT).await.unwrap().modem, "b");
        let t = Instant::now();
        let e = pool
            .submit(msg("3"), Duration::from_millis(250))
            .await
            .unwrap_err();
        assert!(matches!(e, PoolError::NoModem { last: None, .. }), "{e:?}");
        assert!(t.elapsed() >= Duration::from_millis(250));
        assert!(e.into_sink_failure().no_modem);
        assert_eq!(sa.received().len() + sb.received().len(), 2);
    }

    #[tokio::test]
    async fn every_modem_down_gives_no_modem_with_the_last_error() {
        let sa = SimModem::spawn(SimOptions::default()).unwrap();
        let pool = Pool::new(vec![(modem("a", &sa).await, Pacing::default())]);
        sa.inject(Fault::CmsError(331)); // no network service
        let e = pool.submit(msg("x"), WAIT).await.unwrap_err();
        match &e {
            PoolError::NoModem {
                last: Some((m, err)),
                ..
            } => {
                assert_eq!(m, "a");
                assert_eq!(err.class, ErrorClass::NetworkPause);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Pool::new(Vec::new())
                .submit(msg("x"), WAIT)
                .await
                .unwrap_err()
                .class(),
            ErrorClass::ModemFault
        );
    }
}
