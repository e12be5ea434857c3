//! The outbox's write-ahead journal: a durable commit is one append and one `fdatasync`.
//!
//! Without it every group commit ended in a sled flush (`pwrite`, then `sync_file_range`,
//! which waits for the pages) plus an `fdatasync` of sled's log: 0.3–0.55 ms per commit on
//! this disk, and sled's I/O threads took about a quarter of a core at 10,000 messages/s.
//! With it a commit appends its writes to the journal, `fdatasync`s it (one write+fsync) and
//! applies them to sled in memory; sled is flushed only at checkpoints (docs/benchmarks.md).
//!
//! Rules that make this safe:
//! - Every write to the outbox tree goes through [`Journal::write`], which appends it to the
//!   journal (synced, for a commit) and then applies it to sled, under one lock. So the
//!   journal holds every write since the last checkpoint in the order sled saw them, and sled
//!   never holds a write the journal may lose: the committer can apply a commit as single
//!   sled operations, which (unlike a sled batch) do not wait for a sled flush in progress.
//! - A record is a list of whole-value puts and deletes. Replaying them in order over any
//!   state sled recovered to (sled recovers a prefix of its writes, at or after the last
//!   checkpoint) ends in the state of the last journaled write: a key's value is set by the
//!   last write to it, and that write is in the journal.
//! - The outbox's committer appends a commit with [`Journal::append_deferred`] and has another
//!   thread apply it; its keys are new or were read after every earlier commit was applied,
//!   so no other write to them can come between. A checkpoint waits until every deferred
//!   record of the segments it seals is applied.
//! - A checkpoint seals the current segment and starts a new one (under the lock), flushes
//!   sled with `fdatasync` (everything in the sealed segments was applied before), then
//!   deletes the sealed segments. A failed flush keeps them for the next try.
//! - A record is `len:u32le crc32:u32le body`, the CRC taken over the segment's number and the
//!   body. Replay stops at the first record that does not check out: a torn append (a crash
//!   during it: that write was never reported durable) or the old data of a recycled file.
//! - Segment files are recycled: a checkpoint keeps one sealed file as the spare that the next
//!   segment is renamed from, and records overwrite its old data in place. An `fdatasync` of
//!   a write that does not grow the file has no metadata to commit, so it costs one disk write
//!   instead of also an ext4 journal commit (which also waits for other files' data, such as
//!   sled's and the audit log's): measured here 0.12 ms instead of 0.19–0.25 ms at p50.
//! - A failed append is simply overwritten by the next one (records go at an offset, not at
//!   the file's end).
//!
//! Files: `<outbox dir>/journal/<number:020>.wal`, replayed in number order by
//! [`Journal::open`], which then flushes sled and recycles or deletes them; `spare` is the
//! recycled file waiting to become the next segment.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mailbell_link::durable::SyncedFlush;
use sled::IVec;
use tracing::warn;

/// Record header: body length and CRC-32 of the body.
const HEADER: usize = 8;
const PUT: u8 = 1;
const DELETE: u8 = 0;

/// Puts and deletes for one atomic write, in order (a later write to a key wins, as in a
/// sled batch).
#[derive(Clone, Debug, Default)]
pub(crate) struct Ops(Vec<(IVec, Option<IVec>)>);

impl Ops {
    pub(crate) fn insert(&mut self, k: impl Into<IVec>, v: impl Into<IVec>) {
        self.0.push((k.into(), Some(v.into())));
    }

    pub(crate) fn remove(&mut self, k: impl Into<IVec>) {
        self.0.push((k.into(), None));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Applies the writes as single sled operations, in order.
    pub(crate) fn apply(&self, db: &sled::Db) -> Result<(), sled::Error> {
        self.0.iter().try_for_each(|(k, v)| match v {
            Some(v) => db.insert(k, v.clone()).map(drop),
            None => db.remove(k).map(drop),
        })
    }

    fn batch(&self) -> sled::Batch {
        let mut b = sled::Batch::default();
        for (k, v) in &self.0 {
            match v {
                Some(v) => b.insert(k.clone(), v.clone()),
                None => b.remove(k.clone()),
            }
        }
        b
    }

    /// Appends one framed record holding these writes to `out`. Fails on a key over 64 KiB
    /// or a value or record over 4 GiB (the outbox writes none).
    fn encode_into(&self, out: &mut Vec<u8>, salt: u64) -> io::Result<()> {
        let too_big = |_| io::Error::new(io::ErrorKind::InvalidInput, "journal record too large");
        let start = out.len();
        out.extend_from_slice(&[0; HEADER]);
        for (k, v) in &self.0 {
            out.push(if v.is_some() { PUT } else { DELETE });
            let klen = u16::try_from(k.len()).map_err(too_big)?;
            out.extend_from_slice(&klen.to_le_bytes());
            out.extend_from_slice(k);
            if let Some(v) = v {
                let vlen = u32::try_from(v.len()).map_err(too_big)?;
                out.extend_from_slice(&vlen.to_le_bytes());
                out.extend_from_slice(v);
            }
        }
        let body = &out[start + HEADER..];
        let len = u32::try_from(body.len()).map_err(too_big)?;
        let crc = checksum(salt, body);
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        out[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }

    /// Decodes one record body; `None` if it does not parse.
    fn decode(mut body: &[u8]) -> Option<Self> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if b.len() < n {
                return None;
            }
            let (head, rest) = b.split_at(n);
            *b = rest;
            Some(head)
        }
        let mut ops = Vec::new();
        while !body.is_empty() {
            let tag = take(&mut body, 1)?[0];
            let klen = u16::from_le_bytes(take(&mut body, 2)?.try_into().ok()?);
            let k = IVec::from(take(&mut body, usize::from(klen))?);
            match tag {
                PUT => {
                    let vlen = u32::from_le_bytes(take(&mut body, 4)?.try_into().ok()?);
                    let v = take(&mut body, usize::try_from(vlen).ok()?)?;
                    ops.push((k, Some(IVec::from(v))));
                }
                DELETE => ops.push((k, None)),
                _ => return None,
            }
        }
        Some(Self(ops))
    }
}

/// The CRC of a record body in segment `salt`: a recycled file's old records do not check out.
fn checksum(salt: u64, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&salt.to_le_bytes());
    h.update(body);
    h.finalize()
}

const SPARE: &str = "spare";

/// Why [`Journal::write`] failed.
#[derive(Debug)]
pub(crate) enum WriteError {
    /// The append (or its sync) failed: sled is untouched. The next record overwrites it; if
    /// none comes, a replay may still find it whole (a caller that reports the failure
    /// journals an undo).
    NotJournaled(sled::Error),
    /// Journaled, but sled refused some of the writes: they are replayed at the next start.
    NotApplied(sled::Error),
}

impl From<WriteError> for sled::Error {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::NotApplied(e) | WriteError::NotJournaled(e) => e,
        }
    }
}

/// How [`Journal::write`] applies the writes to sled.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Apply {
    /// One atomic sled batch (a sled batch waits for a flush in progress).
    Batch,
    /// One sled operation each: for bulk deletions that need not be atomic.
    EachOp,
}

/// What [`Journal::open`] found and replayed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Replayed {
    pub segments: usize,
    pub records: usize,
    pub writes: usize,
    /// Segments whose replay stopped at a record that does not check out: a torn append
    /// (a crash during it), a damaged one, or the old data of a recycled file.
    pub torn: usize,
}

struct Segment {
    file: File,
    number: u64,
    /// Bytes of whole records in the file (a recycled file has old data after them).
    len: u64,
}

struct State {
    seg: Segment,
    /// Segments already replaced, recycled or deleted by the next checkpoint that flushes sled.
    sealed: Vec<u64>,
    /// Something was written since the last checkpoint started.
    dirty: bool,
    buf: Vec<u8>,
}

#[derive(Default)]
struct Applied {
    ticket: u64,
    /// A deferred record could not be applied: sled lacks it until the next start replays
    /// the journal, so checkpoints must not delete segments any more.
    failed: bool,
}

#[derive(Default)]
struct Wake {
    stop: bool,
    kick: bool,
}

/// The journal of one outbox.
pub(crate) struct Journal {
    dir: PathBuf,
    state: Mutex<State>,
    /// Records appended by [`Journal::append_deferred`] so far (their tickets).
    deferred: AtomicU64,
    /// `journal/spare` exists: the next segment is renamed from it. Held for a whole
    /// checkpoint, so checkpoints never overlap.
    spare: Mutex<bool>,
    /// Highest ticket of a deferred record applied to sled ([`Journal::applied`]).
    applied: Mutex<Applied>,
    applied_cond: Condvar,
    /// A segment this long asks for a checkpoint at once instead of at the next interval.
    checkpoint_bytes: u64,
    wake: Mutex<Wake>,
    cond: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}.wal"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn io_err(context: String, e: io::Error) -> sled::Error {
    sled::Error::Io(io::Error::new(e.kind(), format!("{context}: {e}")))
}

impl Journal {
    /// Opens the journal in `dir` (created if missing) for the sled tree `db`: replays every
    /// segment left by a crash, in order, flushes sled (`synced`) and deletes them, then
    /// starts a new segment. Blocking.
    pub(crate) fn open(
        dir: &Path,
        db: &sled::Db,
        synced: &SyncedFlush,
        checkpoint_bytes: u64,
    ) -> Result<(Self, Replayed), sled::Error> {
        fs::create_dir_all(dir).map_err(|e| io_err(format!("create {}", dir.display()), e))?;
        let mut numbers = Vec::new();
        let listing =
            fs::read_dir(dir).map_err(|e| io_err(format!("list {}", dir.display()), e))?;
        for entry in listing {
            let entry = entry.map_err(|e| io_err(format!("list {}", dir.display()), e))?;
            let name = entry.file_name();
            let number = name
                .to_str()
                .and_then(|n| n.strip_suffix(".wal"))
                .and_then(|n| n.parse::<u64>().ok());
            match number {
                Some(n) => numbers.push(n),
                None if name == SPARE => {}
                None => warn!(file = ?name, dir = %dir.display(), "not a journal segment; ignored"),
            }
        }
        numbers.sort_unstable();
        let mut replayed = Replayed::default();
        for &n in &numbers {
            let path = segment_path(dir, n);
            let data =
                fs::read(&path).map_err(|e| io_err(format!("read {}", path.display()), e))?;
            let (records, writes, torn) = replay(&data, db, n).map_err(|e| match e {
                ReplayError::Store(e) => e,
                ReplayError::Corrupt(at) => sled::Error::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "journal segment {} has a record at byte {at} whose checksum matches \
                         but which does not parse",
                        path.display()
                    ),
                )),
            })?;
            replayed.segments += usize::from(!data.is_empty());
            replayed.records += records;
            replayed.writes += writes;
            if torn {
                replayed.torn += 1;
            }
        }
        let mut spare = dir.join(SPARE).exists();
        if !numbers.is_empty() {
            synced.flush(db)?;
            // The new segment's directory sync (next_segment) makes these durable.
            for &n in &numbers {
                retire(dir, n, &mut spare)?;
            }
        }
        let last = numbers.last().copied().unwrap_or(0);
        let state = State {
            seg: next_segment(dir, last, &mut spare)?,
            sealed: Vec::new(),
            dirty: false,
            buf: Vec::new(),
        };
        Ok((
            Self {
                dir: dir.to_owned(),
                state: Mutex::new(state),
                deferred: AtomicU64::new(0),
                spare: Mutex::new(spare),
                applied: Mutex::new(Applied::default()),
                applied_cond: Condvar::new(),
                checkpoint_bytes,
                wake: Mutex::new(Wake::default()),
                cond: Condvar::new(),
            },
            replayed,
        ))
    }

    /// Appends `ops` to the journal (then `fdatasync`s it if `sync`) and applies them to `db`.
    /// Returns how long the apply and the append took.
    pub(crate) fn write(
        &self,
        db: &sled::Db,
        ops: &Ops,
        sync: bool,
        apply: Apply,
    ) -> Result<(Duration, Duration), WriteError> {
        if ops.is_empty() {
            return Ok((Duration::ZERO, Duration::ZERO));
        }
        let mut st = lock(&self.state);
        let t0 = Instant::now();
        self.append(&mut st, ops, sync)
            .map_err(WriteError::NotJournaled)?;
        let t1 = Instant::now();
        match apply {
            Apply::Batch => db.apply_batch(ops.batch()),
            Apply::EachOp => ops.apply(db),
        }
        .map_err(WriteError::NotApplied)?;
        Ok((t1.elapsed(), t1 - t0))
    }

    /// Appends `ops` (then `fdatasync`s if `sync`) without applying them: the caller applies
    /// them later, in ticket order, with [`Ops::apply`] and reports each with
    /// [`applied`](Self::applied). Until then checkpoints wait for them and
    /// [`caught_up`](Self::caught_up) blocks. Returns the ticket and the append's duration.
    pub(crate) fn append_deferred(
        &self,
        ops: &Ops,
        sync: bool,
    ) -> Result<(u64, Duration), sled::Error> {
        let mut st = lock(&self.state);
        let t0 = Instant::now();
        self.append(&mut st, ops, sync)?;
        // Raised under the journal lock, so a checkpoint's seal and this count agree.
        let ticket = self.deferred.fetch_add(1, Ordering::AcqRel) + 1;
        drop(st);
        Ok((ticket, t0.elapsed()))
    }

    /// The deferred record `ticket` (and every earlier one) is in sled; `ok: false` if
    /// applying it failed (then sled lacks it until a restart replays the journal, and
    /// checkpoints stop deleting segments so that replay has it).
    pub(crate) fn applied(&self, ticket: u64, ok: bool) {
        let mut a = lock(&self.applied);
        a.ticket = a.ticket.max(ticket);
        a.failed |= !ok;
        drop(a);
        self.applied_cond.notify_all();
    }

    /// The applier is gone without finishing (it panicked): waiters are released instead of
    /// waiting forever, and checkpoints keep the journal for the next start to replay.
    pub(crate) fn abandon(&self) {
        let mut a = lock(&self.applied);
        a.ticket = u64::MAX;
        a.failed = true;
        drop(a);
        self.applied_cond.notify_all();
    }

    /// Waits until every deferred record appended before this call is applied to sled: a
    /// reader that saw a commit answered then reads it.
    pub(crate) fn caught_up(&self) {
        // No journal lock here: a reader must not wait for a commit's fdatasync.
        let target = self.deferred.load(Ordering::Acquire);
        self.wait_applied(target);
    }

    fn wait_applied(&self, target: u64) {
        let mut a = lock(&self.applied);
        while a.ticket < target {
            a = self
                .applied_cond
                .wait(a)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Encodes `ops` as one record and writes it at the end of the current segment's records
    /// (then `fdatasync`s if `sync`); asks for a checkpoint once the segment is full.
    fn append(&self, st: &mut State, ops: &Ops, sync: bool) -> Result<(), sled::Error> {
        st.buf.clear();
        ops.encode_into(&mut st.buf, st.seg.number)
            .map_err(sled::Error::Io)?;
        let file = &st.seg.file;
        let written = file.write_all_at(&st.buf, st.seg.len).and_then(|()| {
            if sync {
                file.sync_data()
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                st.seg.len += st.buf.len() as u64;
                st.dirty = true;
                if st.seg.len >= self.checkpoint_bytes {
                    // Only the wake-up lock is taken: the checkpoint thread never holds it
                    // while it waits for the journal lock.
                    self.kick();
                }
                Ok(())
            }
            Err(e) => Err(io_err(
                format!(
                    "append to {}",
                    segment_path(&self.dir, st.seg.number).display()
                ),
                e,
            )),
        }
    }

    /// Makes everything written so far durable in sled itself and deletes the segments that
    /// held it. Returns whether there was anything to do.
    pub(crate) fn checkpoint(
        &self,
        db: &sled::Db,
        synced: &SyncedFlush,
    ) -> Result<bool, sled::Error> {
        // One checkpoint at a time; the guard also owns the spare flag.
        let mut spare = lock(&self.spare);
        let (dirty, current, any_sealed) = {
            let st = lock(&self.state);
            (st.dirty, st.seg.number, !st.sealed.is_empty())
        };
        if !dirty && !any_sealed {
            return Ok(false);
        }
        // The next segment is made ready, its directory entry synced, before the lock is
        // taken: a directory sync commits the file system's journal, which can take
        // milliseconds, and every commit waits for that lock.
        let next = if dirty {
            Some(next_segment(&self.dir, current, &mut spare)?)
        } else {
            None
        };
        let (sealed, deferred) = {
            let mut st = lock(&self.state);
            if let Some(seg) = next {
                let old = std::mem::replace(&mut st.seg, seg);
                st.sealed.push(old.number);
                st.dirty = false;
            }
            (st.sealed.clone(), self.deferred.load(Ordering::Acquire))
        };
        // Every write in the sealed segments is in sled once the deferred ones are applied.
        self.wait_applied(deferred);
        if lock(&self.applied).failed {
            return Err(io_err(
                "checkpoint".into(),
                io::Error::other("a commit could not be applied to sled; the journal is kept for the next start to replay"),
            ));
        }
        synced.flush(db)?;
        for &n in &sealed {
            retire(&self.dir, n, &mut spare)?;
        }
        // Durable before anything newer is checkpointed: a sealed segment coming back after
        // a crash, behind a newer one that is gone, would replay old values over newer ones.
        sync_dir(&self.dir).map_err(|e| io_err(format!("sync {}", self.dir.display()), e))?;
        lock(&self.state).sealed.retain(|n| !sealed.contains(n));
        Ok(true)
    }

    /// Bytes in the current segment.
    #[cfg(test)]
    fn segment_len(&self) -> u64 {
        lock(&self.state).seg.len
    }

    /// Asks [`run_checkpoints`](Self::run_checkpoints) for a checkpoint now.
    fn kick(&self) {
        lock(&self.wake).kick = true;
        self.cond.notify_one();
    }

    /// Ends [`run_checkpoints`](Self::run_checkpoints).
    pub(crate) fn stop_checkpoints(&self) {
        lock(&self.wake).stop = true;
        self.cond.notify_one();
    }

    /// Checkpoints every `every`, or at once when a segment reaches the size limit, until
    /// [`stop_checkpoints`](Self::stop_checkpoints). Run on its own thread: sled's flush then
    /// never runs on the committer's thread.
    pub(crate) fn run_checkpoints(&self, db: &sled::Db, synced: &SyncedFlush, every: Duration) {
        loop {
            {
                let mut w = lock(&self.wake);
                if !w.stop && !w.kick {
                    w = self
                        .cond
                        .wait_timeout(w, every)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                if w.stop {
                    return;
                }
                w.kick = false;
            }
            if let Err(e) = self.checkpoint(db, synced) {
                warn!(error = %e, "outbox checkpoint failed; the journal keeps everything and it is tried again");
                std::thread::sleep(every.min(Duration::from_secs(1)));
            }
        }
    }
}

/// Segment `after + 1`: renamed from the spare file if there is one, else a new file; its
/// directory entry synced.
fn next_segment(dir: &Path, after: u64, spare: &mut bool) -> Result<Segment, sled::Error> {
    let number = after + 1;
    let path = segment_path(dir, number);
    if *spare {
        let from = dir.join(SPARE);
        match fs::rename(&from, &path) {
            Ok(()) => *spare = false,
            Err(e) => {
                warn!(error = %e, "cannot reuse the journal's spare file; starting a new one");
                *spare = false;
                let _ = fs::remove_file(&from);
            }
        }
    }
    let file = OpenOptions::new()
        .create(true)
        // A file renamed from the spare keeps its blocks: records overwrite them in place.
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| io_err(format!("create {}", path.display()), e))?;
    sync_dir(dir).map_err(|e| io_err(format!("sync {}", dir.display()), e))?;
    Ok(Segment {
        file,
        number,
        len: 0,
    })
}

/// A segment whose writes are all in flushed sled: kept as the spare if there is none (its
/// blocks are reused in place), else deleted. The caller syncs the directory.
fn retire(dir: &Path, number: u64, spare: &mut bool) -> Result<(), sled::Error> {
    let path = segment_path(dir, number);
    let done = if *spare {
        fs::remove_file(&path)
    } else {
        fs::rename(&path, dir.join(SPARE)).map(|()| *spare = true)
    };
    match done {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("retire {}", path.display()), e)),
    }
}

enum ReplayError {
    Store(sled::Error),
    /// A record whose checksum matches but whose body does not parse, at this offset.
    Corrupt(usize),
}

/// Applies the records of one segment to `db` in order; stops at a torn record. Returns the
/// records and writes applied and whether the segment ended in a torn record.
fn replay(data: &[u8], db: &sled::Db, salt: u64) -> Result<(usize, usize, bool), ReplayError> {
    let (mut at, mut records, mut writes) = (0usize, 0usize, 0usize);
    while at < data.len() {
        let Some(header) = data.get(at..at + HEADER) else {
            return Ok((records, writes, true));
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(body) = data.get(at + HEADER..at + HEADER + len) else {
            return Ok((records, writes, true));
        };
        if len == 0 || checksum(salt, body) != crc {
            return Ok((records, writes, true));
        }
        let ops = Ops::decode(body).ok_or(ReplayError::Corrupt(at))?;
        db.apply_batch(ops.batch()).map_err(ReplayError::Store)?;
        records += 1;
        writes += ops.0.len();
        at += HEADER + len;
    }
    Ok((records, writes, false))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    struct Store {
        db: sled::Db,
        synced: SyncedFlush,
        journal: Journal,
        replayed: Replayed,
    }

    fn open(dir: &Path) -> Store {
        let db = sled::Config::new().path(dir).open().unwrap();
        let synced = SyncedFlush::open(dir).unwrap();
        let (journal, replayed) =
            Journal::open(&dir.join("journal"), &db, &synced, 1 << 20).unwrap();
        Store {
            db,
            synced,
            journal,
            replayed,
        }
    }

    fn put(k: &str, v: &str) -> Ops {
        let mut o = Ops::default();
        o.insert(k.as_bytes(), v.as_bytes());
        o
    }

    fn get(db: &sled::Db, k: &str) -> Option<String> {
        db.get(k)
            .unwrap()
            .map(|v| String::from_utf8(v.to_vec()).unwrap())
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = fs::read_dir(dir.join("journal"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "wal"))
            .collect();
        v.sort();
        v
    }

    /// Copies the journal of `from` next to a fresh, empty store at `to`: what a crash leaves
    /// when sled lost everything since the last checkpoint.
    fn journal_only(from: &Path, to: &Path) {
        fs::create_dir_all(to.join("journal")).unwrap();
        for seg in segments(from) {
            fs::copy(&seg, to.join("journal").join(seg.file_name().unwrap())).unwrap();
        }
    }

    #[test]
    fn a_store_that_lost_its_unflushed_writes_gets_them_back_from_the_journal() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let s = open(&a);
        s.journal
            .write(&s.db, &put("k1", "one"), true, Apply::Batch)
            .unwrap();
        let mut ops = put("k2", "two");
        ops.remove(&b"k1"[..]);
        ops.insert(&b"k3"[..], &b"three"[..]);
        ops.insert(&b"k3"[..], &b"three, rewritten"[..]);
        s.journal.write(&s.db, &ops, true, Apply::EachOp).unwrap();
        journal_only(&a, &b);

        let r = open(&b);
        assert_eq!(
            r.replayed,
            Replayed {
                segments: 1,
                records: 2,
                writes: 5,
                torn: 0
            }
        );
        assert_eq!(get(&r.db, "k1"), None);
        assert_eq!(get(&r.db, "k2").as_deref(), Some("two"));
        assert_eq!(get(&r.db, "k3").as_deref(), Some("three, rewritten"));
        // Replayed, flushed and retired: only the new segment is left (the old file, recycled
        // into it, still holds the old records, which no longer check out).
        let left = segments(&b);
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(fs::metadata(&left[0]).unwrap().len() > 0);
        drop(r);
        // And the replayed writes are in sled itself now.
        let again = open(&b);
        assert_eq!((again.replayed.records, again.replayed.writes), (0, 0));
        assert_eq!(get(&again.db, "k3").as_deref(), Some("three, rewritten"));
    }

    #[test]
    fn replaying_over_a_store_that_kept_some_writes_ends_in_the_same_state() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let s = open(&a);
        s.journal
            .write(&s.db, &put("k", "first"), true, Apply::Batch)
            .unwrap();
        s.journal
            .write(&s.db, &put("gone", "x"), true, Apply::Batch)
            .unwrap();
        let mut del = Ops::default();
        del.remove(&b"gone"[..]);
        s.journal.write(&s.db, &del, true, Apply::Batch).unwrap();
        s.journal
            .write(&s.db, &put("k", "last"), true, Apply::Batch)
            .unwrap();
        // The crashed store had kept a later prefix of the writes (and an older value).
        {
            let db = sled::Config::new().path(&b).open().unwrap();
            db.insert("k", "first").unwrap();
            db.flush().unwrap();
        }
        journal_only(&a, &b);
        let r = open(&b);
        assert_eq!(r.replayed.records, 4);
        assert_eq!(get(&r.db, "k").as_deref(), Some("last"));
        assert_eq!(get(&r.db, "gone"), None);
    }

    #[test]
    fn a_torn_last_record_ends_the_replay_and_the_earlier_ones_count() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let s = open(&a);
        for i in 0..3 {
            s.journal
                .write(&s.db, &put(&format!("k{i}"), "v"), true, Apply::Batch)
                .unwrap();
        }
        journal_only(&a, &b);
        // A crash in the middle of the third append: its last bytes never arrived.
        let seg = segments(&b).pop().unwrap();
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let r = open(&b);
        assert_eq!((r.replayed.records, r.replayed.torn), (2, 1));
        assert_eq!(get(&r.db, "k1").as_deref(), Some("v"));
        assert_eq!(get(&r.db, "k2"), None);

        // A flipped byte is caught by the checksum the same way.
        let c = tmp.path().join("c");
        journal_only(&a, &c);
        let seg = segments(&c).pop().unwrap();
        let mut data = fs::read(&seg).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0xff;
        fs::write(&seg, data).unwrap();
        let r = open(&c);
        assert_eq!((r.replayed.records, r.replayed.torn), (2, 1));
    }

    #[test]
    fn a_record_that_checks_out_but_does_not_parse_stops_the_open() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("j");
        fs::create_dir_all(dir.join("journal")).unwrap();
        let body = [7u8, 1, 0, b'k'];
        let mut rec = (body.len() as u32).to_le_bytes().to_vec();
        rec.extend_from_slice(&checksum(4, &body).to_le_bytes());
        rec.extend_from_slice(&body);
        fs::write(dir.join("journal").join(format!("{:020}.wal", 4)), rec).unwrap();
        let db = sled::Config::new().path(&dir).open().unwrap();
        let synced = SyncedFlush::open(&dir).unwrap();
        let err = Journal::open(&dir.join("journal"), &db, &synced, 1 << 20)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("does not parse"), "{err}");
        // Nothing was deleted: the operator can look at it.
        assert_eq!(segments(&dir).len(), 1);
    }

    #[test]
    fn a_checkpoint_flushes_sled_and_deletes_the_sealed_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let s = open(&dir);
        assert!(
            !s.journal.checkpoint(&s.db, &s.synced).unwrap(),
            "nothing to do"
        );
        s.journal
            .write(&s.db, &put("k", "v"), true, Apply::Batch)
            .unwrap();
        assert!(s.journal.segment_len() > 0);
        let before = segments(&dir);
        assert!(s.journal.checkpoint(&s.db, &s.synced).unwrap());
        let after = segments(&dir);
        assert_eq!(after.len(), 1);
        assert_ne!(before, after, "a new segment replaced the sealed one");
        assert_eq!(s.journal.segment_len(), 0);
        drop(s);
        // sled alone has the write now.
        fs::remove_dir_all(dir.join("journal")).unwrap();
        let r = open(&dir);
        assert_eq!(get(&r.db, "k").as_deref(), Some("v"));
    }

    #[test]
    fn the_checkpoint_thread_runs_on_its_interval_and_when_kicked_by_size() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let db = sled::Config::new().path(&dir).open().unwrap();
        let synced = SyncedFlush::open(&dir).unwrap();
        // Tiny size limit: every write asks for a checkpoint at once.
        let (journal, _) = Journal::open(&dir.join("journal"), &db, &synced, 1).unwrap();
        let journal = std::sync::Arc::new(journal);
        let thread = {
            let (j, db) = (journal.clone(), db.clone());
            std::thread::spawn(move || j.run_checkpoints(&db, &synced, Duration::from_secs(3600)))
        };
        journal
            .write(&db, &put("k", "v"), true, Apply::Batch)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while journal.segment_len() > 0 {
            assert!(Instant::now() < deadline, "no checkpoint after a kick");
            std::thread::sleep(Duration::from_millis(5));
        }
        journal.stop_checkpoints();
        thread.join().unwrap();
        assert_eq!(segments(&dir).len(), 1);
    }

    #[test]
    fn a_checkpoint_waits_until_deferred_records_are_applied() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let s = open(&dir);
        let ops = put("k", "v");
        let (ticket, _) = s.journal.append_deferred(&ops, true).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let h = scope.spawn(|| {
                let r = s.journal.checkpoint(&s.db, &s.synced);
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                r
            });
            std::thread::sleep(Duration::from_millis(200));
            assert!(
                !done.load(std::sync::atomic::Ordering::SeqCst),
                "flushed before the apply"
            );
            ops.apply(&s.db).unwrap();
            s.journal.applied(ticket, true);
            assert!(h.join().unwrap().unwrap());
        });
        drop(s);
        fs::remove_dir_all(dir.join("journal")).unwrap();
        assert_eq!(get(&open(&dir).db, "k").as_deref(), Some("v"));
    }

    #[test]
    fn after_a_failed_apply_checkpoints_keep_the_journal_for_the_next_start() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let s = open(&a);
        let (ticket, _) = s.journal.append_deferred(&put("k", "v"), true).unwrap();
        s.journal.applied(ticket, false);
        let err = s.journal.checkpoint(&s.db, &s.synced).unwrap_err();
        assert!(err.to_string().contains("could not be applied"), "{err}");
        // The record is still there for the next start.
        journal_only(&a, &b);
        assert_eq!(get(&open(&b).db, "k").as_deref(), Some("v"));
    }

    #[test]
    fn a_recycled_file_replays_only_its_new_records() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, copy) = (tmp.path().join("s"), tmp.path().join("copy"));
        let s = open(&dir);
        for i in 0..50 {
            s.journal
                .write(&s.db, &put(&format!("old{i}"), "x"), true, Apply::Batch)
                .unwrap();
        }
        let first = segments(&dir).pop().unwrap();
        let first_len = fs::metadata(&first).unwrap().len();
        // Segment 1 becomes the spare; segment 2 is new.
        assert!(s.journal.checkpoint(&s.db, &s.synced).unwrap());
        assert!(dir.join("journal").join(SPARE).exists());
        s.journal
            .write(&s.db, &put("mid", "x"), true, Apply::Batch)
            .unwrap();
        // Segment 3 is the old segment 1, renamed: same blocks, old records still in it.
        assert!(s.journal.checkpoint(&s.db, &s.synced).unwrap());
        let third = segments(&dir).pop().unwrap();
        assert_eq!(fs::metadata(&third).unwrap().len(), first_len);
        s.journal
            .write(&s.db, &put("new1", "a"), true, Apply::Batch)
            .unwrap();
        s.journal
            .write(&s.db, &put("new2", "b"), true, Apply::Batch)
            .unwrap();
        assert_eq!(
            fs::metadata(&third).unwrap().len(),
            first_len,
            "written in place"
        );

        journal_only(&dir, &copy);
        let r = open(&copy);
        assert_eq!(r.replayed.records, 2, "{:?}", r.replayed);
        assert_eq!(get(&r.db, "new2").as_deref(), Some("b"));
        assert_eq!(get(&r.db, "old7"), None, "the old records do not check out");
    }

    #[test]
    fn an_abandoned_applier_releases_the_readers_and_keeps_the_journal() {
        let tmp = tempfile::tempdir().unwrap();
        let s = open(&tmp.path().join("s"));
        s.journal.append_deferred(&put("k", "v"), true).unwrap();
        s.journal.abandon();
        s.journal.caught_up();
        assert!(s.journal.checkpoint(&s.db, &s.synced).is_err());
    }
}
