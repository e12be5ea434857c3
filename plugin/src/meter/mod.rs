//! The meter store: what the retrieval proxy's sessions retrieved, kept durably for billing.
//!
//! The retrieval endpoint (`crate::retrieval::server`) appends one [`Entry::Session`] per
//! session when it ends (with the messages it retrieved), billing reads them back in id order.
//! The store knows nothing of POP3 or IMAP beyond these records.
//!
//! # Guarantees
//!
//! - Append-only, group-committed: one writer thread (`meter-writer`) takes everything queued,
//!   gives each record the next id, writes the group with one positioned write and makes it
//!   durable with one `fdatasync`.
//! - Ids are unique and increase in append order, across restarts and crashes: open continues
//!   after the largest id in the files (the newest file is never pruned), and a record is
//!   visible to queries of this process only once it is durable, so an id a crash may take
//!   back was never shown to anyone. A consumer that remembers the last id it processed
//!   ([`MeterQuery::after`]) processes every record exactly once.
//! - [`Sync::Interval`]: an append returns at once and is durable within `flush_interval` (a
//!   crash loses at most that). [`MeterStore::append_durable`] (used by `sync =
//!   "per-session"`) returns once the record is on disk; the same group commit carries every
//!   other record queued meanwhile.
//! - When the disk refuses (full, I/O error) nothing is dropped: the unwritten records stay in
//!   memory and are rewritten at the same offset every `flush_interval` until the disk takes
//!   them; meanwhile [`MeterStore::health`] names the cause (the proxy refuses new logins with
//!   it). At most [`MAX_BACKLOG`] records wait; past that an append fails with
//!   [`MeterError::Backlog`] and the caller must keep the record (the proxy logs it in full).
//!
//! # Files
//!
//! ```text
//! <dir>/meter-YYYY-MM-DD.log   the records written that UTC day, in id order
//! <dir>/lock/                  a tiny sled store held open for its flock by the writing process
//!
//! each record: len:u32le crc32:u32le body       (crc32 of the body; len = body bytes)
//! body: one JSON object (a MeterRecord), e.g.
//! {"id":7,"at_ms":1796000000000,"kind":"session","session":"9f…","account":"alice",…}
//! ```
//!
//! A record that does not check out (short, wrong length, wrong CRC, bad JSON) ends the file:
//! at open the newest file is cut there (a torn append from a crash, never acknowledged);
//! readers of other files stop there and log it. Whole files are pruned once their day ended
//! more than `retention_days` ago, never the newest one.
//!
//! # Layout
//!
//! This file: records, configuration, errors, the handle; `file`: framing, naming, the scan;
//! `writer`: the writer thread; `format`: the text and CSV forms.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};

mod file;
mod format;
mod writer;

pub use format::{csv_rows, format_session, CSV_HEADER};

/// Records accepted but not yet durable, at most; past it appends fail with
/// [`MeterError::Backlog`]. About 50 MB of sessions at 500 bytes each.
pub const MAX_BACKLOG: u64 = 100_000;
/// Largest record body the store writes or reads.
pub const MAX_RECORD: usize = 16 << 20;
/// Most records one query returns.
pub const MAX_QUERY_LIMIT: usize = 10_000;
/// Queued bytes past which the writer commits at once rather than at the end of the interval:
/// a steady stream of large records is written in groups of about this size, while the
/// appenders encode the next, and a flush waits for at most one such group.
const GROUP_BYTES: usize = 32 << 20;

/// When appends become durable (`[meter] sync`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sync {
    /// Within `flush_interval` of the append.
    #[default]
    Interval,
    /// The proxy waits for each session's record ([`MeterStore::append_durable`]).
    PerSession,
}

/// `[meter]` in the config file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MeterConfig {
    /// Longest time an appended record waits for its `fdatasync` (what a crash can lose).
    #[serde(deserialize_with = "mailbell_link::units::de_duration")]
    pub flush_interval: Duration,
    pub sync: Sync,
    /// Files whose day ended more than this many days ago are deleted; 0 keeps every file.
    pub retention_days: u32,
}

impl Default for MeterConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(200),
            sync: Sync::Interval,
            retention_days: 400,
        }
    }
}

impl MeterConfig {
    /// Checks the values; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.flush_interval.is_zero() || self.flush_interval > Duration::from_secs(60) {
            return Err("meter.flush_interval must be above zero and at most 60s".into());
        }
        Ok(())
    }
}

/// Meter store errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeterError {
    #[error("meter store {path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        error: std::io::Error,
    },
    #[error("meter store {path} is in use by another process")]
    Locked { path: PathBuf },
    #[error("meter store cannot write: {0}")]
    Unwritable(String),
    #[error("meter store backlog full ({MAX_BACKLOG} records wait for the disk)")]
    Backlog,
    #[error("meter record of {0} bytes is over the {MAX_RECORD}-byte cap")]
    TooLarge(usize),
    #[error("meter store is closed")]
    Closed,
    #[error("bad time {input:?}: {reason}")]
    BadTime { input: String, reason: String },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> MeterError + 'a {
    move |error| MeterError::Io {
        path: path.to_owned(),
        op,
        error,
    }
}

/// The retrieval protocol of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Pop3,
    Imap,
}

/// What became of the session's login.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Login {
    /// The backend accepted it.
    Ok,
    /// The backend (or the proxy) refused the last attempt.
    Refused,
    /// No login was tried.
    None,
}

/// One message (POP3) or body section (IMAP) retrieved.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// POP3: the message number; IMAP: the sequence number.
    pub msg: u32,
    /// POP3: the UIDL, when the session learned it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uidl: Option<String>,
    /// POP3 TOP: the line count asked for (`None`: RETR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_lines: Option<u32>,
    /// IMAP: the selected mailbox as the client named it (modified UTF-7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mailbox: Option<String>,
    /// IMAP: the message UID, when the response carried it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// IMAP: the section as the server named it (`BODY[]`, `BODY[TEXT]<0>`, `RFC822`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section: Option<String>,
    /// Bytes as docs/retrieval.md defines them (POP3 `retr_bytes`, IMAP literal bytes).
    pub bytes: u64,
    /// False when the backend stream ended before the reply or literal did.
    pub complete: bool,
}

/// One session of the retrieval proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Unique per session (32 hex digits); [`Messages`] records of the session carry it too.
    pub session: String,
    /// The login name (also when the backend refused it, or the account is unknown).
    pub account: Option<String>,
    pub client: SocketAddr,
    pub protocol: Protocol,
    /// The listener: pop3, pop3s, imap, imaps.
    pub listener: String,
    /// The client was on TLS (implicit or after STLS/STARTTLS) when the session ended.
    pub tls: bool,
    pub start_ms: i64,
    pub end_ms: i64,
    pub login: Login,
    /// Bytes sent to the client (relayed and the proxy's own), and client bytes forwarded.
    pub bytes_to_client: u64,
    pub bytes_to_backend: u64,
    /// RETR/TOP replies and FETCH responses with message bytes, over the whole session.
    pub messages: u64,
    /// Their bytes, over the whole session.
    pub message_bytes: u64,
    /// Why it ended.
    pub end: String,
    /// Messages not already stored in a [`Messages`] record of this session.
    #[serde(default)]
    pub retrieved: Vec<Message>,
}

/// What the accounting run needs of a [`Session`] record
/// ([`MeterStore::scan_sessions_after`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSummary {
    pub account: Option<String>,
    pub client: SocketAddr,
    pub protocol: Protocol,
    pub start_ms: i64,
    pub login: Login,
    pub messages: u64,
    pub message_bytes: u64,
}

/// A record body decoded as far as [`SessionSummary`] needs; fields it does not name are
/// skipped without being built (an internally tagged enum would buffer the whole record).
#[derive(Deserialize)]
struct SummaryFields {
    id: u64,
    at_ms: i64,
    kind: String,
    #[serde(default)]
    account: Option<String>,
    client: Option<SocketAddr>,
    protocol: Option<Protocol>,
    start_ms: Option<i64>,
    login: Option<Login>,
    messages: Option<u64>,
    message_bytes: Option<u64>,
}

impl file::HasId for SummaryFields {
    fn id(&self) -> u64 {
        self.id
    }
}

impl SummaryFields {
    fn summary(self) -> Option<SessionSummary> {
        if self.kind != "session" {
            return None;
        }
        Some(SessionSummary {
            account: self.account,
            client: self.client?,
            protocol: self.protocol?,
            start_ms: self.start_ms?,
            login: self.login?,
            messages: self.messages?,
            message_bytes: self.message_bytes?,
        })
    }
}

/// Messages of a long session, stored before its [`Session`] record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Messages {
    pub session: String,
    pub account: Option<String>,
    pub retrieved: Vec<Message>,
}

/// What a record holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Entry {
    Session(Session),
    Messages(Messages),
}

impl Entry {
    pub fn account(&self) -> Option<&str> {
        match self {
            Entry::Session(s) => s.account.as_deref(),
            Entry::Messages(m) => m.account.as_deref(),
        }
    }
}

/// A stored record: its id and when it was written (ms since the Unix epoch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterRecord {
    pub id: u64,
    pub at_ms: i64,
    #[serde(flatten)]
    pub entry: Entry,
}

/// A query: records with `id > after`, written in `[since_ms, until_ms)`, of `user`
/// (case-insensitive), oldest first, at most `limit`.
#[derive(Clone, Debug, Default)]
pub struct MeterQuery {
    pub user: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub after: Option<u64>,
    pub limit: usize,
}

/// A page of records; `next_after` is set when more match (pass it as `after`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterPage {
    pub records: Vec<MeterRecord>,
    pub next_after: Option<u64>,
}

/// Counters, for `/metrics` (`mailbell_meter_*`).
#[derive(Debug)]
pub struct MeterStats {
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub commits: AtomicU64,
    pub errors: AtomicU64,
    /// Records accepted and not yet durable.
    pub backlog: AtomicU64,
    /// Records the store refused (backlog full, closed, too large); the proxy logged each.
    pub refused: AtomicU64,
    pub pruned_files: AtomicU64,
    /// Seconds from a group's write to the end of its `fdatasync`.
    pub commit_seconds: Histogram,
}

impl Default for MeterStats {
    fn default() -> Self {
        Self {
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            backlog: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            pruned_files: AtomicU64::new(0),
            commit_seconds: Histogram::new([
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0,
            ]),
        }
    }
}

impl mailbell_link::metrics::Collector for MeterStats {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (name, help, c) in [
            (
                "mailbell_meter_records_total",
                "Meter records made durable.",
                &self.records,
            ),
            (
                "mailbell_meter_bytes_total",
                "Bytes of meter records made durable.",
                &self.bytes,
            ),
            (
                "mailbell_meter_commits_total",
                "Meter store group commits (one fdatasync each).",
                &self.commits,
            ),
            (
                "mailbell_meter_errors_total",
                "Meter store write and sync errors.",
                &self.errors,
            ),
            (
                "mailbell_meter_refused_total",
                "Meter records the store refused (logged in full by the proxy).",
                &self.refused,
            ),
            (
                "mailbell_meter_pruned_files_total",
                "Meter files deleted by retention.",
                &self.pruned_files,
            ),
        ] {
            mailbell_link::metrics::counter(&mut enc, name, help, v(c))?;
        }
        mailbell_link::metrics::gauge(
            &mut enc,
            "mailbell_meter_backlog",
            "Meter records accepted and not yet durable.",
            v(&self.backlog),
        )?;
        let m = enc.encode_descriptor(
            "mailbell_meter_commit_seconds",
            "Meter store group commit time (write and fdatasync).",
            None,
            self.commit_seconds.metric_type(),
        )?;
        self.commit_seconds.encode(m)
    }
}

/// A queued append: its records, already given ids and encoded by the appending thread (so
/// that encoding overlaps the writer's `fdatasync`), and who waits for them to be durable.
struct Request {
    bytes: Vec<u8>,
    records: u64,
    at_ms: i64,
    done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

/// What the handle and the writer share.
struct Shared {
    dir: PathBuf,
    cfg: MeterConfig,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// The file being written and how much of it is durable (queries read no further).
    durable: Mutex<(PathBuf, u64)>,
    /// Why the store cannot write now.
    failure: Mutex<Option<String>>,
    stats: Arc<MeterStats>,
    /// The length of the last record encoded (to size the next one's buffer).
    last_len: AtomicUsize,
    disk: file::Disk,
    /// Ms since the Unix epoch: records' `at_ms`, their day file, retention.
    clock: Clock,
}

/// The store's clock (tests pass their own to cross midnight).
pub type Clock = Arc<dyn Fn() -> i64 + Send + std::marker::Sync>;

#[derive(Default)]
struct Queue {
    requests: VecDeque<Request>,
    /// A queued request waits for its records to be durable: the writer commits now.
    urgent: bool,
    /// When the oldest queued request came (its records are durable within
    /// `flush_interval` of it).
    oldest: Option<std::time::Instant>,
    /// Bytes queued: past [`GROUP_BYTES`] the writer commits without waiting for the interval.
    bytes: usize,
    closing: bool,
    /// The id the next record gets: ids are given under the queue's lock, in queue order, so
    /// the file holds them increasing.
    next_id: u64,
}

/// The meter store's handle (cheap to clone). Writing needs [`MeterStore::open`] (one process
/// at a time); [`MeterStore::open_read_only`] only queries.
#[derive(Clone)]
pub struct MeterStore {
    shared: Arc<Shared>,
    writer: Option<Arc<WriterHandle>>,
}

impl std::fmt::Debug for MeterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeterStore")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

/// The writer thread; closing the store (dropping the last handle) stops it after it wrote
/// everything queued.
struct WriterHandle {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    _lock: sled::Db,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        lock(&self.shared.queue).closing = true;
        self.shared.wake.notify_all();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

/// Takes the directory's lock as the audit log does: a tiny sled store at `<dir>/lock`, which
/// holds an exclusive `flock` while open; waits up to two seconds for a predecessor.
fn take_lock(dir: &Path) -> Result<sled::Db, MeterError> {
    use mailbell_link::durable::{open_waiting, OpenWaiting};
    let config = sled::Config::new()
        .path(dir.join("lock"))
        .cache_capacity(1 << 20)
        .flush_every_ms(None);
    open_waiting(&config, Duration::from_secs(2)).map_err(|e| match e {
        OpenWaiting::Locked => MeterError::Locked {
            path: dir.to_owned(),
        },
        OpenWaiting::Sled(e) => MeterError::Io {
            path: dir.join("lock"),
            op: "open the lock store",
            error: std::io::Error::other(e.to_string()),
        },
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl MeterStore {
    /// Opens (creating) the store in `dir` for writing: takes the lock, cuts a torn tail off
    /// the newest file, prunes, and starts the writer after the largest stored id.
    pub fn open(dir: &Path, cfg: MeterConfig) -> Result<Self, MeterError> {
        Self::open_with_clock(dir, cfg, Arc::new(now_ms))
    }

    /// [`MeterStore::open`] with the given clock.
    pub fn open_with_clock(dir: &Path, cfg: MeterConfig, clock: Clock) -> Result<Self, MeterError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
        let lock_file = take_lock(dir)?;
        let recovered = file::recover(dir)?;
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            cfg,
            queue: Mutex::new(Queue {
                next_id: recovered.next_id,
                ..Queue::default()
            }),
            wake: Condvar::new(),
            durable: Mutex::new(recovered.tail.clone()),
            failure: Mutex::new(None),
            stats: Arc::default(),
            last_len: AtomicUsize::new(0),
            disk: file::Disk::default(),
            clock,
        });
        file::prune(dir, shared.cfg.retention_days, (shared.clock)())?;
        let w = writer::Writer::new(shared.clone());
        let thread = std::thread::Builder::new()
            .name("meter-writer".into())
            .spawn(move || w.run())
            .map_err(io_err(dir, "start the writer thread"))?;
        Ok(Self {
            writer: Some(Arc::new(WriterHandle {
                shared: shared.clone(),
                thread: Mutex::new(Some(thread)),
                _lock: lock_file,
            })),
            shared,
        })
    }

    /// Opens `dir` for queries only (no lock, no writer; a torn tail is skipped, not cut).
    pub fn open_read_only(dir: &Path) -> Self {
        Self {
            shared: Arc::new(Shared {
                dir: dir.to_owned(),
                cfg: MeterConfig::default(),
                queue: Mutex::default(),
                wake: Condvar::new(),
                durable: Mutex::new((PathBuf::new(), 0)),
                failure: Mutex::new(None),
                stats: Arc::default(),
                last_len: AtomicUsize::new(0),
                disk: file::Disk::default(),
                clock: Arc::new(now_ms),
            }),
            writer: None,
        }
    }

    /// Opened with [`MeterStore::open_read_only`].
    pub fn read_only(&self) -> bool {
        self.writer.is_none()
    }

    pub fn config(&self) -> &MeterConfig {
        &self.shared.cfg
    }

    pub fn stats(&self) -> Arc<MeterStats> {
        self.shared.stats.clone()
    }

    /// `Err(cause)` while the store cannot write (the proxy refuses new logins with it).
    pub fn health(&self) -> Result<(), String> {
        if self.writer.is_none() {
            return Err("meter store opened read-only".into());
        }
        match lock(&self.shared.failure).as_ref() {
            Some(cause) => Err(cause.clone()),
            None => Ok(()),
        }
    }

    fn enqueue(
        &self,
        entries: Vec<Entry>,
        done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    ) -> Result<(), MeterError> {
        let stats = &self.shared.stats;
        // Encoded here, outside the queue's lock (appenders on several threads encode at
        // once, and beside the writer's fdatasync); the ids are written in under the lock.
        let at_ms = (self.shared.clock)();
        // Sized from the last record's length: no reallocation while a record is encoded.
        let last = self.shared.last_len.load(Ordering::Relaxed);
        let mut bytes = Vec::with_capacity(entries.len().saturating_mul(last + last / 4));
        let mut starts = Vec::with_capacity(entries.len());
        for entry in entries {
            match file::encode_open(at_ms, entry, &mut bytes) {
                Ok(open) => starts.push(open),
                Err(refused) => {
                    let (e, entry) = *refused;
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, record = ?entry, "meter record refused");
                }
            }
        }
        let n = starts.len() as u64;
        if let Some(len) = bytes.len().checked_div(starts.len()) {
            self.shared.last_len.store(len, Ordering::Relaxed);
        }
        let mut q = lock(&self.shared.queue);
        if self.writer.is_none() || q.closing {
            stats.refused.fetch_add(n, Ordering::Relaxed);
            return Err(MeterError::Closed);
        }
        if stats.backlog.load(Ordering::Relaxed) + n > MAX_BACKLOG {
            stats.refused.fetch_add(n, Ordering::Relaxed);
            return Err(MeterError::Backlog);
        }
        for open in &starts {
            file::set_id(&mut bytes, open, q.next_id);
            q.next_id += 1;
        }
        let records = n;
        stats.backlog.fetch_add(records, Ordering::Relaxed);
        // The writer waits for a request only while it has nothing queued or a waiter: later
        // appends join the group it commits when the interval is up, without waking it (at
        // 100,000 records/s a wake per append took a core's share from the appenders).
        let full = q.bytes < GROUP_BYTES && q.bytes + bytes.len() >= GROUP_BYTES;
        let wake = done.is_some() || q.requests.is_empty() || full;
        q.urgent |= done.is_some();
        q.oldest.get_or_insert_with(std::time::Instant::now);
        q.bytes += bytes.len();
        q.requests.push_back(Request {
            bytes,
            records,
            at_ms,
            done,
        });
        drop(q);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Queues records; they are durable within `flush_interval` (or, while the disk refuses,
    /// once it takes them again). Never blocks on the disk.
    pub fn append(&self, entries: Vec<Entry>) -> Result<(), MeterError> {
        self.enqueue(entries, None)
    }

    /// Queues records and waits until they (and everything queued before) are on disk.
    pub async fn append_durable(&self, entries: Vec<Entry>) -> Result<(), MeterError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(entries, Some(tx))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(cause)) => Err(MeterError::Unwritable(cause)),
            Err(_) => Err(MeterError::Closed),
        }
    }

    /// Waits (blocking) until everything appended so far is durable; reports why not.
    pub fn flush(&self) -> Result<(), MeterError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(Vec::new(), Some(tx))?;
        match rx.blocking_recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(cause)) => Err(MeterError::Unwritable(cause)),
            Err(_) => Err(MeterError::Closed),
        }
    }

    /// Records matching `q`, oldest first (blocking: files are read).
    pub fn query(&self, q: &MeterQuery) -> Result<MeterPage, MeterError> {
        let durable = lock(&self.shared.durable).clone();
        file::query(&self.shared.dir, q, &durable)
    }

    /// Every record with an id above `after`, oldest first, to `f` until it breaks (blocking):
    /// one pass over the files from the one holding `after + 1` (the accounting run reads a
    /// day's records so; pages of [`MeterStore::query`] would read the file again each).
    pub fn scan_after(
        &self,
        after: u64,
        f: &mut dyn FnMut(MeterRecord) -> ControlFlow<()>,
    ) -> Result<(), MeterError> {
        self.scan_decoded(after, &mut |_, r| f(r))
    }

    /// [`MeterStore::scan_after`] with only each record's id and write time (ms), its body
    /// not decoded further.
    pub fn scan_ids_after(
        &self,
        after: u64,
        f: &mut dyn FnMut(u64, i64) -> ControlFlow<()>,
    ) -> Result<(), MeterError> {
        self.scan_decoded(after, &mut |h, _: serde::de::IgnoredAny| f(h.id, h.at_ms))
    }

    /// [`MeterStore::scan_after`] with each session record's [`SessionSummary`] (`None` for
    /// other records): the list of retrieved messages is skipped, never built, which makes
    /// this several times cheaper than full records for the accounting run.
    pub fn scan_sessions_after(
        &self,
        after: u64,
        f: &mut dyn FnMut(u64, Option<SessionSummary>) -> ControlFlow<()>,
    ) -> Result<(), MeterError> {
        self.scan_decoded(after, &mut |h, r: SummaryFields| f(h.id, r.summary()))
    }

    /// [`MeterStore::scan_sessions_after`] with each record's write time (ms) too, every body
    /// decoded once (the accounting run finds the end of its period and the sessions in one
    /// pass).
    pub fn scan_sessions_timed_after(
        &self,
        after: u64,
        f: &mut dyn FnMut(u64, i64, Option<SessionSummary>) -> ControlFlow<()>,
    ) -> Result<(), MeterError> {
        let durable = lock(&self.shared.durable).clone();
        file::scan_after_once(
            &self.shared.dir,
            after,
            &durable,
            &mut |r: SummaryFields| {
                let (id, at_ms) = (r.id, r.at_ms);
                f(id, at_ms, r.summary())
            },
        )
    }

    fn scan_decoded<T: serde::de::DeserializeOwned>(
        &self,
        after: u64,
        f: &mut dyn FnMut(file::Head, T) -> ControlFlow<()>,
    ) -> Result<(), MeterError> {
        let durable = lock(&self.shared.durable).clone();
        file::scan_after(&self.shared.dir, after, &durable, f)
    }

    /// Makes every write, sync and file creation fail with `kind` until called with `None`
    /// (tests and drills: what the proxy does when the disk refuses).
    pub fn inject_failure(&self, kind: Option<std::io::ErrorKind>) {
        *lock(&self.shared.disk.injected) = kind;
        self.shared.wake.notify_all();
    }

    /// Deletes the files retention lets go; returns how many.
    pub fn prune(&self, now_ms: i64) -> Result<u64, MeterError> {
        let n = file::prune(&self.shared.dir, self.shared.cfg.retention_days, now_ms)?;
        self.shared
            .stats
            .pruned_files
            .fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }
}

/// A new session id: 32 hex digits from the OS's random source.
pub fn new_session_id() -> String {
    let b: [u8; 16] = rand::random();
    hex::encode(b)
}

#[cfg(test)]
mod tests;
