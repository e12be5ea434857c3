//! The writer thread, which appends events to the segments, and the `audit-sync` thread,
//! which syncs them to disk (module docs of [`crate::audit`]).

use super::*;

/// A request to the syncer: sync these files, then answer (for [`AuditLog::flush`]).
pub(super) struct SyncJob {
    files: Vec<Arc<File>>,
    reply: Option<Reply>,
}

/// The `audit-sync` thread: `fdatasync`s the files the writer handed to the OS, so the
/// writer never waits for the disk. A failed periodic sync is reported by the next flush.
pub(super) fn sync_files(rx: mpsc::Receiver<SyncJob>, stats: &AuditStats) {
    let error_warn = RateLimit::new(1000);
    let mut failed: Option<io::Error> = None;
    for job in rx {
        let mut result = Ok(());
        for f in &job.files {
            if let Err(e) = f.sync_data() {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                if error_warn.allow(now_ms()) {
                    error!(error = %e, "audit log sync failed");
                }
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        match job.reply {
            Some(reply) => {
                let _ = reply.send(match failed.take() {
                    Some(e) => Err(e),
                    None => result,
                });
            }
            None => {
                if let Err(e) = result {
                    failed.get_or_insert(e);
                }
            }
        }
    }
}

/// How long the writer lets events gather after a group that emptied the channel, before it
/// waits on the channel again. The intake records a few events per message, one message at a
/// time at an MTA's pace: waking for each would cost this thread, and the committer that
/// sends them (it need not wake a sleeping thread), a wake-up per message. A burst that fills
/// a group ([`MAX_BATCH`]) never waits, and a flush is answered before the pause.
const GATHER: Duration = Duration::from_millis(5);

/// Writes events in channel order; flushes, syncs, saves the `segments` file and prunes
/// between groups.
pub(super) struct Writer {
    pub(super) store: Arc<Store>,
    /// Events in the channel (see `Inner::queued`).
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) sync_tx: mpsc::SyncSender<SyncJob>,
    pub(super) syncer: std::thread::JoinHandle<()>,
}

impl Writer {
    pub(super) fn run(self, rx: mpsc::Receiver<Msg>) {
        let store = &*self.store;
        let error_warn = RateLimit::new(1000);
        let mut line = Vec::with_capacity(1024);
        let mut scratch = Vec::with_capacity(1024);
        let mut flush_at: Option<Instant> = None;
        let mut next_prune = Instant::now();
        let mut next_manifest = Instant::now() + MANIFEST_EVERY;
        loop {
            let wake = flush_at.map_or(next_prune, |f| f.min(next_prune));
            let first = match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut stop = false;
            let mut prune = false;
            // Events were written and the channel is empty: let the next ones gather.
            let mut gather = false;
            if let Some(first) = first {
                let mut st = lock(&store.state);
                let mut msg = Some(first);
                let mut taken = 0usize;
                let mut flushed = false;
                while let Some(m) = msg.take() {
                    match m {
                        Msg::Events { at_ms, events } => {
                            self.queued.fetch_sub(events.len(), Ordering::AcqRel);
                            for event in events {
                                if let Err(e) =
                                    store.write(&mut st, at_ms, event, &mut line, &mut scratch)
                                {
                                    store.stats.errors.fetch_add(1, Ordering::Relaxed);
                                    if error_warn.allow(now_ms()) {
                                        error!(error = %e, "audit log write failed");
                                    }
                                    st.error.get_or_insert(e);
                                }
                            }
                            flush_at
                                .get_or_insert_with(|| Instant::now() + store.limits.flush_every);
                        }
                        Msg::Flush(reply) => {
                            self.sync(store, &mut st, Some(reply), true);
                            flush_at = None;
                            flushed = true;
                        }
                        Msg::Stop => {
                            stop = true;
                            break;
                        }
                    }
                    taken += 1;
                    if taken >= MAX_BATCH {
                        break;
                    }
                    msg = rx.try_recv().ok();
                }
                gather = taken < MAX_BATCH && !flushed;
                prune = std::mem::take(&mut st.begun);
            }
            if stop {
                break;
            }
            let now = Instant::now();
            if flush_at.is_some_and(|f| now >= f) {
                let mut st = lock(&store.state);
                let save = st.segments_changed || now >= next_manifest;
                self.sync(store, &mut st, None, save);
                if save {
                    next_manifest = now + MANIFEST_EVERY;
                }
                st.close_idle();
                flush_at = None;
            }
            if now >= next_prune {
                prune = true;
                next_prune = now + PRUNE_EVERY;
            }
            if prune || store.over_caps() {
                if let Err(e) = store.prune(now_ms()) {
                    error!(error = %e, "audit log prune failed");
                }
            }
            if gather {
                std::thread::sleep(GATHER);
            }
        }
        // Stopped, or every handle is gone: write, sync and save everything.
        let (reply, done) = mpsc::sync_channel(1);
        {
            let mut st = lock(&store.state);
            self.sync(store, &mut st, Some(reply), true);
            let open: Vec<SegKey> = st.open.keys().copied().collect();
            for k in &open {
                st.close(k);
            }
        }
        match done.recv() {
            Ok(Ok(())) | Err(_) => {}
            Ok(Err(e)) => error!(error = %e, "audit log: the last sync failed"),
        }
        drop(self.sync_tx);
        let _ = self.syncer.join();
    }

    /// Hands the buffers to the OS and the written files to the syncer; with a reply (a
    /// flush), the syncer answers once they are on disk, or this answers at once with the
    /// write error met since the last flush.
    fn sync(&self, store: &Store, st: &mut State, reply: Option<Reply>, save: bool) {
        let flushed = store.flush_buffers(st).is_ok();
        if flushed && save && (st.counts_dirty || st.segments_changed) {
            if let Err(e) = store.save_manifest(st) {
                warn!(error = %e, "audit log: cannot save the segments file");
            }
        }
        let files = st.take_unsynced();
        match reply {
            Some(reply) => match st.error.take() {
                Some(e) => {
                    let _ = reply.send(Err(e));
                    // Still sync what was written.
                    if let Err(
                        mpsc::TrySendError::Full(job) | mpsc::TrySendError::Disconnected(job),
                    ) = self.sync_tx.try_send(SyncJob { files, reply: None })
                    {
                        st.unsynced.extend(job.files);
                    }
                }
                None => {
                    if self
                        .sync_tx
                        .send(SyncJob {
                            files,
                            reply: Some(reply),
                        })
                        .is_err()
                    {
                        error!("audit log: the sync thread has stopped");
                    }
                }
            },
            None => {
                if files.is_empty() {
                    return;
                }
                if let Err(mpsc::TrySendError::Full(job) | mpsc::TrySendError::Disconnected(job)) =
                    self.sync_tx.try_send(SyncJob { files, reply: None })
                {
                    // The syncer is still busy: these go with the next sync.
                    st.unsynced.extend(job.files);
                }
            }
        }
    }
}
