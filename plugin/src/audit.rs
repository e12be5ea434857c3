//! The audit log: every state change of a notice (created, held, coalesced, dropped, queued,
//! sent, acknowledged, deferred, dead-lettered, requeued), every link session and every operator
//! action, kept for a retention period and queried by `mailbell log --user U --since T`.
//!
//! [`AuditLog::record`] is the hot path. It never blocks and never fails: it puts the event on a
//! bounded channel to one writer thread. When the channel is full the event is dropped, counted
//! in [`AuditStats::dropped`], and a warning is logged at most once a second. The writer drains
//! the channel in groups of up to [`MAX_BATCH`] events and writes them to its own sled store.
//!
//! **The audit log is not on the durability path of notices.** Nothing waits for it: sled
//! flushes it in the background every `flush_interval_ms`, so a crash loses the last interval of
//! events, and an overloaded writer loses events rather than slowing the MTA or the link down.
//! [`AuditLog::flush`] waits for everything recorded so far (tests, shutdown).
//!
//! Events are written with single inserts, not a `sled::Batch`: in sled 0.34 a batch takes a
//! process-wide write lock that waits for every flush in progress (in every sled store of the
//! process, the outbox's included), so audit batches would stall the outbox (and measured
//! slower, too). Single inserts are not atomic across the trees; a crash can leave a record
//! without its index entry (it still shows in queries without a user) and queries skip index
//! entries whose record is gone.
//!
//! Keys (one sled store, three trees):
//! ```text
//! log        at:8 seq:8                     -> event as JSON ({"event":"sent","notice":...})
//! by_user    lowercase(user)[..255] 0x00 at:8 seq:8 -> the notices it mentions, NUL-separated
//! meta       "count"                        -> records in `log`, u64be (approximate after a crash)
//! at = at_ms as u64 with the sign bit flipped, big-endian (sorts like the i64)
//! ```
//! `seq` comes from `sled::Db::generate_id` in the writer, so it is unique, increases in
//! channel order and keeps increasing across restarts. Index keys may be truncated or collide
//! (names containing NUL); queries check every record they fetch.
//!
//! Queries with a user read that user's index range. There is no notice index: notice ids are
//! random, so each entry lands at a random place in the tree, and that third insert per event
//! cost more than the other two together (about 11 µs against 7 + 4.5 µs per event, 100k
//! events on a busy 2-core machine), putting the writer below the 50k events/s it must
//! sustain. A query for a notice with a user filters the user's index entries by the notice ids
//! they carry, reading only the matches; a notice query without a user scans the time range (a
//! byte search before any JSON decoding) and gives up with [`AuditError::TooBroad`] after
//! [`MAX_SCAN`] records.
//!
//! Retention: records older than `retention_days` are deleted (with their index entries) by
//! [`AuditLog::prune`], which the writer also runs at start and then hourly, a chunk at a time
//! between event groups. Above `max_records` the oldest records go too, whatever their age.
//!
//! One process owns the store at a time (sled locks it); a second open waits up to two seconds
//! and then fails with [`AuditError::Locked`].

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use tracing::{error, info, warn};

/// Most events the writer takes off the channel before writing them.
pub const MAX_BATCH: usize = 4096;
/// Longest string field stored; longer ones are cut (at a character boundary) by the writer.
pub const MAX_FIELD_BYTES: usize = 1024;
/// Most records one query returns.
pub const MAX_QUERY_LIMIT: usize = 100_000;

const MAX_USER_KEY: usize = 255;
/// Most records a query without a user reads before giving up with [`AuditError::TooBroad`].
pub const MAX_SCAN: u64 = 5_000_000;
const LOCK_WAIT: Duration = Duration::from_secs(2);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
const PRUNE_CHUNK: usize = 1000;
const CACHE_BYTES: u64 = 64 << 20;
const MIN_FLUSH_MS: u64 = 10;
const DAY_MS: i64 = 86_400_000;
const COUNT_KEY: &[u8] = b"count";

/// Audit log errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    #[error("open audit log at {}: {error}", path.display())]
    Open { path: PathBuf, error: sled::Error },
    #[error("audit log at {} is already open (by this or another process)", path.display())]
    Locked { path: PathBuf },
    #[error("audit store: {0}")]
    Store(sled::Error),
    #[error("corrupt audit record under key {0}")]
    Corrupt(String),
    #[error("audit writer is not running")]
    Stopped,
    #[error("cannot start the audit writer: {0}")]
    Spawn(std::io::Error),
    #[error(
        "query read {scanned} records without finishing; give a user or a narrower time range"
    )]
    TooBroad { scanned: u64 },
    #[error("invalid time {input:?}: {reason}")]
    BadTime { input: String, reason: &'static str },
}

impl From<sled::Error> for AuditError {
    fn from(e: sled::Error) -> Self {
        AuditError::Store(e)
    }
}

/// One audited happening. `notice` is the notice's id: the 32 hex digits of its `NotifId`, or
/// the intake's record id before it has one.
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
        queue_id: Option<u64>,
        from: String,
        subject: String,
    },
    /// Held back: quiet hours, rate limit, awaiting delivery confirmation.
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
    /// Not sent: spam, duplicate, filtered, confirmation timeout with drop policy, ineligible.
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

    /// The mail user the event concerns, if known.
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
                from,
                subject,
                ..
            } => {
                f(notice);
                f(user);
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
    /// Records older than this many days are deleted; 0 keeps them (up to `max_records`).
    pub retention_days: u32,
    /// Hard cap on stored records; above it the oldest are deleted whatever their age.
    pub max_records: u64,
    /// Events waiting for the writer; beyond this `record` drops them.
    pub channel_capacity: usize,
    /// How often sled writes the log to disk (at least 10 ms).
    pub flush_interval_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: 90,
            max_records: 50_000_000,
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
    /// Events written to the store.
    pub written: AtomicU64,
    /// Events dropped because the channel was full or the writer had stopped.
    pub dropped: AtomicU64,
    /// Records deleted by retention or the record cap.
    pub pruned: AtomicU64,
    /// Store errors in the writer (each also logged, at most once a second).
    pub errors: AtomicU64,
    /// Records in the store now (approximate after a crash).
    pub stored: AtomicU64,
}

/// Which records a query returns. All given filters must match. `since_ms` is inclusive,
/// `until_ms` exclusive; `limit` is capped at [`MAX_QUERY_LIMIT`] (0 returns nothing).
/// Users and notices compare case-insensitively; a notice matches the events that
/// [mention](AuditEvent::mentions) it. A query with a user uses the user index; one without
/// reads the whole time range (see the module docs), so bound it with `since_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditQuery {
    pub user: Option<String>,
    pub notice: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub limit: usize,
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

enum Msg {
    Event { at_ms: i64, event: AuditEvent },
    Flush(mpsc::SyncSender<Result<(), sled::Error>>),
    Stop,
}

/// The audit log. Cheap to clone; the writer stops and the store is flushed when the last
/// clone is dropped, or at [`close`](AuditLog::close).
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
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
}

impl AuditLog {
    /// Opens (or creates) the store and starts the writer thread. Blocking (sled recovery,
    /// up to two seconds waiting for a predecessor's lock): call it at startup or through
    /// `spawn_blocking`.
    pub fn open(path: &Path, cfg: AuditConfig) -> Result<Self, AuditError> {
        let log = Self::open_paused(path, &cfg, LOCK_WAIT)?;
        log.start_writer()?;
        Ok(log)
    }

    /// Opens the store without starting the writer.
    fn open_paused(
        path: &Path,
        cfg: &AuditConfig,
        lock_wait: Duration,
    ) -> Result<Self, AuditError> {
        let give_up = Instant::now() + lock_wait;
        let db = loop {
            match sled::Config::new()
                .path(path)
                .mode(sled::Mode::HighThroughput)
                .cache_capacity(CACHE_BYTES)
                .flush_every_ms(Some(cfg.flush_interval_ms.max(MIN_FLUSH_MS)))
                .open()
            {
                Ok(db) => break db,
                // sled reports a held lock as an I/O error of kind Other with this text.
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    if Instant::now() >= give_up {
                        return Err(AuditError::Locked {
                            path: path.to_owned(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(error) => {
                    return Err(AuditError::Open {
                        path: path.to_owned(),
                        error,
                    })
                }
            }
        };
        let store = Store::new(db, cfg)?;
        info!(
            records = store.stats.stored.load(Ordering::Relaxed),
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
        let stats = &self.inner.store.stats;
        match self.inner.tx.try_send(Msg::Event { at_ms, event }) {
            Ok(()) => {
                stats.recorded.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let dropped = stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if self.inner.drop_warn.allow(now_ms()) {
                    let why = match e {
                        mpsc::TrySendError::Full(_) => "the writer is behind",
                        mpsc::TrySendError::Disconnected(_) => "the writer has stopped",
                    };
                    warn!(dropped, "audit events dropped: {why}");
                }
            }
        }
    }

    /// Records matching `q`, oldest first: the first `limit` of them.
    pub fn query(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, AuditError> {
        self.inner.store.query(q, false)
    }

    /// Records matching `q`, oldest first: the last (newest) `limit` of them.
    pub fn query_latest(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, AuditError> {
        let mut out = self.inner.store.query(q, true)?;
        out.reverse();
        Ok(out)
    }

    /// Deletes records older than the retention period (relative to `now_ms`), and the oldest
    /// beyond `max_records`, with their index entries. Returns how many went. Blocking.
    pub fn prune(&self, now_ms: i64) -> Result<u64, AuditError> {
        let mut total = 0;
        loop {
            let (n, done) = self.inner.store.prune_step(now_ms, PRUNE_CHUNK)?;
            total += n;
            if done {
                self.inner.store.save_count()?;
                return Ok(total);
            }
        }
    }

    /// Waits until every event recorded so far is written and flushed to disk; reports a
    /// write error the writer met since the last flush. Blocking.
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

    /// Writes what is pending, stops the writer and flushes, for every clone: later events
    /// are counted as dropped. Blocking.
    pub fn close(self) {
        self.inner.stop();
    }
}

impl Inner {
    fn start_writer(&self) -> Result<(), AuditError> {
        let Some(rx) = lock(&self.pending_rx).take() else {
            return Ok(());
        };
        let writer = Writer {
            store: self.store.clone(),
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
        if let Err(e) = self.store.save_count() {
            error!(error = %e, "audit log: saving the record count failed");
        }
        if let Err(e) = self.store.db.flush() {
            error!(error = %e, "audit log flush on close failed");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The sled side, shared by the handle (queries, prune) and the writer.
struct Store {
    db: sled::Db,
    log: sled::Tree,
    by_user: sled::Tree,
    meta: sled::Tree,
    retention_ms: Option<i64>,
    max_records: u64,
    /// Held during each prune step, so two pruners never count one deletion twice.
    prune_lock: Mutex<()>,
    stats: Arc<AuditStats>,
}

impl Store {
    fn new(db: sled::Db, cfg: &AuditConfig) -> Result<Self, AuditError> {
        let log = db.open_tree("log")?;
        let by_user = db.open_tree("by_user")?;
        let meta = db.open_tree("meta")?;
        let count = match meta.get(COUNT_KEY)? {
            Some(v) => {
                let b: [u8; 8] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| AuditError::Corrupt("meta/count".into()))?;
                u64::from_be_bytes(b)
            }
            None => log.len() as u64,
        };
        let stats = Arc::new(AuditStats::default());
        stats.stored.store(count, Ordering::Relaxed);
        Ok(Self {
            db,
            log,
            by_user,
            meta,
            retention_ms: (cfg.retention_days > 0)
                .then(|| i64::from(cfg.retention_days).saturating_mul(DAY_MS)),
            max_records: cfg.max_records,
            prune_lock: Mutex::new(()),
            stats,
        })
    }

    fn save_count(&self) -> Result<(), sled::Error> {
        let n = self.stats.stored.load(Ordering::Relaxed);
        self.meta.insert(COUNT_KEY, &n.to_be_bytes())?;
        Ok(())
    }

    /// Writes one event: the record, then its user index entry.
    fn write(&self, at_ms: i64, mut event: AuditEvent) -> Result<(), AuditError> {
        event.clamp(MAX_FIELD_BYTES);
        let seq = self.db.generate_id()?;
        let json = serde_json::to_vec(&event)
            .map_err(|e| AuditError::Corrupt(format!("cannot encode {}: {e}", event.name())))?;
        self.log.insert(log_key(at_ms, seq), json)?;
        self.stats.stored.fetch_add(1, Ordering::Relaxed);
        if let Some(key) = user_key(&event, at_ms, seq) {
            self.by_user.insert(key, notices_value(&event))?;
        }
        self.stats.written.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn query(&self, q: &AuditQuery, newest: bool) -> Result<Vec<AuditRecord>, AuditError> {
        let limit = q.limit.min(MAX_QUERY_LIMIT);
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        if let Some(u) = &q.until_ms {
            if q.since_ms.is_some_and(|s| s >= *u) {
                return Ok(out);
            }
        }
        let lo = ts_bytes(q.since_ms.unwrap_or(i64::MIN));
        let hi = q.until_ms.map(ts_bytes);
        let user = q.user.as_deref().map(str::to_lowercase);
        let notice = q.notice.as_deref();
        let keep = |r: &AuditRecord| {
            notice.is_none_or(|n| r.event.mentions(n))
                && user
                    .as_deref()
                    .is_none_or(|u| r.event.user().is_some_and(|ru| ru.to_lowercase() == u))
        };
        let (tree, prefix) = match &user {
            Some(u) => (&self.by_user, user_prefix(u)),
            None => (&self.log, Vec::new()),
        };
        let start = [&prefix[..], &lo[..], &[0u8; 8][..]].concat();
        let end = match hi {
            Some(hi) => Bound::Excluded([&prefix[..], &hi[..], &[0u8; 8][..]].concat()),
            None => Bound::Included([&prefix[..], &[0xffu8; 16][..]].concat()),
        };
        let range = tree.range((Bound::Included(start), end));
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if newest {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        let mut scanned = 0u64;
        for kv in iter {
            let (k, v) = kv?;
            let record = if user.is_some() {
                // The index entry names the record's notices: skip the others unread.
                if notice.is_some_and(|n| {
                    !v.split(|b| *b == 0)
                        .any(|m| m.eq_ignore_ascii_case(n.as_bytes()))
                }) {
                    continue;
                }
                let Some(lk) = k.len().checked_sub(16).and_then(|i| k.get(i..)) else {
                    return Err(corrupt(&k));
                };
                match self.log.get(lk)? {
                    Some(v) => decode(lk, &v)?,
                    // The record was pruned between the index read and this one, or a crash
                    // left the index entry behind.
                    None => continue,
                }
            } else {
                scanned += 1;
                if scanned > MAX_SCAN {
                    return Err(AuditError::TooBroad { scanned: MAX_SCAN });
                }
                if notice.is_some_and(|n| !may_mention(&v, n)) {
                    continue;
                }
                decode(&k, &v)?
            };
            if keep(&record) {
                out.push(record);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Deletes up to `max` records that are past retention or over the cap, oldest first.
    /// Returns how many went and whether nothing more is due.
    fn prune_step(&self, now_ms: i64, max: usize) -> Result<(u64, bool), AuditError> {
        let _guard = lock(&self.prune_lock);
        let cutoff = self.retention_ms.map(|r| now_ms.saturating_sub(r));
        let over = self
            .stats
            .stored
            .load(Ordering::Relaxed)
            .saturating_sub(self.max_records);
        let mut removed = 0u64;
        for kv in self.log.iter() {
            let (k, v) = kv?;
            let (at_ms, seq) = parse_log_key(&k).ok_or_else(|| corrupt(&k))?;
            let expired = cutoff.is_some_and(|c| at_ms < c);
            if !expired && removed >= over {
                return Ok((removed, true));
            }
            if removed as usize >= max {
                return Ok((removed, false));
            }
            match serde_json::from_slice::<AuditEvent>(&v) {
                Ok(event) => {
                    if let Some(key) = user_key(&event, at_ms, seq) {
                        self.by_user.remove(key)?;
                    }
                }
                Err(e) => {
                    warn!(key = %hex::encode(&k), error = %e, "pruning an unreadable audit record; its index entry stays")
                }
            }
            if self.log.remove(&k)?.is_some() {
                let _ = self
                    .stats
                    .stored
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_sub(1))
                    });
                self.stats.pruned.fetch_add(1, Ordering::Relaxed);
                removed += 1;
            }
        }
        Ok((removed, true))
    }

    fn over_cap(&self) -> bool {
        self.stats.stored.load(Ordering::Relaxed) > self.max_records
    }
}

/// The user index key of a record: `user_prefix(user) at:8 seq:8`.
fn user_key(event: &AuditEvent, at_ms: i64, seq: u64) -> Option<Vec<u8>> {
    let user = event.user()?;
    let mut key = user_prefix(&user.to_lowercase());
    key.extend_from_slice(&log_key(at_ms, seq));
    Some(key)
}

/// The lowercase user name cut to [`MAX_USER_KEY`] bytes, then the NUL separator.
fn user_prefix(user: &str) -> Vec<u8> {
    let lower = user.to_lowercase();
    let bytes = lower.as_bytes();
    let mut part = bytes.get(..MAX_USER_KEY).unwrap_or(bytes).to_vec();
    part.push(0);
    part
}

/// The user index value: the notices the event mentions, NUL-separated.
fn notices_value(event: &AuditEvent) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, n) in event.notices().enumerate() {
        if i > 0 {
            v.push(0);
        }
        v.extend_from_slice(n.as_bytes());
    }
    v
}

/// Whether a record's JSON may mention notice `n` (case-insensitive substring test, before
/// decoding). Always true for ids JSON would escape.
fn may_mention(json: &[u8], n: &str) -> bool {
    let n = n.as_bytes();
    if n.is_empty() || n.iter().any(|b| *b < 0x20 || *b == b'"' || *b == b'\\') {
        return true;
    }
    json.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

/// Writes events in channel order; runs the periodic prune between groups.
struct Writer {
    store: Arc<Store>,
}

impl Writer {
    fn run(self, rx: mpsc::Receiver<Msg>) {
        let store = &self.store;
        let error_warn = RateLimit::new(1000);
        let mut last_error: Option<sled::Error> = None;
        let mut next_prune = Instant::now();
        let mut pruning = false;
        loop {
            let wait = if pruning {
                Duration::ZERO
            } else {
                next_prune.saturating_duration_since(Instant::now())
            };
            let mut msg = match rx.recv_timeout(wait) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut stop = false;
            let mut wrote = false;
            let mut taken = 0usize;
            while let Some(m) = msg.take() {
                match m {
                    Msg::Event { at_ms, event } => {
                        wrote = true;
                        if let Err(e) = store.write(at_ms, event) {
                            store.stats.errors.fetch_add(1, Ordering::Relaxed);
                            if error_warn.allow(now_ms()) {
                                error!(error = %e, "audit log write failed");
                            }
                            if let AuditError::Store(e) = e {
                                last_error.get_or_insert(e);
                            }
                        }
                    }
                    Msg::Flush(reply) => {
                        let result = match last_error.take() {
                            Some(e) => Err(e),
                            None => store.save_count().and_then(|()| store.db.flush().map(drop)),
                        };
                        let _ = reply.send(result);
                    }
                    Msg::Stop => stop = true,
                }
                taken += 1;
                if stop || taken >= MAX_BATCH {
                    break;
                }
                msg = rx.try_recv().ok();
            }
            if wrote && store.over_cap() {
                pruning = true;
            }
            if wrote {
                if let Err(e) = store.save_count() {
                    if error_warn.allow(now_ms()) {
                        error!(error = %e, "audit log: saving the record count failed");
                    }
                }
            }
            if stop {
                break;
            }
            if Instant::now() >= next_prune {
                pruning = true;
                next_prune = Instant::now() + PRUNE_EVERY;
            }
            if pruning {
                match store.prune_step(now_ms(), PRUNE_CHUNK) {
                    Ok((_, done)) => pruning = !done,
                    Err(e) => {
                        pruning = false;
                        store.stats.errors.fetch_add(1, Ordering::Relaxed);
                        error!(error = %e, "audit log prune failed");
                    }
                }
                if !pruning {
                    if let Err(e) = store.save_count() {
                        error!(error = %e, "audit log: saving the record count failed");
                    }
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

fn ts_bytes(at_ms: i64) -> [u8; 8] {
    ((at_ms as u64) ^ (1 << 63)).to_be_bytes()
}

fn log_key(at_ms: i64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&ts_bytes(at_ms));
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn parse_log_key(k: &[u8]) -> Option<(i64, u64)> {
    let at: [u8; 8] = k.get(..8)?.try_into().ok()?;
    let seq: [u8; 8] = k.get(8..16)?.try_into().ok()?;
    if k.len() != 16 {
        return None;
    }
    Some((
        (u64::from_be_bytes(at) ^ (1 << 63)) as i64,
        u64::from_be_bytes(seq),
    ))
}

fn decode(key: &[u8], value: &[u8]) -> Result<AuditRecord, AuditError> {
    let (at_ms, seq) = parse_log_key(key).ok_or_else(|| corrupt(key))?;
    let event = serde_json::from_slice(value).map_err(|_| corrupt(key))?;
    Ok(AuditRecord { at_ms, seq, event })
}

fn corrupt(key: &[u8]) -> AuditError {
    AuditError::Corrupt(hex::encode(key))
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
                let _ = write!(line, " queue_id={q}");
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

    /// A time well in the future, so the writer's own prune (by the real clock) leaves the
    /// test's records alone.
    fn base() -> i64 {
        now_ms() + 1000 * DAY_MS
    }

    fn created(n: &str, user: &str) -> AuditEvent {
        AuditEvent::Created {
            notice: n.into(),
            user: user.into(),
            queue_id: Some(7),
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

    fn q() -> AuditQuery {
        AuditQuery::default()
    }

    fn notices(rs: &[AuditRecord]) -> Vec<String> {
        rs.iter()
            .map(|r| r.event.notice().unwrap_or("-").to_owned())
            .collect()
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
    fn prune_removes_records_and_index_entries() {
        let t0 = base();
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            retention_days: 1,
            ..Default::default()
        };
        let log = AuditLog::open(&dir.path().join("audit"), cfg).unwrap();
        let now = t0 + 10 * DAY_MS;
        for i in 0..2500 {
            log.record_at(t0 + i, created(&format!("old{i}"), "u"));
        }
        log.record_at(now - DAY_MS - 1, created("just-old", "u"));
        log.record_at(now - DAY_MS, created("kept", "u"));
        log.record_at(now, sent("kept", None));
        log.flush().unwrap();
        assert_eq!(log.stats().stored.load(Ordering::Relaxed), 2503);

        assert_eq!(log.prune(now).unwrap(), 2501);
        let s = &log.inner.store;
        assert_eq!(s.log.len(), 2);
        assert_eq!(s.by_user.len(), 1, "only kept's created has a user");
        assert_eq!(log.stats().pruned.load(Ordering::Relaxed), 2501);
        assert_eq!(log.stats().stored.load(Ordering::Relaxed), 2);
        assert_eq!(notices(&log.query(&q()).unwrap()), ["kept", "kept"]);
        assert_eq!(log.prune(now).unwrap(), 0);
    }

    #[test]
    fn record_cap_prunes_oldest() {
        let t0 = base();
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            retention_days: 0,
            max_records: 3,
            ..Default::default()
        };
        let log = AuditLog::open(&dir.path().join("audit"), cfg).unwrap();
        for i in 0..5 {
            log.record_at(t0 + i, created(&format!("n{i}"), "u"));
        }
        log.flush().unwrap();
        // The writer may already have pruned; prune is idempotent.
        log.prune(t0 + 100 * DAY_MS).unwrap();
        assert_eq!(notices(&log.query(&q()).unwrap()), ["n2", "n3", "n4"]);
        assert_eq!(log.inner.store.by_user.len(), 3);
        assert_eq!(log.stats().pruned.load(Ordering::Relaxed), 2);
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
                    queue_id: Some(42),
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
}
