//! Several modems in one agent: pacing per SIM, least-recently-used choice, failover, and
//! health judged from each modem's recent outcomes.
//!
//! [`Selector`] is the sans-I/O part: it is told the time, the local date, which modems are
//! ready, which already failed this message and which the caller would rather avoid, and
//! answers which modem to use or how long to wait; it is told every outcome and keeps each
//! modem's health. [`Pool`] is the async shell around it and the driver handles.
//!
//! ```text
//! submit(pdus, max_wait, avoid)
//!   └─ loop: pick a Ready modem that is not busy, not cooling down, not tried for this
//!            message, with per-minute and per-day budget left (least recently used first;
//!            a modem in `avoid` only when no other could take it soon)
//!        ├─ none: wait (≤ max_wait in total) for budget, a cool-down to end or a modem to
//!        │        become ready → PoolError::NoModem (with the failures seen so far)
//!        └─ submit on it; every outcome goes to the modem's health (below)
//!             ├─ ok → PoolReceipt { modem, message_refs }
//!             ├─ the message's failure (Permanent, Bug, DestinationUnavailable), or it may
//!             │  have been sent (maybe_sent / some parts sent) → PoolError::Submit
//!             ├─ the same failure as on another modem for this message → PoolError::Submit
//!             │  (plausibly the message's: the caller charges an attempt)
//!             └─ anything else (CMS 500, ERROR, timeout, port gone, busy, SIM, network):
//!                nothing was sent → try the next modem
//! ```
//!
//! Health, per modem, from its outcomes across messages, whatever the error class:
//!
//! ```text
//! success                        streak = 0, escalation = 0, alarm cleared ("recovered")
//! failure                        streak += 1
//!   modem-level class            cool down `cooldown` (60 s); a re-init ends it early
//!   (ModemFault, NetworkPause,
//!   timeout, port gone)
//!   streak ≥ 3 and another       escalation += 1; cool down base × 2^(escalation-1)
//!   modem succeeded since the    (30 s, 60 s, … ≤ 10 min); a re-init does not end it;
//!   streak began                 alarm raised (error log, mailbell_modem_alarm = 1)
//! ```
//!
//! After an escalated cool-down the modem gets one submit: a success clears it, a failure
//! cools it down again for twice as long. A streak while every other modem fails too (a
//! network outage, a burst of poison messages) does not cool anything down by itself.
//!
//! Pacing counts SMS parts: a three-part message spends three of the minute's budget. A
//! message larger than a whole budget is still sent when the modem's window is empty.
//! Per-day counters reset at the local day boundary.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use super::cms::ErrorClass;
use super::driver::{ModemHandle, ModemState, ModemStatus, SubmitError, SubmitErrorKind};
use crate::dispatch::{FailedOn, SinkFailure};

/// How often a waiting submit looks again at modem states.
const POLL: Duration = Duration::from_millis(100);
const MINUTE: Duration = Duration::from_secs(60);
/// Default time a modem that failed at the modem level is left alone.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(60);

/// When a run of failures on one modem takes it out of use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Consecutive failed submits that, while another modem succeeds, cool a modem down.
    pub streak: u32,
    /// The first such cool-down; each further one without a success between doubles it.
    pub base: Duration,
    /// The longest such cool-down.
    pub max: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            streak: 3,
            base: Duration::from_secs(30),
            max: Duration::from_secs(600),
        }
    }
}

impl HealthPolicy {
    /// The cool-down of escalation `level` (1-based).
    pub fn cooldown(&self, level: u32) -> Duration {
        let shift = level.saturating_sub(1).min(20);
        self.base
            .checked_mul(1u32 << shift)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

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
    /// A modem answered with a failure that is the message's (or the caller's) to handle:
    /// a message-level class, the same failure as on another modem (`earlier`), or the
    /// message may have been sent partly or wholly, so it was not retried elsewhere.
    #[error("modem {modem}: {error}")]
    Submit {
        modem: String,
        error: SubmitError,
        /// The modems that failed this message before, in this call.
        earlier: Vec<(String, SubmitError)>,
    },
    /// No modem could take the message: all down, failed, busy or paced out until `max_wait`.
    /// `last` is the last modem-level failure seen, if any; `failed` every failure seen.
    #[error("no modem could take the message within {waited:?}")]
    NoModem {
        waited: Duration,
        last: Option<(String, SubmitError)>,
        failed: Vec<(String, SubmitError)>,
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

    /// Every modem failure of this call, in order (the final one last).
    pub fn failures(&self) -> Vec<(String, SubmitError)> {
        match self {
            PoolError::Submit {
                modem,
                error,
                earlier,
            } => {
                let mut v = earlier.clone();
                v.push((modem.clone(), error.clone()));
                v
            }
            PoolError::NoModem { failed, .. } => failed.clone(),
            PoolError::Empty => Vec::new(),
        }
    }

    /// For the dispatcher.
    pub fn into_sink_failure(self) -> SinkFailure {
        let failed_on = self
            .failures()
            .into_iter()
            .map(|(modem, e)| FailedOn {
                modem,
                failure: e.kind.to_string(),
                class: e.class,
            })
            .collect();
        SinkFailure {
            class: self.class(),
            maybe_sent: self.maybe_sent(),
            no_modem: matches!(self, PoolError::NoModem { .. } | PoolError::Empty),
            reason: self.to_string(),
            failed_on,
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

/// What a failure did to a modem's health (see [`Selector::failed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Counted; the modem stays in use (or in its class cool-down).
    Counted,
    /// A run of failures while others succeed: cooled down this long, alarm raised.
    CooledDown { streak: u32, cooldown: Duration },
}

/// A modem's health as the pool sees it, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModemHealth {
    /// Consecutive failed submits (0 after a success).
    pub failure_streak: u32,
    /// Seconds left of the current cool-down (0 when in use).
    pub cooling_down_s: u64,
    /// Escalated cool-downs since the last success.
    pub escalation: u32,
    /// Taken out of use for a run of failures while others succeed; cleared by a success.
    pub alarm: bool,
}

/// A modem's driver status with the pool's judgement of its health.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PoolModemStatus {
    #[serde(flatten)]
    pub modem: ModemStatus,
    #[serde(flatten)]
    pub health: ModemHealth,
}

#[derive(Debug)]
struct Slot {
    pacing: Pacing,
    /// One entry per part sent in the last minute, oldest first.
    minute: VecDeque<Instant>,
    day: Option<NaiveDate>,
    day_count: u32,
    cool_until: Option<Instant>,
    /// The driver's `inits` when the failed submit was picked: a later init ends the
    /// cool-down. None for an escalated cool-down, which only time ends.
    cool_inits: Option<u64>,
    in_flight: bool,
    last_used: Option<Instant>,
    streak: u32,
    /// When the current failure streak began.
    streak_since: Option<Instant>,
    escalation: u32,
    last_ok: Option<Instant>,
    alarm: bool,
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

    fn cooling(&self, now: Instant) -> Option<Instant> {
        self.cool_until.filter(|&until| now < until)
    }
}

/// The pool's choice and health logic, without I/O or clocks.
#[derive(Debug)]
pub struct Selector {
    slots: Vec<Slot>,
    health: HealthPolicy,
}

impl Selector {
    /// One slot per modem, in pool order, with the default [`HealthPolicy`].
    pub fn new(pacings: impl IntoIterator<Item = Pacing>) -> Self {
        Selector::with_health(pacings, HealthPolicy::default())
    }

    /// One slot per modem, in pool order.
    pub fn with_health(pacings: impl IntoIterator<Item = Pacing>, health: HealthPolicy) -> Self {
        let slots = pacings
            .into_iter()
            .map(|pacing| Slot {
                pacing,
                minute: VecDeque::new(),
                day: None,
                day_count: 0,
                cool_until: None,
                cool_inits: None,
                in_flight: false,
                last_used: None,
                streak: 0,
                streak_since: None,
                escalation: 0,
                last_ok: None,
                alarm: false,
            })
            .collect();
        Selector { slots, health }
    }

    /// Picks a modem for a message of `parts` parts and reserves its budget. `ready[i]` says
    /// whether modem `i`'s driver is Ready; `exclude` lists modems already tried for this
    /// message; `avoid` lists modems to use only when no other one could take the message
    /// soon (those that failed it on an earlier try): when another usable modem is merely
    /// busy or paced for the minute, the answer is to wait for it.
    pub fn pick(
        &mut self,
        now: Instant,
        today: NaiveDate,
        parts: u32,
        ready: &[bool],
        exclude: &[usize],
        avoid: &[usize],
    ) -> Pick {
        let parts = parts.max(1);
        let mut best: Option<usize> = None;
        let mut best_avoided: Option<usize> = None;
        // a modem not avoided that could take the message once it is free or its minute ends
        let mut other_soon = false;
        let mut wait_until: Option<Instant> = None;
        let mut day_limited = false;
        let last_used: Vec<Option<Instant>> = self.slots.iter().map(|s| s.last_used).collect();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if !ready.get(i).copied().unwrap_or(false) || exclude.contains(&i) {
                continue;
            }
            let avoided = avoid.contains(&i);
            if let Some(until) = slot.cool_until {
                if now < until {
                    wait_until = Some(wait_until.map_or(until, |w| w.min(until)));
                    continue;
                }
                slot.cool_until = None;
            }
            if slot.in_flight {
                other_soon |= !avoided;
                continue;
            }
            if !slot.day_fits(today, parts) {
                day_limited = true;
                continue;
            }
            if let Some(t) = slot.minute_wait(now, parts) {
                wait_until = Some(wait_until.map_or(t, |w| w.min(t)));
                other_soon |= !avoided;
                continue;
            }
            // least recently used first; never used before anything
            let current = if avoided {
                &mut best_avoided
            } else {
                &mut best
            };
            let better = match *current {
                None => true,
                Some(b) => match (slot.last_used, last_used[b]) {
                    (None, Some(_)) => true,
                    (Some(a), Some(c)) => a < c,
                    _ => false,
                },
            };
            if better {
                *current = Some(i);
            }
        }
        let chosen = best.or(if other_soon { None } else { best_avoided });
        if let Some(i) = chosen {
            if let Some(slot) = self.slots.get_mut(i) {
                // Only a budget needs the record: without one it would grow by every part.
                if slot.pacing.per_minute > 0 {
                    slot.minute.extend(std::iter::repeat_n(now, parts as usize));
                }
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
        if slot.pacing.per_minute > 0 {
            for _ in 0..refund {
                slot.minute.pop_back();
            }
        }
        slot.day_count = slot.day_count.saturating_sub(refund);
        slot.in_flight = false;
    }

    /// Modem `i` sent a message at `now`: its failure streak ends. True when this clears an
    /// alarm (the modem recovered).
    pub fn succeeded(&mut self, i: usize, now: Instant) -> bool {
        let Some(slot) = self.slots.get_mut(i) else {
            return false;
        };
        let recovered = slot.alarm;
        slot.streak = 0;
        slot.streak_since = None;
        slot.escalation = 0;
        slot.alarm = false;
        slot.last_ok = Some(now);
        recovered
    }

    /// Modem `i` failed a submit at `now`. `class_cooldown` is the cool-down its error class
    /// asks for (modem-level failures), with the driver's `inits` at the pick: a re-init ends
    /// it early. A run of [`HealthPolicy::streak`] failures while another modem has
    /// succeeded since the run began cools the modem down, longer each time.
    pub fn failed(
        &mut self,
        i: usize,
        now: Instant,
        class_cooldown: Option<(Duration, u64)>,
    ) -> Verdict {
        let Some(since) = self.slots.get(i).map(|s| s.streak_since.unwrap_or(now)) else {
            return Verdict::Counted;
        };
        let others_ok = self
            .slots
            .iter()
            .enumerate()
            .any(|(j, s)| j != i && s.last_ok.is_some_and(|t| t >= since));
        let policy = self.health;
        let Some(slot) = self.slots.get_mut(i) else {
            return Verdict::Counted;
        };
        slot.streak = slot.streak.saturating_add(1);
        slot.streak_since = Some(since);
        if let Some((d, inits)) = class_cooldown {
            let until = now + d;
            if slot.cool_until.is_none_or(|u| u < until) {
                slot.cool_until = Some(until);
                slot.cool_inits = Some(inits);
            }
        }
        if slot.streak >= policy.streak.max(1) && others_ok {
            slot.escalation = slot.escalation.saturating_add(1);
            let cooldown = policy.cooldown(slot.escalation);
            let until = now + cooldown;
            slot.cool_until = Some(slot.cool_until.map_or(until, |u| u.max(until)));
            slot.cool_inits = None;
            slot.alarm = true;
            return Verdict::CooledDown {
                streak: slot.streak,
                cooldown,
            };
        }
        Verdict::Counted
    }

    /// Leaves modem `i` alone until `until`, or until its driver reports an initialisation
    /// count above `inits` (it went through a re-init since; see [`Selector::observe`]).
    pub fn cool_down(&mut self, i: usize, until: Instant, inits: u64) {
        if let Some(slot) = self.slots.get_mut(i) {
            slot.cool_until = Some(until);
            slot.cool_inits = Some(inits);
        }
    }

    /// Tells the selector modem `i`'s driver has initialised `inits` times: a modem cooling
    /// down since a modem-level failure that has been re-initialised since is usable again
    /// (an escalated cool-down is not ended this way).
    pub fn observe(&mut self, i: usize, inits: u64) {
        if let Some(slot) = self.slots.get_mut(i) {
            if slot.cool_until.is_some() && slot.cool_inits.is_some_and(|c| inits > c) {
                slot.cool_until = None;
                slot.cool_inits = None;
            }
        }
    }

    /// Whether modem `i` is cooling down at `now`.
    pub fn is_cooling(&self, i: usize, now: Instant) -> bool {
        self.slots.get(i).and_then(|s| s.cooling(now)).is_some()
    }

    /// Modem `i`'s health at `now`.
    pub fn health(&self, i: usize, now: Instant) -> ModemHealth {
        let Some(s) = self.slots.get(i) else {
            return ModemHealth::default();
        };
        ModemHealth {
            failure_streak: s.streak,
            cooling_down_s: s
                .cooling(now)
                .map_or(0, |u| u.saturating_duration_since(now).as_secs().max(1)),
            escalation: s.escalation,
            alarm: s.alarm,
        }
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
        Pool::with_health(cfg, cooldown, HealthPolicy::default())
    }

    /// Like [`Pool::with_cooldown`], with a [`HealthPolicy`] for runs of failures.
    pub fn with_health(
        cfg: impl Into<PoolConfig>,
        cooldown: Duration,
        health: HealthPolicy,
    ) -> Pool {
        let cfg = cfg.into();
        let (modems, pacings): (Vec<_>, Vec<_>) = cfg.modems.into_iter().unzip();
        Pool {
            inner: Arc::new(Inner {
                modems,
                selector: Mutex::new(Selector::with_health(pacings, health)),
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

    /// A status snapshot of every modem with the pool's view of its health.
    pub fn health(&self) -> Vec<PoolModemStatus> {
        let now = Instant::now();
        let selector = lock(&self.inner.selector);
        self.inner
            .modems
            .iter()
            .enumerate()
            .map(|(i, m)| PoolModemStatus {
                modem: m.status(),
                health: selector.health(i, now),
            })
            .collect()
    }

    /// Stops every modem's driver.
    pub async fn shutdown(&self) {
        for m in &self.inner.modems {
            m.shutdown().await;
        }
    }

    /// Sends one message (its PDUs, `(tpdu_len, hex)` per part) through one modem, failing
    /// over to another when the modem, not the message, failed. Waits at most `max_wait` for a
    /// modem to be free; the submit itself is bounded by the driver's timeouts. Do not drop
    /// the future mid-submit: the modem would still send and the outcome would be lost.
    pub async fn submit(
        &self,
        pdus: Vec<(usize, String)>,
        max_wait: Duration,
    ) -> Result<PoolReceipt, PoolError> {
        self.submit_avoiding(pdus, max_wait, &[]).await
    }

    /// Like [`Pool::submit`], using the modems named in `avoid` (those that failed this
    /// message before) only when no other modem could take it soon.
    pub async fn submit_avoiding(
        &self,
        pdus: Vec<(usize, String)>,
        max_wait: Duration,
        avoid: &[String],
    ) -> Result<PoolReceipt, PoolError> {
        let inner = &*self.inner;
        if inner.modems.is_empty() {
            return Err(PoolError::Empty);
        }
        let avoid: Vec<usize> = inner
            .modems
            .iter()
            .enumerate()
            .filter(|(_, m)| avoid.iter().any(|a| a == m.name()))
            .map(|(i, _)| i)
            .collect();
        let parts = u32::try_from(pdus.len()).unwrap_or(u32::MAX).max(1);
        let start = tokio::time::Instant::now();
        let deadline = start + max_wait;
        let mut tried: Vec<usize> = Vec::new();
        let mut failed: Vec<(String, SubmitError)> = Vec::new();
        loop {
            if tried.len() >= inner.modems.len() {
                return Err(PoolError::NoModem {
                    waited: start.elapsed(),
                    last: failed.last().cloned(),
                    failed,
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
                selector.pick(now.into_std(), today(), parts, &ready, &tried, &avoid)
            };
            let index = match pick {
                Pick::Use(i) => i,
                other => {
                    if now >= deadline {
                        return Err(PoolError::NoModem {
                            waited: start.elapsed(),
                            last: failed.last().cloned(),
                            failed,
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
                    let recovered = lock(&inner.selector).succeeded(index, Instant::now());
                    reservation.finish(parts);
                    if recovered {
                        info!(modem = %name, "modem sends again; alarm cleared");
                    }
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
                    let class_cooldown =
                        modem_at_fault(&error).then_some((inner.cooldown, inits_at_pick));
                    let verdict =
                        lock(&inner.selector).failed(index, Instant::now(), class_cooldown);
                    match verdict {
                        Verdict::CooledDown { streak, cooldown } => {
                            // The alarm: this modem fails while the others send.
                            error!(modem = %name, error = %error, streak, ?cooldown, "modem failed {streak} submits in a row while other modems send; taken out of use");
                        }
                        Verdict::Counted if class_cooldown.is_some() => {
                            warn!(modem = %name, error = %error, cooldown = ?inner.cooldown, "modem failed; using the others meanwhile");
                        }
                        Verdict::Counted => {
                            debug!(modem = %name, error = %error, "submit failed");
                        }
                    }
                    reservation.finish(used);
                    let nothing_sent = !error.maybe_sent && error.parts_sent == 0;
                    let seen_elsewhere = failed
                        .iter()
                        .any(|(m, e)| *m != name && e.kind == error.kind);
                    if nothing_sent && !error.class.is_message_level() && !seen_elsewhere {
                        tried.push(index);
                        failed.push((name, error));
                        continue;
                    }
                    return Err(PoolError::Submit {
                        modem: name,
                        error,
                        earlier: failed,
                    });
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
    fn an_unlimited_minute_keeps_no_record_of_what_was_sent() {
        // The soak found the record growing by 16 bytes per SMS part, forever, on modems
        // without a per-minute budget (the default).
        let t0 = Instant::now();
        let mut s = Selector::new([pacing(0, 0)]);
        for n in 0..10_000u64 {
            let now = t0 + Duration::from_millis(n);
            assert_eq!(s.pick(now, day(1), 3, &[true], &[], &[]), Pick::Use(0));
            s.finish(0, 3, 2);
        }
        assert_eq!(s.slots[0].minute.len(), 0);
        assert!(s.slots[0].minute.capacity() < 16);
        // With a budget the record holds what the rolling minute still counts.
        let mut s = Selector::new([pacing(100, 0)]);
        for n in 0..1_000u64 {
            let now = t0 + Duration::from_secs(n);
            assert_eq!(s.pick(now, day(1), 1, &[true], &[], &[]), Pick::Use(0));
            s.finish(0, 1, 1);
        }
        assert!(s.slots[0].minute.len() <= 61, "{}", s.slots[0].minute.len());
    }

    #[test]
    fn per_minute_budget_is_a_rolling_window() {
        let t0 = Instant::now();
        let mut s = Selector::new([pacing(2, 0)]);
        assert_eq!(s.pick(t0, day(1), 1, ALL, &[], &[]), Pick::Use(0));
        // busy until finished
        assert_eq!(s.pick(t0, day(1), 1, ALL, &[], &[]), Pick::Unavailable);
        s.finish(0, 1, 1);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(s.pick(t1, day(1), 1, ALL, &[], &[]), Pick::Use(0));
        s.finish(0, 1, 1);
        // third in the same minute waits for the first to age out
        assert_eq!(
            s.pick(t1, day(1), 1, ALL, &[], &[]),
            Pick::WaitUntil(t0 + MINUTE)
        );
        assert_eq!(s.pick(t0 + MINUTE, day(1), 1, ALL, &[], &[]), Pick::Use(0));
        s.finish(0, 1, 1);
        // a two-part message needs two free slots: both t1 and t0+60 must age out
        let t2 = t0 + MINUTE + Duration::from_secs(1);
        assert_eq!(
            s.pick(t2, day(1), 2, ALL, &[], &[]),
            Pick::WaitUntil(t0 + MINUTE + MINUTE)
        );
        // a message larger than the whole budget goes once the window is empty
        let mut s = Selector::new([pacing(2, 0)]);
        assert_eq!(s.pick(t0, day(1), 5, ALL, &[], &[]), Pick::Use(0));
        s.finish(0, 5, 5);
        assert_eq!(
            s.pick(t0, day(1), 1, ALL, &[], &[]),
            Pick::WaitUntil(t0 + MINUTE)
        );
    }

    #[test]
    fn per_day_budget_resets_on_a_new_local_day() {
        let t0 = Instant::now();
        let mut s = Selector::new([pacing(0, 3)]);
        for k in 0..3 {
            let t = t0 + Duration::from_secs(k);
            assert_eq!(s.pick(t, day(1), 1, ALL, &[], &[]), Pick::Use(0));
            s.finish(0, 1, 1);
        }
        assert_eq!(s.pick(t0, day(1), 1, ALL, &[], &[]), Pick::WaitNextDay);
        assert_eq!(s.pick(t0, day(2), 1, ALL, &[], &[]), Pick::Use(0));
        s.finish(0, 1, 1);
        // parts count: 2 of the remaining 2
        assert_eq!(s.pick(t0, day(2), 2, ALL, &[], &[]), Pick::Use(0));
        s.finish(0, 2, 2);
        assert_eq!(s.pick(t0, day(2), 1, ALL, &[], &[]), Pick::WaitNextDay);
    }

    #[test]
    fn unused_budget_is_given_back() {
        let t0 = Instant::now();
        let mut s = Selector::new([pacing(2, 2)]);
        assert_eq!(s.pick(t0, day(1), 2, ALL, &[], &[]), Pick::Use(0));
        s.finish(0, 2, 0); // the modem failed before sending anything
        assert_eq!(s.pick(t0, day(1), 2, ALL, &[], &[]), Pick::Use(0));
        s.finish(0, 2, 1); // one part went out
        assert_eq!(s.pick(t0, day(1), 1, ALL, &[], &[]), Pick::Use(0));
        s.finish(0, 1, 1);
        assert_eq!(s.pick(t0, day(1), 1, ALL, &[], &[]), Pick::WaitNextDay);
    }

    #[test]
    fn least_recently_used_and_pacing_spread_the_load() {
        let t0 = Instant::now();
        let mut s = Selector::new([pacing(0, 0), pacing(0, 0), pacing(1, 0)]);
        let mut order = Vec::new();
        for k in 0..6 {
            let t = t0 + Duration::from_millis(k);
            match s.pick(t, day(1), 1, ALL, &[], &[]) {
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
        assert_eq!(
            s.pick(t0, day(1), 1, &[false, true], &[], &[]),
            Pick::Use(1)
        );
        s.finish(1, 1, 1);
        assert_eq!(
            s.pick(t0, day(1), 1, &[true, true], &[0], &[]),
            Pick::Use(1)
        );
        // modem 1 busy, modem 0 excluded: nothing
        assert_eq!(
            s.pick(t0, day(1), 1, &[true, true], &[0], &[]),
            Pick::Unavailable
        );
        s.finish(1, 1, 1);
        s.cool_down(0, t0 + Duration::from_secs(30), 1);
        s.observe(0, 1); // not re-initialised yet: still cooling
        assert!(s.is_cooling(0, t0));
        assert_eq!(
            s.pick(t0, day(1), 1, &[true, false], &[], &[]),
            Pick::WaitUntil(t0 + Duration::from_secs(30))
        );
        assert_eq!(s.pick(t0, day(1), 1, &[true, true], &[], &[]), Pick::Use(1));
        s.finish(1, 1, 1);
        let later = t0 + Duration::from_secs(30);
        assert!(!s.is_cooling(0, later));
        assert_eq!(
            s.pick(later, day(1), 1, &[true, true], &[], &[]),
            Pick::Use(0)
        );
        s.finish(0, 1, 1);
        // a re-initialisation ends the cool-down early
        s.cool_down(0, later + Duration::from_secs(60), 1);
        assert!(s.is_cooling(0, later));
        s.observe(0, 2);
        assert!(!s.is_cooling(0, later));
        // short ready slice: missing entries count as not ready
        let mut s = Selector::new([pacing(0, 0)]);
        assert_eq!(s.pick(t0, day(1), 1, &[], &[], &[]), Pick::Unavailable);
    }

    #[test]
    fn pool_errors_map_to_sink_failures() {
        let e = PoolError::Submit {
            modem: "m".into(),
            error: SubmitError::new(SubmitErrorKind::Cms(21), 0, false),
            earlier: Vec::new(),
        };
        assert_eq!(e.class(), ErrorClass::Permanent);
        let f = e.into_sink_failure();
        assert!(!f.no_modem && !f.maybe_sent);
        let e = PoolError::Submit {
            modem: "m".into(),
            error: SubmitError::new(SubmitErrorKind::Timeout, 0, true),
            earlier: Vec::new(),
        };
        assert!(e.maybe_sent());
        let e = PoolError::NoModem {
            waited: Duration::ZERO,
            last: None,
            failed: Vec::new(),
        };
        let f = e.into_sink_failure();
        assert!(f.no_modem);
        assert_eq!(f.class, ErrorClass::Transient);
    }

    fn pol() -> HealthPolicy {
        HealthPolicy {
            streak: 3,
            base: Duration::from_secs(30),
            max: Duration::from_secs(100),
        }
    }

    /// Picks for one message at `t` and reports `ok` for the modem picked.
    fn send(s: &mut Selector, t: Instant, ok: bool) -> (usize, Verdict) {
        let Pick::Use(i) = s.pick(t, day(1), 1, ALL, &[], &[]) else {
            panic!("nothing picked at {t:?}");
        };
        s.finish(i, 1, u32::from(ok));
        if ok {
            s.succeeded(i, t);
            (i, Verdict::Counted)
        } else {
            (i, s.failed(i, t, None))
        }
    }

    #[test]
    fn a_run_of_failures_while_others_succeed_cools_down_with_growing_backoff() {
        let t0 = Instant::now();
        let mut s = Selector::with_health([pacing(0, 0), pacing(0, 0)], pol());
        let at = |k: u64| t0 + Duration::from_secs(k);
        // m1 succeeds, m0 fails whatever it gets (any class: no class cool-down here)
        assert_eq!(s.pick(at(0), day(1), 1, ALL, &[], &[]), Pick::Use(0));
        s.finish(0, 1, 0);
        assert_eq!(s.failed(0, at(0), None), Verdict::Counted);
        assert_eq!(s.pick(at(0), day(1), 1, ALL, &[], &[]), Pick::Use(1));
        s.finish(1, 1, 1);
        s.succeeded(1, at(1));
        assert_eq!(s.failed(0, at(2), None), Verdict::Counted);
        assert!(!s.health(0, at(2)).alarm);
        assert_eq!(
            s.failed(0, at(3), None),
            Verdict::CooledDown {
                streak: 3,
                cooldown: Duration::from_secs(30)
            }
        );
        let h = s.health(0, at(3));
        assert!(
            h.alarm && h.cooling_down_s == 30 && h.escalation == 1,
            "{h:?}"
        );
        // out of use: everything goes to m1 (and waits for it), however long m0 was idle
        for k in 4..33 {
            assert_eq!(send(&mut s, at(k), true).0, 1);
        }
        // a re-init does not end an escalated cool-down
        s.observe(0, 99);
        assert!(s.is_cooling(0, at(32)));
        // back after 30 s: one failure is enough now, and the wait doubles, up to the max
        assert_eq!(
            send(&mut s, at(33), false),
            (
                0,
                Verdict::CooledDown {
                    streak: 4,
                    cooldown: Duration::from_secs(60)
                }
            )
        );
        s.succeeded(1, at(34));
        assert!(s.is_cooling(0, at(92)));
        assert_eq!(s.pick(at(92), day(1), 1, ALL, &[], &[]), Pick::Use(1));
        s.finish(1, 1, 1);
        s.succeeded(1, at(93));
        assert_eq!(
            send(&mut s, at(94), false),
            (
                0,
                Verdict::CooledDown {
                    streak: 5,
                    cooldown: Duration::from_secs(100)
                }
            )
        );
        // a success clears the alarm and the escalation
        assert_eq!(
            s.pick(at(194), day(1), 1, &[true, false], &[], &[]),
            Pick::Use(0)
        );
        s.finish(0, 1, 1);
        assert!(s.succeeded(0, at(194)));
        assert_eq!(s.health(0, at(194)), ModemHealth::default());
        assert!(!s.succeeded(0, at(195)), "no alarm to clear");
    }

    #[test]
    fn failures_everywhere_cool_nothing_down() {
        // a network outage or a run of poison messages: no modem is better than another
        let t0 = Instant::now();
        let mut s = Selector::with_health([pacing(0, 0), pacing(0, 0), pacing(0, 0)], pol());
        for k in 0..30 {
            let (_, v) = send(&mut s, t0 + Duration::from_secs(k), false);
            assert_eq!(v, Verdict::Counted);
        }
        assert!((0..3).all(|i| !s.is_cooling(i, t0) && s.health(i, t0).failure_streak == 10));
        // successes before the run began do not count as "others succeed"
        let mut s = Selector::with_health([pacing(0, 0), pacing(0, 0)], pol());
        s.succeeded(1, t0);
        for k in 1..5 {
            assert_eq!(
                s.failed(0, t0 + Duration::from_secs(k), None),
                Verdict::Counted
            );
        }
    }

    #[test]
    fn a_class_cool_down_ends_with_a_re_init_an_escalated_one_does_not() {
        let t0 = Instant::now();
        let mut s = Selector::with_health([pacing(0, 0), pacing(0, 0)], pol());
        s.succeeded(1, t0);
        let class = Some((Duration::from_secs(60), 1));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(s.failed(0, t1, class), Verdict::Counted);
        assert!(s.is_cooling(0, t1));
        s.observe(0, 2);
        assert!(!s.is_cooling(0, t1), "re-initialised since");
        s.failed(0, t1, class);
        s.succeeded(1, t1);
        let v = s.failed(0, t1, class);
        assert!(matches!(v, Verdict::CooledDown { streak: 3, .. }), "{v:?}");
        s.observe(0, 5);
        // the longer of the two cool-downs stands, and a re-init does not end it
        assert!(s.is_cooling(0, t1 + Duration::from_secs(59)));
        assert_eq!(s.health(0, t1).cooling_down_s, 60);
    }

    #[test]
    fn retries_prefer_another_modem() {
        let t0 = Instant::now();
        let mut s = Selector::new([pacing(0, 0), pacing(0, 0), pacing(1, 0)]);
        // modem 0 is least recently used, but avoided
        assert_eq!(s.pick(t0, day(1), 1, ALL, &[], &[0]), Pick::Use(1));
        // modem 1 is busy, modem 2 is free: 2
        assert_eq!(s.pick(t0, day(1), 1, ALL, &[], &[0]), Pick::Use(2));
        s.finish(2, 1, 1);
        // modem 1 busy, modem 2 paced out for the minute: wait for them rather than use 0
        assert_eq!(
            s.pick(t0, day(1), 1, ALL, &[], &[0]),
            Pick::WaitUntil(t0 + MINUTE)
        );
        s.finish(1, 1, 1);
        // when the others are down, the avoided modem is used after all
        assert_eq!(
            s.pick(t0, day(1), 1, &[true, false, false], &[], &[0]),
            Pick::Use(0)
        );
        s.finish(0, 1, 1);
        // ... and when every other one is avoided too
        assert!(matches!(
            s.pick(t0, day(1), 1, ALL, &[2], &[0, 1]),
            Pick::Use(0 | 1)
        ));
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
        // a was used last, so b goes first now; a transient failure may be b's alone, so a
        // is tried too, and the same failure on both goes back to the caller
        let e = pool.submit(msg("y"), WAIT).await.unwrap_err();
        assert_eq!(e.class(), ErrorClass::Transient);
        assert!(
            matches!(&e, PoolError::Submit { modem, earlier, .. }
                if modem == "a" && earlier.len() == 1 && earlier[0].0 == "b"),
            "{e:?}"
        );
        assert_eq!(e.failures().len(), 2);
        // a different failure on the second modem is not the message's: it goes out
        sa.inject(Fault::CmsError(500));
        sb.inject(Fault::PlainError);
        let e = pool.submit(msg("z"), WAIT).await.unwrap_err();
        assert!(
            matches!(&e, PoolError::NoModem { failed, .. } if failed.len() == 2),
            "{e:?}"
        );
        assert_eq!(pool.submit(msg("z"), WAIT).await.unwrap().modem, "b");
    }

    #[tokio::test]
    async fn a_modem_failing_every_submit_is_cooled_down_and_the_others_send() {
        let sims: Vec<SimModem> = (0..3)
            .map(|_| SimModem::spawn(SimOptions::default()).unwrap())
            .collect();
        let mut modems = Vec::new();
        for (i, s) in sims.iter().enumerate() {
            modems.push((modem(&format!("m{i}"), s).await, Pacing::default()));
        }
        let pool = Pool::new(modems);
        sims[0].inject(Fault::BrokenFrom {
            from: 2,
            how: crate::sim::Broken::Cms(500),
        });
        let mut by_modem = std::collections::BTreeMap::<String, usize>::new();
        for i in 0..30 {
            let r = pool.submit(msg(&format!("n{i}")), WAIT).await.unwrap();
            *by_modem.entry(r.modem).or_default() += 1;
        }
        // every message went out; m0 sent its first and then failed 3 in a row (each sent
        // through another modem at once), and was taken out of use
        assert_eq!(by_modem.values().sum::<usize>(), 30);
        assert_eq!(sims[0].received().len(), 1);
        assert_eq!(sims[0].submits(), 4, "{by_modem:?}");
        let h = pool.health();
        assert!(h[0].health.alarm && h[0].health.cooling_down_s > 0, "{h:?}");
        assert_eq!(h[0].health.failure_streak, 3);
        assert!(!h[1].health.alarm && h[1].health.failure_streak == 0);
        // a modem avoided for a message is not used while another can take it
        let r = pool
            .submit_avoiding(msg("x"), WAIT, &["m1".to_string()])
            .await
            .unwrap();
        assert_eq!(r.modem, "m2");
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
