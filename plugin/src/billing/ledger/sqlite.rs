//! [`LedgerStore`] in one SQLite file (WAL, `synchronous = FULL`: a posting is on disk
//! when its commit returns). Every posting runs in a `BEGIN IMMEDIATE` transaction, so the
//! hash chain stays linear even when a second process (the local CLI) writes.
//!
//! ```text
//! accounts(id, kind, name, debits_posted, credits_posted, debits_pending, credits_pending)
//!          UNIQUE(kind, name)       kind: user | revenue | cash | adjustment
//! users(account_id → accounts, login UNIQUE, staff_no, real_name, class, status, note)
//! tariffs(class, zone, price_per_mb, min_charge)  PRIMARY KEY(class, zone)
//! entries(id, key UNIQUE, kind, phase, debit, credit, amount, pending_id, at_ms, memo,
//!         prev_hash, hash)          UNIQUE(pending_id): a pending transfer resolves once
//! head(one = 1, last_id, hash)      the chain's end, written with every entry
//! ```
//!
//! SQLite turns an overflowing integer sum into a float, so balances are read, added with
//! checked arithmetic and written back, never summed in SQL.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Row, Transaction, TransactionBehavior,
};

use super::deliveries::{self, Delivery, DeliveryRecord, Recorded};
use super::reports::{self, DayRows, StatementData, UnbilledAccount, WriteOff};
use super::runs::{
    self, ChargeRow, Cursors, DeliveryRow, Effect, OpenPending, RetrievalRow, RunFinish, RunPlan,
    RunRecord, RunUser, StandingRules, Unbilled,
};
use super::verify::{Problem, Verifier};
use super::{
    chain, AccountRef, Balance, DeliveryReader, Entry, LedgerError, LedgerStore, Phase, Posted,
    Posting, Request, Result, Statement, Status, Tariff, UserAccount, VerifyReport,
};
use crate::billing::money::Money;
use crate::policy::zones::Zone;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    debits_posted INTEGER NOT NULL DEFAULT 0,
    credits_posted INTEGER NOT NULL DEFAULT 0,
    debits_pending INTEGER NOT NULL DEFAULT 0,
    credits_pending INTEGER NOT NULL DEFAULT 0,
    UNIQUE (kind, name)
);
CREATE TABLE IF NOT EXISTS users (
    account_id INTEGER PRIMARY KEY REFERENCES accounts(id),
    login TEXT NOT NULL UNIQUE,
    staff_no TEXT NOT NULL,
    real_name TEXT NOT NULL,
    class TEXT NOT NULL,
    status TEXT NOT NULL,
    note TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tariffs (
    class TEXT NOT NULL,
    zone TEXT NOT NULL,
    price_per_mb INTEGER NOT NULL,
    min_charge INTEGER NOT NULL,
    PRIMARY KEY (class, zone)
);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    phase TEXT NOT NULL,
    debit INTEGER NOT NULL,
    credit INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    pending_id INTEGER UNIQUE,
    at_ms INTEGER NOT NULL,
    memo TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_open_pending ON entries(at_ms) WHERE phase = 'pending';
CREATE TABLE IF NOT EXISTS head (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    last_id INTEGER NOT NULL,
    hash BLOB NOT NULL
);
PRAGMA user_version = 2;
";

/// The page cache of a connection that writes, in KiB (negative: SQLite's unit for KiB).
const CACHE_KIB: i64 = -65_536;

/// The entry columns, in [`row_entry`]'s order (a macro, so that the statements below are
/// literals: the posting loop prepares them from its cache without formatting them first).
macro_rules! entry_cols {
    () => {
        "id, key, kind, phase, debit, credit, amount, pending_id, at_ms, memo, prev_hash, hash"
    };
}
const ENTRY_COLS: &str = entry_cols!();
const ENTRY_BY_KEY: &str = concat!("SELECT ", entry_cols!(), " FROM entries WHERE key = ?1");
const ENTRY_BY_ID: &str = concat!("SELECT ", entry_cols!(), " FROM entries WHERE id = ?1");
const ENTRY_RESOLVING: &str = concat!(
    "SELECT ",
    entry_cols!(),
    " FROM entries WHERE pending_id = ?1"
);
const INSERT_ENTRY: &str = concat!(
    "INSERT INTO entries (",
    entry_cols!(),
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
);

/// The SQLite ledger.
pub struct SqliteLedger {
    conn: Connection,
    path: String,
    /// Delivery account numbers this connection has seen committed.
    numbers: deliveries::AccountNumbers,
}

/// The chain's end inside a transaction.
struct Head {
    id: i64,
    hash: [u8; 32],
}

impl SqliteLedger {
    /// Opens (creating) the ledger file and its directory.
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|error| LedgerError::Io {
                path: dir.display().to_string(),
                op: "create the ledger's directory",
                error,
            })?;
        }
        let conn = Connection::open(path).map_err(sql(&name, "open"))?;
        let me = Self {
            conn,
            path: name,
            numbers: Default::default(),
        };
        me.conn
            .busy_timeout(Duration::from_secs(10))
            .map_err(me.err("set the busy timeout"))?;
        me.conn
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(me.err("switch to WAL"))?;
        me.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(me.err("set synchronous = FULL"))?;
        // A run reads and rewrites balances, keys and charges spread over the whole file; the
        // default 2 MB page cache sends most of those reads to the kernel.
        me.conn
            .pragma_update(None, "cache_size", CACHE_KIB)
            .map_err(me.err("set cache_size"))?;
        me.conn
            .execute_batch(SCHEMA)
            .map_err(me.err("create the schema"))?;
        // Files from before schema 2 (`deliveries::migrate_to_2`); checked at every open, a
        // no-op once done.
        me.conn
            .execute_batch("BEGIN IMMEDIATE")
            .and_then(|()| deliveries::migrate_to_2(&me.conn))
            .and_then(|()| me.conn.execute_batch("COMMIT"))
            .map_err(me.err("upgrade the delivery meter's schema to version 2"))?;
        me.conn
            .execute_batch(deliveries::SCHEMA)
            .map_err(me.err("create the delivery meter's schema"))?;
        me.conn
            .execute_batch(runs::SCHEMA)
            .map_err(me.err("create the accounting run's schema"))?;
        me.conn
            .execute_batch(reports::SCHEMA)
            .map_err(me.err("create the reports' schema"))?;
        Ok(me)
    }

    /// Opens an existing ledger to read (verify, reports) beside the writer: WAL lets it
    /// read a snapshot while postings go on.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql(&name, "open to read"))?;
        let me = Self {
            conn,
            path: name,
            numbers: Default::default(),
        };
        me.conn
            .busy_timeout(Duration::from_secs(10))
            .map_err(me.err("set the busy timeout"))?;
        Ok(me)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Caps the file at `pages` pages, so that tests meet "database or disk is full" where
    /// they choose.
    #[cfg(test)]
    pub(crate) fn limit_pages(&self, pages: i64) {
        let _: i64 = self
            .conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                r.get(0)
            })
            .expect("set max_page_count");
    }

    #[cfg(test)]
    pub(crate) fn pragma_i64(&self, name: &str) -> i64 {
        self.conn
            .query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
            .expect("read a pragma")
    }

    /// Puts the file's name into an error made where it was not at hand.
    fn named(&self, e: LedgerError) -> LedgerError {
        match e {
            LedgerError::Sqlite { op, error, .. } => LedgerError::Sqlite {
                path: self.path.clone(),
                op,
                error,
            },
            other => other,
        }
    }

    fn err(&self, op: &'static str) -> impl Fn(rusqlite::Error) -> LedgerError + '_ {
        sql(&self.path, op)
    }

    fn tx(&mut self) -> Result<Transaction<'_>> {
        let path = self.path.clone();
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(move |e| sql(&path, "begin a transaction")(e))
    }
}

fn sql<'a>(path: &'a str, op: &'static str) -> impl Fn(rusqlite::Error) -> LedgerError + 'a {
    move |error| LedgerError::Sqlite {
        path: path.to_owned(),
        op,
        error,
    }
}

fn row_entry(r: &Row<'_>) -> rusqlite::Result<std::result::Result<Entry, String>> {
    let kind: String = r.get(2)?;
    let phase: String = r.get(3)?;
    let prev: Vec<u8> = r.get(10)?;
    let hash: Vec<u8> = r.get(11)?;
    let id: i64 = r.get(0)?;
    let build = || -> std::result::Result<Entry, String> {
        Ok(Entry {
            id,
            key: r.get(1).map_err(|e| e.to_string())?,
            kind: kind.parse().map_err(|e: LedgerError| e.to_string())?,
            phase: phase.parse().map_err(|e: LedgerError| e.to_string())?,
            debit: r.get(4).map_err(|e| e.to_string())?,
            credit: r.get(5).map_err(|e| e.to_string())?,
            amount: Money::from_minor(r.get(6).map_err(|e| e.to_string())?),
            pending_id: r.get(7).map_err(|e| e.to_string())?,
            at_ms: r.get(8).map_err(|e| e.to_string())?,
            memo: r.get(9).map_err(|e| e.to_string())?,
            prev_hash: prev
                .clone()
                .try_into()
                .map_err(|_| "prev_hash is not 32 bytes".to_owned())?,
            hash: hash
                .clone()
                .try_into()
                .map_err(|_| "hash is not 32 bytes".to_owned())?,
        })
    };
    Ok(build())
}

fn bad_row(id: i64) -> impl Fn(String) -> LedgerError {
    move |reason| LedgerError::Invalid {
        field: "entries",
        reason: format!("entry {id}: {reason}"),
    }
}

/// The entry `query` (one of the `ENTRY_*` statements) finds with `arg`.
fn entry_where(conn: &Connection, query: &str, arg: &dyn rusqlite::ToSql) -> Result<Option<Entry>> {
    let mut s = conn
        .prepare_cached(query)
        .map_err(|error| LedgerError::Sqlite {
            path: String::new(),
            op: "read an entry",
            error,
        })?;
    entry_by(&mut s, arg)
}

/// The entry a prepared `ENTRY_*` statement finds with `arg`.
fn entry_by(s: &mut rusqlite::Statement<'_>, arg: &dyn rusqlite::ToSql) -> Result<Option<Entry>> {
    let found = s
        .query_row([arg], row_entry)
        .optional()
        .map_err(|error| LedgerError::Sqlite {
            path: String::new(),
            op: "read an entry",
            error,
        })?;
    match found {
        None => Ok(None),
        Some(Ok(e)) => Ok(Some(e)),
        Some(Err(reason)) => Err(bad_row(0)(reason)),
    }
}

/// The statements each posting runs, prepared once per transaction (a run's transaction posts
/// 20,000 requests: looking each statement up in the connection's cache by its text, five
/// times a request, was measurable).
struct Stmts<'c> {
    by_key: rusqlite::CachedStatement<'c>,
    by_id: rusqlite::CachedStatement<'c>,
    resolving: rusqlite::CachedStatement<'c>,
    insert: rusqlite::CachedStatement<'c>,
}

impl<'c> Stmts<'c> {
    fn new(conn: &'c Connection) -> rusqlite::Result<Self> {
        Ok(Self {
            by_key: conn.prepare_cached(ENTRY_BY_KEY)?,
            by_id: conn.prepare_cached(ENTRY_BY_ID)?,
            resolving: conn.prepare_cached(ENTRY_RESOLVING)?,
            insert: conn.prepare_cached(INSERT_ENTRY)?,
        })
    }
}

/// The account's id: a user account must exist; the others are made on first use.
fn account_id(tx: &Connection, a: &AccountRef, create: bool) -> rusqlite::Result<Option<i64>> {
    if create && !matches!(a, AccountRef::User(_)) {
        tx.prepare_cached("INSERT OR IGNORE INTO accounts (kind, name) VALUES (?1, ?2)")?
            .execute(params![a.kind(), a.name()])?;
    }
    tx.prepare_cached("SELECT id FROM accounts WHERE kind = ?1 AND name = ?2")?
        .query_row(params![a.kind(), a.name()], |r| r.get(0))
        .optional()
}

fn resolve(tx: &Connection, a: &AccountRef) -> Result<i64> {
    account_id(tx, a, true)
        .map_err(|error| LedgerError::Sqlite {
            path: String::new(),
            op: "find an account",
            error,
        })?
        .ok_or_else(|| LedgerError::UnknownUser(a.name().to_owned()))
}

/// What one transaction's postings do to balances: account ids as they are found, and the
/// columns' deltas, written once per account when the postings are done ([`Moves::write`]).
/// A run's batch moves the two revenue accounts thousands of times; reading and rewriting a
/// row per posting and side was four statements per posting.
#[derive(Default)]
struct Moves {
    ids: HashMap<AccountRef, i64>,
    /// Debits posted, credits posted, debits pending, credits pending.
    deltas: HashMap<i64, [i64; 4]>,
}

impl Moves {
    fn resolve(&mut self, tx: &Connection, a: &AccountRef) -> Result<i64> {
        if let Some(&id) = self.ids.get(a) {
            return Ok(id);
        }
        let id = resolve(tx, a)?;
        self.ids.insert(a.clone(), id);
        Ok(id)
    }

    /// Adds `posted`/`pending` to an account's debit (`side` 0) or credit (1) columns.
    fn add(&mut self, id: i64, side: usize, posted: i64, pending: i64) -> Result<()> {
        let d = self.deltas.entry(id).or_default();
        d[side] = d[side].checked_add(posted).ok_or_else(overflow)?;
        d[side + 2] = d[side + 2].checked_add(pending).ok_or_else(overflow)?;
        Ok(())
    }

    /// Writes each moved account's columns (in id order), checked against overflow.
    fn write(&self, tx: &Connection) -> Result<()> {
        let q = |error| LedgerError::Sqlite {
            path: String::new(),
            op: "update a balance",
            error,
        };
        let mut ids: Vec<&i64> = self.deltas.keys().collect();
        ids.sort_unstable();
        for id in ids {
            let d = self.deltas[id];
            let cols: [i64; 4] = tx
                .prepare_cached(
                    "SELECT debits_posted, credits_posted, debits_pending, credits_pending \
                     FROM accounts WHERE id = ?1",
                )
                .and_then(|mut s| {
                    s.query_row([id], |r| Ok([r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?]))
                })
                .map_err(q)?;
            let mut new = [0; 4];
            for k in 0..4 {
                new[k] = cols[k].checked_add(d[k]).ok_or_else(overflow)?;
            }
            tx.prepare_cached(
                "UPDATE accounts SET debits_posted = ?2, credits_posted = ?3, \
                 debits_pending = ?4, credits_pending = ?5 WHERE id = ?1",
            )
            .and_then(|mut s| s.execute(params![id, new[0], new[1], new[2], new[3]]))
            .map_err(q)?;
        }
        Ok(())
    }
}

fn overflow() -> LedgerError {
    LedgerError::Money(crate::billing::money::MoneyError::Arithmetic)
}

fn put_user(tx: &Connection, a: &UserAccount) -> rusqlite::Result<()> {
    tx.prepare_cached("INSERT OR IGNORE INTO accounts (kind, name) VALUES ('user', ?1)")?
        .execute([&a.login])?;
    tx.prepare_cached(
        "INSERT INTO users (account_id, login, staff_no, real_name, class, status, note)
         SELECT id, ?1, ?2, ?3, ?4, ?5, ?6 FROM accounts WHERE kind = 'user' AND name = ?1
         ON CONFLICT (account_id) DO UPDATE SET staff_no = ?2, real_name = ?3,
             class = ?4, status = ?5, note = ?6",
    )?
    .execute(params![
        a.login,
        a.staff_no,
        a.real_name,
        a.class,
        a.status.as_str(),
        a.note
    ])?;
    Ok(())
}

fn read_head(tx: &Connection) -> rusqlite::Result<Option<Head>> {
    tx.prepare_cached("SELECT last_id, hash FROM head WHERE one = 1")?
        .query_row([], |r| {
            let id: i64 = r.get(0)?;
            let h: Vec<u8> = r.get(1)?;
            Ok((id, h))
        })
        .optional()
        .map(|o| {
            o.map(|(id, h)| Head {
                id,
                hash: h.try_into().unwrap_or([0xff; 32]),
            })
        })
}

/// Does a stored entry record the same request (a replay), or another one (a conflict)?
fn same_request(tx: &Connection, e: &Entry, p: &Posting) -> Result<bool> {
    Ok(match p {
        Posting::Transfer {
            kind,
            debit,
            credit,
            amount,
            pending,
        } => {
            let phase = Phase::of_transfer(*pending);
            let id = |a| account_id(tx, a, false).ok().flatten();
            e.kind == *kind
                && e.phase == phase
                && e.amount == *amount
                && Some(e.debit) == id(debit)
                && Some(e.credit) == id(credit)
        }
        Posting::PostPending { pending_id, amount } => {
            e.phase == Phase::Post
                && e.pending_id == Some(*pending_id)
                && amount.is_none_or(|a| a == e.amount)
        }
        Posting::VoidPending { pending_id } => {
            e.phase == Phase::Void && e.pending_id == Some(*pending_id)
        }
    })
}

/// One request inside a transaction; `head` moves on when an entry is written.
fn apply(
    tx: &Connection,
    stmts: &mut Stmts<'_>,
    head: &mut Head,
    moves: &mut Moves,
    req: &Request,
) -> Result<Posted> {
    req.validate()?;
    if let Some(e) = entry_by(&mut stmts.by_key, &req.key)? {
        if same_request(tx, &e, &req.posting)? {
            return Ok(Posted {
                entry: e,
                replayed: true,
            });
        }
        return Err(LedgerError::KeyConflict {
            key: req.key.clone(),
            id: e.id,
        });
    }
    // `reserved`: the pending transfer's amount, which a post or void releases.
    let (kind, phase, debit, credit, amount, pending_id, reserved) = match &req.posting {
        Posting::Transfer {
            kind,
            debit,
            credit,
            amount,
            pending,
        } => {
            let phase = Phase::of_transfer(*pending);
            (
                *kind,
                phase,
                moves.resolve(tx, debit)?,
                moves.resolve(tx, credit)?,
                *amount,
                None,
                0,
            )
        }
        Posting::PostPending { pending_id, .. } | Posting::VoidPending { pending_id } => {
            let p = entry_by(&mut stmts.by_id, pending_id)?
                .ok_or(LedgerError::UnknownEntry(*pending_id))?;
            if p.phase != Phase::Pending {
                return Err(LedgerError::NotPending(p.id));
            }
            if let Some(by) = entry_by(&mut stmts.resolving, pending_id)? {
                return Err(LedgerError::AlreadyResolved {
                    pending: p.id,
                    by: by.id,
                });
            }
            let (phase, amount) = match &req.posting {
                Posting::PostPending { amount, .. } => {
                    let a = amount.unwrap_or(p.amount);
                    if a > p.amount {
                        return Err(LedgerError::PostExceedsPending {
                            pending: p.id,
                            amount: a,
                            reserved: p.amount,
                        });
                    }
                    (Phase::Post, a)
                }
                _ => (Phase::Void, p.amount),
            };
            (
                p.kind,
                phase,
                p.debit,
                p.credit,
                amount,
                Some(p.id),
                p.amount.minor(),
            )
        }
    };
    let mut e = Entry {
        id: head.id + 1,
        key: req.key.clone(),
        kind,
        phase,
        debit,
        credit,
        amount,
        pending_id,
        at_ms: req.at_ms,
        memo: req.memo.clone(),
        prev_hash: head.hash,
        hash: [0; 32],
    };
    e.hash = chain::hash(&head.hash, &e);
    let a = amount.minor();
    let (posted, pending) = match phase {
        Phase::Posted => (a, 0),
        Phase::Pending => (0, a),
        Phase::Post => (a, -reserved),
        Phase::Void => (0, -a),
    };
    moves.add(debit, 0, posted, pending)?;
    moves.add(credit, 1, posted, pending)?;
    stmts
        .insert
        .execute(params![
            e.id,
            e.key,
            e.kind.as_str(),
            e.phase.as_str(),
            e.debit,
            e.credit,
            e.amount.minor(),
            e.pending_id,
            e.at_ms,
            e.memo,
            &e.prev_hash[..],
            &e.hash[..],
        ])
        .map_err(|error| LedgerError::Sqlite {
            path: String::new(),
            op: "insert an entry",
            error,
        })?;
    head.id = e.id;
    head.hash = e.hash;
    Ok(Posted {
        entry: e,
        replayed: false,
    })
}

impl SqliteLedger {
    /// Runs `requests` in one transaction; the head is read once and written once.
    fn post_all(&mut self, requests: &[Request]) -> Result<Vec<Posted>> {
        self.post_all_with(requests, |_, _| Ok(()))
    }

    /// [`Self::post_all`], then `more` in the same transaction (with what was posted).
    fn post_all_with<'r>(
        &mut self,
        requests: impl IntoIterator<Item = &'r Request>,
        more: impl FnOnce(&Transaction<'_>, &[Posted]) -> Result<()>,
    ) -> Result<Vec<Posted>> {
        let path = self.path.clone();
        let with_path = |e: LedgerError| match e {
            LedgerError::Sqlite { op, error, .. } => LedgerError::Sqlite {
                path: path.clone(),
                op,
                error,
            },
            other => other,
        };
        let tx = self.tx()?;
        let mut head = read_head(&tx)
            .map_err(sql(&path, "read the head"))?
            .unwrap_or(Head {
                id: 0,
                hash: chain::GENESIS,
            });
        let start = head.id;
        let requests = requests.into_iter();
        let mut out = Vec::with_capacity(requests.size_hint().0);
        let mut moves = Moves::default();
        {
            let mut stmts = Stmts::new(&tx).map_err(sql(&path, "prepare the postings"))?;
            for r in requests {
                out.push(apply(&tx, &mut stmts, &mut head, &mut moves, r).map_err(with_path)?);
            }
        }
        moves.write(&tx).map_err(with_path)?;
        if head.id != start {
            tx.prepare_cached(
                "INSERT INTO head (one, last_id, hash) VALUES (1, ?1, ?2) \
                 ON CONFLICT (one) DO UPDATE SET last_id = ?1, hash = ?2",
            )
            .and_then(|mut s| s.execute(params![head.id, &head.hash[..]]))
            .map_err(sql(&path, "write the head"))?;
        }
        more(&tx, &out).map_err(with_path)?;
        tx.commit().map_err(sql(&path, "commit"))?;
        Ok(out)
    }

    fn balance_of(&self, id: i64, account: AccountRef) -> Result<Balance> {
        let cols: [i64; 4] = self
            .conn
            .prepare_cached(
                "SELECT debits_posted, credits_posted, debits_pending, credits_pending \
                 FROM accounts WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([id], |r| Ok([r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?]))
            })
            .map_err(self.err("read a balance"))?;
        Ok(Balance {
            account,
            id,
            debits_posted: Money::from_minor(cols[0]),
            credits_posted: Money::from_minor(cols[1]),
            debits_pending: Money::from_minor(cols[2]),
            credits_pending: Money::from_minor(cols[3]),
        })
    }

    fn verify_rows(&self, v: &mut Verifier) -> Result<Option<Problem>> {
        let mut s = self
            .conn
            .prepare(&format!("SELECT {ENTRY_COLS} FROM entries ORDER BY id"))
            .map_err(self.err("read the entries"))?;
        let mut rows = s.query([]).map_err(self.err("read the entries"))?;
        while let Some(r) = rows.next().map_err(self.err("read the entries"))? {
            let e = row_entry(r).map_err(self.err("read an entry"))?;
            let e = match e {
                Ok(e) => e,
                Err(what) => {
                    let id = r.get(0).ok();
                    return Ok(Some(Problem {
                        entry: id,
                        account: None,
                        what,
                    }));
                }
            };
            if let Err(p) = v.entry(&e) {
                return Ok(Some(p));
            }
        }
        let head = read_head(&self.conn).map_err(self.err("read the head"))?;
        if let Err(p) = v.head(head.map(|h| (h.id, h.hash))) {
            return Ok(Some(p));
        }
        let mut s = self
            .conn
            .prepare(
                "SELECT id, kind, name, debits_posted, credits_posted, debits_pending, \
                 credits_pending FROM accounts ORDER BY id",
            )
            .map_err(self.err("read the accounts"))?;
        let mut rows = s.query([]).map_err(self.err("read the accounts"))?;
        while let Some(r) = rows.next().map_err(self.err("read the accounts"))? {
            let read = || -> rusqlite::Result<(i64, String, [i64; 4])> {
                let kind: String = r.get(1)?;
                let name: String = r.get(2)?;
                Ok((
                    r.get(0)?,
                    if name.is_empty() {
                        kind
                    } else {
                        format!("{kind}:{name}")
                    },
                    [r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?],
                ))
            };
            let (id, name, cols) = read().map_err(self.err("read an account"))?;
            if let Err(p) = v.account(id, &name, cols) {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }
}

impl DeliveryReader for SqliteLedger {
    fn scan_deliveries(
        &self,
        after: i64,
        upto: i64,
        f: &mut dyn FnMut(DeliveryRow<'_>),
    ) -> Result<()> {
        runs::scan_deliveries(&self.conn, after, upto, f).map_err(self.err("read deliveries"))
    }
}

impl LedgerStore for SqliteLedger {
    fn cursors(&self) -> Result<Cursors> {
        runs::cursors(&self.conn).map_err(self.err("read the run cursors"))
    }

    fn run(&self, period: &str) -> Result<Option<RunRecord>> {
        runs::run(&self.conn, period).map_err(self.err("read a run"))
    }

    fn begin_run(
        &mut self,
        period: &str,
        end_ms: i64,
        meter: (u64, u64),
        now_ms: i64,
    ) -> Result<RunRecord> {
        let path = self.path.clone();
        let tariffs = self.tariffs()?;
        let tx = self.tx()?;
        let r = (|| -> rusqlite::Result<RunRecord> {
            if let Some(r) = runs::run(&tx, period)? {
                return Ok(r);
            }
            let c = runs::cursors(&tx)?;
            let head = read_head(&tx)?.map_or(0, |h| h.id);
            let plan = RunPlan {
                period: period.to_owned(),
                end_ms,
                start_head: head,
                deliveries_after: c.deliveries,
                deliveries_upto: runs::deliveries_upto(&tx, c.deliveries, end_ms)?,
                meter_after: meter.0,
                meter_upto: meter.1,
                tariffs,
            };
            runs::begin(&tx, &plan, now_ms)
        })()
        .map_err(sql(&path, "start a run"))?;
        tx.commit().map_err(sql(&path, "commit"))?;
        Ok(r)
    }

    fn delivery_accounts(&self) -> Result<Vec<(i64, String)>> {
        runs::delivery_accounts(&self.conn).map_err(self.err("read the delivery accounts"))
    }

    fn delivery_reader(&self) -> Result<Option<Box<dyn DeliveryReader>>> {
        Ok(Some(Box::new(Self::open_read_only(Path::new(&self.path))?)))
    }

    fn unbilled(&self, before_period: Option<&str>) -> Result<Vec<Unbilled>> {
        runs::unbilled(&self.conn, before_period).map_err(self.err("read unbilled deliveries"))
    }

    fn open_pending_at(&self, start_head: i64) -> Result<Vec<OpenPending>> {
        runs::open_pending(&self.conn, start_head).map_err(self.err("read the pending transfers"))
    }

    fn consumed_retrievals(&self, after: u64, upto: u64) -> Result<std::collections::HashSet<u64>> {
        runs::consumed_retrievals(&self.conn, after, upto)
            .map_err(self.err("read consumed retrievals"))
    }

    fn run_users(&self) -> Result<Vec<RunUser>> {
        runs::users(&self.conn).map_err(self.err("read the user accounts"))
    }

    fn post_charges(
        &mut self,
        period: &str,
        batch: &[(Option<Request>, Option<ChargeRow>)],
    ) -> Result<usize> {
        let requests = batch.iter().filter_map(|(r, _)| r.as_ref());
        let posted = self.post_all_with(requests, |tx, posted| {
            let mut put = tx
                .prepare_cached(runs::PUT_CHARGE)
                .map_err(sql("", "store a charge"))?;
            let mut next = posted.iter();
            for (r, c) in batch {
                let entry = match r {
                    Some(_) => next.next().map(|p| p.entry.id),
                    None => None,
                };
                if let Some(c) = c {
                    runs::put_charge(&mut put, period, c, entry)
                        .map_err(sql("", "store a charge"))?;
                }
            }
            Ok(())
        })?;
        Ok(posted.iter().filter(|p| !p.replayed).count())
    }

    fn finish_run(&mut self, f: &RunFinish, rules: &StandingRules) -> Result<usize> {
        let path = self.path.clone();
        let tx = self.tx()?;
        let n = runs::finish(&tx, f, rules).map_err(sql(&path, "finish the run"))?;
        tx.commit().map_err(sql(&path, "commit"))?;
        Ok(n)
    }

    fn open_effects(&self, limit: usize) -> Result<Vec<Effect>> {
        runs::open_effects(&self.conn, limit).map_err(self.err("read the run's effects"))
    }

    fn effects_done(&mut self, ids: &[i64], at_ms: i64) -> Result<()> {
        let path = self.path.clone();
        let tx = self.tx()?;
        runs::effects_done(&tx, ids, at_ms).map_err(sql(&path, "mark effects done"))?;
        tx.commit().map_err(sql(&path, "commit"))
    }

    fn restore_if_paid(
        &mut self,
        login: &str,
        rules: &StandingRules,
        period: &str,
        at_ms: i64,
    ) -> Result<bool> {
        let path = self.path.clone();
        let tx = self.tx()?;
        let r = runs::restore_if_paid(&tx, login, rules, period, at_ms)
            .map_err(sql(&path, "restore a paid account"))?;
        tx.commit().map_err(sql(&path, "commit"))?;
        Ok(r)
    }

    fn write_off(&mut self, account: &str, by: &str, at_ms: i64) -> Result<usize> {
        runs::write_off(&self.conn, account, by, at_ms).map_err(self.err("write off deliveries"))
    }

    fn statement_rows(
        &self,
        login: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<(Vec<RetrievalRow>, Vec<ChargeRow>)> {
        runs::statement_rows(&self.conn, login, since_ms, until_ms)
            .map_err(self.err("read a statement"))
    }

    fn statement_data(&self, login: &str, since_ms: i64, until_ms: i64) -> Result<StatementData> {
        // One read transaction: a run finishing meanwhile is in all of it or none.
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(self.err("begin a read"))?;
        let account = self
            .user(login)?
            .ok_or_else(|| LedgerError::UnknownUser(login.to_owned()))?;
        let id = reports::user_account_id(&tx, login)
            .map_err(self.err("read a statement"))?
            .ok_or_else(|| LedgerError::UnknownUser(login.to_owned()))?;
        let entries =
            reports::user_entries(&tx, id, until_ms).map_err(self.err("read a statement"))?;
        let (retrievals, charges) = runs::statement_rows(&tx, login, since_ms, until_ms)
            .map_err(self.err("read a statement"))?;
        Ok(StatementData {
            account,
            entries,
            retrievals,
            charges,
        })
    }

    fn usage(&self, bounds: &[i64]) -> Result<Vec<DayRows>> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(self.err("begin a read"))?;
        reports::usage(&tx, bounds).map_err(self.err("read a usage report"))
    }

    fn unbilled_accounts(&self) -> Result<(Vec<UnbilledAccount>, u64)> {
        reports::unbilled_accounts(&self.conn).map_err(self.err("read unbilled deliveries"))
    }

    fn user_accounts(&self, after: &str, limit: usize) -> Result<Vec<UserAccount>> {
        reports::user_accounts(&self.conn, after, limit).map_err(self.err("read the user accounts"))
    }

    fn write_off_unbilled(
        &mut self,
        account: &str,
        by: &str,
        reason: &str,
        at_ms: i64,
    ) -> Result<Option<WriteOff>> {
        let path = self.path.clone();
        let tx = self.tx()?;
        let w = reports::write_off(&tx, account, by, reason, at_ms)
            .map_err(sql(&path, "write off deliveries"))?;
        tx.commit().map_err(sql(&path, "commit"))?;
        Ok(w)
    }

    fn remember_source(&mut self, message_key: &str, zone: Zone, at_ms: i64) -> Result<()> {
        deliveries::remember_source(&self.conn, message_key, zone, at_ms)
            .map_err(self.err("remember a message's zone"))
    }

    fn record_deliveries(&mut self, batch: &[Delivery]) -> Result<Recorded> {
        for d in batch {
            deliveries::validate(d)?;
        }
        let path = self.path.clone();
        let numbers = std::mem::take(&mut self.numbers);
        let tx = self.tx()?;
        let r = deliveries::record(&tx, &numbers, batch).map_err(sql(&path, "record deliveries"));
        let done = r.and_then(|r| tx.commit().map_err(sql(&path, "commit")).map(|()| r));
        self.numbers = numbers;
        let (r, looked_up) = done?;
        self.numbers.learn(looked_up);
        Ok(r)
    }

    fn unconsumed_deliveries(&self, limit: usize) -> Result<Vec<DeliveryRecord>> {
        deliveries::unconsumed(&self.conn, limit).map_err(self.err("read deliveries"))
    }

    fn put_users(&mut self, accounts: &[UserAccount]) -> Result<()> {
        for a in accounts {
            a.validate()?;
        }
        let path = self.path.clone();
        let tx = self.tx()?;
        for a in accounts {
            put_user(&tx, a).map_err(sql(&path, "write a user account"))?;
        }
        tx.commit().map_err(sql(&path, "commit"))
    }

    fn user(&self, login: &str) -> Result<Option<UserAccount>> {
        let found = self
            .conn
            .prepare_cached(
                "SELECT login, staff_no, real_name, class, status, note FROM users \
                 WHERE login = ?1",
            )
            .and_then(|mut s| {
                s.query_row([login], |r| {
                    Ok((
                        UserAccount {
                            login: r.get(0)?,
                            staff_no: r.get(1)?,
                            real_name: r.get(2)?,
                            class: r.get(3)?,
                            status: Status::Normal,
                            note: r.get(5)?,
                        },
                        r.get::<_, String>(4)?,
                    ))
                })
                .optional()
            })
            .map_err(self.err("read a user account"))?;
        found
            .map(|(mut u, status)| {
                u.status = status.parse()?;
                Ok(u)
            })
            .transpose()
    }

    fn statement(&self, login: &str) -> Result<Statement> {
        let account = self
            .user(login)?
            .ok_or_else(|| LedgerError::UnknownUser(login.to_owned()))?;
        let r = AccountRef::User(login.to_owned());
        let balance = self
            .balance(&r)?
            .ok_or_else(|| LedgerError::UnknownUser(login.to_owned()))?;
        Ok(Statement { account, balance })
    }

    fn balance(&self, account: &AccountRef) -> Result<Option<Balance>> {
        let id = account_id(&self.conn, account, false).map_err(self.err("find an account"))?;
        id.map(|id| self.balance_of(id, account.clone()))
            .transpose()
    }

    fn put_tariff(&mut self, t: &Tariff) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO tariffs (class, zone, price_per_mb, min_charge) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (class, zone) DO UPDATE SET price_per_mb = ?3, min_charge = ?4",
                params![
                    t.class,
                    t.zone,
                    t.price_per_mb.minor(),
                    t.min_charge.minor()
                ],
            )
            .map_err(self.err("write a tariff"))?;
        Ok(())
    }

    fn tariffs(&self) -> Result<Vec<Tariff>> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT class, zone, price_per_mb, min_charge FROM tariffs ORDER BY class, zone",
            )
            .map_err(self.err("read the tariffs"))?;
        let rows = s
            .query_map([], |r| {
                Ok(Tariff {
                    class: r.get(0)?,
                    zone: r.get(1)?,
                    price_per_mb: Money::from_minor(r.get(2)?),
                    min_charge: Money::from_minor(r.get(3)?),
                })
            })
            .map_err(self.err("read the tariffs"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err("read the tariffs"))
    }

    fn post(&mut self, request: &Request) -> Result<Posted> {
        let mut v = self.post_all(std::slice::from_ref(request))?;
        v.pop().ok_or(LedgerError::Stopped)
    }

    fn post_batch(&mut self, requests: &[Request]) -> Result<Vec<Posted>> {
        self.post_all(requests)
    }

    fn entry(&self, id: i64) -> Result<Option<Entry>> {
        entry_where(&self.conn, ENTRY_BY_ID, &id).map_err(|e| self.named(e))
    }

    fn open_pending(&self, older_than_ms: i64, limit: usize) -> Result<Vec<Entry>> {
        let mut s = self
            .conn
            .prepare_cached(&format!(
                "SELECT {ENTRY_COLS} FROM entries e WHERE phase = 'pending' AND at_ms < ?1 \
                 AND NOT EXISTS (SELECT 1 FROM entries r WHERE r.pending_id = e.id) \
                 ORDER BY id LIMIT ?2"
            ))
            .map_err(self.err("read the pending transfers"))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = s
            .query_map(params![older_than_ms, limit], row_entry)
            .map_err(self.err("read the pending transfers"))?;
        let mut out = Vec::new();
        for r in rows {
            let r = r.map_err(self.err("read the pending transfers"))?;
            out.push(r.map_err(bad_row(0))?);
        }
        Ok(out)
    }

    fn verify(&self) -> Result<VerifyReport> {
        // One read transaction: a snapshot, even while the daemon posts.
        self.conn
            .execute_batch("BEGIN DEFERRED")
            .map_err(self.err("begin a read transaction"))?;
        let r = (|| -> Result<VerifyReport> {
            let mut v = Verifier::new();
            if let Some(p) = self.verify_rows(&mut v)? {
                return Ok(failed(p));
            }
            Ok(match v.finish() {
                Ok(report) => report,
                Err(p) => failed(p),
            })
        })();
        let end = self
            .conn
            .execute_batch("COMMIT")
            .map_err(self.err("end a read transaction"));
        let report = r?;
        end?;
        Ok(report)
    }
}

fn failed(p: Problem) -> VerifyReport {
    VerifyReport {
        entries: 0,
        accounts: 0,
        head: String::new(),
        problem: Some(p),
    }
}
