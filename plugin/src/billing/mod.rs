//! Traffic billing. Built so far: the ledger of record ([`ledger`]: accounts, tariffs,
//! double-entry postings with two-phase transfers, idempotency keys, a hash chain and
//! `verify`), [`money`] (integer minor units) and [`Ledger`], the handle async code uses: the
//! blocking store lives on its own thread, reached through a bounded channel.
//!
//! The delivery meter ([`ledger::deliveries`]) keeps confirmed deliveries per account and zone
//! in the same file. The accounting run and notices come later; they post through
//! [`Ledger::call`] with the [`ledger::LedgerStore`] methods (`post`, `post_batch`,
//! `open_pending`) and the helpers here ([`topup`], [`adjust`]). [`report`] assembles monthly
//! statements and usage reports from what [`Ledger::read`] reads.

pub mod accountant;
pub mod ledger;
pub mod money;
pub mod report;
pub mod run;
#[cfg(test)]
mod run_tests;
pub mod tariff;

use std::path::{Path, PathBuf};
use std::thread;

use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tracing::info;

use ledger::sqlite::SqliteLedger;
use ledger::{AccountRef, Kind, LedgerError, LedgerStore, Posted, Posting, Request};
use money::Money;

/// `[billing]` in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    /// The highest price per MB a tariff may have ("100.00"): a typo such as "3000" for
    /// "0.30" is refused, not billed.
    pub max_price_per_mb: Money,
    /// Tariff class of accounts made without one.
    pub default_class: String,
    /// Record every confirmed delivery (Stalwart `message-ingest.ham`/`.spam`, milter accept)
    /// in the delivery meter, per account and zone, for the accounting run.
    pub meter_deliveries: bool,
    /// When delivered traffic is charged: "at-retrieval" (the seed's model), "at-delivery",
    /// or "retrieved-bytes".
    pub charge: run::ChargeAt,
    /// Pending traffic older than this many days, never retrieved, is expired.
    pub pending_expiry_days: u32,
    /// What expiry does: "void" (never charged) or "charge".
    pub expired_pending: run::Expiry,
    /// An available balance below this puts the account in arrears.
    pub arrears_below: Money,
    /// Balances below which a warning SMS goes out (one per threshold crossed).
    pub warn_below: Vec<Money>,
    /// Local time ("HH:MM") of the daemon's nightly run of the day before; "" = not scheduled.
    pub run_at: String,
    /// Requests per ledger transaction in a run.
    pub run_batch: usize,
    /// Also withhold Stalwart's read permissions (pop3-retr, imap-fetch) from accounts in
    /// arrears through `[stalwart_api]`, behind the retrieval proxy's own gate.
    pub stalwart_permissions: bool,
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            max_price_per_mb: Money::from_minor(10_000),
            default_class: "default".into(),
            meter_deliveries: false,
            charge: run::ChargeAt::AtRetrieval,
            pending_expiry_days: 90,
            expired_pending: run::Expiry::Void,
            arrears_below: Money::from_minor(0),
            warn_below: vec![Money::from_minor(1_000)],
            run_at: String::new(),
            run_batch: 20_000,
            stalwart_permissions: false,
        }
    }
}

impl BillingConfig {
    /// Checks the values; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !self.max_price_per_mb.is_positive() {
            return Err("billing.max_price_per_mb must be above zero".into());
        }
        if self.default_class.is_empty() {
            return Err("billing.default_class must not be empty".into());
        }
        if self.pending_expiry_days == 0 {
            return Err("billing.pending_expiry_days must be at least 1".into());
        }
        if let Some(t) = self.warn_below.iter().find(|t| **t <= self.arrears_below) {
            return Err(format!(
                "billing.warn_below: {t} is not above billing.arrears_below ({}): a warning comes before arrears",
                self.arrears_below
            ));
        }
        if self.warn_below.len() > 8 {
            return Err("billing.warn_below: at most 8 thresholds".into());
        }
        self.run_time()?;
        if !(1..=100_000).contains(&self.run_batch) {
            return Err("billing.run_batch must be 1 to 100000".into());
        }
        Ok(())
    }

    /// `run_at` as (hour, minute); `None` when the run is not scheduled.
    pub fn run_time(&self) -> Result<Option<(u32, u32)>, String> {
        let t = self.run_at.trim();
        if t.is_empty() {
            return Ok(None);
        }
        let bad = || format!("billing.run_at {t:?}: expected a local time HH:MM, e.g. \"02:30\"");
        let (h, m) = t.split_once(':').ok_or_else(bad)?;
        let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 23 || m > 59 || t.len() != 5 {
            return Err(bad());
        }
        Ok(Some((h, m)))
    }

    /// The run's settings.
    pub fn run_settings(&self) -> run::RunSettings {
        run::RunSettings {
            charge: self.charge,
            pending_expiry_days: self.pending_expiry_days,
            expired_pending: self.expired_pending,
            rules: self.standing_rules(),
            batch: self.run_batch,
        }
    }

    pub fn standing_rules(&self) -> ledger::StandingRules {
        ledger::StandingRules {
            arrears_below: self.arrears_below,
            warn_below: self.warn_below.clone(),
        }
    }
}

/// Where the ledger lives under the data directory.
pub fn ledger_path(data_dir: &Path) -> PathBuf {
    data_dir.join("billing").join("ledger.sqlite")
}

type Job = Box<dyn FnOnce(&mut dyn LedgerStore) + Send>;

/// Requests waiting for the ledger thread.
const QUEUE: usize = 256;

/// The ledger, for async code: a thread owns the store; [`Ledger::call`] runs a closure on
/// it. Cloning shares the thread; it ends when the last clone is dropped.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Job>,
    /// The SQLite file, for readers beside the writer thread.
    path: Option<PathBuf>,
}

impl Ledger {
    /// Opens the SQLite ledger at `path` on a new thread.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let store = SqliteLedger::open(path)?;
        let mut me = Self::spawn(Box::new(store))?;
        me.path = Some(path.to_owned());
        Ok(me)
    }

    /// Runs `store` on a new thread (tests pass other stores).
    pub fn spawn(mut store: Box<dyn LedgerStore>) -> Result<Self, LedgerError> {
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        thread::Builder::new()
            .name("ledger".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    job(store.as_mut());
                }
            })
            .map_err(|error| LedgerError::Io {
                path: String::new(),
                op: "start the ledger thread",
                error,
            })?;
        Ok(Self { tx, path: None })
    }

    /// [`LedgerStore::verify`] on a connection of its own when the ledger is a file (postings
    /// go on meanwhile; verify reads a snapshot), else on the ledger's thread.
    pub async fn verify(&self) -> Result<ledger::VerifyReport, LedgerError> {
        let Some(path) = self.path.clone() else {
            return self.call(|s| s.verify()).await;
        };
        tokio::task::spawn_blocking(move || SqliteLedger::open_read_only(&path)?.verify())
            .await
            .map_err(|_| LedgerError::Stopped)?
    }

    /// Runs the read `f` on a connection of its own when the ledger is a file (a report over
    /// millions of rows does not hold up postings), else on the ledger's thread.
    pub async fn read<T, F>(&self, f: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn LedgerStore) -> Result<T, LedgerError> + Send + 'static,
    {
        let Some(path) = self.path.clone() else {
            return self.call(move |s| f(s)).await;
        };
        tokio::task::spawn_blocking(move || f(&SqliteLedger::open_read_only(&path)?))
            .await
            .map_err(|_| LedgerError::Stopped)?
    }

    /// Runs `f` on the ledger's thread and returns its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn LedgerStore) -> Result<T, LedgerError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Box::new(move |s: &mut dyn LedgerStore| {
                let _ = reply.send(f(s));
            }))
            .await
            .map_err(|_| LedgerError::Stopped)?;
        answer.await.map_err(|_| LedgerError::Stopped)?
    }
}

/// A top-up: `amount` (above zero) from cash to the user.
pub fn topup(
    store: &mut dyn LedgerStore,
    login: &str,
    amount: Money,
    key: &str,
    note: &str,
    at_ms: i64,
) -> Result<Posted, LedgerError> {
    if !amount.is_positive() {
        return Err(LedgerError::NotPositive(amount));
    }
    known(store, login)?;
    let p = store.post(&Request {
        key: key.to_owned(),
        posting: Posting::Transfer {
            kind: Kind::Topup,
            debit: AccountRef::Cash,
            credit: AccountRef::User(login.to_owned()),
            amount,
            pending: false,
        },
        memo: note.to_owned(),
        at_ms,
    })?;
    if !p.replayed {
        info!(user = login, amount = %amount, entry = p.entry.id, "billing top-up");
    }
    Ok(p)
}

/// An operator's correction: a positive `amount` credits the user, a negative one debits.
pub fn adjust(
    store: &mut dyn LedgerStore,
    login: &str,
    amount: Money,
    key: &str,
    reason: &str,
    at_ms: i64,
) -> Result<Posted, LedgerError> {
    if reason.trim().is_empty() {
        return Err(LedgerError::Invalid {
            field: "reason",
            reason: "an adjustment needs a reason".into(),
        });
    }
    known(store, login)?;
    let user = AccountRef::User(login.to_owned());
    let (debit, credit) = if amount.is_negative() {
        (user, AccountRef::Adjustment)
    } else {
        (AccountRef::Adjustment, user)
    };
    let p = store.post(&Request {
        key: key.to_owned(),
        posting: Posting::Transfer {
            kind: Kind::Adjustment,
            debit,
            credit,
            amount: amount.checked_abs()?,
            pending: false,
        },
        memo: reason.to_owned(),
        at_ms,
    })?;
    if !p.replayed {
        info!(user = login, amount = %amount, entry = p.entry.id, reason, "billing adjustment");
    }
    Ok(p)
}

fn known(store: &dyn LedgerStore, login: &str) -> Result<(), LedgerError> {
    match store.user(login)? {
        Some(_) => Ok(()),
        None => Err(LedgerError::UnknownUser(login.to_owned())),
    }
}
