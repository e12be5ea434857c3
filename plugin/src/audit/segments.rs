//! The segments: the files of JSON lines, the `segments` manifest that caches their sizes,
//! and the store state the writer and the queries share (module docs of [`crate::audit`],
//! "Files" and "Retention").

use super::*;

/// A segment file: the period it covers and its part number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct SegKey {
    pub(super) start_ms: i64,
    pub(super) span_ms: i64,
    pub(super) part: u32,
}

impl SegKey {
    pub(super) fn end_ms(&self) -> i64 {
        self.start_ms.saturating_add(self.span_ms)
    }

    /// `audit-<start_ms>-<span>s.jsonl`, or `audit-<start_ms>-<span>s.<part>.jsonl`.
    pub(super) fn file_name(&self) -> String {
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
    pub(super) fn parse(name: &str) -> Option<Self> {
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
pub(super) struct SegInfo {
    pub(super) bytes: u64,
    pub(super) lines: u64,
}

/// What open found on disk.
pub(super) struct Survey {
    pub(super) segments: BTreeMap<SegKey, SegInfo>,
    pub(super) next_seq: u64,
}

/// Lists the segments with their sizes and line counts, and finds the next `seq`. Lines are
/// counted only in what was appended since the `segments` file was saved (everything, for
/// segments it does not list or lists as larger than they are).
pub(super) fn survey(dir: &Path) -> io::Result<Survey> {
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
pub(super) fn last_seq(chunk: &[u8]) -> Option<u64> {
    chunk
        .strip_suffix(b"\n")?
        .rsplit(|b| *b == b'\n')
        .find_map(|line| parse_prefix(line).map(|(_, seq)| seq))
}

pub(super) struct Manifest {
    pub(super) next_seq: u64,
    pub(super) segments: HashMap<SegKey, SegInfo>,
}

/// Reads `<dir>/segments`:
/// ```text
/// mailbell audit segments 1
/// next_seq <n>
/// <file name> <bytes> <lines>
/// ```
/// `None` when it is missing or malformed (then open counts everything).
pub(super) fn read_manifest(dir: &Path) -> Option<Manifest> {
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
pub(super) struct Limits {
    pub(super) span_ms: i64,
    pub(super) segment_max_bytes: u64,
    pub(super) retention_ms: Option<i64>,
    pub(super) max_records: u64,
    pub(super) max_bytes: Option<u64>,
    pub(super) flush_every: Duration,
}

impl Limits {
    pub(super) fn new(cfg: &AuditConfig) -> Self {
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
pub(super) struct Store {
    pub(super) dir: PathBuf,
    pub(super) limits: Limits,
    pub(super) state: Mutex<State>,
    pub(super) stats: Arc<AuditStats>,
}

pub(super) struct State {
    pub(super) segments: BTreeMap<SegKey, SegInfo>,
    pub(super) open: HashMap<SegKey, OpenSegment>,
    /// Where the last record went, for the next one of the same period.
    pub(super) current: Option<SegKey>,
    pub(super) next_seq: u64,
    /// Closed files with writes not yet given to the syncer.
    pub(super) unsynced: Vec<Arc<File>>,
    /// The first write error since the last flush.
    pub(super) error: Option<io::Error>,
    /// The counts changed since the `segments` file was saved.
    pub(super) counts_dirty: bool,
    /// A segment was begun or deleted since the `segments` file was saved.
    pub(super) segments_changed: bool,
    /// A segment was begun since the writer last looked (time to apply retention).
    pub(super) begun: bool,
}

pub(super) struct OpenSegment {
    pub(super) out: BufWriter<SharedFile>,
    pub(super) file: Arc<File>,
    /// Written since the writer last closed idle files.
    pub(super) used: bool,
    /// Written since the last sync was asked for.
    pub(super) unsynced: bool,
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
pub(super) struct SharedFile {
    pub(super) file: Arc<File>,
    /// Where the next write lands (the file is opened for appending at this length).
    pub(super) end: u64,
    /// Start of the bytes not yet handed to writeback.
    pub(super) kicked: u64,
}

impl SharedFile {
    pub(super) fn new(file: Arc<File>, len: u64) -> Self {
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
pub(super) fn start_writeback(file: &File, offset: u64, len: u64) {
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
pub(super) fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

impl Store {
    pub(super) fn new(dir: &Path, cfg: &AuditConfig, found: Survey) -> Self {
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

    pub(super) fn path(&self, key: &SegKey) -> PathBuf {
        self.dir.join(key.file_name())
    }

    /// Appends one event, as the next `seq`, to the segment of its time.
    pub(super) fn write(
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
    pub(super) fn target(&self, st: &mut State, at_ms: i64) -> io::Result<SegKey> {
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
    pub(super) fn open_segment(&self, st: &mut State, key: SegKey) -> io::Result<()> {
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
    pub(super) fn flush_buffers(&self, st: &mut State) -> io::Result<()> {
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
    pub(super) fn save_manifest(&self, st: &mut State) -> io::Result<()> {
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

    pub(super) fn over_caps(&self) -> bool {
        self.stats.stored.load(Ordering::Relaxed) > self.limits.max_records
            || self
                .limits
                .max_bytes
                .is_some_and(|m| self.stats.stored_bytes.load(Ordering::Relaxed) > m)
    }

    /// Deletes the segments that ended before the retention period (relative to `now_ms`),
    /// then the oldest while a cap is passed, never the newest one nor the one being written.
    pub(super) fn prune(&self, now_ms: i64) -> io::Result<u64> {
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
}

impl State {
    /// Closes a segment after handing its buffer to the OS.
    pub(super) fn close(&mut self, key: &SegKey) {
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
    pub(super) fn discard(&mut self, key: &SegKey) {
        if let Some(seg) = self.open.remove(key) {
            let (_file, _lost) = seg.out.into_parts();
        }
        if self.current == Some(*key) {
            self.current = None;
        }
    }

    /// Closes the segments not written since the last call.
    pub(super) fn close_idle(&mut self) {
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
    pub(super) fn take_unsynced(&mut self) -> Vec<Arc<File>> {
        let mut files = std::mem::take(&mut self.unsynced);
        for s in self.open.values_mut() {
            if std::mem::take(&mut s.unsynced) {
                files.push(s.file.clone());
            }
        }
        files
    }

    pub(super) fn publish_totals(&self, stats: &AuditStats) {
        let lines = self.segments.values().map(|i| i.lines).sum();
        let bytes = self.segments.values().map(|i| i.bytes).sum();
        stats.stored.store(lines, Ordering::Relaxed);
        stats.stored_bytes.store(bytes, Ordering::Relaxed);
    }
}

/// Cuts a last line that has no newline (a crash in the middle of a write) off the end of an
/// open segment. Returns the file's length after.
pub(super) fn cut_unfinished_line(file: &mut File, path: &Path) -> io::Result<u64> {
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
pub(super) fn encode_line(
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
pub(super) fn parse_prefix(line: &[u8]) -> Option<(i64, u64)> {
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

pub(super) fn parse_digits(s: &[u8]) -> Option<(u64, &[u8])> {
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

pub(super) fn count_lines(chunk: &[u8]) -> u64 {
    chunk.iter().filter(|b| **b == b'\n').count() as u64
}

/// Reads `file` from where it stands to its end and calls `f` with runs of whole lines, each
/// ending in a newline. A last line without its newline (being written, or cut by a crash) is
/// left out; a line longer than [`READ_CHUNK`] is skipped.
pub(super) fn read_lines<E: From<io::Error>>(
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
