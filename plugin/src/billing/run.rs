//! The accounting run (`mailbell billing run`, and the daemon's nightly schedule): consumes a
//! period's delivery records and retrieval meter records, prices them with the tariffs,
//! posts the charges, and moves accounts between normal and arrears (docs/billing.md, "The
//! accounting run").
//!
//! The seed's model (`charge = "at-retrieval"`): traffic delivered to a user is charged at
//! the user's next retrieval (a successful POP3/IMAP login through the proxy), recorded with
//! that retrieval's time and client address; traffic not retrieved by the end of the period
//! is left *pending* (a two-phase transfer) and posted at a later retrieval, or expired
//! (voided or charged) after `pending_expiry_days`.
//!
//! Exactly once: a run fixes its inputs when it starts (record id ranges, tariffs, the
//! entry head: [`RunPlan`]), every posting has a key derived from what it charges, and the
//! cursors move in the transaction that ends the run. A run that crashed is resumed by the
//! next run of the same period: what it posted replays as no-ops, the rest is posted; a
//! finished period is not run again.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{Local, NaiveDate, TimeZone};
use serde::{Deserialize, Serialize};

use super::ledger::{
    AccountRef, ChargeRow, DeliveryRow, Kind, LedgerError, LedgerStore, OpenPending, Posting,
    Request, RetrievalRow, RunFinish, RunPlan, StandingRules, Unbilled,
};
use super::money::Money;
use super::tariff::Tariffs;
use crate::meter::{Login, MeterError, MeterStore, SessionSummary};
use crate::policy::zones::Zone;

/// When delivered traffic is charged (`billing.charge`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChargeAt {
    /// At the user's next retrieval (the seed's model); pending until then.
    #[default]
    AtRetrieval,
    /// In the run that consumes the delivery.
    AtDelivery,
    /// Not the delivered traffic but the retrieved bytes, zone `retrieved`.
    RetrievedBytes,
}

/// What becomes of pending traffic never retrieved (`billing.expired_pending`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expiry {
    /// Released: never charged (the seed charges only what is retrieved).
    #[default]
    Void,
    /// Charged in full.
    Charge,
}

/// The run's settings (from `[billing]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSettings {
    pub charge: ChargeAt,
    pub pending_expiry_days: u32,
    pub expired_pending: Expiry,
    pub rules: StandingRules,
    /// Requests per ledger transaction.
    pub batch: usize,
}

/// A period: one local calendar day.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Period {
    /// `YYYY-MM-DD`.
    pub name: String,
    pub start_ms: i64,
    pub end_ms: i64,
}

impl Period {
    /// The local day `date`.
    pub fn day(date: NaiveDate) -> Result<Period, RunError> {
        let at = |d: NaiveDate| -> Result<i64, RunError> {
            let midnight = d
                .and_hms_opt(0, 0, 0)
                .ok_or(RunError::BadDate(d.to_string()))?;
            Local
                .from_local_datetime(&midnight)
                .earliest()
                .map(|t| t.timestamp_millis())
                .ok_or(RunError::BadDate(d.to_string()))
        };
        let next = date
            .succ_opt()
            .ok_or_else(|| RunError::BadDate(date.to_string()))?;
        Ok(Period {
            name: date.format("%Y-%m-%d").to_string(),
            start_ms: at(date)?,
            end_ms: at(next)?,
        })
    }

    /// An ad-hoc period ending at `now_ms` (`billing run --now`): everything recorded so far
    /// that no run has consumed. Named by its local end time; the next nightly run consumes
    /// what comes after.
    pub fn until(now_ms: i64) -> Result<Period, RunError> {
        let t = Local
            .timestamp_millis_opt(now_ms)
            .earliest()
            .ok_or_else(|| RunError::BadDate(now_ms.to_string()))?;
        Ok(Period {
            name: t.format("%Y-%m-%dT%H:%M:%S%.3f").to_string(),
            start_ms: now_ms,
            end_ms: now_ms,
        })
    }

    /// `YYYY-MM-DD`, or the local day before `now_ms` when `None`.
    pub fn parse_or_yesterday(s: Option<&str>, now_ms: i64) -> Result<Period, RunError> {
        let date = match s {
            Some(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .map_err(|_| RunError::BadDate(s.to_owned()))?,
            None => {
                let today = Local
                    .timestamp_millis_opt(now_ms)
                    .earliest()
                    .ok_or_else(|| RunError::BadDate(now_ms.to_string()))?
                    .date_naive();
                today
                    .pred_opt()
                    .ok_or_else(|| RunError::BadDate(today.to_string()))?
            }
        };
        Period::day(date)
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("{0:?} is not a date (YYYY-MM-DD)")]
    BadDate(String),
    #[error("period {period} has not ended yet (it ends at {end}); run it after that")]
    NotEnded { period: String, end: String },
    #[error("another accounting run is in progress ({holder}); lock file {path}")]
    Busy { path: String, holder: String },
    #[error("accounting run lock {path}: {op}")]
    Lock {
        path: String,
        op: &'static str,
        #[source]
        error: std::io::Error,
    },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("retrieval meter: {0}")]
    Meter(#[from] MeterError),
    #[error("cannot start the delivery scan's second thread")]
    ScanThread(#[source] std::io::Error),
    #[error("the delivery scan's second thread panicked")]
    ScanPanicked,
}

/// What a run did (printed by `billing run`, stored with the run).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSummary {
    pub period: String,
    /// The period had run before: nothing was done.
    pub already: bool,
    /// The run resumed one that had stopped.
    pub resumed: bool,
    pub deliveries: u64,
    pub delivery_bytes: u64,
    /// Successful logins through the proxy, of known accounts.
    pub retrievals: u64,
    /// Successful logins of accounts the ledger does not know (not charged).
    pub unknown_retrievals: u64,
    /// Meter records an earlier run consumed (a replayed segment): skipped.
    #[serde(default)]
    pub replayed_retrievals: u64,
    /// Charges posted at retrievals (or at delivery), and their total.
    pub charges: u64,
    pub charged: Money,
    /// Pending transfers left for traffic not yet retrieved, and their total.
    pub pending: u64,
    pub pending_amount: Money,
    /// Earlier pending transfers posted at a retrieval in this run.
    pub pending_posted: u64,
    /// Pending transfers expired (voided or charged).
    pub expired: u64,
    /// Deliveries to accounts the ledger does not know, kept as unbilled.
    pub unbilled: u64,
    /// Earlier unbilled deliveries charged now that their account exists.
    pub unbilled_billed: u64,
    /// Bytes with no tariff for their (class, zone): not charged, reported.
    pub unpriced_bytes: u64,
    pub new_entries: u64,
    pub effects: u64,
    pub millis: u64,
}

/// Reports a run's progress (a progress bar in a terminal, log lines otherwise).
pub trait Progress {
    fn stage(&self, name: &'static str, total: u64);
    fn advance(&self, n: u64);
}

/// Progress as log lines: each stage's start and end, and every tenth of a large one.
#[derive(Default)]
pub struct LogProgress {
    state: std::sync::Mutex<(&'static str, u64, u64)>,
}

impl Progress for LogProgress {
    fn stage(&self, name: &'static str, total: u64) {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *st = (name, total, 0);
        tracing::info!(stage = name, total, "accounting run stage");
    }

    fn advance(&self, n: u64) {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = st.2;
        st.2 = st.2.saturating_add(n);
        let tenth = (st.1 / 10).max(1);
        if st.1 >= 100_000 && before / tenth != st.2 / tenth {
            tracing::info!(
                stage = st.0,
                done = st.2,
                total = st.1,
                "accounting run progress"
            );
        }
    }
}

/// No progress reports.
pub struct Quiet;

impl Progress for Quiet {
    fn stage(&self, _: &'static str, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// The run lock: one run at a time per ledger, across processes (flock; released when the
/// process dies, so a killed run never blocks the next).
pub struct RunLock {
    _file: File,
}

impl RunLock {
    pub fn path(ledger: &Path) -> PathBuf {
        ledger.with_extension("run-lock")
    }

    pub fn acquire(ledger: &Path, period: &str, now_ms: i64) -> Result<RunLock, RunError> {
        let path = Self::path(ledger);
        let name = path.display().to_string();
        let err = |op| {
            let name = name.clone();
            move |error| RunError::Lock {
                path: name,
                op,
                error,
            }
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(err("open"))?;
        match fs2::FileExt::try_lock_exclusive(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == fs2::lock_contended_error().kind() => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(RunError::Busy {
                    path: name,
                    holder: holder.trim().to_owned(),
                });
            }
            Err(e) => return Err(err("lock")(e)),
        }
        file.set_len(0).map_err(err("truncate"))?;
        let stamp = chrono::DateTime::from_timestamp_millis(now_ms)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default();
        writeln!(
            file,
            "pid {} period {period} since {stamp}",
            std::process::id()
        )
        .map_err(err("write"))?;
        Ok(RunLock { _file: file })
    }
}

/// Where a run reads and writes.
pub struct RunContext<'a> {
    pub store: &'a mut dyn LedgerStore,
    /// The retrieval proxy's meter store (`None`: no proxy; no retrievals).
    pub meter: Option<&'a MeterStore>,
    /// Maps a delivery's account that is not a ledger login (`stalwart:<id>`) to one.
    pub resolve: &'a dyn Fn(&str) -> Option<String>,
    pub settings: &'a RunSettings,
    pub progress: &'a dyn Progress,
    /// The wall clock (Unix ms); used only for the run's own timestamps and the "has the
    /// period ended" check, never for what is posted.
    pub now_ms: &'a dyn Fn() -> i64,
}

/// One successful retrieval of a known user.
#[derive(Clone, Debug)]
struct Retrieval {
    meter_id: u64,
    at_ms: i64,
    client: String,
    protocol: &'static str,
    bytes: u64,
}

const ZONES: [Zone; 2] = [Zone::Free, Zone::Foreign];
/// How long the zone remembered for a Stalwart message at SMTP time is kept for its delivery
/// reports (Stalwart retries a webhook batch for far less).
const SOURCES_KEPT_MS: i64 = 30 * 86_400_000;
/// Records between progress reports.
const PAGE: u64 = 10_000;

/// Runs (or resumes, or confirms) the accounting of `period`.
pub fn run(cx: &mut RunContext<'_>, period: &Period) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let now = (cx.now_ms)();
    if period.end_ms > now {
        return Err(RunError::NotEnded {
            period: period.name.clone(),
            end: chrono::DateTime::from_timestamp_millis(period.end_ms)
                .map(|t| t.with_timezone(&Local).to_rfc3339())
                .unwrap_or_default(),
        });
    }
    let earlier = cx.store.run(&period.name)?;
    if let Some(r) = &earlier {
        if r.finished_ms.is_some() {
            let mut s: RunSummary = r
                .summary
                .clone()
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_default();
            s.already = true;
            s.period.clone_from(&period.name);
            return Ok(s);
        }
    }
    let resumed = earlier.is_some();
    let cursors = cx.store.cursors()?;
    // The meter range is fixed here (and stored with the plan); a resumed run uses its own.
    // A new run keeps the sessions it read to find the range (one pass over the meter).
    let (meter_upto, sessions) = match &earlier {
        Some(r) => (r.plan.meter_upto, None),
        None => {
            let (upto, sessions) = meter_prefix(cx.meter, cursors.meter, period.end_ms)?;
            (upto, Some(sessions))
        }
    };
    let rec = cx.store.begin_run(
        &period.name,
        period.end_ms,
        (cursors.meter, meter_upto),
        now,
    )?;
    let plan = rec.plan;
    let mut s = RunSummary {
        period: period.name.clone(),
        resumed,
        ..RunSummary::default()
    };
    // Another process may have begun the period meanwhile: its plan is the one to follow.
    let sessions =
        sessions.filter(|_| (plan.meter_after, plan.meter_upto) == (cursors.meter, meter_upto));
    let planned = build(cx, &plan, sessions, &mut s)?;
    s.millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let finish = RunFinish {
        period: plan.period.clone(),
        cursors: super::ledger::Cursors {
            deliveries: plan.deliveries_upto,
            meter: plan.meter_upto,
        },
        retrievals: planned.retrievals,
        unbilled: planned.unbilled,
        billed_unbilled: planned.billed_unbilled,
        summary: serde_json::to_value(&s).unwrap_or_default(),
        finished_ms: (cx.now_ms)().max(now),
        sources_before_ms: plan.end_ms.saturating_sub(SOURCES_KEPT_MS),
    };
    s.effects = cx.store.finish_run(&finish, &cx.settings.rules)? as u64;
    s.millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(s)
}

/// A meter record in the run's range: its id, and the session it holds (`None`: another kind).
type MeterSession = (u64, Option<SessionSummary>);

/// The last meter record id after `after` written before `end_ms` (ids follow write order;
/// the first later record ends the prefix), and the records up to it.
fn meter_prefix(
    meter: Option<&MeterStore>,
    after: u64,
    end_ms: i64,
) -> Result<(u64, Vec<MeterSession>), RunError> {
    let mut sessions = Vec::new();
    let Some(m) = meter else {
        return Ok((after, sessions));
    };
    let mut last = after;
    m.scan_sessions_timed_after(after, &mut |id, at_ms, x| {
        if at_ms >= end_ms {
            return ControlFlow::Break(());
        }
        last = id;
        sessions.push((id, x));
        ControlFlow::Continue(())
    })?;
    Ok((last, sessions))
}

/// What the end of the run stores (the postings are made while the run plans them).
struct Planned {
    retrievals: Vec<RetrievalRow>,
    unbilled: Vec<Unbilled>,
    billed_unbilled: Vec<i64>,
}

/// Bytes per user, chunk and zone. Chunk `i` of a user is the traffic delivered before the
/// user's retrieval `i` (and after retrieval `i − 1`); the last chunk is what no retrieval of
/// the period took. Flat and compact, so that adding a delivery (users in no order) touches a
/// few MB in three arrays and no per-user allocation: user `u`'s retrieval times are
/// `at[start[u] - u..start[u + 1] - u - 1]` and its chunks `chunks[start[u]..start[u + 1]]`,
/// each `[free, foreign]` holding bytes + 1 (0: nothing delivered).
struct Traffic {
    start: Vec<usize>,
    at: Vec<i64>,
    chunks: Vec<[u64; 2]>,
}

impl Traffic {
    /// `rets`: each user's retrievals, in time order.
    fn new(rets: &[Vec<Retrieval>]) -> Traffic {
        let mut start = Vec::with_capacity(rets.len() + 1);
        let mut at = Vec::new();
        let mut n = 0;
        for r in rets {
            start.push(n);
            n += r.len() + 1;
            at.extend(r.iter().map(|r| r.at_ms));
        }
        start.push(n);
        Traffic {
            start,
            at,
            chunks: vec![[0; 2]; n],
        }
    }

    fn range(&self, u: usize) -> std::ops::Range<usize> {
        self.start[u]..self.start[u + 1]
    }

    fn add(&mut self, u: usize, zone: Zone, bytes: u64, at_ms: i64) {
        let r = self.range(u);
        let chunk = self.at[r.start - u..r.end - u - 1].partition_point(|&t| t <= at_ms);
        let e = &mut self.chunks[r.start + chunk][usize::from(zone == Zone::Foreign)];
        *e = (*e).max(1).saturating_add(bytes);
    }

    /// Adds `other`'s bytes (a scan of other records for the same users and retrievals).
    fn merge(&mut self, other: &Traffic) {
        for (a, b) in self.chunks.iter_mut().zip(&other.chunks) {
            for (x, y) in a.iter_mut().zip(b) {
                // Both hold bytes + 1 when anything was delivered.
                *x = match (*x, *y) {
                    (0, v) | (v, 0) => v,
                    (x, y) => x.saturating_add(y - 1),
                };
            }
        }
    }

    fn get(&self, u: usize, chunk: usize, zone: Zone) -> Option<u64> {
        let v = self.chunks[self.range(u).start + chunk][usize::from(zone == Zone::Foreign)];
        v.checked_sub(1)
    }

    /// All of a user's traffic in `zone`.
    fn total(&self, u: usize, zone: Zone) -> u64 {
        self.chunks[self.range(u)]
            .iter()
            .map(|c| c[usize::from(zone == Zone::Foreign)].saturating_sub(1))
            .fold(0, u64::saturating_add)
    }
}

/// Delivery account numbers ([`LedgerStore::delivery_accounts`]) → the user each resolves to
/// (`NO_USER`: none), in an array indexed by number (numbers are SQLite row ids, given in
/// order from 1).
struct AccountNumbers {
    users: Vec<u32>,
}

const NO_USER: u32 = u32::MAX;

impl AccountNumbers {
    fn new(accounts: Vec<(i64, String)>, user_of: &dyn Fn(&str) -> Option<usize>) -> Self {
        // Numbers far past the count would make a sparse array: then none are used (every
        // record is resolved by its name, as before numbers).
        let dense = accounts.len().saturating_mul(2).saturating_add(1_024);
        let max = accounts.iter().map(|a| a.0).max().unwrap_or(0);
        let mut users = Vec::new();
        if usize::try_from(max).is_ok_and(|m| m < dense) {
            users = vec![NO_USER; usize::try_from(max).unwrap_or(0) + 1];
            for (no, account) in &accounts {
                let Ok(no) = usize::try_from(*no) else {
                    continue;
                };
                if let Some(u) = user_of(account).and_then(|u| u32::try_from(u).ok()) {
                    users[no] = u;
                }
            }
        }
        Self { users }
    }

    /// `Some(user)` when `no` is known: `Some(None)` for an account that is no user.
    fn get(&self, no: i64) -> Option<Option<usize>> {
        let u = *self.users.get(usize::try_from(no).ok()?)?;
        Some((u != NO_USER).then_some(u as usize))
    }
}

/// What a scan of part of the period's delivery records found.
struct Part {
    traffic: Traffic,
    /// Records whose number named no user ([`AccountNumbers`]): resolved by name after the
    /// scan, on the run's thread (the resolver is not shared with the second one).
    deferred: Vec<Unbilled>,
    deliveries: u64,
    bytes: u64,
}

impl Part {
    fn new(rets: &[Vec<Retrieval>]) -> Part {
        Part {
            traffic: Traffic::new(rets),
            deferred: Vec::new(),
            deliveries: 0,
            bytes: 0,
        }
    }

    fn add(&mut self, by_no: &AccountNumbers, d: DeliveryRow<'_>) {
        self.deliveries += 1;
        self.bytes = self.bytes.saturating_add(d.bytes);
        match d.account_no.and_then(|n| by_no.get(n)) {
            Some(Some(u)) => self.traffic.add(u, d.zone, d.bytes, d.at_ms),
            _ => self.deferred.push(Unbilled {
                delivery_id: d.id,
                period: String::new(),
                account: d.account.to_owned(),
                zone: d.zone,
                bytes: d.bytes,
                at_ms: d.at_ms,
            }),
        }
    }
}

/// Scans the plan's delivery records: the upper half of the range on a second reader and
/// thread when the store has one (the scan is the run's second largest stage and waits on
/// memory more than it computes: two cores take it in a little over half the time), the rest
/// here. The parts are in id order.
fn scan_deliveries(
    store: &dyn LedgerStore,
    progress: &dyn Progress,
    plan: &RunPlan,
    by_no: &AccountNumbers,
    rets: &[Vec<Retrieval>],
) -> Result<(Part, Option<Part>), RunError> {
    let (after, upto) = (plan.deliveries_after, plan.deliveries_upto);
    let reader = if upto - after >= 2 {
        store.delivery_reader()?
    } else {
        None
    };
    let mid = match reader {
        Some(_) => after + (upto - after) / 2,
        None => upto,
    };
    std::thread::scope(|scope| {
        let worker = match reader {
            Some(r) => Some(
                std::thread::Builder::new()
                    .name("run-deliveries".into())
                    .spawn_scoped(scope, move || -> Result<Part, LedgerError> {
                        let mut part = Part::new(rets);
                        r.scan_deliveries(mid, upto, &mut |d| part.add(by_no, d))?;
                        Ok(part)
                    })
                    .map_err(RunError::ScanThread)?,
            ),
            None => None,
        };
        let mut first = Part::new(rets);
        let mut seen = 0u64;
        store.scan_deliveries(after, mid, &mut |d| {
            first.add(by_no, d);
            seen += 1;
            if seen % 100_000 == 0 {
                progress.advance(100_000);
            }
        })?;
        progress.advance(seen % 100_000);
        let second = match worker {
            Some(h) => {
                let part = h.join().map_err(|_| RunError::ScanPanicked)??;
                progress.advance(part.deliveries);
                Some(part)
            }
            None => None,
        };
        Ok((first, second))
    })
}

/// Plans and posts the run. `sessions`: the plan's meter records when the run has read them
/// already (a new run), else they are read here.
fn build(
    cx: &mut RunContext<'_>,
    plan: &RunPlan,
    sessions: Option<Vec<MeterSession>>,
    s: &mut RunSummary,
) -> Result<Planned, RunError> {
    let users = cx.store.run_users()?;
    // Logins side by side in one string, so that the ~10 million lookups of the delivery scan
    // (users in no order) compare against a few MB rather than 200,000 scattered allocations.
    let arena: String = users.iter().map(|u| u.login.as_str()).collect();
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(users.len());
    let mut at = 0;
    for (i, u) in users.iter().enumerate() {
        let end = at + u.login.len();
        index.insert(&arena[at..end], i);
        at = end;
    }
    let tariffs = Tariffs::new(&plan.tariffs);

    // Retrievals: successful logins of known users, in time order per user.
    cx.progress.stage(
        "retrievals",
        plan.meter_upto.saturating_sub(plan.meter_after),
    );
    let mut rets: Vec<Vec<Retrieval>> = vec![Vec::new(); users.len()];
    let mut rows = Vec::new();
    let consumed = cx
        .store
        .consumed_retrievals(plan.meter_after, plan.meter_upto)?;
    let mut seen = 0u64;
    let progress = cx.progress;
    let mut take = |id: u64, x: Option<SessionSummary>| {
        seen += 1;
        if seen % PAGE == 0 {
            progress.advance(PAGE);
        }
        if consumed.contains(&id) {
            s.replayed_retrievals += 1;
            return;
        }
        let Some(x) = x else {
            return;
        };
        let (Login::Ok, Some(account)) = (x.login, x.account) else {
            return;
        };
        let login = account.to_ascii_lowercase();
        let Some(&u) = index.get(login.as_str()) else {
            s.unknown_retrievals += 1;
            return;
        };
        let protocol = match x.protocol {
            crate::meter::Protocol::Pop3 => "pop3",
            crate::meter::Protocol::Imap => "imap",
        };
        let ret = Retrieval {
            meter_id: id,
            at_ms: x.start_ms,
            client: x.client.ip().to_string(),
            protocol,
            bytes: x.message_bytes,
        };
        rows.push(RetrievalRow {
            meter_id: id,
            login,
            at_ms: x.start_ms,
            client: ret.client.clone(),
            protocol: protocol.to_owned(),
            messages: x.messages,
            bytes: x.message_bytes,
        });
        rets[u].push(ret);
        s.retrievals += 1;
    };
    match (sessions, cx.meter) {
        (Some(sessions), _) => {
            for (id, x) in sessions {
                take(id, x);
            }
        }
        (None, Some(m)) => m.scan_sessions_after(plan.meter_after, &mut |id, x| {
            if id > plan.meter_upto {
                return ControlFlow::Break(());
            }
            take(id, x);
            ControlFlow::Continue(())
        })?,
        (None, None) => {}
    }
    progress.advance(seen % PAGE);
    for r in &mut rets {
        r.sort_by_key(|r| (r.at_ms, r.meter_id));
    }

    // Deliveries: earlier unbilled ones whose account now exists, then the period's.
    let mut traffic = Traffic::new(&rets);
    let mut unbilled = Vec::new();
    let mut billed_unbilled = Vec::new();
    let user_of = |account: &str| -> Option<usize> {
        index
            .get(account)
            .copied()
            .or_else(|| (cx.resolve)(account).and_then(|l| index.get(l.as_str()).copied()))
    };
    for d in cx.store.unbilled(Some(&plan.period))? {
        if let Some(u) = user_of(&d.account) {
            traffic.add(u, d.zone, d.bytes, d.at_ms);
            billed_unbilled.push(d.delivery_id);
            s.unbilled_billed += 1;
        }
    }
    cx.progress.stage(
        "deliveries",
        u64::try_from(plan.deliveries_upto - plan.deliveries_after).unwrap_or(0),
    );
    // Each delivery account resolved once, by its number: the scan then finds a record's user
    // in a small array instead of hashing and comparing its name ~10 million times.
    let by_no = AccountNumbers::new(cx.store.delivery_accounts()?, &user_of);
    let (first, second) = scan_deliveries(&*cx.store, cx.progress, plan, &by_no, &rets)?;
    // Records the numbers did not resolve (from before numbers, or to no user), in id order.
    let mut deferred = first.deferred;
    s.deliveries = first.deliveries;
    s.delivery_bytes = first.bytes;
    traffic.merge(&first.traffic);
    if let Some(second) = second {
        traffic.merge(&second.traffic);
        deferred.extend(second.deferred);
        s.deliveries += second.deliveries;
        s.delivery_bytes = s.delivery_bytes.saturating_add(second.bytes);
    }
    for d in deferred {
        match user_of(&d.account) {
            Some(u) => traffic.add(u, d.zone, d.bytes, d.at_ms),
            None => unbilled.push(Unbilled {
                period: plan.period.clone(),
                ..d
            }),
        }
    }
    s.unbilled = unbilled.len() as u64;

    // Pending transfers left open by earlier runs, per user.
    let mut open: Vec<Vec<OpenPending>> = vec![Vec::new(); users.len()];
    for p in cx.store.open_pending_at(plan.start_head)? {
        if let Some(&u) = index.get(p.login.as_str()) {
            open[u].push(p);
        }
    }

    // Postings are made as users are planned, `batch` per transaction: the night's postings
    // are never all in memory at once.
    cx.progress.stage("posting", users.len() as u64);
    let mut out = Vec::new();
    let expire_before = plan
        .end_ms
        .saturating_sub(i64::from(cx.settings.pending_expiry_days) * 86_400_000);
    let last_ms = plan.end_ms - 1;
    for (u, user) in users.iter().enumerate() {
        let mut p = UserPlan {
            login: &user.login,
            class: &user.class,
            tariffs: &tariffs,
            out: &mut out,
            s: &mut *s,
        };
        match cx.settings.charge {
            ChargeAt::AtRetrieval => {
                for (i, r) in rets[u].iter().enumerate() {
                    if i == 0 {
                        for o in &open[u] {
                            p.post_pending(o, r);
                        }
                    }
                    for zone in ZONES {
                        if let Some(b) = traffic.get(u, i, zone) {
                            p.charge(
                                zone.as_str(),
                                b,
                                Some(r),
                                &format!("charge:{}:{}", r.meter_id, zone.as_str()),
                            )?;
                        }
                    }
                }
                let last = rets[u].len();
                for zone in ZONES {
                    if let Some(b) = traffic.get(u, last, zone) {
                        p.pending(zone.as_str(), b, &plan.period, last_ms)?;
                    }
                }
                if rets[u].is_empty() {
                    for o in open[u].iter().filter(|o| o.at_ms < expire_before) {
                        p.expire(o, cx.settings.expired_pending, last_ms);
                    }
                }
            }
            ChargeAt::AtDelivery | ChargeAt::RetrievedBytes => {
                for o in &open[u] {
                    p.expire(o, Expiry::Charge, last_ms);
                }
                if cx.settings.charge == ChargeAt::AtDelivery {
                    for zone in ZONES {
                        let b = traffic.total(u, zone);
                        if b > 0 {
                            let key =
                                format!("charge:{}:{}:{}", plan.period, user.login, zone.as_str());
                            p.charge_at(zone.as_str(), b, None, last_ms, &key)?;
                        }
                    }
                } else {
                    for r in &rets[u] {
                        p.charge(
                            RETRIEVED,
                            r.bytes,
                            Some(r),
                            &format!("charge:{}:{RETRIEVED}", r.meter_id),
                        )?;
                    }
                }
            }
        }
        post_ready(cx, &plan.period, &mut out, false, s)?;
        if (u + 1) % 1_000 == 0 {
            cx.progress.advance(1_000);
        }
    }
    post_ready(cx, &plan.period, &mut out, true, s)?;
    cx.progress.advance(users.len() as u64 % 1_000);
    Ok(Planned {
        retrievals: rows,
        unbilled,
        billed_unbilled,
    })
}

/// Posts the whole batches of `out` (and, when `all`, the rest), in order, one transaction
/// each; keeps what is left for the next call.
fn post_ready(
    cx: &mut RunContext<'_>,
    period: &str,
    out: &mut Vec<(Option<Request>, Option<ChargeRow>)>,
    all: bool,
    s: &mut RunSummary,
) -> Result<(), RunError> {
    let batch = cx.settings.batch.max(1);
    let mut done = 0;
    while out.len() - done >= batch || (all && done < out.len()) {
        let end = (done + batch).min(out.len());
        s.new_entries += cx.store.post_charges(period, &out[done..end])? as u64;
        done = end;
    }
    out.drain(..done);
    Ok(())
}

/// The tariff zone of retrieved bytes (`charge = "retrieved-bytes"`).
pub const RETRIEVED: &str = "retrieved";

struct UserPlan<'a> {
    login: &'a str,
    class: &'a str,
    tariffs: &'a Tariffs,
    out: &'a mut Vec<(Option<Request>, Option<ChargeRow>)>,
    s: &'a mut RunSummary,
}

impl UserPlan<'_> {
    fn price(&mut self, zone: &str, bytes: u64) -> Result<Option<Money>, RunError> {
        match self.tariffs.charge(self.class, zone, bytes) {
            Some(m) => Ok(Some(m.map_err(LedgerError::from)?)),
            None => {
                self.s.unpriced_bytes = self.s.unpriced_bytes.saturating_add(bytes);
                Ok(None)
            }
        }
    }

    fn transfer(&self, zone: &str, amount: Money, pending: bool) -> Posting {
        Posting::Transfer {
            kind: Kind::Charge,
            debit: AccountRef::User(self.login.to_owned()),
            credit: AccountRef::Revenue(zone.to_owned()),
            amount,
            pending,
        }
    }

    fn charge(
        &mut self,
        zone: &str,
        bytes: u64,
        r: Option<&Retrieval>,
        key: &str,
    ) -> Result<(), RunError> {
        let at = r.map_or(0, |r| r.at_ms);
        self.charge_at(zone, bytes, r, at, key)
    }

    fn charge_at(
        &mut self,
        zone: &str,
        bytes: u64,
        r: Option<&Retrieval>,
        at_ms: i64,
        key: &str,
    ) -> Result<(), RunError> {
        let Some(amount) = self.price(zone, bytes)? else {
            return Ok(());
        };
        let memo = match r {
            Some(r) => format!(
                "{bytes} bytes {zone}, {} retrieval {} from {}",
                r.protocol, r.meter_id, r.client
            ),
            None => format!("{bytes} bytes {zone}"),
        };
        let req = amount.is_positive().then(|| {
            self.s.charges += 1;
            self.s.charged = self.s.charged.checked_add(amount).unwrap_or(self.s.charged);
            Request {
                key: key.to_owned(),
                posting: self.transfer(zone, amount, false),
                memo,
                at_ms,
            }
        });
        let row = ChargeRow {
            key: key.to_owned(),
            login: self.login.to_owned(),
            zone: zone.to_owned(),
            bytes,
            amount,
            meter_id: r.map(|r| r.meter_id),
            at_ms,
        };
        self.out.push((req, Some(row)));
        Ok(())
    }

    fn pending(
        &mut self,
        zone: &str,
        bytes: u64,
        period: &str,
        at_ms: i64,
    ) -> Result<(), RunError> {
        let Some(amount) = self.price(zone, bytes)? else {
            return Ok(());
        };
        let key = format!("pending:{period}:{}:{zone}", self.login);
        let req = amount.is_positive().then(|| {
            self.s.pending += 1;
            self.s.pending_amount = self
                .s
                .pending_amount
                .checked_add(amount)
                .unwrap_or(self.s.pending_amount);
            Request {
                key: key.clone(),
                posting: self.transfer(zone, amount, true),
                memo: format!("{bytes} bytes {zone} delivered, not yet retrieved"),
                at_ms,
            }
        });
        let row = ChargeRow {
            key,
            login: self.login.to_owned(),
            zone: zone.to_owned(),
            bytes,
            amount,
            meter_id: None,
            at_ms,
        };
        self.out.push((req, Some(row)));
        Ok(())
    }

    fn post_pending(&mut self, o: &OpenPending, r: &Retrieval) {
        self.s.pending_posted += 1;
        self.s.charges += 1;
        self.s.charged = self
            .s
            .charged
            .checked_add(o.amount)
            .unwrap_or(self.s.charged);
        let key = format!("post:{}", o.entry_id);
        self.out.push((
            Some(Request {
                key: key.clone(),
                posting: Posting::PostPending {
                    pending_id: o.entry_id,
                    amount: None,
                },
                memo: format!(
                    "{} bytes {}, {} retrieval {} from {}",
                    o.bytes, o.zone, r.protocol, r.meter_id, r.client
                ),
                at_ms: r.at_ms,
            }),
            Some(ChargeRow {
                key,
                login: self.login.to_owned(),
                zone: o.zone.clone(),
                bytes: o.bytes,
                amount: o.amount,
                meter_id: Some(r.meter_id),
                at_ms: r.at_ms,
            }),
        ));
    }

    fn expire(&mut self, o: &OpenPending, how: Expiry, at_ms: i64) {
        self.s.expired += 1;
        let key = format!("expire:{}", o.entry_id);
        let (posting, memo) = match how {
            Expiry::Void => (
                Posting::VoidPending {
                    pending_id: o.entry_id,
                },
                format!("{} bytes {} never retrieved: voided", o.bytes, o.zone),
            ),
            Expiry::Charge => (
                Posting::PostPending {
                    pending_id: o.entry_id,
                    amount: None,
                },
                format!("{} bytes {} never retrieved: charged", o.bytes, o.zone),
            ),
        };
        self.out.push((
            Some(Request {
                key,
                posting,
                memo,
                at_ms,
            }),
            None,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ret(at_ms: i64) -> Retrieval {
        Retrieval {
            meter_id: 1,
            at_ms,
            client: String::new(),
            protocol: "pop3",
            bytes: 0,
        }
    }

    /// Two parts of a scan merged hold what one scan of all the records holds, including a
    /// delivery of 0 bytes (something delivered, nothing to charge) and saturation.
    #[test]
    fn traffic_scanned_in_parts_merges_to_the_whole() {
        let rets = vec![vec![ret(100)], vec![], vec![ret(5), ret(50)]];
        let deliveries = [
            (0, Zone::Foreign, 7, 99),
            (0, Zone::Foreign, 0, 101),
            (1, Zone::Free, u64::MAX - 1, 1),
            (2, Zone::Free, 3, 60),
            (1, Zone::Free, 5, 2),
            (2, Zone::Foreign, 4, 5),
            (0, Zone::Free, 0, 100),
        ];
        let mut whole = Traffic::new(&rets);
        for &(u, z, b, at) in &deliveries {
            whole.add(u, z, b, at);
        }
        for split in 0..=deliveries.len() {
            let (mut a, mut b) = (Traffic::new(&rets), Traffic::new(&rets));
            for &(u, z, by, at) in &deliveries[..split] {
                a.add(u, z, by, at);
            }
            for &(u, z, by, at) in &deliveries[split..] {
                b.add(u, z, by, at);
            }
            let mut merged = Traffic::new(&rets);
            merged.merge(&a);
            merged.merge(&b);
            assert_eq!(merged.chunks, whole.chunks, "split at {split}");
        }
        assert_eq!(whole.get(0, 0, Zone::Foreign), Some(7));
        assert_eq!(whole.get(0, 1, Zone::Foreign), Some(0));
        assert_eq!(whole.get(0, 1, Zone::Free), Some(0));
        assert_eq!(whole.get(0, 0, Zone::Free), None);
        assert_eq!(whole.get(1, 0, Zone::Free), Some(u64::MAX - 1));
        assert_eq!(whole.get(2, 2, Zone::Free), Some(3));
        assert_eq!(whole.get(2, 1, Zone::Foreign), Some(4));
    }
}
