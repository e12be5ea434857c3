//! The meter store's files: record framing, names, recovery at open, queries and pruning.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, NaiveDate, Utc};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tracing::warn;

use super::{
    io_err, lock, MeterError, MeterPage, MeterQuery, MeterRecord, MAX_QUERY_LIMIT, MAX_RECORD,
};

/// Record header: body length and CRC-32 of the body, both little-endian u32.
pub(super) const HEADER: usize = 8;

/// Where writes go: the files, plus an injected failure for tests and drills
/// ([`super::MeterStore::inject_failure`]).
#[derive(Debug, Default)]
pub(super) struct Disk {
    pub(super) injected: Mutex<Option<io::ErrorKind>>,
}

impl Disk {
    fn injected(&self) -> io::Result<()> {
        match *lock(&self.injected) {
            Some(kind) => Err(io::Error::new(kind, "injected failure")),
            None => Ok(()),
        }
    }

    pub(super) fn write_at(&self, f: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        self.injected()?;
        f.write_all_at(buf, offset)
    }

    pub(super) fn sync(&self, f: &File) -> io::Result<()> {
        self.injected()?;
        f.sync_data()
    }

    /// Opens (creating, and then syncing the directory) the file of `day`; returns its length.
    pub(super) fn open_day(
        &self,
        dir: &Path,
        day: NaiveDate,
    ) -> Result<(PathBuf, File, u64), MeterError> {
        self.injected().map_err(io_err(dir, "create a file"))?;
        let path = dir.join(file_name(day));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path, "open"))?;
        let len = f.metadata().map_err(io_err(&path, "stat"))?.len();
        if len == 0 {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir, "sync directory"))?;
        }
        Ok((path, f, len))
    }
}

pub(super) fn file_name(day: NaiveDate) -> String {
    format!("meter-{}.log", day.format("%Y-%m-%d"))
}

fn parse_name(name: &str) -> Option<NaiveDate> {
    let d = name.strip_prefix("meter-")?.strip_suffix(".log")?;
    NaiveDate::parse_from_str(d, "%Y-%m-%d").ok()
}

pub(super) fn day_of(ms: i64) -> NaiveDate {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .date_naive()
}

fn day_start_ms(day: NaiveDate) -> i64 {
    day.and_hms_opt(0, 0, 0)
        .map_or(0, |t| t.and_utc().timestamp_millis())
}

const DAY_MS: i64 = 86_400_000;

/// The store's files, oldest first.
pub(super) fn list(dir: &Path) -> Result<Vec<(NaiveDate, PathBuf)>, MeterError> {
    let mut files = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(io_err(dir, "list")(e)),
    };
    for e in entries {
        let e = e.map_err(io_err(dir, "list"))?;
        if let Some(day) = e.file_name().to_str().and_then(parse_name) {
            files.push((day, e.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// Appends one framed record to `out` (tests write records so; the store uses
/// [`encode_open`] and [`set_id`]).
#[cfg(test)]
pub(super) fn encode(rec: &MeterRecord, out: &mut Vec<u8>) -> Result<(), MeterError> {
    let start = out.len();
    let len = serialize(rec, out)?;
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The id a record is encoded with before it has one: 20 digits, the widest a `u64` takes.
const ID_PLACEHOLDER: &[u8] = b"18446744073709551615";
/// Where the id's digits are in an encoded record: after the header and `{"id":`.
const ID_AT: usize = HEADER + 6;

/// A record [`encode_open`] put into a buffer: where it starts, and the CRC of its body after
/// the id's field, so that [`set_id`] hashes only the few bytes it writes.
#[derive(Clone, Debug)]
pub(super) struct Open {
    start: usize,
    rest: crc32fast::Hasher,
}

/// Serializes `rec` (its id the widest number) into `out` after a header of zeros; returns
/// the body's length. The body stays in `out` only when it encodes and fits the cap.
fn serialize(rec: &MeterRecord, out: &mut Vec<u8>) -> Result<usize, MeterError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    if let Err(e) = serde_json::to_writer(&mut *out, rec) {
        out.truncate(start);
        return Err(MeterError::Unwritable(format!(
            "record does not encode: {e}"
        )));
    }
    let len = out.len() - start - HEADER;
    if len > MAX_RECORD {
        out.truncate(start);
        return Err(MeterError::TooLarge(len));
    }
    Ok(len)
}

/// [`encode`] with the id left open (the widest number) and the header's CRC not written:
/// the costly part runs outside the queue's lock; [`set_id`] then writes the real id in place
/// and the CRC.
pub(super) fn encode_open(
    at_ms: i64,
    entry: super::Entry,
    out: &mut Vec<u8>,
) -> Result<Open, Box<(MeterError, super::Entry)>> {
    let start = out.len();
    let rec = MeterRecord {
        id: u64::MAX,
        at_ms,
        entry,
    };
    let len = match serialize(&rec, out) {
        Ok(len) => len,
        Err(e) => return Err(Box::new((e, rec.entry))),
    };
    if out.get(start + ID_AT..start + ID_AT + 20) != Some(ID_PLACEHOLDER) {
        out.truncate(start);
        let e = MeterError::Unwritable("record encoding does not start with its id".into());
        return Err(Box::new((e, rec.entry)));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    let mut rest = crc32fast::Hasher::new();
    rest.update(&out[start + ID_AT + 20..start + HEADER + len]);
    Ok(Open { start, rest })
}

/// Writes `id` into the record [`encode_open`] put into `out`: its digits, then spaces
/// (whitespace JSON allows before the next `,`), and the body's CRC, from the CRC of the
/// first 26 bytes combined with the rest's.
pub(super) fn set_id(out: &mut [u8], open: &Open, id: u64) {
    let start = open.start;
    let field = &mut out[start + ID_AT..start + ID_AT + 20];
    field.fill(b' ');
    let mut digits = [0u8; 20];
    let mut n = id;
    let mut k = digits.len();
    loop {
        k -= 1;
        digits[k] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    field[..digits.len() - k].copy_from_slice(&digits[k..]);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[start + HEADER..start + ID_AT + 20]);
    crc.combine(&open.rest);
    out[start + 4..start + HEADER].copy_from_slice(&crc.finalize().to_le_bytes());
}

/// Checks one record's body against its header's CRC; the error says why the file ends here.
fn check_crc(header: [u8; HEADER], body: &[u8]) -> Result<(), &'static str> {
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if crc32fast::hash(body) != crc {
        return Err("CRC mismatch");
    }
    Ok(())
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, &'static str> {
    serde_json::from_slice(body).map_err(|_| "body is not a meter record")
}

/// How a scan ended: the length of the valid records, and why it stopped early if it did.
pub(super) struct Scanned {
    pub valid_len: u64,
    pub stopped: Option<&'static str>,
}

/// Reads the records of `r` (at most `cap` bytes of it) in order, calling `f` on each until it
/// breaks or the records end.
pub(super) fn scan(
    r: impl Read,
    cap: u64,
    mut f: impl FnMut(MeterRecord) -> ControlFlow<()>,
) -> io::Result<Scanned> {
    scan_bodies(r, cap, |body| decode(body).map(&mut f))
}

/// [`scan`] with each CRC-checked body handed to `f` undecoded; an `Err` from `f` ends the
/// valid records there, as a bad CRC does.
fn scan_bodies(
    r: impl Read,
    cap: u64,
    mut f: impl FnMut(&[u8]) -> Result<ControlFlow<()>, &'static str>,
) -> io::Result<Scanned> {
    let mut r = BufReader::with_capacity(256 * 1024, r.take(cap));
    let mut at = 0u64;
    let mut body = Vec::new();
    loop {
        let mut header = [0u8; HEADER];
        match read_full(&mut r, &mut header)? {
            0 => {
                return Ok(Scanned {
                    valid_len: at,
                    stopped: None,
                })
            }
            HEADER => {}
            _ => {
                return Ok(Scanned {
                    valid_len: at,
                    stopped: Some("torn header"),
                })
            }
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len > MAX_RECORD {
            return Ok(Scanned {
                valid_len: at,
                stopped: Some("length over the cap"),
            });
        }
        body.resize(len, 0);
        if read_full(&mut r, &mut body)? < len {
            return Ok(Scanned {
                valid_len: at,
                stopped: Some("torn body"),
            });
        }
        match check_crc(header, &body).and_then(|()| f(&body)) {
            Err(why) => {
                return Ok(Scanned {
                    valid_len: at,
                    stopped: Some(why),
                })
            }
            Ok(flow) => {
                at += (HEADER + len) as u64;
                if flow.is_break() {
                    return Ok(Scanned {
                        valid_len: at,
                        stopped: None,
                    });
                }
            }
        }
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What open learned: the newest file and its valid length, and the next id.
pub(super) struct Recovered {
    pub tail: (PathBuf, u64),
    pub next_id: u64,
}

/// Cuts a torn tail off the newest file (syncing the cut) and finds the largest id, in the
/// newest file holding a record.
pub(super) fn recover(dir: &Path) -> Result<Recovered, MeterError> {
    let files = list(dir)?;
    let mut tail = (PathBuf::new(), 0);
    let mut last_id = 0;
    for (k, (_, path)) in files.iter().enumerate().rev() {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path, "open"))?;
        let len = f.metadata().map_err(io_err(path, "stat"))?.len();
        let scanned = scan(&f, len, |r| {
            last_id = last_id.max(r.id);
            ControlFlow::Continue(())
        })
        .map_err(io_err(path, "read"))?;
        if k + 1 == files.len() {
            if scanned.valid_len < len {
                warn!(
                    file = %path.display(),
                    at = scanned.valid_len,
                    cut = len - scanned.valid_len,
                    why = scanned.stopped.unwrap_or(""),
                    "meter store: cutting a torn tail (an append a crash interrupted)"
                );
                f.set_len(scanned.valid_len)
                    .and_then(|()| f.sync_all())
                    .map_err(io_err(path, "cut the torn tail"))?;
            }
            tail = (path.clone(), scanned.valid_len);
        } else if scanned.stopped.is_some() {
            warn!(file = %path.display(), at = scanned.valid_len, "meter store: an older file ends in a bad record");
        }
        if last_id > 0 {
            break;
        }
    }
    Ok(Recovered {
        tail,
        next_id: last_id + 1,
    })
}

/// Runs a query over the files whose day can hold matching records. `durable` caps what is
/// read of the file being written.
pub(super) fn query(
    dir: &Path,
    q: &MeterQuery,
    durable: &(PathBuf, u64),
) -> Result<MeterPage, MeterError> {
    let limit = q.limit.clamp(1, MAX_QUERY_LIMIT);
    let user = q.user.as_deref().map(str::to_lowercase);
    let mut page = MeterPage::default();
    for (day, path) in list(dir)? {
        let start = day_start_ms(day);
        if q.since_ms.is_some_and(|s| start + DAY_MS <= s) || q.until_ms.is_some_and(|u| start >= u)
        {
            continue;
        }
        let f = match File::open(&path) {
            Ok(f) => f,
            // Pruned meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&path, "open")(e)),
        };
        let cap = if !durable.0.as_os_str().is_empty() && path == durable.0 {
            durable.1
        } else {
            u64::MAX
        };
        let mut full = false;
        let scanned = scan(&f, cap, |r| {
            let wanted = q.after.is_none_or(|a| r.id > a)
                && q.since_ms.is_none_or(|s| r.at_ms >= s)
                && q.until_ms.is_none_or(|u| r.at_ms < u)
                && user
                    .as_deref()
                    .is_none_or(|u| r.entry.account().is_some_and(|a| a.to_lowercase() == u));
            if !wanted {
                return ControlFlow::Continue(());
            }
            if page.records.len() == limit {
                full = true;
                return ControlFlow::Break(());
            }
            page.records.push(r);
            ControlFlow::Continue(())
        })
        .map_err(io_err(&path, "read"))?;
        if let (Some(why), false) = (scanned.stopped, full) {
            if cap == u64::MAX {
                warn!(file = %path.display(), at = scanned.valid_len, why, "meter store: a file ends in a bad record");
            }
        }
        if full {
            page.next_after = page.records.last().map(|r| r.id);
            break;
        }
    }
    Ok(page)
}

/// What every record body starts with; decoding only this skips the rest of the body
/// without building it.
#[derive(Deserialize)]
pub(super) struct Head {
    pub id: u64,
    pub at_ms: i64,
}

/// The first record's id in `path`, if it has a readable one.
fn first_id(path: &Path) -> Result<Option<u64>, MeterError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "open")(e)),
    };
    let mut id = None;
    scan_bodies(f, u64::MAX, |body| {
        id = Some(decode::<Head>(body)?.id);
        Ok(ControlFlow::Break(()))
    })
    .map_err(io_err(path, "read"))?;
    Ok(id)
}

/// Calls `f` with every record whose id is above `after`, decoded as `T`, oldest first, reading
/// each file once: files that end before `after` (the next file starts at or below
/// `after + 1`) are skipped unread, and records up to `after` are decoded only as far as
/// [`Head`]. `durable` caps what is read of the file being written. `f` breaks to stop.
pub(super) fn scan_after<T: DeserializeOwned>(
    dir: &Path,
    after: u64,
    durable: &(PathBuf, u64),
    f: &mut dyn FnMut(Head, T) -> ControlFlow<()>,
) -> Result<(), MeterError> {
    scan_bodies_after(dir, after, durable, &mut |body| {
        let head: Head = decode(body)?;
        if head.id <= after {
            return Ok(ControlFlow::Continue(()));
        }
        Ok(f(head, decode(body)?))
    })
}

/// [`scan_after`] for a `T` that holds the record's id (`T::id`): each body is decoded once,
/// as `T` (records up to `after` too, then skipped).
pub(super) fn scan_after_once<T: DeserializeOwned + HasId>(
    dir: &Path,
    after: u64,
    durable: &(PathBuf, u64),
    f: &mut dyn FnMut(T) -> ControlFlow<()>,
) -> Result<(), MeterError> {
    scan_bodies_after(dir, after, durable, &mut |body| {
        let r: T = decode(body)?;
        if r.id() <= after {
            return Ok(ControlFlow::Continue(()));
        }
        Ok(f(r))
    })
}

/// A decoded record that knows its id.
pub(super) trait HasId {
    fn id(&self) -> u64;
}

/// What [`scan_bodies_after`] calls with each body: `Err(why)` ends the file there.
type BodyFn<'a> = dyn FnMut(&[u8]) -> Result<ControlFlow<()>, &'static str> + 'a;

/// The files' bodies from the one holding `after + 1` on, to `f` (which skips those up to
/// `after`) until it breaks.
fn scan_bodies_after(
    dir: &Path,
    after: u64,
    durable: &(PathBuf, u64),
    f: &mut BodyFn<'_>,
) -> Result<(), MeterError> {
    let files = list(dir)?;
    let mut start = 0;
    for (k, (_, path)) in files.iter().enumerate().skip(1) {
        match first_id(path)? {
            Some(first) if first <= after.saturating_add(1) => start = k,
            Some(_) => break,
            None => {}
        }
    }
    for (_, path) in &files[start..] {
        let f_in = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(path, "open")(e)),
        };
        let cap = if !durable.0.as_os_str().is_empty() && *path == durable.0 {
            durable.1
        } else {
            u64::MAX
        };
        let mut stop = false;
        let scanned = scan_bodies(f_in, cap, |body| {
            let flow = f(body)?;
            stop = flow.is_break();
            Ok(flow)
        })
        .map_err(io_err(path, "read"))?;
        if let (Some(why), u64::MAX) = (scanned.stopped, cap) {
            warn!(file = %path.display(), at = scanned.valid_len, why, "meter store: a file ends in a bad record");
        }
        if stop {
            break;
        }
    }
    Ok(())
}

/// Deletes the files whose day ended more than `retention_days` ago, never the newest.
pub(super) fn prune(dir: &Path, retention_days: u32, now_ms: i64) -> Result<u64, MeterError> {
    if retention_days == 0 {
        return Ok(0);
    }
    let files = list(dir)?;
    let keep_after = now_ms - i64::from(retention_days) * DAY_MS;
    let mut n = 0;
    for (day, path) in files.iter().take(files.len().saturating_sub(1)) {
        if day_start_ms(*day) + DAY_MS <= keep_after {
            std::fs::remove_file(path).map_err(io_err(path, "delete"))?;
            n += 1;
        }
    }
    Ok(n)
}
