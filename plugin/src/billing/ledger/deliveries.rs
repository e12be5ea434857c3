//! The delivery meter in the ledger's SQLite file: delivered traffic per (message, account),
//! waiting for the accounting run. Kept beside the ledger so that the run can mark records
//! consumed in the same transaction as the postings it makes from them (exactly once, no
//! second file to keep in step).
//!
//! ```text
//! delivery_sources(message_key PRIMARY KEY, zone, at_ms)   the zone a message was classified
//!                  in at SMTP time, when it is not the default (foreign)
//! deliveries(id, message_key, account, zone, bytes, at_ms, run, account_no)
//!            UNIQUE(message_key, account)
//!            run: NULL until an accounting run consumes the record
//!            account_no: the account's number in delivery_accounts (NULL in records from
//!            before ledger schema 2)
//! delivery_accounts(id, account UNIQUE)   every account a delivery was recorded for, numbered
//!            once: the accounting run resolves each account once, not each of its deliveries
//! ```

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::{LedgerError, Result};
use crate::policy::zones::Zone;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS delivery_sources (
    message_key TEXT PRIMARY KEY,
    zone TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    message_key TEXT NOT NULL,
    account TEXT NOT NULL,
    zone TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    run TEXT,
    account_no INTEGER,
    UNIQUE (message_key, account)
);
CREATE INDEX IF NOT EXISTS deliveries_unconsumed ON deliveries(id) WHERE run IS NULL;
CREATE TABLE IF NOT EXISTS delivery_accounts (
    id INTEGER PRIMARY KEY,
    account TEXT NOT NULL UNIQUE
);
";

/// Ledger schema 1 → 2: delivery records carry their account's number
/// (`deliveries.account_no`, `delivery_accounts`). Records already stored keep `NULL` there
/// and are resolved by their account's name, as before. Runs inside the caller's
/// transaction, before [`SCHEMA`] (whose `CREATE TABLE IF NOT EXISTS` leaves an old table as
/// it is).
pub(crate) fn migrate_to_2(conn: &Connection) -> rusqlite::Result<()> {
    let old_table: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'deliveries') \
         AND NOT EXISTS (SELECT 1 FROM pragma_table_info('deliveries') WHERE name = 'account_no')",
        [],
        |r| r.get(0),
    )?;
    if old_table {
        conn.execute_batch("ALTER TABLE deliveries ADD COLUMN account_no INTEGER")?;
    }
    Ok(())
}

/// One confirmed delivery of a message into one account's mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The message: `stalwart:<queue id>` or `milter:<queue id>`.
    pub message_key: String,
    /// The account: `stalwart:<account id>` for Stalwart, the recipient address for a milter.
    pub account: String,
    /// The zone, when known at delivery; `None`: the one remembered for the message at SMTP
    /// time ([`LedgerStore::remember_source`](super::LedgerStore::remember_source)), else
    /// foreign.
    pub zone: Option<Zone>,
    pub bytes: u64,
    pub at_ms: i64,
}

/// A stored delivery record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryRecord {
    pub id: i64,
    pub message_key: String,
    pub account: String,
    pub zone: Zone,
    pub bytes: u64,
    pub at_ms: i64,
}

/// How a batch of deliveries went in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// New records.
    pub added: usize,
    /// Already there (a resent webhook batch): unchanged.
    pub replayed: usize,
}

pub(crate) fn zone_of(s: &str) -> rusqlite::Result<Zone> {
    Zone::parse(s).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("unknown zone {s:?}").into(),
        )
    })
}

pub(crate) fn remember_source(
    conn: &Connection,
    message_key: &str,
    zone: Zone,
    at_ms: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO delivery_sources (message_key, zone, at_ms) VALUES (?1, ?2, ?3) \
         ON CONFLICT (message_key) DO UPDATE SET zone = excluded.zone",
    )?
    .execute(params![message_key, zone.as_str(), at_ms])
    .map(drop)
}

/// Most account numbers a ledger connection keeps in memory ([`AccountNumbers`]).
const MAX_CACHED_NUMBERS: usize = 1_000_000;

/// Delivery account numbers known to be committed (a number never changes once given), so
/// that recording a delivery looks its account up in memory rather than in the file.
#[derive(Debug, Default)]
pub(crate) struct AccountNumbers {
    known: HashMap<String, i64>,
}

impl AccountNumbers {
    /// Remembers numbers once the transaction that read or gave them has committed.
    pub(crate) fn learn(&mut self, numbers: Vec<(String, i64)>) {
        if self.known.len() + numbers.len() > MAX_CACHED_NUMBERS {
            self.known.clear();
        }
        self.known.extend(numbers);
    }
}

/// The number of `account` in `delivery_accounts`, given on first use (in the caller's
/// transaction): from `known`, else from the batch's own (`seen`: a webhook batch names an
/// account many times), else from the file.
fn account_no(
    conn: &Connection,
    known: &AccountNumbers,
    seen: &mut HashMap<String, i64>,
    account: &str,
) -> rusqlite::Result<i64> {
    if let Some(&no) = known.known.get(account).or_else(|| seen.get(account)) {
        return Ok(no);
    }
    let found: Option<i64> = conn
        .prepare_cached("SELECT id FROM delivery_accounts WHERE account = ?1")?
        .query_row([account], |r| r.get(0))
        .optional()?;
    let no = match found {
        Some(no) => no,
        None => {
            conn.prepare_cached("INSERT INTO delivery_accounts (account) VALUES (?1)")?
                .execute([account])?;
            conn.last_insert_rowid()
        }
    };
    seen.insert(account.to_owned(), no);
    Ok(no)
}

/// Inserts the deliveries (in the caller's transaction); a (message, account) pair already
/// recorded is left as it is. Returns the account numbers it looked up in the file, for
/// [`AccountNumbers::learn`] once the transaction commits.
pub(crate) fn record(
    conn: &Connection,
    known: &AccountNumbers,
    batch: &[Delivery],
) -> rusqlite::Result<(Recorded, Vec<(String, i64)>)> {
    let mut source =
        conn.prepare_cached("SELECT zone FROM delivery_sources WHERE message_key = ?1")?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO deliveries (message_key, account, zone, bytes, at_ms, account_no) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (message_key, account) DO NOTHING",
    )?;
    let mut out = Recorded::default();
    let mut seen = HashMap::new();
    for d in batch {
        let no = account_no(conn, known, &mut seen, &d.account)?;
        let zone = match d.zone {
            Some(z) => z,
            None => source
                .query_row([&d.message_key], |r| r.get::<_, String>(0))
                .optional()?
                .map(|z| zone_of(&z))
                .transpose()?
                .unwrap_or(Zone::Foreign),
        };
        let bytes = i64::try_from(d.bytes).unwrap_or(i64::MAX);
        match insert.execute(params![
            d.message_key,
            d.account,
            zone.as_str(),
            bytes,
            d.at_ms,
            no
        ])? {
            0 => out.replayed += 1,
            _ => out.added += 1,
        }
    }
    Ok((out, seen.into_iter().collect()))
}

/// Records no accounting run has consumed yet, oldest first.
pub(crate) fn unconsumed(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<DeliveryRecord>> {
    let mut s = conn.prepare_cached(
        "SELECT id, message_key, account, zone, bytes, at_ms FROM deliveries \
         WHERE run IS NULL ORDER BY id LIMIT ?1",
    )?;
    let rows = s.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
        Ok(DeliveryRecord {
            id: r.get(0)?,
            message_key: r.get(1)?,
            account: r.get(2)?,
            zone: zone_of(&r.get::<_, String>(3)?)?,
            bytes: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
            at_ms: r.get(5)?,
        })
    })?;
    rows.collect()
}

/// Checks a delivery before it is stored.
pub(crate) fn validate(d: &Delivery) -> Result<()> {
    let bad = |field: &'static str, reason: &str| LedgerError::Invalid {
        field,
        reason: reason.into(),
    };
    if d.message_key.is_empty() || d.message_key.len() > 256 {
        return Err(bad("message_key", "must be 1 to 256 bytes"));
    }
    if d.account.is_empty() || d.account.len() > 320 {
        return Err(bad("account", "must be 1 to 320 bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::ledger::sqlite::SqliteLedger;
    use crate::billing::ledger::{DeliveryReader, LedgerStore};

    fn d(key: &str, account: &str, zone: Option<Zone>, bytes: u64) -> Delivery {
        Delivery {
            message_key: key.into(),
            account: account.into(),
            zone,
            bytes,
            at_ms: 1,
        }
    }

    #[test]
    fn replays_count_once_and_zones_come_from_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let mut l = SqliteLedger::open(&path).unwrap();
        l.remember_source("stalwart:7", Zone::Free, 1).unwrap();
        let batch = [
            d("stalwart:7", "stalwart:2", None, 100),
            d("stalwart:7", "stalwart:3", None, 100),
            d("stalwart:8", "stalwart:2", None, 50),
            d("milter:Q1", "a@x.example", Some(Zone::Free), 10),
        ];
        assert_eq!(
            l.record_deliveries(&batch).unwrap(),
            Recorded {
                added: 4,
                replayed: 0
            }
        );
        assert_eq!(
            l.record_deliveries(&batch).unwrap(),
            Recorded {
                added: 0,
                replayed: 4
            }
        );
        drop(l);
        // Durable: a fresh connection sees the same records.
        let l = SqliteLedger::open(&path).unwrap();
        let rows = l.unconsumed_deliveries(100).unwrap();
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.message_key.as_str(), r.account.as_str(), r.zone, r.bytes))
            .collect();
        assert_eq!(
            got,
            vec![
                ("stalwart:7", "stalwart:2", Zone::Free, 100),
                ("stalwart:7", "stalwart:3", Zone::Free, 100),
                ("stalwart:8", "stalwart:2", Zone::Foreign, 50),
                ("milter:Q1", "a@x.example", Zone::Free, 10),
            ]
        );
        assert_eq!(l.unconsumed_deliveries(1).unwrap().len(), 1);
    }

    /// Each account is numbered once, across batches and replays; the run reads the numbers
    /// with the records.
    #[test]
    fn accounts_are_numbered_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = SqliteLedger::open(&dir.path().join("l.sqlite")).unwrap();
        let first = [
            d("k1", "a@x", Some(Zone::Free), 1),
            d("k1", "b@x", Some(Zone::Free), 1),
            d("k2", "a@x", Some(Zone::Free), 1),
        ];
        l.record_deliveries(&first).unwrap();
        l.record_deliveries(&first).unwrap();
        l.record_deliveries(&[d("k3", "b@x", None, 1), d("k3", "c@x", None, 1)])
            .unwrap();
        let accounts = l.delivery_accounts().unwrap();
        assert_eq!(
            accounts,
            vec![(1, "a@x".into()), (2, "b@x".into()), (3, "c@x".into())]
        );
        let mut rows = Vec::new();
        l.scan_deliveries(0, 100, &mut |r| {
            rows.push((r.account_no, r.account.to_owned()))
        })
        .unwrap();
        let want: Vec<(Option<i64>, String)> = [1, 2, 1, 2, 3]
            .iter()
            .zip(["a@x", "b@x", "a@x", "b@x", "c@x"])
            .map(|(n, a)| (Some(*n), a.to_owned()))
            .collect();
        assert_eq!(rows, want);
    }

    #[test]
    fn a_bad_record_fails_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = SqliteLedger::open(&dir.path().join("l.sqlite")).unwrap();
        let e = l
            .record_deliveries(&[d("k", "a", None, 1), d("k", "", None, 1)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("account"), "{e}");
        assert!(l.unconsumed_deliveries(10).unwrap().is_empty());
    }
}
