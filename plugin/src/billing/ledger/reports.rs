//! What statements, usage reports and write-offs read from the ledger file (docs/billing.md,
//! "Statements and reports"): read-only queries, and the write-off of unbilled deliveries.
//!
//! ```text
//! write_offs(id, account, deliveries, bytes, oldest_ms, by, reason, at_ms)
//!            one row per operator write-off of an unknown account's unbilled deliveries
//! indexes    unbilled(account) of those not written off: `billing unbilled`, a write-off
//!            entries(debit, at_ms): a user's charges and debits (statements)
//!            entries(credit, at_ms) of entries other than charges: a user's top-ups and
//!            credits (a charge never credits a user), small
//!            entries(at_ms) of posted charges: a day's charges (reports)
//!            retrievals(at_ms), deliveries(zone, at_ms, bytes): a day's traffic (reports);
//!            a zone's day of deliveries is one range of the last, read from the index alone
//! ```

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

use super::{ChargeRow, Kind, Phase, RetrievalRow, UserAccount};
use crate::billing::money::Money;
use crate::policy::zones::Zone;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS write_offs (
    id INTEGER PRIMARY KEY,
    account TEXT NOT NULL,
    deliveries INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    oldest_ms INTEGER NOT NULL,
    by TEXT NOT NULL,
    reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS unbilled_open ON unbilled(account) WHERE written_off_ms IS NULL;
CREATE INDEX IF NOT EXISTS entries_debit ON entries(debit, at_ms);
CREATE INDEX IF NOT EXISTS entries_user_credit ON entries(credit, at_ms) WHERE kind != 'charge';
CREATE INDEX IF NOT EXISTS entries_charged ON entries(at_ms)
    WHERE kind = 'charge' AND phase IN ('posted', 'post');
CREATE INDEX IF NOT EXISTS retrievals_at ON retrievals(at_ms);
CREATE INDEX IF NOT EXISTS deliveries_zone_day ON deliveries(zone, at_ms, bytes);
";

/// The zones a delivery record has (`deliveries.zone` is written from [`Zone`]): one index
/// range per zone and day, no grouping.
const ZONES: [Zone; 2] = [Zone::Free, Zone::Foreign];

/// Most accounts `billing unbilled` lists.
pub const MAX_UNBILLED_ACCOUNTS: usize = 10_000;

/// One of a user's entries, from the user's side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserEntry {
    pub id: i64,
    pub key: String,
    pub kind: Kind,
    pub phase: Phase,
    pub amount: Money,
    /// The user is the credit side (money in: a top-up, a positive adjustment).
    pub credit: bool,
    /// For `post` and `void`: the pending entry resolved.
    pub pending_id: Option<i64>,
    pub at_ms: i64,
    pub memo: String,
    /// The other side: `cash`, `adjustment`, or the zone of a `revenue` account.
    pub other: String,
}

/// What a statement is made of, read in one snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatementData {
    pub account: UserAccount,
    /// Every entry of the account dated before the statement's end, oldest first.
    pub entries: Vec<UserEntry>,
    /// The retrievals and charge rows of the statement's span.
    pub retrievals: Vec<RetrievalRow>,
    pub charges: Vec<ChargeRow>,
}

/// A day's traffic and charges (`[since_ms, until_ms)`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayRows {
    pub since_ms: i64,
    pub until_ms: i64,
    /// Per zone: delivered messages (delivery records) and bytes.
    pub delivered: Vec<(String, u64, u64)>,
    /// Successful retrievals of known users, and the bytes they took.
    pub retrievals: u64,
    pub retrieved_bytes: u64,
    /// Per zone: what charge entries (posted, or pending ones posted) took from users.
    pub charged: Vec<(String, Money)>,
}

/// An unknown account's deliveries kept as unbilled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnbilledAccount {
    pub account: String,
    pub deliveries: u64,
    pub bytes: u64,
    /// The oldest delivery's time (Unix ms).
    pub oldest_ms: i64,
    /// The first and last accounting run (period) that kept some.
    pub first_period: String,
    pub last_period: String,
}

/// An operator's write-off of an account's unbilled deliveries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOff {
    pub account: String,
    pub deliveries: u64,
    pub bytes: u64,
    pub oldest_ms: i64,
    pub by: String,
    pub reason: String,
    pub at_ms: i64,
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn bad(what: &str, v: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("bad {what} {v:?}").into(),
    )
}

/// The user account's id, if `login` has one.
pub(crate) fn user_account_id(conn: &Connection, login: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT account_id FROM users WHERE login = ?1")?
        .query_row([login], |r| r.get(0))
        .optional()
}

/// Every entry of account `id` dated before `until_ms`, oldest first.
pub(crate) fn user_entries(
    conn: &Connection,
    id: i64,
    until_ms: i64,
) -> rusqlite::Result<Vec<UserEntry>> {
    let mut s = conn.prepare_cached(
        "SELECT e.id, e.key, e.kind, e.phase, e.amount, e.credit = ?1, e.pending_id, e.at_ms, \
         e.memo, o.kind, o.name FROM entries e \
         JOIN accounts o ON o.id = CASE WHEN e.credit = ?1 THEN e.debit ELSE e.credit END \
         WHERE (e.debit = ?1 OR (e.credit = ?1 AND e.kind != 'charge')) AND e.at_ms < ?2 \
         ORDER BY e.at_ms, e.id",
    )?;
    let rows = s.query_map(params![id, until_ms], |r| {
        let kind: String = r.get(2)?;
        let phase: String = r.get(3)?;
        let other_kind: String = r.get(9)?;
        Ok(UserEntry {
            id: r.get(0)?,
            key: r.get(1)?,
            kind: kind.parse().map_err(|_| bad("entry kind", &kind))?,
            phase: phase.parse().map_err(|_| bad("entry phase", &phase))?,
            amount: Money::from_minor(r.get(4)?),
            credit: r.get(5)?,
            pending_id: r.get(6)?,
            at_ms: r.get(7)?,
            memo: r.get(8)?,
            other: if other_kind == "revenue" {
                r.get(10)?
            } else {
                other_kind
            },
        })
    })?;
    rows.collect()
}

/// Traffic and charges per day; `bounds` are the days' starts and the last day's end, in
/// one read transaction (a snapshot).
pub(crate) fn usage(tx: &Transaction<'_>, bounds: &[i64]) -> rusqlite::Result<Vec<DayRows>> {
    let mut delivered = tx.prepare_cached(
        "SELECT COUNT(*), SUM(bytes) FROM deliveries WHERE zone = ?3 AND at_ms >= ?1 \
         AND at_ms < ?2",
    )?;
    let mut retrieved = tx.prepare_cached(
        "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM retrievals \
         WHERE at_ms >= ?1 AND at_ms < ?2",
    )?;
    let mut charged = tx.prepare_cached(
        "SELECT c.name, SUM(e.amount) FROM entries e JOIN accounts c ON c.id = e.credit \
         WHERE e.at_ms >= ?1 AND e.at_ms < ?2 AND e.kind = 'charge' \
           AND e.phase IN ('posted', 'post') AND c.kind = 'revenue' \
         GROUP BY c.name ORDER BY c.name",
    )?;
    let mut out = Vec::with_capacity(bounds.len().saturating_sub(1));
    for w in bounds.windows(2) {
        let (since, until) = (w[0], w[1]);
        let (retrievals, retrieved_bytes) =
            retrieved.query_row(params![since, until], |r| Ok((u(r.get(0)?), u(r.get(1)?))))?;
        out.push(DayRows {
            since_ms: since,
            until_ms: until,
            delivered: {
                let mut v = Vec::new();
                for z in ZONES {
                    let (n, b): (i64, Option<i64>) = delivered
                        .query_row(params![since, until, z.as_str()], |r| {
                            Ok((r.get(0)?, r.get(1)?))
                        })?;
                    if n > 0 {
                        v.push((z.as_str().to_owned(), u(n), u(b.unwrap_or(0))));
                    }
                }
                v
            },
            retrievals,
            retrieved_bytes,
            charged: charged
                .query_map(params![since, until], |r| {
                    Ok((r.get(0)?, Money::from_minor(r.get(1)?)))
                })?
                .collect::<rusqlite::Result<_>>()?,
        });
    }
    Ok(out)
}

/// Unbilled deliveries not written off, per account (at most [`MAX_UNBILLED_ACCOUNTS`]),
/// and how many accounts there are in all.
pub(crate) fn unbilled_accounts(
    conn: &Connection,
) -> rusqlite::Result<(Vec<UnbilledAccount>, u64)> {
    let total: i64 = conn.query_row(
        "SELECT COUNT(DISTINCT account) FROM unbilled WHERE written_off_ms IS NULL",
        [],
        |r| r.get(0),
    )?;
    let mut s = conn.prepare_cached(
        "SELECT account, COUNT(*), SUM(bytes), MIN(at_ms), MIN(period), MAX(period) \
         FROM unbilled WHERE written_off_ms IS NULL GROUP BY account ORDER BY account LIMIT ?1",
    )?;
    let rows = s
        .query_map([MAX_UNBILLED_ACCOUNTS as i64], |r| {
            Ok(UnbilledAccount {
                account: r.get(0)?,
                deliveries: u(r.get(1)?),
                bytes: u(r.get(2)?),
                oldest_ms: r.get(3)?,
                first_period: r.get(4)?,
                last_period: r.get(5)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((rows, u(total)))
}

/// User accounts by login after `after`, at most `limit`.
pub(crate) fn user_accounts(
    conn: &Connection,
    after: &str,
    limit: usize,
) -> rusqlite::Result<Vec<UserAccount>> {
    let mut s = conn.prepare_cached(
        "SELECT login, staff_no, real_name, class, status, note FROM users WHERE login > ?1 \
         ORDER BY login LIMIT ?2",
    )?;
    let rows = s.query_map(
        params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
        |r| {
            let status: String = r.get(4)?;
            Ok(UserAccount {
                login: r.get(0)?,
                staff_no: r.get(1)?,
                real_name: r.get(2)?,
                class: r.get(3)?,
                status: status.parse().map_err(|_| bad("status", &status))?,
                note: r.get(5)?,
            })
        },
    )?;
    rows.collect()
}

/// Writes off `account`'s unbilled deliveries and records who did it and why, in the
/// caller's transaction; `None` when it has none.
pub(crate) fn write_off(
    tx: &Transaction<'_>,
    account: &str,
    by: &str,
    reason: &str,
    at_ms: i64,
) -> rusqlite::Result<Option<WriteOff>> {
    let (n, bytes, oldest): (i64, Option<i64>, Option<i64>) = tx.query_row(
        "SELECT COUNT(*), SUM(bytes), MIN(at_ms) FROM unbilled \
         WHERE account = ?1 AND written_off_ms IS NULL",
        [account],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    if n == 0 {
        return Ok(None);
    }
    super::runs::write_off(tx, account, by, at_ms)?;
    let w = WriteOff {
        account: account.to_owned(),
        deliveries: u(n),
        bytes: u(bytes.unwrap_or(0)),
        oldest_ms: oldest.unwrap_or(at_ms),
        by: by.to_owned(),
        reason: reason.to_owned(),
        at_ms,
    };
    tx.execute(
        "INSERT INTO write_offs (account, deliveries, bytes, oldest_ms, by, reason, at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            account,
            n,
            bytes.unwrap_or(0),
            w.oldest_ms,
            by,
            reason,
            at_ms
        ],
    )?;
    Ok(Some(w))
}
