//! The ledger of record: accounts, tariffs and double-entry postings behind a narrow storage
//! boundary ([`LedgerStore`]); [`sqlite::SqliteLedger`] is the implementation today, a
//! PostgreSQL one can slot in beside it. [`chain`] is the hash chain both share and
//! [`verify`] the checks `mailbell billing verify` runs.
//!
//! Every posting is a transfer of a positive amount from a debit account to a credit account,
//! so the sum of all balances (credits − debits) is always zero:
//!
//! ```text
//! top-up       cash        -> user          (kind topup)
//! adjustment   adjustment  -> user  or  user -> adjustment   (kind adjustment)
//! charge       user        -> revenue:<zone>                  (kind charge)
//! ```
//!
//! Two-phase transfers follow TigerBeetle: a `pending` transfer reserves its amount in both
//! accounts' pending columns; a later `post` (of at most that amount) moves it to the posted
//! columns, or a `void` releases it. Each pending transfer is resolved at most once.

pub mod chain;
pub mod deliveries;
pub mod reports;
pub mod runs;
pub mod sqlite;
pub mod verify;

#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::billing::money::{Money, MoneyError};

use crate::policy::zones::Zone;
pub use deliveries::{Delivery, DeliveryRecord, Recorded};
pub use reports::{DayRows, StatementData, UnbilledAccount, UserEntry, WriteOff};
pub use runs::{
    ChargeRow, Cursors, DeliveryRow, Effect, EffectKind, OpenPending, RetrievalRow, RunFinish,
    RunPlan, RunRecord, RunUser, StandingRules, Unbilled,
};
pub use verify::{Problem, VerifyReport};

/// Longest idempotency key, memo and account text field, in bytes.
pub const MAX_KEY_LEN: usize = 200;
pub const MAX_TEXT_LEN: usize = 500;

/// Ledger errors. Each names what it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    #[error("ledger {path}: {op}")]
    Sqlite {
        path: String,
        op: &'static str,
        #[source]
        error: rusqlite::Error,
    },
    #[error("ledger {path}: {op}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        error: std::io::Error,
    },
    #[error("unknown account {0:?}")]
    UnknownUser(String),
    #[error("entry {0} does not exist")]
    UnknownEntry(i64),
    #[error("entry {0} is not a pending transfer")]
    NotPending(i64),
    #[error("pending transfer {pending} was already resolved by entry {by}")]
    AlreadyResolved { pending: i64, by: i64 },
    #[error("post of {amount} exceeds pending transfer {pending}'s {reserved}")]
    PostExceedsPending {
        pending: i64,
        amount: Money,
        reserved: Money,
    },
    #[error("idempotency key {key:?} was used by entry {id} for a different request")]
    KeyConflict { key: String, id: i64 },
    #[error("a transfer moves an amount above zero, not {0}")]
    NotPositive(Money),
    #[error("a transfer needs two different accounts, not {0} twice")]
    SameAccount(AccountRef),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("tariff {class}/{zone}: price {price} per MB is above the cap {cap} (billing.max_price_per_mb)")]
    PriceOverCap {
        class: String,
        zone: String,
        price: Money,
        cap: Money,
    },
    #[error(transparent)]
    Money(#[from] MoneyError),
    #[error("the ledger thread has stopped")]
    Stopped,
}

pub type Result<T, E = LedgerError> = std::result::Result<T, E>;

/// A ledger account, as postings name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "lowercase")]
pub enum AccountRef {
    /// A mail user's prepaid balance (the login: the registry address).
    User(String),
    /// What the operator earned from a zone's traffic.
    Revenue(String),
    /// Money received (top-ups).
    Cash,
    /// Operator corrections.
    Adjustment,
}

impl AccountRef {
    pub fn kind(&self) -> &'static str {
        match self {
            AccountRef::User(_) => "user",
            AccountRef::Revenue(_) => "revenue",
            AccountRef::Cash => "cash",
            AccountRef::Adjustment => "adjustment",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            AccountRef::User(n) | AccountRef::Revenue(n) => n,
            AccountRef::Cash | AccountRef::Adjustment => "",
        }
    }
}

impl fmt::Display for AccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountRef::User(n) | AccountRef::Revenue(n) => write!(f, "{}:{n}", self.kind()),
            _ => f.write_str(self.kind()),
        }
    }
}

/// What a transfer is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Topup,
    Adjustment,
    Charge,
}

/// Where a transfer is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Applied to the posted balances at once.
    Posted,
    /// Reserved in the pending columns until a `Post` or `Void` entry resolves it.
    Pending,
    /// Resolves a pending transfer: its amount moves to the posted balances.
    Post,
    /// Resolves a pending transfer: its reservation is released.
    Void,
}

impl Phase {
    /// The phase of a [`Posting::Transfer`] entry.
    pub fn of_transfer(pending: bool) -> Phase {
        if pending {
            Phase::Pending
        } else {
            Phase::Posted
        }
    }
}

macro_rules! text_enum {
    ($t:ty, $($v:ident = $s:literal),+) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(<$t>::$v => $s),+ }
            }
        }
        impl FromStr for $t {
            type Err = LedgerError;
            fn from_str(s: &str) -> Result<Self> {
                match s { $($s => Ok(<$t>::$v),)+ _ => Err(LedgerError::Invalid {
                    field: stringify!($t),
                    reason: format!("{s:?} is not one of {}", [$($s),+].join(", ")),
                }) }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(
    Kind,
    Topup = "topup",
    Adjustment = "adjustment",
    Charge = "charge"
);
text_enum!(
    Phase,
    Posted = "posted",
    Pending = "pending",
    Post = "post",
    Void = "void"
);
text_enum!(
    Status,
    Normal = "normal",
    Arrears = "arrears",
    Unwelcome = "unwelcome"
);

/// An account's standing (the seed's 状态: 正常, 欠费, 不受欢迎).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Normal,
    Arrears,
    Unwelcome,
}

/// A mail user's billing account: the seed's user table (mailusrtab) without the password,
/// which stays with the user registry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserAccount {
    /// The registry address (lower-cased).
    pub login: String,
    /// Staff or student number (学号/证号).
    pub staff_no: String,
    /// Real name (真实姓名).
    pub real_name: String,
    /// Tariff class (用户类型).
    pub class: String,
    pub status: Status,
    /// Free text (备注).
    pub note: String,
}

impl UserAccount {
    /// Checks the field sizes; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if self.login.is_empty() || self.login.len() > MAX_KEY_LEN {
            return Err(invalid("login", "1 to 200 bytes"));
        }
        if self.class.is_empty() || self.class.len() > MAX_KEY_LEN {
            return Err(invalid("class", "1 to 200 bytes"));
        }
        for (field, v) in [
            ("staff_no", &self.staff_no),
            ("real_name", &self.real_name),
            ("note", &self.note),
        ] {
            if v.len() > MAX_TEXT_LEN {
                return Err(invalid(field, "at most 500 bytes"));
            }
        }
        Ok(())
    }
}

fn invalid(field: &'static str, reason: &str) -> LedgerError {
    LedgerError::Invalid {
        field,
        reason: reason.to_owned(),
    }
}

/// The price of a zone's traffic for one tariff class. A free zone has price zero.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tariff {
    pub class: String,
    pub zone: String,
    pub price_per_mb: Money,
    /// The least a non-zero charge in this zone comes to.
    pub min_charge: Money,
}

impl Tariff {
    /// Checks the tariff against the operator's sanity cap (`billing.max_price_per_mb`).
    pub fn checked(self, cap: Money) -> Result<Tariff> {
        if self.class.is_empty() || self.class.len() > MAX_KEY_LEN {
            return Err(invalid("class", "1 to 200 bytes"));
        }
        if self.zone.is_empty() || self.zone.len() > MAX_KEY_LEN {
            return Err(invalid("zone", "1 to 200 bytes"));
        }
        if self.price_per_mb.is_negative() || self.min_charge.is_negative() {
            return Err(invalid("price", "a price is never negative"));
        }
        if self.price_per_mb > cap {
            return Err(LedgerError::PriceOverCap {
                class: self.class,
                zone: self.zone,
                price: self.price_per_mb,
                cap,
            });
        }
        Ok(self)
    }
}

/// What a posting does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Posting {
    /// Moves `amount` from `debit` to `credit`, posted at once or (`pending`) reserved.
    Transfer {
        kind: Kind,
        debit: AccountRef,
        credit: AccountRef,
        amount: Money,
        pending: bool,
    },
    /// Posts a pending transfer: `amount` (at most the reserved one; `None`: all of it).
    PostPending {
        pending_id: i64,
        amount: Option<Money>,
    },
    /// Releases a pending transfer.
    VoidPending { pending_id: i64 },
}

/// A posting with its idempotency key: the same key again returns the first entry and
/// changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub key: String,
    pub posting: Posting,
    /// Free text recorded with the entry (a note, an adjustment's reason).
    pub memo: String,
    /// When it happened (Unix ms), e.g. the retrieval's time for a charge.
    pub at_ms: i64,
}

impl Request {
    pub fn validate(&self) -> Result<()> {
        if self.key.is_empty() || self.key.len() > MAX_KEY_LEN {
            return Err(invalid("key", "an idempotency key has 1 to 200 bytes"));
        }
        if self.memo.len() > MAX_TEXT_LEN {
            return Err(invalid("memo", "at most 500 bytes"));
        }
        match &self.posting {
            Posting::Transfer {
                debit,
                credit,
                amount,
                ..
            } => {
                if !amount.is_positive() {
                    return Err(LedgerError::NotPositive(*amount));
                }
                if debit == credit {
                    return Err(LedgerError::SameAccount(debit.clone()));
                }
            }
            Posting::PostPending {
                amount: Some(a), ..
            } if !a.is_positive() => return Err(LedgerError::NotPositive(*a)),
            _ => {}
        }
        Ok(())
    }
}

/// One row of the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// 1, 2, 3, … without gaps.
    pub id: i64,
    pub key: String,
    pub kind: Kind,
    pub phase: Phase,
    /// Account ids (see [`AccountRef`] for what they are).
    pub debit: i64,
    pub credit: i64,
    pub amount: Money,
    /// For `post` and `void`: the pending entry resolved.
    pub pending_id: Option<i64>,
    pub at_ms: i64,
    pub memo: String,
    #[serde(with = "hex_hash")]
    pub prev_hash: [u8; 32],
    #[serde(with = "hex_hash")]
    pub hash: [u8; 32],
}

mod hex_hash {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(&s).map_err(serde::de::Error::custom)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom("a hash has 32 bytes"))
    }
}

/// The outcome of a request: its entry, and whether it was a replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posted {
    pub entry: Entry,
    pub replayed: bool,
}

/// An account's balances: posted and pending, each credits − debits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    pub account: AccountRef,
    pub id: i64,
    pub debits_posted: Money,
    pub credits_posted: Money,
    pub debits_pending: Money,
    pub credits_pending: Money,
}

impl Balance {
    /// What the account holds now: credits − debits, posted only.
    pub fn posted(&self) -> Result<Money> {
        Ok(self.credits_posted.checked_sub(self.debits_posted)?)
    }

    /// The posted balance less what pending transfers reserve against it.
    pub fn available(&self) -> Result<Money> {
        Ok(self.posted()?.checked_sub(self.debits_pending)?)
    }
}

/// A user account with its balance (`billing balance USER`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    pub account: UserAccount,
    pub balance: Balance,
}

/// Reads delivery records: the store itself, or a reader on a thread of its own
/// ([`LedgerStore::delivery_reader`]).
pub trait DeliveryReader: Send {
    /// Calls `f` with the deliveries with ids in `(after, upto]`, in id order.
    fn scan_deliveries(
        &self,
        after: i64,
        upto: i64,
        f: &mut dyn FnMut(DeliveryRow<'_>),
    ) -> Result<()>;
}

/// The storage boundary the rest of billing uses. Blocking: call it from the ledger's own
/// thread ([`crate::billing::Ledger`]), never from async code directly.
pub trait LedgerStore: DeliveryReader {
    /// Creates or replaces a user account's fields (the balance is untouched).
    fn put_user(&mut self, account: &UserAccount) -> Result<()> {
        self.put_users(std::slice::from_ref(account))
    }
    /// [`LedgerStore::put_user`] for many, in one transaction (an import).
    fn put_users(&mut self, accounts: &[UserAccount]) -> Result<()>;
    fn user(&self, login: &str) -> Result<Option<UserAccount>>;
    /// A user's account and balances; [`LedgerError::UnknownUser`] when there is none.
    fn statement(&self, login: &str) -> Result<Statement>;
    fn balance(&self, account: &AccountRef) -> Result<Option<Balance>>;
    fn put_tariff(&mut self, tariff: &Tariff) -> Result<()>;
    fn tariffs(&self) -> Result<Vec<Tariff>>;
    /// Applies one request in one transaction (or returns the entry its key made before).
    fn post(&mut self, request: &Request) -> Result<Posted>;
    /// Applies several requests in one transaction: all or none.
    fn post_batch(&mut self, requests: &[Request]) -> Result<Vec<Posted>>;
    fn entry(&self, id: i64) -> Result<Option<Entry>>;
    /// Pending transfers not resolved yet, oldest first, at most `limit` (for the accounting
    /// run's expiry of traffic that is never retrieved).
    fn open_pending(&self, older_than_ms: i64, limit: usize) -> Result<Vec<Entry>>;
    /// Checks the hash chain, the zero-sum invariant and every stored balance.
    fn verify(&self) -> Result<VerifyReport>;
    /// Remembers the zone a message was classified in at SMTP time (durable on return), for
    /// its deliveries reported later without one.
    fn remember_source(&mut self, message_key: &str, zone: Zone, at_ms: i64) -> Result<()>;
    /// Records deliveries in one transaction, durable on return; a (message, account) pair
    /// already recorded is left unchanged (a resent webhook batch counts once).
    fn record_deliveries(&mut self, batch: &[Delivery]) -> Result<Recorded>;
    /// Delivery records no accounting run has consumed yet, oldest first, at most `limit`.
    fn unconsumed_deliveries(&self, limit: usize) -> Result<Vec<DeliveryRecord>>;

    // The accounting run (`billing::run`; docs/billing.md, "The accounting run").

    /// Where the last finished run stopped reading.
    fn cursors(&self) -> Result<Cursors>;
    fn run(&self, period: &str) -> Result<Option<RunRecord>>;
    /// Starts the run of `period` (or returns its row when it has one): fixes its inputs —
    /// deliveries from the cursor up to the first one at or after `end_ms`, retrieval meter
    /// ids `meter` (after, upto], the tariffs and the entry head.
    fn begin_run(
        &mut self,
        period: &str,
        end_ms: i64,
        meter: (u64, u64),
        now_ms: i64,
    ) -> Result<RunRecord>;
    /// Every account a delivery was recorded for, with its number
    /// ([`DeliveryRow::account_no`]), by number.
    fn delivery_accounts(&self) -> Result<Vec<(i64, String)>>;
    /// A second reader of the delivery records that another thread can use while this store
    /// scans (the run reads the two halves of its range at once, one per core); `None` when
    /// the store has none.
    fn delivery_reader(&self) -> Result<Option<Box<dyn DeliveryReader>>> {
        Ok(None)
    }
    /// Deliveries to unknown accounts kept by runs before `before_period`, not written off.
    fn unbilled(&self, before_period: Option<&str>) -> Result<Vec<Unbilled>>;
    /// Pending transfers (user → revenue) open when entry `start_head` was the last.
    fn open_pending_at(&self, start_head: i64) -> Result<Vec<OpenPending>>;
    fn run_users(&self) -> Result<Vec<RunUser>>;
    /// Retrieval meter ids in `(after, upto]` consumed by an earlier run (a replayed meter
    /// segment), to be skipped.
    fn consumed_retrievals(&self, after: u64, upto: u64) -> Result<std::collections::HashSet<u64>>;
    /// Posts a batch of the run's requests with their charge rows, in one transaction;
    /// returns how many entries are new (a resumed run replays the rest).
    fn post_charges(
        &mut self,
        period: &str,
        batch: &[(Option<Request>, Option<ChargeRow>)],
    ) -> Result<usize>;
    /// Ends a run: cursors, retrievals, unbilled deliveries, standings and their effects in
    /// one transaction; returns how many effects it added.
    fn finish_run(&mut self, finish: &RunFinish, rules: &StandingRules) -> Result<usize>;
    /// Effects not carried out yet, oldest first.
    fn open_effects(&self, limit: usize) -> Result<Vec<Effect>>;
    fn effects_done(&mut self, ids: &[i64], at_ms: i64) -> Result<()>;
    /// After a top-up: an account in arrears whose balance is back to the threshold is
    /// normal again at once (with a state effect recorded under `period`).
    fn restore_if_paid(
        &mut self,
        login: &str,
        rules: &StandingRules,
        period: &str,
        at_ms: i64,
    ) -> Result<bool>;
    /// Writes off the unbilled deliveries to `account`.
    fn write_off(&mut self, account: &str, by: &str, at_ms: i64) -> Result<usize>;
    /// Retrievals and charges of `login` in `[since_ms, until_ms)`.
    fn statement_rows(
        &self,
        login: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<(Vec<RetrievalRow>, Vec<ChargeRow>)>;

    // Statements and reports (`billing::report`; docs/billing.md, "Statements and reports").

    /// What `login`'s statement of `[since_ms, until_ms)` is made of, in one snapshot;
    /// [`LedgerError::UnknownUser`] when there is no such account.
    fn statement_data(&self, login: &str, since_ms: i64, until_ms: i64) -> Result<StatementData>;
    /// Traffic and charges per day, in one snapshot: `bounds` are the days' starts and the
    /// last day's end.
    fn usage(&self, bounds: &[i64]) -> Result<Vec<DayRows>>;
    /// Unbilled deliveries not written off, per account (at most
    /// [`reports::MAX_UNBILLED_ACCOUNTS`]), and how many accounts have some.
    fn unbilled_accounts(&self) -> Result<(Vec<UnbilledAccount>, u64)>;
    /// User accounts by login after `after` (`""`: from the first), at most `limit`.
    fn user_accounts(&self, after: &str, limit: usize) -> Result<Vec<UserAccount>>;
    /// Writes off `account`'s unbilled deliveries, recording who did it and why, in one
    /// transaction; `None` when it has none.
    fn write_off_unbilled(
        &mut self,
        account: &str,
        by: &str,
        reason: &str,
        at_ms: i64,
    ) -> Result<Option<WriteOff>>;
}
