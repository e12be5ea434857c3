//! Queries: the best `limit` records of a time range, found by searching whole chunks of
//! lines for the user's or notice's bytes and decoding only the lines that match (module
//! docs of [`crate::audit`], "Queries").

use super::*;

pub(super) fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// What a query looks for in the raw text before decoding a line. `fold`: search the text
/// ASCII-lowercased (for notice ids, which are stored as given).
pub(super) struct Needle {
    text: String,
    fold: bool,
}

/// A record a query keeps, ordered by `key`: smaller is better.
pub(super) struct Candidate {
    key: (i64, u64),
    entry: Entry,
}

/// A kept record, decoded or (when the query has no filter that needs decoding) still the raw
/// line: a newest-first query reads lines oldest first, so nearly every line is kept for a
/// while, and decoding them all would cost ten times the rest of the scan.
pub(super) enum Entry {
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
pub(super) struct Scan {
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

impl Store {
    /// The best `limit` records (`newest` first, or oldest), and, when `count`, how many
    /// matching records it left out.
    pub(super) fn query(
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
