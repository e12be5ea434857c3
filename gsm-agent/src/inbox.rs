//! The agent's durable inbox (sled): queued notices, the de-duplication store, dead letters and
//! the record of submits that were in flight when the agent stopped.
//!
//! Every write goes through one committer thread that applies all pending requests as one
//! atomic sled batch and then flushes once (group commit): one fsync covers every item that
//! arrived meanwhile, from every link session, plus the dispatcher's state changes. Nothing is
//! acknowledged to the sender before that flush returns.
//!
//! Keys (one tree, prefixed, so one batch is atomic across them):
//! ```text
//! q <seq:u64be>   a notice: the record while it is queued, then a tombstone
//!                 0xff <received_at_ms:i64be> <id:16> that keeps the id known (dedupe)
//! x <seq:u64be>   dead letter          -> reason_len:u16be reason record
//! u <seq:u64be>   uncertain submit     -> record (in flight at the modem when the agent died)
//! record = ver:u8(1) state:u8(0 queued, 1 in flight) attempts:u16be next_at_ms:i64be
//!          received_at_ms:i64be id:16 peer_len:u8 peer seq:u64be payload
//! ```
//! Receipt costs one sequential write (keys grow with `seq`, from `generate_id`, so in arrival
//! order): the record doubles as the dedupe entry. The de-duplication lookup and the queue
//! order are in memory (a set of every id within the retention window and the queued
//! seq -> id map), rebuilt from the records and tombstones at start-up: about 50 bytes per id,
//! so a week at 100,000 SMS a day (more than ten modems can send) is about 35 MB.
//!
//! Tombstones outlive the notice: they are kept for `dedupe_retention` (default 7 days)
//! after receipt and then purged, so a sender that resends an id older than that would be
//! treated as new. The mail-host outbox expires items long before that.
//!
//! Payload decoding and validation run on the caller's thread, before the committer, so the
//! one serial thread does only the dedupe lookup and the write.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use mailbell_link::durable::{open_waiting, OpenWaiting};
use mailbell_link::net::Inbox as LinkInbox;
use mailbell_link::receiver::Outcome;
use mailbell_link::{NackClass, NotifId, Notification};
use tokio::sync::{oneshot, Notify};
use tracing::{error, info, warn};

/// Inbox errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError {
    #[error("open inbox at {path}")]
    Open { path: String, source: sled::Error },
    #[error("inbox at {path} is already open (by this or another process)")]
    Locked { path: String },
    #[error("inbox store: {0}")]
    Store(#[from] sled::Error),
    #[error("inbox committer is not running")]
    Stopped,
    #[error("corrupt inbox record under key {0}")]
    Corrupt(String),
}

/// Checks a notice at receipt; an `Err` is a permanent NACK with that reason.
pub type Validator = Arc<dyn Fn(&Notification) -> Result<(), String> + Send + Sync>;

/// Tunables.
#[derive(Clone, Debug)]
pub struct InboxConfig {
    pub dedupe_retention: Duration,
    /// Above this many queued notices new ones get a retry-later NACK.
    pub max_queued: u64,
    /// Whether a submit in flight when the agent died is sent again (possible duplicate SMS)
    /// or dead-lettered (possible lost SMS).
    pub resend_uncertain: bool,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            dedupe_retention: Duration::from_secs(7 * 86_400),
            max_queued: 1_000_000,
            resend_uncertain: true,
        }
    }
}

/// A queued notice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub in_flight: bool,
    pub attempts: u16,
    pub next_at_ms: i64,
    pub received_at_ms: i64,
    pub id: NotifId,
    pub peer: String,
    pub payload: Vec<u8>,
}

const TOMBSTONE: u8 = 0xff;

impl Record {
    fn encode(&self) -> Vec<u8> {
        let peer = &self.peer.as_bytes()[..self.peer.len().min(255)];
        let mut v = Vec::with_capacity(46 + peer.len() + self.payload.len());
        v.push(1);
        v.push(u8::from(self.in_flight));
        v.extend_from_slice(&self.attempts.to_be_bytes());
        v.extend_from_slice(&self.next_at_ms.to_be_bytes());
        v.extend_from_slice(&self.received_at_ms.to_be_bytes());
        v.extend_from_slice(self.id.as_bytes());
        v.push(peer.len() as u8);
        v.extend_from_slice(peer);
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.payload);
        v
    }

    fn decode(v: &[u8]) -> Option<Self> {
        if v.len() < 37 || v[0] != 1 {
            return None;
        }
        let attempts = u16::from_be_bytes([v[2], v[3]]);
        let next_at_ms = i64::from_be_bytes(v[4..12].try_into().ok()?);
        let received_at_ms = i64::from_be_bytes(v[12..20].try_into().ok()?);
        let id = NotifId(v[20..36].try_into().ok()?);
        let plen = usize::from(v[36]);
        let peer = std::str::from_utf8(v.get(37..37 + plen)?).ok()?.to_string();
        let seq = u64::from_be_bytes(v.get(37 + plen..45 + plen)?.try_into().ok()?);
        Some(Self {
            seq,
            in_flight: v[1] == 1,
            attempts,
            next_at_ms,
            received_at_ms,
            id,
            peer,
            payload: v.get(45 + plen..)?.to_vec(),
        })
    }

    /// The decoded notice (payloads were validated at receipt).
    pub fn notification(&self) -> Option<Notification> {
        Notification::decode_payload(self.id, &self.payload).ok()
    }
}

fn key(prefix: u8, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn tombstone(received_at_ms: i64, id: &NotifId) -> [u8; 25] {
    let mut v = [0u8; 25];
    v[0] = TOMBSTONE;
    v[1..9].copy_from_slice(&received_at_ms.to_be_bytes());
    v[9..].copy_from_slice(id.as_bytes());
    v
}

/// (received_at_ms, id) of a tombstone.
fn decode_tombstone(v: &[u8]) -> Option<(i64, NotifId)> {
    if v.first() != Some(&TOMBSTONE) || v.len() != 25 {
        return None;
    }
    Some((
        i64::from_be_bytes(v[1..9].try_into().ok()?),
        NotifId(v[9..25].try_into().ok()?),
    ))
}

fn seq_of(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.get(1..9)?.try_into().ok()?))
}

/// What the dispatcher reports about a notice.
#[derive(Clone, Debug)]
pub enum Change {
    /// About to be handed to a modem: mark it so a crash leaves a trace.
    InFlight(u64),
    /// The SMS went out: forget the notice (its id stays known).
    Sent(u64),
    /// Try again later.
    Retry {
        seq: u64,
        attempts: u16,
        next_at_ms: i64,
    },
    /// Give up after `attempts` submits to a modem, with the reason.
    Dead {
        seq: u64,
        attempts: u16,
        reason: String,
    },
    /// An operator sends a dead letter again (attempts start over).
    Requeue(u64),
}

/// A notice checked on the caller's thread: its payload, or the reason it is refused.
type Checked = (NotifId, Result<Vec<u8>, String>);

enum Request {
    Store {
        peer: Arc<str>,
        batch: Vec<Checked>,
        reply: oneshot::Sender<Vec<Outcome>>,
    },
    Change {
        change: Change,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Stop,
}

impl Request {
    fn items(&self) -> usize {
        match self {
            Request::Store { batch, .. } => batch.len(),
            Request::Change { .. } | Request::Stop => 1,
        }
    }
}

/// Items after which the committer stops collecting requests and commits.
const COMMIT_ITEMS: usize = 128;

/// Counters for metrics and status.
#[derive(Debug, Default)]
pub struct InboxStats {
    pub queued: AtomicU64,
    pub dead: AtomicU64,
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    pub commits: AtomicU64,
    pub uncertain: AtomicU64,
}

/// The queue order (seq -> id, due time) and every id within the retention window. Only the
/// committer adds to it, after a commit; the retention purge removes from it.
#[derive(Default)]
struct Index {
    by_seq: BTreeMap<u64, (NotifId, i64)>,
    seen: HashSet<NotifId>,
}

fn lock(index: &Mutex<Index>) -> MutexGuard<'_, Index> {
    index.lock().unwrap_or_else(|p| p.into_inner())
}

/// The earliest due time of a deferred notice, if any.
pub type NextDue = Option<i64>;

/// The inbox handle: cheap to clone, shared by link sessions and the dispatcher.
#[derive(Clone)]
pub struct Inbox {
    db: sled::Db,
    tx: mpsc::SyncSender<Request>,
    notify: Arc<Notify>,
    index: Arc<Mutex<Index>>,
    validator: Validator,
    committer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    pub stats: Arc<InboxStats>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Inbox {
    /// Opens (or creates) the inbox, recovers submits that were in flight, and starts the
    /// committer thread. Waits up to 2 s for a store another handle still holds (a restarting
    /// agent's predecessor, or sled's I/O threads finishing after a close). Blocking.
    pub fn open(path: &Path, cfg: InboxConfig, validator: Validator) -> Result<Self, InboxError> {
        // A predecessor's sled I/O threads may hold the lock for a moment after its close.
        let config = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput);
        let db = open_waiting(&config, LOCK_WAIT).map_err(|e| match e {
            OpenWaiting::Locked => InboxError::Locked {
                path: path.display().to_string(),
            },
            OpenWaiting::Sled(source) => InboxError::Open {
                path: path.display().to_string(),
                source,
            },
        })?;
        let synced =
            mailbell_link::durable::SyncedFlush::open(path).map_err(|e| InboxError::Open {
                path: path.display().to_string(),
                source: sled::Error::Io(e),
            })?;
        let stats = Arc::new(InboxStats::default());
        let index = Arc::new(Mutex::new(recover(&db, &cfg, &stats)?));
        let (tx, rx) = mpsc::sync_channel(4096);
        let notify = Arc::new(Notify::new());
        let committer = Committer {
            db: db.clone(),
            synced,
            cfg,
            stats: stats.clone(),
            notify: notify.clone(),
            index: index.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("inbox-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(|e| InboxError::Corrupt(format!("spawn committer: {e}")))?;
        Ok(Self {
            db,
            tx,
            notify,
            index,
            validator,
            committer: Arc::new(Mutex::new(Some(handle))),
            stats,
        })
    }

    /// Commits what is pending, stops the committer and flushes. Later writes through any
    /// clone fail with a retry-later answer; the store closes when the last clone is dropped.
    pub fn close(&self) {
        let _ = self.tx.send(Request::Stop);
        let handle = self.committer.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
        let _ = self.db.flush();
    }

    /// Signalled when new notices are queued.
    pub fn notifier(&self) -> Arc<Notify> {
        self.notify.clone()
    }

    /// Queued notices due at `now_ms`, oldest first, skipping `busy` sequence numbers.
    /// Also returns the earliest future due time seen, for the dispatcher's timer.
    pub fn ready(
        &self,
        now_ms: i64,
        max: usize,
        busy: &HashSet<u64>,
    ) -> Result<(Vec<(u64, NotifId)>, NextDue), InboxError> {
        let mut due = Vec::new();
        let mut next: Option<i64> = None;
        let index = lock(&self.index);
        for (seq, (id, at)) in &index.by_seq {
            if busy.contains(seq) {
                continue;
            }
            if *at > now_ms {
                next = Some(next.map_or(*at, |n: i64| n.min(*at)));
                continue;
            }
            if due.len() < max {
                due.push((*seq, *id));
            } else if next.is_some() {
                break;
            }
        }
        Ok((due, next))
    }

    /// Queued notices due at `now_ms` with their records (see [`Inbox::ready`]).
    pub fn ready_records(
        &self,
        now_ms: i64,
        max: usize,
        busy: &HashSet<u64>,
    ) -> Result<(Vec<Record>, Option<i64>), InboxError> {
        let (due, next) = self.ready(now_ms, max, busy)?;
        let mut out = Vec::with_capacity(due.len());
        for (seq, id) in due {
            let v = self
                .db
                .get(key(b'q', seq))?
                .ok_or_else(|| InboxError::Corrupt(format!("queued notice {seq} has no record")))?;
            out.push(Record::decode(&v).ok_or_else(|| InboxError::Corrupt(id.to_string()))?);
        }
        Ok((out, next))
    }

    /// Records a dispatcher state change durably (group-committed).
    pub async fn change(&self, change: Change) -> Result<(), InboxError> {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || tx.send(Request::Change { change, reply }))
            .await
            .map_err(|_| InboxError::Stopped)?
            .map_err(|_| InboxError::Stopped)?;
        rx.await
            .map_err(|_| InboxError::Stopped)?
            .map_err(InboxError::Corrupt)
    }

    /// Dead letters, oldest first: (seq, reason, record).
    pub fn dead_letters(&self, max: usize) -> Result<Vec<(u64, String, Record)>, InboxError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix([b'x']).take(max) {
            let (k, v) = kv?;
            let seq = seq_of(&k).unwrap_or(0);
            if let Some((reason, r)) = decode_dead(&v) {
                out.push((seq, reason, r));
            }
        }
        Ok(out)
    }

    /// Submits that were in flight when the agent died.
    pub fn uncertain(&self) -> Result<Vec<Record>, InboxError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix([b'u']) {
            let (_, v) = kv?;
            if let Some(r) = Record::decode(&v) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Drops dedupe tombstones older than the retention window; returns how many.
    pub fn purge_seen(&self, retention: Duration) -> Result<usize, InboxError> {
        let cutoff = now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let mut batch = sled::Batch::default();
        let mut gone = Vec::new();
        for kv in self.db.scan_prefix([b'q']) {
            let (k, v) = kv?;
            if let Some((at, id)) = decode_tombstone(&v) {
                if at < cutoff {
                    batch.remove(k);
                    gone.push(id);
                }
            }
        }
        // A tombstone never turns back into a record, so removing it cannot lose a notice.
        self.db.apply_batch(batch)?;
        let mut index = lock(&self.index);
        for id in &gone {
            index.seen.remove(id);
        }
        Ok(gone.len())
    }

    fn check(&self, id: NotifId, payload: Vec<u8>) -> Checked {
        let n = match Notification::decode_payload(id, &payload) {
            Ok(n) => n,
            Err(e) => return (id, Err(format!("malformed notification: {e}"))),
        };
        match (self.validator)(&n) {
            Ok(()) => (id, Ok(payload)),
            Err(reason) => (id, Err(reason)),
        }
    }
}

impl LinkInbox for Inbox {
    /// Checks the batch here and queues it for the committer at once (not when first
    /// polled), so that several batches handed over in a row share one group commit.
    fn store(
        &self,
        peer: Arc<str>,
        batch: Vec<(NotifId, Vec<u8>)>,
    ) -> impl std::future::Future<Output = Vec<Outcome>> + Send {
        let n = batch.len();
        let fail = move |reason: &str| {
            vec![
                Outcome::Rejected {
                    class: NackClass::RetryLater,
                    retry_after: Duration::from_secs(5),
                    reason: reason.to_string(),
                };
                n
            ]
        };
        let checked: Vec<Checked> = batch
            .into_iter()
            .map(|(id, payload)| self.check(id, payload))
            .collect();
        let (reply, rx) = oneshot::channel();
        let req = Request::Store {
            peer,
            batch: checked,
            reply,
        };
        // try_send first: the common case never leaves this thread.
        let queued = match self.tx.try_send(req) {
            Ok(()) => Ok(None),
            Err(mpsc::TrySendError::Full(req)) => Ok(Some(req)),
            Err(mpsc::TrySendError::Disconnected(_)) => Err(()),
        };
        let tx = self.tx.clone();
        async move {
            match queued {
                Err(()) => return fail("agent inbox unavailable"),
                Ok(Some(req)) => match tokio::task::spawn_blocking(move || tx.send(req)).await {
                    Ok(Ok(())) => {}
                    _ => return fail("agent inbox unavailable"),
                },
                Ok(None) => {}
            }
            rx.await.unwrap_or_else(|_| fail("agent inbox unavailable"))
        }
    }
}

/// Builds the queue index; moves in-flight records to the uncertain log and requeues or
/// dead-letters them.
fn recover(db: &sled::Db, cfg: &InboxConfig, stats: &InboxStats) -> Result<Index, InboxError> {
    let mut batch = sled::Batch::default();
    let mut index = Index::default();
    let mut uncertain = 0u64;
    for kv in db.scan_prefix([b'q']) {
        let (k, v) = kv?;
        if let Some((_, id)) = decode_tombstone(&v) {
            index.seen.insert(id);
            continue;
        }
        let Some(mut r) = Record::decode(&v) else {
            return Err(InboxError::Corrupt(hex::encode(&k)));
        };
        index.seen.insert(r.id);
        if r.in_flight {
            uncertain += 1;
            batch.insert(&key(b'u', r.seq), r.encode());
            r.in_flight = false;
            if cfg.resend_uncertain {
                warn!(notif_id = %r.id, seq = r.seq, "submit was in flight when the agent stopped; resending (policy resend_uncertain = true)");
                batch.insert(&k, r.encode());
            } else {
                warn!(notif_id = %r.id, seq = r.seq, "submit was in flight when the agent stopped; not resending (policy resend_uncertain = false)");
                // The submit in flight was an attempt the modem saw.
                r.attempts = r.attempts.saturating_add(1);
                batch.insert(&k, &tombstone(r.received_at_ms, &r.id));
                batch.insert(
                    &key(b'x', r.seq),
                    dead_value("in flight when the agent stopped; not resent by policy", &r),
                );
                continue;
            }
        }
        index.by_seq.insert(r.seq, (r.id, r.next_at_ms));
    }
    if uncertain > 0 {
        db.apply_batch(batch)?;
        db.flush()?;
    }
    let queued = index.by_seq.len() as u64;
    let dead = db.scan_prefix([b'x']).count() as u64;
    stats.queued.store(queued, Ordering::Relaxed);
    stats.dead.store(dead, Ordering::Relaxed);
    stats
        .uncertain
        .store(db.scan_prefix([b'u']).count() as u64, Ordering::Relaxed);
    info!(queued, dead, uncertain, "inbox opened");
    Ok(index)
}

fn decode_dead(v: &[u8]) -> Option<(String, Record)> {
    let n = usize::from(u16::from_be_bytes([*v.first()?, *v.get(1)?]));
    let reason = String::from_utf8_lossy(v.get(2..2 + n)?).into_owned();
    Some((reason, Record::decode(v.get(2 + n..)?)?))
}

fn dead_value(reason: &str, r: &Record) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(1024)];
    let mut v = Vec::with_capacity(2 + reason.len() + 64 + r.payload.len());
    v.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    v.extend_from_slice(reason);
    v.extend_from_slice(&r.encode());
    v
}

/// How long `open` waits for a store another handle still holds.
const LOCK_WAIT: Duration = Duration::from_secs(2);

struct Committer {
    db: sled::Db,
    /// Every commit is flushed through it: sled's flush plus an fdatasync.
    synced: mailbell_link::durable::SyncedFlush,
    cfg: InboxConfig,
    stats: Arc<InboxStats>,
    notify: Arc<Notify>,
    index: Arc<Mutex<Index>>,
}

enum Reply {
    Store(oneshot::Sender<Vec<Outcome>>, Vec<Outcome>),
    Change(oneshot::Sender<Result<(), String>>),
}

/// What a commit does to the index once it is durable.
enum IndexOp {
    Insert(u64, NotifId, i64),
    Remove(u64),
    Seen(NotifId),
}

impl Committer {
    fn run(self, rx: mpsc::Receiver<Request>) {
        'run: while let Ok(first) = rx.recv() {
            let mut stop = matches!(first, Request::Stop);
            let mut items = first.items();
            let mut reqs = vec![first];
            // Bounded group commit: enough items to amortise the flush, few enough that the
            // first senders get their ACKs while later ones are still arriving.
            while items < COMMIT_ITEMS && !stop {
                match rx.try_recv() {
                    Ok(r) => {
                        stop = matches!(r, Request::Stop);
                        items += r.items();
                        reqs.push(r);
                    }
                    Err(_) => break,
                }
            }
            self.commit(reqs);
            if stop {
                break 'run;
            }
        }
        info!("inbox committer stopped");
    }

    fn commit(&self, reqs: Vec<Request>) {
        let mut batch = sled::Batch::default();
        let mut replies = Vec::with_capacity(reqs.len());
        let mut ops = Vec::new();
        let mut fresh: HashSet<NotifId> = HashSet::new();
        let (mut new_items, mut dup, mut rej, mut dead, mut requeued) = (0u64, 0, 0, 0u64, 0u64);
        let now = now_ms();
        let mut queued = lock(&self.index).by_seq.len() as u64;
        for req in reqs {
            match req {
                Request::Store {
                    peer,
                    batch: items,
                    reply,
                } => {
                    let mut outcomes = Vec::with_capacity(items.len());
                    for (id, checked) in items {
                        let o = self.admit(
                            &mut batch,
                            &mut ops,
                            &mut fresh,
                            &peer,
                            id,
                            checked,
                            now,
                            &mut queued,
                        );
                        match &o {
                            Outcome::Stored => new_items += 1,
                            Outcome::Duplicate => dup += 1,
                            Outcome::Rejected { .. } => rej += 1,
                        }
                        outcomes.push(o);
                    }
                    replies.push(Reply::Store(reply, outcomes));
                }
                Request::Change { change, reply } => {
                    match self.apply_change(&mut batch, &mut ops, &change) {
                        Ok(Effect::Dead) => dead += 1,
                        Ok(Effect::Requeued) => requeued += 1,
                        Ok(Effect::None) => {}
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            continue;
                        }
                    }
                    replies.push(Reply::Change(reply));
                }
                Request::Stop => {}
            }
        }
        let started = std::time::Instant::now();
        let result = self
            .db
            .apply_batch(batch)
            .and_then(|()| self.synced.flush(&self.db).map(|_| ()));
        let took = started.elapsed();
        if took > Duration::from_millis(100) {
            warn!(?took, "slow inbox commit (disk)");
        } else {
            tracing::debug!(?took, "inbox commit");
        }
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                {
                    let mut index = lock(&self.index);
                    for op in ops {
                        match op {
                            IndexOp::Insert(seq, id, at) => {
                                index.by_seq.insert(seq, (id, at));
                            }
                            IndexOp::Remove(seq) => {
                                index.by_seq.remove(&seq);
                            }
                            IndexOp::Seen(id) => {
                                index.seen.insert(id);
                            }
                        }
                    }
                    self.stats
                        .queued
                        .store(index.by_seq.len() as u64, Ordering::Relaxed);
                }
                self.stats.stored.fetch_add(new_items, Ordering::Relaxed);
                self.stats.duplicates.fetch_add(dup, Ordering::Relaxed);
                self.stats.rejected.fetch_add(rej, Ordering::Relaxed);
                self.stats.dead.fetch_add(dead, Ordering::Relaxed);
                let _ = self
                    .stats
                    .dead
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                        Some(d.saturating_sub(requeued))
                    });
                for r in replies {
                    match r {
                        Reply::Store(tx, outcomes) => {
                            let _ = tx.send(outcomes);
                        }
                        Reply::Change(tx) => {
                            let _ = tx.send(Ok(()));
                        }
                    }
                }
                if new_items + requeued > 0 {
                    self.notify.notify_one();
                }
            }
            Err(e) => {
                error!(error = %e, "inbox commit failed; senders will retry");
                for r in replies {
                    match r {
                        Reply::Store(tx, outcomes) => {
                            let _ = tx.send(
                                outcomes
                                    .into_iter()
                                    .map(|_| Outcome::Rejected {
                                        class: NackClass::RetryLater,
                                        retry_after: Duration::from_secs(5),
                                        reason: format!("agent inbox store failed: {e}"),
                                    })
                                    .collect(),
                            );
                        }
                        Reply::Change(tx) => {
                            let _ = tx.send(Err(format!("inbox store failed: {e}")));
                        }
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn admit(
        &self,
        batch: &mut sled::Batch,
        ops: &mut Vec<IndexOp>,
        fresh: &mut HashSet<NotifId>,
        peer: &str,
        id: NotifId,
        checked: Result<Vec<u8>, String>,
        now: i64,
        queued: &mut u64,
    ) -> Outcome {
        let retry = |reason: String| Outcome::Rejected {
            class: NackClass::RetryLater,
            retry_after: Duration::from_secs(5),
            reason,
        };
        if fresh.contains(&id) {
            return Outcome::Duplicate;
        }
        if lock(&self.index).seen.contains(&id) {
            return Outcome::Duplicate;
        }
        let payload = match checked {
            Ok(p) => p,
            Err(reason) => {
                return Outcome::Rejected {
                    class: NackClass::Permanent,
                    retry_after: Duration::ZERO,
                    reason,
                }
            }
        };
        if *queued >= self.cfg.max_queued {
            return Outcome::Rejected {
                class: NackClass::RetryLater,
                retry_after: Duration::from_secs(30),
                reason: format!("agent inbox full ({} queued)", *queued),
            };
        }
        let seq = match self.db.generate_id() {
            Ok(s) => s,
            Err(e) => return retry(format!("agent inbox store failed: {e}")),
        };
        let r = Record {
            seq,
            in_flight: false,
            attempts: 0,
            next_at_ms: 0,
            received_at_ms: now,
            id,
            peer: peer.to_string(),
            payload,
        };
        batch.insert(&key(b'q', seq), r.encode());
        ops.push(IndexOp::Insert(seq, id, 0));
        ops.push(IndexOp::Seen(id));
        fresh.insert(id);
        *queued += 1;
        Outcome::Stored
    }

    /// The queued record with this seq.
    fn queued_record(&self, seq: u64) -> Result<Record, String> {
        if !lock(&self.index).by_seq.contains_key(&seq) {
            return Err(format!("notice {seq} is not queued"));
        }
        let v = self
            .db
            .get(key(b'q', seq))
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("notice {seq} is not queued"))?;
        Record::decode(&v).ok_or_else(|| format!("notice {seq} is not queued"))
    }

    /// Adds a change to the batch and says how it moves the counters.
    fn apply_change(
        &self,
        batch: &mut sled::Batch,
        ops: &mut Vec<IndexOp>,
        c: &Change,
    ) -> Result<Effect, String> {
        if let Change::Requeue(seq) = c {
            let dk = key(b'x', *seq);
            let v = self
                .db
                .get(dk)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("dead letter {seq} not found"))?;
            let mut r = decode_dead(&v)
                .map(|(_, r)| r)
                .ok_or_else(|| format!("corrupt dead letter {seq}"))?;
            r.attempts = 0;
            r.next_at_ms = 0;
            r.in_flight = false;
            batch.remove(&dk);
            batch.insert(&key(b'q', r.seq), r.encode());
            ops.push(IndexOp::Insert(r.seq, r.id, 0));
            return Ok(Effect::Requeued);
        }
        let seq = match c {
            Change::InFlight(s) | Change::Sent(s) | Change::Requeue(s) => *s,
            Change::Retry { seq, .. } | Change::Dead { seq, .. } => *seq,
        };
        let mut r = self.queued_record(seq)?;
        let k = key(b'q', seq);
        match c {
            Change::InFlight(_) => {
                r.in_flight = true;
                batch.insert(&k, r.encode());
                Ok(Effect::None)
            }
            Change::Sent(_) => {
                batch.insert(&k, &tombstone(r.received_at_ms, &r.id));
                ops.push(IndexOp::Remove(seq));
                Ok(Effect::None)
            }
            Change::Retry {
                attempts,
                next_at_ms,
                ..
            } => {
                r.in_flight = false;
                r.attempts = *attempts;
                r.next_at_ms = *next_at_ms;
                batch.insert(&k, r.encode());
                ops.push(IndexOp::Insert(seq, r.id, *next_at_ms));
                Ok(Effect::None)
            }
            Change::Dead {
                attempts, reason, ..
            } => {
                r.in_flight = false;
                r.attempts = *attempts;
                batch.insert(&k, &tombstone(r.received_at_ms, &r.id));
                batch.insert(&key(b'x', seq), dead_value(reason, &r));
                ops.push(IndexOp::Remove(seq));
                Ok(Effect::Dead)
            }
            Change::Requeue(_) => Ok(Effect::None),
        }
    }
}

/// How a change moves the counters.
enum Effect {
    None,
    Dead,
    Requeued,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(phone: &str) -> (NotifId, Vec<u8>) {
        let n = Notification {
            id: NotifId::random(),
            phone: phone.into(),
            recipient: "alice@example.com".into(),
            from_addr: "bob@example.org".into(),
            subject: "hi".into(),
            count: 1,
            ..Default::default()
        };
        (n.id, n.encode_payload().unwrap())
    }

    fn validator() -> Validator {
        Arc::new(|n: &Notification| {
            if n.phone.starts_with('+') {
                Ok(())
            } else {
                Err("invalid phone number".into())
            }
        })
    }

    #[tokio::test]
    async fn stores_dedupes_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox");
        let a = notice("+8613800138000");
        let bad = notice("12345");
        {
            let inbox = Inbox::open(&path, InboxConfig::default(), validator()).unwrap();
            let out = inbox
                .store("mx".into(), vec![a.clone(), a.clone(), bad.clone()])
                .await;
            assert_eq!(out[0], Outcome::Stored);
            assert_eq!(out[1], Outcome::Duplicate);
            assert!(matches!(
                &out[2],
                Outcome::Rejected { class: NackClass::Permanent, reason, .. } if reason == "invalid phone number"
            ));
            let (ready, _) = inbox.ready_records(now_ms(), 10, &HashSet::new()).unwrap();
            assert_eq!(ready.len(), 1);
            inbox.change(Change::InFlight(ready[0].seq)).await.unwrap();
            inbox.close();
        }
        // Reopen (a restart): the id is still known, and the in-flight submit is uncertain.
        let inbox = Inbox::open(&path, InboxConfig::default(), validator()).unwrap();
        assert_eq!(
            inbox.store("mx".into(), vec![a.clone()]).await,
            vec![Outcome::Duplicate]
        );
        let unc = inbox.uncertain().unwrap();
        assert_eq!(unc.len(), 1);
        assert_eq!(unc[0].id, a.0);
        let (ready, _) = inbox.ready_records(now_ms(), 10, &HashSet::new()).unwrap();
        assert_eq!(ready.len(), 1, "resent by the default policy");
        assert!(!ready[0].in_flight);
        inbox.change(Change::Sent(ready[0].seq)).await.unwrap();
        assert!(inbox
            .ready_records(now_ms(), 10, &HashSet::new())
            .unwrap()
            .0
            .is_empty());
        assert_eq!(inbox.stats.queued.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn uncertain_policy_off_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox");
        let cfg = InboxConfig {
            resend_uncertain: false,
            ..Default::default()
        };
        {
            let inbox = Inbox::open(&path, cfg.clone(), validator()).unwrap();
            inbox
                .store("mx".into(), vec![notice("+441234567890")])
                .await;
            let (ready, _) = inbox.ready_records(now_ms(), 10, &HashSet::new()).unwrap();
            inbox.change(Change::InFlight(ready[0].seq)).await.unwrap();
            inbox.close();
        }
        let inbox = Inbox::open(&path, cfg, validator()).unwrap();
        assert!(inbox
            .ready_records(now_ms(), 10, &HashSet::new())
            .unwrap()
            .0
            .is_empty());
        let dead = inbox.dead_letters(10).unwrap();
        assert_eq!(dead.len(), 1);
        assert!(dead[0].1.contains("not resent by policy"));
        assert_eq!(dead[0].2.attempts, 1, "the submit in flight counts");
    }

    #[tokio::test]
    async fn retry_schedule_and_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let inbox =
            Inbox::open(&dir.path().join("i"), InboxConfig::default(), validator()).unwrap();
        inbox
            .store(
                "mx".into(),
                vec![notice("+441234567890"), notice("+441234567891")],
            )
            .await;
        let (ready, _) = inbox.ready_records(now_ms(), 10, &HashSet::new()).unwrap();
        let later = now_ms() + 60_000;
        inbox
            .change(Change::Retry {
                seq: ready[0].seq,
                attempts: 1,
                next_at_ms: later,
            })
            .await
            .unwrap();
        inbox
            .change(Change::Dead {
                seq: ready[1].seq,
                attempts: 1,
                reason: "+CMS ERROR: 21".into(),
            })
            .await
            .unwrap();
        let (now_ready, next) = inbox.ready_records(now_ms(), 10, &HashSet::new()).unwrap();
        assert!(now_ready.is_empty());
        assert_eq!(next, Some(later));
        assert_eq!(
            inbox
                .ready_records(later, 10, &HashSet::new())
                .unwrap()
                .0
                .len(),
            1
        );
        let dead = inbox.dead_letters(10).unwrap();
        assert_eq!(dead[0].1, "+CMS ERROR: 21");
        assert_eq!(dead[0].2.attempts, 1, "the modem saw it once");
        assert_eq!(inbox.stats.dead.load(Ordering::Relaxed), 1);
        // An operator requeues it: it is due at once, with its attempts reset.
        inbox.change(Change::Requeue(ready[1].seq)).await.unwrap();
        assert!(inbox.dead_letters(10).unwrap().is_empty());
        assert_eq!(inbox.stats.dead.load(Ordering::Relaxed), 0);
        let (back, _) = inbox.ready_records(now_ms(), 10, &HashSet::new()).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!((back[0].seq, back[0].attempts), (ready[1].seq, 0));
        inbox
            .change(Change::Dead {
                seq: ready[1].seq,
                attempts: 0,
                reason: "again".into(),
            })
            .await
            .unwrap();
        assert!(inbox.change(Change::Requeue(12345)).await.is_err());
        // A change for a notice that is gone is an error, not a panic.
        assert!(inbox.change(Change::Sent(ready[1].seq)).await.is_err());
    }

    #[tokio::test]
    async fn sent_ids_stay_known_until_the_retention_purge() {
        let dir = tempfile::tempdir().unwrap();
        let inbox =
            Inbox::open(&dir.path().join("i"), InboxConfig::default(), validator()).unwrap();
        let a = notice("+441234567890");
        assert_eq!(
            inbox.store("mx".into(), vec![a.clone()]).await,
            vec![Outcome::Stored]
        );
        let (ready, _) = inbox.ready_records(now_ms(), 10, &HashSet::new()).unwrap();
        inbox.change(Change::Sent(ready[0].seq)).await.unwrap();
        assert_eq!(
            inbox.store("mx".into(), vec![a.clone()]).await,
            vec![Outcome::Duplicate]
        );
        assert_eq!(inbox.purge_seen(Duration::from_secs(3600)).unwrap(), 0);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(inbox.purge_seen(Duration::ZERO).unwrap(), 1);
        assert_eq!(
            inbox.store("mx".into(), vec![a]).await,
            vec![Outcome::Stored]
        );
    }

    #[tokio::test]
    async fn full_inbox_asks_to_retry_later() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = InboxConfig {
            max_queued: 1,
            ..Default::default()
        };
        let inbox = Inbox::open(&dir.path().join("i"), cfg, validator()).unwrap();
        let out = inbox
            .store(
                "mx".into(),
                vec![notice("+441234567890"), notice("+441234567891")],
            )
            .await;
        assert_eq!(out[0], Outcome::Stored);
        assert!(matches!(
            out[1],
            Outcome::Rejected {
                class: NackClass::RetryLater,
                ..
            }
        ));
    }

    #[test]
    fn record_round_trip_and_corruption() {
        let r = Record {
            seq: 5,
            in_flight: true,
            attempts: 3,
            next_at_ms: 123,
            received_at_ms: 456,
            id: NotifId::random(),
            peer: "mailhost".into(),
            payload: vec![1, 2, 3],
        };
        assert_eq!(Record::decode(&r.encode()), Some(r.clone()));
        let enc = r.encode();
        for cut in 0..45 {
            assert_eq!(Record::decode(&enc[..cut]), None);
        }
    }
}
