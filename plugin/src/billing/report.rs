//! Monthly statements and usage reports, assembled from what the ledger reads (no I/O here:
//! [`statement`] and [`usage`] take rows, the admin surfaces fetch and print them).
//!
//! A statement's money comes from the user's **entries** (the ledger of record): a posted
//! entry or a posted pending transfer (`post`) moves the balance; a pending one reserves,
//! a `void` releases. So
//!
//! ```text
//! opening + top-ups + adjustments − charges = closing        (posted balances)
//! available = closing − pending                              (pending: reserved at month end)
//! ```
//!
//! Its detail comes from the accounting run's rows: each retrieval with its time, client,
//! protocol, messages, bytes per zone and charge (the `charges` rows of that retrieval);
//! charges not made at a retrieval (at delivery, expired pending traffic charged) are
//! listed from their entries.

use std::collections::{BTreeMap, HashSet};

use chrono::{Datelike, Local, NaiveDate, TimeZone};
use serde::{Deserialize, Serialize};

use super::ledger::{ChargeRow, DayRows, Kind, Phase, RetrievalRow, UserAccount, UserEntry};
use super::money::{Money, MoneyError};
use super::run::Period;

/// A local calendar month.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Month {
    /// `YYYY-MM`.
    pub name: String,
    pub start_ms: i64,
    pub end_ms: i64,
    first: NaiveDate,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    #[error("month {0:?}: expected YYYY-MM, e.g. 2026-11")]
    BadMonth(String),
    #[error(transparent)]
    Money(#[from] MoneyError),
}

impl Month {
    /// `YYYY-MM`, or the local month of `now_ms` when `None`.
    pub fn parse_or_current(s: Option<&str>, now_ms: i64) -> Result<Month, ReportError> {
        let bad = || ReportError::BadMonth(s.unwrap_or_default().to_owned());
        let first = match s.map(str::trim) {
            Some(t) => {
                let (y, m) = t.split_once('-').ok_or_else(bad)?;
                if y.len() != 4 || m.len() != 2 {
                    return Err(bad());
                }
                let (y, m): (i32, u32) =
                    (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
                NaiveDate::from_ymd_opt(y, m, 1).ok_or_else(bad)?
            }
            None => {
                let today = Local
                    .timestamp_millis_opt(now_ms)
                    .earliest()
                    .ok_or_else(bad)?
                    .date_naive();
                today.with_day(1).ok_or_else(bad)?
            }
        };
        let next = first
            .checked_add_months(chrono::Months::new(1))
            .ok_or_else(bad)?;
        let start = Period::day(first).map_err(|_| bad())?;
        let end = Period::day(next).map_err(|_| bad())?;
        Ok(Month {
            name: first.format("%Y-%m").to_string(),
            start_ms: start.start_ms,
            end_ms: end.start_ms,
            first,
        })
    }

    /// Its days: `(YYYY-MM-DD, start_ms)`, and the month's end after the last.
    pub fn days(&self) -> (Vec<(String, i64)>, i64) {
        let mut out = Vec::new();
        let mut d = self.first;
        while d.month() == self.first.month() {
            if let Ok(p) = Period::day(d) {
                out.push((p.name, p.start_ms));
            }
            match d.succ_opt() {
                Some(n) => d = n,
                None => break,
            }
        }
        (out, self.end_ms)
    }
}

/// A user's month.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonthlyStatement {
    pub account: UserAccount,
    pub month: String,
    pub since_ms: i64,
    pub until_ms: i64,
    /// Posted balance when the month began.
    pub opening: Money,
    pub topups: Money,
    /// Signed: credits less debits.
    pub adjustments: Money,
    /// What charges took (a positive amount).
    pub charges: Money,
    /// Posted balance when the month ended: opening + topups + adjustments − charges.
    pub closing: Money,
    /// Reserved at the month's end by traffic delivered and not yet retrieved.
    pub pending: Money,
    /// closing − pending.
    pub available: Money,
    /// The zones the lines name, in column order (free, foreign, then the rest by name).
    pub zones: Vec<String>,
    pub retrievals: Vec<StatementRetrieval>,
    /// Top-ups, adjustments and charges not made at a retrieval, in time order.
    pub postings: Vec<StatementPosting>,
}

/// A retrieval (a successful POP3/IMAP login through the proxy) and what it was charged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementRetrieval {
    pub meter_id: u64,
    pub at_ms: i64,
    pub client: String,
    pub protocol: String,
    pub messages: u64,
    /// The bytes the client took.
    pub bytes: u64,
    /// Delivered traffic charged at this retrieval, per zone.
    pub zones: Vec<ZoneCharge>,
    pub charge: Money,
}

/// Traffic of one zone charged at a retrieval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneCharge {
    pub zone: String,
    pub bytes: u64,
    pub charge: Money,
}

/// A posting of the month that is not a retrieval's charge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementPosting {
    pub entry: i64,
    pub at_ms: i64,
    pub kind: Kind,
    /// Its effect on the balance (signed).
    pub amount: Money,
    pub memo: String,
}

/// The signed effect of `e` on the user's posted balance.
fn posted_effect(e: &UserEntry) -> Result<Money, MoneyError> {
    match e.phase {
        Phase::Posted | Phase::Post if e.credit => Ok(e.amount),
        Phase::Posted | Phase::Post => e.amount.checked_neg(),
        Phase::Pending | Phase::Void => Ok(Money::ZERO),
    }
}

fn zone_order(zones: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = zones
        .into_iter()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let rank = |z: &str| match z {
        "free" => 0,
        "foreign" => 1,
        _ => 2,
    };
    v.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
    v
}

/// Assembles `account`'s statement for `month` from its entries dated before the month's
/// end (all of them: the opening balance needs the history) and the month's retrievals and
/// charge rows.
pub fn statement(
    account: UserAccount,
    month: &Month,
    entries: &[UserEntry],
    retrievals: &[RetrievalRow],
    charges: &[ChargeRow],
) -> Result<MonthlyStatement, ReportError> {
    let (since, until) = (month.start_ms, month.end_ms);
    let mut opening = Money::ZERO;
    let (mut topups, mut adjustments, mut charged) = (Money::ZERO, Money::ZERO, Money::ZERO);
    // Charges shown on a retrieval's line (the run keys a charge row as its entry).
    let at_retrieval: HashSet<&str> = charges
        .iter()
        .filter(|c| c.meter_id.is_some())
        .map(|c| c.key.as_str())
        .collect();
    let mut postings = Vec::new();
    // Pending transfers open at the month's end: reserved amount by entry id.
    let mut open: BTreeMap<i64, Money> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.at_ms < until) {
        match e.phase {
            Phase::Pending if !e.credit => {
                open.insert(e.id, e.amount);
            }
            Phase::Post | Phase::Void => {
                if let Some(p) = e.pending_id {
                    open.remove(&p);
                }
            }
            _ => {}
        }
        let effect = posted_effect(e)?;
        if e.at_ms < since {
            opening = opening.checked_add(effect)?;
            continue;
        }
        if effect == Money::ZERO {
            continue;
        }
        match e.kind {
            Kind::Topup => topups = topups.checked_add(effect)?,
            Kind::Adjustment => adjustments = adjustments.checked_add(effect)?,
            Kind::Charge => charged = charged.checked_sub(effect)?,
        }
        if e.kind != Kind::Charge || !at_retrieval.contains(e.key.as_str()) {
            postings.push(StatementPosting {
                entry: e.id,
                at_ms: e.at_ms,
                kind: e.kind,
                amount: effect,
                memo: e.memo.clone(),
            });
        }
    }
    let closing = opening
        .checked_add(topups)?
        .checked_add(adjustments)?
        .checked_sub(charged)?;
    let mut pending = Money::ZERO;
    for a in open.values() {
        pending = pending.checked_add(*a)?;
    }

    let mut by_meter: BTreeMap<u64, BTreeMap<&str, (u64, Money)>> = BTreeMap::new();
    for c in charges
        .iter()
        .filter(|c| c.at_ms >= since && c.at_ms < until)
    {
        if let Some(m) = c.meter_id {
            let z = by_meter.entry(m).or_default().entry(&c.zone).or_default();
            z.0 = z.0.saturating_add(c.bytes);
            z.1 = z.1.checked_add(c.amount)?;
        }
    }
    let mut lines = Vec::with_capacity(retrievals.len());
    for r in retrievals
        .iter()
        .filter(|r| r.at_ms >= since && r.at_ms < until)
    {
        let mut zones = Vec::new();
        let mut charge = Money::ZERO;
        for (z, (b, a)) in by_meter.remove(&r.meter_id).unwrap_or_default() {
            charge = charge.checked_add(a)?;
            zones.push(ZoneCharge {
                zone: z.to_owned(),
                bytes: b,
                charge: a,
            });
        }
        lines.push(StatementRetrieval {
            meter_id: r.meter_id,
            at_ms: r.at_ms,
            client: r.client.clone(),
            protocol: r.protocol.clone(),
            messages: r.messages,
            bytes: r.bytes,
            zones,
            charge,
        });
    }
    lines.sort_by_key(|r| (r.at_ms, r.meter_id));
    let zones = zone_order(
        ["free".to_owned(), "foreign".to_owned()].into_iter().chain(
            lines
                .iter()
                .flat_map(|l| l.zones.iter().map(|z| z.zone.clone())),
        ),
    );
    Ok(MonthlyStatement {
        account,
        month: month.name.clone(),
        since_ms: since,
        until_ms: until,
        opening,
        topups,
        adjustments,
        charges: charged,
        closing,
        pending,
        available: closing.checked_sub(pending)?,
        zones,
        retrievals: lines,
        postings,
    })
}

/// Usage per zone and day.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    pub month: String,
    /// Only this zone (`--zone`), if given.
    pub zone: Option<String>,
    pub days: Vec<DayUsage>,
    /// The month: per zone, and retrievals.
    pub total: DayUsage,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayUsage {
    /// `YYYY-MM-DD`, or the month for the total.
    pub day: String,
    /// Successful retrievals and the bytes they took (not per zone: a retrieval takes
    /// mail of every zone).
    pub retrievals: u64,
    pub retrieved_bytes: u64,
    pub zones: Vec<ZoneUsage>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneUsage {
    pub zone: String,
    /// Delivery records (one per message and recipient account) and their bytes.
    pub messages: u64,
    pub bytes: u64,
    /// What charge entries dated that day took from users for the zone.
    pub charged: Money,
}

fn slot<'a>(zones: &'a mut BTreeMap<String, ZoneUsage>, zone: &str) -> &'a mut ZoneUsage {
    zones.entry(zone.to_owned()).or_insert_with(|| ZoneUsage {
        zone: zone.to_owned(),
        ..ZoneUsage::default()
    })
}

/// Assembles the report from the day rows (`days` names them, in the same order).
pub fn usage(
    month: &Month,
    zone: Option<&str>,
    days: &[String],
    rows: &[DayRows],
) -> Result<UsageReport, ReportError> {
    let mut total: BTreeMap<String, ZoneUsage> = BTreeMap::new();
    let mut total_day = DayUsage {
        day: month.name.clone(),
        ..DayUsage::default()
    };
    let mut out = Vec::with_capacity(rows.len());
    for (name, r) in days.iter().zip(rows) {
        let mut zones: BTreeMap<String, ZoneUsage> = BTreeMap::new();
        for (z, n, b) in &r.delivered {
            let u = slot(&mut zones, z);
            u.messages = u.messages.saturating_add(*n);
            u.bytes = u.bytes.saturating_add(*b);
        }
        for (z, a) in &r.charged {
            let u = slot(&mut zones, z);
            u.charged = u.charged.checked_add(*a)?;
        }
        let mut day = DayUsage {
            day: name.clone(),
            retrievals: r.retrievals,
            retrieved_bytes: r.retrieved_bytes,
            zones: Vec::new(),
        };
        for name in zone_order(zones.keys().cloned()) {
            let Some(u) = zones.remove(&name) else {
                continue;
            };
            if zone.is_some_and(|z| z != u.zone) {
                continue;
            }
            let t = slot(&mut total, &u.zone);
            t.messages = t.messages.saturating_add(u.messages);
            t.bytes = t.bytes.saturating_add(u.bytes);
            t.charged = t.charged.checked_add(u.charged)?;
            day.zones.push(u);
        }
        total_day.retrievals = total_day.retrievals.saturating_add(day.retrievals);
        total_day.retrieved_bytes = total_day
            .retrieved_bytes
            .saturating_add(day.retrieved_bytes);
        out.push(day);
    }
    for name in zone_order(total.keys().cloned()) {
        if let Some(u) = total.remove(&name) {
            total_day.zones.push(u);
        }
    }
    Ok(UsageReport {
        month: month.name.clone(),
        zone: zone.map(str::to_owned),
        days: out,
        total: total_day,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(minor: i64) -> Money {
        Money::from_minor(minor)
    }

    fn nov() -> Month {
        Month::parse_or_current(Some("2026-11"), 0).unwrap()
    }

    struct E(Vec<UserEntry>);

    impl E {
        #[allow(clippy::too_many_arguments)]
        fn add(
            &mut self,
            kind: Kind,
            phase: Phase,
            credit: bool,
            amount: i64,
            at_ms: i64,
            key: &str,
            pending_id: Option<i64>,
        ) -> i64 {
            let id = self.0.len() as i64 + 1;
            self.0.push(UserEntry {
                id,
                key: key.to_owned(),
                kind,
                phase,
                amount: m(amount),
                credit,
                pending_id,
                at_ms,
                memo: format!("memo {id}"),
                other: String::new(),
            });
            id
        }
    }

    fn account() -> UserAccount {
        UserAccount {
            login: "a@x.example".into(),
            class: "student".into(),
            ..UserAccount::default()
        }
    }

    #[test]
    fn months_parse_and_refuse() {
        let n = nov();
        assert_eq!(n.name, "2026-11");
        let (days, end) = n.days();
        assert_eq!(days.len(), 30);
        assert_eq!(days[0].0, "2026-11-01");
        assert_eq!(days[0].1, n.start_ms);
        assert_eq!(end, n.end_ms);
        assert!(n.end_ms - n.start_ms >= 29 * 86_400_000);
        let dec = Month::parse_or_current(Some("2026-12"), 0).unwrap();
        assert_eq!(dec.start_ms, n.end_ms);
        assert_eq!(dec.days().0.len(), 31);
        let now = Month::parse_or_current(None, n.start_ms + 5 * 86_400_000).unwrap();
        assert_eq!(now, n);
        for bad in [
            "2026-13",
            "2026-1",
            "26-11",
            "2026/11",
            "",
            "2026-11-01",
            "x-y",
        ] {
            let e = Month::parse_or_current(Some(bad), 0)
                .unwrap_err()
                .to_string();
            assert!(e.contains("expected YYYY-MM"), "{bad}: {e}");
        }
    }

    #[test]
    fn statement_totals_add_up() {
        let n = nov();
        let before = n.start_ms - 1_000;
        let mid = n.start_ms + 86_400_000;
        let after = n.end_ms + 1_000;
        let mut e = E(Vec::new());
        e.add(Kind::Topup, Phase::Posted, true, 10_000, before, "t0", None);
        e.add(Kind::Charge, Phase::Posted, false, 300, before, "c0", None);
        let p_old = e.add(Kind::Charge, Phase::Pending, false, 120, before, "p0", None);
        e.add(Kind::Topup, Phase::Posted, true, 5_000, mid, "t1", None);
        e.add(Kind::Adjustment, Phase::Posted, false, 250, mid, "a1", None);
        e.add(Kind::Adjustment, Phase::Posted, true, 100, mid, "a2", None);
        e.add(
            Kind::Charge,
            Phase::Post,
            false,
            120,
            mid + 10,
            "post:3",
            Some(p_old),
        );
        e.add(
            Kind::Charge,
            Phase::Posted,
            false,
            90,
            mid + 10,
            "charge:7:foreign",
            None,
        );
        e.add(
            Kind::Charge,
            Phase::Pending,
            false,
            60,
            mid + 20,
            "p1",
            None,
        );
        // An expired pending transfer charged: not at a retrieval, listed as a posting.
        let p_exp = e.add(
            Kind::Charge,
            Phase::Pending,
            false,
            40,
            mid + 30,
            "p2",
            None,
        );
        e.add(
            Kind::Charge,
            Phase::Post,
            false,
            40,
            mid + 40,
            "expire:10",
            Some(p_exp),
        );
        let p_void = e.add(
            Kind::Charge,
            Phase::Pending,
            false,
            70,
            mid + 50,
            "p3",
            None,
        );
        e.add(
            Kind::Charge,
            Phase::Void,
            false,
            70,
            mid + 60,
            "expire:12",
            Some(p_void),
        );
        // Next month: not in the statement at all.
        e.add(Kind::Topup, Phase::Posted, true, 999, after, "t9", None);
        let retrievals = vec![RetrievalRow {
            meter_id: 7,
            login: "a@x.example".into(),
            at_ms: mid + 10,
            client: "192.0.2.7".into(),
            protocol: "pop3".into(),
            messages: 4,
            bytes: 4_000_000,
        }];
        let charge = |key: &str, zone: &str, bytes: u64, amount: i64| ChargeRow {
            key: key.into(),
            login: "a@x.example".into(),
            zone: zone.into(),
            bytes,
            amount: m(amount),
            meter_id: Some(7),
            at_ms: mid + 10,
        };
        let charges = vec![
            charge("post:3", "foreign", 400_000, 120),
            charge("charge:7:foreign", "foreign", 300_000, 90),
            charge("charge:7:free", "free", 3_000_000, 0),
        ];
        let s = statement(account(), &n, &e.0, &retrievals, &charges).unwrap();
        assert_eq!(s.opening, m(10_000 - 300));
        assert_eq!(s.topups, m(5_000));
        assert_eq!(s.adjustments, m(-150));
        assert_eq!(s.charges, m(120 + 90 + 40));
        assert_eq!(
            s.closing,
            s.opening
                .checked_add(s.topups)
                .unwrap()
                .checked_add(s.adjustments)
                .unwrap()
                .checked_sub(s.charges)
                .unwrap()
        );
        assert_eq!(s.closing, m(9_700 + 5_000 - 150 - 250));
        assert_eq!(s.pending, m(60));
        assert_eq!(s.available, m(9_700 + 5_000 - 150 - 250 - 60));
        assert_eq!(s.zones, vec!["free", "foreign"]);
        assert_eq!(s.retrievals.len(), 1);
        let r = &s.retrievals[0];
        assert_eq!(r.charge, m(210));
        let zones: Vec<(&str, u64, Money)> = r
            .zones
            .iter()
            .map(|z| (z.zone.as_str(), z.bytes, z.charge))
            .collect();
        assert_eq!(
            zones,
            vec![("foreign", 700_000, m(210)), ("free", 3_000_000, m(0))]
        );
        // Top-up, two adjustments and the expired charge; the retrieval's charges are on
        // its line.
        let kinds: Vec<(Kind, i64)> = s
            .postings
            .iter()
            .map(|p| (p.kind, p.amount.minor()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (Kind::Topup, 5_000),
                (Kind::Adjustment, -250),
                (Kind::Adjustment, 100),
                (Kind::Charge, -40)
            ]
        );
        // The lines and the opening balance add up to the closing one.
        let mut sum = s.opening;
        for p in &s.postings {
            sum = sum.checked_add(p.amount).unwrap();
        }
        for r in &s.retrievals {
            sum = sum.checked_sub(r.charge).unwrap();
        }
        assert_eq!(sum, s.closing);
    }

    #[test]
    fn totals_add_up_for_any_mix_of_entries() {
        let n = nov();
        // A deterministic pseudo-random mix of kinds, phases and times around the month.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200 {
            let mut e = E(Vec::new());
            let mut pendings = Vec::new();
            for _ in 0..(next() % 30) {
                let at = n.start_ms - 86_400_000 + (next() % (40 * 86_400_000)) as i64;
                let amount = 1 + (next() % 10_000) as i64;
                match next() % 5 {
                    0 => {
                        e.add(Kind::Topup, Phase::Posted, true, amount, at, "t", None);
                    }
                    1 => {
                        let credit = next() % 2 == 0;
                        e.add(
                            Kind::Adjustment,
                            Phase::Posted,
                            credit,
                            amount,
                            at,
                            "a",
                            None,
                        );
                    }
                    2 => {
                        e.add(Kind::Charge, Phase::Posted, false, amount, at, "c", None);
                    }
                    3 => pendings.push(e.add(
                        Kind::Charge,
                        Phase::Pending,
                        false,
                        amount,
                        at,
                        "p",
                        None,
                    )),
                    _ => {
                        if let Some(p) = pendings.pop() {
                            let phase = if next() % 2 == 0 {
                                Phase::Post
                            } else {
                                Phase::Void
                            };
                            let amount = e.0[(p - 1) as usize].amount.minor();
                            e.add(Kind::Charge, phase, false, amount, at, "r", Some(p));
                        }
                    }
                }
            }
            let s = statement(account(), &n, &e.0, &[], &[]).unwrap();
            let all: i64 =
                e.0.iter()
                    .filter(|x| x.at_ms < n.end_ms)
                    .map(|x| posted_effect(x).unwrap().minor())
                    .sum();
            assert_eq!(s.closing.minor(), all);
            assert_eq!(
                s.closing.minor(),
                s.opening.minor() + s.topups.minor() + s.adjustments.minor() - s.charges.minor()
            );
            assert_eq!(s.available.minor(), s.closing.minor() - s.pending.minor());
        }
    }

    #[test]
    fn usage_sums_days_and_filters_a_zone() {
        let n = nov();
        let rows = vec![
            DayRows {
                delivered: vec![("foreign".into(), 3, 3_000), ("free".into(), 5, 500)],
                retrievals: 2,
                retrieved_bytes: 2_000,
                charged: vec![("foreign".into(), m(90)), ("retrieved".into(), m(5))],
                ..DayRows::default()
            },
            DayRows {
                delivered: vec![("foreign".into(), 1, 100)],
                charged: vec![("foreign".into(), m(10))],
                ..DayRows::default()
            },
        ];
        let days = vec!["2026-11-01".to_owned(), "2026-11-02".to_owned()];
        let r = usage(&n, None, &days, &rows).unwrap();
        let zones: Vec<&str> = r.days[0].zones.iter().map(|z| z.zone.as_str()).collect();
        assert_eq!(zones, vec!["free", "foreign", "retrieved"]);
        assert_eq!(r.days[0].zones[1].messages, 3);
        assert_eq!(r.days[0].zones[1].charged, m(90));
        assert_eq!(r.total.retrievals, 2);
        assert_eq!(r.total.zones[1].messages, 4);
        assert_eq!(r.total.zones[1].bytes, 3_100);
        assert_eq!(r.total.zones[1].charged, m(100));
        let f = usage(&n, Some("foreign"), &days, &rows).unwrap();
        assert!(f
            .days
            .iter()
            .all(|d| d.zones.iter().all(|z| z.zone == "foreign")));
        assert_eq!(f.total.zones.len(), 1);
        assert_eq!(f.total.zones[0].charged, m(100));
    }
}
