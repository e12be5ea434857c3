//! The audit log: every state change of a notice (created, held, coalesced, dropped, queued,
//! sent, acknowledged, deferred, dead-lettered, requeued), every link session and every operator
//! action, kept for a retention period and queried by `mailbell log --user U --since T`.
//!
//! [`AuditLog::record`] is the hot path. It never blocks and never fails: it puts the event on a
//! bounded channel to one writer thread. When the channel is full the event is dropped, counted
//! in [`AuditStats::dropped`], and a warning is logged at most once a second. The writer drains
//! the channel in groups of up to [`MAX_BATCH`] events and appends them, one JSON line each,
//! to segment files through a write buffer: no index, no B-tree. In release it writes over a
//! million events a second on a 2-core machine (`bench_1m_events_and_queries`), five times the
//! 200,000 a second of a full intake burst.
//!
//! **The audit log is not on the durability path of notices.** Nothing waits for it: the writer
//! hands what it wrote to the OS every `flush_interval_ms`, and a second thread (`audit-sync`)
//! then syncs those files to disk (`fdatasync`), so the writer never waits for the disk. A
//! crash loses the last interval or so of events, and an overloaded writer loses events rather
//! than slowing the MTA or the link down. [`AuditLog::flush`] waits until everything recorded
//! so far is written and synced, and reports a write or sync error met since the last flush
//! (tests, shutdown).
//!
//! # Files
//!
//! ```text
//! <path>/audit-<start_ms>-<span>s.jsonl      records with start_ms <= at_ms < start_ms + span
//! <path>/audit-<start_ms>-<span>s.<n>.jsonl  part n (1, 2, …) of the same period, begun when
//!                                            part n-1 reached segment_max_bytes
//! <path>/segments                            bytes and lines of each segment and the next seq: a
//!                                            cache for open, rebuilt from the segments if lost
//! <path>/lock/                               a tiny sled store, held open only for its lock
//!
//! each line, oldest first within a file (an AuditRecord):
//! {"at_ms":1795305600123,"seq":42,"event":"sent","notice":"4f…","user":"alice","agent":"gsm1"}
//! ```
//! `start_ms` is `at_ms` rounded down to a multiple of `segment_secs` (3600: hourly files). A
//! record goes to the segment of its own time: nearly always the current one; an event recorded
//! just before the hour and written just after is appended to the previous hour's file. So a
//! file is in `seq` order, which is time order give or take such stragglers; queries sort.
//! The files are plain JSON lines: `grep` and `jq` read them as they are.
//!
//! User names are stored lowercased (queries compare users case-insensitively anyway), so a
//! user query can look for the exact bytes `"user":"<name>"` in the raw file and decode only
//! the lines that contain them. `seq` is unique and increases in channel order and across
//! restarts: open starts after the largest one in the `segments` file and in whatever was
//! appended to the segments since it was saved.
//!
//! A line cut short by a crash (no newline at the end of a file) is skipped by queries; before
//! appending to that file again the writer cuts it off. A line that does not decode is skipped
//! and logged, not an error: one bad line must not hide the rest of the history.
//!
//! # Queries
//!
//! A query reads the segments overlapping `[since, until)` (picked by name), oldest first, or
//! newest first for [`AuditLog::query_latest`]. It searches each 1 MiB of whole lines for the
//! user's `"user":"<name>"` or, for a notice, for `"<id>"` (case-folded), and decodes only the
//! matching lines; a query with neither decodes the time and sequence at the start of every
//! line. It keeps the best `limit` records in a heap and stops at the first segment that
//! cannot hold a better one. From the page cache a user or notice query reads about 1.7 GB/s
//! (0.6 s per GB, about 6.5 million records), one with no filter about 1.1 GB/s; from disk,
//! the disk's read rate. A query that would read more than [`MAX_SCAN`] lines gives up with
//! [`AuditError::TooBroad`].
//!
//! # Retention
//!
//! Whole segments are deleted: those that end more than `retention_days` ago (so a record is
//! kept between `retention_days` and `retention_days` + `segment_secs`), then, while the log
//! holds more than `max_records` records or `max_bytes` bytes, the oldest ones, never the newest
//! one nor the one being written. The writer runs this at start, when it begins a segment, when a cap is passed, and
//! hourly; [`AuditLog::prune`] runs it on demand. Record counts come from the lines the writer
//! appended (approximate after a crash).
//!
//! One process owns the directory at a time (the lock store); a second open waits up to two
//! seconds and then fails with [`AuditError::Locked`].

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use mailbell_link::durable::{open_waiting, OpenWaiting};
use tracing::{error, info, warn};

/// Most events the writer takes off the channel before looking at its timers.
pub const MAX_BATCH: usize = 4096;
/// Longest string field stored; longer ones are cut (at a character boundary) by the writer.
pub const MAX_FIELD_BYTES: usize = 1024;
/// Most records one query returns.
pub const MAX_QUERY_LIMIT: usize = 100_000;
/// Most lines one query reads before giving up with [`AuditError::TooBroad`]: about 15 GB of
/// log (150 bytes a line), twice the default `max_records`.
pub const MAX_SCAN: u64 = 100_000_000;
/// Most lines [`AuditLog::query_page`] reads in all to count the records it leaves out (about
/// 1.5 GB, a second or so from the page cache); past it the count is a lower bound.
pub const MAX_COUNT_SCAN: u64 = 10_000_000;

const LOCK_WAIT: Duration = Duration::from_secs(2);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How often the `segments` file is saved while events keep coming (also on every new
/// segment, deletion, flush and close).
const MANIFEST_EVERY: Duration = Duration::from_secs(60);
const MIN_FLUSH_MS: u64 = 10;
const DAY_MS: i64 = 86_400_000;
/// Longest segment period: a year.
const MAX_SEGMENT_SECS: u64 = 366 * 86_400;
const WRITE_BUFFER: usize = 256 << 10;
/// Bytes appended to a segment between requests to start writing them to disk (see
/// [`SharedFile`]).
const WRITEBACK_EVERY: u64 = 1 << 20;
/// Queries and open read segments this much at a time. A line longer than this (none is: every
/// field is capped at MAX_FIELD_BYTES) is skipped as unreadable.
const READ_CHUNK: usize = 1 << 20;
/// Most segment files the writer keeps open (the current one, and a few for stragglers).
const MAX_OPEN: usize = 8;
const SEGMENT_PREFIX: &str = "audit-";
const SEGMENT_SUFFIX: &str = ".jsonl";
const MANIFEST: &str = "segments";
const MANIFEST_TMP: &str = "segments.tmp";
const MANIFEST_HEADER: &str = "mailbell audit segments 1";
const LOCK_DIR: &str = "lock";

/// Audit log errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    #[error("open audit log at {}: {error}", path.display())]
    Open { path: PathBuf, error: io::Error },
    #[error("lock audit log at {}: {error}", path.display())]
    Lock { path: PathBuf, error: sled::Error },
    #[error("audit log at {} is already open (by this or another process)", path.display())]
    Locked { path: PathBuf },
    #[error("audit store: {0}")]
    Store(io::Error),
    #[error("audit writer is not running")]
    Stopped,
    #[error("cannot start the audit writer: {0}")]
    Spawn(io::Error),
    #[error("query read {scanned} records without finishing; give a narrower time range")]
    TooBroad { scanned: u64 },
    #[error("invalid time {input:?}: {reason}")]
    BadTime { input: String, reason: &'static str },
}

impl From<io::Error> for AuditError {
    fn from(e: io::Error) -> Self {
        AuditError::Store(e)
    }
}

/// One audited happening. `notice` is the notice's id: the 32 hex digits of its `NotifId`,
/// the same from `created` to `acked` (records written by versions before that used
/// `s<seq>/<user>` until `queued`). `user` is the registered user's primary address, also for
/// mail addressed to an alias or a sub-address.
///
/// JSON form: the variant name in kebab case under `event`, then the fields:
/// `{"event":"dead-lettered","notice":"…","user":"alice","reason":"…"}`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum AuditEvent {
    /// A notice was made from an arriving message.
    Created {
        notice: String,
        user: String,
        queue_id: Option<QueueId>,
        from: String,
        subject: String,
    },
    /// Held back: `reason` is "quiet hours until <time>" or "rate limit until <time>" (in the
    /// intake's time zone).
    Held {
        notice: String,
        user: String,
        reason: String,
        until_ms: i64,
    },
    /// Folded into another notice (`count` arrivals in it now).
    Coalesced {
        notice: String,
        user: String,
        into: String,
        count: u32,
    },
    /// Not sent: notifications off, licence expired, no phone number, sender filter, spam,
    /// duplicate, confirmation timeout with drop policy, user removed.
    Dropped {
        notice: String,
        user: String,
        reason: String,
    },
    /// In the outbox for the agent.
    Queued { notice: String, user: String },
    /// Handed to an agent over the link.
    Sent {
        notice: String,
        user: Option<String>,
        agent: String,
    },
    /// The agent acknowledged it.
    Acked {
        notice: String,
        user: Option<String>,
        agent: String,
    },
    /// The agent asked us to retry later.
    Deferred {
        notice: String,
        user: Option<String>,
        reason: String,
        retry_in_ms: u64,
    },
    /// Refused for good, or expired.
    DeadLettered {
        notice: String,
        user: Option<String>,
        reason: String,
    },
    /// Moved back from the dead letters by an operator.
    Requeued { notice: String, by: String },
    /// A link session to an agent came up.
    SessionUp {
        agent: String,
        addr: String,
        window: u32,
    },
    /// A link session ended.
    SessionDown {
        agent: String,
        addr: String,
        reason: String,
        sent: u64,
        acked: u64,
    },
    /// Connecting to an agent failed.
    ConnectFailed {
        agent: String,
        addr: String,
        reason: String,
    },
    /// An operator action.
    Admin {
        actor: String,
        action: String,
        target: String,
    },
}

/// The MTA's queue id of the message a notice was made from: Stalwart's number (a JSON
/// number, as in records written before milter queue ids were kept) or the text a milter
/// client gave (Postfix's `{i}` macro, a JSON string).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum QueueId {
    Stalwart(u64),
    Mta(String),
}

impl std::fmt::Display for QueueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueId::Stalwart(n) => write!(f, "{n}"),
            QueueId::Mta(s) => f.write_str(s),
        }
    }
}

impl AuditEvent {
    /// The event's name, as in the JSON form (`dead-lettered`).
    pub fn name(&self) -> &'static str {
        match self {
            AuditEvent::Created { .. } => "created",
            AuditEvent::Held { .. } => "held",
            AuditEvent::Coalesced { .. } => "coalesced",
            AuditEvent::Dropped { .. } => "dropped",
            AuditEvent::Queued { .. } => "queued",
            AuditEvent::Sent { .. } => "sent",
            AuditEvent::Acked { .. } => "acked",
            AuditEvent::Deferred { .. } => "deferred",
            AuditEvent::DeadLettered { .. } => "dead-lettered",
            AuditEvent::Requeued { .. } => "requeued",
            AuditEvent::SessionUp { .. } => "session-up",
            AuditEvent::SessionDown { .. } => "session-down",
            AuditEvent::ConnectFailed { .. } => "connect-failed",
            AuditEvent::Admin { .. } => "admin",
        }
    }

    /// The mail user the event concerns, if known (lowercased, once stored).
    pub fn user(&self) -> Option<&str> {
        match self {
            AuditEvent::Created { user, .. }
            | AuditEvent::Held { user, .. }
            | AuditEvent::Coalesced { user, .. }
            | AuditEvent::Dropped { user, .. }
            | AuditEvent::Queued { user, .. } => Some(user),
            AuditEvent::Sent { user, .. }
            | AuditEvent::Acked { user, .. }
            | AuditEvent::Deferred { user, .. }
            | AuditEvent::DeadLettered { user, .. } => user.as_deref(),
            AuditEvent::Requeued { .. }
            | AuditEvent::SessionUp { .. }
            | AuditEvent::SessionDown { .. }
            | AuditEvent::ConnectFailed { .. }
            | AuditEvent::Admin { .. } => None,
        }
    }

    /// The notice the event is about, if any.
    pub fn notice(&self) -> Option<&str> {
        match self {
            AuditEvent::Created { notice, .. }
            | AuditEvent::Held { notice, .. }
            | AuditEvent::Coalesced { notice, .. }
            | AuditEvent::Dropped { notice, .. }
            | AuditEvent::Queued { notice, .. }
            | AuditEvent::Sent { notice, .. }
            | AuditEvent::Acked { notice, .. }
            | AuditEvent::Deferred { notice, .. }
            | AuditEvent::DeadLettered { notice, .. }
            | AuditEvent::Requeued { notice, .. } => Some(notice),
            AuditEvent::SessionUp { .. }
            | AuditEvent::SessionDown { .. }
            | AuditEvent::ConnectFailed { .. }
            | AuditEvent::Admin { .. } => None,
        }
    }

    /// Every notice the event mentions: its own, and for [`AuditEvent::Coalesced`] the one it
    /// was folded into.
    pub fn notices(&self) -> impl Iterator<Item = &str> {
        let into = match self {
            AuditEvent::Coalesced { into, .. } => Some(into.as_str()),
            _ => None,
        };
        self.notice().into_iter().chain(into)
    }

    /// Whether the event mentions notice `id` (compared case-insensitively).
    pub fn mentions(&self, id: &str) -> bool {
        self.notices().any(|n| n.eq_ignore_ascii_case(id))
    }

    /// Applies `f` to every string field.
    fn strings_mut(&mut self, f: &mut dyn FnMut(&mut String)) {
        match self {
            AuditEvent::Created {
                notice,
                user,
                queue_id,
                from,
                subject,
            } => {
                f(notice);
                f(user);
                if let Some(QueueId::Mta(q)) = queue_id {
                    f(q);
                }
                f(from);
                f(subject);
            }
            AuditEvent::Held {
                notice,
                user,
                reason,
                ..
            }
            | AuditEvent::Dropped {
                notice,
                user,
                reason,
            } => {
                f(notice);
                f(user);
                f(reason);
            }
            AuditEvent::Coalesced {
                notice, user, into, ..
            } => {
                f(notice);
                f(user);
                f(into);
            }
            AuditEvent::Queued { notice, user } => {
                f(notice);
                f(user);
            }
            AuditEvent::Sent {
                notice,
                user,
                agent,
            }
            | AuditEvent::Acked {
                notice,
                user,
                agent,
            } => {
                f(notice);
                user.iter_mut().for_each(&mut *f);
                f(agent);
            }
            AuditEvent::Deferred {
                notice,
                user,
                reason,
                ..
            }
            | AuditEvent::DeadLettered {
                notice,
                user,
                reason,
            } => {
                f(notice);
                user.iter_mut().for_each(&mut *f);
                f(reason);
            }
            AuditEvent::Requeued { notice, by } => {
                f(notice);
                f(by);
            }
            AuditEvent::SessionUp { agent, addr, .. } => {
                f(agent);
                f(addr);
            }
            AuditEvent::SessionDown {
                agent,
                addr,
                reason,
                ..
            }
            | AuditEvent::ConnectFailed {
                agent,
                addr,
                reason,
            } => {
                f(agent);
                f(addr);
                f(reason);
            }
            AuditEvent::Admin {
                actor,
                action,
                target,
            } => {
                f(actor);
                f(action);
                f(target);
            }
        }
    }

    /// The user field, for the writer to lowercase.
    fn user_mut(&mut self) -> Option<&mut String> {
        match self {
            AuditEvent::Created { user, .. }
            | AuditEvent::Held { user, .. }
            | AuditEvent::Coalesced { user, .. }
            | AuditEvent::Dropped { user, .. }
            | AuditEvent::Queued { user, .. } => Some(user),
            AuditEvent::Sent { user, .. }
            | AuditEvent::Acked { user, .. }
            | AuditEvent::Deferred { user, .. }
            | AuditEvent::DeadLettered { user, .. } => user.as_mut(),
            AuditEvent::Requeued { .. }
            | AuditEvent::SessionUp { .. }
            | AuditEvent::SessionDown { .. }
            | AuditEvent::ConnectFailed { .. }
            | AuditEvent::Admin { .. } => None,
        }
    }

    /// Cuts every string field to at most `max` bytes.
    fn clamp(&mut self, max: usize) {
        self.strings_mut(&mut |s| truncate_at_char(s, max));
    }
}

/// A stored event: when it happened (ms since the Unix epoch) and its sequence number.
/// JSON form: `{"at_ms":…,"seq":…,"event":"sent",…}`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditRecord {
    pub at_ms: i64,
    pub seq: u64,
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// Tunables (`[audit]` in the config file).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Segments that ended more than this many days ago are deleted; 0 keeps them (up to
    /// `max_records` and `max_bytes`).
    pub retention_days: u32,
    /// Cap on stored records; above it the oldest segments are deleted whatever their age.
    pub max_records: u64,
    /// Cap on the segment files' total size in bytes, enforced like `max_records`; 0: none.
    pub max_bytes: u64,
    /// Time covered by one segment file, in seconds (1 to a year).
    pub segment_secs: u64,
    /// A segment reaching this size is continued in a new part (`….1.jsonl`, …).
    pub segment_max_bytes: u64,
    /// Events waiting for the writer; beyond this `record` drops them.
    pub channel_capacity: usize,
    /// How often the writer hands what it wrote to the OS and has it synced to disk (at least
    /// 10 ms).
    pub flush_interval_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: 90,
            max_records: 50_000_000,
            max_bytes: 0,
            segment_secs: 3600,
            segment_max_bytes: 256 << 20,
            channel_capacity: 65_536,
            flush_interval_ms: 1000,
        }
    }
}

/// Counters, for metrics.
#[derive(Debug, Default)]
pub struct AuditStats {
    /// Events accepted by `record`.
    pub recorded: AtomicU64,
    /// Events written to the log.
    pub written: AtomicU64,
    /// Events dropped because the channel was full or the writer had stopped.
    pub dropped: AtomicU64,
    /// Records deleted by retention or the caps.
    pub pruned: AtomicU64,
    /// Write, sync and delete errors (each also logged, at most once a second).
    pub errors: AtomicU64,
    /// Records in the log now (approximate after a crash).
    pub stored: AtomicU64,
    /// Bytes of the segment files now.
    pub stored_bytes: AtomicU64,
}

/// Which records a query returns. All given filters must match. `since_ms` is inclusive,
/// `until_ms` exclusive; `limit` is capped at [`MAX_QUERY_LIMIT`] (0 returns nothing).
/// Users and notices compare case-insensitively; a notice matches the events that
/// [mention](AuditEvent::mentions) it. Every query reads the segments of its time range (see
/// the module docs), so bound it with `since_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditQuery {
    pub user: Option<String>,
    pub notice: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub limit: usize,
}

/// One page of a query: the newest `limit` matching records, oldest first, and how many older
/// ones matched too ([`AuditLog::query_page`]).
///
/// ```text
/// {"records":[{"at_ms":…,"seq":…,"event":"created",…},…],"omitted":295,"omitted_exact":true}
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditPage {
    pub records: Vec<AuditRecord>,
    /// Older matching records not in `records`.
    pub omitted: u64,
    /// Whether `omitted` is exact (false: at least that many; the query stopped counting).
    pub omitted_exact: bool,
}

/// Records a query left out (see [`AuditPage`]).
struct LeftOut {
    count: u64,
    exact: bool,
}

impl Default for AuditQuery {
    fn default() -> Self {
        Self {
            user: None,
            notice: None,
            since_ms: None,
            until_ms: None,
            limit: 1000,
        }
    }
}

type Reply = mpsc::SyncSender<Result<(), io::Error>>;

enum Msg {
    /// Events recorded together: one channel slot and at most one wakeup of the writer.
    Events {
        at_ms: i64,
        events: Vec<AuditEvent>,
    },
    Flush(Reply),
    Stop,
}

/// The audit log. Cheap to clone; the writer stops and the log is flushed when the last
/// clone is dropped, or at [`close`](AuditLog::close).
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dir", &self.inner.store.dir)
            .field("stats", &self.inner.store.stats)
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Arc<Store>,
    tx: mpsc::SyncSender<Msg>,
    /// The receiver until the writer is started (tests start it late).
    pending_rx: Mutex<Option<mpsc::Receiver<Msg>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    drop_warn: RateLimit,
    /// Events in the channel; the channel's capacity bounds this, not its slots.
    queued: Arc<AtomicUsize>,
    capacity: usize,
    /// Held (not used) for its file lock, until the last clone is dropped.
    _lock: sled::Db,
}

impl AuditLog {
    /// Opens (or creates) the log directory and starts the writer thread. Blocking (reads the
    /// tails of segments written since the `segments` file was saved, waits up to two seconds
    /// for a predecessor's lock): call it at startup or through `spawn_blocking`.
    pub fn open(path: &Path, cfg: AuditConfig) -> Result<Self, AuditError> {
        let log = Self::open_paused(path, &cfg, LOCK_WAIT)?;
        log.start_writer()?;
        Ok(log)
    }

    /// Opens the log without starting the writer.
    fn open_paused(
        path: &Path,
        cfg: &AuditConfig,
        lock_wait: Duration,
    ) -> Result<Self, AuditError> {
        let open_err = |error| AuditError::Open {
            path: path.to_owned(),
            error,
        };
        std::fs::create_dir_all(path).map_err(open_err)?;
        let lock = take_lock(path, lock_wait)?;
        if path.join("conf").is_file() && path.join("db").is_file() {
            warn!(
                path = %path.display(),
                "an old sled audit store lies in the audit directory; its records are not read \
                 (delete conf, db, blobs/ and snap.* there to reclaim the space)"
            );
        }
        let found = survey(path).map_err(open_err)?;
        let store = Store::new(path, cfg, found);
        info!(
            records = store.stats.stored.load(Ordering::Relaxed),
            bytes = store.stats.stored_bytes.load(Ordering::Relaxed),
            "audit log opened"
        );
        let (tx, rx) = mpsc::sync_channel(cfg.channel_capacity.max(1));
        Ok(Self {
            inner: Arc::new(Inner {
                store: Arc::new(store),
                tx,
                pending_rx: Mutex::new(Some(rx)),
                writer: Mutex::new(None),
                drop_warn: RateLimit::new(1000),
                queued: Arc::new(AtomicUsize::new(0)),
                capacity: cfg.channel_capacity.max(1),
                _lock: lock,
            }),
        })
    }

    fn start_writer(&self) -> Result<(), AuditError> {
        self.inner.start_writer()
    }

    /// Records `event` as happening now. Never blocks, never fails (see the module docs).
    pub fn record(&self, event: AuditEvent) {
        self.record_at(now_ms(), event);
    }

    /// Records `event` as happening at `at_ms` (ms since the Unix epoch).
    pub fn record_at(&self, at_ms: i64, event: AuditEvent) {
        self.send(at_ms, vec![event]);
    }

    /// Records `events` as happening now, in order, as one message to the writer (a scheduler
    /// round's events: one wakeup of the writer instead of one per event). Dropped whole if
    /// they do not all fit in the channel's capacity.
    pub fn record_all(&self, events: Vec<AuditEvent>) {
        if !events.is_empty() {
            self.send(now_ms(), events);
        }
    }

    fn send(&self, at_ms: i64, events: Vec<AuditEvent>) {
        let n = events.len();
        let inner = &*self.inner;
        let stats = &inner.store.stats;
        let why = if inner.queued.fetch_add(n, Ordering::AcqRel) + n > inner.capacity {
            inner.queued.fetch_sub(n, Ordering::AcqRel);
            "the writer is behind"
        } else {
            match inner.tx.try_send(Msg::Events { at_ms, events }) {
                Ok(()) => {
                    stats.recorded.fetch_add(n as u64, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    inner.queued.fetch_sub(n, Ordering::AcqRel);
                    match e {
                        mpsc::TrySendError::Full(_) => "the writer is behind",
                        mpsc::TrySendError::Disconnected(_) => "the writer has stopped",
                    }
                }
            }
        };
        let dropped = stats.dropped.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if inner.drop_warn.allow(now_ms()) {
            warn!(dropped, "audit events dropped: {why}");
        }
    }

    /// Records matching `q`, oldest first: the first `limit` of them. Sees every event the
    /// writer has taken off the channel. Blocking.
    pub fn query(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, AuditError> {
        Ok(self.inner.store.query(q, false, false)?.0)
    }

    /// Records matching `q`, oldest first: the last (newest) `limit` of them. Blocking.
    pub fn query_latest(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, AuditError> {
        let (mut out, _) = self.inner.store.query(q, true, false)?;
        out.reverse();
        Ok(out)
    }

    /// [`query_latest`](Self::query_latest), and how many older matching records it left
    /// out: counted exactly while the whole query reads at most [`MAX_COUNT_SCAN`] lines, a
    /// lower bound beyond (`omitted_exact` false). Blocking.
    pub fn query_page(&self, q: &AuditQuery) -> Result<AuditPage, AuditError> {
        let (mut records, left) = self.inner.store.query(q, true, true)?;
        records.reverse();
        Ok(AuditPage {
            records,
            omitted: left.count,
            omitted_exact: left.exact,
        })
    }

    /// Deletes the segments past the retention period (relative to `now_ms`), then the oldest
    /// while the caps are passed (see the module docs). Returns how many records went.
    /// Blocking.
    pub fn prune(&self, now_ms: i64) -> Result<u64, AuditError> {
        Ok(self.inner.store.prune(now_ms)?)
    }

    /// Waits until every event recorded so far is written and synced to disk; reports a
    /// write or sync error met since the last flush. Blocking.
    pub fn flush(&self) -> Result<(), AuditError> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.inner
            .tx
            .send(Msg::Flush(reply))
            .map_err(|_| AuditError::Stopped)?;
        rx.recv().map_err(|_| AuditError::Stopped)??;
        Ok(())
    }

    /// The counters.
    pub fn stats(&self) -> Arc<AuditStats> {
        self.inner.store.stats.clone()
    }

    /// Writes what is pending, stops the writer and syncs, for every clone: later events
    /// are counted as dropped. Blocking.
    pub fn close(self) {
        self.inner.stop();
    }
}

impl Inner {
    fn start_writer(&self) -> Result<(), AuditError> {
        let mut pending = lock(&self.pending_rx);
        let Some(rx) = pending.take() else {
            return Ok(());
        };
        let (sync_tx, sync_rx) = mpsc::sync_channel(2);
        let stats = self.store.stats.clone();
        let syncer = match std::thread::Builder::new()
            .name("audit-sync".into())
            .spawn(move || sync_files(sync_rx, &stats))
        {
            Ok(h) => h,
            Err(e) => {
                *pending = Some(rx);
                return Err(AuditError::Spawn(e));
            }
        };
        let writer = Writer {
            store: self.store.clone(),
            queued: self.queued.clone(),
            sync_tx,
            syncer,
        };
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(AuditError::Spawn)?;
        *lock(&self.writer) = Some(handle);
        Ok(())
    }

    fn stop(&self) {
        if lock(&self.pending_rx).is_some() {
            if let Err(e) = self.start_writer() {
                error!(error = %e, "audit log: pending events lost");
            }
        }
        let handle = lock(&self.writer).take();
        if let Some(h) = handle {
            let _ = self.tx.send(Msg::Stop);
            let _ = h.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Takes the directory's lock: a sled store at `<path>/lock`, which holds an exclusive
/// `flock` while open. Waits up to `wait` for a predecessor to let go.
fn take_lock(path: &Path, wait: Duration) -> Result<sled::Db, AuditError> {
    let config = sled::Config::new()
        .path(path.join(LOCK_DIR))
        .cache_capacity(1 << 20)
        .flush_every_ms(None);
    open_waiting(&config, wait).map_err(|e| match e {
        OpenWaiting::Locked => AuditError::Locked {
            path: path.to_owned(),
        },
        OpenWaiting::Sled(error) => AuditError::Lock {
            path: path.to_owned(),
            error,
        },
    })
}

/// A segment file: the period it covers and its part number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct SegKey {
    start_ms: i64,
    span_ms: i64,
    part: u32,
}

impl SegKey {
    fn end_ms(&self) -> i64 {
        self.start_ms.saturating_add(self.span_ms)
    }

    /// `audit-<start_ms>-<span>s.jsonl`, or `audit-<start_ms>-<span>s.<part>.jsonl`.
    fn file_name(&self) -> String {
        let span_s = self.span_ms / 1000;
        match self.part {
            0 => format!(
                "{SEGMENT_PREFIX}{}-{span_s}s{SEGMENT_SUFFIX}",
                self.start_ms
            ),
            p => format!(
                "{SEGMENT_PREFIX}{}-{span_s}s.{p}{SEGMENT_SUFFIX}",
                self.start_ms
            ),
        }
    }

    /// The key of a segment file's name; `None` for any other name, and for a name that is
    /// not written the way [`file_name`](Self::file_name) writes it.
    fn parse(name: &str) -> Option<Self> {
        let mid = name
            .strip_prefix(SEGMENT_PREFIX)?
            .strip_suffix(SEGMENT_SUFFIX)?;
        let (base, part) = match mid.split_once('.') {
            Some((b, p)) => (b, p.parse().ok()?),
            None => (mid, 0),
        };
        let (start, span) = base.rsplit_once('-')?;
        let span_s: i64 = span.strip_suffix('s')?.parse().ok()?;
        let key = Self {
            start_ms: start.parse().ok()?,
            span_ms: span_s.checked_mul(1000).filter(|s| *s > 0)?,
            part,
        };
        (key.file_name() == name).then_some(key)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SegInfo {
    bytes: u64,
    lines: u64,
}

/// What open found on disk.
struct Survey {
    segments: BTreeMap<SegKey, SegInfo>,
    next_seq: u64,
}

/// Lists the segments with their sizes and line counts, and finds the next `seq`. Lines are
/// counted only in what was appended since the `segments` file was saved (everything, for
/// segments it does not list or lists as larger than they are).
fn survey(dir: &Path) -> io::Result<Survey> {
    let saved = read_manifest(dir);
    let mut next_seq = saved.as_ref().map_or(0, |m| m.next_seq);
    let mut segments = BTreeMap::new();
    let mut buf = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(key) = name.to_str().and_then(SegKey::parse) else {
            continue;
        };
        let len = entry.metadata()?.len();
        let known = saved
            .as_ref()
            .and_then(|m| m.segments.get(&key))
            .filter(|i| i.bytes <= len)
            .copied()
            .unwrap_or_default();
        let mut lines = known.lines;
        if known.bytes < len {
            let mut file = File::open(entry.path())?;
            file.seek(SeekFrom::Start(known.bytes))?;
            read_lines(&mut file, &mut buf, |chunk| {
                lines += count_lines(chunk);
                if let Some(seq) = last_seq(chunk) {
                    next_seq = next_seq.max(seq.saturating_add(1));
                }
                Ok::<_, io::Error>(())
            })?;
        }
        segments.insert(key, SegInfo { bytes: len, lines });
    }
    Ok(Survey { segments, next_seq })
}

/// The `seq` of the last line of `chunk` that has one (in a file, the largest).
fn last_seq(chunk: &[u8]) -> Option<u64> {
    chunk
        .strip_suffix(b"\n")?
        .rsplit(|b| *b == b'\n')
        .find_map(|line| parse_prefix(line).map(|(_, seq)| seq))
}

struct Manifest {
    next_seq: u64,
    segments: HashMap<SegKey, SegInfo>,
}

/// Reads `<dir>/segments`:
/// ```text
/// mailbell audit segments 1
/// next_seq <n>
/// <file name> <bytes> <lines>
/// ```
/// `None` when it is missing or malformed (then open counts everything).
fn read_manifest(dir: &Path) -> Option<Manifest> {
    let text = std::fs::read_to_string(dir.join(MANIFEST)).ok()?;
    let mut lines = text.lines();
    if lines.next()? != MANIFEST_HEADER {
        return None;
    }
    let next_seq = lines.next()?.strip_prefix("next_seq ")?.parse().ok()?;
    let mut segments = HashMap::new();
    for line in lines {
        let mut f = line.split(' ');
        let (Some(name), Some(bytes), Some(count), None) = (f.next(), f.next(), f.next(), f.next())
        else {
            return None;
        };
        let info = SegInfo {
            bytes: bytes.parse().ok()?,
            lines: count.parse().ok()?,
        };
        segments.insert(SegKey::parse(name)?, info);
    }
    Some(Manifest { next_seq, segments })
}

/// The limits of a log, from its config.
struct Limits {
    span_ms: i64,
    segment_max_bytes: u64,
    retention_ms: Option<i64>,
    max_records: u64,
    max_bytes: Option<u64>,
    flush_every: Duration,
}

impl Limits {
    fn new(cfg: &AuditConfig) -> Self {
        let secs = cfg.segment_secs.clamp(1, MAX_SEGMENT_SECS);
        Self {
            span_ms: i64::try_from(secs * 1000).unwrap_or(DAY_MS),
            segment_max_bytes: cfg.segment_max_bytes.max(1),
            retention_ms: (cfg.retention_days > 0)
                .then(|| i64::from(cfg.retention_days).saturating_mul(DAY_MS)),
            max_records: cfg.max_records,
            max_bytes: (cfg.max_bytes > 0).then_some(cfg.max_bytes),
            flush_every: Duration::from_millis(cfg.flush_interval_ms.max(MIN_FLUSH_MS)),
        }
    }
}

/// The files, shared by the handle (queries, prune) and the writer.
struct Store {
    dir: PathBuf,
    limits: Limits,
    state: Mutex<State>,
    stats: Arc<AuditStats>,
}

struct State {
    segments: BTreeMap<SegKey, SegInfo>,
    open: HashMap<SegKey, OpenSegment>,
    /// Where the last record went, for the next one of the same period.
    current: Option<SegKey>,
    next_seq: u64,
    /// Closed files with writes not yet given to the syncer.
    unsynced: Vec<Arc<File>>,
    /// The first write error since the last flush.
    error: Option<io::Error>,
    /// The counts changed since the `segments` file was saved.
    counts_dirty: bool,
    /// A segment was begun or deleted since the `segments` file was saved.
    segments_changed: bool,
    /// A segment was begun since the writer last looked (time to apply retention).
    begun: bool,
}

struct OpenSegment {
    out: BufWriter<SharedFile>,
    file: Arc<File>,
    /// Written since the writer last closed idle files.
    used: bool,
    /// Written since the last sync was asked for.
    unsynced: bool,
}

/// A file written through a `BufWriter` and synced from another thread.
/// An open segment's file as the writer's buffer sees it: appends, and every
/// [`WRITEBACK_EVERY`] bytes asks the kernel to start writing the new bytes to disk.
///
/// Without that, a second of events (about 15 MB at 100,000 events/s) sits dirty in the page
/// cache until `audit-sync`'s `fdatasync`, which then writes it all at once; the outbox's
/// commit `fdatasync`s queue behind that burst on the same disk, and the MTA's replies stall
/// for milliseconds once a second (docs/benchmarks.md). Started early, in small pieces, the
/// writes spread over the second and the sync has little left to do (as RocksDB's
/// `bytes_per_sync`).
struct SharedFile {
    file: Arc<File>,
    /// Where the next write lands (the file is opened for appending at this length).
    end: u64,
    /// Start of the bytes not yet handed to writeback.
    kicked: u64,
}

impl SharedFile {
    fn new(file: Arc<File>, len: u64) -> Self {
        Self {
            file,
            end: len,
            kicked: len,
        }
    }
}

impl Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (&*self.file).write(buf)?;
        self.end += n as u64;
        if self.end - self.kicked >= WRITEBACK_EVERY {
            start_writeback(&self.file, self.kicked, self.end - self.kicked);
            self.kicked = self.end;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.file).flush()
    }
}

/// Starts writing `len` bytes at `offset` of `file` to disk without waiting for them
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). Only a hint: durability still comes from the
/// `fdatasync` of `audit-sync`, so an error is ignored.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return;
    };
    // SAFETY: the descriptor is open for as long as `file` is borrowed, and
    // sync_file_range reads no memory of ours.
    let _ = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

impl Store {
    fn new(dir: &Path, cfg: &AuditConfig, found: Survey) -> Self {
        let stats = Arc::new(AuditStats::default());
        let state = State {
            segments: found.segments,
            open: HashMap::new(),
            current: None,
            next_seq: found.next_seq,
            unsynced: Vec::new(),
            error: None,
            counts_dirty: true,
            segments_changed: true,
            begun: false,
        };
        state.publish_totals(&stats);
        Self {
            dir: dir.to_owned(),
            limits: Limits::new(cfg),
            state: Mutex::new(state),
            stats,
        }
    }

    fn path(&self, key: &SegKey) -> PathBuf {
        self.dir.join(key.file_name())
    }

    /// Appends one event, as the next `seq`, to the segment of its time.
    fn write(
        &self,
        st: &mut State,
        at_ms: i64,
        mut event: AuditEvent,
        line: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        if let Some(u) = event.user_mut() {
            if u.bytes().any(|b| !b.is_ascii() || b.is_ascii_uppercase()) {
                *u = u.to_lowercase();
            }
        }
        event.clamp(MAX_FIELD_BYTES);
        encode_line(line, scratch, at_ms, st.next_seq, &event)?;
        let key = self.target(st, at_ms)?;
        let Some(seg) = st.open.get_mut(&key) else {
            return Err(io::Error::other("audit segment not open"));
        };
        if let Err(e) = seg.out.write_all(line) {
            st.discard(&key);
            return Err(e);
        }
        seg.used = true;
        seg.unsynced = true;
        st.next_seq += 1;
        let n = line.len() as u64;
        let info = st.segments.entry(key).or_default();
        info.bytes += n;
        info.lines += 1;
        st.counts_dirty = true;
        self.stats.written.fetch_add(1, Ordering::Relaxed);
        self.stats.stored.fetch_add(1, Ordering::Relaxed);
        self.stats.stored_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// The open segment a record of `at_ms` goes to: the last part of its period, or a new
    /// part when that one is full.
    fn target(&self, st: &mut State, at_ms: i64) -> io::Result<SegKey> {
        let span_ms = self.limits.span_ms;
        let start_ms = at_ms.div_euclid(span_ms).saturating_mul(span_ms);
        let max = self.limits.segment_max_bytes;
        if let Some(k) = st.current {
            if k.start_ms == start_ms
                && k.span_ms == span_ms
                && st.segments.get(&k).is_some_and(|i| i.bytes < max)
                && st.open.contains_key(&k)
            {
                return Ok(k);
            }
        }
        let first = SegKey {
            start_ms,
            span_ms,
            part: 0,
        };
        let last = st
            .segments
            .range(
                first..=SegKey {
                    part: u32::MAX,
                    ..first
                },
            )
            .next_back()
            .map(|(k, i)| (*k, *i));
        let key = match last {
            Some((k, i)) if i.bytes < max || k.part == u32::MAX => k,
            Some((k, _)) => {
                st.close(&k);
                SegKey {
                    part: k.part + 1,
                    ..k
                }
            }
            None => first,
        };
        if !st.open.contains_key(&key) {
            self.open_segment(st, key)?;
        }
        st.current = Some(key);
        Ok(key)
    }

    /// Opens a segment for appending, first cutting off a line a crash left unfinished.
    fn open_segment(&self, st: &mut State, key: SegKey) -> io::Result<()> {
        if st.open.len() >= MAX_OPEN {
            let others: Vec<SegKey> = st.open.keys().copied().collect();
            for k in others {
                st.close(&k);
            }
        }
        let path = self.path(&key);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let len = cut_unfinished_line(&mut file, &path)?;
        if !st.segments.contains_key(&key) {
            st.segments_changed = true;
            st.begun = true;
        }
        let info = st.segments.entry(key).or_default();
        if info.bytes != len {
            info.bytes = len;
            st.counts_dirty = true;
            st.publish_totals(&self.stats);
        }
        let file = Arc::new(file);
        st.open.insert(
            key,
            OpenSegment {
                out: BufWriter::with_capacity(WRITE_BUFFER, SharedFile::new(file.clone(), len)),
                file,
                used: true,
                unsynced: false,
            },
        );
        Ok(())
    }

    /// Hands every buffered line to the OS. A file that fails is closed, its buffer dropped;
    /// the error is kept for the next flush and returned.
    fn flush_buffers(&self, st: &mut State) -> io::Result<()> {
        let mut failed = Vec::new();
        let mut first = None;
        for (k, seg) in &mut st.open {
            if let Err(e) = seg.out.flush() {
                failed.push(*k);
                first.get_or_insert(e);
            }
        }
        for k in &failed {
            st.discard(k);
        }
        match first {
            Some(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                let copy = io::Error::new(e.kind(), e.to_string());
                st.error.get_or_insert(e);
                Err(copy)
            }
            None => Ok(()),
        }
    }

    /// Saves the `segments` file (after [`flush_buffers`](Self::flush_buffers), so the sizes
    /// are those on disk).
    fn save_manifest(&self, st: &mut State) -> io::Result<()> {
        use std::fmt::Write as _;
        let mut text = format!("{MANIFEST_HEADER}\nnext_seq {}\n", st.next_seq);
        for (k, i) in &st.segments {
            let _ = writeln!(text, "{} {} {}", k.file_name(), i.bytes, i.lines);
        }
        let tmp = self.dir.join(MANIFEST_TMP);
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.dir.join(MANIFEST))?;
        st.counts_dirty = false;
        st.segments_changed = false;
        Ok(())
    }

    fn over_caps(&self) -> bool {
        self.stats.stored.load(Ordering::Relaxed) > self.limits.max_records
            || self
                .limits
                .max_bytes
                .is_some_and(|m| self.stats.stored_bytes.load(Ordering::Relaxed) > m)
    }

    /// Deletes the segments that ended before the retention period (relative to `now_ms`),
    /// then the oldest while a cap is passed, never the newest one nor the one being written.
    fn prune(&self, now_ms: i64) -> io::Result<u64> {
        let mut st = lock(&self.state);
        let cutoff = self.limits.retention_ms.map(|r| now_ms.saturating_sub(r));
        let mut lines: u64 = st.segments.values().map(|i| i.lines).sum();
        let mut bytes: u64 = st.segments.values().map(|i| i.bytes).sum();
        let newest = st.segments.keys().next_back().copied();
        let mut doomed = Vec::new();
        for (k, i) in &st.segments {
            let expired = cutoff.is_some_and(|c| k.end_ms() <= c);
            let over =
                lines > self.limits.max_records || self.limits.max_bytes.is_some_and(|m| bytes > m);
            if !expired && !over {
                continue;
            }
            if !expired && (Some(*k) == newest || Some(*k) == st.current) {
                continue;
            }
            doomed.push(*k);
            lines = lines.saturating_sub(i.lines);
            bytes = bytes.saturating_sub(i.bytes);
        }
        let mut removed = 0;
        let mut first_err = None;
        for k in doomed {
            st.discard(&k);
            match std::fs::remove_file(self.path(&k)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    error!(file = %k.file_name(), error = %e, "audit log: cannot delete a segment");
                    first_err.get_or_insert(e);
                    continue;
                }
            }
            if let Some(i) = st.segments.remove(&k) {
                removed += i.lines;
            }
            st.segments_changed = true;
        }
        if removed > 0 || st.segments_changed {
            self.stats.pruned.fetch_add(removed, Ordering::Relaxed);
            st.publish_totals(&self.stats);
            if removed > 0 {
                info!(records = removed, "audit log pruned");
            }
            // The manifest is a cache: failing to save it costs a longer open, nothing else.
            if self.flush_buffers(&mut st).is_ok() {
                if let Err(e) = self.save_manifest(&mut st) {
                    warn!(error = %e, "audit log: cannot save the segments file");
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }

    /// The best `limit` records (`newest` first, or oldest), and, when `count`, how many
    /// matching records it left out.
    fn query(
        &self,
        q: &AuditQuery,
        newest: bool,
        count: bool,
    ) -> Result<(Vec<AuditRecord>, LeftOut), AuditError> {
        let limit = q.limit.min(MAX_QUERY_LIMIT);
        let since = q.since_ms.unwrap_or(i64::MIN);
        if q.until_ms.is_some_and(|u| since >= u) || (limit == 0 && !count) {
            return Ok((
                Vec::new(),
                LeftOut {
                    count: 0,
                    exact: true,
                },
            ));
        }
        let user = q.user.as_deref().map(str::to_lowercase);
        let notice = q.notice.as_deref().map(str::to_ascii_lowercase);
        let needle = match (&notice, &user) {
            (Some(n), _) => Some(Needle {
                text: json_string(n).to_ascii_lowercase(),
                fold: true,
            }),
            (None, Some(u)) => Some(Needle {
                text: format!("\"user\":{}", json_string(u)),
                fold: false,
            }),
            (None, None) => None,
        };
        let mut segments: Vec<(SegKey, u64)> = {
            let mut st = lock(&self.state);
            // What the writer holds in its buffers is visible too. A failure here is the
            // writer's to report (at the next flush).
            let _ = self.flush_buffers(&mut st);
            st.segments
                .iter()
                .filter(|(k, _)| k.end_ms() > since && q.until_ms.is_none_or(|u| k.start_ms < u))
                .map(|(k, i)| (*k, i.lines))
                .collect()
        };
        let mut scan = Scan {
            since,
            until: q.until_ms,
            newest,
            limit,
            user,
            notice,
            best: BinaryHeap::new(),
            lines: 0,
            unreadable: 0,
            count,
            omitted: 0,
        };
        segments.sort_by_key(|(k, _)| (scan.bound(k), *k));
        let mut buf = Vec::new();
        let mut folded = Vec::new();
        let mut exact = true;
        for (k, lines) in &segments {
            if scan.cannot_improve(scan.bound(k)) {
                // Only counting from here on: within the budget, or not at all.
                if !count || scan.lines.saturating_add(*lines) > MAX_COUNT_SCAN {
                    exact = false;
                    break;
                }
            }
            let mut file = match File::open(self.path(k)) {
                Ok(f) => f,
                // Deleted by retention since the list was taken.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(AuditError::Store(e)),
            };
            read_lines(&mut file, &mut buf, |chunk| {
                scan.chunk(chunk, needle.as_ref(), &mut folded)
            })?;
        }
        let mut out = Vec::with_capacity(scan.best.len());
        for c in scan.best.into_sorted_vec() {
            match c.entry {
                Entry::Decoded(r) => out.push(r),
                // A line the writer finished always decodes, so this does not leave out a
                // record that a bad line pushed out of the result.
                Entry::Raw(raw) => match serde_json::from_slice(&raw) {
                    Ok(r) => out.push(r),
                    Err(_) => scan.unreadable += 1,
                },
            }
        }
        if scan.unreadable > 0 {
            warn!(
                lines = scan.unreadable,
                "audit query skipped lines that do not decode"
            );
        }
        Ok((
            out,
            LeftOut {
                count: scan.omitted,
                exact,
            },
        ))
    }
}

impl State {
    /// Closes a segment after handing its buffer to the OS.
    fn close(&mut self, key: &SegKey) {
        if let Some(mut seg) = self.open.remove(key) {
            if let Err(e) = seg.out.flush() {
                self.error.get_or_insert(e);
            }
            if seg.unsynced {
                self.unsynced.push(seg.file);
            }
        }
        if self.current == Some(*key) {
            self.current = None;
        }
    }

    /// Closes a segment, dropping what its buffer holds (after a write error, or before
    /// deleting it).
    fn discard(&mut self, key: &SegKey) {
        if let Some(seg) = self.open.remove(key) {
            let (_file, _lost) = seg.out.into_parts();
        }
        if self.current == Some(*key) {
            self.current = None;
        }
    }

    /// Closes the segments not written since the last call.
    fn close_idle(&mut self) {
        let idle: Vec<SegKey> = self
            .open
            .iter()
            .filter(|(_, s)| !s.used)
            .map(|(k, _)| *k)
            .collect();
        for k in &idle {
            self.close(k);
        }
        for s in self.open.values_mut() {
            s.used = false;
        }
    }

    /// The files written since the last call (to sync them).
    fn take_unsynced(&mut self) -> Vec<Arc<File>> {
        let mut files = std::mem::take(&mut self.unsynced);
        for s in self.open.values_mut() {
            if std::mem::take(&mut s.unsynced) {
                files.push(s.file.clone());
            }
        }
        files
    }

    fn publish_totals(&self, stats: &AuditStats) {
        let lines = self.segments.values().map(|i| i.lines).sum();
        let bytes = self.segments.values().map(|i| i.bytes).sum();
        stats.stored.store(lines, Ordering::Relaxed);
        stats.stored_bytes.store(bytes, Ordering::Relaxed);
    }
}

/// Cuts a last line that has no newline (a crash in the middle of a write) off the end of an
/// open segment. Returns the file's length after.
fn cut_unfinished_line(file: &mut File, path: &Path) -> io::Result<u64> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(0);
    }
    let mut buf = vec![0u8; 64 << 10];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let block = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(block)?;
        if end == len && block.last() == Some(&b'\n') {
            return Ok(len);
        }
        if let Some(i) = block.iter().rposition(|b| *b == b'\n') {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    warn!(
        file = %path.display(),
        bytes = len - end,
        "audit log: cutting off an unfinished last line"
    );
    file.set_len(end)?;
    Ok(end)
}

/// Encodes one line: `{"at_ms":…,"seq":…,` then the event's JSON without its opening brace,
/// then a newline (the same JSON as [`AuditRecord`]'s).
fn encode_line(
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    at_ms: i64,
    seq: u64,
    event: &AuditEvent,
) -> io::Result<()> {
    scratch.clear();
    serde_json::to_writer(&mut *scratch, event)?;
    let Some((b'{', fields)) = scratch.split_first() else {
        return Err(io::Error::other("an audit event is not a JSON object"));
    };
    out.clear();
    write!(out, "{{\"at_ms\":{at_ms},\"seq\":{seq},")?;
    out.extend_from_slice(fields);
    out.push(b'\n');
    Ok(())
}

/// The `at_ms` and `seq` that start a line the writer wrote, read without decoding the rest.
fn parse_prefix(line: &[u8]) -> Option<(i64, u64)> {
    let rest = line.strip_prefix(b"{\"at_ms\":")?;
    let (neg, rest) = match rest.strip_prefix(b"-") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let (mag, rest) = parse_digits(rest)?;
    let at = if neg {
        0i64.checked_sub_unsigned(mag)?
    } else {
        i64::try_from(mag).ok()?
    };
    let rest = rest.strip_prefix(b",\"seq\":")?;
    let (seq, rest) = parse_digits(rest)?;
    rest.starts_with(b",").then_some((at, seq))
}

fn parse_digits(s: &[u8]) -> Option<(u64, &[u8])> {
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for b in &s[..n] {
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some((v, &s[n..]))
}

fn count_lines(chunk: &[u8]) -> u64 {
    chunk.iter().filter(|b| **b == b'\n').count() as u64
}

/// Reads `file` from where it stands to its end and calls `f` with runs of whole lines, each
/// ending in a newline. A last line without its newline (being written, or cut by a crash) is
/// left out; a line longer than [`READ_CHUNK`] is skipped.
fn read_lines<E: From<io::Error>>(
    file: &mut File,
    buf: &mut Vec<u8>,
    mut f: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    buf.resize(READ_CHUNK, 0);
    let mut filled = 0;
    let mut skipping = false;
    loop {
        let n = match file.read(&mut buf[filled..]) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        let old = filled;
        filled += n;
        let Some(last) = buf[old..filled].iter().rposition(|b| *b == b'\n') else {
            if filled == buf.len() {
                // One line fills the buffer: drop it, and the rest of it that follows.
                skipping = true;
                filled = 0;
            }
            continue;
        };
        let end = old + last + 1;
        let mut lines = &buf[..end];
        if std::mem::take(&mut skipping) {
            let first = lines.iter().position(|b| *b == b'\n').unwrap_or(0);
            lines = &lines[first + 1..];
        }
        f(lines)?;
        buf.copy_within(end..filled, 0);
        filled -= end;
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// What a query looks for in the raw text before decoding a line. `fold`: search the text
/// ASCII-lowercased (for notice ids, which are stored as given).
struct Needle {
    text: String,
    fold: bool,
}

/// A record a query keeps, ordered by `key`: smaller is better.
struct Candidate {
    key: (i64, u64),
    entry: Entry,
}

/// A kept record, decoded or (when the query has no filter that needs decoding) still the raw
/// line: a newest-first query reads lines oldest first, so nearly every line is kept for a
/// while, and decoding them all would cost ten times the rest of the scan.
enum Entry {
    Decoded(AuditRecord),
    Raw(Vec<u8>),
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}

/// One query's progress: the best `limit` records so far (a max-heap: its top is the worst).
struct Scan {
    since: i64,
    until: Option<i64>,
    newest: bool,
    limit: usize,
    user: Option<String>,
    notice: Option<String>,
    best: BinaryHeap<Candidate>,
    lines: u64,
    unreadable: u64,
    /// Whether to count the matching records left out of `best`.
    count: bool,
    omitted: u64,
}

impl Scan {
    /// The order of records: by (at_ms, seq), reversed for newest-first (`!x` reverses the
    /// order of integers without overflowing).
    fn key(&self, at_ms: i64, seq: u64) -> (i64, u64) {
        if self.newest {
            (!at_ms, !seq)
        } else {
            (at_ms, seq)
        }
    }

    /// No record of segment `k` has a smaller key than this.
    fn bound(&self, k: &SegKey) -> (i64, u64) {
        if self.newest {
            (!(k.end_ms().saturating_sub(1)), 0)
        } else {
            (k.start_ms, 0)
        }
    }

    /// Whether the result is complete for every record with a key of at least `key`.
    fn cannot_improve(&self, key: (i64, u64)) -> bool {
        self.best.len() >= self.limit
            && (self.limit == 0 || self.best.peek().is_some_and(|w| w.key < key))
    }

    /// Takes a run of whole lines.
    fn chunk(
        &mut self,
        chunk: &[u8],
        needle: Option<&Needle>,
        folded: &mut Vec<u8>,
    ) -> Result<(), AuditError> {
        self.lines += count_lines(chunk);
        if self.lines > MAX_SCAN {
            return Err(AuditError::TooBroad { scanned: MAX_SCAN });
        }
        let Some(needle) = needle else {
            for line in chunk
                .strip_suffix(b"\n")
                .unwrap_or(chunk)
                .split(|b| *b == b'\n')
            {
                self.line(line);
            }
            return Ok(());
        };
        let hay: &[u8] = if needle.fold {
            folded.clear();
            folded.extend_from_slice(chunk);
            folded.make_ascii_lowercase();
            folded
        } else {
            chunk
        };
        // Positions in `hay` are positions in `chunk`: folding keeps every byte in place.
        match std::str::from_utf8(hay) {
            Ok(text) => {
                let mut done = 0;
                for (at, _) in text.match_indices(needle.text.as_str()) {
                    if at < done {
                        continue;
                    }
                    let start = hay[..at]
                        .iter()
                        .rposition(|b| *b == b'\n')
                        .map_or(0, |i| i + 1);
                    let end = hay[at..]
                        .iter()
                        .position(|b| *b == b'\n')
                        .map_or(hay.len(), |i| at + i);
                    self.line(&chunk[start..end]);
                    done = end;
                }
            }
            Err(_) => {
                // Not UTF-8 somewhere (a damaged file): line by line, skipping bad lines.
                let mut start = 0;
                for end in hay
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| **b == b'\n')
                    .map(|(i, _)| i)
                {
                    let found = std::str::from_utf8(&hay[start..end])
                        .is_ok_and(|t| t.contains(needle.text.as_str()));
                    if found {
                        self.line(&chunk[start..end]);
                    }
                    start = end + 1;
                }
            }
        }
        Ok(())
    }

    /// Takes one line (without its newline).
    fn line(&mut self, raw: &[u8]) {
        let mut decoded = None;
        let (at_ms, seq) = match parse_prefix(raw) {
            Some(p) => p,
            None => match serde_json::from_slice::<AuditRecord>(raw) {
                Ok(r) => {
                    let p = (r.at_ms, r.seq);
                    decoded = Some(r);
                    p
                }
                Err(_) => {
                    self.unreadable += 1;
                    return;
                }
            },
        };
        if at_ms < self.since || self.until.is_some_and(|u| at_ms >= u) {
            return;
        }
        let key = self.key(at_ms, seq);
        if self.best.len() >= self.limit
            && (self.limit == 0 || self.best.peek().is_some_and(|w| key >= w.key))
        {
            if self.count {
                self.count_left_out(decoded, raw);
            }
            return;
        }
        let entry = match decoded {
            Some(r) => Entry::Decoded(r),
            None if self.user.is_none() && self.notice.is_none() => Entry::Raw(raw.to_vec()),
            None => match serde_json::from_slice::<AuditRecord>(raw) {
                Ok(r) => Entry::Decoded(r),
                Err(_) => {
                    self.unreadable += 1;
                    return;
                }
            },
        };
        if let Entry::Decoded(r) = &entry {
            if !self.keep(r) {
                return;
            }
        }
        self.best.push(Candidate { key, entry });
        if self.best.len() > self.limit {
            self.best.pop();
            self.omitted += 1;
        }
    }

    /// Counts a line that matched the time range but is not kept, if it matches the filters.
    fn count_left_out(&mut self, decoded: Option<AuditRecord>, raw: &[u8]) {
        if self.user.is_none() && self.notice.is_none() {
            self.omitted += 1;
            return;
        }
        match decoded.map_or_else(|| serde_json::from_slice::<AuditRecord>(raw), Ok) {
            Ok(r) if self.keep(&r) => self.omitted += 1,
            Ok(_) => {}
            Err(_) => self.unreadable += 1,
        }
    }

    fn keep(&self, r: &AuditRecord) -> bool {
        self.notice.as_deref().is_none_or(|n| r.event.mentions(n))
            && self.user.as_deref().is_none_or(|u| {
                r.event
                    .user()
                    .is_some_and(|ru| ru == u || ru.to_lowercase() == u)
            })
    }
}

/// A request to the syncer: sync these files, then answer (for [`AuditLog::flush`]).
struct SyncJob {
    files: Vec<Arc<File>>,
    reply: Option<Reply>,
}

/// The `audit-sync` thread: `fdatasync`s the files the writer handed to the OS, so the
/// writer never waits for the disk. A failed periodic sync is reported by the next flush.
fn sync_files(rx: mpsc::Receiver<SyncJob>, stats: &AuditStats) {
    let error_warn = RateLimit::new(1000);
    let mut failed: Option<io::Error> = None;
    for job in rx {
        let mut result = Ok(());
        for f in &job.files {
            if let Err(e) = f.sync_data() {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                if error_warn.allow(now_ms()) {
                    error!(error = %e, "audit log sync failed");
                }
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        match job.reply {
            Some(reply) => {
                let _ = reply.send(match failed.take() {
                    Some(e) => Err(e),
                    None => result,
                });
            }
            None => {
                if let Err(e) = result {
                    failed.get_or_insert(e);
                }
            }
        }
    }
}

/// Writes events in channel order; flushes, syncs, saves the `segments` file and prunes
/// between groups.
struct Writer {
    store: Arc<Store>,
    /// Events in the channel (see `Inner::queued`).
    queued: Arc<AtomicUsize>,
    sync_tx: mpsc::SyncSender<SyncJob>,
    syncer: std::thread::JoinHandle<()>,
}

impl Writer {
    fn run(self, rx: mpsc::Receiver<Msg>) {
        let store = &*self.store;
        let error_warn = RateLimit::new(1000);
        let mut line = Vec::with_capacity(1024);
        let mut scratch = Vec::with_capacity(1024);
        let mut flush_at: Option<Instant> = None;
        let mut next_prune = Instant::now();
        let mut next_manifest = Instant::now() + MANIFEST_EVERY;
        loop {
            let wake = flush_at.map_or(next_prune, |f| f.min(next_prune));
            let first = match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut stop = false;
            let mut prune = false;
            if let Some(first) = first {
                let mut st = lock(&store.state);
                let mut msg = Some(first);
                let mut taken = 0usize;
                while let Some(m) = msg.take() {
                    match m {
                        Msg::Events { at_ms, events } => {
                            self.queued.fetch_sub(events.len(), Ordering::AcqRel);
                            for event in events {
                                if let Err(e) =
                                    store.write(&mut st, at_ms, event, &mut line, &mut scratch)
                                {
                                    store.stats.errors.fetch_add(1, Ordering::Relaxed);
                                    if error_warn.allow(now_ms()) {
                                        error!(error = %e, "audit log write failed");
                                    }
                                    st.error.get_or_insert(e);
                                }
                            }
                            flush_at
                                .get_or_insert_with(|| Instant::now() + store.limits.flush_every);
                        }
                        Msg::Flush(reply) => {
                            self.sync(store, &mut st, Some(reply), true);
                            flush_at = None;
                        }
                        Msg::Stop => {
                            stop = true;
                            break;
                        }
                    }
                    taken += 1;
                    if taken >= MAX_BATCH {
                        break;
                    }
                    msg = rx.try_recv().ok();
                }
                prune = std::mem::take(&mut st.begun);
            }
            if stop {
                break;
            }
            let now = Instant::now();
            if flush_at.is_some_and(|f| now >= f) {
                let mut st = lock(&store.state);
                let save = st.segments_changed || now >= next_manifest;
                self.sync(store, &mut st, None, save);
                if save {
                    next_manifest = now + MANIFEST_EVERY;
                }
                st.close_idle();
                flush_at = None;
            }
            if now >= next_prune {
                prune = true;
                next_prune = now + PRUNE_EVERY;
            }
            if prune || store.over_caps() {
                if let Err(e) = store.prune(now_ms()) {
                    error!(error = %e, "audit log prune failed");
                }
            }
        }
        // Stopped, or every handle is gone: write, sync and save everything.
        let (reply, done) = mpsc::sync_channel(1);
        {
            let mut st = lock(&store.state);
            self.sync(store, &mut st, Some(reply), true);
            let open: Vec<SegKey> = st.open.keys().copied().collect();
            for k in &open {
                st.close(k);
            }
        }
        match done.recv() {
            Ok(Ok(())) | Err(_) => {}
            Ok(Err(e)) => error!(error = %e, "audit log: the last sync failed"),
        }
        drop(self.sync_tx);
        let _ = self.syncer.join();
    }

    /// Hands the buffers to the OS and the written files to the syncer; with a reply (a
    /// flush), the syncer answers once they are on disk, or this answers at once with the
    /// write error met since the last flush.
    fn sync(&self, store: &Store, st: &mut State, reply: Option<Reply>, save: bool) {
        let flushed = store.flush_buffers(st).is_ok();
        if flushed && save && (st.counts_dirty || st.segments_changed) {
            if let Err(e) = store.save_manifest(st) {
                warn!(error = %e, "audit log: cannot save the segments file");
            }
        }
        let files = st.take_unsynced();
        match reply {
            Some(reply) => match st.error.take() {
                Some(e) => {
                    let _ = reply.send(Err(e));
                    // Still sync what was written.
                    if let Err(
                        mpsc::TrySendError::Full(job) | mpsc::TrySendError::Disconnected(job),
                    ) = self.sync_tx.try_send(SyncJob { files, reply: None })
                    {
                        st.unsynced.extend(job.files);
                    }
                }
                None => {
                    if self
                        .sync_tx
                        .send(SyncJob {
                            files,
                            reply: Some(reply),
                        })
                        .is_err()
                    {
                        error!("audit log: the sync thread has stopped");
                    }
                }
            },
            None => {
                if files.is_empty() {
                    return;
                }
                if let Err(mpsc::TrySendError::Full(job) | mpsc::TrySendError::Disconnected(job)) =
                    self.sync_tx.try_send(SyncJob { files, reply: None })
                {
                    // The syncer is still busy: these go with the next sync.
                    st.unsynced.extend(job.files);
                }
            }
        }
    }
}

/// Allows one event per `every_ms`; lock-free, for the hot path.
#[derive(Debug)]
struct RateLimit {
    every_ms: i64,
    last_ms: AtomicI64,
}

impl RateLimit {
    fn new(every_ms: i64) -> Self {
        Self {
            every_ms,
            last_ms: AtomicI64::new(i64::MIN),
        }
    }

    fn allow(&self, now_ms: i64) -> bool {
        let last = self.last_ms.load(Ordering::Relaxed);
        now_ms.saturating_sub(last) >= self.every_ms
            && self
                .last_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// Parses a `--since`/`--until` argument into ms since the Unix epoch: a date
/// (`2026-11-22`, midnight UTC), an RFC 3339 time (`2026-11-22T10:00:00Z`, `…+01:00`), a UTC
/// time without offset (`2026-11-22T10:00`, `2026-11-22 10:00:00`), or a span back from
/// `now_ms`: a whole number with `s`, `m`, `h`, `d` or `w` (`90m`, `2h`, `7d`).
pub fn parse_since(s: &str, now_ms: i64) -> Result<i64, AuditError> {
    let bad = |reason| AuditError::BadTime {
        input: s.chars().take(64).collect(),
        reason,
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(bad("empty"));
    }
    if let Some(unit) = t.chars().last().filter(char::is_ascii_alphabetic) {
        let digits = &t[..t.len() - 1];
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            let unit_ms: i64 = match unit {
                's' => 1000,
                'm' => 60_000,
                'h' => 3_600_000,
                'd' => DAY_MS,
                'w' => 7 * DAY_MS,
                _ => return Err(bad("unknown unit (use s, m, h, d or w)")),
            };
            let n: i64 = digits.parse().map_err(|_| bad("number too large"))?;
            return n
                .checked_mul(unit_ms)
                .and_then(|back| now_ms.checked_sub(back))
                .ok_or_else(|| bad("too far back"));
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return d
            .and_hms_opt(0, 0, 0)
            .map(|dt| dt.and_utc().timestamp_millis())
            .ok_or_else(|| bad("not a valid date"));
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
        return Ok(dt.timestamp_millis());
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(t, fmt) {
            return Ok(dt.and_utc().timestamp_millis());
        }
    }
    Err(bad(
        "expected YYYY-MM-DD, an RFC 3339 time or a span like 90m, 2h, 7d",
    ))
}

/// One line for humans: the UTC time (RFC 3339, ms), the event name, then `key=value` fields.
/// Free text is quoted and escaped when it has spaces, quotes or control characters (so a
/// subject cannot forge a line), and digit runs that look like phone numbers are masked.
///
/// ```text
/// 2026-11-22T10:00:00.000Z created notice=4f… user=alice queue_id=42 from=bob@example.org subject="Lunch?"
/// ```
pub fn format_record(r: &AuditRecord) -> String {
    use std::fmt::Write as _;
    let mut out = match DateTime::<Utc>::from_timestamp_millis(r.at_ms) {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Millis, true),
        None => format!("@{}ms", r.at_ms),
    };
    out.push(' ');
    out.push_str(r.event.name());
    let line = &mut out;
    match &r.event {
        AuditEvent::Created {
            notice,
            user,
            queue_id,
            from,
            subject,
        } => {
            id_field(line, "notice", notice);
            field(line, "user", user);
            if let Some(q) = queue_id {
                id_field(line, "queue_id", &q.to_string());
            }
            field(line, "from", from);
            field(line, "subject", subject);
        }
        AuditEvent::Held {
            notice,
            user,
            reason,
            until_ms,
        } => {
            id_field(line, "notice", notice);
            field(line, "user", user);
            field(line, "reason", reason);
            match DateTime::<Utc>::from_timestamp_millis(*until_ms) {
                Some(t) => {
                    let _ = write!(
                        line,
                        " until={}",
                        t.to_rfc3339_opts(SecondsFormat::Secs, true)
                    );
                }
                None => {
                    let _ = write!(line, " until_ms={until_ms}");
                }
            }
        }
        AuditEvent::Coalesced {
            notice,
            user,
            into,
            count,
        } => {
            id_field(line, "notice", notice);
            field(line, "user", user);
            id_field(line, "into", into);
            let _ = write!(line, " count={count}");
        }
        AuditEvent::Dropped {
            notice,
            user,
            reason,
        } => {
            id_field(line, "notice", notice);
            field(line, "user", user);
            field(line, "reason", reason);
        }
        AuditEvent::Queued { notice, user } => {
            id_field(line, "notice", notice);
            field(line, "user", user);
        }
        AuditEvent::Sent {
            notice,
            user,
            agent,
        }
        | AuditEvent::Acked {
            notice,
            user,
            agent,
        } => {
            id_field(line, "notice", notice);
            opt_field(line, "user", user.as_deref());
            field(line, "agent", agent);
        }
        AuditEvent::Deferred {
            notice,
            user,
            reason,
            retry_in_ms,
        } => {
            id_field(line, "notice", notice);
            opt_field(line, "user", user.as_deref());
            field(line, "reason", reason);
            let _ = write!(line, " retry_in_ms={retry_in_ms}");
        }
        AuditEvent::DeadLettered {
            notice,
            user,
            reason,
        } => {
            id_field(line, "notice", notice);
            opt_field(line, "user", user.as_deref());
            field(line, "reason", reason);
        }
        AuditEvent::Requeued { notice, by } => {
            id_field(line, "notice", notice);
            field(line, "by", by);
        }
        AuditEvent::SessionUp {
            agent,
            addr,
            window,
        } => {
            field(line, "agent", agent);
            field(line, "addr", addr);
            let _ = write!(line, " window={window}");
        }
        AuditEvent::SessionDown {
            agent,
            addr,
            reason,
            sent,
            acked,
        } => {
            field(line, "agent", agent);
            field(line, "addr", addr);
            field(line, "reason", reason);
            let _ = write!(line, " sent={sent} acked={acked}");
        }
        AuditEvent::ConnectFailed {
            agent,
            addr,
            reason,
        } => {
            field(line, "agent", agent);
            field(line, "addr", addr);
            field(line, "reason", reason);
        }
        AuditEvent::Admin {
            actor,
            action,
            target,
        } => {
            field(line, "actor", actor);
            field(line, "action", action);
            field(line, "target", target);
        }
    }
    out
}

fn field(out: &mut String, k: &str, v: &str) {
    use std::fmt::Write as _;
    let _ = write!(out, " {k}={}", quote(&mask_phones(v)));
}

/// Ids are printed as they are: a hex id may hold a long run of digits.
fn id_field(out: &mut String, k: &str, v: &str) {
    use std::fmt::Write as _;
    let _ = write!(out, " {k}={}", quote(v));
}

fn opt_field(out: &mut String, k: &str, v: Option<&str>) {
    match v {
        Some(v) => field(out, k, v),
        None => out.push_str(&format!(" {k}=-")),
    }
}

/// `v` as is when it is a plain token, else in double quotes with Rust escapes.
fn quote(v: &str) -> String {
    let plain = !v.is_empty()
        && v != "-"
        && v.chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '\\' && c != '=');
    if plain {
        v.to_owned()
    } else {
        format!("{v:?}")
    }
}

/// Masks runs that look like phone numbers: 8 or more digits in a row (or `+` and 7 or more),
/// keeping the first 3 and the last 2 digits (`+33612345678` gives `+336******78`). Numbers written with spaces or
/// dashes are not recognised; none should reach the audit log anyway.
fn mask_phones(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let mut copied = 0;
    while i < b.len() {
        let plus = b.get(i) == Some(&b'+');
        let start = if plus { i + 1 } else { i };
        let mut end = start;
        while b.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
        let digits = end - start;
        // Only at the start of a digit run, not in its middle.
        let at_run_start = i == 0 || !b.get(i - 1).is_some_and(u8::is_ascii_digit);
        if at_run_start && (digits >= 8 || (plus && digits >= 7)) {
            out.push_str(&s[copied..start]);
            out.push_str(&s[start..start + 3]);
            out.extend(std::iter::repeat_n('*', digits - 5));
            out.push_str(&s[end - 2..end]);
            copied = end;
            i = end;
        } else {
            i = if end > i { end } else { i + 1 };
        }
    }
    out.push_str(&s[copied..]);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A fixed time, for formatting: 2026-11-18T11:06:40Z.
    const T0: i64 = 1_795_000_000_000;
    const HOUR_MS: i64 = 3_600_000;

    /// A time well in the future, so the writer's own prune (by the real clock) leaves the
    /// test's records alone.
    fn base() -> i64 {
        now_ms() + 1000 * DAY_MS
    }

    /// An hour boundary well in the future (a segment boundary with the default config).
    fn hour_base() -> i64 {
        let b = base();
        b - b.rem_euclid(HOUR_MS)
    }

    fn created(n: &str, user: &str) -> AuditEvent {
        AuditEvent::Created {
            notice: n.into(),
            user: user.into(),
            queue_id: Some(QueueId::Stalwart(7)),
            from: "bob@example.org".into(),
            subject: "hello".into(),
        }
    }

    fn sent(n: &str, user: Option<&str>) -> AuditEvent {
        AuditEvent::Sent {
            notice: n.into(),
            user: user.map(Into::into),
            agent: "gsm1".into(),
        }
    }

    fn open(dir: &Path) -> AuditLog {
        AuditLog::open(&dir.join("audit"), AuditConfig::default()).unwrap()
    }

    fn open_with(dir: &Path, cfg: AuditConfig) -> AuditLog {
        AuditLog::open(&dir.join("audit"), cfg).unwrap()
    }

    fn q() -> AuditQuery {
        AuditQuery::default()
    }

    fn user_q(u: &str) -> AuditQuery {
        AuditQuery {
            user: Some(u.into()),
            ..q()
        }
    }

    fn notices(rs: &[AuditRecord]) -> Vec<String> {
        rs.iter()
            .map(|r| r.event.notice().unwrap_or("-").to_owned())
            .collect()
    }

    /// The segment files of the log under `dir`, oldest first.
    fn segment_files(dir: &Path) -> Vec<String> {
        let mut keys: Vec<SegKey> = std::fs::read_dir(dir.join("audit"))
            .unwrap()
            .filter_map(|e| SegKey::parse(e.unwrap().file_name().to_str()?))
            .collect();
        keys.sort();
        keys.iter().map(SegKey::file_name).collect()
    }

    fn segment_path(dir: &Path, name: &str) -> PathBuf {
        dir.join("audit").join(name)
    }

    fn stored(log: &AuditLog) -> u64 {
        log.stats().stored.load(Ordering::Relaxed)
    }

    #[test]
    fn json_form_has_kebab_event_names_and_flat_fields() {
        let r = AuditRecord {
            at_ms: 5,
            seq: 9,
            event: AuditEvent::DeadLettered {
                notice: "n1".into(),
                user: None,
                reason: "expired".into(),
            },
        };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(
            j,
            r#"{"at_ms":5,"seq":9,"event":"dead-lettered","notice":"n1","user":null,"reason":"expired"}"#
        );
        assert_eq!(serde_json::from_str::<AuditRecord>(&j).unwrap(), r);
        let up = AuditEvent::SessionUp {
            agent: "a".into(),
            addr: "b".into(),
            window: 3,
        };
        assert!(serde_json::to_string(&up)
            .unwrap()
            .starts_with(r#"{"event":"session-up""#));
        assert_eq!(up.name(), "session-up");
    }

    #[test]
    fn query_by_user_and_since() {
        let t0 = base();
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.record_at(t0, created("a1", "Alice"));
        log.record_at(t0 + 10, created("b1", "bob"));
        log.record_at(t0 + 20, sent("a1", Some("alice")));
        log.record_at(t0 + 30, sent("b1", None));
        log.record_at(
            t0 + 40,
            AuditEvent::Queued {
                notice: "a2".into(),
                user: "ALICE".into(),
            },
        );
        log.flush().unwrap();

        let alice = log
            .query(&AuditQuery {
                user: Some("alice".into()),
                ..q()
            })
            .unwrap();
        assert_eq!(notices(&alice), ["a1", "a1", "a2"]);
        assert_eq!(alice[0].at_ms, t0);

        let since = log
            .query(&AuditQuery {
                user: Some("Alice".into()),
                since_ms: Some(t0 + 20),
                ..q()
            })
            .unwrap();
        assert_eq!(notices(&since), ["a1", "a2"]);
        assert_eq!(since[0].event.name(), "sent");

        let window = log
            .query(&AuditQuery {
                since_ms: Some(t0 + 10),
                until_ms: Some(t0 + 30),
                ..q()
            })
            .unwrap();
        assert_eq!(notices(&window), ["b1", "a1"]);

        let bob = log
            .query(&AuditQuery {
                user: Some("bob".into()),
                ..q()
            })
            .unwrap();
        assert_eq!(notices(&bob), ["b1"], "a Sent without a user is not bob's");
        let nobody = log
            .query(&AuditQuery {
                user: Some("carol".into()),
                ..q()
            })
            .unwrap();
        assert!(nobody.is_empty());
    }

    #[test]
    fn limit_and_latest() {
        let t0 = base();
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        for i in 0..10 {
            log.record_at(t0 + i, created(&format!("n{i}"), "u"));
        }
        log.flush().unwrap();
        let first = log
            .query(&AuditQuery {
                user: Some("u".into()),
                limit: 3,
                ..q()
            })
            .unwrap();
        assert_eq!(notices(&first), ["n0", "n1", "n2"]);
        let last = log.query_latest(&AuditQuery { limit: 3, ..q() }).unwrap();
        assert_eq!(notices(&last), ["n7", "n8", "n9"]);
        assert!(log
            .query(&AuditQuery { limit: 0, ..q() })
            .unwrap()
            .is_empty());
    }

    #[test]
    fn notice_filter_includes_coalesced_into() {
        let t0 = base();
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.record_at(t0, created("n1", "u"));
        log.record_at(t0 + 1, created("n2", "u"));
        log.record_at(
            t0 + 2,
            AuditEvent::Coalesced {
                notice: "n2".into(),
                user: "u".into(),
                into: "n1".into(),
                count: 2,
            },
        );
        log.record_at(t0 + 3, sent("n1", Some("u")));
        log.record_at(
            t0 + 4,
            AuditEvent::Admin {
                actor: "root".into(),
                action: "requeue".into(),
                target: "n1".into(),
            },
        );
        log.flush().unwrap();
        let n1 = log
            .query(&AuditQuery {
                notice: Some("N1".into()),
                ..q()
            })
            .unwrap();
        let names: Vec<_> = n1.iter().map(|r| r.event.name()).collect();
        assert_eq!(names, ["created", "coalesced", "sent"]);
        let n2 = log
            .query(&AuditQuery {
                notice: Some("n2".into()),
                user: Some("u".into()),
                ..q()
            })
            .unwrap();
        assert_eq!(n2.len(), 2);
        let other_user = log
            .query(&AuditQuery {
                notice: Some("n2".into()),
                user: Some("v".into()),
                ..q()
            })
            .unwrap();
        assert!(other_user.is_empty());
    }

    #[test]
    fn ordered_by_time_then_sequence_across_flushes() {
        let t0 = base();
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.record_at(t0 + 5, created("late", "u"));
        log.record_at(t0, created("same-1", "u"));
        log.flush().unwrap();
        log.record_at(t0, created("same-2", "u"));
        log.record_at(t0 - 5, created("early", "u"));
        log.flush().unwrap();
        let all = log.query(&q()).unwrap();
        assert_eq!(notices(&all), ["early", "same-1", "same-2", "late"]);
        let by_user = log
            .query(&AuditQuery {
                user: Some("u".into()),
                ..q()
            })
            .unwrap();
        assert_eq!(by_user, all);
        assert!(all[1].seq < all[2].seq);
    }

    #[test]
    fn reopen_keeps_records_count_and_sequence() {
        let t0 = base();
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.record_at(t0, created("n1", "u"));
        log.record_at(t0 + 1, sent("n1", Some("u")));
        log.close();
        let log = open(dir.path());
        assert_eq!(log.stats().stored.load(Ordering::Relaxed), 2);
        log.record_at(t0 + 2, created("n2", "u"));
        log.flush().unwrap();
        let all = log
            .query(&AuditQuery {
                user: Some("u".into()),
                ..q()
            })
            .unwrap();
        assert_eq!(notices(&all), ["n1", "n1", "n2"]);
        assert!(all[1].seq < all[2].seq);
    }

    #[test]
    fn a_line_is_the_record_in_json() {
        let mut line = Vec::new();
        let mut scratch = Vec::new();
        for (at_ms, seq) in [(T0, 42), (-5, 0), (i64::MIN, u64::MAX), (i64::MAX, 1)] {
            let event = created("n1", "alice");
            encode_line(&mut line, &mut scratch, at_ms, seq, &event).unwrap();
            let json = serde_json::to_string(&AuditRecord { at_ms, seq, event }).unwrap();
            assert_eq!(
                String::from_utf8(line.clone()).unwrap(),
                format!("{json}\n")
            );
            assert_eq!(parse_prefix(&line[..line.len() - 1]), Some((at_ms, seq)));
        }
        for bad in [
            &b""[..],
            b"{\"at_ms\":1,\"seq\":2}",
            b"{\"at_ms\":99999999999999999999,\"seq\":2,",
            b"{\"at_ms\":-,\"seq\":2,",
            b"{\"at_ms\":9223372036854775808,\"seq\":2,",
            b"{\"seq\":2,\"at_ms\":1,",
        ] {
            assert_eq!(parse_prefix(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            parse_prefix(b"{\"at_ms\":-9223372036854775808,\"seq\":2,"),
            Some((i64::MIN, 2))
        );
    }

    #[test]
    fn segment_file_names() {
        for key in [
            SegKey {
                start_ms: 1_795_305_600_000,
                span_ms: HOUR_MS,
                part: 0,
            },
            SegKey {
                start_ms: -7_200_000,
                span_ms: HOUR_MS,
                part: 3,
            },
            SegKey {
                start_ms: 0,
                span_ms: 1000,
                part: 0,
            },
        ] {
            assert_eq!(SegKey::parse(&key.file_name()), Some(key), "{key:?}");
        }
        let key = SegKey {
            start_ms: 1_795_305_600_000,
            span_ms: HOUR_MS,
            part: 2,
        };
        assert_eq!(key.file_name(), "audit-1795305600000-3600s.2.jsonl");
        for bad in [
            "audit-1-3600s.0.jsonl",
            "audit-01-3600s.jsonl",
            "audit-+1-3600s.jsonl",
            "audit-1-0s.jsonl",
            "audit-1-3600.jsonl",
            "audit-x-3600s.jsonl",
            "audit-1-3600s.jsonl.tmp",
            "segments",
        ] {
            assert_eq!(SegKey::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn user_filter_matches_whole_names_in_any_case() {
        let t0 = base();
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.record_at(t0, created("n1", "al@x"));
        log.record_at(t0 + 1, created("n2", "val@x"));
        log.record_at(t0 + 2, created("n3", "al@xy"));
        log.record_at(t0 + 3, created("n4", "AL@X"));
        let mut sneaky = created("n5", "bob@x");
        if let AuditEvent::Created { subject, from, .. } = &mut sneaky {
            *subject = r#""user":"al@x""#.into();
            *from = "al@x".into();
        }
        log.record_at(t0 + 4, sneaky);
        log.record_at(t0 + 5, sent("n6", None));
        log.record_at(
            t0 + 6,
            AuditEvent::Requeued {
                notice: "n7".into(),
                by: "al@x".into(),
            },
        );
        log.record_at(t0 + 7, sent("n8", Some("Al@x")));
        log.record_at(t0 + 8, created("n9", "ÉLISE@x"));
        log.flush().unwrap();

        let al = log.query(&user_q("Al@X")).unwrap();
        assert_eq!(notices(&al), ["n1", "n4", "n8"]);
        assert!(al.iter().all(|r| r.event.user() == Some("al@x")), "{al:?}");
        assert_eq!(notices(&log.query(&user_q("val@x")).unwrap()), ["n2"]);
        assert_eq!(notices(&log.query(&user_q("al@xy")).unwrap()), ["n3"]);
        assert_eq!(notices(&log.query(&user_q("bob@x")).unwrap()), ["n5"]);
        assert_eq!(notices(&log.query(&user_q("élise@X")).unwrap()), ["n9"]);
        assert!(log.query(&user_q("l@x")).unwrap().is_empty());
        assert!(log.query(&user_q("al")).unwrap().is_empty());
        assert!(log.query(&user_q("")).unwrap().is_empty());

        let name = &segment_files(dir.path())[0];
        let text = std::fs::read_to_string(segment_path(dir.path(), name)).unwrap();
        assert_eq!(text.lines().count(), 9);
        assert!(!text.contains("AL@X") && text.contains("élise@x"), "{text}");
    }

    #[test]
    fn notice_filter_matches_whole_ids_in_any_case() {
        let t0 = base();
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.record_at(t0, created("ab1", "u"));
        log.record_at(t0 + 1, created("AB12", "u"));
        log.record_at(t0 + 2, created("xab1", "u"));
        log.record_at(t0 + 3, sent("Ab1", None));
        log.record_at(t0 + 4, created("a\"b", "u"));
        log.flush().unwrap();
        let by = |n: &str| {
            notices(
                &log.query(&AuditQuery {
                    notice: Some(n.into()),
                    ..q()
                })
                .unwrap(),
            )
        };
        assert_eq!(by("aB1"), ["ab1", "Ab1"], "ids are stored as given");
        assert_eq!(by("ab12"), ["AB12"]);
        assert_eq!(by("A\"B"), ["a\"b"]);
        assert!(by("b1").is_empty());
    }

    #[test]
    fn a_page_keeps_the_newest_and_counts_what_it_left_out() {
        let t0 = hour_base();
        let dir = tempfile::tempdir().unwrap();
        let log = open_with(
            dir.path(),
            AuditConfig {
                segment_secs: 60,
                ..Default::default()
            },
        );
        // 1,295 records over about 22 minutes (22 segments); every fifth one is bob's.
        for i in 0..1295_i64 {
            let u = if i % 5 == 0 { "bob" } else { "alice" };
            log.record_at(t0 + i * 1000, created(&format!("n{i}"), u));
        }
        log.flush().unwrap();
        let page = log.query_page(&q()).unwrap();
        assert_eq!(page.records.len(), 1000);
        assert_eq!((page.omitted, page.omitted_exact), (295, true));
        assert_eq!(page.records[0].event.notice(), Some("n295"), "oldest first");
        assert_eq!(page.records[999].event.notice(), Some("n1294"));
        // Paging back: everything before the oldest one printed.
        let older = log
            .query_page(&AuditQuery {
                until_ms: Some(page.records[0].at_ms),
                ..q()
            })
            .unwrap();
        assert_eq!((older.records.len(), older.omitted), (295, 0));
        assert_eq!(older.records[294].event.notice(), Some("n294"));
        // Filtered: only bob's count.
        let bob = log
            .query_page(&AuditQuery {
                limit: 10,
                ..user_q("bob")
            })
            .unwrap();
        assert_eq!(notices(&bob.records)[9], "n1290");
        assert_eq!((bob.omitted, bob.omitted_exact), (249, true));
        let one = log
            .query_page(&AuditQuery {
                limit: 1,
                ..AuditQuery {
                    notice: Some("n7".into()),
                    ..q()
                }
            })
            .unwrap();
        assert_eq!((notices(&one.records), one.omitted), (vec!["n7".into()], 0));
        // Nothing left out: nothing said.
        let all = log.query_page(&AuditQuery { limit: 2000, ..q() }).unwrap();
        assert_eq!((all.records.len(), all.omitted), (1295, 0));
        // Counting only.
        let none = log.query_page(&AuditQuery { limit: 0, ..q() }).unwrap();
        assert_eq!((none.records.len(), none.omitted), (0, 1295));
    }

    #[test]
    fn query_latest_across_segments_and_stragglers() {
        let t0 = hour_base();
        let dir = tempfile::tempdir().unwrap();
        let log = open_with(
            dir.path(),
            AuditConfig {
                segment_secs: 60,
                ..Default::default()
            },
        );
        // Written out of time order: d goes back into the first minute's segment.
        log.record_at(t0 + 180_000, created("a", "u"));
        log.record_at(t0, created("b", "u"));
        log.record_at(t0 + 60_000, created("c", "u"));
        log.record_at(t0 + 59_999, created("d", "u"));
        log.record_at(t0 + 120_000, created("e", "u"));
        log.flush().unwrap();
        assert_eq!(segment_files(dir.path()).len(), 4);
        let limited = |q: AuditQuery| AuditQuery { limit: 2, ..q };
        assert_eq!(
            notices(&log.query(&q()).unwrap()),
            ["b", "d", "c", "e", "a"]
        );
        assert_eq!(notices(&log.query(&limited(q())).unwrap()), ["b", "d"]);
        assert_eq!(
            notices(&log.query_latest(&limited(q())).unwrap()),
            ["e", "a"]
        );
        assert_eq!(
            notices(&log.query_latest(&limited(user_q("u"))).unwrap()),
            ["e", "a"]
        );
        let since = AuditQuery {
            since_ms: Some(t0 + 60_000),
            ..q()
        };
        assert_eq!(notices(&log.query(&limited(since)).unwrap()), ["c", "e"]);
        let until = AuditQuery {
            until_ms: Some(t0 + 120_000),
            ..q()
        };
        assert_eq!(
            notices(&log.query_latest(&limited(until.clone())).unwrap()),
            ["d", "c"]
        );
        assert_eq!(notices(&log.query(&until).unwrap()), ["b", "d", "c"]);
    }

    #[test]
    fn segments_roll_and_retention_deletes_whole_ones() {
        let t0 = hour_base();
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            retention_days: 1,
            ..Default::default()
        };
        let log = open_with(dir.path(), cfg.clone());
        let now = t0 + 10 * DAY_MS;
        let cutoff = now - DAY_MS;
        for i in 0..2500 {
            log.record_at(t0 + i * 1000, created(&format!("old{i}"), "u"));
        }
        log.record_at(cutoff - 1, created("just-old", "u"));
        log.record_at(cutoff, created("kept", "u"));
        log.record_at(cutoff + HOUR_MS - 1, created("kept2", "u"));
        log.record_at(now, sent("kept", None));
        log.flush().unwrap();
        assert_eq!(segment_files(dir.path()).len(), 4);
        assert_eq!(stored(&log), 2504);

        assert_eq!(log.prune(now).unwrap(), 2501);
        let seg = |start_ms| {
            SegKey {
                start_ms,
                span_ms: HOUR_MS,
                part: 0,
            }
            .file_name()
        };
        assert_eq!(segment_files(dir.path()), [seg(cutoff), seg(now)]);
        assert_eq!(log.stats().pruned.load(Ordering::Relaxed), 2501);
        assert_eq!(stored(&log), 3);
        assert_eq!(
            notices(&log.query(&q()).unwrap()),
            ["kept", "kept2", "kept"]
        );
        assert_eq!(log.prune(now).unwrap(), 0);
        // A segment goes once all of it is past retention.
        assert_eq!(log.prune(now + HOUR_MS - 1).unwrap(), 0);
        assert_eq!(log.prune(now + HOUR_MS).unwrap(), 2);
        assert_eq!(segment_files(dir.path()), [seg(now)]);
        log.close();
        let log = open_with(dir.path(), cfg);
        assert_eq!(stored(&log), 1);
        assert_eq!(notices(&log.query(&q()).unwrap()), ["kept"]);
    }

    #[test]
    fn record_cap_deletes_the_oldest_segments_but_never_the_newest() {
        let t0 = hour_base();
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            retention_days: 0,
            max_records: 3,
            segment_secs: 1,
            ..Default::default()
        };
        let log = open_with(dir.path(), cfg);
        for i in 0..5 {
            log.record_at(t0 + i * 1000, created(&format!("n{i}"), "u"));
        }
        log.flush().unwrap();
        // The writer may already have pruned; prune is idempotent.
        log.prune(t0 + 100 * DAY_MS).unwrap();
        assert_eq!(notices(&log.query(&q()).unwrap()), ["n2", "n3", "n4"]);
        assert_eq!(segment_files(dir.path()).len(), 3);
        assert_eq!(log.stats().pruned.load(Ordering::Relaxed), 2);

        // One segment over the cap on its own stays.
        for i in 0..5 {
            log.record_at(t0 + 10_000, created(&format!("m{i}"), "u"));
        }
        log.flush().unwrap();
        log.prune(t0 + 100 * DAY_MS).unwrap();
        assert_eq!(
            notices(&log.query(&q()).unwrap()),
            ["m0", "m1", "m2", "m3", "m4"]
        );
        assert_eq!(stored(&log), 5);
    }

    #[test]
    fn a_full_segment_continues_in_parts_and_the_byte_cap_deletes_them() {
        let t0 = hour_base();
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            segment_max_bytes: 1,
            max_records: 4,
            ..Default::default()
        };
        let log = open_with(dir.path(), cfg);
        for i in 0..6 {
            log.record_at(t0 + i, created(&format!("n{i}"), "u"));
        }
        log.flush().unwrap();
        log.prune(t0).unwrap();
        let files = segment_files(dir.path());
        assert_eq!(files.len(), 4, "{files:?}");
        assert!(files[0].ends_with("-3600s.2.jsonl"), "{files:?}");
        assert!(files[3].ends_with("-3600s.5.jsonl"), "{files:?}");
        assert_eq!(
            notices(&log.query(&user_q("u")).unwrap()),
            ["n2", "n3", "n4", "n5"]
        );
        log.close();

        // A byte cap: each record is one line in its own segment; 1 byte keeps the newest.
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            max_bytes: 1,
            segment_secs: 1,
            ..Default::default()
        };
        let log = open_with(dir.path(), cfg);
        for i in 0..3 {
            log.record_at(t0 + i * 1000, created(&format!("n{i}"), "u"));
        }
        log.flush().unwrap();
        log.prune(t0).unwrap();
        assert_eq!(notices(&log.query(&q()).unwrap()), ["n2"]);
        let s = log.stats();
        assert_eq!(s.stored.load(Ordering::Relaxed), 1);
        let len = std::fs::metadata(segment_path(dir.path(), &segment_files(dir.path())[0]))
            .unwrap()
            .len();
        assert_eq!(s.stored_bytes.load(Ordering::Relaxed), len);
    }

    #[test]
    fn sequence_keeps_increasing_without_the_segments_file() {
        let t0 = hour_base();
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.record_at(t0 + 5 * HOUR_MS, created("late", "u"));
        // Into an older segment, after the newest one's only record.
        log.record_at(t0, created("straggler", "u"));
        log.record_at(t0 + 1, created("straggler2", "u"));
        log.close();
        std::fs::remove_file(dir.path().join("audit").join(MANIFEST)).unwrap();
        let log = open(dir.path());
        assert_eq!(stored(&log), 3);
        log.record_at(t0 + 2, created("after", "u"));
        log.flush().unwrap();
        let all = log.query(&q()).unwrap();
        assert_eq!(notices(&all), ["straggler", "straggler2", "after", "late"]);
        assert!(all[2].seq > all[1].seq && all[1].seq > all[0].seq && all[0].seq > all[3].seq);
    }

    #[test]
    fn a_line_cut_by_a_crash_is_skipped_then_cut_off() {
        let t0 = hour_base();
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.record_at(t0, created("n1", "u"));
        log.record_at(t0 + 1, created("n2", "u"));
        log.close();
        let files = segment_files(dir.path());
        assert_eq!(files.len(), 1);
        let path = segment_path(dir.path(), &files[0]);
        let whole = std::fs::read_to_string(&path).unwrap();
        // A crash in the middle of writing the third line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        write!(f, "{{\"at_ms\":{},\"seq\":99,\"event\":\"crea", t0 + 2).unwrap();
        drop(f);

        let log = open(dir.path());
        assert_eq!(stored(&log), 2);
        assert_eq!(notices(&log.query(&q()).unwrap()), ["n1", "n2"]);
        assert_eq!(notices(&log.query(&user_q("u")).unwrap()), ["n1", "n2"]);
        assert_eq!(notices(&log.query_latest(&q()).unwrap()), ["n1", "n2"]);
        log.record_at(t0 + 3, created("n3", "u"));
        log.flush().unwrap();
        let all = log.query(&q()).unwrap();
        assert_eq!(notices(&all), ["n1", "n2", "n3"]);
        assert_eq!(all[2].seq, 2, "the cut line's seq is not counted");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(&whole), "{text}");
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(!text.contains("crea\""), "{text}");
    }

    #[test]
    fn lines_that_do_not_decode_are_skipped() {
        let t0 = hour_base();
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.record_at(t0, created("n1", "u"));
        log.close();
        let path = segment_path(dir.path(), &segment_files(dir.path())[0]);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"garbage\n\0\0\0\n\xff\xfe\"user\":\"u\"\n")
            .unwrap();
        writeln!(
            f,
            "{{\"at_ms\":{},\"seq\":50,\"event\":\"nonsense\",\"user\":\"u\"}}",
            t0 + 1
        )
        .unwrap();
        drop(f);
        let log = open(dir.path());
        log.record_at(t0 + 2, created("n2", "u"));
        log.flush().unwrap();
        assert_eq!(notices(&log.query(&q()).unwrap()), ["n1", "n2"]);
        assert_eq!(notices(&log.query(&user_q("u")).unwrap()), ["n1", "n2"]);
        let all = log.query(&q()).unwrap();
        assert!(all[1].seq > 50, "{all:?}");
    }

    #[test]
    fn full_channel_drops_without_blocking() {
        let t0 = base();
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            channel_capacity: 2,
            ..Default::default()
        };
        // The writer is not running yet, so nothing drains the channel.
        let log = AuditLog::open_paused(&dir.path().join("audit"), &cfg, LOCK_WAIT).unwrap();
        for i in 0..10 {
            log.record_at(t0 + i, created(&format!("n{i}"), "u"));
        }
        let stats = log.stats();
        assert_eq!(stats.recorded.load(Ordering::Relaxed), 2);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 8);
        log.start_writer().unwrap();
        log.flush().unwrap();
        assert_eq!(notices(&log.query(&q()).unwrap()), ["n0", "n1"]);
        assert_eq!(stats.written.load(Ordering::Relaxed), 2);

        // After close every clone drops.
        let other = log.clone();
        log.close();
        other.record(created("late", "u"));
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 9);
        assert!(matches!(other.flush(), Err(AuditError::Stopped)));
    }

    /// A batch is one channel message, but the capacity still counts events: a batch that does
    /// not fit is dropped whole, and what is written keeps the recording order.
    #[test]
    fn batches_count_against_the_capacity_by_event() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            channel_capacity: 5,
            ..Default::default()
        };
        let log = AuditLog::open_paused(&dir.path().join("audit"), &cfg, LOCK_WAIT).unwrap();
        let batch = |names: &[&str]| names.iter().map(|n| created(n, "u")).collect::<Vec<_>>();
        log.record_all(batch(&["a1", "a2", "a3"]));
        log.record_all(batch(&["b1", "b2", "b3"]));
        log.record_all(Vec::new());
        log.record(created("c1", "u"));
        log.record_all(batch(&["d1"]));
        let stats = log.stats();
        assert_eq!(stats.recorded.load(Ordering::Relaxed), 5);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 3, "b dropped whole");
        log.start_writer().unwrap();
        log.flush().unwrap();
        assert_eq!(
            notices(&log.query(&q()).unwrap()),
            ["a1", "a2", "a3", "c1", "d1"]
        );
        // Written events free their room.
        log.record_all(batch(&["e1", "e2", "e3", "e4", "e5"]));
        log.flush().unwrap();
        assert_eq!(stats.written.load(Ordering::Relaxed), 10);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn drop_warning_at_most_once_a_second() {
        let r = RateLimit::new(1000);
        assert!(r.allow(T0));
        assert!(!r.allow(T0));
        assert!(!r.allow(T0 + 999));
        assert!(r.allow(T0 + 1000));
        assert!(!r.allow(T0 + 1500));
        assert!(r.allow(T0 + 5000));
        // A clock step backwards does not warn again at once.
        assert!(!r.allow(T0));
    }

    #[test]
    fn second_open_of_the_same_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit");
        let _log = AuditLog::open(&path, AuditConfig::default()).unwrap();
        let err = AuditLog::open_paused(&path, &AuditConfig::default(), Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(err, AuditError::Locked { .. }), "{err:?}");
        assert!(err.to_string().contains("already open"), "{err}");
    }

    #[test]
    fn long_fields_are_cut_at_a_char_boundary() {
        let t0 = base();
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let mut e = created("n", "u");
        if let AuditEvent::Created { subject, .. } = &mut e {
            *subject = "é".repeat(MAX_FIELD_BYTES);
        }
        log.record_at(t0, e);
        log.flush().unwrap();
        let r = log.query(&q()).unwrap();
        let AuditEvent::Created { subject, .. } = &r[0].event else {
            panic!("{r:?}")
        };
        assert_eq!(subject.len(), MAX_FIELD_BYTES);
        assert!(subject.chars().all(|c| c == 'é'));
    }

    #[test]
    fn parse_since_forms() {
        let now = T0;
        assert_eq!(parse_since("90m", now).unwrap(), now - 90 * 60_000);
        assert_eq!(parse_since("2h", now).unwrap(), now - 7_200_000);
        assert_eq!(parse_since(" 7d ", now).unwrap(), now - 7 * DAY_MS);
        assert_eq!(parse_since("1w", now).unwrap(), now - 7 * DAY_MS);
        assert_eq!(parse_since("30s", now).unwrap(), now - 30_000);
        assert_eq!(parse_since("2026-11-22", now).unwrap(), 1_795_305_600_000);
        assert_eq!(
            parse_since("2026-11-22T10:00:00Z", now).unwrap(),
            1_795_305_600_000 + 10 * 3_600_000
        );
        assert_eq!(
            parse_since("2026-11-22T10:00:00+01:00", now).unwrap(),
            1_795_305_600_000 + 9 * 3_600_000
        );
        assert_eq!(
            parse_since("2026-11-22T10:00:00.250Z", now).unwrap(),
            1_795_305_600_000 + 10 * 3_600_000 + 250
        );
        assert_eq!(
            parse_since("2026-11-22 10:30", now).unwrap(),
            1_795_305_600_000 + 10 * 3_600_000 + 30 * 60_000
        );
    }

    #[test]
    fn parse_since_errors() {
        for bad in [
            "",
            "  ",
            "yesterday",
            "7x",
            "d",
            "-3d",
            "1.5h",
            "2026-13-01",
            "2026-02-30",
            "2026-11-22T25:00:00Z",
            "99999999999999999999d",
            "9223372036854775807d",
        ] {
            let e = parse_since(bad, T0).unwrap_err();
            assert!(matches!(e, AuditError::BadTime { .. }), "{bad:?}: {e:?}");
        }
        let e = parse_since("7x", T0).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"invalid time "7x": unknown unit (use s, m, h, d or w)"#
        );
        let long = "x".repeat(1000);
        let AuditError::BadTime { input, .. } = parse_since(&long, T0).unwrap_err() else {
            panic!()
        };
        assert_eq!(input.len(), 64);
    }

    #[test]
    fn format_record_lines() {
        let line = |at_ms, event| {
            format_record(&AuditRecord {
                at_ms,
                seq: 1,
                event,
            })
        };
        assert_eq!(
            line(
                1_795_305_600_123,
                AuditEvent::Created {
                    notice: "0123456789abcdef0123456789abcdef".into(),
                    user: "alice".into(),
                    queue_id: Some(QueueId::Stalwart(42)),
                    from: "bob@example.org".into(),
                    subject: "Lunch at 12?\nforged line".into(),
                }
            ),
            "2026-11-22T00:00:00.123Z created notice=0123456789abcdef0123456789abcdef \
             user=alice queue_id=42 from=bob@example.org subject=\"Lunch at 12?\\nforged line\""
        );
        assert_eq!(
            line(
                T0,
                AuditEvent::DeadLettered {
                    notice: "n1".into(),
                    user: None,
                    reason: "refused: number +8613800138000 barred".into(),
                }
            ),
            "2026-11-18T11:06:40.000Z dead-lettered notice=n1 user=- \
             reason=\"refused: number +861********00 barred\""
        );
        assert_eq!(
            line(
                T0,
                AuditEvent::SessionDown {
                    agent: "gsm1".into(),
                    addr: "192.168.100.200:7878".into(),
                    reason: "".into(),
                    sent: 3,
                    acked: 2,
                }
            ),
            "2026-11-18T11:06:40.000Z session-down agent=gsm1 addr=192.168.100.200:7878 \
             reason=\"\" sent=3 acked=2"
        );
        assert_eq!(
            line(
                T0,
                AuditEvent::Held {
                    notice: "n".into(),
                    user: "u".into(),
                    reason: "quiet-hours".into(),
                    until_ms: 1_795_305_600_000,
                }
            ),
            "2026-11-18T11:06:40.000Z held notice=n user=u reason=quiet-hours \
             until=2026-11-22T00:00:00Z"
        );
    }

    #[test]
    fn phone_masking() {
        assert_eq!(mask_phones("call 0612345678 now"), "call 061*****78 now");
        assert_eq!(mask_phones("+33612345678"), "+336******78");
        assert_eq!(mask_phones("+1234567"), "+123**67");
        assert_eq!(mask_phones("1234567 and 2026"), "1234567 and 2026");
        assert_eq!(mask_phones("é12345678é"), "é123***78é");
        assert_eq!(mask_phones(""), "");
    }

    /// Not a benchmark with assertions: prints how fast the writer keeps up.
    #[test]
    fn throughput_100k_events() {
        let t0 = base();
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            channel_capacity: 131_072,
            ..Default::default()
        };
        let log = AuditLog::open(&dir.path().join("audit"), cfg).unwrap();
        let n = 100_000u32;
        let start = Instant::now();
        for i in 0..n {
            log.record_at(
                t0 + i64::from(i),
                AuditEvent::Sent {
                    notice: format!("{:032x}", i),
                    user: Some(format!("user{}", i % 1000)),
                    agent: "gsm1".into(),
                },
            );
        }
        let queued = start.elapsed();
        log.flush().unwrap();
        let total = start.elapsed();
        let stats = log.stats();
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(stats.written.load(Ordering::Relaxed), u64::from(n));
        println!(
            "audit: {n} events recorded in {queued:?}, written and flushed in {total:?}: {:.0} events/s",
            f64::from(n) / total.as_secs_f64()
        );
        let u = log
            .query(&AuditQuery {
                user: Some("user7".into()),
                limit: MAX_QUERY_LIMIT,
                ..q()
            })
            .unwrap();
        assert_eq!(u.len(), 100);
    }

    /// The writer's sustained rate on 1,000,000 events (a notice's four events, 200 a
    /// millisecond), and how long queries over them take. Prints figures, asserts only results.
    /// Run it in release:
    /// `cargo test --release -p mailbell --lib audit::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore = "a benchmark: run in release with --ignored --nocapture"]
    fn bench_1m_events_and_queries() {
        let t0 = hour_base();
        let dir = tempfile::tempdir().unwrap();
        let cap = 65_536usize;
        let log = open_with(
            dir.path(),
            AuditConfig {
                channel_capacity: cap,
                ..Default::default()
            },
        );
        let stats = log.stats();
        let n = 1_000_000u64;
        let id = |k: u64| format!("{:032x}", k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let start = Instant::now();
        for i in 0..n {
            // Keep the channel from overflowing: the figure is the writer's, not the drop rate.
            while stats.recorded.load(Ordering::Relaxed) - stats.written.load(Ordering::Relaxed)
                > cap as u64 / 2
            {
                std::thread::yield_now();
            }
            let k = i / 4;
            let notice = id(k);
            let user = format!("user{}@example.com", k % 1000);
            let event = match i % 4 {
                0 => AuditEvent::Created {
                    notice,
                    user,
                    queue_id: Some(QueueId::Stalwart(k)),
                    from: "sender@example.org".into(),
                    subject: "Quarterly figures".into(),
                },
                1 => AuditEvent::Queued { notice, user },
                2 => AuditEvent::Sent {
                    notice,
                    user: Some(user),
                    agent: "gsm1".into(),
                },
                _ => AuditEvent::Acked {
                    notice,
                    user: Some(user),
                    agent: "gsm1".into(),
                },
            };
            log.record_at(t0 + (i / 200) as i64, event);
        }
        let queued = start.elapsed();
        log.flush().unwrap();
        let total = start.elapsed();
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(stats.written.load(Ordering::Relaxed), n);
        let bytes = stats.stored_bytes.load(Ordering::Relaxed);
        let mb = bytes as f64 / 1e6;
        println!(
            "audit write: {n} events recorded in {queued:.2?}, written and synced in {total:.2?}: \
             {:.0} events/s ({mb:.0} MB, {} bytes an event)",
            n as f64 / total.as_secs_f64(),
            bytes / n
        );

        let timed = |what: &str, q: &AuditQuery, latest: bool, expect: usize| {
            let start = Instant::now();
            let r = if latest {
                log.query_latest(q).unwrap()
            } else {
                log.query(q).unwrap()
            };
            let t = start.elapsed();
            assert_eq!(r.len(), expect, "{what}");
            println!(
                "audit query {what}: {} records in {t:.2?} ({:.2} s per GB of log)",
                r.len(),
                t.as_secs_f64() / (bytes as f64 / 1e9)
            );
        };
        let user = AuditQuery {
            user: Some("User7@example.com".into()),
            limit: MAX_QUERY_LIMIT,
            ..q()
        };
        timed("one user, all", &user, false, 1000);
        timed(
            "one user, latest 100",
            &AuditQuery { limit: 100, ..user },
            true,
            100,
        );
        let notice = AuditQuery {
            notice: Some(id(123_456).to_uppercase()),
            ..q()
        };
        timed("one notice", &notice, false, 4);
        timed("everything, first 1000", &q(), false, 1000);
        timed("everything, latest 1000", &q(), true, 1000);
        let window = AuditQuery {
            since_ms: Some(t0 + 2000),
            until_ms: Some(t0 + 2001),
            limit: MAX_QUERY_LIMIT,
            ..q()
        };
        timed("one millisecond", &window, false, 200);
    }
}
