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
//! order are in memory, rebuilt from the records and tombstones at start-up:
//! - every id within the retention window is kept as a `u128` in a sorted `Vec` (16 bytes per
//!   id, binary search), with the ids received since the last merge in a small hash set
//!   (at most [`MERGE_AT`] ids, about 0.5 MB) that is merged in place into the sorted list
//!   when it fills. A week at 100,000 SMS a day (more than ten modems can send) is 700,000 ids:
//!   11.2 MB. (A `HashSet` of the ids cost 19 to 38 bytes per id plus a doubling on growth.)
//! - the queued seq -> (id, due time) map holds only notices not yet sent (about 80 bytes each).
//!
//! The dedupe history is archived out of sled: once [`ARCHIVE_AT`] tombstones have piled up,
//! the committer appends their ids to `<inbox>.dedupe/<utc day>.ids` (16 bytes per id,
//! `fdatasync`ed), then removes the tombstones from sled in flushed batches. A crash between
//! the two leaves an id in both places, which is harmless. sled thus holds the queued notices
//! and at most about [`ARCHIVE_AT`] tombstones, whatever the retention: sled keeps every
//! entry it holds in memory as a node of its tree (more than 100 bytes each, measured), which
//! for a week of tombstones was 60-90 MB. A day's file is deleted (and its ids forgotten) once
//! the whole day is older than `dedupe_retention`, so an id is remembered for at least the
//! retention and at most a day longer. Start-up reads the files and the remaining tombstones.
//! Disk: 16 bytes per id in the history (11.2 MB for a week at 100,000 a day).
//!
//! sled's page cache is bounded by [`InboxConfig::cache_bytes`] (`[inbox] cache_mb`, default
//! 4 MB: the queued notices and the tombstones awaiting archive are the working set, a few MB
//! even with 100,000 queued; at 16 MB the cache kept filling for the whole of a 7.5-minute
//! soak, a 10.5 % RSS spread over its last half against 6.7 % at 4 MB); sled's own default is 1 GiB, which let the cache grow with every notice held until
//! the process reached hundreds of MB in a week. sled keeps a little more than its cache
//! setting resident (its accounting counts serialized page sizes), see docs/benchmarks.md for
//! the measured figures.
//!
//! Tombstones outlive the notice: they are kept for `dedupe_retention` (default 7 days)
//! after receipt and then purged, so a sender that resends an id older than that would be
//! treated as new. The mail-host outbox expires items long before that.
//!
//! Payload decoding and validation run on the caller's thread, before the committer, so the
//! one serial thread does only the dedupe lookup and the write.

use std::collections::{BTreeMap, BTreeSet, HashSet};
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
    /// sled's page cache capacity in bytes (`[inbox] cache_mb`).
    pub cache_bytes: u64,
    /// Tombstones in sled at which they are archived to the history files ([`ARCHIVE_AT`]).
    pub archive_at: u64,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            dedupe_retention: Duration::from_secs(7 * 86_400),
            max_queued: 1_000_000,
            resend_uncertain: true,
            cache_bytes: 4 * 1024 * 1024,
            archive_at: ARCHIVE_AT,
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
    /// The same notices by due time, so that [`Inbox::ready`] finds the next due time
    /// without walking the whole queue (it did, on every call: with a backlog of thousands
    /// that was most of the agent's CPU).
    by_due: BTreeSet<(i64, u64)>,
    seen: SeenIds,
}

impl Index {
    /// Queues `seq` (or moves it to its new due time).
    fn put(&mut self, seq: u64, id: NotifId, at: i64) {
        if let Some((_, old)) = self.by_seq.insert(seq, (id, at)) {
            self.by_due.remove(&(old, seq));
        }
        self.by_due.insert((at, seq));
    }

    /// Takes `seq` out of the queue.
    fn take(&mut self, seq: u64) {
        if let Some((_, at)) = self.by_seq.remove(&seq) {
            self.by_due.remove(&(at, seq));
        }
    }

    /// [`Inbox::ready`]: up to `max` notices due at `now_ms`, oldest first, none of `busy`,
    /// and the earliest later due time of a notice not in `busy`.
    fn ready(
        &self,
        now_ms: i64,
        max: usize,
        busy: &HashSet<u64>,
    ) -> (Vec<(u64, NotifId)>, NextDue) {
        let mut due = Vec::new();
        // Oldest first: walk the queue in order until `max` are found (the walk passes over
        // notices waiting for a later time, usually few).
        if max > 0 {
            for (seq, (id, at)) in &self.by_seq {
                if *at > now_ms || busy.contains(seq) {
                    continue;
                }
                due.push((*seq, *id));
                if due.len() == max {
                    break;
                }
            }
        }
        let next = self
            .by_due
            .range((now_ms.saturating_add(1), 0)..)
            .find(|(_, seq)| !busy.contains(seq))
            .map(|(at, _)| *at);
        (due, next)
    }
}

/// Ids in the recent set above which they are merged into the sorted list.
pub const MERGE_AT: usize = 16_384;

/// Every id within the retention window, 16 bytes per id: a sorted `Vec<u128>` (exact
/// capacity) and a bounded hash set of the ids added since the last merge.
#[derive(Default)]
pub struct SeenIds {
    sorted: Vec<u128>,
    recent: HashSet<u128>,
}

fn id_key(id: &NotifId) -> u128 {
    u128::from_be_bytes(*id.as_bytes())
}

/// Tombstones in sled above which the committer archives them to the history files. Small,
/// because the tombstones in sled are a saw-tooth in the agent's memory (sled keeps each as a
/// node entry, over 100 bytes): 20,000 made the RSS swing by 2-3 MB; at 5,000 an archive costs
/// one append, one `fdatasync` and one sled flush every 100 s at 50 notices/s.
pub const ARCHIVE_AT: u64 = 5_000;

/// Tombstone removals per sled batch when archiving.
const ARCHIVE_BATCH: usize = 128;

const DAY_MS: i64 = 86_400_000;

/// The archived dedupe history: one file of 16-byte ids per UTC day of archiving.
#[derive(Debug)]
struct History {
    dir: std::path::PathBuf,
}

impl History {
    fn open(inbox: &Path) -> std::io::Result<Self> {
        let mut name = inbox.file_name().unwrap_or_default().to_os_string();
        name.push(".dedupe");
        let dir = inbox.with_file_name(name);
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// (day, path) of every history file.
    fn files(&self) -> std::io::Result<Vec<(i64, std::path::PathBuf)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(day) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".ids"))
                .and_then(|d| d.parse::<i64>().ok())
            else {
                continue;
            };
            out.push((day, e.path()));
        }
        out.sort();
        Ok(out)
    }

    /// Appends every id of one file to `out` (a torn last record is ignored).
    fn read(path: &Path, out: &mut Vec<u128>) -> std::io::Result<()> {
        use std::io::Read;
        let mut f = std::io::BufReader::with_capacity(64 * 1024, std::fs::File::open(path)?);
        let mut rec = [0u8; 16];
        loop {
            match f.read_exact(&mut rec) {
                Ok(()) => out.push(u128::from_be_bytes(rec)),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn load(&self, out: &mut Vec<u128>) -> std::io::Result<()> {
        for (_, path) in self.files()? {
            Self::read(&path, out)?;
        }
        Ok(())
    }

    /// Appends ids to the file of `day` and makes them durable.
    fn append(&self, day: i64, ids: &[u128]) -> std::io::Result<()> {
        use std::io::Write;
        let path = self.dir.join(format!("{day}.ids"));
        let new = !path.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        // A crash may have torn the last record: cut it so records stay aligned.
        let len = f.metadata()?.len();
        if len % 16 != 0 {
            f.set_len(len - len % 16)?;
        }
        let mut buf = Vec::with_capacity(ids.len() * 16);
        for id in ids {
            buf.extend_from_slice(&id.to_be_bytes());
        }
        f.write_all(&buf)?;
        f.sync_data()?;
        if new {
            std::fs::File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Deletes the files of days that ended before `cutoff_ms`; returns their ids.
    fn purge(&self, cutoff_ms: i64) -> std::io::Result<Vec<u128>> {
        let mut gone = Vec::new();
        for (day, path) in self.files()? {
            if (day + 1).saturating_mul(DAY_MS) <= cutoff_ms {
                Self::read(&path, &mut gone)?;
                std::fs::remove_file(&path)?;
            }
        }
        Ok(gone)
    }
}

impl SeenIds {
    /// Builds the set from ids in any order.
    pub fn from_unsorted(mut ids: Vec<u128>) -> Self {
        ids.sort_unstable();
        ids.dedup();
        ids.shrink_to_fit();
        Self {
            sorted: ids,
            recent: HashSet::new(),
        }
    }

    pub fn contains(&self, id: &NotifId) -> bool {
        let k = id_key(id);
        self.recent.contains(&k) || self.sorted.binary_search(&k).is_ok()
    }

    pub fn insert(&mut self, id: &NotifId) {
        let k = id_key(id);
        if self.sorted.binary_search(&k).is_ok() {
            return;
        }
        self.recent.insert(k);
        if self.recent.len() >= MERGE_AT {
            self.merge();
        }
    }

    /// Merges the recent ids into the sorted list in place, from the back (O(n), no second
    /// copy of the list; the `Vec` grows by exactly the ids added).
    fn merge(&mut self) {
        let mut add: Vec<u128> = self.recent.drain().collect();
        add.sort_unstable();
        let n = self.sorted.len();
        self.sorted.reserve_exact(add.len());
        self.sorted.resize(n + add.len(), 0);
        let (mut i, mut j, mut w) = (n, add.len(), n + add.len());
        while j > 0 {
            w -= 1;
            if i > 0 && self.sorted[i - 1] > add[j - 1] {
                self.sorted[w] = self.sorted[i - 1];
                i -= 1;
            } else {
                self.sorted[w] = add[j - 1];
                j -= 1;
            }
        }
        self.recent.shrink_to(MERGE_AT);
    }

    /// Forgets these ids.
    pub fn remove_all(&mut self, ids: &[NotifId]) {
        self.remove_keys(ids.iter().map(id_key).collect());
    }

    fn remove_keys(&mut self, mut gone: Vec<u128>) {
        if gone.is_empty() {
            return;
        }
        gone.sort_unstable();
        for k in &gone {
            self.recent.remove(k);
        }
        self.sorted.retain(|k| gone.binary_search(k).is_err());
        if self.sorted.capacity() > self.sorted.len() + self.sorted.len() / 4 + MERGE_AT {
            self.sorted.shrink_to_fit();
        }
    }

    pub fn len(&self) -> usize {
        self.sorted.len() + self.recent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap bytes held (capacity, not length).
    pub fn heap_bytes(&self) -> usize {
        self.sorted.capacity() * 16 + self.recent.capacity() * 17
    }
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
    history: Arc<History>,
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
            .cache_capacity(cfg.cache_bytes)
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
        let history = Arc::new(History::open(path).map_err(|e| InboxError::Open {
            path: path.display().to_string(),
            source: sled::Error::Io(e),
        })?);
        let (index, tombstones) = recover(&db, &cfg, &stats, &history)?;
        let index = Arc::new(Mutex::new(index));
        let (tx, rx) = mpsc::sync_channel(4096);
        let notify = Arc::new(Notify::new());
        let committer = Committer {
            db: db.clone(),
            synced,
            cfg,
            stats: stats.clone(),
            notify: notify.clone(),
            index: index.clone(),
            history: history.clone(),
            tombstones,
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
            history,
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

    /// Ids in the dedupe history and the heap bytes that history holds in memory.
    pub fn dedupe_footprint(&self) -> (usize, usize) {
        let index = lock(&self.index);
        (index.seen.len(), index.seen.heap_bytes())
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
        Ok(lock(&self.index).ready(now_ms, max, busy))
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
        // try_send first: the common case takes no blocking thread (one per concurrent
        // change otherwise, each with its stack and allocator cache: memory, measured).
        match self.tx.try_send(Request::Change { change, reply }) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(req)) => {
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || tx.send(req))
                    .await
                    .map_err(|_| InboxError::Stopped)?
                    .map_err(|_| InboxError::Stopped)?;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => return Err(InboxError::Stopped),
        }
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
        self.purge_before(cutoff)
    }

    /// Drops dedupe tombstones received before `cutoff` (ms since the epoch) and history files
    /// of days that ended before it; returns how many ids.
    fn purge_before(&self, cutoff: i64) -> Result<usize, InboxError> {
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
        let mut n = gone.len();
        lock(&self.index).seen.remove_all(&gone);
        let archived = self.history.purge(cutoff).map_err(sled::Error::Io)?;
        n += archived.len();
        lock(&self.index).seen.remove_keys(archived);
        Ok(n)
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
fn recover(
    db: &sled::Db,
    cfg: &InboxConfig,
    stats: &InboxStats,
    history: &History,
) -> Result<(Index, u64), InboxError> {
    let mut batch = sled::Batch::default();
    let mut index = Index::default();
    let mut seen: Vec<u128> = Vec::new();
    history.load(&mut seen).map_err(sled::Error::Io)?;
    let archived = seen.len();
    let mut tombstones = 0u64;
    let mut uncertain = 0u64;
    for kv in db.scan_prefix([b'q']) {
        let (k, v) = kv?;
        if let Some((_, id)) = decode_tombstone(&v) {
            seen.push(id_key(&id));
            tombstones += 1;
            continue;
        }
        let Some(mut r) = Record::decode(&v) else {
            return Err(InboxError::Corrupt(hex::encode(&k)));
        };
        seen.push(id_key(&r.id));
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
        index.put(r.seq, r.id, r.next_at_ms);
    }
    index.seen = SeenIds::from_unsorted(seen);
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
    info!(
        queued,
        dead, uncertain, archived, tombstones, "inbox opened"
    );
    Ok((index, tombstones))
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
    history: Arc<History>,
    /// Tombstones in sled (archived once they reach `cfg.archive_at`).
    tombstones: u64,
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
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        self.archive_if_due();
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
            self.archive_if_due();
            if stop {
                break 'run;
            }
        }
        info!("inbox committer stopped");
    }

    fn archive_if_due(&mut self) {
        if self.tombstones < self.cfg.archive_at.max(1) {
            return;
        }
        match self.archive() {
            Ok(n) => {
                tracing::debug!(archived = n, "dedupe history archived");
                self.tombstones = 0;
            }
            // The tombstones stay in sled (still deduping); retried after the next commit.
            Err(e) => error!(error = %e, "cannot archive the dedupe history"),
        }
    }

    /// Moves every tombstone's id to the history file of today, then out of sled.
    fn archive(&self) -> Result<usize, InboxError> {
        let mut keys = Vec::new();
        let mut ids = Vec::new();
        for kv in self.db.scan_prefix([b'q']) {
            let (k, v) = kv?;
            if let Some((_, id)) = decode_tombstone(&v) {
                keys.push(k);
                ids.push(id_key(&id));
            }
        }
        if ids.is_empty() {
            return Ok(0);
        }
        self.history
            .append(now_ms().div_euclid(DAY_MS), &ids)
            .map_err(sled::Error::Io)?;
        // Small batches: sled copies a leaf for every key a batch changes and frees the
        // copies only after the batch, so one batch of 20,000 removals took 50 MB at once
        // (measured; the allocator kept it). A removal lost in a crash leaves a tombstone
        // whose id is also in the history: harmless.
        for chunk in keys.chunks(ARCHIVE_BATCH) {
            let mut batch = sled::Batch::default();
            for k in chunk {
                batch.remove(k);
            }
            self.db.apply_batch(batch)?;
        }
        self.synced.flush(&self.db)?;
        Ok(ids.len())
    }

    fn commit(&mut self, reqs: Vec<Request>) {
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
                            IndexOp::Insert(seq, id, at) => index.put(seq, id, at),
                            IndexOp::Remove(seq) => {
                                index.take(seq);
                                self.tombstones += 1;
                            }
                            IndexOp::Seen(id) => {
                                index.seen.insert(&id);
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
    fn seen_ids_agree_with_a_hash_set_across_merges_and_removals() {
        let mut seen = SeenIds::default();
        let mut model = HashSet::new();
        let ids: Vec<NotifId> = (0..3 * MERGE_AT + 17).map(|_| NotifId::random()).collect();
        for (i, id) in ids.iter().enumerate() {
            seen.insert(id);
            seen.insert(id); // a second insert changes nothing
            model.insert(*id);
            if i % 997 == 0 {
                assert!(seen.contains(id));
            }
        }
        assert_eq!(seen.len(), model.len());
        assert!(
            seen.sorted.len() >= 3 * MERGE_AT,
            "merged into the sorted list"
        );
        assert!(
            seen.sorted.windows(2).all(|w| w[0] < w[1]),
            "sorted, no repeats"
        );
        assert!(seen.recent.len() < MERGE_AT);
        for id in &ids {
            assert!(seen.contains(id));
        }
        for _ in 0..1000 {
            assert!(!seen.contains(&NotifId::random()));
        }
        // 16 bytes per id plus the bounded recent set.
        assert!(
            seen.heap_bytes() <= ids.len() * 16 + MERGE_AT * 2 * 17 + 4096,
            "{} bytes for {} ids",
            seen.heap_bytes(),
            ids.len()
        );
        // Remove every third id, from both parts.
        let gone: Vec<NotifId> = ids.iter().step_by(3).copied().collect();
        seen.remove_all(&gone);
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(seen.contains(id), i % 3 != 0, "id {i}");
        }
        assert_eq!(seen.len(), ids.len() - gone.len());
        // Rebuilt from an unsorted list (start-up): the same answers.
        let rebuilt = SeenIds::from_unsorted(ids.iter().map(id_key).collect());
        assert_eq!(rebuilt.len(), ids.len());
        assert!(ids.iter().all(|id| rebuilt.contains(id)));
    }

    #[tokio::test]
    async fn dedupe_survives_merges_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox");
        let cfg = InboxConfig {
            cache_bytes: 1024 * 1024,
            ..Default::default()
        };
        let batch: Vec<_> = (0..MERGE_AT + 10)
            .map(|_| notice("+441234567890"))
            .collect();
        {
            let inbox = Inbox::open(&path, cfg.clone(), validator()).unwrap();
            for chunk in batch.chunks(512) {
                let out = inbox.store("mx".into(), chunk.to_vec()).await;
                assert!(out.iter().all(|o| *o == Outcome::Stored));
            }
            assert_eq!(inbox.dedupe_footprint().0, batch.len());
            let out = inbox.store("mx".into(), batch[..300].to_vec()).await;
            assert!(out.iter().all(|o| *o == Outcome::Duplicate));
            inbox.close();
        }
        let inbox = Inbox::open(&path, cfg, validator()).unwrap();
        assert_eq!(inbox.dedupe_footprint().0, batch.len());
        let out = inbox
            .store("mx".into(), batch[batch.len() - 300..].to_vec())
            .await;
        assert!(out.iter().all(|o| *o == Outcome::Duplicate));
    }

    #[tokio::test]
    async fn archived_history_dedupes_across_restarts_and_is_purged_by_day() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox");
        let cfg = InboxConfig {
            archive_at: 50,
            ..Default::default()
        };
        let batch: Vec<_> = (0..120).map(|_| notice("+441234567890")).collect();
        {
            let inbox = Inbox::open(&path, cfg.clone(), validator()).unwrap();
            for chunk in batch.chunks(40) {
                inbox.store("mx".into(), chunk.to_vec()).await;
                let (ready, _) = inbox.ready_records(now_ms(), 100, &HashSet::new()).unwrap();
                for r in ready {
                    inbox.change(Change::Sent(r.seq)).await.unwrap();
                }
            }
            // 120 sent, archived at 50 and 100: 20 tombstones are left in sled.
            let in_sled = inbox
                .db
                .scan_prefix([b'q'])
                .filter(|kv| decode_tombstone(&kv.as_ref().unwrap().1).is_some())
                .count();
            assert_eq!(in_sled, 20);
            let files = inbox.history.files().unwrap();
            assert_eq!(files.len(), 1);
            assert_eq!(std::fs::metadata(&files[0].1).unwrap().len(), 100 * 16);
            // Archived and not: all duplicates.
            let out = inbox.store("mx".into(), batch.clone()).await;
            assert!(out.iter().all(|o| *o == Outcome::Duplicate));
            inbox.close();
        }
        // A torn last record (a crash in the middle of an append) is ignored and cut.
        let file = Inbox::open(&path, cfg.clone(), validator())
            .map(|i| {
                let f = i.history.files().unwrap()[0].1.clone();
                i.close();
                f
            })
            .unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        bytes.extend_from_slice(&[7u8; 5]);
        std::fs::write(&file, &bytes).unwrap();
        let inbox = Inbox::open(&path, cfg, validator()).unwrap();
        assert_eq!(inbox.dedupe_footprint().0, 120);
        let out = inbox.store("mx".into(), batch.clone()).await;
        assert!(out.iter().all(|o| *o == Outcome::Duplicate));
        // Purge: today's file stays until the whole day is older than the cutoff.
        let today = now_ms().div_euclid(DAY_MS);
        assert_eq!(inbox.purge_seen(Duration::from_secs(3600)).unwrap(), 0);
        assert_eq!(inbox.purge_before(today * DAY_MS).unwrap(), 0);
        assert_eq!(inbox.history.files().unwrap().len(), 1);
        // Past its end: the 100 archived ids and the 20 tombstones go, and are new again.
        assert_eq!(inbox.purge_before((today + 1) * DAY_MS).unwrap(), 120);
        assert!(inbox.history.files().unwrap().is_empty());
        assert_eq!(inbox.dedupe_footprint().0, 0);
        let out = inbox.store("mx".into(), batch[..10].to_vec()).await;
        assert!(out.iter().all(|o| *o == Outcome::Stored));
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

    /// The due-time index follows every change: oldest due first, busy ones skipped, the
    /// next due time from the index (also when `max` is reached early), moves and removals.
    #[test]
    fn ready_takes_the_oldest_due_and_the_next_time_from_the_index() {
        let mut index = Index::default();
        let id = |n: u8| NotifId([n; 16]);
        index.put(1, id(1), 500);
        for seq in 2..=2_000u64 {
            index.put(seq, id(2), 100);
        }
        index.put(2_001, id(3), 300);
        let busy: HashSet<u64> = [2, 3].into_iter().collect();
        let (due, next) = index.ready(100, 2, &busy);
        assert_eq!(due.iter().map(|d| d.0).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(next, Some(300));
        // A busy notice's later time does not wake the dispatcher; a moved one does.
        index.put(2, id(2), 200);
        assert_eq!(index.ready(100, 2, &busy).1, Some(300));
        index.put(5, id(2), 250);
        let (due, next) = index.ready(100, 3, &busy);
        assert_eq!(due.iter().map(|d| d.0).collect::<Vec<_>>(), [4, 6, 7]);
        assert_eq!(next, Some(250));
        index.take(5);
        index.take(2_001);
        assert_eq!(index.ready(100, 0, &busy), (Vec::new(), Some(500)));
        assert_eq!(index.by_due.len(), index.by_seq.len());
        // Later on, everything not busy is due, oldest first, and nothing is later.
        let (due, next) = index.ready(1_000, 3, &HashSet::new());
        assert_eq!(due.iter().map(|d| d.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(next, None);
    }
}
