//! What the accounting run keeps in the ledger file beside the entries (docs/billing.md,
//! "The accounting run"):
//!
//! ```text
//! cursors(name PRIMARY KEY, value)         'deliveries': last delivery id consumed,
//!                                          'meter': last retrieval meter record id consumed
//! runs(period PRIMARY KEY, plan, started_ms, finished_ms, summary)
//!      plan: what the run works from, fixed when it starts (JSON RunPlan), so a run that
//!      crashed resumes with the same inputs
//! charges(key PRIMARY KEY, period, login, zone, bytes, amount, meter_id, entry_id, at_ms)
//!      traffic priced by a run: at a retrieval (meter_id), left pending, posted or expired
//! retrievals(meter_id PRIMARY KEY, period, login, at_ms, client, protocol, messages, bytes)
//! unbilled(delivery_id PRIMARY KEY, period, account, zone, bytes, at_ms, written_off_ms, by)
//!      deliveries to an account the ledger does not know, kept until it does or an operator
//!      writes them off
//! warnings(login PRIMARY KEY, warned_below)   the lowest threshold a warning went out for
//! effects(id, period, login, kind, status, balance, threshold, at_ms, done_ms)
//!      what a run decided that happens outside the ledger (registry state, SMS): done_ms
//!      is set once it did, so a crash in between repeats it, never loses it
//! ```

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

use super::deliveries::zone_of;
use super::{Status, Tariff};
use crate::billing::money::Money;
use crate::policy::zones::Zone;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cursors (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    period TEXT PRIMARY KEY,
    plan TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS charges (
    key TEXT PRIMARY KEY,
    period TEXT NOT NULL,
    login TEXT NOT NULL,
    zone TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    meter_id INTEGER,
    entry_id INTEGER,
    at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_login ON charges(login, at_ms);
DROP INDEX IF EXISTS charges_entry;
CREATE TABLE IF NOT EXISTS retrievals (
    meter_id INTEGER PRIMARY KEY,
    period TEXT NOT NULL,
    login TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    client TEXT NOT NULL,
    protocol TEXT NOT NULL,
    messages INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS retrievals_login ON retrievals(login, at_ms);
CREATE TABLE IF NOT EXISTS unbilled (
    delivery_id INTEGER PRIMARY KEY,
    period TEXT NOT NULL,
    account TEXT NOT NULL,
    zone TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    written_off_ms INTEGER,
    written_off_by TEXT
);
CREATE TABLE IF NOT EXISTS warnings (
    login TEXT PRIMARY KEY,
    warned_below INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS effects (
    id INTEGER PRIMARY KEY,
    period TEXT NOT NULL,
    login TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    balance INTEGER NOT NULL,
    threshold INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    done_ms INTEGER,
    UNIQUE (period, login, kind, threshold)
);
CREATE INDEX IF NOT EXISTS effects_open ON effects(id) WHERE done_ms IS NULL;
";

/// What a run works from, fixed when it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunPlan {
    pub period: String,
    /// The period's end (Unix ms, exclusive): records from before it are consumed.
    pub end_ms: i64,
    /// The last entry when the run started: pending transfers open at that point are the
    /// ones this run may post or expire.
    pub start_head: i64,
    /// Delivery ids in `(deliveries_after, deliveries_upto]` are this run's.
    pub deliveries_after: i64,
    pub deliveries_upto: i64,
    /// Retrieval meter record ids in `(meter_after, meter_upto]` are this run's.
    pub meter_after: u64,
    pub meter_upto: u64,
    /// The tariffs in force when the run started.
    pub tariffs: Vec<Tariff>,
}

/// A run's row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub plan: RunPlan,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    /// The finished run's figures (JSON), for `billing run` to print again.
    pub summary: Option<serde_json::Value>,
}

/// Where the last finished run stopped reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursors {
    pub deliveries: i64,
    pub meter: u64,
}

/// A pending transfer a run left open, with the traffic it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenPending {
    pub entry_id: i64,
    pub login: String,
    pub zone: String,
    pub bytes: u64,
    pub amount: Money,
    pub at_ms: i64,
}

/// A user as the run sees one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunUser {
    pub login: String,
    pub class: String,
    pub status: Status,
}

/// A delivery to an account the ledger does not know.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unbilled {
    pub delivery_id: i64,
    pub period: String,
    pub account: String,
    pub zone: Zone,
    pub bytes: u64,
    pub at_ms: i64,
}

/// Traffic a run priced: stored beside the entry that charged it (if any).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeRow {
    pub key: String,
    pub login: String,
    pub zone: String,
    pub bytes: u64,
    pub amount: Money,
    /// The retrieval it was charged at.
    pub meter_id: Option<u64>,
    pub at_ms: i64,
}

/// A retrieval (successful POP3/IMAP login through the proxy), as statements list it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetrievalRow {
    pub meter_id: u64,
    pub login: String,
    pub at_ms: i64,
    pub client: String,
    pub protocol: String,
    pub messages: u64,
    pub bytes: u64,
}

/// Something a run decided that happens outside the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effect {
    pub id: i64,
    pub period: String,
    pub login: String,
    pub kind: EffectKind,
    /// The account's status after the run.
    pub status: Status,
    /// The available balance that caused it.
    pub balance: Money,
    /// For a warning: the threshold crossed.
    pub threshold: Money,
    pub at_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EffectKind {
    /// The registry's state must become `status` (the proxy enforces it at once).
    State,
    /// The user entered arrears: an SMS.
    Arrears,
    /// The balance fell below a warning threshold: an SMS.
    Warning,
}

impl EffectKind {
    fn as_str(self) -> &'static str {
        match self {
            EffectKind::State => "state",
            EffectKind::Arrears => "arrears",
            EffectKind::Warning => "warning",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "state" => EffectKind::State,
            "arrears" => EffectKind::Arrears,
            "warning" => EffectKind::Warning,
            _ => return None,
        })
    }
}

/// When a balance moves a user between normal and arrears, and which warnings go out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandingRules {
    /// An available balance below this is arrears.
    pub arrears_below: Money,
    /// Warning thresholds (any order): one warning per threshold crossed downwards.
    pub warn_below: Vec<Money>,
}

/// What the end of a run writes, in one transaction with its effects.
#[derive(Clone, Debug, Default)]
pub struct RunFinish {
    pub period: String,
    pub cursors: Cursors,
    pub retrievals: Vec<RetrievalRow>,
    pub unbilled: Vec<Unbilled>,
    /// Unbilled deliveries this run charged (no longer unbilled).
    pub billed_unbilled: Vec<i64>,
    pub summary: serde_json::Value,
    pub finished_ms: i64,
    /// `delivery_sources` rows older than this are deleted.
    pub sources_before_ms: i64,
}

fn bad_text(what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("bad {what}").into(),
    )
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn cursors(conn: &Connection) -> rusqlite::Result<Cursors> {
    let get = |name: &str| -> rusqlite::Result<i64> {
        Ok(conn
            .prepare_cached("SELECT value FROM cursors WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?
            .unwrap_or(0))
    };
    Ok(Cursors {
        deliveries: get("deliveries")?,
        meter: u(get("meter")?),
    })
}

pub(crate) fn run(conn: &Connection, period: &str) -> rusqlite::Result<Option<RunRecord>> {
    conn.prepare_cached(
        "SELECT plan, started_ms, finished_ms, summary FROM runs WHERE period = ?1",
    )?
    .query_row([period], |r| {
        let plan: String = r.get(0)?;
        let summary: Option<String> = r.get(3)?;
        Ok(RunRecord {
            plan: serde_json::from_str(&plan).map_err(|_| bad_text("run plan"))?,
            started_ms: r.get(1)?,
            finished_ms: r.get(2)?,
            summary: summary.and_then(|s| serde_json::from_str(&s).ok()),
        })
    })
    .optional()
}

/// Records a run's start; when the period has a row already, returns that one instead.
pub(crate) fn begin(
    tx: &Transaction<'_>,
    plan: &RunPlan,
    now_ms: i64,
) -> rusqlite::Result<RunRecord> {
    if let Some(r) = run(tx, &plan.period)? {
        return Ok(r);
    }
    let text = serde_json::to_string(plan).map_err(|_| bad_text("run plan"))?;
    tx.execute(
        "INSERT INTO runs (period, plan, started_ms) VALUES (?1, ?2, ?3)",
        params![plan.period, text, now_ms],
    )?;
    Ok(RunRecord {
        plan: plan.clone(),
        started_ms: now_ms,
        finished_ms: None,
        summary: None,
    })
}

/// The last delivery id whose record is from before `end_ms`, reading on from `after` in id
/// order and stopping at the first later one (ids follow commit order).
pub(crate) fn deliveries_upto(conn: &Connection, after: i64, end_ms: i64) -> rusqlite::Result<i64> {
    let first_late: Option<i64> = conn
        .prepare_cached("SELECT MIN(id) FROM deliveries WHERE id > ?1 AND at_ms >= ?2")?
        .query_row(params![after, end_ms], |r| r.get(0))?;
    let last: Option<i64> = match first_late {
        Some(late) => conn
            .prepare_cached("SELECT MAX(id) FROM deliveries WHERE id > ?1 AND id < ?2")?
            .query_row(params![after, late], |r| r.get(0))?,
        None => conn
            .prepare_cached("SELECT MAX(id) FROM deliveries WHERE id > ?1")?
            .query_row([after], |r| r.get(0))?,
    };
    Ok(last.unwrap_or(after))
}

/// A delivery record as the accounting run reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliveryRow<'a> {
    pub id: i64,
    /// The account's number in [`LedgerStore::delivery_accounts`](super::LedgerStore::delivery_accounts)
    /// (`None` in records stored before ledger schema 2).
    pub account_no: Option<i64>,
    pub account: &'a str,
    pub zone: Zone,
    pub bytes: u64,
    pub at_ms: i64,
}

/// Calls `f` for every delivery with an id in `(after, upto]`, in id order.
pub(crate) fn scan_deliveries(
    conn: &Connection,
    after: i64,
    upto: i64,
    f: &mut dyn FnMut(DeliveryRow<'_>),
) -> rusqlite::Result<()> {
    let mut s = conn.prepare(
        "SELECT id, account, zone, bytes, at_ms, account_no FROM deliveries \
         WHERE id > ?1 AND id <= ?2 ORDER BY id",
    )?;
    let mut rows = s.query(params![after, upto])?;
    while let Some(r) = rows.next()? {
        f(DeliveryRow {
            id: r.get(0)?,
            account_no: r.get(5)?,
            account: r.get_ref(1)?.as_str()?,
            zone: zone_of(r.get_ref(2)?.as_str()?)?,
            bytes: u(r.get(3)?),
            at_ms: r.get(4)?,
        });
    }
    Ok(())
}

/// Every numbered delivery account (`delivery_accounts`), by number.
pub(crate) fn delivery_accounts(conn: &Connection) -> rusqlite::Result<Vec<(i64, String)>> {
    let mut s = conn.prepare("SELECT id, account FROM delivery_accounts ORDER BY id")?;
    let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Unbilled deliveries from runs before `period` that are not written off.
pub(crate) fn unbilled(
    conn: &Connection,
    before_period: Option<&str>,
) -> rusqlite::Result<Vec<Unbilled>> {
    let mut s = conn.prepare_cached(
        "SELECT delivery_id, period, account, zone, bytes, at_ms FROM unbilled \
         WHERE written_off_ms IS NULL AND (?1 IS NULL OR period < ?1) ORDER BY delivery_id",
    )?;
    let rows = s.query_map([before_period], |r| {
        Ok(Unbilled {
            delivery_id: r.get(0)?,
            period: r.get(1)?,
            account: r.get(2)?,
            zone: zone_of(&r.get::<_, String>(3)?)?,
            bytes: u(r.get(4)?),
            at_ms: r.get(5)?,
        })
    })?;
    rows.collect()
}

/// Writes off the unbilled deliveries of `account`; returns how many.
pub(crate) fn write_off(
    conn: &Connection,
    account: &str,
    by: &str,
    at_ms: i64,
) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE unbilled SET written_off_ms = ?2, written_off_by = ?3 \
         WHERE account = ?1 AND written_off_ms IS NULL",
        params![account, at_ms, by],
    )
}

/// Pending transfers open when entry `start_head` was the last one, with their traffic.
pub(crate) fn open_pending(
    conn: &Connection,
    start_head: i64,
) -> rusqlite::Result<Vec<OpenPending>> {
    let mut s = conn.prepare(
        "SELECT e.id, d.name, c.name, COALESCE(g.bytes, 0), e.amount, e.at_ms \
         FROM entries e JOIN accounts d ON d.id = e.debit JOIN accounts c ON c.id = e.credit \
         LEFT JOIN charges g ON g.key = e.key \
         WHERE e.phase = 'pending' AND e.id <= ?1 AND d.kind = 'user' AND c.kind = 'revenue' \
           AND NOT EXISTS (SELECT 1 FROM entries r WHERE r.pending_id = e.id AND r.id <= ?1) \
         ORDER BY e.id",
    )?;
    let rows = s.query_map([start_head], |r| {
        Ok(OpenPending {
            entry_id: r.get(0)?,
            login: r.get(1)?,
            zone: r.get(2)?,
            bytes: u(r.get(3)?),
            amount: Money::from_minor(r.get(4)?),
            at_ms: r.get(5)?,
        })
    })?;
    rows.collect()
}

pub(crate) fn users(conn: &Connection) -> rusqlite::Result<Vec<RunUser>> {
    let mut s = conn.prepare("SELECT login, class, status FROM users ORDER BY login")?;
    let rows = s.query_map([], |r| {
        let status: String = r.get(2)?;
        Ok(RunUser {
            login: r.get(0)?,
            class: r.get(1)?,
            status: status.parse().map_err(|_| bad_text("status"))?,
        })
    })?;
    rows.collect()
}

/// Stores a charge row; [`put_charge`] runs it.
pub(crate) const PUT_CHARGE: &str = "INSERT OR IGNORE INTO charges (key, period, login, zone, \
    bytes, amount, meter_id, entry_id, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

/// Stores a charge row (once per key) naming the entry that charged it, with [`PUT_CHARGE`]
/// prepared by the caller.
pub(crate) fn put_charge(
    put: &mut rusqlite::Statement<'_>,
    period: &str,
    c: &ChargeRow,
    entry_id: Option<i64>,
) -> rusqlite::Result<()> {
    put.execute(params![
        c.key,
        period,
        c.login,
        c.zone,
        i(c.bytes),
        c.amount.minor(),
        c.meter_id.map(i),
        entry_id,
        c.at_ms
    ])
    .map(drop)
}

/// The end of a run: cursors, retrievals, unbilled deliveries, standings and effects.
pub(crate) fn finish(
    tx: &Transaction<'_>,
    f: &RunFinish,
    rules: &StandingRules,
) -> rusqlite::Result<usize> {
    let set_cursor = |name: &str, v: i64| {
        tx.prepare_cached(
            "INSERT INTO cursors (name, value) VALUES (?1, ?2) \
             ON CONFLICT (name) DO UPDATE SET value = MAX(value, ?2)",
        )?
        .execute(params![name, v])
    };
    set_cursor("deliveries", f.cursors.deliveries)?;
    set_cursor("meter", i(f.cursors.meter))?;
    {
        let mut ins = tx.prepare_cached(
            "INSERT OR IGNORE INTO retrievals (meter_id, period, login, at_ms, client, protocol, \
             messages, bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for r in &f.retrievals {
            ins.execute(params![
                i(r.meter_id),
                f.period,
                r.login,
                r.at_ms,
                r.client,
                r.protocol,
                i(r.messages),
                i(r.bytes)
            ])?;
        }
        let mut ins = tx.prepare_cached(
            "INSERT OR IGNORE INTO unbilled (delivery_id, period, account, zone, bytes, at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for d in &f.unbilled {
            ins.execute(params![
                d.delivery_id,
                d.period,
                d.account,
                d.zone.as_str(),
                i(d.bytes),
                d.at_ms
            ])?;
        }
        let mut del = tx.prepare_cached("DELETE FROM unbilled WHERE delivery_id = ?1")?;
        for id in &f.billed_unbilled {
            del.execute([id])?;
        }
    }
    let effects = standings(tx, &f.period, rules, f.finished_ms)?;
    // Zones remembered at SMTP time for Stalwart messages: a delivery report comes within
    // Stalwart's queue retention (days); a month is ample.
    tx.prepare_cached("DELETE FROM delivery_sources WHERE at_ms < ?1")?
        .execute([f.sources_before_ms])?;
    tx.execute(
        "UPDATE runs SET finished_ms = ?2, summary = ?3 WHERE period = ?1",
        params![f.period, f.finished_ms, f.summary.to_string()],
    )?;
    Ok(effects)
}

/// Moves users between normal and arrears by their available balance, and decides the
/// warnings; records each decision as an effect. Returns how many effects were added.
fn standings(
    tx: &Connection,
    period: &str,
    rules: &StandingRules,
    at_ms: i64,
) -> rusqlite::Result<usize> {
    let mut thresholds: Vec<i64> = rules.warn_below.iter().map(|m| m.minor()).collect();
    thresholds.sort_unstable_by(|a, b| b.cmp(a));
    let top = thresholds.first().copied();
    let mut s = tx.prepare(
        "SELECT u.login, u.status, a.credits_posted - a.debits_posted - a.debits_pending, \
         w.warned_below FROM users u JOIN accounts a ON a.id = u.account_id \
         LEFT JOIN warnings w ON w.login = u.login WHERE u.status != 'unwelcome' \
         ORDER BY u.login",
    )?;
    let mut decided: Vec<(String, Status, i64, EffectKind, i64)> = Vec::new();
    let mut rearm: Vec<String> = Vec::new();
    let mut warned: Vec<(String, i64)> = Vec::new();
    let mut rows = s.query([])?;
    while let Some(r) = rows.next()? {
        let login: String = r.get(0)?;
        let status: Status = r
            .get::<_, String>(1)?
            .parse()
            .map_err(|_| bad_text("status"))?;
        // A balance past i64 in SQL would be a float: treat what does not read as i64 as
        // far below any threshold (verify reports the real problem).
        let available: i64 = r.get(2).unwrap_or(i64::MIN);
        let warned_below: Option<i64> = r.get(3)?;
        let arrears = available < rules.arrears_below.minor();
        match (status, arrears) {
            (Status::Normal, true) => {
                decided.push((
                    login.clone(),
                    Status::Arrears,
                    available,
                    EffectKind::State,
                    0,
                ));
                decided.push((
                    login.clone(),
                    Status::Arrears,
                    available,
                    EffectKind::Arrears,
                    0,
                ));
            }
            (Status::Arrears, false) => {
                decided.push((
                    login.clone(),
                    Status::Normal,
                    available,
                    EffectKind::State,
                    0,
                ));
            }
            _ => {}
        }
        if arrears {
            continue;
        }
        if top.is_some_and(|t| available >= t) {
            if warned_below.is_some() {
                rearm.push(login);
            }
            continue;
        }
        // The lowest threshold the balance is below.
        if let Some(&t) = thresholds.iter().rev().find(|&&t| available < t) {
            if warned_below.is_none_or(|w| t < w) {
                decided.push((
                    login.clone(),
                    Status::Normal,
                    available,
                    EffectKind::Warning,
                    t,
                ));
                warned.push((login, t));
            }
        }
    }
    drop(rows);
    drop(s);
    for login in &rearm {
        tx.prepare_cached("DELETE FROM warnings WHERE login = ?1")?
            .execute([login])?;
    }
    for (login, t) in &warned {
        tx.prepare_cached(
            "INSERT INTO warnings (login, warned_below) VALUES (?1, ?2) \
             ON CONFLICT (login) DO UPDATE SET warned_below = ?2",
        )?
        .execute(params![login, t])?;
    }
    let mut n = 0;
    for (login, status, balance, kind, threshold) in &decided {
        if *kind == EffectKind::State {
            tx.prepare_cached("UPDATE users SET status = ?2 WHERE login = ?1")?
                .execute(params![login, status.as_str()])?;
        }
        n += add_effect(
            tx, period, login, *kind, *status, *balance, *threshold, at_ms,
        )?;
    }
    Ok(n)
}

#[allow(clippy::too_many_arguments)]
fn add_effect(
    tx: &Connection,
    period: &str,
    login: &str,
    kind: EffectKind,
    status: Status,
    balance: i64,
    threshold: i64,
    at_ms: i64,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO effects (period, login, kind, status, balance, threshold, at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        period,
        login,
        kind.as_str(),
        status.as_str(),
        balance,
        threshold,
        at_ms
    ])
}

/// A top-up (or adjustment) that brings an account in arrears back to at least the
/// threshold makes it normal at once; a balance back above the top warning threshold re-arms
/// the warnings. Returns the state effect to carry out, if any.
pub(crate) fn restore_if_paid(
    tx: &Connection,
    login: &str,
    rules: &StandingRules,
    period: &str,
    at_ms: i64,
) -> rusqlite::Result<bool> {
    let row: Option<(String, i64)> = tx
        .prepare_cached(
            "SELECT u.status, a.credits_posted - a.debits_posted - a.debits_pending \
             FROM users u JOIN accounts a ON a.id = u.account_id WHERE u.login = ?1",
        )?
        .query_row([login], |r| Ok((r.get(0)?, r.get(1).unwrap_or(i64::MIN))))
        .optional()?;
    let Some((status, available)) = row else {
        return Ok(false);
    };
    if rules.warn_below.iter().all(|t| available >= t.minor()) {
        tx.prepare_cached("DELETE FROM warnings WHERE login = ?1")?
            .execute([login])?;
    }
    if status != Status::Arrears.as_str() || available < rules.arrears_below.minor() {
        return Ok(false);
    }
    tx.prepare_cached("UPDATE users SET status = 'normal' WHERE login = ?1")?
        .execute([login])?;
    add_effect(
        tx,
        period,
        login,
        EffectKind::State,
        Status::Normal,
        available,
        0,
        at_ms,
    )?;
    Ok(true)
}

pub(crate) fn open_effects(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<Effect>> {
    let mut s = conn.prepare_cached(
        "SELECT id, period, login, kind, status, balance, threshold, at_ms FROM effects \
         WHERE done_ms IS NULL ORDER BY id LIMIT ?1",
    )?;
    let rows = s.query_map([i(limit as u64)], |r| {
        let kind: String = r.get(3)?;
        let status: String = r.get(4)?;
        Ok(Effect {
            id: r.get(0)?,
            period: r.get(1)?,
            login: r.get(2)?,
            kind: EffectKind::parse(&kind).ok_or_else(|| bad_text("effect kind"))?,
            status: status.parse().map_err(|_| bad_text("status"))?,
            balance: Money::from_minor(r.get(5)?),
            threshold: Money::from_minor(r.get(6)?),
            at_ms: r.get(7)?,
        })
    })?;
    rows.collect()
}

pub(crate) fn effects_done(tx: &Connection, ids: &[i64], at_ms: i64) -> rusqlite::Result<()> {
    let mut s = tx.prepare_cached("UPDATE effects SET done_ms = ?2 WHERE id = ?1")?;
    for id in ids {
        s.execute(params![id, at_ms])?;
    }
    Ok(())
}

/// Charges and retrievals of `login` in `[since_ms, until_ms)`, oldest first.
pub(crate) fn statement_rows(
    conn: &Connection,
    login: &str,
    since_ms: i64,
    until_ms: i64,
) -> rusqlite::Result<(Vec<RetrievalRow>, Vec<ChargeRow>)> {
    let mut s = conn.prepare_cached(
        "SELECT meter_id, login, at_ms, client, protocol, messages, bytes FROM retrievals \
         WHERE login = ?1 AND at_ms >= ?2 AND at_ms < ?3 ORDER BY at_ms, meter_id",
    )?;
    let rets = s
        .query_map(params![login, since_ms, until_ms], |r| {
            Ok(RetrievalRow {
                meter_id: u(r.get(0)?),
                login: r.get(1)?,
                at_ms: r.get(2)?,
                client: r.get(3)?,
                protocol: r.get(4)?,
                messages: u(r.get(5)?),
                bytes: u(r.get(6)?),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut s = conn.prepare_cached(
        "SELECT key, login, zone, bytes, amount, meter_id, at_ms FROM charges \
         WHERE login = ?1 AND at_ms >= ?2 AND at_ms < ?3 ORDER BY at_ms, key",
    )?;
    let charges = s
        .query_map(params![login, since_ms, until_ms], |r| {
            Ok(ChargeRow {
                key: r.get(0)?,
                login: r.get(1)?,
                zone: r.get(2)?,
                bytes: u(r.get(3)?),
                amount: Money::from_minor(r.get(4)?),
                meter_id: r.get::<_, Option<i64>>(5)?.map(u),
                at_ms: r.get(6)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((rets, charges))
}

/// Retrieval meter ids in `(after, upto]` an earlier run already consumed (a replayed meter
/// segment): they are skipped.
pub(crate) fn consumed_retrievals(
    conn: &Connection,
    after: u64,
    upto: u64,
) -> rusqlite::Result<std::collections::HashSet<u64>> {
    let mut s = conn
        .prepare_cached("SELECT meter_id FROM retrievals WHERE meter_id > ?1 AND meter_id <= ?2")?;
    let rows = s.query_map(params![i(after), i(upto)], |r| r.get::<_, i64>(0))?;
    rows.map(|r| r.map(u)).collect()
}
