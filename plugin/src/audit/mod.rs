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
//!
//! # Layout
//!
//! This file: the events, the handle ([`AuditLog`]) and its configuration; `segments`: the
//! files, the manifest and the state shared by the writer and the queries; `writer`: the
//! writer and `audit-sync` threads; `query`: the scan behind every query; `format`:
//! `--since` times and the one-line text form.

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

mod format;
mod query;
mod segments;
mod writer;

#[cfg(test)]
use format::mask_phones;
pub use format::{format_record, parse_since};
use segments::*;
use writer::*;

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
    /// A billing notice was made (the accounting run or an operator decided it): `kind` is
    /// "arrears" or "warning", amounts as decimal text. Followed by `queued` or `dropped`.
    BillingNotice {
        notice: String,
        user: String,
        kind: String,
        balance: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        threshold: Option<String>,
    },
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
    /// The SMTP-time blocklist refused a source: `stage` is connect, helo or mail; `mta` is
    /// stalwart or milter; `matched` is the address, HELO name or sender domain that matched.
    Refused {
        mta: String,
        stage: String,
        client_ip: String,
        matched: String,
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
            AuditEvent::BillingNotice { .. } => "billing-notice",
            AuditEvent::Sent { .. } => "sent",
            AuditEvent::Acked { .. } => "acked",
            AuditEvent::Deferred { .. } => "deferred",
            AuditEvent::DeadLettered { .. } => "dead-lettered",
            AuditEvent::Requeued { .. } => "requeued",
            AuditEvent::SessionUp { .. } => "session-up",
            AuditEvent::SessionDown { .. } => "session-down",
            AuditEvent::ConnectFailed { .. } => "connect-failed",
            AuditEvent::Admin { .. } => "admin",
            AuditEvent::Refused { .. } => "refused",
        }
    }

    /// The mail user the event concerns, if known (lowercased, once stored).
    pub fn user(&self) -> Option<&str> {
        match self {
            AuditEvent::Created { user, .. }
            | AuditEvent::Held { user, .. }
            | AuditEvent::Coalesced { user, .. }
            | AuditEvent::Dropped { user, .. }
            | AuditEvent::Queued { user, .. }
            | AuditEvent::BillingNotice { user, .. } => Some(user),
            AuditEvent::Sent { user, .. }
            | AuditEvent::Acked { user, .. }
            | AuditEvent::Deferred { user, .. }
            | AuditEvent::DeadLettered { user, .. } => user.as_deref(),
            AuditEvent::Requeued { .. }
            | AuditEvent::SessionUp { .. }
            | AuditEvent::SessionDown { .. }
            | AuditEvent::ConnectFailed { .. }
            | AuditEvent::Admin { .. }
            | AuditEvent::Refused { .. } => None,
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
            | AuditEvent::BillingNotice { notice, .. }
            | AuditEvent::Sent { notice, .. }
            | AuditEvent::Acked { notice, .. }
            | AuditEvent::Deferred { notice, .. }
            | AuditEvent::DeadLettered { notice, .. }
            | AuditEvent::Requeued { notice, .. } => Some(notice),
            AuditEvent::SessionUp { .. }
            | AuditEvent::SessionDown { .. }
            | AuditEvent::ConnectFailed { .. }
            | AuditEvent::Admin { .. }
            | AuditEvent::Refused { .. } => None,
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
            AuditEvent::BillingNotice {
                notice,
                user,
                kind,
                balance,
                threshold,
            } => {
                f(notice);
                f(user);
                f(kind);
                f(balance);
                threshold.iter_mut().for_each(&mut *f);
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
            AuditEvent::Refused {
                mta,
                stage,
                client_ip,
                matched,
            } => {
                f(mta);
                f(stage);
                f(client_ip);
                f(matched);
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
            | AuditEvent::Queued { user, .. }
            | AuditEvent::BillingNotice { user, .. } => Some(user),
            AuditEvent::Sent { user, .. }
            | AuditEvent::Acked { user, .. }
            | AuditEvent::Deferred { user, .. }
            | AuditEvent::DeadLettered { user, .. } => user.as_mut(),
            AuditEvent::Requeued { .. }
            | AuditEvent::SessionUp { .. }
            | AuditEvent::SessionDown { .. }
            | AuditEvent::ConnectFailed { .. }
            | AuditEvent::Admin { .. }
            | AuditEvent::Refused { .. } => None,
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
