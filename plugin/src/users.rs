//! The user registry: who gets an SMS when mail arrives, at which number, and under which
//! conditions (notify switch, licence expiry, quiet hours, rate limit, sender filters,
//! language).
//!
//! Storage is sled, two trees, values JSON (serde_json):
//! ```text
//! users    <address>  -> User as JSON        (authoritative)
//! aliases  <alias>    -> <primary address>   (kept consistent with users.aliases)
//! ```
//! Both trees are written in one sled transaction per change (or per import chunk) and flushed
//! before the call returns, so a change the admin was told about survives a crash. (A sled 0.34
//! transaction briefly takes a process-wide lock that pauses every sled store of the process,
//! so imports commit in small chunks, see [`IMPORT_CHUNK`].)
//!
//! Lookups on the intake path ([`UserStore::lookup`]) never touch sled: the whole registry is
//! loaded at open into an in-memory map (primary addresses and aliases -> `Arc<User>`), and
//! every write updates that map after the sled commit has been flushed. Writers are serialised
//! by one lock, so an alias conflict check and the write it guards cannot interleave with
//! another write. One process owns the store at a time (sled locks it); a second open fails
//! with [`UserError::Locked`], so the CLI goes through the admin HTTP API while the daemon runs.
//!
//! Addresses and aliases are normalised to lower case (local part included: mail operators
//! expect `Alice@Example.com` and `alice@example.com` to be the same mailbox).
//!
//! # CSV import
//! [`UserStore::import_csv`] reads a header row and then one user per line:
//! ```text
//! address,phone,notify,licence_until,quiet,rate_limit_secs,language,aliases,allow_senders,deny_senders,max_parts,state,networks
//! alice@example.com,+44 7700 900123,yes,2026-12-31,22:00-07:00,300,en,a@example.com;al@example.com,,*.spam.example,0,normal,10.0.0.0/8;2001:db8::/32
//! bob@example.com,+8613800138000,,-,,,zh,,,,,arrears,
//! ```
//! - The header row is required; only `address` is mandatory, columns may come in any order,
//!   and an unknown or repeated column is an error naming it (nothing is imported then).
//! - Cells are trimmed. List columns (`aliases`, `allow_senders`, `deny_senders`) separate
//!   items with `;` and replace the user's list.
//! - An import never loses data silently. An empty cell, like a column the file does not
//!   have, keeps an existing user's value (a new user gets the default: no phone, notify on,
//!   no expiry, no quiet hours, daemon default rate limit, agent default language, no
//!   aliases/filters, default parts). The cell [`CSV_CLEAR`] (`-`) resets a field to that
//!   default. So a file with `address,phone` only changes phone numbers.
//! - `notify`: `yes|no|true|false|on|off|1|0`. `licence_until`: `YYYY-MM-DD` (end of that day,
//!   UTC), RFC 3339, Unix milliseconds, or `none`. `quiet`: `HH:MM-HH:MM` or `none`.
//!   `rate_limit_secs`: seconds, `0` for no limit, `default` for the daemon default.
//!   `state`: `normal|arrears|unwelcome` (`-`: normal). `networks`: the client networks the
//!   account may log in from at the retrieval proxy, CIDR or bare addresses separated by `;`
//!   (`-`, `any`: any address). See [`access`]. Files without these columns keep them.
//! - `staff_no`, `real_name`, `class`, `note`: the user's billing account in the ledger, not
//!   the registry (see [`account_fields`]); [`UserStore::import_with_accounts`] returns what
//!   they ask of the ledger. Files without them import as before.
//! - A bad line is reported with its line number (the header is line 1) and skipped; the
//!   other lines are imported. So is a line naming an address or alias that belonged to
//!   another user before the import (it is not taken over, even if an earlier line frees it),
//!   and every line of an address that appears more than once in the file. In
//!   [`ImportMode::AddOnly`] existing users are skipped, not changed; a line that changes
//!   nothing counts as unchanged.
//! - The file is read and parsed whole before anything is written (a read error writes
//!   nothing); then lines are written in chunks of [`IMPORT_CHUNK`], each one sled
//!   transaction and one flush. A dry run ([`ImportOptions::dry_run`]) does everything but
//!   write, and lists what each line would change (field names, not values).

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use mailbell_link::durable::{open_waiting, OpenWaiting};
use mailbell_link::notification::{has_template, MAX_SMS_PARTS};
use serde::{Deserialize, Deserializer, Serialize};
use sled::Transactional;
use tokio::sync::watch;
use tracing::{info, warn};

pub mod access;
pub mod account_fields;
pub use access::{AccountState, Networks};
pub use account_fields::{AccountChange, AccountFields, LEDGER_COLUMNS};

/// Longest address or alias accepted (RFC 5321 path limit).
pub const MAX_ADDRESS_LEN: usize = 254;
/// Most aliases one user may have.
pub const MAX_ALIASES: usize = 100;
/// Most patterns in each of a user's sender allow and deny lists.
pub const MAX_SENDER_PATTERNS: usize = 200;
/// Longest language tag accepted.
pub const MAX_LANGUAGE_LEN: usize = 16;
/// Largest page [`UserStore::list`] returns.
pub const MAX_LIST_LIMIT: usize = 1000;
/// Most per-line errors an [`ImportReport`] keeps (the rest are only counted).
pub const MAX_IMPORT_ERRORS: usize = 1000;
/// CSV lines per sled transaction and flush.
///
/// Small on purpose: a sled 0.34 transaction holds a process-wide lock that stops every sled
/// store in the process (the outbox's too) while it applies; 500 users with an alias each hold it
/// for about 1.5 ms in a release build, and 10,000 users still import in well under a second.
pub const IMPORT_CHUNK: usize = 500;
/// Longest CSV line (in bytes of field data) accepted.
pub const MAX_CSV_RECORD_BYTES: usize = 64 * 1024;
/// How long [`UserStore::open`] waits for another holder of the store to let go.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(2);

const MINUTES_PER_DAY: u16 = 24 * 60;

/// User registry errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UserError {
    #[error("open user store at {}: {error}", path.display())]
    Open { path: PathBuf, error: sled::Error },
    #[error("user store at {} is already open (by this or another process)", path.display())]
    Locked { path: PathBuf },
    #[error("user store: {0}")]
    Store(sled::Error),
    #[error("corrupt user record {key:?}: {error}")]
    Corrupt {
        key: String,
        error: serde_json::Error,
    },
    #[error("encode user record: {0}")]
    Encode(serde_json::Error),
    #[error("invalid address {address:?}: {reason}")]
    InvalidAddress {
        address: String,
        reason: &'static str,
    },
    /// The number itself is left out: error messages end up in logs.
    #[error("invalid phone number: {reason}")]
    InvalidPhone { reason: &'static str },
    #[error("invalid quiet hours {input:?}: {reason}")]
    InvalidQuietHours { input: String, reason: &'static str },
    #[error(
        "invalid licence expiry {input:?}: expected YYYY-MM-DD, an RFC 3339 time, \
         Unix milliseconds or \"none\""
    )]
    InvalidLicence { input: String },
    #[error("invalid sender pattern {pattern:?}: {reason}")]
    InvalidSenderPattern {
        pattern: String,
        reason: &'static str,
    },
    #[error("invalid language {language:?}: {reason}")]
    InvalidLanguage {
        language: String,
        reason: &'static str,
    },
    #[error("invalid {field} {input:?}: {reason}")]
    InvalidField {
        field: &'static str,
        input: String,
        reason: &'static str,
    },
    #[error("too many {what} ({count}, limit {limit})")]
    TooMany {
        what: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("{alias} is already the address or an alias of {owner}")]
    AliasConflict { alias: String, owner: String },
    #[error("no such user {address}")]
    NotFound { address: String },
    #[error("user {address} already exists")]
    Exists { address: String },
    #[error("notifications are on but {address} has no phone (give --phone, or --notify off)")]
    NotifyWithoutPhone { address: String },
    #[error("{alias} is an alias of {owner}, not a primary address")]
    IsAlias { alias: String, owner: String },
    #[error("csv header: {0}")]
    CsvHeader(String),
    #[error("read csv: {0}")]
    Csv(csv::Error),
    /// The JSON file as a whole is unreadable (not an array of objects, not UTF-8).
    #[error("json import: {0}")]
    JsonImport(String),
    #[error("write export: {0}")]
    Export(std::io::Error),
}

impl From<sled::Error> for UserError {
    fn from(e: sled::Error) -> Self {
        UserError::Store(e)
    }
}

impl UserError {
    /// True when the input was at fault (a bad value, an unknown user, a conflict), false
    /// for store and I/O failures, which are worth retrying.
    pub fn is_input_error(&self) -> bool {
        !matches!(
            self,
            UserError::Open { .. }
                | UserError::Locked { .. }
                | UserError::Store(_)
                | UserError::Corrupt { .. }
                | UserError::Encode(_)
                | UserError::Csv(_)
                | UserError::Export(_)
        )
    }
}

/// Daily quiet window in local minutes after midnight; `start_min > end_min` wraps midnight
/// (22:00-07:00). Notices arriving inside it are held and coalesced until it ends.
/// Parses and displays as `HH:MM-HH:MM`; deserialises from that string or from
/// `{"start_min": .., "end_min": ..}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "QuietRepr")]
pub struct QuietHours {
    pub start_min: u16,
    pub end_min: u16,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum QuietRepr {
    Text(String),
    Fields { start_min: u16, end_min: u16 },
}

impl TryFrom<QuietRepr> for QuietHours {
    type Error = UserError;
    fn try_from(r: QuietRepr) -> Result<Self, UserError> {
        match r {
            QuietRepr::Text(s) => QuietHours::parse(&s),
            QuietRepr::Fields { start_min, end_min } => QuietHours::new(start_min, end_min),
        }
    }
}

impl QuietHours {
    /// A window from `start_min` to `end_min` (both below 1440, not equal).
    pub fn new(start_min: u16, end_min: u16) -> Result<Self, UserError> {
        let q = QuietHours { start_min, end_min };
        q.check().map_err(|reason| UserError::InvalidQuietHours {
            input: format!("{start_min}-{end_min}"),
            reason,
        })?;
        Ok(q)
    }

    fn check(&self) -> Result<(), &'static str> {
        if self.start_min >= MINUTES_PER_DAY || self.end_min >= MINUTES_PER_DAY {
            return Err("minutes after midnight must be below 1440");
        }
        if self.start_min == self.end_min {
            return Err("start and end are the same time");
        }
        Ok(())
    }

    /// Parses `HH:MM-HH:MM` (`H:MM` also accepted; `24:00` means midnight).
    pub fn parse(s: &str) -> Result<Self, UserError> {
        let bad = |reason| UserError::InvalidQuietHours {
            input: s.to_owned(),
            reason,
        };
        let (a, b) = s
            .trim()
            .split_once('-')
            .ok_or_else(|| bad("expected HH:MM-HH:MM"))?;
        let start = parse_hhmm(a.trim()).ok_or_else(|| bad("start is not a time HH:MM"))?;
        let end = parse_hhmm(b.trim()).ok_or_else(|| bad("end is not a time HH:MM"))?;
        let q = QuietHours {
            start_min: start,
            end_min: end,
        };
        q.check().map_err(bad)?;
        Ok(q)
    }

    /// Whether `minute_of_day` (0..1440, larger values wrap) falls inside the window.
    pub fn contains(&self, minute_of_day: u16) -> bool {
        let m = minute_of_day % MINUTES_PER_DAY;
        if self.start_min == self.end_min {
            false
        } else if self.start_min < self.end_min {
            self.start_min <= m && m < self.end_min
        } else {
            m >= self.start_min || m < self.end_min
        }
    }

    /// Minutes from `minute_of_day` until the window ends; 0 when outside it.
    pub fn minutes_until_end(&self, minute_of_day: u16) -> u16 {
        if !self.contains(minute_of_day) {
            return 0;
        }
        let m = minute_of_day % MINUTES_PER_DAY;
        (self.end_min + MINUTES_PER_DAY - m) % MINUTES_PER_DAY
    }
}

fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    if !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let h: u16 = h.parse().ok()?;
    let m: u16 = m.parse().ok()?;
    match (h, m) {
        (24, 0) => Some(0),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

impl fmt::Display for QuietHours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start_min / 60,
            self.start_min % 60,
            self.end_min / 60,
            self.end_min % 60
        )
    }
}

impl FromStr for QuietHours {
    type Err = UserError;
    fn from_str(s: &str) -> Result<Self, UserError> {
        QuietHours::parse(s)
    }
}

/// Why a user gets no notices right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ineligible {
    NotifyOff,
    LicenceExpired,
    NoPhone,
}

impl Ineligible {
    pub fn as_str(&self) -> &'static str {
        match self {
            Ineligible::NotifyOff => "notify_off",
            Ineligible::LicenceExpired => "licence_expired",
            Ineligible::NoPhone => "no_phone",
        }
    }
}

impl fmt::Display for Ineligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One registered user. Deserialising fills missing fields with the [`User::new`] defaults;
/// [`UserStore::upsert`] validates and normalises.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct User {
    /// Primary address, normalised lower-case.
    pub address: String,
    pub aliases: Vec<String>,
    /// E.164: `+` and 8 to 15 digits; empty = no notices.
    pub phone: String,
    pub notify: bool,
    /// Unix ms; `None` = never expires.
    pub licence_until: Option<i64>,
    pub quiet: Option<QuietHours>,
    /// `None` = daemon default; `Some(0)` = no limit.
    pub rate_limit_secs: Option<u32>,
    /// Patterns (see [`User::sender_allowed`]); empty = all allowed.
    pub allow_senders: Vec<String>,
    pub deny_senders: Vec<String>,
    /// `""` = agent default, else `"zh"`, `"en"`, ...
    pub language: String,
    /// 0 = default.
    pub max_parts: u8,
    /// Standing at the retrieval proxy (records without it are `normal`).
    pub state: AccountState,
    /// Client networks allowed at the retrieval proxy; empty = any (the default).
    pub networks: Networks,
}

impl Default for User {
    fn default() -> Self {
        User::new("")
    }
}

impl User {
    /// A user with notices on and everything else empty. The address is trimmed and
    /// lower-cased, not validated.
    pub fn new(address: &str) -> Self {
        User {
            address: address_key(address),
            aliases: Vec::new(),
            phone: String::new(),
            notify: true,
            licence_until: None,
            quiet: None,
            rate_limit_secs: None,
            allow_senders: Vec::new(),
            deny_senders: Vec::new(),
            language: String::new(),
            max_parts: 0,
            state: AccountState::Normal,
            networks: Networks::any(),
        }
    }

    /// `None` when the user gets notices at `now_ms` (Unix ms).
    pub fn ineligible(&self, now_ms: i64) -> Option<Ineligible> {
        if !self.notify {
            Some(Ineligible::NotifyOff)
        } else if self.licence_until.is_some_and(|until| now_ms > until) {
            Some(Ineligible::LicenceExpired)
        } else if self.phone.is_empty() {
            Some(Ineligible::NoPhone)
        } else {
            None
        }
    }

    /// Whether mail from `sender` should be notified. Deny wins over allow; an empty allow
    /// list allows everyone. Patterns: `user@dom` that address, `@dom` or `dom` that domain,
    /// `*.dom` that domain and its subdomains. Case-insensitive.
    pub fn sender_allowed(&self, sender: &str) -> bool {
        if self.allow_senders.is_empty() && self.deny_senders.is_empty() {
            return true;
        }
        let sender = address_key(sender);
        let matches = |p: &String| {
            if p.chars().any(char::is_uppercase) {
                pattern_matches(&p.to_lowercase(), &sender)
            } else {
                pattern_matches(p, &sender)
            }
        };
        if self.deny_senders.iter().any(matches) {
            return false;
        }
        self.allow_senders.is_empty() || self.allow_senders.iter().any(matches)
    }

    /// [`UserError::NotifyWithoutPhone`] if notifications are on and there is no phone.
    pub fn check_phone_for_notify(&self) -> Result<(), UserError> {
        if self.notify && self.phone.is_empty() {
            return Err(UserError::NotifyWithoutPhone {
                address: self.address.clone(),
            });
        }
        Ok(())
    }

    /// Checks every field and returns the user normalised: addresses and patterns
    /// lower-cased, duplicates and an alias equal to the address dropped, phone compacted.
    /// The language must be a built-in one; see [`validated_with`](Self::validated_with).
    pub fn validated(self) -> Result<User, UserError> {
        self.validated_with(&[])
    }

    /// [`validated`](Self::validated), also accepting the languages in `extra_languages`
    /// (`link.agent_languages`).
    pub fn validated_with(mut self, extra_languages: &[String]) -> Result<User, UserError> {
        self.address = normalize_address(&self.address)?;
        let mut aliases: Vec<String> = Vec::with_capacity(self.aliases.len());
        for a in &self.aliases {
            let a = normalize_address(a)?;
            if a != self.address && !aliases.contains(&a) {
                aliases.push(a);
            }
        }
        if aliases.len() > MAX_ALIASES {
            return Err(UserError::TooMany {
                what: "aliases",
                count: aliases.len(),
                limit: MAX_ALIASES,
            });
        }
        self.aliases = aliases;
        self.phone = normalize_phone(&self.phone)?;
        if let Some(q) = &self.quiet {
            q.check().map_err(|reason| UserError::InvalidQuietHours {
                input: q.to_string(),
                reason,
            })?;
        }
        self.allow_senders = normalize_patterns(&self.allow_senders, "allowed sender patterns")?;
        self.deny_senders = normalize_patterns(&self.deny_senders, "denied sender patterns")?;
        self.language = normalize_language(&self.language, extra_languages)?;
        if self.max_parts > MAX_SMS_PARTS {
            return Err(UserError::InvalidField {
                field: "max_parts",
                input: self.max_parts.to_string(),
                reason: "more parts than an agent sends (at most 10)",
            });
        }
        Ok(self)
    }
}

/// A partial update (`mailbell user set`, `PATCH /admin/v1/users/{address}`). Absent fields
/// stay as they are; for the `Option<Option<_>>` fields JSON `null` clears the value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    /// `Some("")` removes the phone number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<bool>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub licence_until: Option<Option<i64>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub quiet: Option<Option<QuietHours>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub rate_limit_secs: Option<Option<u32>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add_aliases: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_aliases: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_senders: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_senders: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parts: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<AccountState>,
    /// `Some(empty)` allows any address again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Networks>,
}

/// A field that is present deserialises to `Some(value)`, `null` included (→ `Some(None)`);
/// with `#[serde(default)]` an absent one stays `None`.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

impl UserPatch {
    /// Applies the patch; the result still needs [`User::validated`].
    pub fn apply(&self, user: &mut User) {
        if let Some(p) = &self.phone {
            user.phone.clone_from(p);
        }
        if let Some(n) = self.notify {
            user.notify = n;
        }
        if let Some(l) = self.licence_until {
            user.licence_until = l;
        }
        if let Some(q) = self.quiet {
            user.quiet = q;
        }
        if let Some(r) = self.rate_limit_secs {
            user.rate_limit_secs = r;
        }
        if !self.remove_aliases.is_empty() {
            let remove: Vec<String> = self.remove_aliases.iter().map(|a| address_key(a)).collect();
            user.aliases.retain(|a| !remove.contains(&address_key(a)));
        }
        user.aliases.extend(self.add_aliases.iter().cloned());
        if let Some(a) = &self.allow_senders {
            user.allow_senders.clone_from(a);
        }
        if let Some(d) = &self.deny_senders {
            user.deny_senders.clone_from(d);
        }
        if let Some(l) = &self.language {
            user.language.clone_from(l);
        }
        if let Some(m) = self.max_parts {
            user.max_parts = m;
        }
        if let Some(st) = self.state {
            user.state = st;
        }
        if let Some(n) = &self.networks {
            user.networks.clone_from(n);
        }
    }

    /// True when applying the patch changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == UserPatch::default()
    }
}

/// What [`UserStore::import_csv`] does with a line whose user already exists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImportMode {
    /// Update the existing user with the line's columns.
    #[default]
    #[serde(rename = "upsert")]
    Upsert,
    /// Leave the existing user alone and count the line as skipped.
    #[serde(rename = "add")]
    AddOnly,
}

impl FromStr for ImportMode {
    type Err = UserError;
    fn from_str(s: &str) -> Result<Self, UserError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "upsert" => Ok(ImportMode::Upsert),
            "add" | "add-only" | "addonly" => Ok(ImportMode::AddOnly),
            _ => Err(UserError::InvalidField {
                field: "import mode",
                input: s.to_owned(),
                reason: "expected upsert or add",
            }),
        }
    }
}

/// How [`UserStore::import_csv_with`] imports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportOptions {
    pub mode: ImportMode,
    /// Check every line and count what would change, but write nothing.
    pub dry_run: bool,
}

/// The cell that clears a field in a CSV import (an empty cell keeps it).
pub const CSV_CLEAR: &str = "-";

/// Outcome of a CSV import.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportReport {
    pub added: u64,
    pub updated: u64,
    /// Existing users left alone in [`ImportMode::AddOnly`].
    pub skipped: u64,
    /// Lines rejected (all of them, also those beyond the kept `errors`).
    pub failed: u64,
    /// `(line, message)` for the first [`MAX_IMPORT_ERRORS`] rejected lines.
    pub errors: Vec<(u64, String)>,
    /// Existing users the file leaves exactly as they were.
    #[serde(default)]
    pub unchanged: u64,
    /// Nothing was written: the counts say what the import would do.
    #[serde(default)]
    pub dry_run: bool,
    /// In a dry run, `(line, "add <address>" | "update <address>: <fields>")` for the first
    /// [`MAX_IMPORT_ERRORS`] lines that would change something.
    #[serde(default)]
    pub changes: Vec<(u64, String)>,
    /// Ledger accounts created or changed by the file's `staff_no`, `real_name`, `class`,
    /// `note` and `state` cells (written by the caller, see [`account_fields`]).
    #[serde(default)]
    pub ledger_accounts: u64,
}

impl ImportReport {
    fn error(&mut self, line: u64, message: String) {
        self.failed += 1;
        if self.errors.len() < MAX_IMPORT_ERRORS {
            self.errors.push((line, message));
        }
    }
}

/// The outcome of [`UserStore::save`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    /// The user as stored (normalised).
    pub user: User,
    /// True when the address was new.
    pub created: bool,
}

/// The user registry. Cheap to clone; all clones share one sled store and one in-memory map.
/// Writes block (sled commit and flush): call them from `spawn_blocking` in async code.
#[derive(Clone)]
pub struct UserStore {
    inner: Arc<Inner>,
    /// Languages accepted besides the built-in ones (`link.agent_languages`).
    languages: Arc<[String]>,
}

struct Inner {
    db: sled::Db,
    users: sled::Tree,
    aliases: sled::Tree,
    index: RwLock<Index>,
    writer: Mutex<()>,
    /// Bumped after every committed change (see [`UserStore::changes`]).
    generation: watch::Sender<u64>,
}

#[derive(Default)]
struct Index {
    /// Primary addresses and aliases.
    by_key: HashMap<String, Arc<User>>,
    users: usize,
}

impl fmt::Debug for UserStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserStore")
            .field("users", &self.len())
            .finish_non_exhaustive()
    }
}

impl UserStore {
    /// Opens (or creates) the store and loads it into memory. If another handle or process
    /// holds it, waits up to [`DEFAULT_LOCK_WAIT`] before failing with [`UserError::Locked`].
    /// Blocking: call it at startup or through `spawn_blocking`.
    pub fn open(path: &Path) -> Result<Self, UserError> {
        Self::open_with(path, DEFAULT_LOCK_WAIT)
    }

    /// The store, accepting users whose language is one of `extra` besides the built-in
    /// ones: the languages the agents have templates for (`link.agent_languages`).
    pub fn with_languages(mut self, extra: &[String]) -> Self {
        self.languages = extra.into();
        self
    }

    /// [`open`](Self::open) with a chosen lock wait.
    pub fn open_with(path: &Path, lock_wait: Duration) -> Result<Self, UserError> {
        let db = open_waiting(
            &sled::Config::new().path(path).cache_capacity(16 << 20),
            lock_wait,
        )
        .map_err(|e| match e {
            OpenWaiting::Locked => UserError::Locked {
                path: path.to_owned(),
            },
            OpenWaiting::Sled(error) => UserError::Open {
                path: path.to_owned(),
                error,
            },
        })?;
        let users = db.open_tree("users")?;
        let aliases = db.open_tree("aliases")?;
        let mut index = Index::default();
        let mut alias_count = 0usize;
        for item in users.iter() {
            let (k, v) = item?;
            let user: User = serde_json::from_slice(&v).map_err(|error| UserError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                error,
            })?;
            let user = Arc::new(user);
            if let Some(other) = index.by_key.insert(user.address.clone(), user.clone()) {
                warn!(user = %user.address, other = %other.address, "user address is also an alias of another user");
            } else {
                index.users += 1;
            }
            for a in &user.aliases {
                if let Some(other) = index.by_key.get(a) {
                    warn!(alias = %a, user = %user.address, other = %other.address, "alias claimed twice; keeping the first");
                    continue;
                }
                index.by_key.insert(a.clone(), user.clone());
                alias_count += 1;
            }
        }
        let alias_rows = aliases.len();
        if alias_rows != alias_count {
            warn!(
                expected = alias_count,
                found = alias_rows,
                "aliases tree disagrees with the user records; lookups use the user records"
            );
        }
        info!(
            users = index.users,
            aliases = alias_count,
            "user store opened"
        );
        Ok(UserStore {
            inner: Arc::new(Inner {
                db,
                users,
                aliases,
                index: RwLock::new(index),
                writer: Mutex::new(()),
                generation: watch::Sender::new(0),
            }),
            languages: Arc::from([]),
        })
    }

    fn read_index(&self) -> RwLockReadGuard<'_, Index> {
        self.inner
            .index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn writer(&self) -> MutexGuard<'_, ()> {
        self.inner
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The user with this primary address or alias (case-insensitive; surrounding
    /// whitespace and `<>` ignored). Memory only.
    pub fn lookup(&self, address: &str) -> Option<Arc<User>> {
        let a = strip_address(address);
        if a.bytes().any(|b| b.is_ascii_uppercase() || !b.is_ascii()) {
            let key = a.to_lowercase();
            self.read_index().by_key.get(key.as_str()).cloned()
        } else {
            self.read_index().by_key.get(a).cloned()
        }
    }

    /// The user with this primary address or alias.
    pub fn get(&self, address: &str) -> Result<Option<User>, UserError> {
        Ok(self.lookup(address).map(|u| (*u).clone()))
    }

    /// Validates and stores `user`, replacing any user with the same address.
    pub fn upsert(&self, user: User) -> Result<(), UserError> {
        self.save(user).map(|_| ())
    }

    /// [`upsert`](Self::upsert), returning the user as stored and whether it was new.
    pub fn save(&self, user: User) -> Result<Saved, UserError> {
        let user = user.validated_with(&self.languages)?;
        let _w = self.writer();
        let (created, staged) = {
            let index = self.read_index();
            let mut st = Staged::new(&index);
            let created = st.put(user.clone())?;
            (created, st.finish())
        };
        self.commit(staged)?;
        Ok(Saved { user, created })
    }

    /// Stores `user` only if its address is new; [`UserError::Exists`] otherwise.
    /// A user with notifications on must have a phone
    /// ([`UserError::NotifyWithoutPhone`]); `mailbell user add` and `POST /admin/v1/users`
    /// come here. (A CSV import may still register a user without a phone.)
    pub fn insert(&self, user: User) -> Result<User, UserError> {
        let user = user.validated_with(&self.languages)?;
        user.check_phone_for_notify()?;
        let _w = self.writer();
        let staged = {
            let index = self.read_index();
            let mut st = Staged::new(&index);
            if let Some(owner) = st.resolve(&user.address) {
                if owner.address != user.address {
                    return Err(UserError::IsAlias {
                        alias: user.address,
                        owner: owner.address.clone(),
                    });
                }
                return Err(UserError::Exists {
                    address: user.address,
                });
            }
            st.put(user.clone())?;
            st.finish()
        };
        self.commit(staged)?;
        Ok(user)
    }

    /// Applies `patch` to the user with this address or alias and returns the result.
    pub fn update(&self, address: &str, patch: &UserPatch) -> Result<User, UserError> {
        let key = address_key(address);
        let _w = self.writer();
        let (user, staged) = {
            let index = self.read_index();
            let mut st = Staged::new(&index);
            let current = st
                .resolve(&key)
                .ok_or_else(|| UserError::NotFound { address: key })?;
            let mut user = (*current).clone();
            patch.apply(&mut user);
            let user = user.validated_with(&self.languages)?;
            if patch.notify.is_some() || patch.phone.is_some() {
                user.check_phone_for_notify()?;
            }
            st.put(user.clone())?;
            (user, st.finish())
        };
        self.commit(staged)?;
        Ok(user)
    }

    /// Removes the user with this primary address (and its aliases). `Ok(false)` if there is
    /// none; [`UserError::IsAlias`] if `address` is an alias.
    pub fn remove(&self, address: &str) -> Result<bool, UserError> {
        let key = address_key(address);
        let _w = self.writer();
        let staged = {
            let index = self.read_index();
            let mut st = Staged::new(&index);
            if !st.remove(&key)? {
                return Ok(false);
            }
            st.finish()
        };
        self.commit(staged)?;
        Ok(true)
    }

    /// Up to `limit` (at most [`MAX_LIST_LIMIT`]) users ordered by address, starting after
    /// `after`.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<User>, UserError> {
        let limit = limit.min(MAX_LIST_LIMIT);
        let iter = match after {
            Some(a) => self.inner.users.range::<Vec<u8>, _>((
                Bound::Excluded(address_key(a).into_bytes()),
                Bound::Unbounded,
            )),
            None => self.inner.users.iter(),
        };
        let mut out = Vec::with_capacity(limit.min(64));
        for item in iter.take(limit) {
            let (k, v) = item?;
            out.push(
                serde_json::from_slice(&v).map_err(|error| UserError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    error,
                })?,
            );
        }
        Ok(out)
    }

    /// Writes every user, by address, to `w` in `format` (see [`Exporter`]); no page cap.
    /// Users are read one at a time: a write during the export may or may not be in it.
    /// Returns the number of users written.
    pub fn export<W: std::io::Write>(&self, format: ExportFormat, w: W) -> Result<u64, UserError> {
        self.export_with(format, w, &HashMap::new())
    }

    /// [`export`](Self::export) with each user's ledger account fields (by address).
    pub fn export_with<W: std::io::Write>(
        &self,
        format: ExportFormat,
        w: W,
        accounts: &HashMap<String, AccountFields>,
    ) -> Result<u64, UserError> {
        let mut out = Exporter::new(format, w)?;
        for item in self.inner.users.iter() {
            let (k, v) = item?;
            let user: User = serde_json::from_slice(&v).map_err(|error| UserError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                error,
            })?;
            out.write_with(&user, accounts.get(&user.address))?;
        }
        out.finish()
    }

    /// A change signal: the value is a generation number, bumped after every committed
    /// change (save, update, remove, import chunk), once the in-memory map has it. Holders
    /// (live retrieval sessions) wait on `changed()` and look their account up again.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    /// Number of users (not counting aliases).
    pub fn len(&self) -> usize {
        self.read_index().users
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Imports users from CSV (format in the module docs). Per-line problems are reported,
    /// not fatal; a bad header, a store error or an I/O error is.
    pub fn import_csv<R: std::io::Read>(
        &self,
        r: R,
        mode: ImportMode,
    ) -> Result<ImportReport, UserError> {
        self.import_csv_with(
            r,
            ImportOptions {
                mode,
                dry_run: false,
            },
        )
    }

    /// [`import_csv`](Self::import_csv), optionally as a dry run. The whole file is read and
    /// parsed before anything is written, so a read error or a header error writes nothing.
    pub fn import_csv_with<R: std::io::Read>(
        &self,
        r: R,
        opts: ImportOptions,
    ) -> Result<ImportReport, UserError> {
        let (rows, failed) = parse_csv_rows(r)?;
        Ok(self.import_rows(rows, failed, opts)?.0)
    }

    /// Imports users from what `mailbell user export --format json` writes: a JSON array of
    /// user objects with the [`User`] field names. As with CSV, a field the object leaves out
    /// keeps the user's value, and `null` clears `licence_until`, `quiet` and
    /// `rate_limit_secs`; an export names every field, so importing it restores each user
    /// exactly. Problems with one object are reported by the line it starts on; a file that
    /// is not a JSON array is an error and writes nothing.
    pub fn import_json_with<R: std::io::Read>(
        &self,
        mut r: R,
        opts: ImportOptions,
    ) -> Result<ImportReport, UserError> {
        let mut data = String::new();
        r.read_to_string(&mut data)
            .map_err(|e| UserError::JsonImport(e.to_string()))?;
        let (rows, failed) = parse_json_rows(&data)?;
        Ok(self.import_rows(rows, failed, opts)?.0)
    }

    /// Imports in `format` ([`import_csv_with`](Self::import_csv_with) or
    /// [`import_json_with`](Self::import_json_with)).
    pub fn import_with<R: std::io::Read>(
        &self,
        format: ExportFormat,
        r: R,
        opts: ImportOptions,
    ) -> Result<ImportReport, UserError> {
        match format {
            ExportFormat::Csv => self.import_csv_with(r, opts),
            ExportFormat::Json => self.import_json_with(r, opts),
        }
    }

    /// [`import_with`](Self::import_with), and what the lines the registry took ask of
    /// their ledger accounts (the caller writes them: [`account_fields::apply`]).
    pub fn import_with_accounts<R: std::io::Read>(
        &self,
        format: ExportFormat,
        mut r: R,
        opts: ImportOptions,
    ) -> Result<(ImportReport, Vec<AccountChange>), UserError> {
        let (rows, failed) = match format {
            ExportFormat::Csv => parse_csv_rows(r)?,
            ExportFormat::Json => {
                let mut data = String::new();
                r.read_to_string(&mut data)
                    .map_err(|e| UserError::JsonImport(e.to_string()))?;
                parse_json_rows(&data)?
            }
        };
        self.import_rows(rows, failed, opts)
    }

    /// Writes parsed rows (from either format): the checks that need the whole file and the
    /// registry, then the changes.
    fn import_rows(
        &self,
        rows: Vec<(u64, Row)>,
        mut failed: Vec<(u64, String)>,
        opts: ImportOptions,
    ) -> Result<(ImportReport, Vec<AccountChange>), UserError> {
        let mut accounts = Vec::new();
        let mut report = ImportReport {
            dry_run: opts.dry_run,
            ..ImportReport::default()
        };
        // One row per address: which of two would win is a guess, so neither is imported.
        let mut lines_of: HashMap<&str, Vec<u64>> = HashMap::new();
        for (line, row) in &rows {
            lines_of.entry(&row.address).or_default().push(*line);
        }
        let repeated: HashMap<String, String> = lines_of
            .into_iter()
            .filter(|(_, lines)| lines.len() > 1)
            .map(|(a, lines)| {
                let lines: Vec<String> = lines.iter().map(u64::to_string).collect();
                (a.to_owned(), lines.join(", "))
            })
            .collect();
        let rows: Vec<(u64, Row)> = rows
            .into_iter()
            .filter_map(|(line, row)| match repeated.get(&row.address) {
                Some(lines) => {
                    failed.push((
                        line,
                        format!(
                            "{} appears on more than one line ({lines}); none of them is imported",
                            row.address
                        ),
                    ));
                    None
                }
                None => Some((line, row)),
            })
            .collect();

        let _w = self.writer();
        // Who held each address and alias the file names, before the import.
        let before: HashMap<String, String> = {
            let index = self.read_index();
            rows.iter()
                .flat_map(|(_, row)| {
                    std::iter::once(row.address.clone())
                        .chain(row.aliases.iter().flatten().map(|a| address_key(a)))
                })
                .filter_map(|k| {
                    let owner = index.by_key.get(&k)?.address.clone();
                    Some((k, owner))
                })
                .collect()
        };
        // A dry run stages the whole file in one change set and drops it.
        let chunk = if opts.dry_run {
            usize::MAX
        } else {
            IMPORT_CHUNK
        };
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let staged = {
                let index = self.read_index();
                let mut st = Staged::new(&index);
                for (line, mut row) in rows.by_ref().take(chunk) {
                    let existing = st.current(&row.address);
                    if existing.is_some() && opts.mode == ImportMode::AddOnly {
                        report.skipped += 1;
                        continue;
                    }
                    let mut user = existing
                        .as_deref()
                        .map_or_else(|| User::new(&row.address), User::clone);
                    let change = AccountChange {
                        line,
                        login: row.address.clone(),
                        fields: std::mem::take(&mut row.account),
                        state: row.state,
                    };
                    let account =
                        (!change.fields.is_empty() || change.state.is_some()).then_some(change);
                    row.apply(&mut user);
                    let user = match user.validated_with(&self.languages) {
                        Ok(u) => u,
                        Err(e) => {
                            failed.push((line, e.to_string()));
                            continue;
                        }
                    };
                    if existing.as_deref() == Some(&user) {
                        report.unchanged += 1;
                        accounts.extend(account);
                        continue;
                    }
                    // An alias another user held before the import stays theirs, even if an
                    // earlier line of the file let go of it: the result never depends on the
                    // order of the lines.
                    if let Some((key, owner)) = std::iter::once(&user.address)
                        .chain(&user.aliases)
                        .find_map(|k| {
                            before
                                .get(k)
                                .filter(|o| **o != user.address)
                                .map(|o| (k, o))
                        })
                    {
                        failed.push((
                            line,
                            UserError::AliasConflict {
                                alias: key.clone(),
                                owner: owner.clone(),
                            }
                            .to_string(),
                        ));
                        continue;
                    }
                    let change = match existing.as_deref() {
                        None => format!("add {}", user.address),
                        Some(old) => format!(
                            "update {}: {}",
                            user.address,
                            changed_fields(old, &user).join(", ")
                        ),
                    };
                    match st.put(user) {
                        Ok(created) => {
                            accounts.extend(account);
                            if created {
                                report.added += 1;
                            } else {
                                report.updated += 1;
                            }
                            if opts.dry_run && report.changes.len() < MAX_IMPORT_ERRORS {
                                report.changes.push((line, change));
                            }
                        }
                        Err(e) => failed.push((line, e.to_string())),
                    }
                }
                st.finish()
            };
            if !opts.dry_run {
                self.commit(staged)?;
            }
        }
        failed.sort_by_key(|(line, _)| *line);
        for (line, message) in failed {
            report.error(line, message);
        }
        info!(
            added = report.added,
            updated = report.updated,
            unchanged = report.unchanged,
            skipped = report.skipped,
            failed = report.failed,
            dry_run = opts.dry_run,
            "users imported"
        );
        Ok((report, accounts))
    }

    /// Flushes sled (writes already flush; this is for shutdown).
    pub fn flush(&self) -> Result<(), UserError> {
        self.inner.db.flush()?;
        Ok(())
    }

    /// Writes a staged change set to sled in one transaction, flushes, then publishes it to
    /// the in-memory map. Caller holds the writer lock.
    fn commit(&self, staged: Finished) -> Result<(), UserError> {
        if staged.overlay.is_empty() {
            return Ok(());
        }
        let result: sled::transaction::TransactionResult<(), std::convert::Infallible> =
            (&self.inner.users, &self.inner.aliases).transaction(|(u, a)| {
                u.apply_batch(&staged.users)?;
                a.apply_batch(&staged.aliases)?;
                Ok(())
            });
        match result {
            Ok(()) => {}
            Err(sled::transaction::TransactionError::Storage(e)) => return Err(e.into()),
            Err(sled::transaction::TransactionError::Abort(never)) => match never {},
        }
        self.inner.db.flush()?;
        let mut index = self
            .inner
            .index
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for (k, v) in staged.overlay {
            match v {
                Some(u) => index.by_key.insert(k, u),
                None => index.by_key.remove(&k),
            };
        }
        index.users = index.users.saturating_add_signed(staged.delta);
        drop(index);
        self.inner.generation.send_modify(|g| *g += 1);
        Ok(())
    }
}

/// A change set being built against the current index: what each touched key (address or
/// alias) will map to, and the sled writes that get there.
struct Staged<'a> {
    index: &'a Index,
    overlay: HashMap<String, Option<Arc<User>>>,
    users: sled::Batch,
    aliases: sled::Batch,
    delta: isize,
}

struct Finished {
    overlay: HashMap<String, Option<Arc<User>>>,
    users: sled::Batch,
    aliases: sled::Batch,
    delta: isize,
}

impl<'a> Staged<'a> {
    fn new(index: &'a Index) -> Self {
        Staged {
            index,
            overlay: HashMap::new(),
            users: sled::Batch::default(),
            aliases: sled::Batch::default(),
            delta: 0,
        }
    }

    /// The user `key` (address or alias, normalised) belongs to after the staged changes.
    fn resolve(&self, key: &str) -> Option<Arc<User>> {
        match self.overlay.get(key) {
            Some(v) => v.clone(),
            None => self.index.by_key.get(key).cloned(),
        }
    }

    /// The user whose primary address is `address`.
    fn current(&self, address: &str) -> Option<Arc<User>> {
        self.resolve(address).filter(|u| u.address == address)
    }

    /// Stages a validated user; true if its address is new.
    fn put(&mut self, user: User) -> Result<bool, UserError> {
        for key in std::iter::once(&user.address).chain(&user.aliases) {
            if let Some(owner) = self.resolve(key) {
                if owner.address != user.address {
                    return Err(UserError::AliasConflict {
                        alias: key.clone(),
                        owner: owner.address.clone(),
                    });
                }
            }
        }
        let value = serde_json::to_vec(&user).map_err(UserError::Encode)?;
        let old = self.current(&user.address);
        let user = Arc::new(user);
        match &old {
            Some(old) => {
                for a in old.aliases.iter().filter(|a| !user.aliases.contains(a)) {
                    self.overlay.insert(a.clone(), None);
                    self.aliases.remove(a.as_bytes());
                }
            }
            None => self.delta += 1,
        }
        for a in &user.aliases {
            self.overlay.insert(a.clone(), Some(user.clone()));
            self.aliases.insert(a.as_bytes(), user.address.as_bytes());
        }
        self.users.insert(user.address.as_bytes(), value);
        self.overlay.insert(user.address.clone(), Some(user));
        Ok(old.is_none())
    }

    /// Stages removing the user with primary address `address`; false if there is none.
    fn remove(&mut self, address: &str) -> Result<bool, UserError> {
        let Some(old) = self.resolve(address) else {
            return Ok(false);
        };
        if old.address != address {
            return Err(UserError::IsAlias {
                alias: address.to_owned(),
                owner: old.address.clone(),
            });
        }
        for a in &old.aliases {
            self.overlay.insert(a.clone(), None);
            self.aliases.remove(a.as_bytes());
        }
        self.users.remove(address.as_bytes());
        self.overlay.insert(address.to_owned(), None);
        self.delta -= 1;
        Ok(true)
    }

    fn finish(self) -> Finished {
        Finished {
            overlay: self.overlay,
            users: self.users,
            aliases: self.aliases,
            delta: self.delta,
        }
    }
}

/// Trims whitespace and one pair of surrounding angle brackets.
fn strip_address(s: &str) -> &str {
    let t = s.trim();
    t.strip_prefix('<')
        .and_then(|t| t.strip_suffix('>'))
        .unwrap_or(t)
        .trim()
}

/// The map key for an address: stripped and lower-cased, not validated.
pub fn address_key(s: &str) -> String {
    strip_address(s).to_lowercase()
}

/// Validates an address or alias and returns it lower-cased: exactly one `@`, non-empty
/// local part and domain, no whitespace, control characters or `<>,;"`, at most
/// [`MAX_ADDRESS_LEN`] bytes.
pub fn normalize_address(s: &str) -> Result<String, UserError> {
    let a = address_key(s);
    let bad = |reason| UserError::InvalidAddress {
        address: s.to_owned(),
        reason,
    };
    if a.is_empty() {
        return Err(bad("empty"));
    }
    if a.len() > MAX_ADDRESS_LEN {
        return Err(bad("longer than 254 bytes"));
    }
    if a.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("contains whitespace or control characters"));
    }
    if a.contains(['<', '>', ',', ';', '"']) {
        return Err(bad("contains one of < > , ; \""));
    }
    let Some((local, domain)) = a.split_once('@') else {
        return Err(bad("no '@'"));
    };
    if domain.contains('@') {
        return Err(bad("more than one '@'"));
    }
    if local.is_empty() {
        return Err(bad("empty local part"));
    }
    if domain.is_empty() {
        return Err(bad("empty domain"));
    }
    Ok(a)
}

/// Validates a phone number and returns it compacted (`+` and digits). Spaces, dashes, dots
/// and parentheses are dropped; an empty input stays empty (no notices).
pub fn normalize_phone(s: &str) -> Result<String, UserError> {
    let bad = |reason| UserError::InvalidPhone { reason };
    let compact: String = s
        .chars()
        .filter(|c| !matches!(c, ' ' | '\t' | '-' | '.' | '(' | ')'))
        .collect();
    if compact.is_empty() {
        return Ok(compact);
    }
    let Some(digits) = compact.strip_prefix('+') else {
        return Err(bad(
            "must start with '+' and the country code (E.164, e.g. +447700900123)",
        ));
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(
            "only digits may follow the '+' (spaces, dashes, dots and parentheses are ignored)",
        ));
    }
    if !(8..=15).contains(&digits.len()) {
        return Err(bad("must have 8 to 15 digits after the '+'"));
    }
    if digits.starts_with('0') {
        return Err(bad("country code cannot start with 0"));
    }
    Ok(compact)
}

fn normalize_patterns(patterns: &[String], what: &'static str) -> Result<Vec<String>, UserError> {
    let mut out: Vec<String> = Vec::with_capacity(patterns.len());
    for p in patterns {
        let n = normalize_pattern(p)?;
        if !out.contains(&n) {
            out.push(n);
        }
    }
    if out.len() > MAX_SENDER_PATTERNS {
        return Err(UserError::TooMany {
            what,
            count: out.len(),
            limit: MAX_SENDER_PATTERNS,
        });
    }
    Ok(out)
}

/// Validates a sender pattern (`user@dom`, `@dom`, `dom`, `*.dom`) and lower-cases it.
pub fn normalize_pattern(s: &str) -> Result<String, UserError> {
    let p = s.trim().to_lowercase();
    let bad = |reason| UserError::InvalidSenderPattern {
        pattern: s.to_owned(),
        reason,
    };
    if p.is_empty() {
        return Err(bad("empty"));
    }
    if p.len() > MAX_ADDRESS_LEN {
        return Err(bad("longer than 254 bytes"));
    }
    if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("contains whitespace or control characters"));
    }
    if p.contains(['<', '>', ',', ';', '"']) {
        return Err(bad("contains one of < > , ; \""));
    }
    let domain = if let Some(d) = p.strip_prefix("*.") {
        d
    } else if let Some(d) = p.strip_prefix('@') {
        d
    } else if let Some((local, d)) = p.split_once('@') {
        if local.is_empty() {
            return Err(bad("empty local part"));
        }
        d
    } else {
        &p
    };
    if domain.is_empty() {
        return Err(bad("empty domain"));
    }
    if domain.contains('@') {
        return Err(bad("more than one '@'"));
    }
    if domain.contains('*') {
        return Err(bad("'*' is only allowed as a leading \"*.\""));
    }
    if domain.starts_with('.') || domain.ends_with('.') {
        return Err(bad("domain starts or ends with '.'"));
    }
    Ok(p)
}

/// `pattern` and `sender` lower-case.
fn pattern_matches(pattern: &str, sender: &str) -> bool {
    let domain = sender.rsplit_once('@').map(|(_, d)| d);
    if let Some(suffix) = pattern.strip_prefix("*.") {
        domain.is_some_and(|d| {
            d == suffix
                || d.strip_suffix(suffix)
                    .is_some_and(|head| head.ends_with('.') && head.len() > 1)
        })
    } else if let Some(dom) = pattern.strip_prefix('@') {
        domain == Some(dom)
    } else if pattern.contains('@') {
        sender == pattern
    } else {
        domain == Some(pattern)
    }
}

/// Checks a language tag and that an agent has a template for it (built-in or one of
/// `extra`, the configured `link.agent_languages`).
pub fn normalize_language(s: &str, extra: &[String]) -> Result<String, UserError> {
    let l = s.trim();
    let bad = |reason| UserError::InvalidLanguage {
        language: s.to_owned(),
        reason,
    };
    if l.len() > MAX_LANGUAGE_LEN {
        return Err(bad("longer than 16 characters"));
    }
    if !l
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(bad("expected a language tag such as zh, en or en-US"));
    }
    if !has_template(l, extra) {
        return Err(bad(
            "the agent has no template for it (built-in: zh, en; add others to link.agent_languages)",
        ));
    }
    Ok(l.to_owned())
}

/// Parses a licence expiry: `YYYY-MM-DD` (the end of that day, UTC), an RFC 3339 time, Unix
/// milliseconds, or `none`/`never`/empty (never expires). Returns Unix ms.
pub fn parse_licence(s: &str) -> Result<Option<i64>, UserError> {
    let t = s.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("none") || t.eq_ignore_ascii_case("never") {
        return Ok(None);
    }
    let bad = || UserError::InvalidLicence {
        input: s.to_owned(),
    };
    if let Ok(d) = chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        let next = d.succ_opt().ok_or_else(bad)?;
        let start = next.and_hms_opt(0, 0, 0).ok_or_else(bad)?;
        return Ok(Some(start.and_utc().timestamp_millis() - 1));
    }
    if let Ok(dt) = chrono::DateTime::parse_from_rfc3339(t) {
        return Ok(Some(dt.timestamp_millis()));
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map(Some).map_err(|_| bad());
    }
    Err(bad())
}

/// Formats a licence expiry for people: RFC 3339 UTC, or `none`.
pub fn format_licence(until: Option<i64>) -> String {
    match until {
        None => "none".to_owned(),
        Some(ms) => match chrono::DateTime::from_timestamp_millis(ms) {
            Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            None => ms.to_string(),
        },
    }
}

/// Parses a yes/no value (`yes|no|true|false|on|off|1|0`, case-insensitive).
pub fn parse_bool(field: &'static str, s: &str) -> Result<bool, UserError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "yes" | "y" | "true" | "on" | "1" => Ok(true),
        "no" | "n" | "false" | "off" | "0" => Ok(false),
        _ => Err(UserError::InvalidField {
            field,
            input: s.to_owned(),
            reason: "expected yes or no",
        }),
    }
}

/// The names of the fields that differ (CSV column names), for a dry run's report; the
/// values are left out (phone numbers are personal data).
fn changed_fields(old: &User, new: &User) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut diff = |name, changed: bool| {
        if changed {
            out.push(name);
        }
    };
    diff("phone", old.phone != new.phone);
    diff("notify", old.notify != new.notify);
    diff("licence_until", old.licence_until != new.licence_until);
    diff("quiet", old.quiet != new.quiet);
    diff(
        "rate_limit_secs",
        old.rate_limit_secs != new.rate_limit_secs,
    );
    diff("language", old.language != new.language);
    diff("aliases", old.aliases != new.aliases);
    diff("allow_senders", old.allow_senders != new.allow_senders);
    diff("deny_senders", old.deny_senders != new.deny_senders);
    diff("max_parts", old.max_parts != new.max_parts);
    diff("state", old.state != new.state);
    diff("networks", old.networks != new.networks);
    out
}

/// CSV columns, in documentation order.
pub const CSV_COLUMNS: [&str; 13] = [
    "address",
    "phone",
    "notify",
    "licence_until",
    "quiet",
    "rate_limit_secs",
    "language",
    "aliases",
    "allow_senders",
    "deny_senders",
    "max_parts",
    "state",
    "networks",
];

/// The rows of an import file by line, and the lines that could not be read with why.
type ParsedRows = (Vec<(u64, Row)>, Vec<(u64, String)>);

/// Rows of an import CSV, with the lines that could not be parsed. Reads the whole input;
/// an I/O error or a bad header is an error.
fn parse_csv_rows<R: std::io::Read>(r: R) -> Result<ParsedRows, UserError> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(r);
    let headers = match rdr.headers() {
        Ok(h) => h.clone(),
        Err(e) if e.is_io_error() => return Err(UserError::Csv(e)),
        Err(e) => return Err(UserError::CsvHeader(e.to_string())),
    };
    let columns = Columns::from_header(&headers)?;
    let mut record = csv::StringRecord::new();
    let mut rows: Vec<(u64, Row)> = Vec::new();
    // Lines rejected, reported in line order at the end.
    let mut failed: Vec<(u64, String)> = Vec::new();
    loop {
        match rdr.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let line = record.position().map_or(0, |p| p.line());
                if record.iter().all(str::is_empty) {
                    continue; // a blank line
                }
                match columns.parse(&record) {
                    Ok(row) => rows.push((line, row)),
                    Err(e) => failed.push((line, e.to_string())),
                }
            }
            Err(e) if e.is_io_error() => return Err(UserError::Csv(e)),
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                let message = match e.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => format!("expected {expected_len} fields, found {len}"),
                    csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_owned(),
                    _ => e.to_string(),
                };
                failed.push((line, message));
            }
        }
    }
    Ok((rows, failed))
}

/// One object of a JSON import: the [`User`] fields, each optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRow {
    address: String,
    #[serde(default)]
    aliases: Option<Vec<String>>,
    #[serde(default)]
    phone: Option<String>,
    #[serde(default)]
    notify: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    licence_until: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    quiet: Option<Option<QuietHours>>,
    #[serde(default, deserialize_with = "present")]
    rate_limit_secs: Option<Option<u32>>,
    #[serde(default)]
    allow_senders: Option<Vec<String>>,
    #[serde(default)]
    deny_senders: Option<Vec<String>>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    max_parts: Option<u8>,
    #[serde(default)]
    state: Option<AccountState>,
    #[serde(default)]
    networks: Option<Networks>,
    #[serde(flatten)]
    account: AccountFields,
}

/// Rows of a JSON import, each with the line its object starts on, and the objects that
/// could not be read.
fn parse_json_rows(data: &str) -> Result<ParsedRows, UserError> {
    let items: Vec<&serde_json::value::RawValue> = serde_json::from_str(data)
        .map_err(|e| UserError::JsonImport(format!("expected an array of user objects: {e}")))?;
    let mut rows = Vec::with_capacity(items.len());
    let mut failed = Vec::new();
    for raw in items {
        // The object's place in `data`, for its line number.
        let offset = (raw.get().as_ptr() as usize).saturating_sub(data.as_ptr() as usize);
        let line = 1 + data.as_bytes()[..offset.min(data.len())]
            .iter()
            .filter(|b| **b == b'\n')
            .count() as u64;
        // serde_path_to_error names the field; serde_json's own message only has a position.
        let row = serde_path_to_error::deserialize::<_, JsonRow>(
            &mut serde_json::Deserializer::from_str(raw.get()),
        )
        .map_err(|e| {
            // serde_json's position is inside the object; the report gives the object's line.
            let message = e.inner().to_string();
            let message = message
                .rsplit_once(" at line ")
                .map_or(message.as_str(), |(m, _)| m);
            match e.path().to_string().as_str() {
                "." => message.to_owned(),
                path => format!("{path}: {message}"),
            }
        })
        .and_then(|j| {
            Ok(Row {
                address: normalize_address(&j.address).map_err(|e| e.to_string())?,
                phone: j.phone,
                notify: j.notify,
                licence_until: j.licence_until,
                quiet: j.quiet,
                rate_limit_secs: j.rate_limit_secs,
                language: j.language,
                aliases: j.aliases,
                allow_senders: j.allow_senders,
                deny_senders: j.deny_senders,
                max_parts: j.max_parts,
                state: j.state,
                networks: j.networks,
                account: j.account.checked().map_err(|e| e.to_string())?,
            })
        });
        match row {
            Ok(row) => rows.push((line, row)),
            Err(e) => failed.push((line, e)),
        }
    }
    Ok((rows, failed))
}

/// What `mailbell user export` writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// The import CSV (header row, [`CSV_COLUMNS`]).
    #[default]
    Csv,
    /// A JSON array of [`User`], one per line.
    Json,
}

impl FromStr for ExportFormat {
    type Err = UserError;
    fn from_str(s: &str) -> Result<Self, UserError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "csv" => Ok(ExportFormat::Csv),
            "json" => Ok(ExportFormat::Json),
            _ => Err(UserError::InvalidField {
                field: "export format",
                input: s.to_owned(),
                reason: "expected csv or json",
            }),
        }
    }
}

/// Writes users as `mailbell user export` prints them, the same whether they come from the
/// store or from the admin API's pages.
///
/// The CSV is what [`UserStore::import_csv`] reads back to the same users: a header row of
/// [`CSV_COLUMNS`], then every cell filled; a field at its default is written as
/// [`CSV_CLEAR`] (an empty cell would keep the importing registry's value), so importing an
/// export over an existing registry also resets those fields. JSON is an array with one
/// [`User`] per line.
pub struct Exporter<W: std::io::Write> {
    out: ExportOut<W>,
    count: u64,
}

enum ExportOut<W: std::io::Write> {
    Csv(Box<csv::Writer<W>>),
    Json(std::io::BufWriter<W>),
}

impl<W: std::io::Write> Exporter<W> {
    /// Starts the export (writes the CSV header or the opening bracket).
    pub fn new(format: ExportFormat, w: W) -> Result<Self, UserError> {
        let out = match format {
            ExportFormat::Csv => {
                let mut c = csv::WriterBuilder::new().has_headers(false).from_writer(w);
                c.write_record(CSV_COLUMNS.iter().chain(&LEDGER_COLUMNS))
                    .map_err(export_error)?;
                ExportOut::Csv(Box::new(c))
            }
            ExportFormat::Json => {
                let mut b = std::io::BufWriter::new(w);
                b.write_all(b"[").map_err(UserError::Export)?;
                ExportOut::Json(b)
            }
        };
        Ok(Exporter { out, count: 0 })
    }

    pub fn write(&mut self, user: &User) -> Result<(), UserError> {
        self.write_with(user, None)
    }

    /// Writes `user` with its ledger account's fields (`None`: no account; the ledger
    /// columns are left empty).
    pub fn write_with(
        &mut self,
        user: &User,
        account: Option<&AccountFields>,
    ) -> Result<(), UserError> {
        match &mut self.out {
            ExportOut::Csv(c) => c
                .write_record(
                    csv_record(user)
                        .into_iter()
                        .chain(AccountFields::cells(account)),
                )
                .map_err(export_error)?,
            ExportOut::Json(b) => {
                let sep: &[u8] = if self.count == 0 { b"\n" } else { b",\n" };
                b.write_all(sep).map_err(UserError::Export)?;
                #[derive(Serialize)]
                struct WithAccount<'a> {
                    #[serde(flatten)]
                    user: &'a User,
                    #[serde(flatten)]
                    account: Option<&'a AccountFields>,
                }
                serde_json::to_writer(&mut *b, &WithAccount { user, account })
                    .map_err(UserError::Encode)?;
            }
        }
        self.count += 1;
        Ok(())
    }

    /// Ends the export and flushes it; the number of users written.
    pub fn finish(self) -> Result<u64, UserError> {
        match self.out {
            ExportOut::Csv(mut c) => c.flush().map_err(UserError::Export)?,
            ExportOut::Json(mut b) => {
                let end: &[u8] = if self.count == 0 { b"]\n" } else { b"\n]\n" };
                b.write_all(end).map_err(UserError::Export)?;
                b.flush().map_err(UserError::Export)?;
            }
        }
        Ok(self.count)
    }
}

fn export_error(e: csv::Error) -> UserError {
    match e.into_kind() {
        csv::ErrorKind::Io(e) => UserError::Export(e),
        k => UserError::Export(std::io::Error::other(format!("{k:?}"))),
    }
}

/// One user as an import line, in [`CSV_COLUMNS`] order: every cell filled, [`CSV_CLEAR`]
/// for a field at its default (an empty cell would keep the importing registry's value).
fn csv_record(u: &User) -> [String; CSV_COLUMNS.len()] {
    let or_clear = |s: &str| {
        if s.is_empty() {
            CSV_CLEAR.to_owned()
        } else {
            s.to_owned()
        }
    };
    // A list of the one item "-" (a valid pattern) would read back as "clear": "-;" is it.
    let list = |v: &[String]| match v.join(";") {
        s if s == CSV_CLEAR => format!("{CSV_CLEAR};"),
        s => or_clear(&s),
    };
    [
        u.address.clone(),
        or_clear(&u.phone),
        if u.notify { "yes" } else { "no" }.to_owned(),
        // RFC 3339 to the millisecond: the stored value exactly.
        u.licence_until
            .map_or_else(|| CSV_CLEAR.to_owned(), |ms| format_licence(Some(ms))),
        u.quiet
            .as_ref()
            .map_or_else(|| CSV_CLEAR.to_owned(), QuietHours::to_string),
        u.rate_limit_secs
            .map_or_else(|| CSV_CLEAR.to_owned(), |s| s.to_string()),
        or_clear(&u.language),
        list(&u.aliases),
        list(&u.allow_senders),
        list(&u.deny_senders),
        u.max_parts.to_string(),
        u.state.as_str().to_owned(),
        or_clear(&u.networks.join(";")),
    ]
}

/// Which record field each known column is in.
struct Columns {
    at: [Option<usize>; CSV_COLUMNS.len()],
    /// The ledger's columns ([`LEDGER_COLUMNS`]).
    ledger_at: [Option<usize>; LEDGER_COLUMNS.len()],
}

/// One CSV line: the address and the columns the file has.
struct Row {
    address: String,
    phone: Option<String>,
    notify: Option<bool>,
    licence_until: Option<Option<i64>>,
    quiet: Option<Option<QuietHours>>,
    rate_limit_secs: Option<Option<u32>>,
    language: Option<String>,
    aliases: Option<Vec<String>>,
    allow_senders: Option<Vec<String>>,
    deny_senders: Option<Vec<String>>,
    max_parts: Option<u8>,
    state: Option<AccountState>,
    networks: Option<Networks>,
    /// The ledger account's fields ([`account_fields`]).
    account: AccountFields,
}

impl Columns {
    fn from_header(header: &csv::StringRecord) -> Result<Self, UserError> {
        if header.iter().all(str::is_empty) {
            return Err(UserError::CsvHeader(format!(
                "missing header row (columns: {})",
                CSV_COLUMNS.join(",")
            )));
        }
        let mut at = [None; CSV_COLUMNS.len()];
        let mut ledger_at = [None; LEDGER_COLUMNS.len()];
        let mut unknown = Vec::new();
        for (i, name) in header.iter().enumerate() {
            let name = name
                .trim()
                .trim_start_matches('\u{feff}')
                .to_ascii_lowercase();
            match CSV_COLUMNS.iter().position(|c| *c == name) {
                Some(c) if at[c].is_some() => {
                    return Err(UserError::CsvHeader(format!(
                        "column {name:?} appears twice"
                    )))
                }
                Some(c) => at[c] = Some(i),
                None => match LEDGER_COLUMNS.iter().position(|c| *c == name) {
                    Some(c) if ledger_at[c].is_some() => {
                        return Err(UserError::CsvHeader(format!(
                            "column {name:?} appears twice"
                        )))
                    }
                    Some(c) => ledger_at[c] = Some(i),
                    None => unknown.push(format!("{name:?}")),
                },
            }
        }
        if !unknown.is_empty() {
            return Err(UserError::CsvHeader(format!(
                "unknown column{} {} (known: {},{})",
                if unknown.len() == 1 { "" } else { "s" },
                unknown.join(", "),
                CSV_COLUMNS.join(","),
                LEDGER_COLUMNS.join(",")
            )));
        }
        if at[0].is_none() {
            return Err(UserError::CsvHeader(
                "the address column is missing".to_owned(),
            ));
        }
        Ok(Columns { at, ledger_at })
    }

    fn cell<'r>(&self, record: &'r csv::StringRecord, column: usize) -> Option<&'r str> {
        self.at[column].map(|i| record.get(i).unwrap_or(""))
    }

    fn parse(&self, record: &csv::StringRecord) -> Result<Row, UserError> {
        if record.as_slice().len() > MAX_CSV_RECORD_BYTES {
            return Err(UserError::InvalidField {
                field: "line",
                input: String::new(),
                reason: "longer than 64 KiB",
            });
        }
        let list = |s: &str| -> Vec<String> {
            s.split(';')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let address = normalize_address(self.cell(record, 0).unwrap_or(""))?;
        // An empty cell (or a column the file lacks) keeps the field; CSV_CLEAR resets it.
        let field = |column: usize| -> Option<Option<&str>> {
            match self.cell(record, column)? {
                "" => None,
                CSV_CLEAR => Some(None),
                s => Some(Some(s)),
            }
        };
        Ok(Row {
            address,
            phone: field(1).map(|v| v.unwrap_or("").to_owned()),
            notify: field(2)
                .map(|v| v.map_or(Ok(true), |s| parse_bool("notify", s)))
                .transpose()?,
            licence_until: field(3)
                .map(|v| v.map_or(Ok(None), parse_licence))
                .transpose()?,
            quiet: field(4)
                .map(|v| match v {
                    None => Ok(None),
                    Some(s) if s.eq_ignore_ascii_case("none") => Ok(None),
                    Some(s) => QuietHours::parse(s).map(Some),
                })
                .transpose()?,
            rate_limit_secs: field(5)
                .map(|v| match v {
                    None => Ok(None),
                    Some(s) if s.eq_ignore_ascii_case("default") => Ok(None),
                    Some(s) => s.parse().map(Some).map_err(|_| UserError::InvalidField {
                        field: "rate_limit_secs",
                        input: s.to_owned(),
                        reason: "expected seconds (0 = no limit) or default",
                    }),
                })
                .transpose()?,
            language: field(6).map(|v| v.unwrap_or("").to_owned()),
            aliases: field(7).map(|v| v.map(list).unwrap_or_default()),
            allow_senders: field(8).map(|v| v.map(list).unwrap_or_default()),
            deny_senders: field(9).map(|v| v.map(list).unwrap_or_default()),
            max_parts: field(10)
                .map(|v| match v {
                    None => Ok(0),
                    Some(s) => s.parse().map_err(|_| UserError::InvalidField {
                        field: "max_parts",
                        input: s.to_owned(),
                        reason: "expected 0 to 255 (0 = default)",
                    }),
                })
                .transpose()?,
            state: field(11)
                .map(|v| v.map_or(Ok(AccountState::Normal), str::parse))
                .transpose()?,
            networks: field(12)
                .map(|v| v.map_or(Ok(Networks::any()), Networks::parse))
                .transpose()?,
            account: AccountFields::from_cells(
                self.ledger_at
                    .map(|i| i.map(|i| record.get(i).unwrap_or(""))),
            )?,
        })
    }
}

impl Row {
    fn apply(self, user: &mut User) {
        if let Some(v) = self.phone {
            user.phone = v;
        }
        if let Some(v) = self.notify {
            user.notify = v;
        }
        if let Some(v) = self.licence_until {
            user.licence_until = v;
        }
        if let Some(v) = self.quiet {
            user.quiet = v;
        }
        if let Some(v) = self.rate_limit_secs {
            user.rate_limit_secs = v;
        }
        if let Some(v) = self.language {
            user.language = v;
        }
        if let Some(v) = self.aliases {
            user.aliases = v;
        }
        if let Some(v) = self.allow_senders {
            user.allow_senders = v;
        }
        if let Some(v) = self.deny_senders {
            user.deny_senders = v;
        }
        if let Some(v) = self.max_parts {
            user.max_parts = v;
        }
        if let Some(v) = self.state {
            user.state = v;
        }
        if let Some(v) = self.networks {
            user.networks = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn store() -> (tempfile::TempDir, UserStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = UserStore::open(&dir.path().join("users")).unwrap();
        (dir, store)
    }

    fn user(address: &str, phone: &str) -> User {
        User {
            phone: phone.to_owned(),
            ..User::new(address)
        }
    }

    #[test]
    fn address_validation() {
        assert_eq!(
            normalize_address(" <Alice@Example.COM> ").unwrap(),
            "alice@example.com"
        );
        for (bad, reason) in [
            ("", "empty"),
            ("alice", "no '@'"),
            ("a@b@c", "more than one '@'"),
            ("@example.com", "empty local part"),
            ("alice@", "empty domain"),
            ("al ice@example.com", "whitespace"),
            ("a;b@example.com", "contains one of"),
        ] {
            let e = normalize_address(bad).unwrap_err().to_string();
            assert!(e.contains(reason), "{bad:?}: {e}");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(normalize_address(&long).is_err());
    }

    #[test]
    fn phone_validation() {
        assert_eq!(
            normalize_phone("+44 7700-900.123").unwrap(),
            "+447700900123"
        );
        assert_eq!(
            normalize_phone("+1 (555) 010-9999").unwrap(),
            "+15550109999"
        );
        assert_eq!(normalize_phone("  ").unwrap(), "");
        for (bad, reason) in [
            ("07700900123", "must start with '+'"),
            ("+44 77OO 900123", "only digits"),
            ("+1234567", "8 to 15 digits"),
            ("+1234567890123456", "8 to 15 digits"),
            ("+0447700900123", "cannot start with 0"),
        ] {
            let e = normalize_phone(bad).unwrap_err().to_string();
            assert!(e.contains(reason), "{bad:?}: {e}");
            assert!(!e.contains(bad), "number echoed in {e}");
        }
    }

    #[test]
    fn user_validation() {
        let mut u = user("Bob@Example.com", "+8613800138000");
        u.aliases = vec![
            "B@Example.com".into(),
            "b@example.com".into(),
            "bob@example.com".into(),
        ];
        u.allow_senders = vec!["*.Corp.example".into()];
        u.language = "zh".into();
        let v = u.validated().unwrap();
        assert_eq!(v.address, "bob@example.com");
        assert_eq!(v.aliases, vec!["b@example.com"]);
        assert_eq!(v.allow_senders, vec!["*.corp.example"]);

        let mut u = user("a@example.com", "");
        u.language = "zh tw".into();
        assert!(matches!(
            u.validated(),
            Err(UserError::InvalidLanguage { .. })
        ));
        let mut u = user("a@example.com", "");
        u.deny_senders = vec!["foo*.example".into()];
        assert!(matches!(
            u.validated(),
            Err(UserError::InvalidSenderPattern { .. })
        ));
        let mut u = user("a@example.com", "");
        u.aliases = (0..=MAX_ALIASES)
            .map(|i| format!("x{i}@example.com"))
            .collect();
        assert!(matches!(u.validated(), Err(UserError::TooMany { .. })));
        let mut u = user("a@example.com", "");
        u.quiet = Some(QuietHours {
            start_min: 1500,
            end_min: 10,
        });
        assert!(matches!(
            u.validated(),
            Err(UserError::InvalidQuietHours { .. })
        ));
    }

    #[test]
    fn quiet_hours_wrap_and_plain() {
        let q = QuietHours::parse("22:00-07:00").unwrap();
        assert_eq!(
            q,
            QuietHours {
                start_min: 1320,
                end_min: 420
            }
        );
        assert_eq!(q.to_string(), "22:00-07:00");
        assert!(q.contains(22 * 60));
        assert!(q.contains(23 * 60 + 59));
        assert!(q.contains(0));
        assert!(q.contains(6 * 60 + 59));
        assert!(!q.contains(7 * 60));
        assert!(!q.contains(12 * 60));
        assert!(!q.contains(21 * 60 + 59));
        assert_eq!(q.minutes_until_end(23 * 60), 8 * 60);
        assert_eq!(q.minutes_until_end(6 * 60 + 59), 1);
        assert_eq!(q.minutes_until_end(12 * 60), 0);

        let q = QuietHours::parse(" 9:30 - 12:00 ").unwrap();
        assert!(q.contains(9 * 60 + 30) && q.contains(11 * 60 + 59));
        assert!(!q.contains(12 * 60) && !q.contains(9 * 60 + 29));
        assert_eq!(q.minutes_until_end(10 * 60), 120);
        assert_eq!(QuietHours::parse("20:00-24:00").unwrap().end_min, 0);

        for bad in [
            "",
            "22:00",
            "25:00-07:00",
            "22:60-07:00",
            "08:00-08:00",
            "2200-0700",
            "a:bc-07:00",
        ] {
            assert!(QuietHours::parse(bad).is_err(), "{bad:?}");
        }
        // JSON: the string form and the field form.
        let q: QuietHours = serde_json::from_str("\"22:00-07:00\"").unwrap();
        assert_eq!(q.start_min, 1320);
        let q: QuietHours = serde_json::from_str(r#"{"start_min":60,"end_min":120}"#).unwrap();
        assert_eq!(q.end_min, 120);
        assert!(serde_json::from_str::<QuietHours>(r#"{"start_min":60,"end_min":60}"#).is_err());
    }

    #[test]
    fn sender_patterns() {
        let mut u = user("a@example.com", "+447700900123");
        assert!(u.sender_allowed("anyone@anywhere.example"));
        u.allow_senders = vec![
            "boss@corp.example".into(),
            "@partner.example".into(),
            "vendor.example".into(),
            "*.group.example".into(),
        ];
        u.deny_senders = vec![
            "noreply@partner.example".into(),
            "*.spam.group.example".into(),
        ];
        let u = u.validated().unwrap();
        assert!(u.sender_allowed("Boss@Corp.Example"));
        assert!(u.sender_allowed("<boss@corp.example>"));
        assert!(!u.sender_allowed("other@corp.example"));
        assert!(u.sender_allowed("x@partner.example"));
        assert!(!u.sender_allowed("x@sub.partner.example"));
        assert!(!u.sender_allowed("NoReply@partner.example")); // deny wins
        assert!(u.sender_allowed("x@vendor.example"));
        assert!(u.sender_allowed("x@group.example"));
        assert!(u.sender_allowed("x@a.b.group.example"));
        assert!(!u.sender_allowed("x@evilgroup.example"));
        assert!(!u.sender_allowed("x@a.spam.group.example"));
        assert!(!u.sender_allowed("x@spam.group.example"));
        assert!(!u.sender_allowed(""));

        let mut deny_only = user("a@example.com", "");
        deny_only.deny_senders = vec!["Spam.Example".into()];
        assert!(!deny_only.sender_allowed("x@spam.example"));
        assert!(deny_only.sender_allowed("x@ham.example"));
    }

    #[test]
    fn licence_and_eligibility() {
        let end_2025 = parse_licence("2025-12-31").unwrap().unwrap();
        let new_year = parse_licence("2026-01-01T00:00:00Z").unwrap().unwrap();
        assert_eq!(end_2025, new_year - 1);
        assert_eq!(
            parse_licence("2026-01-01T08:00:00+08:00").unwrap(),
            Some(new_year)
        );
        assert_eq!(parse_licence("none").unwrap(), None);
        assert_eq!(parse_licence("").unwrap(), None);
        assert_eq!(parse_licence("1767225600000").unwrap(), Some(new_year));
        assert!(parse_licence("31/12/2025").is_err());
        assert!(parse_licence("2025-02-30").is_err());
        assert_eq!(format_licence(Some(new_year)), "2026-01-01T00:00:00.000Z");
        assert_eq!(format_licence(None), "none");

        let mut u = user("a@example.com", "+447700900123");
        assert_eq!(u.ineligible(new_year), None);
        u.licence_until = Some(end_2025);
        assert_eq!(u.ineligible(end_2025), None);
        assert_eq!(u.ineligible(new_year), Some(Ineligible::LicenceExpired));
        u.notify = false;
        assert_eq!(u.ineligible(0), Some(Ineligible::NotifyOff));
        let u = User::new("b@example.com");
        assert_eq!(u.ineligible(0), Some(Ineligible::NoPhone));
    }

    #[test]
    fn aliases_resolve_case_insensitively_and_conflict() {
        let (_dir, s) = store();
        let mut a = user("Alice@Example.com", "+447700900123");
        a.aliases = vec!["Ali@Example.com".into()];
        s.upsert(a).unwrap();
        assert_eq!(s.len(), 1);
        for key in [
            "alice@example.com",
            "ALICE@EXAMPLE.COM",
            "ali@example.com",
            " <Ali@example.COM>",
        ] {
            assert_eq!(s.lookup(key).unwrap().address, "alice@example.com", "{key}");
        }
        assert!(s.lookup("bob@example.com").is_none());

        // Another user may not take alice's alias or address.
        let mut b = user("bob@example.com", "");
        b.aliases = vec!["ALI@example.com".into()];
        let e = s.upsert(b).unwrap_err();
        assert!(
            matches!(e, UserError::AliasConflict { ref alias, ref owner } if alias == "ali@example.com" && owner == "alice@example.com"),
            "{e}"
        );
        let mut b = user("bob@example.com", "");
        b.aliases = vec!["alice@example.com".into()];
        assert!(matches!(s.upsert(b), Err(UserError::AliasConflict { .. })));
        assert!(matches!(
            s.upsert(user("ali@example.com", "")),
            Err(UserError::AliasConflict { .. })
        ));
        assert!(s.lookup("bob@example.com").is_none());

        // Moving the alias: drop it from alice, then bob can have it.
        let patch = UserPatch {
            remove_aliases: vec!["Ali@example.com".into()],
            ..UserPatch::default()
        };
        assert!(s
            .update("alice@example.com", &patch)
            .unwrap()
            .aliases
            .is_empty());
        assert!(s.lookup("ali@example.com").is_none());
        let mut b = user("bob@example.com", "");
        b.aliases = vec!["ali@example.com".into()];
        s.upsert(b).unwrap();
        assert_eq!(
            s.lookup("ali@example.com").unwrap().address,
            "bob@example.com"
        );
        assert_eq!(s.len(), 2);

        // Remove by alias is refused; by address it drops the aliases too.
        assert!(matches!(
            s.remove("ali@example.com"),
            Err(UserError::IsAlias { .. })
        ));
        assert!(s.remove("BOB@example.com").unwrap());
        assert!(!s.remove("bob@example.com").unwrap());
        assert!(s.lookup("ali@example.com").is_none());
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn patch_updates_fields() {
        let (_dir, s) = store();
        s.upsert(user("a@example.com", "+447700900123")).unwrap();
        let patch: UserPatch = serde_json::from_str(
            r#"{"notify":false,"quiet":"22:00-07:00","licence_until":1767225600000,"rate_limit_secs":0,"add_aliases":["A2@example.com"],"language":"en"}"#,
        )
        .unwrap();
        let u = s.update("A@example.com", &patch).unwrap();
        assert!(!u.notify);
        assert_eq!(u.quiet.unwrap().to_string(), "22:00-07:00");
        assert_eq!(u.licence_until, Some(1_767_225_600_000));
        assert_eq!(u.rate_limit_secs, Some(0));
        assert_eq!(u.aliases, vec!["a2@example.com"]);
        assert!(!s.lookup("a2@example.com").unwrap().notify);
        // null clears, absent keeps.
        let patch: UserPatch =
            serde_json::from_str(r#"{"quiet":null,"licence_until":null}"#).unwrap();
        assert_eq!(patch.quiet, Some(None));
        assert_eq!(patch.rate_limit_secs, None);
        let u = s.update("a2@example.com", &patch).unwrap();
        assert_eq!(
            (u.quiet, u.licence_until, u.rate_limit_secs),
            (None, None, Some(0))
        );
        // Round trip through JSON keeps the distinction.
        let json = serde_json::to_string(&patch).unwrap();
        assert_eq!(serde_json::from_str::<UserPatch>(&json).unwrap(), patch);
        assert!(serde_json::from_str::<UserPatch>(r#"{"notfy":true}"#).is_err());
        // A bad value changes nothing.
        let bad = UserPatch {
            phone: Some("12345".into()),
            ..UserPatch::default()
        };
        assert!(matches!(
            s.update("a@example.com", &bad),
            Err(UserError::InvalidPhone { .. })
        ));
        assert_eq!(
            s.get("a@example.com").unwrap().unwrap().phone,
            "+447700900123"
        );
        assert!(matches!(
            s.update("nobody@example.com", &UserPatch::default()),
            Err(UserError::NotFound { .. })
        ));
    }

    #[test]
    fn list_pages_in_address_order() {
        let (_dir, s) = store();
        for name in ["carol", "alice", "bob", "dave", "erin"] {
            s.upsert(user(&format!("{name}@example.com"), "")).unwrap();
        }
        let page = s.list(None, 2).unwrap();
        let names: Vec<_> = page.iter().map(|u| u.address.as_str()).collect();
        assert_eq!(names, ["alice@example.com", "bob@example.com"]);
        let page = s.list(Some("BOB@example.com"), 10).unwrap();
        let names: Vec<_> = page.iter().map(|u| u.address.as_str()).collect();
        assert_eq!(
            names,
            ["carol@example.com", "dave@example.com", "erin@example.com"]
        );
        assert!(s.list(None, 0).unwrap().is_empty());
    }

    #[test]
    fn insert_refuses_existing() {
        let (_dir, s) = store();
        s.insert(user("a@example.com", "+447700900123")).unwrap();
        assert!(matches!(
            s.insert(user("A@example.com", "+447700900123")),
            Err(UserError::Exists { .. })
        ));
        let saved = s.save(user("a@example.com", "+447700900123")).unwrap();
        assert!(!saved.created);
        assert!(s.save(user("b@example.com", "")).unwrap().created);
    }

    #[test]
    fn add_and_set_validation() {
        let (_dir, s) = store();
        // Notifications on without a phone.
        let e = s.insert(user("a@example.com", "")).unwrap_err();
        assert!(matches!(e, UserError::NotifyWithoutPhone { .. }), "{e}");
        let off = User {
            notify: false,
            ..user("a@example.com", "")
        };
        s.insert(off).unwrap();
        let on = UserPatch {
            notify: Some(true),
            ..UserPatch::default()
        };
        assert!(matches!(
            s.update("a@example.com", &on),
            Err(UserError::NotifyWithoutPhone { .. })
        ));
        let phone = UserPatch {
            notify: Some(true),
            phone: Some("+447700900123".into()),
            ..UserPatch::default()
        };
        s.update("a@example.com", &phone).unwrap();

        // Adding someone's alias names the owner.
        let mut b = user("b@example.com", "+447700900124");
        b.aliases = vec!["bee@example.com".into()];
        s.insert(b).unwrap();
        let e = s
            .insert(user("Bee@example.com", "+447700900125"))
            .unwrap_err();
        assert!(
            matches!(e, UserError::IsAlias { ref owner, .. } if owner == "b@example.com"),
            "{e}"
        );
        assert!(e.to_string().contains("b@example.com"), "{e}");

        // A language no agent renders, and more parts than an agent sends.
        for lang in ["fr", "pt-BR"] {
            let u = User {
                language: lang.into(),
                ..user("c@example.com", "+447700900126")
            };
            assert!(
                matches!(s.insert(u), Err(UserError::InvalidLanguage { .. })),
                "{lang}"
            );
        }
        // ... unless the operator gave the agents a template for it (link.agent_languages),
        // also through an import.
        let with_fr = s.clone().with_languages(&["fr".to_owned()]);
        let fr = |a: &str, lang: &str| User {
            language: lang.into(),
            ..user(a, "+447700900127")
        };
        with_fr.insert(fr("d@example.com", "fr")).unwrap();
        with_fr.insert(fr("e@example.com", "fr-CA")).unwrap();
        assert!(matches!(
            with_fr.insert(fr("f@example.com", "pt-BR")),
            Err(UserError::InvalidLanguage { .. })
        ));
        let csv = "address,phone,language\ng@example.com,+447700900128,FR\n";
        assert!(
            s.import_csv(csv.as_bytes(), ImportMode::Upsert)
                .unwrap()
                .failed
                == 1
        );
        assert!(
            with_fr
                .import_csv(csv.as_bytes(), ImportMode::Upsert)
                .unwrap()
                .failed
                == 0
        );
        let u = User {
            language: "en-US".into(),
            max_parts: MAX_SMS_PARTS,
            ..user("c@example.com", "+447700900126")
        };
        s.insert(u).unwrap();
        let parts = UserPatch {
            max_parts: Some(MAX_SMS_PARTS + 1),
            ..UserPatch::default()
        };
        assert!(matches!(
            s.update("c@example.com", &parts),
            Err(UserError::InvalidField {
                field: "max_parts",
                ..
            })
        ));
    }

    #[test]
    fn reopen_persists_and_second_open_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        {
            let s = UserStore::open(&path).unwrap();
            let mut a = user("a@example.com", "+447700900123");
            a.aliases = vec!["alias@example.com".into()];
            a.quiet = Some(QuietHours::parse("23:00-06:30").unwrap());
            s.upsert(a).unwrap();
            s.upsert(user("b@example.com", "")).unwrap();
            assert!(s.remove("b@example.com").unwrap());

            let second = UserStore::open_with(&path, Duration::from_millis(50));
            assert!(
                matches!(second, Err(UserError::Locked { .. })),
                "{second:?}"
            );
        }
        let s = UserStore::open(&path).unwrap();
        assert_eq!(s.len(), 1);
        let a = s.lookup("ALIAS@example.com").unwrap();
        assert_eq!(a.address, "a@example.com");
        assert_eq!(a.quiet.unwrap().to_string(), "23:00-06:30");
        assert!(s.lookup("b@example.com").is_none());
    }

    #[test]
    fn csv_import_reports_bad_lines_and_imports_the_rest() {
        let (_dir, s) = store();
        s.upsert(user("keep@example.com", "+447700900999")).unwrap();
        let csv = "\
address,phone,notify,licence_until,quiet,aliases,deny_senders
alice@example.com,+44 7700 900123,yes,2026-12-31,22:00-07:00,al@example.com;ALICE2@example.com,*.spam.example
bob@example.com,12345,yes,,,,
not-an-address,+447700900124,,,,,
carol@example.com,+447700900125,maybe,,,,
dave@example.com,+447700900126,no,never,25:00-07:00,,
erin@example.com,+447700900127,,,,al@example.com,
frank@example.com,+447700900128
keep@example.com,-,off,,,,

gina@example.com,+447700900129,1,1767225600000,none,,
";
        let r = s.import_csv(csv.as_bytes(), ImportMode::Upsert).unwrap();
        println!("{r:#?}");
        assert_eq!((r.added, r.updated, r.skipped, r.failed), (2, 1, 0, 6));
        let lines: Vec<u64> = r.errors.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [3, 4, 5, 6, 7, 8]);
        assert!(r.errors[0].1.contains("phone"), "{:?}", r.errors[0]);
        assert!(r.errors[1].1.contains("not-an-address"));
        assert!(r.errors[2].1.contains("notify"));
        assert!(r.errors[3].1.contains("quiet hours"));
        assert!(
            r.errors[4].1.contains("al@example.com"),
            "{:?}",
            r.errors[4]
        );
        assert!(
            r.errors[5].1.contains("expected 7 fields, found 2"),
            "{:?}",
            r.errors[5]
        );

        let a = s.lookup("alice2@example.com").unwrap();
        assert_eq!(a.phone, "+447700900123");
        assert_eq!(a.aliases, ["al@example.com", "alice2@example.com"]);
        assert_eq!(a.deny_senders, ["*.spam.example"]);
        assert_eq!(a.licence_until, parse_licence("2026-12-31").unwrap());
        // "-" clears a field; empty cells and absent columns keep it.
        let k = s.lookup("keep@example.com").unwrap();
        assert!(!k.notify);
        assert_eq!(k.phone, "");
        assert!(s.lookup("gina@example.com").unwrap().notify);
        assert_eq!(s.len(), 3);

        // Add-only skips existing users and leaves them alone.
        let r = s
            .import_csv(
                "address,notify\nKEEP@example.com,on\nnew@example.com,\n".as_bytes(),
                ImportMode::AddOnly,
            )
            .unwrap();
        assert_eq!((r.added, r.updated, r.skipped, r.failed), (1, 0, 1, 0));
        assert!(!s.lookup("keep@example.com").unwrap().notify);
    }

    #[test]
    fn csv_import_never_destroys_data_silently() {
        let (_dir, s) = store();
        let csv = "\
address,phone,notify,licence_until,quiet,rate_limit_secs,language,aliases,max_parts
alice@example.com,+8613800138000,on,2027-06-30,22:00-07:00,300,zh,a.li@example.com,2
bob@example.com,+8613800138001,on,,,,,b@example.com,
";
        let r = s.import_csv(csv.as_bytes(), ImportMode::Upsert).unwrap();
        assert_eq!((r.added, r.failed), (2, 0), "{r:?}");
        let alice = s.get("alice@example.com").unwrap().unwrap();

        // Blank cells keep every field: only the phone changes.
        let r = s
            .import_csv(
                "address,phone,notify,licence_until,quiet,rate_limit_secs,language,aliases,max_parts\n\
                 alice@example.com,+8613800138009,,,,,,,\n"
                    .as_bytes(),
                ImportMode::Upsert,
            )
            .unwrap();
        assert_eq!((r.updated, r.failed), (1, 0), "{r:?}");
        let now = s.get("alice@example.com").unwrap().unwrap();
        assert_eq!(
            now,
            User {
                phone: "+8613800138009".into(),
                ..alice.clone()
            }
        );

        // Another user's alias is a conflict by line number, not taken over, even when an
        // earlier line lets go of it; the same address twice is an error and neither line
        // is imported.
        let r = s
            .import_csv(
                "address,aliases,language\n\
                 bob@example.com,-,\n\
                 carol@example.com,a.li@example.com,\n\
                 dave@example.com,b@example.com,\n\
                 erin@example.com,,en\n\
                 Erin@example.com,,zh\n"
                    .as_bytes(),
                ImportMode::Upsert,
            )
            .unwrap();
        assert_eq!((r.updated, r.added, r.failed), (1, 0, 4), "{r:?}");
        let lines: Vec<u64> = r.errors.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [3, 4, 5, 6]);
        assert!(
            r.errors[0].1.contains(
                "a.li@example.com is already the address or an alias of alice@example.com"
            ),
            "{r:?}"
        );
        assert!(r.errors[1].1.contains("of bob@example.com"), "{r:?}");
        assert!(r.errors[2].1.contains("more than one line (5, 6)"), "{r:?}");
        assert_eq!(
            s.lookup("a.li@example.com").unwrap().address,
            "alice@example.com"
        );
        assert!(s.lookup("b@example.com").is_none(), "bob let go of it");
        assert!(s.lookup("carol@example.com").is_none());
        assert!(s.lookup("erin@example.com").is_none());

        // "-" clears; a dry run reports and writes nothing.
        let clear = "address,quiet,licence_until,language,aliases\nalice@example.com,-,-,-,-\nfrank@example.com,,,en,\nbob@example.com,,,,\n";
        let r = s
            .import_csv_with(
                clear.as_bytes(),
                ImportOptions {
                    mode: ImportMode::Upsert,
                    dry_run: true,
                },
            )
            .unwrap();
        assert!(r.dry_run);
        assert_eq!(
            (r.added, r.updated, r.unchanged, r.failed),
            (1, 1, 1, 0),
            "{r:?}"
        );
        assert_eq!(
            r.changes,
            [
                (
                    2,
                    "update alice@example.com: licence_until, quiet, language, aliases".to_owned()
                ),
                (3, "add frank@example.com".to_owned())
            ]
        );
        assert_eq!(s.get("alice@example.com").unwrap().unwrap(), now);
        assert!(s.get("frank@example.com").unwrap().is_none());
        let r = s.import_csv(clear.as_bytes(), ImportMode::Upsert).unwrap();
        assert_eq!((r.added, r.updated, r.unchanged), (1, 1, 1), "{r:?}");
        let cleared = s.get("alice@example.com").unwrap().unwrap();
        assert_eq!(
            cleared,
            User {
                quiet: None,
                licence_until: None,
                language: String::new(),
                aliases: Vec::new(),
                ..now
            }
        );
        assert!(r.changes.is_empty(), "listed only in a dry run");
    }

    #[test]
    fn csv_header_errors() {
        let (_dir, s) = store();
        let e = s
            .import_csv("address,phone,colour,size\n".as_bytes(), ImportMode::Upsert)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown columns \"colour\", \"size\""), "{e}");
        let e = s
            .import_csv("phone\n+447700900123\n".as_bytes(), ImportMode::Upsert)
            .unwrap_err();
        assert!(e.to_string().contains("address column is missing"), "{e}");
        let e = s
            .import_csv("address,Address\n".as_bytes(), ImportMode::Upsert)
            .unwrap_err();
        assert!(e.to_string().contains("appears twice"), "{e}");
        assert!(matches!(
            s.import_csv("".as_bytes(), ImportMode::Upsert),
            Err(UserError::CsvHeader(_))
        ));
        // Header only: nothing to do.
        assert_eq!(
            s.import_csv("address\n".as_bytes(), ImportMode::Upsert)
                .unwrap(),
            ImportReport::default()
        );
    }

    #[test]
    fn csv_import_10k() {
        let (dir, s) = store();
        let mut csv = String::from("address,phone,notify,quiet,aliases,language\n");
        for i in 0..10_000 {
            csv.push_str(&format!(
                "user{i}@example.com,+4477009{i:05},yes,22:00-07:00,u{i}@alias.example,en\n"
            ));
        }
        let started = Instant::now();
        let r = s.import_csv(csv.as_bytes(), ImportMode::Upsert).unwrap();
        println!("imported 10,000 users in {:?}", started.elapsed());
        assert_eq!((r.added, r.failed), (10_000, 0));
        assert_eq!(s.len(), 10_000);
        assert_eq!(
            s.lookup("U9999@alias.example").unwrap().phone,
            "+447700909999"
        );
        let started = Instant::now();
        let r = s.import_csv(csv.as_bytes(), ImportMode::Upsert).unwrap();
        println!("re-imported (all updates) in {:?}", started.elapsed());
        assert_eq!((r.added, r.updated, r.unchanged), (0, 0, 10_000));
        drop(s);
        let started = Instant::now();
        let s = UserStore::open(&dir.path().join("users")).unwrap();
        println!("reopened with 10,000 users in {:?}", started.elapsed());
        assert_eq!(s.len(), 10_000);
        // Byte order: "user9@example.com" sorts last ('@' > '9').
        assert_eq!(s.list(None, 3).unwrap()[0].address, "user0@example.com");
        assert!(s.list(Some("user9@example.com"), 10).unwrap().is_empty());
        let tail: Vec<_> = s
            .list(Some("user999@example.com"), 10)
            .unwrap()
            .into_iter()
            .map(|u| u.address)
            .collect();
        assert_eq!(tail, ["user99@example.com", "user9@example.com"]);
    }

    /// Every field away from its default, and at it, in one registry.
    fn varied_users() -> Vec<User> {
        vec![
            User {
                aliases: vec!["a.li@example.com".into(), "al@example.com".into()],
                notify: false,
                licence_until: parse_licence("2026-12-31").unwrap(),
                quiet: Some(QuietHours::parse("22:00-07:00").unwrap()),
                rate_limit_secs: Some(300),
                allow_senders: vec!["*.work.example".into(), "@friends.example".into()],
                deny_senders: vec!["spam@work.example".into()],
                language: "en-GB".into(),
                max_parts: 3,
                state: AccountState::Arrears,
                networks: Networks::parse("10.0.0.0/8,2001:db8::/32").unwrap(),
                ..user("alice@example.com", "+447700900123")
            },
            // Defaults everywhere: every cell "-", so an import resets them.
            User::new("bob@example.com"),
            User {
                licence_until: Some(1_234_567),
                quiet: Some(QuietHours::parse("00:00-23:59").unwrap()),
                rate_limit_secs: Some(0),
                deny_senders: vec!["-".into()],
                state: AccountState::Unwelcome,
                networks: Networks::parse("::1").unwrap(),
                ..user("carol@example.com", "+8613800138000")
            },
        ]
    }

    fn export(s: &UserStore, format: ExportFormat) -> String {
        let mut out = Vec::new();
        s.export(format, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn export_imports_back_to_the_same_registry() {
        let (_d, s) = store();
        // upsert, as an import does: bob (all defaults: notify on, no phone yet) is a state an
        // import may create, though `user add` refuses it.
        for u in varied_users() {
            s.upsert(u).unwrap();
        }
        let csv = export(&s, ExportFormat::Csv);
        let json = export(&s, ExportFormat::Json);
        // Into an empty registry: the same users, so the same export.
        let (_d2, empty) = store();
        let r = empty
            .import_csv(csv.as_bytes(), ImportMode::Upsert)
            .unwrap();
        assert_eq!((r.added, r.failed), (3, 0), "{:?}", r.errors);
        assert_eq!(empty.list(None, 10).unwrap(), s.list(None, 10).unwrap());
        assert_eq!(export(&empty, ExportFormat::Csv), csv);
        assert_eq!(export(&empty, ExportFormat::Json), json);
        // Over a registry where every field differs: the export wins everywhere.
        let (_d3, other) = store();
        for u in varied_users() {
            let mut changed = User {
                aliases: vec![format!("x.{}", u.address)],
                notify: !u.notify,
                licence_until: Some(5),
                quiet: Some(QuietHours::parse("01:00-02:00").unwrap()),
                rate_limit_secs: Some(7),
                allow_senders: vec!["other.example".into()],
                deny_senders: vec!["x@other.example".into()],
                language: "zh".into(),
                max_parts: 9,
                state: match u.state {
                    AccountState::Unwelcome => AccountState::Arrears,
                    _ => AccountState::Unwelcome,
                },
                networks: Networks::parse("198.51.100.0/24").unwrap(),
                ..user(&u.address, "+15550001111")
            };
            changed.address.clone_from(&u.address);
            other.insert(changed).unwrap();
        }
        let r = other
            .import_csv(csv.as_bytes(), ImportMode::Upsert)
            .unwrap();
        assert_eq!((r.updated, r.failed), (3, 0), "{:?}", r.errors);
        assert_eq!(export(&other, ExportFormat::Csv), csv);
        // JSON: the users themselves, and an import of it restores them over the changes.
        let back: Vec<User> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s.list(None, 10).unwrap());
        let (_d5, from_json) = store();
        let r = from_json
            .import_json_with(json.as_bytes(), ImportOptions::default())
            .unwrap();
        assert_eq!((r.added, r.failed), (3, 0), "{:?}", r.errors);
        assert_eq!(export(&from_json, ExportFormat::Json), json);
        let r = other
            .import_json_with(json.as_bytes(), ImportOptions::default())
            .unwrap();
        assert_eq!(
            (r.updated, r.unchanged, r.failed),
            (0, 3, 0),
            "{:?}",
            r.errors
        );
        let (_d4, none) = store();
        assert_eq!(export(&none, ExportFormat::Json), "[]\n");
        assert_eq!(
            export(&none, ExportFormat::Csv),
            format!("{},{}\n", CSV_COLUMNS.join(","), LEDGER_COLUMNS.join(","))
        );
    }

    /// JSON import follows the CSV rules: an absent field keeps the value, null clears it,
    /// bad objects are reported by the line they start on and the rest still imports, and a
    /// file that is not an array writes nothing.
    #[test]
    fn json_import_keeps_absent_fields_clears_nulls_and_names_lines() {
        let (_d, s) = store();
        s.insert(User {
            quiet: Some(QuietHours::parse("22:00-07:00").unwrap()),
            licence_until: Some(1_900_000_000_000),
            aliases: vec!["a.li@example.com".into()],
            language: "en".into(),
            ..user("alice@example.com", "+8613800138000")
        })
        .unwrap();
        let file = r#"[
{"address": "Alice@Example.com", "phone": "+8613900139000", "quiet": null},
{"address": "bob@example.com", "phone": "+447700900123",
 "notify": "yes"},
{"address": "carol@example.com", "phone": "+447700900124", "colour": "red"},
{"address": "dave@example.com", "phone": "+447700900125", "aliases": ["a.li@example.com"]},
{"address": "erin@example.com", "phone": "+447700900126"}
]"#;
        let r = s
            .import_json_with(file.as_bytes(), ImportOptions::default())
            .unwrap();
        assert_eq!((r.added, r.updated, r.failed), (1, 1, 3), "{:?}", r.errors);
        let lines: Vec<u64> = r.errors.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [3, 5, 6], "{:?}", r.errors);
        assert_eq!(
            r.errors[0].1,
            "notify: invalid type: string \"yes\", expected a boolean"
        );
        assert!(r.errors[1].1.contains("colour"), "{:?}", r.errors);
        assert!(
            r.errors[2].1.contains("alice@example.com"),
            "{:?}",
            r.errors
        );
        let alice = s.get("alice@example.com").unwrap().unwrap();
        assert_eq!(alice.phone, "+8613900139000");
        assert_eq!(alice.quiet, None);
        assert_eq!(alice.licence_until, Some(1_900_000_000_000));
        assert_eq!(alice.aliases, ["a.li@example.com"]);
        assert_eq!(alice.language, "en");
        assert!(s.get("erin@example.com").unwrap().is_some());
        for bad in ["{\"address\": \"x@example.com\"}", "[", "not json"] {
            let e = s
                .import_json_with(bad.as_bytes(), ImportOptions::default())
                .unwrap_err();
            assert!(matches!(e, UserError::JsonImport(_)), "{bad}: {e}");
        }
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn export_has_no_page_cap() {
        let (_d, s) = store();
        let n = MAX_LIST_LIMIT + 500;
        let mut csv = String::from("address,phone\n");
        for i in 0..n {
            csv.push_str(&format!("user{i}@example.com,+4477009{i:05}\n"));
        }
        s.import_csv(csv.as_bytes(), ImportMode::Upsert).unwrap();
        let out = export(&s, ExportFormat::Csv);
        assert_eq!(out.lines().count(), n + 1);
        let json: Vec<User> = serde_json::from_str(&export(&s, ExportFormat::Json)).unwrap();
        assert_eq!(json.len(), n);
    }

    /// Records, CSV and JSON files written before `state` and `networks` existed read as
    /// normal / any address, and an import without those columns keeps what the user has.
    #[test]
    fn old_records_and_files_without_state_or_networks() {
        let old: User = serde_json::from_str(
            r#"{"address":"old@example.com","aliases":[],"phone":"","notify":false,
                "licence_until":null,"quiet":null,"rate_limit_secs":null,"allow_senders":[],
                "deny_senders":[],"language":"","max_parts":0}"#,
        )
        .unwrap();
        assert_eq!(old.state, AccountState::Normal);
        assert!(old.networks.is_any());
        let (_d, s) = store();
        s.upsert(User {
            state: AccountState::Arrears,
            networks: Networks::parse("192.0.2.0/24").unwrap(),
            ..user("alice@example.com", "+8613800138000")
        })
        .unwrap();
        let r = s
            .import_csv(
                "address,phone,notify,language\nalice@example.com,,no,en\nbob@example.com,,no,\n"
                    .as_bytes(),
                ImportMode::Upsert,
            )
            .unwrap();
        assert_eq!((r.added, r.updated, r.failed), (1, 1, 0), "{:?}", r.errors);
        let alice = s.lookup("alice@example.com").unwrap();
        assert_eq!(alice.state, AccountState::Arrears);
        assert_eq!(alice.networks.join(","), "192.0.2.0/24");
        let bob = s.lookup("bob@example.com").unwrap();
        assert_eq!(
            (bob.state, bob.networks.is_any()),
            (AccountState::Normal, true)
        );
        let r = s
            .import_json_with(
                br#"[{"address":"alice@example.com","language":"zh"}]"#.as_slice(),
                ImportOptions::default(),
            )
            .unwrap();
        assert_eq!((r.updated, r.failed), (1, 0), "{:?}", r.errors);
        assert_eq!(
            s.lookup("alice@example.com").unwrap().state,
            AccountState::Arrears
        );
    }

    #[test]
    fn state_and_networks_in_csv_json_and_patches() {
        let (_d, s) = store();
        let r = s
            .import_csv(
                "address,state,networks\n\
                 a@example.com,unwelcome,10.0.0.0/8;2001:db8::/32\n\
                 b@example.com,arrears,-\n\
                 c@example.com,banned,\n\
                 d@example.com,,10.0.0.300/8\n"
                    .as_bytes(),
                ImportMode::Upsert,
            )
            .unwrap();
        assert_eq!((r.added, r.failed), (2, 2), "{:?}", r.errors);
        assert_eq!(r.errors[0].0, 4);
        assert!(r.errors[0].1.contains("state") && r.errors[0].1.contains("banned"));
        assert_eq!(r.errors[1].0, 5);
        assert!(
            r.errors[1].1.contains("networks") && r.errors[1].1.contains("10.0.0.300/8"),
            "{:?}",
            r.errors
        );
        let a = s.lookup("a@example.com").unwrap();
        assert_eq!(a.state, AccountState::Unwelcome);
        assert!(a.networks.allows("2001:db8::5".parse().unwrap()));
        assert!(!a.networks.allows("192.0.2.1".parse().unwrap()));
        // JSON import: a bad value names the field.
        let r = s
            .import_json_with(
                br#"[{"address":"a@example.com","networks":["x"]},
                     {"address":"b@example.com","state":"normal"}]"#
                    .as_slice(),
                ImportOptions::default(),
            )
            .unwrap();
        assert_eq!((r.updated, r.failed), (1, 1), "{:?}", r.errors);
        assert!(r.errors[0].1.contains("networks"), "{:?}", r.errors);
        assert_eq!(
            s.lookup("b@example.com").unwrap().state,
            AccountState::Normal
        );
        // A patch sets and clears; an empty list is any address again.
        let p: UserPatch =
            serde_json::from_str(r#"{"state":"arrears","networks":["192.0.2.0/24"]}"#).unwrap();
        let a = s.update("a@example.com", &p).unwrap();
        assert_eq!(
            (a.state, a.networks.join(",")),
            (AccountState::Arrears, "192.0.2.0/24".into())
        );
        let p: UserPatch = serde_json::from_str(r#"{"networks":[]}"#).unwrap();
        assert!(s.update("a@example.com", &p).unwrap().networks.is_any());
        let e = serde_json::from_str::<UserPatch>(r#"{"state":"gone"}"#).unwrap_err();
        assert!(e.to_string().contains("gone"), "{e}");
    }

    #[test]
    fn every_committed_change_bumps_the_change_signal() {
        let (_d, s) = store();
        let mut rx = s.changes();
        let start = *rx.borrow_and_update();
        s.upsert(user("alice@example.com", "+8613800138000"))
            .unwrap();
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), start + 1);
        // A change that writes nothing signals nothing.
        s.remove("nobody@example.com").unwrap();
        assert!(!rx.has_changed().unwrap());
        let p = UserPatch {
            state: Some(AccountState::Unwelcome),
            ..Default::default()
        };
        s.update("alice@example.com", &p).unwrap();
        assert_eq!(*rx.borrow_and_update(), start + 2);
    }
}
