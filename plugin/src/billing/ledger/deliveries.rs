//! The delivery meter in the ledger's SQLite file: delivered traffic per (message, account),
//! waiting for the accounting run. Kept beside the ledger so that the run can mark records
//! consumed in the same transaction as the postings it makes from them (exactly once, no
//! second file to keep in step).
//!
//! ```text
//! delivery_sources(message_key PRIMARY KEY, zone, at_ms)   the zone a message was classified
//!                  in at SMTP time, when it is not the default (foreign)
//! deliveries(id, message_key, account, zone, bytes, at_ms, run)  UNIQUE(message_key, account)
//!            run: NULL until an accounting run consumes the record
//! ```

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
    UNIQUE (message_key, account)
);
CREATE INDEX IF NOT EXISTS deliveries_unconsumed ON deliveries(id) WHERE run IS NULL;
";

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

/// Inserts the deliveries (in the caller's transaction); a (message, account) pair already
/// recorded is left as it is.
pub(crate) fn record(conn: &Connection, batch: &[Delivery]) -> rusqlite::Result<Recorded> {
    let mut source =
        conn.prepare_cached("SELECT zone FROM delivery_sources WHERE message_key = ?1")?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO deliveries (message_key, account, zone, bytes, at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (message_key, account) DO NOTHING",
    )?;
    let mut out = Recorded::default();
    for d in batch {
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
            d.at_ms
        ])? {
            0 => out.replayed += 1,
            _ => out.added += 1,
        }
    }
    Ok(out)
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
    use crate::billing::ledger::LedgerStore;

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
