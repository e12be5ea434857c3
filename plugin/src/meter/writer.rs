//! The `meter-writer` thread: group commits (module docs of [`crate::meter`]).

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use tracing::{error, info};

use super::file::day_of;
use super::{lock, Request, Shared};

type Waiter = tokio::sync::oneshot::Sender<Result<(), String>>;

/// How often the writer prunes while the store is idle.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

pub(super) struct Writer {
    shared: Arc<Shared>,
    /// The file being written: its day, path, handle and durable length.
    file: Option<(NaiveDate, PathBuf, File, u64)>,
    /// Encoded records not yet durable, for `day`; written at the file's durable length, and
    /// rewritten there whole after a failure (the same bytes: ids are given once).
    buf: Vec<u8>,
    buf_records: u64,
    day: Option<NaiveDate>,
    waiters: Vec<Waiter>,
    /// When `buf` (or a waiter) started waiting for a commit.
    dirty_since: Option<Instant>,
    last_prune: Instant,
}

impl Writer {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            file: None,
            buf: Vec::new(),
            buf_records: 0,
            day: None,
            waiters: Vec::new(),
            dirty_since: None,
            last_prune: Instant::now(),
        }
    }

    pub(super) fn run(mut self) {
        let interval = self.shared.cfg.flush_interval;
        loop {
            let (requests, closing, oldest, full) = {
                let mut q = lock(&self.shared.queue);
                loop {
                    if q.closing || q.urgent || q.bytes >= super::GROUP_BYTES {
                        break;
                    }
                    // Records wait at most `interval` from the first of them (queued or
                    // taken); until then the writer sleeps, and appends do not wake it.
                    let since = match (self.dirty_since, q.oldest) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    let wait = match since {
                        Some(t) => match interval.checked_sub(t.elapsed()) {
                            Some(d) if !d.is_zero() => d,
                            _ => break,
                        },
                        None => PRUNE_EVERY,
                    };
                    let (guard, timeout) = self
                        .shared
                        .wake
                        .wait_timeout(q, wait)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    q = guard;
                    if timeout.timed_out() && since.is_none() {
                        break;
                    }
                }
                q.urgent = false;
                let oldest = q.oldest.take();
                let full = std::mem::take(&mut q.bytes) >= super::GROUP_BYTES;
                (
                    q.requests.drain(..).collect::<Vec<_>>(),
                    q.closing,
                    oldest,
                    full,
                )
            };
            if let Some(t) = oldest {
                self.dirty_since = Some(self.dirty_since.map_or(t, |d| d.min(t)));
            }
            let mut now = full || requests.iter().any(|r| r.done.is_some());
            for r in requests {
                self.take(r);
            }
            if self.dirty_since.is_some_and(|t| t.elapsed() >= interval) {
                now = true;
            }
            if (now || closing) && self.dirty_since.is_some() {
                self.commit();
            }
            if closing {
                if !self.buf.is_empty() {
                    // One more try, then say what is lost.
                    self.commit();
                }
                if !self.buf.is_empty() {
                    error!(
                        records = self.buf_records,
                        "meter store closing with records the disk refused; each is logged next"
                    );
                    // Logged whole, so that an operator can replay them.
                    let _ = super::file::scan(&self.buf[..], u64::MAX, |r| {
                        error!(
                            record = %serde_json::to_string(&r).unwrap_or_default(),
                            "meter record lost at shutdown"
                        );
                        std::ops::ControlFlow::Continue(())
                    });
                }
                return;
            }
            if self.dirty_since.is_none() && self.last_prune.elapsed() >= PRUNE_EVERY {
                self.prune();
            }
        }
    }

    /// Adds a request's encoded records to the group.
    fn take(&mut self, r: Request) {
        if self.buf.is_empty() {
            self.day = Some(day_of(r.at_ms));
        }
        self.buf.extend_from_slice(&r.bytes);
        self.buf_records += r.records;
        if let Some(w) = r.done {
            self.waiters.push(w);
        }
        if self.dirty_since.is_none() && (!self.buf.is_empty() || !self.waiters.is_empty()) {
            self.dirty_since = Some(Instant::now());
        }
    }

    /// Writes and syncs the group; on failure keeps it for the next try.
    fn commit(&mut self) {
        let started = Instant::now();
        match self.write_group() {
            Ok(()) => {
                let st = &self.shared.stats;
                st.commit_seconds.observe(started.elapsed().as_secs_f64());
                st.commits.fetch_add(1, Ordering::Relaxed);
                st.records.fetch_add(self.buf_records, Ordering::Relaxed);
                st.bytes.fetch_add(self.buf.len() as u64, Ordering::Relaxed);
                st.backlog.fetch_sub(self.buf_records, Ordering::Relaxed);
                self.buf.clear();
                self.buf_records = 0;
                self.dirty_since = None;
                if lock(&self.shared.failure).take().is_some() {
                    info!("meter store writes again");
                }
                for w in self.waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
            }
            Err(cause) => {
                self.shared.stats.errors.fetch_add(1, Ordering::Relaxed);
                let mut failure = lock(&self.shared.failure);
                if failure.as_deref() != Some(cause.as_str()) {
                    error!(error = %cause, records = self.buf_records, "meter store cannot write; keeping the records in memory and retrying");
                }
                *failure = Some(cause.clone());
                drop(failure);
                for w in self.waiters.drain(..) {
                    let _ = w.send(Err(cause.clone()));
                }
                // Retry after another interval.
                self.dirty_since = Some(Instant::now());
            }
        }
    }

    fn write_group(&mut self) -> Result<(), String> {
        let Some(day) = self.day else {
            return Ok(());
        };
        if self.file.as_ref().is_none_or(|f| f.0 != day) {
            let (path, f, len) = self
                .shared
                .disk
                .open_day(&self.shared.dir, day)
                .map_err(|e| chain(&e))?;
            let rolled = self.file.is_some();
            self.file = Some((day, path, f, len));
            if rolled {
                self.prune();
            }
        }
        let Some((_, path, f, durable)) = self.file.as_mut() else {
            return Ok(());
        };
        // A group of waiters only (a flush) still syncs: it checks that the disk takes writes.
        let disk = &self.shared.disk;
        let written = if self.buf.is_empty() {
            Ok(())
        } else {
            disk.write_at(f, &self.buf, *durable)
        };
        written
            .and_then(|()| disk.sync(f))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        *durable += self.buf.len() as u64;
        *lock(&self.shared.durable) = (path.clone(), *durable);
        Ok(())
    }

    fn prune(&mut self) {
        self.last_prune = Instant::now();
        match super::file::prune(
            &self.shared.dir,
            self.shared.cfg.retention_days,
            (self.shared.clock)(),
        ) {
            Ok(n) => {
                self.shared
                    .stats
                    .pruned_files
                    .fetch_add(n, Ordering::Relaxed);
                if n > 0 {
                    info!(files = n, "meter store: pruned old files");
                }
            }
            Err(e) => error!(error = %e, "meter store prune failed"),
        }
    }
}

/// An error and its causes, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
