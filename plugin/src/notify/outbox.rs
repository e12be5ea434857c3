//! The mail host's durable outbox (sled): notices waiting for the GSM agent, the ones it asked
//! us to retry later, and the ones it refused for good (dead letters).
//!
//! Every enqueue goes through one committer thread that applies all pending requests as one
//! atomic sled batch and makes it durable once (group commit): the batch is appended to the
//! outbox's write-ahead journal and one `fdatasync` covers every notice that arrived
//! meanwhile, from every MTA connection ([`crate::notify::journal`]; sled itself is flushed at
//! checkpoints, every second). [`Outbox::enqueue`] returns only after that, so a notice the
//! MTA was told about survives a crash; a store error reaches the caller, which tempfails the
//! MTA. A second thread (`outbox-apply`) then puts the commit into sled while the next one is
//! being synced; the readers (`ready`, `list`, `staged`, …) first wait for every commit
//! answered before they were called, so a caller always reads what it was told is durable.
//!
//! The link client ([`mailbell_link::net::run_client`]) reads the outbox through the
//! [`mailbell_link::net::Outbox`] trait. Its writes (ack, retry later, dead letter) are
//! journaled but **not synced**: after a crash they may be lost, which only means the notice is sent again and the
//! agent, which de-duplicates by id, acknowledges it again (or refuses it again). Deleting
//! acknowledged notices is handed to the committer thread, which deletes them in bulk, so the
//! link client never waits for sled on an ACK; until then `ready` skips them.
//!
//! Keys (one tree, prefixed):
//! ```text
//! q <seq:u64be>                  queued notices of one group commit -> group
//! d <not_before_ms:u64be> <seq>  deferred by a retry-later NACK     -> record
//! x <seq:u64be>                  dead letter                        -> dead_at_ms:i64be reason_len:u16be reason record
//! s <seq:u64be>                  staged intake record               -> staged
//! group  = ver:u8(2) count:u32be { seq:u64be len:u32be record }*count   (seqs rising, the first = the key's)
//! record = ver:u8(1) enqueued_at_ms:i64be attempts:u16be id:16 reason_len:u16be reason payload
//! staged = ver:u8(1) notices:u32be opaque       (opaque: the intake's encoding; a value that
//!          does not start with 1, written before the count, is all opaque and counts as one)
//! ```
//! Sequence numbers come from `sled::Db::generate_id`, which rises across restarts, and
//! `open` moves it past every number in the store after the journal replay. sled makes its
//! counter durable only when sled is flushed (its promise: a crash loses no number that data
//! sled kept uses), but the journal keeps commits sled never flushed, so after a crash the
//! counter can hand out again numbers that replayed commits hold: a notice queued under a
//! number below the link client's cursor was not offered until the next session, one queued
//! under a replayed group's key replaced that group, and a staged record another one.
//!
//! Groups: the notices a group commit queues are **one** sled value (up to 256 notices) under
//! the first one's sequence number, not one value each. sled copies a leaf for every insert, so a milter
//! message with five notices cost five inserts, the largest CPU cost of the intake after the
//! protocol itself (docs/benchmarks.md); one insert per commit costs a tenth of that. Commits
//! take sequence numbers in order, so groups cover disjoint ranges: the group holding `seq` is
//! the last `q` key at or below it. An ACK, a retry-later, a dead letter or an expiry takes
//! single members out, rewriting the group without them (or deleting it once empty), under a
//! lock that makes these read-modify-writes one at a time; the link client's ACKs are applied
//! in bulk, so a group is usually deleted whole. A `q` value that is a bare record (stores
//! written before groups) is a group of one.
//!
//! Id index: the link client only ever acknowledges, defers or dead-letters ids that `ready`
//! handed to it, so `ready` records each id's sequence number in memory and `acked` looks it up
//! there instead of scanning. The index holds at most the queue's depth and is rebuilt as items
//! are handed out again after a restart. (A persistent id index would double the sled writes
//! per notice; at 5-10 µs per sled write that was the largest cost on the sender, see
//! docs/benchmarks.md.) Notification ids are assigned once at intake and must be unique.
//!
//! Retry later: the client asks for items *after* the last sequence number it sent, so a
//! deferred notice cannot keep its old place. It moves to the `d` range, ordered by due time.
//! Each [`ready`](mailbell_link::net::Outbox::ready) call first promotes the deferred notices
//! that are due back into `q` under a *new* sequence number, so they come after the client's
//! cursor and are sent next. The client calls `ready` at least once a second while connected,
//! so a due notice waits at most about a second.
//!
//! `ready` only offers sequence numbers up to the last durable group commit, so a notice is
//! normally never sent to the agent before it is durable here. (A promotion racing a group
//! commit can expose that commit's notices a moment early; if that commit then fails, a notice
//! whose enqueue reported an error may still be delivered, and the MTA's retry delivers it
//! twice. Duplicates are the failure mode we accept; losses are not.)
//!
//! Expiry: a notice still queued `max_age` (default a day) after it was enqueued is moved to
//! the dead letters by `ready` instead of being sent (`mailbell queue retry` can requeue it).
//!
//! Staging: the intake keeps arrivals that are not notices yet (waiting for Stalwart's delivery
//! confirmation, held by quiet hours or a rate limit) in the same store, as opaque records in
//! the `s` range (sequence numbers from [`Outbox::reserve_seq`]). [`Outbox::settle`] writes,
//! rewrites or deletes staged records and queues the notices made from them in **one** atomic
//! batch, in the same group commit as `enqueue` (one fsync shared by every MTA connection),
//! flushed before it answers: a crash either keeps the staged records or the notices, never
//! both and never neither, so each arrival becomes a notice exactly once.
//!
//! Depth: `[outbox] max_depth` bounds the notices held for the agent, counted in one atomic
//! (`held`) that every change keeps exact, never by a scan: queued notices (ready and
//! deferred), plus the notices each staged record stands for (its stored `notices`: entries
//! waiting for a confirmation or held), plus the room [`Outbox::admit`] has given arrivals
//! whose commit is still under way. An arrival takes its room with `admit` before anything is
//! written, as a whole or not at all; the commit that records it gives the room back as it
//! adds what it really wrote (a pipelined next round therefore sees the notices of the
//! previous one, committed or not). ACKs, expiry and dead letters take notices out; settling
//! staged records into notices changes nothing or frees room (coalescing, drops). Dead
//! letters are not counted: they are not live work, only the operator removes them, and
//! counting them would let old refusals stop the mail. `open` recounts from the store after
//! the journal replay.
//!
//! One process owns the store at a time (sled locks it); a second open fails with
//! [`OutboxError::Locked`].

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mailbell_link::durable::{open_waiting, OpenWaiting};
use mailbell_link::net::{OutItem, Outbox as LinkOutbox, StoreError};
use mailbell_link::notification::PayloadError;
use mailbell_link::{NotifId, Notification};

use crate::notify::journal::{Apply, Journal, Ops};
use tokio::sync::{oneshot, Notify};
use tracing::{debug, error, info, warn};

/// Outbox errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    #[error("open outbox at {}: {error}", path.display())]
    Open { path: PathBuf, error: sled::Error },
    #[error("outbox at {} is already open (by this or another process)", path.display())]
    Locked { path: PathBuf },
    #[error("outbox store: {0}")]
    Store(sled::Error),
    #[error("outbox committer is not running")]
    Stopped,
    /// Taking the notices would put more than `[outbox] max_depth` in the outbox.
    #[error("outbox full ({held} notices held, limit {limit})")]
    Full { held: u64, limit: u64 },
    #[error("cannot encode notification {id}: {error}")]
    Encode { id: NotifId, error: PayloadError },
    #[error("corrupt outbox record under key {0}")]
    Corrupt(String),
    #[error("cannot start the outbox committer: {0}")]
    Spawn(std::io::Error),
}

impl From<sled::Error> for OutboxError {
    fn from(e: sled::Error) -> Self {
        OutboxError::Store(e)
    }
}

/// Milliseconds since the Unix epoch; substituted in tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock as a [`Clock`].
pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    })
}

/// Tunables.
#[derive(Clone)]
pub struct OutboxConfig {
    /// Most notices the outbox holds for the agent: queued (ready and deferred) plus the ones
    /// staged records stand for (waiting for a delivery confirmation, held by quiet hours or a
    /// rate limit), plus room [`Outbox::admit`] gave arrivals whose commit is still under
    /// way. Dead letters do not count. An arrival that would pass it is refused whole with
    /// [`OutboxError::Full`], so the MTA tempfails instead of the disk filling up.
    pub max_depth: u64,
    /// Notices not delivered within this long are moved to the dead letters as expired: an
    /// arrival notice a day late is noise, and the agent remembers ids for de-duplication only
    /// for a limited time (a week by default), so a much older resend could be sent twice.
    pub max_age: Duration,
    /// How long `open` waits for a store another handle still holds.
    pub lock_wait: Duration,
    /// Capacity of the channel to the committer, in requests.
    pub channel_capacity: usize,
    /// Most requests folded into one group commit.
    pub max_batch_requests: usize,
    pub clock: Clock,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_depth: 1_000_000,
            max_age: Duration::from_secs(24 * 3600),
            lock_wait: Duration::from_secs(2),
            channel_capacity: 4096,
            max_batch_requests: 1024,
            clock: system_clock(),
        }
    }
}

impl std::fmt::Debug for OutboxConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxConfig")
            .field("max_depth", &self.max_depth)
            .field("max_age", &self.max_age)
            .field("lock_wait", &self.lock_wait)
            .field("channel_capacity", &self.channel_capacity)
            .field("max_batch_requests", &self.max_batch_requests)
            .finish_non_exhaustive()
    }
}

/// Counters for metrics and status.
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Group commits, each ending in one journal `fdatasync`.
    pub commits: AtomicU64,
    /// Synced writes of any kind (group commits, admin changes, close).
    pub flushes: AtomicU64,
    pub enqueued: AtomicU64,
    pub acked: AtomicU64,
    pub deferred: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Dead letters currently held.
    pub dead: AtomicU64,
    /// Staged intake records currently held.
    pub staged: AtomicU64,
    /// Notices the staged records stand for (see [`StagedRecord::notices`]).
    pub staged_notices: AtomicU64,
    /// Time group commits spent applying their batch to sled, and appending it to the
    /// journal with its `fdatasync`, in microseconds.
    pub commit_apply_us: AtomicU64,
    pub commit_flush_us: AtomicU64,
}

/// A queued notice, as `mailbell queue list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedItem {
    pub seq: u64,
    pub id: NotifId,
    pub enqueued_at_ms: i64,
    /// Retry-later NACKs received so far.
    pub attempts: u16,
    /// Set while deferred by a retry-later NACK: not offered before this time.
    pub not_before_ms: Option<i64>,
    /// The reason of the last retry-later NACK (empty if none).
    pub last_reason: String,
    /// The encoded notification (raw: the CLI masks the phone number).
    pub payload: Vec<u8>,
}

impl QueuedItem {
    /// The decoded notice.
    pub fn notification(&self) -> Result<Notification, PayloadError> {
        Notification::decode_payload(self.id, &self.payload)
    }
}

/// A notice the agent refused for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub seq: u64,
    pub id: NotifId,
    pub dead_at_ms: i64,
    pub reason: String,
    pub enqueued_at_ms: i64,
    pub attempts: u16,
    pub payload: Vec<u8>,
}

impl DeadLetter {
    /// The decoded notice.
    pub fn notification(&self) -> Result<Notification, PayloadError> {
        Notification::decode_payload(self.id, &self.payload)
    }
}

/// Which dead letters [`Outbox::retry_dead`] puts back in the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Select {
    All,
    Id(NotifId),
}

const Q: u8 = b'q';
const D: u8 = b'd';
const X: u8 = b'x';
const S: u8 = b's';

/// One staged record: an arrival (or part of one) that is not all notices yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedRecord {
    /// From [`Outbox::reserve_seq`].
    pub seq: u64,
    /// How many notices the record stands for (at most: the intake's entries not yet notified
    /// or dropped); they count against `max_depth` while the record is held. A record written
    /// before the count was stored reads as one.
    pub notices: u32,
    /// The intake's encoding.
    pub value: Vec<u8>,
}

/// One atomic change of staged records plus the notices made from them; see [`Outbox::settle`].
#[derive(Debug, Default)]
pub struct Settle {
    /// New staged records.
    pub insert: Vec<StagedRecord>,
    /// Staged records to delete.
    pub remove: Vec<u64>,
    /// Staged records to replace.
    pub rewrite: Vec<StagedRecord>,
    /// Notices to queue.
    pub enqueue: Vec<Notification>,
    /// The room [`Outbox::admit`] gave the arrivals this change records; the commit gives it
    /// back as it counts what it wrote.
    pub admitted: Admission,
    /// Run by the committer once the change is durable, before its notices can be offered
    /// to the link; dropped unrun if it is not written.
    pub on_durable: Option<OnDurable>,
}

/// Work that must happen after a [`Settle`] is durable and before anything can see its
/// notices: the intake records its audit events (`created` … `queued`) here, so that they
/// always come before the link's (`sent`, `acked`). It runs on the committer thread: it must
/// not block.
pub struct OnDurable(Box<dyn FnOnce() + Send>);

impl OnDurable {
    pub fn new(f: impl FnOnce() + Send + 'static) -> Self {
        Self(Box::new(f))
    }

    fn run(self) {
        (self.0)()
    }
}

impl std::fmt::Debug for OnDurable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnDurable")
    }
}

/// Room under `max_depth` for notices not committed yet, from [`Outbox::admit`]. The commit
/// it is handed to gives it back once it has counted what it wrote; dropped any other way (a
/// refused or failed commit, an arrival that creates nothing) it gives the room back at once.
#[derive(Default)]
#[must_use = "dropping an admission gives its room back"]
pub struct Admission {
    shared: Option<Arc<Shared>>,
    notices: u64,
}

impl Admission {
    /// The notices it holds room for.
    pub fn notices(&self) -> u64 {
        self.notices
    }

    /// Takes `other`'s room into this one (both from the same outbox).
    pub fn merge(&mut self, mut other: Admission) {
        if self.shared.is_none() {
            self.shared = other.shared.take();
        }
        self.notices += std::mem::take(&mut other.notices);
    }

    /// The room, for a commit that counts its notices instead; nothing is given back on drop.
    fn consume(&mut self) -> u64 {
        std::mem::take(&mut self.notices)
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let (Some(shared), n @ 1..) = (&self.shared, self.notices) {
            shared.unhold(n);
        }
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("notices", &self.notices)
            .finish_non_exhaustive()
    }
}

impl Settle {
    pub fn is_empty(&self) -> bool {
        self.insert.is_empty()
            && self.remove.is_empty()
            && self.rewrite.is_empty()
            && self.enqueue.is_empty()
    }
}

/// First byte of a staged value that carries its notice count.
const STAGED_VERSION: u8 = 1;
const STAGED_HEAD: usize = 1 + 4;

fn encode_staged(notices: u32, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(STAGED_HEAD + value.len());
    v.push(STAGED_VERSION);
    v.extend_from_slice(&notices.to_be_bytes());
    v.extend_from_slice(value);
    v
}

/// The notice count and the intake's value of a stored staged value; one written before the
/// count (the intake's JSON, starting with `{`) is all value and counts as one notice.
fn decode_staged(v: &[u8]) -> (u32, &[u8]) {
    match (v.first(), v.get(1..STAGED_HEAD), v.get(STAGED_HEAD..)) {
        (Some(&STAGED_VERSION), Some(n), Some(rest)) => {
            (u32::from_be_bytes(n.try_into().unwrap_or_default()), rest)
        }
        _ => (1, v),
    }
}

fn seq_key(prefix: u8, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn deferred_key(not_before_ms: i64, seq: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = D;
    k[1..9].copy_from_slice(&u64::try_from(not_before_ms).unwrap_or(0).to_be_bytes());
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

/// The sequence number in a q, x or d key.
fn seq_of(k: &[u8]) -> Option<u64> {
    match k.first()? {
        &Q | &X | &S if k.len() == 9 => be_u64(&k[1..]),
        &D if k.len() == 17 => be_u64(&k[9..]),
        _ => None,
    }
}

/// The due time in a d key.
fn not_before_of(k: &[u8]) -> Option<i64> {
    let v = be_u64(k.get(1..9)?)?;
    i64::try_from(v).ok()
}

fn corrupt(k: &[u8]) -> OutboxError {
    OutboxError::Corrupt(hex::encode(k))
}

/// First byte of a `q` value holding a group; a single record (a store written before groups)
/// starts with its own version, 1.
const GROUP_VERSION: u8 = 2;
/// Per member: sequence number and record length.
const MEMBER_HEAD: usize = 8 + 4;
/// Most notices in one group (about 80 KB). A commit that queues more (a requeue of many dead
/// letters, a big `enqueue`) makes several groups, so taking one member out never rewrites
/// megabytes.
const GROUP_MAX: usize = 256;

/// The members of a `q` value, `(sequence number, record)` in sequence order. `key_seq` is
/// the key's sequence number: a single record is its only member.
fn decode_group(key_seq: u64, v: &[u8]) -> Option<Vec<(u64, &[u8])>> {
    match *v.first()? {
        1 => Some(vec![(key_seq, v)]),
        GROUP_VERSION => {
            let n = usize::try_from(u32::from_be_bytes(v.get(1..5)?.try_into().ok()?)).ok()?;
            let mut out = Vec::with_capacity(n.min(v.len() / MEMBER_HEAD));
            let mut at = 5;
            let mut last = None;
            for _ in 0..n {
                let seq = be_u64(v.get(at..at + 8)?)?;
                let len = usize::try_from(u32::from_be_bytes(
                    v.get(at + 8..at + MEMBER_HEAD)?.try_into().ok()?,
                ))
                .ok()?;
                let record = v.get(at + MEMBER_HEAD..(at + MEMBER_HEAD).checked_add(len)?)?;
                // In order, none below the key: groups cover disjoint ranges of the queue.
                if seq < key_seq || last.is_some_and(|l| seq <= l) {
                    return None;
                }
                last = Some(seq);
                out.push((seq, record));
                at += MEMBER_HEAD + len;
            }
            (at == v.len()).then_some(out)
        }
        _ => None,
    }
}

/// The members of the `q` entry `k` → `v`; a damaged entry is an error naming its key.
fn group_members<'a>(k: &[u8], v: &'a [u8]) -> Result<Vec<(u64, &'a [u8])>, OutboxError> {
    seq_of(k)
        .and_then(|key_seq| decode_group(key_seq, v))
        .ok_or_else(|| corrupt(k))
}

fn encode_group<'a>(members: impl ExactSizeIterator<Item = (u64, &'a [u8])>) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + members.len() * 320);
    v.push(GROUP_VERSION);
    v.extend_from_slice(
        &u32::try_from(members.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    for (seq, record) in members {
        v.extend_from_slice(&seq.to_be_bytes());
        v.extend_from_slice(
            &u32::try_from(record.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        v.extend_from_slice(record);
    }
    v
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    enqueued_at_ms: i64,
    attempts: u16,
    id: NotifId,
    reason: String,
    payload: Vec<u8>,
}

const RECORD_HEAD: usize = 1 + 8 + 2 + 16 + 2;
const MAX_REASON: usize = 1024;

fn truncated(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let reason = truncated(&self.reason, MAX_REASON).as_bytes();
        let mut v = Vec::with_capacity(RECORD_HEAD + reason.len() + self.payload.len());
        v.push(1);
        v.extend_from_slice(&self.enqueued_at_ms.to_be_bytes());
        v.extend_from_slice(&self.attempts.to_be_bytes());
        v.extend_from_slice(self.id.as_bytes());
        v.extend_from_slice(&(reason.len() as u16).to_be_bytes());
        v.extend_from_slice(reason);
        v.extend_from_slice(&self.payload);
        v
    }

    fn decode(v: &[u8]) -> Option<Self> {
        if v.len() < RECORD_HEAD || v[0] != 1 {
            return None;
        }
        let enqueued_at_ms = i64::from_be_bytes(v[1..9].try_into().ok()?);
        let attempts = u16::from_be_bytes([v[9], v[10]]);
        let id = NotifId(v[11..27].try_into().ok()?);
        let rlen = usize::from(u16::from_be_bytes([v[27], v[28]]));
        let reason = std::str::from_utf8(v.get(RECORD_HEAD..RECORD_HEAD + rlen)?)
            .ok()?
            .to_string();
        Some(Self {
            enqueued_at_ms,
            attempts,
            id,
            reason,
            payload: v[RECORD_HEAD + rlen..].to_vec(),
        })
    }

    /// Just the id and payload, for the hot `ready` path.
    fn id_and_payload(v: &[u8]) -> Option<(NotifId, Vec<u8>)> {
        if v.len() < RECORD_HEAD || v[0] != 1 {
            return None;
        }
        let id = NotifId(v[11..27].try_into().ok()?);
        let rlen = usize::from(u16::from_be_bytes([v[27], v[28]]));
        Some((id, v.get(RECORD_HEAD + rlen..)?.to_vec()))
    }

    fn enqueued_at(v: &[u8]) -> Option<i64> {
        Some(i64::from_be_bytes(v.get(1..9)?.try_into().ok()?))
    }

    fn id_of(v: &[u8]) -> Option<NotifId> {
        Some(NotifId(v.get(11..27)?.try_into().ok()?))
    }
}

fn dead_value(dead_at_ms: i64, reason: &str, r: &Record) -> Vec<u8> {
    let reason = truncated(reason, MAX_REASON).as_bytes();
    let rec = r.encode();
    let mut v = Vec::with_capacity(10 + reason.len() + rec.len());
    v.extend_from_slice(&dead_at_ms.to_be_bytes());
    v.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    v.extend_from_slice(reason);
    v.extend_from_slice(&rec);
    v
}

fn decode_dead(seq: u64, v: &[u8]) -> Option<DeadLetter> {
    let dead_at_ms = i64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let n = usize::from(u16::from_be_bytes(v.get(8..10)?.try_into().ok()?));
    let reason = String::from_utf8_lossy(v.get(10..10 + n)?).into_owned();
    let r = Record::decode(v.get(10 + n..)?)?;
    Some(DeadLetter {
        seq,
        id: r.id,
        dead_at_ms,
        reason,
        enqueued_at_ms: r.enqueued_at_ms,
        attempts: r.attempts,
        payload: r.payload,
    })
}

type EnqueueReply = oneshot::Sender<Result<Vec<u64>, OutboxError>>;

/// The result of a [`Outbox::settle_begin`]: the new notices' sequence numbers once durable.
pub type SettleReceipt = oneshot::Receiver<Result<Vec<u64>, OutboxError>>;

enum Request {
    Enqueue {
        items: Vec<(NotifId, Vec<u8>)>,
        admitted: Admission,
        reply: EnqueueReply,
    },
    /// Staged records changed and notices queued, atomically.
    Settle {
        /// Boxed: keeps every request small as it moves through the channel.
        staged: Box<StagedChange>,
        items: Vec<(NotifId, Vec<u8>)>,
        admitted: Admission,
        on_durable: Option<OnDurable>,
        reply: EnqueueReply,
    },
    /// Acknowledged by the agent: delete these queued sequence numbers (not synced).
    Forget(Vec<u64>),
    /// Move the deferred notices that are due back to the queue.
    Promote,
    /// Move dead letters back to the queue; answers how many.
    RetryDead {
        which: Select,
        reply: mpsc::SyncSender<Result<usize, OutboxError>>,
    },
    /// Answers once every earlier request is done (tests).
    #[cfg(test)]
    Barrier(mpsc::SyncSender<()>),
    Stop,
}

/// Deletions of acknowledged notices are applied in bulk, once this many are pending, after
/// [`FORGET_IDLE`] without requests, or at close. Deleting each ACK batch at once, next to the
/// range `ready` is reading, made `ready` slower and cost about a fifth of the drain rate
/// (docs/benchmarks.md).
const FORGET_BATCH: usize = 8192;
/// Most expired notices one `ready` call moves to the dead letters, to bound its work.
const MAX_EXPIRE: usize = 4096;
const FORGET_IDLE: Duration = Duration::from_millis(20);
/// sled is flushed (and the journal emptied) this often, or sooner when a journal segment
/// reaches [`CHECKPOINT_BYTES`]; a crash replays at most about this much.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
const CHECKPOINT_BYTES: u64 = 16 << 20;
/// Durable commits waiting to be applied to sled; beyond it the committer waits.
const APPLY_QUEUE: usize = 64;

/// What the link client holds: ids handed out by `ready`, and acknowledged sequence numbers
/// whose deletion is still pending.
#[derive(Default)]
struct Tracker {
    handed: HashMap<NotifId, u64>,
    forgetting: HashSet<u64>,
}

/// State shared by every clone and the committer.
struct Shared {
    notify: Arc<Notify>,
    /// Queued notices, ready plus deferred (acknowledged ones leave it at once).
    depth: AtomicU64,
    /// What `max_depth` limits: `depth`, plus the notices staged records stand for, plus the
    /// room admitted arrivals hold until their commit counts them (module docs, "Depth").
    held: AtomicU64,
    /// Highest sequence number known durable; `ready` offers nothing above it. Only the
    /// committer creates queue entries and raises this, after its sync, so everything at or
    /// below it is in the tree by then.
    committed: AtomicU64,
    /// Earliest due time in the `d` range (`i64::MAX`: none). Also serialises deferral and
    /// promotion.
    next_due: Mutex<i64>,
    /// A promotion request is queued to the committer.
    promote_requested: std::sync::atomic::AtomicBool,
    tracker: Mutex<Tracker>,
    /// Held while a group of queued notices is read, changed and written back (acks, retry
    /// later, dead letters, expiry), so two such changes never lose each other's.
    groups: Mutex<()>,
    clock: Clock,
    max_age_ms: i64,
    /// Every write to the tree goes through it (see [`crate::notify::journal`]).
    journal: Arc<Journal>,
}

impl Shared {
    fn now(&self) -> i64 {
        (self.clock)()
    }

    fn sub_depth(&self, n: u64) {
        let _ = self
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                Some(d.saturating_sub(n))
            });
    }

    /// `n` queued notices left the queue (acknowledged, expired, dead-lettered).
    fn dequeued(&self, n: u64) {
        self.sub_depth(n);
        self.unhold(n);
    }

    fn unhold(&self, n: u64) {
        let _ = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                Some(h.saturating_sub(n))
            });
    }

    /// Deletes acknowledged notices. Not synced: a crash may bring them back, to be sent
    /// again and de-duplicated by the agent.
    fn forget(&self, db: &sled::Db, seqs: &[u64]) -> Result<(), OutboxError> {
        let result = {
            let _groups = lock(&self.groups);
            self.take_members(db, seqs).and_then(|(ops, _)| {
                // Single writes, not a batch: a sled batch takes a process-wide write lock
                // that waits for every flush in progress. Each is a whole group's value.
                self.journal
                    .write(db, &ops, false, Apply::EachOp)
                    .map(drop)
                    .map_err(|e| OutboxError::Store(e.into()))
            })
        };
        let mut t = lock(&self.tracker);
        for seq in seqs {
            t.forgetting.remove(seq);
        }
        result
    }
}

impl Shared {
    /// Takes the queued notices `seqs` out of their groups: the writes that put each group
    /// back without them (or delete it when none is left), and each taken notice's sequence
    /// number and record. Sequence numbers not queued are skipped. Call with `groups` locked
    /// and write the result before unlocking.
    #[allow(clippy::type_complexity)]
    fn take_members(
        &self,
        db: &sled::Db,
        seqs: &[u64],
    ) -> Result<(Ops, Vec<(u64, Vec<u8>)>), OutboxError> {
        let mut seqs = seqs.to_vec();
        seqs.sort_unstable();
        seqs.dedup();
        let mut ops = Ops::default();
        let mut taken = Vec::new();
        let mut i = 0;
        while i < seqs.len() {
            let Some((k, v)) = group_at(db, seqs[i])? else {
                i += 1;
                continue;
            };
            let members = group_members(&k, &v)?;
            let last = members.last().map_or(0, |m| m.0);
            // The sequence numbers this group can hold; the first one is past it if none.
            let here = &seqs[i..i + seqs[i..].partition_point(|&s| s <= last).max(1)];
            i += here.len();
            let (gone, keep): (Vec<_>, Vec<_>) = members
                .into_iter()
                .partition(|(s, _)| here.binary_search(s).is_ok());
            if gone.is_empty() {
                continue;
            }
            if keep.is_empty() {
                ops.remove(k);
            } else {
                ops.insert(k, encode_group(keep.into_iter()));
            }
            taken.extend(gone.into_iter().map(|(s, r)| (s, r.to_vec())));
        }
        Ok((ops, taken))
    }
}

/// The `q` entry that holds queued sequence number `seq` if anything does: the last one at
/// or below it.
fn group_at(db: &sled::Db, seq: u64) -> Result<Option<(sled::IVec, sled::IVec)>, OutboxError> {
    match db.range(seq_key(Q, 0)..=seq_key(Q, seq)).next_back() {
        Some(kv) => Ok(Some(kv?)),
        None => Ok(None),
    }
}

/// Moves sled's id counter past `highest`, the highest sequence number in the store, and
/// answers the first number it gives then. After a crash sled may recover its counter from
/// before numbers that the journal replayed (module docs); one `generate_id` per number
/// skipped, about as many as were handed out since sled's last flush.
fn ids_past(db: &sled::Db, highest: Option<u64>) -> Result<u64, sled::Error> {
    loop {
        let id = db.generate_id()?;
        if highest.is_none_or(|h| id > h) {
            return Ok(id);
        }
    }
}

/// The outbox handle: cheap to clone, shared by MTA intake, the link client and the admin CLI.
#[derive(Clone)]
pub struct Outbox {
    db: sled::Db,
    max_depth: u64,
    tx: mpsc::SyncSender<Request>,
    shared: Arc<Shared>,
    committer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    pub stats: Arc<OutboxStats>,
}

impl Outbox {
    /// Opens (or creates) the outbox and starts the committer thread.
    /// If another handle or process holds the store, waits up to `cfg.lock_wait` for it to
    /// let go (a restarting daemon's predecessor, or sled's own I/O threads finishing after a
    /// close) before failing with [`OutboxError::Locked`]. Blocking (sled recovery, the lock
    /// wait): call it at startup or through `spawn_blocking`.
    pub fn open(path: &Path, cfg: OutboxConfig) -> Result<Self, OutboxError> {
        // sled's default page cache is 1 GiB; the outbox reads mostly its recent tail.
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(16 << 20)
            .mode(sled::Mode::HighThroughput);
        let db = open_waiting(&config, cfg.lock_wait).map_err(|e| match e {
            OpenWaiting::Locked => OutboxError::Locked {
                path: path.to_owned(),
            },
            OpenWaiting::Sled(error) => OutboxError::Open {
                path: path.to_owned(),
                error,
            },
        })?;
        let synced = Arc::new(
            mailbell_link::durable::SyncedFlush::open(path).map_err(|e| OutboxError::Open {
                path: path.to_owned(),
                error: sled::Error::Io(e),
            })?,
        );
        let (journal, replayed) =
            Journal::open(&path.join("journal"), &db, &synced, CHECKPOINT_BYTES).map_err(
                |error| OutboxError::Open {
                    path: path.to_owned(),
                    error,
                },
            )?;
        if replayed.records > 0 {
            info!(
                ?replayed,
                "outbox: commits not yet in sled at the last stop were replayed"
            );
        }
        let journal = Arc::new(journal);
        let stats = Arc::new(OutboxStats::default());
        // The highest sequence number in any range (`None`: the store is empty).
        let mut highest: Option<u64> = None;
        let mut saw = |seq: u64| highest = highest.max(Some(seq));
        let mut ready = 0u64;
        let mut committed = 0u64;
        for kv in db.scan_prefix([Q]) {
            let (k, v) = kv?;
            let members = group_members(&k, &v)?;
            if let Some(&(last, _)) = members.last() {
                committed = last;
                saw(last);
            }
            ready += members.len() as u64;
        }
        let mut deferred = 0u64;
        let mut next_due = i64::MAX;
        for k in db.scan_prefix([D]).keys() {
            let k = k?;
            next_due = next_due.min(not_before_of(&k).ok_or_else(|| corrupt(&k))?);
            saw(seq_of(&k).ok_or_else(|| corrupt(&k))?);
            deferred += 1;
        }
        let mut dead = 0u64;
        for k in db.scan_prefix([X]).keys() {
            let k = k?;
            saw(seq_of(&k).ok_or_else(|| corrupt(&k))?);
            dead += 1;
        }
        stats.dead.store(dead, Ordering::Relaxed);
        let (mut staged, mut staged_notices) = (0u64, 0u64);
        for kv in db.scan_prefix([S]) {
            let (k, v) = kv?;
            saw(seq_of(&k).ok_or_else(|| corrupt(&k))?);
            staged += 1;
            staged_notices += u64::from(decode_staged(&v).0);
        }
        let seq_from = ids_past(&db, highest)?;
        stats.staged.store(staged, Ordering::Relaxed);
        stats
            .staged_notices
            .store(staged_notices, Ordering::Relaxed);
        let held = ready + deferred + staged_notices;
        info!(
            ready,
            deferred,
            dead,
            staged,
            staged_notices,
            held,
            highest_seq = highest,
            seq_from,
            max_depth = cfg.max_depth,
            "outbox opened"
        );
        let shared = Arc::new(Shared {
            notify: Arc::new(Notify::new()),
            depth: AtomicU64::new(ready + deferred),
            held: AtomicU64::new(held),
            committed: AtomicU64::new(committed),
            next_due: Mutex::new(next_due),
            promote_requested: std::sync::atomic::AtomicBool::new(false),
            tracker: Mutex::new(Tracker::default()),
            groups: Mutex::new(()),
            clock: cfg.clock.clone(),
            max_age_ms: i64::try_from(cfg.max_age.as_millis()).unwrap_or(i64::MAX),
            journal: journal.clone(),
        });
        let checkpointer = {
            let (db, synced) = (db.clone(), synced.clone());
            std::thread::Builder::new()
                .name("outbox-checkpoint".into())
                .spawn(move || journal.run_checkpoints(&db, &synced, CHECKPOINT_EVERY))
                .map_err(OutboxError::Spawn)?
        };
        let (tx, rx) = mpsc::sync_channel(cfg.channel_capacity.max(1));
        let (applier_tx, applier_rx) = mpsc::sync_channel(APPLY_QUEUE);
        let applier = {
            let (db, shared, stats) = (db.clone(), shared.clone(), stats.clone());
            std::thread::Builder::new()
                .name("outbox-apply".into())
                .spawn(move || run_applier(&db, &shared, &stats, &applier_rx))
                .map_err(OutboxError::Spawn)?
        };
        let committer = Committer {
            db: db.clone(),
            synced: synced.clone(),
            checkpointer: Some(checkpointer),
            applier_tx: Some(applier_tx),
            applier: Some(applier),
            max_batch: cfg.max_batch_requests.max(1),
            shared: shared.clone(),
            stats: stats.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("outbox-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(OutboxError::Spawn)?;
        Ok(Self {
            db,
            max_depth: cfg.max_depth,
            tx,
            shared,
            committer: Arc::new(Mutex::new(Some(handle))),
            stats,
        })
    }

    /// Commits what is pending, stops the committer and flushes. Later enqueues through any
    /// clone fail with [`OutboxError::Stopped`]; the store closes when the last clone is
    /// dropped.
    pub fn close(&self) {
        let _ = self.tx.send(Request::Stop);
        let handle = lock(&self.committer).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        if let Err(e) = self.db.flush() {
            error!(error = %e, "outbox flush on close failed");
        }
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// Queues notices; returns their sequence numbers, in order, once they are durable.
    /// Refused whole with [`OutboxError::Full`] if they do not fit under `max_depth`.
    pub async fn enqueue(&self, items: Vec<Notification>) -> Result<Vec<u64>, OutboxError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let items = encode_all(&items)?;
        let admitted = self.admit(items.len() as u64)?;
        let (reply, rx) = oneshot::channel();
        self.submit(Request::Enqueue {
            items,
            admitted,
            reply,
        })
        .await?;
        rx.await.map_err(|_| OutboxError::Stopped)?
    }

    /// Deletes and rewrites staged records and queues notices, all in one atomic batch, flushed
    /// before it returns; answers the new notices' sequence numbers. Never refused for depth:
    /// new arrivals took their room with [`admit`](Self::admit) ([`Settle::admitted`]), and
    /// the records it consumes were already counted.
    pub async fn settle(&self, s: Settle) -> Result<Vec<u64>, OutboxError> {
        self.settle_begin(s)
            .await?
            .await
            .map_err(|_| OutboxError::Stopped)?
    }

    /// [`settle`](Self::settle) without waiting for the commit: returns once the committer has
    /// the request, with the receiver of its result. Requests commit in the order they are
    /// begun, so a caller may begin the next before the previous one is durable. An empty one
    /// goes to the committer too, so it answers after every earlier one is durable (a round
    /// with nothing to write answers after the rounds before it); its admission, if any, is
    /// given back.
    pub async fn settle_begin(&self, s: Settle) -> Result<SettleReceipt, OutboxError> {
        let items = encode_all(&s.enqueue)?;
        let (reply, rx) = oneshot::channel();
        self.submit(Request::Settle {
            staged: Box::new(StagedChange {
                insert: s.insert,
                remove: s.remove,
                rewrite: s.rewrite,
            }),
            items,
            admitted: s.admitted,
            on_durable: s.on_durable,
            reply,
        })
        .await?;
        Ok(rx)
    }

    /// A sequence number for a new staged record ([`Settle::insert`]); unique and increasing
    /// across restarts (module docs).
    pub fn reserve_seq(&self) -> Result<u64, OutboxError> {
        Ok(self.db.generate_id()?)
    }

    /// Takes room under `max_depth` for `notices` new notices, all or none, before anything
    /// is written: [`OutboxError::Full`] if the outbox holds too many (module docs, "Depth").
    /// One atomic compare-and-swap; the room is counted at once, so a later call sees it
    /// while this arrival's commit is still under way.
    pub fn admit(&self, notices: u64) -> Result<Admission, OutboxError> {
        let limit = self.max_depth;
        match self
            .shared
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                h.checked_add(notices).filter(|&t| t <= limit)
            }) {
            Ok(_) => Ok(Admission {
                shared: Some(self.shared.clone()),
                notices,
            }),
            Err(held) => Err(OutboxError::Full { held, limit }),
        }
    }

    /// The notices counted against `max_depth` (queued, staged, admitted), and the limit.
    pub fn held(&self) -> (u64, u64) {
        (self.shared.held.load(Ordering::Acquire), self.max_depth)
    }

    /// Every staged record, in sequence order (the intake rebuilds its state from them at
    /// start). Blocking.
    pub fn staged(&self) -> Result<Vec<StagedRecord>, OutboxError> {
        self.shared.journal.caught_up();
        let mut out = Vec::new();
        for kv in self.db.scan_prefix([S]) {
            let (k, v) = kv?;
            let (notices, value) = decode_staged(&v);
            out.push(StagedRecord {
                seq: seq_of(&k).ok_or_else(|| corrupt(&k))?,
                notices,
                value: value.to_vec(),
            });
        }
        Ok(out)
    }

    /// Hands a request to the committer without blocking the runtime (`try_send` first: the
    /// common case never leaves this thread).
    async fn submit(&self, req: Request) -> Result<(), OutboxError> {
        match self.tx.try_send(req) {
            Ok(()) => Ok(()),
            Err(mpsc::TrySendError::Full(req)) => {
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || tx.send(req))
                    .await
                    .map_err(|_| OutboxError::Stopped)?
                    .map_err(|_| OutboxError::Stopped)
            }
            Err(mpsc::TrySendError::Disconnected(_)) => Err(OutboxError::Stopped),
        }
    }

    /// Queued notices (ready and deferred).
    pub fn depth(&self) -> u64 {
        self.shared.depth.load(Ordering::Acquire)
    }

    /// Signalled when new notices are queued.
    pub fn notifier(&self) -> Arc<Notify> {
        self.shared.notify.clone()
    }

    /// Up to `limit` queued notices: ready ones oldest first, then deferred ones by due time.
    pub fn list(&self, limit: usize) -> Result<Vec<QueuedItem>, OutboxError> {
        self.shared.journal.caught_up();
        let mut out = Vec::new();
        let item = |seq, not_before_ms, r: Record| QueuedItem {
            seq,
            id: r.id,
            enqueued_at_ms: r.enqueued_at_ms,
            attempts: r.attempts,
            not_before_ms,
            last_reason: r.reason,
            payload: r.payload,
        };
        'queued: for kv in self.db.scan_prefix([Q]) {
            let (k, v) = kv?;
            for (seq, rec) in group_members(&k, &v)? {
                if out.len() >= limit {
                    break 'queued;
                }
                if lock(&self.shared.tracker).forgetting.contains(&seq) {
                    continue;
                }
                let r = Record::decode(rec).ok_or_else(|| corrupt(&k))?;
                out.push(item(seq, None, r));
            }
        }
        for kv in self.db.scan_prefix([D]) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv?;
            let seq = seq_of(&k).ok_or_else(|| corrupt(&k))?;
            let r = Record::decode(&v).ok_or_else(|| corrupt(&k))?;
            out.push(item(seq, not_before_of(&k), r));
        }
        Ok(out)
    }

    /// Up to `limit` dead letters, oldest first.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, OutboxError> {
        self.shared.journal.caught_up();
        let mut out = Vec::new();
        for kv in self.db.scan_prefix([X]).take(limit) {
            let (k, v) = kv?;
            let seq = seq_of(&k).ok_or_else(|| corrupt(&k))?;
            out.push(decode_dead(seq, &v).ok_or_else(|| corrupt(&k))?);
        }
        Ok(out)
    }

    /// Puts dead letters back in the queue (under new sequence numbers, so a connected client
    /// sends them next; their age limit restarts); returns how many. Flushed before returning.
    /// Blocks until the committer has done it.
    pub fn retry_dead(&self, which: Select) -> Result<usize, OutboxError> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.tx
            .send(Request::RetryDead { which, reply })
            .map_err(|_| OutboxError::Stopped)?;
        rx.recv().map_err(|_| OutboxError::Stopped)?
    }

    /// Waits until the committer has handled every earlier request.
    #[cfg(test)]
    fn barrier(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.tx.send(Request::Barrier(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Deletes dead letters that died at least `older_than` ago (`Duration::ZERO`: all);
    /// returns how many. Flushed before returning.
    pub fn purge_dead(&self, older_than: Duration) -> Result<usize, OutboxError> {
        let cutoff = self
            .shared
            .now()
            .saturating_sub(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX));
        self.shared.journal.caught_up();
        let mut batch = Ops::default();
        let mut n = 0usize;
        for kv in self.db.scan_prefix([X]) {
            let (k, v) = kv?;
            let seq = seq_of(&k).ok_or_else(|| corrupt(&k))?;
            let d = decode_dead(seq, &v).ok_or_else(|| corrupt(&k))?;
            if d.dead_at_ms <= cutoff {
                batch.remove(k);
                n += 1;
            }
        }
        if n == 0 {
            return Ok(0);
        }
        self.write(&batch, true)?;
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        sub(&self.stats.dead, n as u64);
        info!(count = n, "dead letters purged");
        Ok(n)
    }

    /// One atomic write through the journal (`sync`: durable before it returns).
    fn write(&self, ops: &Ops, sync: bool) -> Result<(), OutboxError> {
        self.shared
            .journal
            .write(&self.db, ops, sync, Apply::Batch)
            .map(drop)
            .map_err(|e| OutboxError::Store(e.into()))
    }

    /// Asks the committer to move deferred notices that are due back to the queue (under new
    /// sequence numbers, after the client's cursor); they are offered from the next call on.
    fn request_promotion(&self, now: i64) {
        if *lock(&self.shared.next_due) > now
            || self.shared.promote_requested.swap(true, Ordering::AcqRel)
        {
            return;
        }
        if self.tx.try_send(Request::Promote).is_err() {
            // Busy or stopped: the next call asks again.
            self.shared
                .promote_requested
                .store(false, Ordering::Release);
        }
    }

    fn ready_items(&self, after: Option<u64>, max: usize) -> Result<Vec<OutItem>, OutboxError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        // An enqueue that has returned is offered (the applier may still be putting it in).
        self.shared.journal.caught_up();
        let now = self.shared.now();
        self.request_promotion(now);
        let oldest = now.saturating_sub(self.shared.max_age_ms);
        let start = match after {
            None => 0,
            Some(u64::MAX) => return Ok(Vec::new()),
            Some(a) => a + 1,
        };
        let end = self.shared.committed.load(Ordering::Acquire);
        if start > end {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(max.min(1024));
        let mut expired = Vec::new();
        {
            // Held across the scan: only the committer's bulk deletions contend for it.
            let mut t = lock(&self.shared.tracker);
            // From the group holding `start` (if that one is still queued).
            let from = match group_at(&self.db, start)? {
                Some((k, _)) => k.to_vec(),
                None => seq_key(Q, start).to_vec(),
            };
            'scan: for kv in self.db.range(from..=seq_key(Q, end).to_vec()) {
                let (k, v) = kv?;
                for (seq, rec) in group_members(&k, &v)? {
                    // Before the cursor, or in a commit `committed` does not cover yet.
                    if seq < start || seq > end {
                        continue;
                    }
                    if t.forgetting.contains(&seq) {
                        // Acknowledged, deletion pending: never offered again.
                        continue;
                    }
                    if Record::enqueued_at(rec).is_some_and(|at| at < oldest) {
                        expired.push(seq);
                        if expired.len() >= MAX_EXPIRE {
                            break 'scan;
                        }
                        continue;
                    }
                    let (id, payload) = Record::id_and_payload(rec).ok_or_else(|| corrupt(&k))?;
                    t.handed.insert(id, seq);
                    out.push(OutItem { seq, id, payload });
                    if out.len() >= max {
                        break 'scan;
                    }
                }
            }
        }
        if !expired.is_empty() {
            self.expire(expired, now)?;
        }
        Ok(out)
    }

    /// Moves queued notices older than `max_age` to the dead letters (not synced, like the
    /// link client's other writes).
    fn expire(&self, seqs: Vec<u64>, now: i64) -> Result<(), OutboxError> {
        let reason = format!(
            "expired: not delivered within {} s",
            self.shared.max_age_ms / 1000
        );
        let _groups = lock(&self.shared.groups);
        // Only what is still queued: an ACK may have come in since the scan.
        let (mut batch, taken) = self.shared.take_members(&self.db, &seqs)?;
        if taken.is_empty() {
            return Ok(());
        }
        for (seq, rec) in &taken {
            let r = Record::decode(rec).ok_or_else(|| corrupt(&seq_key(Q, *seq)))?;
            batch.insert(&seq_key(X, *seq)[..], dead_value(now, &reason, &r));
        }
        self.write(&batch, false)?;
        let n = taken.len() as u64;
        self.shared.dequeued(n);
        self.stats.dead_lettered.fetch_add(n, Ordering::Relaxed);
        self.stats.dead.fetch_add(n, Ordering::Relaxed);
        warn!(
            count = n,
            "undelivered notices expired; moved to the dead letters"
        );
        Ok(())
    }

    fn ack_items(&self, ids: &[NotifId]) -> Result<(), OutboxError> {
        let seqs: Vec<u64> = {
            let mut t = lock(&self.shared.tracker);
            let seqs: Vec<u64> = ids.iter().filter_map(|id| t.handed.remove(id)).collect();
            t.forgetting.extend(seqs.iter().copied());
            seqs
        };
        if seqs.is_empty() {
            return Ok(());
        }
        let n = seqs.len() as u64;
        self.shared.dequeued(n);
        self.stats.acked.fetch_add(n, Ordering::Relaxed);
        match self.tx.try_send(Request::Forget(seqs)) {
            Ok(()) => Ok(()),
            Err(mpsc::TrySendError::Full(Request::Forget(seqs)))
            | Err(mpsc::TrySendError::Disconnected(Request::Forget(seqs))) => {
                self.shared.forget(&self.db, &seqs)
            }
            Err(_) => Ok(()),
        }
    }

    /// The sequence number of a queued id: from the index of handed-out ids, else by a scan.
    /// Call with `groups` locked.
    fn find_queued(&self, id: &NotifId) -> Result<Option<u64>, OutboxError> {
        self.shared.journal.caught_up();
        let is_it = |r: &[u8]| Record::id_of(r) == Some(*id);
        let handed = lock(&self.shared.tracker).handed.remove(id);
        if let Some(seq) = handed {
            if let Some((k, v)) = group_at(&self.db, seq)? {
                if group_members(&k, &v)?
                    .iter()
                    .any(|(s, r)| *s == seq && is_it(r))
                {
                    return Ok(Some(seq));
                }
            }
        }
        for kv in self.db.scan_prefix([Q]) {
            let (k, v) = kv?;
            if let Some((s, _)) = group_members(&k, &v)?.into_iter().find(|(_, r)| is_it(r)) {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    /// Takes a queued id out of its group: the writes doing that and its sequence number and
    /// record. Call with `groups` locked and write the result before unlocking.
    fn take_queued(&self, id: &NotifId) -> Result<Option<(Ops, u64, Record)>, OutboxError> {
        let Some(seq) = self.find_queued(id)? else {
            return Ok(None);
        };
        let (ops, taken) = self.shared.take_members(&self.db, &[seq])?;
        let Some((seq, rec)) = taken.into_iter().next() else {
            return Ok(None);
        };
        let r = Record::decode(&rec).ok_or_else(|| corrupt(&seq_key(Q, seq)))?;
        Ok(Some((ops, seq, r)))
    }

    fn defer(&self, id: NotifId, after: Duration, reason: &str) -> Result<(), OutboxError> {
        let mut next_due = lock(&self.shared.next_due);
        let _groups = lock(&self.shared.groups);
        let Some((mut batch, seq, mut r)) = self.take_queued(&id)? else {
            debug!(notif_id = %id, "retry-later for a notice that is not queued; ignored");
            return Ok(());
        };
        let due = self
            .shared
            .now()
            .saturating_add(i64::try_from(after.as_millis()).unwrap_or(i64::MAX));
        r.attempts = r.attempts.saturating_add(1);
        r.reason = reason.to_string();
        batch.insert(&deferred_key(due, seq)[..], r.encode());
        self.write(&batch, false)?;
        *next_due = (*next_due).min(due);
        self.stats.deferred.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn bury(&self, id: NotifId, reason: &str) -> Result<(), OutboxError> {
        let _groups = lock(&self.shared.groups);
        let Some((mut batch, seq, r)) = self.take_queued(&id)? else {
            debug!(notif_id = %id, "dead letter for a notice that is not queued; ignored");
            return Ok(());
        };
        batch.insert(
            &seq_key(X, seq)[..],
            dead_value(self.shared.now(), reason, &r),
        );
        self.write(&batch, false)?;
        self.shared.dequeued(1);
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        self.stats.dead.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Each notice's id and encoded payload.
fn encode_all(items: &[Notification]) -> Result<Vec<(NotifId, Vec<u8>)>, OutboxError> {
    items
        .iter()
        .map(|n| {
            n.encode_payload()
                .map(|p| (n.id, p))
                .map_err(|error| OutboxError::Encode { id: n.id, error })
        })
        .collect()
}

fn sub(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
        Some(d.saturating_sub(n))
    });
}

impl LinkOutbox for Outbox {
    fn ready(&self, after: Option<u64>, max: usize) -> Result<Vec<OutItem>, StoreError> {
        Ok(self.ready_items(after, max)?)
    }

    fn acked(&self, ids: &[NotifId]) -> Result<(), StoreError> {
        Ok(self.ack_items(ids)?)
    }

    fn dead_letter(&self, id: NotifId, reason: &str) -> Result<(), StoreError> {
        Ok(self.bury(id, reason)?)
    }

    fn retry_later(&self, id: NotifId, after: Duration, reason: &str) -> Result<(), StoreError> {
        Ok(self.defer(id, after, reason)?)
    }

    fn notifier(&self) -> Arc<Notify> {
        self.shared.notify.clone()
    }
}

struct Committer {
    db: sled::Db,
    synced: Arc<mailbell_link::durable::SyncedFlush>,
    /// The checkpoint thread, stopped and joined when the committer ends.
    checkpointer: Option<std::thread::JoinHandle<()>>,
    /// Durable commits on their way into sled, and the thread applying them.
    applier_tx: Option<mpsc::SyncSender<ApplyJob>>,
    applier: Option<std::thread::JoinHandle<()>>,
    max_batch: usize,
    shared: Arc<Shared>,
    stats: Arc<OutboxStats>,
}

impl Committer {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        // Acknowledged sequence numbers whose deletion is pending (see `FORGET_BATCH`).
        let mut forget: Vec<u64> = Vec::new();
        loop {
            let first = if forget.is_empty() {
                match rx.recv() {
                    Ok(r) => r,
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(FORGET_IDLE) {
                    Ok(r) => r,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.forget(&mut forget);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            };
            let mut stop = matches!(first, Request::Stop);
            let mut reqs = vec![first];
            while reqs.len() < self.max_batch && !stop {
                match rx.try_recv() {
                    Ok(r) => {
                        stop = matches!(r, Request::Stop);
                        reqs.push(r);
                    }
                    Err(_) => break,
                }
            }
            self.commit(reqs, &mut forget);
            if stop || forget.len() >= FORGET_BATCH {
                self.forget(&mut forget);
            }
            if stop {
                break;
            }
        }
        self.forget(&mut forget);
        drop(self.applier_tx.take());
        if let Some(h) = self.applier.take() {
            let _ = h.join();
        }
        // Nothing writes any more: a last checkpoint leaves sled flushed and the journal empty.
        self.shared.journal.stop_checkpoints();
        if let Some(h) = self.checkpointer.take() {
            let _ = h.join();
        }
        if let Err(e) = self.shared.journal.checkpoint(&self.db, &self.synced) {
            warn!(error = %e, "outbox checkpoint at stop failed; the journal is replayed at the next start");
        }
        info!("outbox committer stopped");
    }

    fn forget(&self, seqs: &mut Vec<u64>) {
        if seqs.is_empty() {
            return;
        }
        if let Err(e) = self.shared.forget(&self.db, seqs) {
            warn!(error = %e, "cannot delete acknowledged notices; they will be sent again");
        }
        seqs.clear();
    }

    /// One group commit: every queue entry created by the requests (new notices, due deferred
    /// ones, requeued dead letters) goes into one batch and one journal sync, under sequence
    /// numbers generated here, in order; `committed` is raised only after the sync.
    fn commit(&self, reqs: Vec<Request>, forget: &mut Vec<u64>) {
        // What this round reads from sled (old values of staged records, the deferred and dead
        // ranges) must include every earlier commit, some of which the applier may still be
        // putting in.
        let reads = reqs.iter().any(|r| match r {
            Request::Settle { staged, .. } => {
                !staged.remove.is_empty() || !staged.rewrite.is_empty()
            }
            Request::Promote | Request::RetryDead { .. } => true,
            _ => false,
        });
        if reads {
            self.shared.journal.caught_up();
        }
        let mut round = Round::default();
        let now = self.shared.now();
        let mut retries = Vec::new();
        let mut promote = false;
        #[cfg(test)]
        let mut barriers = Vec::new();
        for req in reqs {
            let (items, admitted, reply) = match req {
                Request::Enqueue {
                    items,
                    admitted,
                    reply,
                } => (items, admitted, reply),
                Request::Settle {
                    staged,
                    items,
                    admitted,
                    on_durable,
                    reply,
                } => {
                    if self.settle(&mut round, *staged, items, admitted, now, reply) {
                        round.on_durable.extend(on_durable);
                    }
                    continue;
                }
                Request::Forget(seqs) => {
                    forget.extend(seqs);
                    continue;
                }
                Request::Promote => {
                    promote = true;
                    continue;
                }
                Request::RetryDead { which, reply } => {
                    retries.push((which, reply));
                    continue;
                }
                #[cfg(test)]
                Request::Barrier(tx) => {
                    barriers.push(tx);
                    continue;
                }
                Request::Stop => continue,
            };
            // A request goes into the batch whole or not at all (its room was taken by
            // `admit`; if it is not written, dropping `admitted` gives the room back).
            match self.place(items, now) {
                Ok(ops) => {
                    let mut seqs = Vec::with_capacity(ops.len());
                    for (seq, record) in ops {
                        round.insert(seq, record);
                        seqs.push(seq);
                    }
                    round.enqueued += seqs.len() as u64;
                    round.admitted.merge(admitted);
                    round.replies.push(Reply::Enqueue(reply, seqs));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        if promote {
            self.shared
                .promote_requested
                .store(false, Ordering::Release);
            if let Err(e) = self.promote(&mut round, now) {
                // `next_due` is left as it was, so the next `ready` asks again.
                warn!(error = %e, "cannot requeue deferred notices; will try again");
            }
        }
        for (which, reply) in retries {
            match self.requeue_dead(&mut round, which, now) {
                Ok(n) => round.replies.push(Reply::Retry(reply, n)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        if round.is_empty() {
            round.durable();
            round.answer(Ok(()));
        } else {
            self.apply(round);
        }
        #[cfg(test)]
        for tx in barriers {
            let _ = tx.send(());
        }
    }

    /// Applies and journals one group commit (synced), then answers its callers.
    fn apply(&self, mut round: Round) {
        round.seal();
        // Counted before the batch is visible, so depth never under-counts what `ready` sees.
        let added = round.enqueued + round.requeued;
        self.shared.depth.fetch_add(added, Ordering::AcqRel);
        let appended = self.shared.journal.append_deferred(&round.batch, true);
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        match appended {
            Ok((ticket, took)) => {
                self.stats
                    .commit_flush_us
                    .fetch_add(micros(took), Ordering::Relaxed);
                self.stats
                    .enqueued
                    .fetch_add(round.enqueued, Ordering::Relaxed);
                sub(&self.stats.dead, round.requeued);
                self.stats
                    .staged
                    .fetch_add(round.staged_added, Ordering::AcqRel);
                sub(&self.stats.staged, round.staged_removed);
                self.stats
                    .staged_notices
                    .fetch_add(round.staged_notices_added, Ordering::AcqRel);
                sub(&self.stats.staged_notices, round.staged_notices_removed);
                // What this commit holds now replaces the room its arrivals were admitted
                // with, in one step, before anyone is answered or `ready` can offer (and an
                // ACK take out) its notices.
                let gained = added + round.staged_notices_added;
                let freed = round.staged_notices_removed + round.admitted.consume();
                let _ = self
                    .shared
                    .held
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                        Some(h.saturating_add(gained).saturating_sub(freed))
                    });
                if round.requeued > 0 {
                    info!(count = round.requeued, "dead letters queued again");
                }
                if round.promoted > 0 {
                    debug!(count = round.promoted, "deferred notices due again");
                }
                let job = ApplyJob {
                    ticket,
                    ops: std::mem::take(&mut round.batch),
                    max_seq: round.max_seq,
                    fresh: round.writes > 0,
                };
                // Durable: answer now; the applier puts it into sled (and lets `ready` see
                // it) while the next commit is being synced. What must come before `ready`
                // can offer the notices runs first.
                round.durable();
                round.answer(Ok(()));
                if let Some(tx) = &self.applier_tx {
                    if tx.send(job).is_err() {
                        error!("outbox applier stopped; queued notices wait for the next start");
                    }
                }
            }
            Err(e) => {
                // Nothing reached sled. If the failed record could not be cut off the journal,
                // a replay would apply it: journal the undo after it (applying the undo
                // changes nothing in sled).
                if let Err(u) = self
                    .shared
                    .journal
                    .write(&self.db, &round.undo, true, Apply::Batch)
                {
                    warn!(error = ?u, "cannot journal the undo of a failed outbox commit; notices may be sent twice");
                }
                error!(error = %e, "outbox commit failed; the MTA will be told to retry");
                self.shared.sub_depth(added);
                if round.promoted > 0 {
                    let mut next_due = lock(&self.shared.next_due);
                    *next_due = (*next_due).min(self.shared.now());
                }
                round.answer(Err(e));
            }
        }
    }

    /// Adds one settle to the round: its staged writes (each counted from the record's value
    /// before the round, or before an earlier request of the same round changed it) and its
    /// notices. A settle goes into the batch whole or not at all; false if it was refused
    /// (answered with the error).
    fn settle(
        &self,
        round: &mut Round,
        staged: StagedChange,
        items: Vec<(NotifId, Vec<u8>)>,
        admitted: Admission,
        now: i64,
        reply: EnqueueReply,
    ) -> bool {
        let StagedChange {
            insert,
            remove,
            rewrite,
        } = staged;
        // New values (None: delete), inserts first: their keys are fresh.
        let inserts = insert.len();
        let writes: Vec<(u64, Option<StagedValue>)> = insert
            .into_iter()
            .chain(rewrite)
            .map(|r| (r.seq, Some((r.notices, r.value))))
            .chain(remove.into_iter().map(|seq| (seq, None)))
            .collect();
        let prepared = (|| -> Result<_, OutboxError> {
            let mut befores = Vec::with_capacity(writes.len());
            for (i, (seq, _)) in writes.iter().enumerate() {
                befores.push(match round.staged.get(seq) {
                    Some(&count) => Before::Round(count),
                    // A fresh key (an insert) was never written before this round.
                    None if i < inserts => Before::Store(None),
                    None => Before::Store(self.db.get(seq_key(S, *seq))?),
                });
            }
            Ok((befores, self.place(items, now)?))
        })();
        let (befores, ops) = match prepared {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(e));
                return false;
            }
        };
        for ((seq, new), before) in writes.into_iter().zip(befores) {
            let k = seq_key(S, seq);
            let old = match before {
                Before::Round(count) => count,
                Before::Store(old) => {
                    // The undo restores the value before the round: only the round's first
                    // write to a key records it.
                    let count = old.as_deref().map(|v| decode_staged(v).0);
                    match old {
                        Some(old) => round.undo.insert(&k[..], old),
                        None => round.undo.remove(&k[..]),
                    }
                    count
                }
            };
            let new_count = new.as_ref().map(|(n, _)| *n);
            match &new {
                Some((n, v)) => round.batch.insert(&k[..], encode_staged(*n, v)),
                None => round.batch.remove(&k[..]),
            }
            match (old, new_count) {
                (None, Some(_)) => round.staged_added += 1,
                (Some(_), None) => round.staged_removed += 1,
                _ => {}
            }
            round.staged_notices_removed += u64::from(old.unwrap_or(0));
            round.staged_notices_added += u64::from(new_count.unwrap_or(0));
            round.staged.insert(seq, new_count);
            round.other_writes += 1;
        }
        let mut seqs = Vec::with_capacity(ops.len());
        for (seq, record) in ops {
            round.insert(seq, record);
            seqs.push(seq);
        }
        round.enqueued += seqs.len() as u64;
        round.admitted.merge(admitted);
        round.replies.push(Reply::Enqueue(reply, seqs));
        true
    }

    /// Assigns sequence numbers to one request's notices and encodes their records.
    fn place(
        &self,
        items: Vec<(NotifId, Vec<u8>)>,
        now: i64,
    ) -> Result<Vec<(u64, Vec<u8>)>, OutboxError> {
        let mut ops = Vec::with_capacity(items.len());
        for (id, payload) in items {
            let seq = self.db.generate_id()?;
            let r = Record {
                enqueued_at_ms: now,
                attempts: 0,
                id,
                reason: String::new(),
                payload,
            };
            ops.push((seq, r.encode()));
        }
        Ok(ops)
    }

    /// Adds the deferred notices that are due (at most 4096) to the round.
    fn promote(&self, round: &mut Round, now: i64) -> Result<(), OutboxError> {
        let mut next_due = lock(&self.shared.next_due);
        let mut next = i64::MAX;
        let mut moved = Vec::new();
        for kv in self.db.scan_prefix([D]) {
            let (k, v) = kv?;
            let due = not_before_of(&k).ok_or_else(|| corrupt(&k))?;
            if due > now {
                next = due;
                break;
            }
            if moved.len() >= 4096 {
                next = now;
                break;
            }
            moved.push((k, v));
        }
        for (k, v) in moved {
            let seq = self.db.generate_id()?;
            round.moved(k, v.clone(), seq, v.to_vec());
            round.promoted += 1;
        }
        *next_due = next;
        Ok(())
    }

    /// Adds the selected dead letters to the round; returns how many.
    fn requeue_dead(
        &self,
        round: &mut Round,
        which: Select,
        now: i64,
    ) -> Result<usize, OutboxError> {
        let mut n = 0;
        for kv in self.db.scan_prefix([X]) {
            let (k, v) = kv?;
            if round.taken.contains(&k) {
                continue;
            }
            let seq = seq_of(&k).ok_or_else(|| corrupt(&k))?;
            let d = decode_dead(seq, &v).ok_or_else(|| corrupt(&k))?;
            if matches!(which, Select::Id(id) if id != d.id) {
                continue;
            }
            let r = Record {
                // The age limit counts from the requeue.
                enqueued_at_ms: now,
                attempts: d.attempts,
                id: d.id,
                reason: d.reason,
                payload: d.payload,
            };
            let new_seq = self.db.generate_id()?;
            round.moved(k, v, new_seq, r.encode());
            round.requeued += 1;
            n += 1;
        }
        Ok(n)
    }
}

/// A durable commit for the applier.
struct ApplyJob {
    ticket: u64,
    ops: Ops,
    max_seq: u64,
    /// It queues notices: wake the link client.
    fresh: bool,
}

/// Puts durable commits into sled in order, then lets `ready` offer them.
fn run_applier(db: &sled::Db, shared: &Shared, stats: &OutboxStats, rx: &mpsc::Receiver<ApplyJob>) {
    /// Releases the readers if this thread unwinds.
    struct Unwinding<'a>(&'a Journal);
    impl Drop for Unwinding<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                error!("outbox applier failed; queued notices wait for the next start: restart mailbell");
                self.0.abandon();
            }
        }
    }
    let _guard = Unwinding(&shared.journal);
    for job in rx {
        let t0 = std::time::Instant::now();
        let applied = job.ops.apply(db);
        stats
            .commit_apply_us
            .fetch_add(micros(t0.elapsed()), Ordering::Relaxed);
        match applied {
            Ok(()) => {
                shared.committed.fetch_max(job.max_seq, Ordering::AcqRel);
                shared.journal.applied(job.ticket, true);
                if job.fresh {
                    shared.notify.notify_one();
                }
            }
            Err(e) => {
                error!(error = %e, "cannot apply a durable outbox commit to sled; it is in the journal, and the next start replays it: restart mailbell");
                shared.journal.applied(job.ticket, false);
            }
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A staged record's notice count and the intake's value.
type StagedValue = (u32, Vec<u8>);

/// The staged records one settle writes, rewrites and deletes.
struct StagedChange {
    insert: Vec<StagedRecord>,
    remove: Vec<u64>,
    rewrite: Vec<StagedRecord>,
}

/// A staged key's notice count before a settle wrote it (`None`: no record).
enum Before {
    /// An earlier request of the same round wrote it.
    Round(Option<u32>),
    /// As the store has it (the round's first write to the key).
    Store(Option<sled::IVec>),
}

enum Reply {
    Enqueue(EnqueueReply, Vec<u64>),
    Retry(mpsc::SyncSender<Result<usize, OutboxError>>, usize),
}

/// What one group commit writes, how to undo it, and whom to answer.
#[derive(Default)]
struct Round {
    batch: Ops,
    undo: Ops,
    /// The queue entries this round creates, `(seq, record)` in sequence order: `q` values of
    /// up to [`GROUP_MAX`] under their first one's sequence number (see [`Round::seal`]).
    group: Vec<(u64, Vec<u8>)>,
    /// Keys moved to the queue in this round (a dead letter is requeued once).
    taken: HashSet<sled::IVec>,
    max_seq: u64,
    /// Queue entries this round creates.
    writes: u64,
    /// Staged records this round writes or deletes.
    other_writes: u64,
    staged_added: u64,
    staged_removed: u64,
    /// Notices of the staged records this round writes, and of the ones it replaces or
    /// deletes.
    staged_notices_added: u64,
    staged_notices_removed: u64,
    /// Staged keys this round writes, with their notice count after it (`None`: deleted).
    staged: HashMap<u64, Option<u32>>,
    /// Room its arrivals were admitted with, given back when the round is counted.
    admitted: Admission,
    enqueued: u64,
    promoted: u64,
    requeued: u64,
    replies: Vec<Reply>,
    /// Of the settles in the round, run once it is durable.
    on_durable: Vec<OnDurable>,
}

impl Round {
    fn insert(&mut self, seq: u64, record: Vec<u8>) {
        self.group.push((seq, record));
        self.max_seq = self.max_seq.max(seq);
        self.writes += 1;
    }

    /// Puts the round's new queue entries into the batch as groups of at most
    /// [`GROUP_MAX`].
    fn seal(&mut self) {
        for chunk in self.group.chunks(GROUP_MAX) {
            let k = seq_key(Q, chunk[0].0);
            let members = chunk.iter().map(|(s, r)| (*s, r.as_slice()));
            self.batch.insert(&k[..], encode_group(members));
            self.undo.remove(&k[..]);
        }
        self.group.clear();
    }

    /// Moves an entry (deferred or dead) to the queue under `seq`.
    fn moved(&mut self, from: sled::IVec, old: sled::IVec, seq: u64, record: Vec<u8>) {
        self.batch.remove(from.clone());
        self.undo.insert(from.clone(), old);
        self.taken.insert(from);
        self.insert(seq, record);
    }

    fn is_empty(&self) -> bool {
        self.writes == 0 && self.other_writes == 0
    }

    /// Runs what the round's settles wait for once it is durable.
    fn durable(&mut self) {
        for f in std::mem::take(&mut self.on_durable) {
            f.run();
        }
    }

    fn answer(self, result: Result<(), sled::Error>) {
        // Room still held here was not counted by this round (nothing written, or a failed
        // commit): given back before anyone hears the answer.
        drop(self.admitted);
        for r in self.replies {
            match (r, &result) {
                (Reply::Enqueue(tx, seqs), Ok(())) => {
                    let _ = tx.send(Ok(seqs));
                }
                (Reply::Retry(tx, n), Ok(())) => {
                    let _ = tx.send(Ok(n));
                }
                (Reply::Enqueue(tx, _), Err(e)) => {
                    let _ = tx.send(Err(OutboxError::Store(e.clone())));
                }
                (Reply::Retry(tx, _), Err(e)) => {
                    let _ = tx.send(Err(OutboxError::Store(e.clone())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::AtomicI64;

    use super::*;

    fn notice(i: u32) -> Notification {
        Notification {
            id: NotifId::random(),
            phone: "+8613800138000".into(),
            recipient: "zhang.wei@example.cn".into(),
            from_addr: "li.na@example.org".into(),
            subject: format!("会议安排 {i}"),
            count: 1,
            ..Default::default()
        }
    }

    /// A clock the test moves by hand.
    fn manual_clock() -> (Arc<AtomicI64>, OutboxConfig) {
        let t = Arc::new(AtomicI64::new(1_700_000_000_000));
        let c = t.clone();
        let cfg = OutboxConfig {
            clock: Arc::new(move || c.load(Ordering::SeqCst)),
            ..Default::default()
        };
        (t, cfg)
    }

    fn rec(seq: u64, notices: u32, value: &[u8]) -> StagedRecord {
        StagedRecord {
            seq,
            notices,
            value: value.to_vec(),
        }
    }

    fn ids(items: &[OutItem]) -> Vec<NotifId> {
        items.iter().map(|i| i.id).collect()
    }

    fn ids_of(notices: &[Notification]) -> Vec<NotifId> {
        notices.iter().map(|n| n.id).collect()
    }

    /// What a settle runs once durable (the intake's audit records) runs before anything can
    /// see its notices, so the link's records of them always come after.
    #[tokio::test]
    async fn on_durable_runs_before_the_notices_can_be_seen() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(&dir.path().join("o"), OutboxConfig::default()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..20 {
            let (db, tx) = (ob.db.clone(), tx.clone());
            let before = ob.list(100).unwrap().len();
            ob.settle(Settle {
                enqueue: vec![notice(i), notice(i + 100)],
                on_durable: Some(OnDurable::new(move || {
                    // Items in the queue as `ready` would read them (the applier's sled).
                    let visible: usize = db
                        .scan_prefix([Q])
                        .map(|kv| {
                            let (k, v) = kv.unwrap();
                            group_members(&k, &v).unwrap().len()
                        })
                        .sum();
                    tx.send((before, visible)).unwrap();
                })),
                ..Default::default()
            })
            .await
            .unwrap();
            let (before, visible) = rx.recv().unwrap();
            assert_eq!(
                visible, before,
                "round {i}: its notices were not visible yet"
            );
            assert_eq!(ob.list(100).unwrap().len(), before + 2);
        }
    }

    #[tokio::test]
    async fn staged_records_settle_atomically_into_notices() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o");
        let ob = Outbox::open(&path, OutboxConfig::default()).unwrap();
        let seqs: Vec<u64> = (0..3).map(|_| ob.reserve_seq().unwrap()).collect();
        ob.settle(Settle {
            insert: seqs
                .iter()
                .zip([&b"one"[..], b"two", b"three"])
                .map(|(s, v)| rec(*s, 2, v))
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(ob.stats.staged.load(Ordering::Relaxed), 3);
        assert_eq!(ob.depth(), 0, "staged records are not queued notices");
        assert_eq!(ob.held().0, 6, "but they stand for notices");
        assert!(ob.ready(None, 10).unwrap().is_empty());
        let n = notice(1);
        let fresh = ob.reserve_seq().unwrap();
        assert!(fresh > seqs[2]);
        let q = ob
            .settle(Settle {
                insert: vec![rec(fresh, 1, b"four")],
                remove: vec![seqs[0], seqs[2]],
                rewrite: vec![rec(seqs[1], 1, b"two, half done")],
                enqueue: vec![n.clone()],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(q.len(), 1);
        assert_eq!(ids(&ob.ready(None, 10).unwrap()), vec![n.id]);
        assert_eq!(
            ob.staged().unwrap(),
            vec![rec(seqs[1], 1, b"two, half done"), rec(fresh, 1, b"four")]
        );
        assert_eq!(ob.stats.staged.load(Ordering::Relaxed), 2);
        assert_eq!(ob.held().0, 3, "one queued, two staged");
        ob.settle(Settle {
            remove: vec![fresh],
            ..Default::default()
        })
        .await
        .unwrap();
        ob.close();
        drop(ob);
        // Both halves of the settle survive a reopen.
        let ob = Outbox::open(&path, OutboxConfig::default()).unwrap();
        assert_eq!(
            ob.staged().unwrap(),
            vec![rec(seqs[1], 1, b"two, half done")]
        );
        assert_eq!(ob.stats.staged.load(Ordering::Relaxed), 1);
        assert_eq!(ob.held().0, 2);
        assert_eq!(ids(&ob.ready(None, 10).unwrap()), vec![n.id]);
    }

    /// Stages one arrival of `notices` notices the way the intake does: room first, then the
    /// record, settled with that room.
    async fn stage(ob: &Outbox, notices: u32) -> Result<u64, OutboxError> {
        let admitted = ob.admit(u64::from(notices))?;
        let seq = ob.reserve_seq()?;
        ob.settle(Settle {
            insert: vec![rec(seq, notices, b"m")],
            admitted,
            ..Default::default()
        })
        .await?;
        Ok(seq)
    }

    fn staged_notices(ob: &Outbox) -> u64 {
        ob.stats.staged_notices.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn unconfirmed_and_held_notices_count_against_the_depth_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (t, cfg) = manual_clock();
        let cfg = OutboxConfig {
            max_depth: 10,
            max_age: Duration::from_secs(60),
            ..cfg
        };
        let path = dir.path().join("o");
        let ob = Outbox::open(&path, cfg.clone()).unwrap();
        // One arrival for six recipients, all waiting for a confirmation: six notices.
        let a = stage(&ob, 6).await.unwrap();
        assert_eq!(ob.held(), (6, 10));
        assert_eq!((ob.depth(), staged_notices(&ob)), (0, 6));
        // Five more do not fit: refused whole, nothing written.
        assert!(matches!(
            stage(&ob, 5).await,
            Err(OutboxError::Full { held: 6, limit: 10 })
        ));
        assert_eq!(ob.stats.staged.load(Ordering::Relaxed), 1);
        assert_eq!(ob.held().0, 6);
        // Four fit exactly.
        let b = stage(&ob, 4).await.unwrap();
        assert_eq!(ob.held().0, 10);
        assert!(matches!(
            ob.enqueue(vec![notice(0)]).await,
            Err(OutboxError::Full { held: 10, .. })
        ));
        // Settling is never refused: four of a's are confirmed and queued, two wait on.
        ob.settle(Settle {
            rewrite: vec![rec(a, 2, b"m, four done")],
            enqueue: (1..=4).map(notice).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!((ob.held().0, ob.depth(), staged_notices(&ob)), (10, 4, 6));
        // b's four are dropped (filed as spam): room again.
        ob.settle(Settle {
            remove: vec![b],
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!((ob.held().0, staged_notices(&ob)), (6, 2));
        // An ACK and a dead letter free room; a deferred notice still counts.
        let ready = ob.ready(None, 10).unwrap();
        ob.acked(&[ready[0].id]).unwrap();
        ob.dead_letter(ready[1].id, "no such number").unwrap();
        ob.retry_later(ready[2].id, Duration::from_secs(5), "busy")
            .unwrap();
        assert_eq!((ob.held().0, ob.depth()), (4, 2), "two staged, two queued");
        // Expiry moves the rest of the queue to the dead letters (the deferred one once it
        // is due and requeued).
        t.fetch_add(61_000, Ordering::SeqCst);
        ob.ready(None, 10).unwrap();
        ob.barrier();
        ob.ready(None, 10).unwrap();
        assert_eq!(ob.stats.dead.load(Ordering::Relaxed), 3);
        assert_eq!(
            (ob.held().0, ob.depth()),
            (2, 0),
            "dead letters do not count"
        );
        // An operator's requeue counts again (never refused: it only moves stored notices);
        // a purge changes nothing.
        let dead = ob.dead_letters(10).unwrap();
        assert_eq!(ob.retry_dead(Select::Id(dead[0].id)).unwrap(), 1);
        assert_eq!(ob.held().0, 3);
        assert_eq!(ob.purge_dead(Duration::ZERO).unwrap(), 2);
        assert_eq!(ob.held().0, 3);
        ob.close();
        drop(ob);
        let ob = Outbox::open(&path, cfg).unwrap();
        assert_eq!(ob.held(), (3, 10), "recounted at open");
        assert_eq!(staged_notices(&ob), 2);
    }

    #[tokio::test]
    async fn admitted_room_counts_until_its_commit_counts_the_notices() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = OutboxConfig {
            max_depth: 10,
            ..Default::default()
        };
        let ob = Outbox::open(&dir.path().join("o"), cfg).unwrap();
        // Room is counted at once, and given back by an arrival that goes no further.
        let room = ob.admit(7).unwrap();
        assert_eq!(ob.held().0, 7);
        assert!(matches!(
            ob.admit(4),
            Err(OutboxError::Full { held: 7, limit: 10 })
        ));
        drop(room);
        assert_eq!(ob.held().0, 0);
        // Pipelined rounds: the next arrival is admitted while the previous one commits, and
        // sees its notices whether or not that commit is done.
        let room = ob.admit(7).unwrap();
        let seq = ob.reserve_seq().unwrap();
        let receipt = ob
            .settle_begin(Settle {
                insert: vec![rec(seq, 5, b"m")],
                enqueue: vec![notice(1), notice(2)],
                admitted: room,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(matches!(ob.admit(4), Err(OutboxError::Full { .. })));
        let next = ob.admit(3).unwrap();
        receipt.await.unwrap().unwrap();
        assert_eq!(
            ob.held().0,
            10,
            "seven committed and three admitted, none twice"
        );
        drop(next);
        assert_eq!((ob.held().0, ob.depth(), staged_notices(&ob)), (7, 2, 5));
        // An arrival whose notices are all dropped at once writes nothing: room back.
        let room = ob.admit(3).unwrap();
        ob.settle(Settle {
            admitted: room,
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(ob.held().0, 7);
        // And so does one whose commit cannot happen.
        let room = ob.admit(3).unwrap();
        ob.close();
        assert!(matches!(
            ob.settle(Settle {
                insert: vec![rec(ob.reserve_seq().unwrap(), 3, b"m")],
                admitted: room,
                ..Default::default()
            })
            .await,
            Err(OutboxError::Stopped)
        ));
        assert_eq!(ob.held().0, 7);
    }

    /// Arrivals racing from many tasks never pass the limit together, and the count ends
    /// exactly at what was written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_arrivals_never_pass_the_limit_together() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = OutboxConfig {
            max_depth: 1000,
            ..Default::default()
        };
        let ob = Outbox::open(&dir.path().join("o"), cfg).unwrap();
        let tasks: Vec<_> = (0..64u32)
            .map(|i| {
                let ob = ob.clone();
                tokio::spawn(async move {
                    let mut taken = 0u64;
                    for j in 0..20u32 {
                        let n = 1 + (i * 7 + j * 3) % 9;
                        let r = if j % 2 == 0 {
                            stage(&ob, n).await.map(drop)
                        } else {
                            ob.enqueue((0..n).map(notice).collect()).await.map(drop)
                        };
                        match r {
                            Ok(()) => taken += u64::from(n),
                            Err(OutboxError::Full { limit: 1000, .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                        assert!(ob.held().0 <= 1000);
                    }
                    taken
                })
            })
            .collect();
        let mut taken = 0;
        for t in tasks {
            taken += t.await.unwrap();
        }
        assert!(taken <= 1000 && taken > 900, "{taken}");
        assert_eq!(ob.held().0, taken);
        assert_eq!(ob.depth() + staged_notices(&ob), taken);
    }

    /// Two intake rounds in one group commit: the second settles the record the first wrote
    /// (still only in that commit), which counts once.
    #[tokio::test]
    // The guard is held over `settle_begin`, which only hands the request over (no wait).
    #[allow(clippy::await_holding_lock)]
    async fn a_record_written_and_settled_in_one_group_commit_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(&dir.path().join("o"), OutboxConfig::default()).unwrap();
        // Keep the committer busy inside a round (a promotion waits for `next_due`) until
        // both settles are in its channel, so they make the next round together.
        let due = lock(&ob.shared.next_due);
        ob.shared.promote_requested.store(true, Ordering::SeqCst);
        ob.tx.send(Request::Promote).unwrap();
        while ob.shared.promote_requested.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let seq = ob.reserve_seq().unwrap();
        let first = ob
            .settle_begin(Settle {
                insert: vec![rec(seq, 3, b"m")],
                admitted: ob.admit(3).unwrap(),
                ..Default::default()
            })
            .await
            .unwrap();
        let second = ob
            .settle_begin(Settle {
                remove: vec![seq],
                enqueue: vec![notice(1), notice(2)],
                ..Default::default()
            })
            .await
            .unwrap();
        drop(due);
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        assert_eq!(
            ob.stats.commits.load(Ordering::Relaxed),
            1,
            "both settles in one group commit"
        );
        assert!(ob.staged().unwrap().is_empty());
        assert_eq!(ob.stats.staged.load(Ordering::Relaxed), 0);
        assert_eq!(staged_notices(&ob), 0);
        assert_eq!((ob.held().0, ob.depth()), (2, 2));
    }

    #[tokio::test]
    async fn the_count_is_rebuilt_from_the_journal_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let ob = Outbox::open(&a, OutboxConfig::default()).unwrap();
        // No checkpoint: everything below is in the journal only, as after a crash.
        ob.shared.journal.stop_checkpoints();
        let s1 = stage(&ob, 5).await.unwrap();
        stage(&ob, 3).await.unwrap();
        ob.settle(Settle {
            rewrite: vec![rec(s1, 2, b"m")],
            enqueue: (0..3).map(notice).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
        ob.enqueue(vec![notice(7)]).await.unwrap();
        let ready = ob.ready(None, 10).unwrap();
        ob.dead_letter(ready[0].id, "refused").unwrap();
        // A staged record written before records carried their count.
        let legacy = ob.reserve_seq().unwrap();
        let mut ops = Ops::default();
        ops.insert(&seq_key(S, legacy)[..], &br#"{"e":[]}"#[..]);
        ob.write(&ops, true).unwrap();
        ob.barrier();
        assert_eq!(ob.held().0, 2 + 3 + 3 + 1 - 1);
        crash_copy(&a, &b);
        ob.close();
        drop(ob);
        for path in [&a, &b] {
            let ob = Outbox::open(path, OutboxConfig::default()).unwrap();
            assert_eq!(
                ob.held().0,
                9,
                "{}: the legacy record counts one",
                path.display()
            );
            assert_eq!((ob.depth(), staged_notices(&ob)), (3, 6));
            assert_eq!(ob.stats.dead.load(Ordering::Relaxed), 1);
            let staged = ob.staged().unwrap();
            assert_eq!(staged.len(), 3);
            assert_eq!(staged[2], rec(legacy, 1, br#"{"e":[]}"#));
            ob.close();
        }
    }

    /// Copies `from`'s journal segments to a fresh store at `to`: what a crash leaves when
    /// sled kept nothing of what the journal holds (no checkpoint since).
    fn crash_copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to.join("journal")).unwrap();
        for f in std::fs::read_dir(from.join("journal")).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "wal") {
                std::fs::copy(&f, to.join("journal").join(f.file_name().unwrap())).unwrap();
            }
        }
    }

    /// sled makes its id counter durable only when sled is flushed, which the journal puts
    /// off to checkpoints; the journal then replays notices and staged records under numbers
    /// the recovered counter hands out again. New numbers must follow the replayed ones: a
    /// notice queued under a number below the link client's cursor was never offered until
    /// the next session (the kill -9 end-to-end test stalled), and one queued under a replayed
    /// group's key replaced that group.
    #[tokio::test]
    async fn numbers_after_a_crash_follow_the_ones_the_journal_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let ob = Outbox::open(&a, OutboxConfig::default()).unwrap();
        ob.shared.journal.stop_checkpoints();
        let staged = stage(&ob, 1).await.unwrap();
        let before: Vec<_> = (0..3).map(notice).collect();
        ob.enqueue(before.clone()).await.unwrap();
        ob.barrier();
        crash_copy(&a, &b);
        ob.close();
        drop(ob);

        let ob = Outbox::open(&b, OutboxConfig::default()).unwrap();
        // The link client's new session sends everything queued...
        let sent = ob.ready(None, 10).unwrap();
        assert_eq!(ids(&sent), ids_of(&before));
        let cursor = sent.last().map(|i| i.seq);
        // ...then an arrival is staged and another queued: both keep what was replayed,
        let again = stage(&ob, 1).await.unwrap();
        assert_ne!(again, staged);
        assert_eq!(ob.staged().unwrap().len(), 2);
        let fresh = notice(9);
        ob.enqueue(vec![fresh.clone()]).await.unwrap();
        assert_eq!(ob.list(10).unwrap().len(), 4);
        // and the new notice comes after the cursor, in this session.
        assert_eq!(ids(&ob.ready(cursor, 10).unwrap()), vec![fresh.id]);
        ob.close();
    }

    #[tokio::test]
    async fn enqueue_ready_acked() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(&dir.path().join("o"), OutboxConfig::default()).unwrap();
        let ns: Vec<_> = (0..3).map(notice).collect();
        let seqs = ob.enqueue(ns.clone()).await.unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ob.depth(), 3);
        let ready = ob.ready(None, 10).unwrap();
        assert_eq!(ids(&ready), ns.iter().map(|n| n.id).collect::<Vec<_>>());
        assert_eq!(ready[1].seq, seqs[1]);
        assert_eq!(ready[1].payload, ns[1].encode_payload().unwrap());
        assert_eq!(
            Notification::decode_payload(ready[2].id, &ready[2].payload).unwrap(),
            ns[2]
        );
        // The cursor and the limit are honoured.
        assert_eq!(ids(&ob.ready(Some(seqs[0]), 1).unwrap()), vec![ns[1].id]);
        ob.acked(&[ns[0].id, ns[1].id]).unwrap();
        // A second ack (a resend acknowledged twice) changes nothing.
        ob.acked(&[ns[0].id]).unwrap();
        assert_eq!(ob.depth(), 1);
        assert_eq!(ids(&ob.ready(None, 10).unwrap()), vec![ns[2].id]);
        assert_eq!(ob.stats.acked.load(Ordering::Relaxed), 2);
        assert!(ob.enqueue(Vec::new()).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn acknowledged_items_are_never_offered_again() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(&dir.path().join("o"), OutboxConfig::default()).unwrap();
        let ns: Vec<_> = (0..200).map(notice).collect();
        ob.enqueue(ns.clone()).await.unwrap();
        let first = ob.ready(None, 150).unwrap();
        ob.acked(&ids(&first)).unwrap();
        assert_eq!(ob.depth(), 50);
        // A new session starts from the beginning: whether or not the deletions have been
        // applied yet, it gets the 50 that are left.
        let again = ob.ready(None, 10).unwrap();
        assert_eq!(
            ids(&again),
            ns[150..160].iter().map(|n| n.id).collect::<Vec<_>>()
        );
        assert_eq!(ob.list(1000).unwrap().len(), 50);
    }

    /// Drives the outbox as the link client does while notices keep arriving and some are
    /// deferred: every notice is offered (after the cursor) until acknowledged, none is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_loop_with_deferrals_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(&dir.path().join("o"), OutboxConfig::default()).unwrap();
        let all: Vec<_> = (0..300).map(notice).collect();
        let want: HashSet<NotifId> = all.iter().map(|n| n.id).collect();
        let producer = {
            let ob = ob.clone();
            let all = all.clone();
            tokio::spawn(async move {
                for chunk in all.chunks(7) {
                    ob.enqueue(chunk.to_vec()).await.unwrap();
                }
            })
        };
        let mut acked = HashSet::new();
        let mut deferred = HashSet::new();
        let mut cursor = None;
        for _ in 0..100_000 {
            if acked.len() == want.len() {
                break;
            }
            let items = ob.ready(cursor, 16).unwrap();
            if items.is_empty() {
                ob.barrier();
                tokio::task::yield_now().await;
                continue;
            }
            for it in &items {
                cursor = Some(it.seq);
                // Defer every notice once (due at once), then acknowledge it.
                if deferred.insert(it.id) && it.seq % 3 == 0 {
                    ob.retry_later(it.id, Duration::ZERO, "busy").unwrap();
                } else {
                    ob.acked(&[it.id]).unwrap();
                    assert!(acked.insert(it.id), "{} offered after its ack", it.id);
                }
            }
        }
        producer.await.unwrap();
        assert_eq!(acked, want);
        assert_eq!(ob.depth(), 0);
    }

    /// ACKs (the committer's bulk deletes and the client's own when the committer is busy),
    /// retry-later and dead letters rewrite the same groups from three threads at once; none
    /// loses another's change.
    #[test]
    fn concurrent_changes_to_one_group_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o");
        let ob = Outbox::open(&path, OutboxConfig::default()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let all: Vec<_> = (0..600).map(notice).collect();
        // Two commits: two groups of 300.
        for half in all.chunks(300) {
            rt.block_on(ob.enqueue(half.to_vec())).unwrap();
        }
        let items = ob.ready(None, 1000).unwrap();
        assert_eq!(items.len(), 600);
        let ids: Vec<NotifId> = items.iter().map(|i| i.id).collect();
        let part = |r: usize| ids.iter().copied().skip(r).step_by(3).collect::<Vec<_>>();
        let (ack, defer, bury) = (part(0), part(1), part(2));
        std::thread::scope(|s| {
            let o = ob.clone();
            s.spawn(move || {
                for (i, chunk) in ack.chunks(10).enumerate() {
                    if i % 2 == 0 {
                        o.acked(chunk).unwrap();
                    } else {
                        // The path an ACK takes when the committer's queue is full.
                        for id in chunk {
                            let seq = lock(&o.shared.tracker).handed.remove(id).unwrap();
                            o.shared.sub_depth(1);
                            o.shared.forget(&o.db, &[seq]).unwrap();
                        }
                    }
                }
            });
            let o = ob.clone();
            s.spawn(move || {
                for id in defer {
                    o.retry_later(id, Duration::from_secs(3600), "busy")
                        .unwrap();
                }
            });
            let o = ob.clone();
            s.spawn(move || {
                for id in bury {
                    o.dead_letter(id, "refused").unwrap();
                }
            });
        });
        ob.close();
        drop(ob);
        let ob = Outbox::open(&path, OutboxConfig::default()).unwrap();
        assert!(
            ob.ready(None, 1000).unwrap().is_empty(),
            "nothing left queued"
        );
        let deferred: HashSet<NotifId> = ob.list(1000).unwrap().iter().map(|i| i.id).collect();
        assert_eq!(deferred, part(1).into_iter().collect());
        let dead: HashSet<NotifId> = ob
            .dead_letters(1000)
            .unwrap()
            .iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(dead, part(2).into_iter().collect());
        assert_eq!(ob.depth(), 200);
        assert_eq!(
            ob.db.scan_prefix([Q]).count(),
            0,
            "emptied groups are deleted"
        );
    }

    #[tokio::test]
    async fn durable_across_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o");
        let ns: Vec<_> = (0..5).map(notice).collect();
        let old_seqs = {
            let ob = Outbox::open(&path, OutboxConfig::default()).unwrap();
            let mut seqs = ob.enqueue(ns[..2].to_vec()).await.unwrap();
            seqs.extend(ob.enqueue(ns[2..].to_vec()).await.unwrap());
            assert_eq!(ob.ready(None, 10).unwrap().len(), 5);
            // Acknowledged before close: deleted (by the committer) before it stops.
            ob.acked(&[ns[1].id]).unwrap();
            ob.close();
            assert!(matches!(
                ob.enqueue(vec![notice(9)]).await,
                Err(OutboxError::Stopped)
            ));
            seqs
        };
        let ob = Outbox::open(&path, OutboxConfig::default()).unwrap();
        assert_eq!(ob.depth(), 4);
        let ready = ob.ready(None, 10).unwrap();
        let want: Vec<_> = [0, 2, 3, 4].iter().map(|&i| ns[i].id).collect();
        assert_eq!(ids(&ready), want);
        assert_eq!(ready[0].seq, old_seqs[0]);
        let listed = ob.list(10).unwrap();
        assert_eq!(listed.len(), 4);
        assert_eq!(listed[3].notification().unwrap(), ns[4]);
        // New sequence numbers come after the old ones.
        let new = ob.enqueue(vec![notice(5)]).await.unwrap();
        assert!(new[0] > old_seqs[4]);
    }

    #[tokio::test]
    async fn retry_later_defers_and_reappears_after_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let (clock, cfg) = manual_clock();
        let ob = Outbox::open(&dir.path().join("o"), cfg).unwrap();
        let ns: Vec<_> = (0..3).map(notice).collect();
        ob.enqueue(ns.clone()).await.unwrap();
        let sent = ob.ready(None, 10).unwrap();
        let cursor = sent[2].seq;
        ob.retry_later(ns[0].id, Duration::from_secs(60), "modem busy")
            .unwrap();
        ob.acked(&[ns[1].id, ns[2].id]).unwrap();
        assert!(ob.ready(Some(cursor), 10).unwrap().is_empty());
        assert!(ob.ready(None, 10).unwrap().is_empty(), "not due yet");
        assert_eq!(ob.depth(), 1);
        let listed = ob.list(10).unwrap();
        assert_eq!(
            listed[0].not_before_ms,
            Some(clock.load(Ordering::SeqCst) + 60_000)
        );
        assert_eq!(listed[0].attempts, 1);
        assert_eq!(listed[0].last_reason, "modem busy");

        clock.fetch_add(60_000, Ordering::SeqCst);
        // The first call asks the committer to requeue it; it is offered once that is done.
        let mut again = ob.ready(Some(cursor), 10).unwrap();
        if again.is_empty() {
            ob.barrier();
            again = ob.ready(Some(cursor), 10).unwrap();
        }
        assert_eq!(ids(&again), vec![ns[0].id]);
        assert!(again[0].seq > cursor);
        let listed = ob.list(10).unwrap();
        assert_eq!(listed[0].not_before_ms, None);
        assert_eq!(listed[0].attempts, 1);
        ob.acked(&[ns[0].id]).unwrap();
        assert_eq!(ob.depth(), 0);
        assert_eq!(ob.stats.deferred.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn deferred_notice_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o");
        let (clock, cfg) = manual_clock();
        let n = notice(1);
        {
            let ob = Outbox::open(&path, cfg.clone()).unwrap();
            ob.enqueue(vec![n.clone()]).await.unwrap();
            ob.retry_later(n.id, Duration::from_secs(5), "busy")
                .unwrap();
            ob.close();
        }
        let ob = Outbox::open(&path, cfg).unwrap();
        assert_eq!(ob.depth(), 1);
        assert!(ob.ready(None, 10).unwrap().is_empty());
        clock.fetch_add(5_000, Ordering::SeqCst);
        let mut again = ob.ready(None, 10).unwrap();
        if again.is_empty() {
            ob.barrier();
            again = ob.ready(None, 10).unwrap();
        }
        assert_eq!(ids(&again), vec![n.id]);
    }

    #[tokio::test]
    async fn dead_letters_retry_and_purge() {
        let dir = tempfile::tempdir().unwrap();
        let (clock, cfg) = manual_clock();
        let ob = Outbox::open(&dir.path().join("o"), cfg).unwrap();
        let (a, b) = (notice(1), notice(2));
        ob.enqueue(vec![a.clone(), b.clone()]).await.unwrap();
        let sent = ob.ready(None, 10).unwrap();
        ob.dead_letter(a.id, "invalid phone number").unwrap();
        assert_eq!(ob.depth(), 1);
        assert_eq!(ids(&ob.ready(None, 10).unwrap()), vec![b.id]);
        let dead = ob.dead_letters(10).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].id, a.id);
        assert_eq!(dead[0].reason, "invalid phone number");
        assert_eq!(dead[0].notification().unwrap(), a);
        // An ack for a dead letter does not delete it.
        ob.acked(&[a.id]).unwrap();
        assert_eq!(ob.dead_letters(10).unwrap().len(), 1);

        assert_eq!(ob.retry_dead(Select::Id(b.id)).unwrap(), 0, "b is not dead");
        assert_eq!(ob.retry_dead(Select::Id(a.id)).unwrap(), 1);
        assert!(ob.dead_letters(10).unwrap().is_empty());
        assert_eq!(ob.depth(), 2);
        let again = ob.ready(Some(sent[1].seq), 10).unwrap();
        assert_eq!(ids(&again), vec![a.id], "requeued after the cursor");

        ob.dead_letter(a.id, "still invalid").unwrap();
        ob.dead_letter(b.id, "also invalid").unwrap();
        assert_eq!(ob.stats.dead.load(Ordering::Relaxed), 2);
        assert_eq!(ob.purge_dead(Duration::from_secs(3600)).unwrap(), 0);
        clock.fetch_add(7_200_000, Ordering::SeqCst);
        assert_eq!(ob.purge_dead(Duration::from_secs(3600)).unwrap(), 2);
        assert!(ob.dead_letters(10).unwrap().is_empty());
        assert_eq!(ob.retry_dead(Select::All).unwrap(), 0);
        assert_eq!(ob.depth(), 0);
        // A purged id can be queued again.
        ob.enqueue(vec![a.clone()]).await.unwrap();
        assert_eq!(ids(&ob.ready(None, 10).unwrap()), vec![a.id]);
    }

    #[tokio::test]
    async fn stale_notices_expire_to_the_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let (clock, cfg) = manual_clock();
        let ob = Outbox::open(&dir.path().join("o"), cfg).unwrap();
        let (old, fresh) = (notice(1), notice(2));
        ob.enqueue(vec![old.clone()]).await.unwrap();
        clock.fetch_add(23 * 3_600_000, Ordering::SeqCst);
        ob.enqueue(vec![fresh.clone()]).await.unwrap();
        clock.fetch_add(2 * 3_600_000, Ordering::SeqCst);
        assert_eq!(ids(&ob.ready(None, 10).unwrap()), vec![fresh.id]);
        assert_eq!(ob.depth(), 1);
        let dead = ob.dead_letters(10).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].id, old.id);
        assert!(dead[0].reason.starts_with("expired"), "{}", dead[0].reason);
        // Requeued by the operator, it is sent (its age counts from the retry).
        assert_eq!(ob.retry_dead(Select::Id(old.id)).unwrap(), 1);
        assert_eq!(ids(&ob.ready(None, 10).unwrap()), vec![fresh.id, old.id]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_enqueues_are_group_committed() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(&dir.path().join("o"), OutboxConfig::default()).unwrap();
        let (tasks, per_task) = (50, 20);
        let mut handles = Vec::new();
        for t in 0..tasks {
            let ob = ob.clone();
            handles.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..per_task {
                    seqs.extend(ob.enqueue(vec![notice(t * 100 + i)]).await.unwrap());
                }
                seqs
            }));
        }
        let mut all = HashSet::new();
        for h in handles {
            for s in h.await.unwrap() {
                assert!(all.insert(s), "duplicate seq {s}");
            }
        }
        let total = u64::from(tasks * per_task);
        assert_eq!(all.len() as u64, total);
        assert_eq!(ob.depth(), total);
        assert_eq!(ob.ready(None, 10_000).unwrap().len() as u64, total);
        let commits = ob.stats.commits.load(Ordering::Relaxed);
        assert!(commits < total, "{commits} commits for {total} notices");
        assert_eq!(ob.stats.enqueued.load(Ordering::Relaxed), total);
    }

    #[tokio::test]
    async fn full_outbox_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = OutboxConfig {
            max_depth: 2,
            ..Default::default()
        };
        let ob = Outbox::open(&dir.path().join("o"), cfg).unwrap();
        ob.enqueue(vec![notice(1), notice(2)]).await.unwrap();
        assert!(matches!(
            ob.enqueue(vec![notice(3)]).await,
            Err(OutboxError::Full { held: 2, limit: 2 })
        ));
        assert_eq!(ob.depth(), 2);
    }

    #[tokio::test]
    async fn second_open_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o");
        let _ob = Outbox::open(&path, OutboxConfig::default()).unwrap();
        let cfg = OutboxConfig {
            lock_wait: Duration::ZERO,
            ..Default::default()
        };
        let err = Outbox::open(&path, cfg)
            .err()
            .expect("second open must fail");
        assert!(matches!(err, OutboxError::Locked { .. }), "{err:?}");
        assert!(err.to_string().contains("already open"), "{err}");
    }

    #[test]
    fn records_round_trip_and_reject_truncation() {
        let r = Record {
            enqueued_at_ms: 123,
            attempts: 4,
            id: NotifId::random(),
            reason: "忙".into(),
            payload: vec![1, 2, 3],
        };
        let enc = r.encode();
        assert_eq!(Record::decode(&enc), Some(r.clone()));
        assert_eq!(Record::id_and_payload(&enc), Some((r.id, vec![1, 2, 3])));
        for cut in 0..RECORD_HEAD + 3 {
            assert_eq!(Record::decode(&enc[..cut]), None, "cut at {cut}");
        }
        let d = decode_dead(7, &dead_value(99, "bad number", &r)).unwrap();
        assert_eq!(
            (d.seq, d.dead_at_ms, d.reason.as_str()),
            (7, 99, "bad number")
        );
        assert_eq!((d.id, d.attempts, d.payload), (r.id, 4, vec![1, 2, 3]));
        // Over-long reasons are cut on a character boundary.
        let long = "错".repeat(MAX_REASON);
        let cut = truncated(&long, MAX_REASON);
        assert!(cut.len() <= MAX_REASON && long.starts_with(cut));
    }

    #[test]
    fn groups_round_trip_and_reject_damage() {
        let recs: Vec<Vec<u8>> = (0..3u8)
            .map(|i| {
                Record {
                    enqueued_at_ms: 1,
                    attempts: 0,
                    id: NotifId::random(),
                    reason: String::new(),
                    payload: vec![i; usize::from(i) * 7],
                }
                .encode()
            })
            .collect();
        let members = [
            (10u64, &recs[0][..]),
            (11, &recs[1][..]),
            (15, &recs[2][..]),
        ];
        let enc = encode_group(members.iter().copied());
        assert_eq!(decode_group(10, &enc).unwrap(), members.to_vec());
        // A value written before groups is a group of one under its key's number.
        assert_eq!(decode_group(4, &recs[0]).unwrap(), vec![(4, &recs[0][..])]);
        for cut in 0..enc.len() {
            assert_eq!(decode_group(10, &enc[..cut]), None, "cut at {cut}");
        }
        let mut longer = enc.clone();
        longer.push(0);
        assert_eq!(decode_group(10, &longer), None, "trailing bytes");
        // Members below the key, or out of order, are damage.
        assert_eq!(decode_group(11, &enc), None);
        let swapped = encode_group([(11u64, &recs[0][..]), (10, &recs[1][..])].into_iter());
        assert_eq!(decode_group(10, &swapped), None);
        let mut unknown = enc;
        unknown[0] = 9;
        assert_eq!(decode_group(10, &unknown), None);
    }

    /// One group commit is one `q` value; acks, retry-later and dead letters take single
    /// members out of it, and what is left survives a reopen.
    #[tokio::test]
    async fn members_of_one_commit_leave_their_group_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o");
        let ob = Outbox::open(&path, OutboxConfig::default()).unwrap();
        let ns: Vec<_> = (0..6).map(notice).collect();
        ob.enqueue(ns.clone()).await.unwrap();
        ob.shared.journal.caught_up();
        assert_eq!(ob.db.scan_prefix([Q]).count(), 1, "one commit, one value");
        // A bigger commit is cut into groups of at most GROUP_MAX.
        let many: Vec<_> = (0..(2 * GROUP_MAX + 3) as u32).map(notice).collect();
        ob.enqueue(many.clone()).await.unwrap();
        ob.shared.journal.caught_up();
        let sizes: Vec<usize> = ob
            .db
            .scan_prefix([Q])
            .skip(1)
            .map(|kv| {
                let (k, v) = kv.unwrap();
                decode_group(seq_of(&k).unwrap(), &v).unwrap().len()
            })
            .collect();
        assert_eq!(sizes, vec![GROUP_MAX, GROUP_MAX, 3]);
        let all = ob.ready(None, 10_000).unwrap();
        assert_eq!(all.len(), 6 + many.len());
        ob.acked(&ids(&all[6..])).unwrap();
        let ready = ob.ready(None, 10).unwrap();
        assert_eq!(ids(&ready), ns.iter().map(|n| n.id).collect::<Vec<_>>());
        // The middle of the group: acked, deferred, dead-lettered.
        ob.acked(&[ns[1].id, ns[4].id]).unwrap();
        ob.retry_later(ns[2].id, Duration::from_secs(3600), "busy")
            .unwrap();
        ob.dead_letter(ns[3].id, "no such number").unwrap();
        ob.barrier();
        // Reading from inside the group (the cursor past its first member) works too.
        assert_eq!(
            ids(&ob.ready(Some(ready[0].seq), 10).unwrap()),
            vec![ns[5].id]
        );
        ob.close();
        drop(ob);
        let ob = Outbox::open(&path, OutboxConfig::default()).unwrap();
        assert_eq!(ob.depth(), 3, "two queued and one deferred");
        assert_eq!(ids(&ob.ready(None, 10).unwrap()), vec![ns[0].id, ns[5].id]);
        let listed: Vec<_> = ob.list(10).unwrap().into_iter().map(|i| i.id).collect();
        assert_eq!(listed, vec![ns[0].id, ns[5].id, ns[2].id]);
        let dead = ob.dead_letters(10).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].id, dead[0].reason.as_str()),
            (ns[3].id, "no such number")
        );
        // The last members gone, the group's value goes too.
        ob.acked(&[ns[0].id, ns[5].id]).unwrap();
        ob.barrier();
        ob.close();
        drop(ob);
        let ob = Outbox::open(&path, OutboxConfig::default()).unwrap();
        assert!(ob.ready(None, 10).unwrap().is_empty());
        assert_eq!(ob.db.scan_prefix([Q]).count(), 0);
        assert_eq!(ob.depth(), 1, "the deferred one");
    }

    /// A store written before groups keeps one record per `q` key: it is read, sent and
    /// acknowledged like any other.
    #[tokio::test]
    async fn a_store_from_before_groups_is_read_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o");
        let ns: Vec<_> = (0..2).map(notice).collect();
        {
            let db = sled::open(&path).unwrap();
            for (seq, n) in [7u64, 9].into_iter().zip(&ns) {
                let r = Record {
                    enqueued_at_ms: 1_700_000_000_000,
                    attempts: 0,
                    id: n.id,
                    reason: String::new(),
                    payload: n.encode_payload().unwrap(),
                };
                db.insert(seq_key(Q, seq), r.encode()).unwrap();
                let _ = db.generate_id().unwrap();
            }
            db.flush().unwrap();
        }
        let (_, cfg) = manual_clock();
        let ob = Outbox::open(&path, cfg).unwrap();
        assert_eq!(ob.depth(), 2);
        let ready = ob.ready(None, 10).unwrap();
        assert_eq!(
            ready.iter().map(|i| (i.seq, i.id)).collect::<Vec<_>>(),
            vec![(7, ns[0].id), (9, ns[1].id)]
        );
        assert_eq!(
            Notification::decode_payload(ready[1].id, &ready[1].payload).unwrap(),
            ns[1]
        );
        let fresh = notice(3);
        ob.enqueue(vec![fresh.clone()]).await.unwrap();
        ob.acked(&[ns[0].id]).unwrap();
        ob.barrier();
        assert_eq!(
            ids(&ob.ready(Some(7), 10).unwrap()),
            vec![ns[1].id, fresh.id]
        );
    }
}
