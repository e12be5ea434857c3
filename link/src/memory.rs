//! An in-memory [`Outbox`]: for one-off sends (`send-test`, `demo`) and tests where the sender
//! itself is not the thing under test. It is not durable: a real mail host uses its sled
//! outbox.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::id::NotifId;
use crate::net::{OutItem, Outbox, StoreError};

/// What happened to an item that left the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settled {
    Acked,
    Dead(String),
}

#[derive(Default)]
struct State {
    items: BTreeMap<u64, (NotifId, Vec<u8>)>,
    /// Items a retry-later NACK put off, with the time they are due. They get a new position
    /// (after any cursor) only when due, so a client's cursor never skips them.
    deferred: Vec<(Instant, NotifId, Vec<u8>)>,
    /// Position of each item in `items`, so settling one does not scan the queue.
    seq_of: HashMap<NotifId, u64>,
    settled: HashMap<NotifId, Settled>,
}

/// A queue in memory with the outbox semantics the link client expects.
#[derive(Default)]
pub struct MemoryOutbox {
    state: Mutex<State>,
    next: AtomicU64,
    notify: Arc<Notify>,
    /// Signalled whenever an item is settled.
    pub settled: Notify,
}

impl MemoryOutbox {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.state
            .lock()
            .map_err(|_| "memory outbox lock poisoned".into())
    }

    /// Queues an item at the end.
    pub fn push(&self, id: NotifId, payload: Vec<u8>) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.lock() {
            s.items.insert(seq, (id, payload));
            s.seq_of.insert(id, seq);
        }
        self.notify.notify_one();
    }

    /// Items not yet settled.
    pub fn pending(&self) -> usize {
        self.lock()
            .map(|s| s.items.len() + s.deferred.len())
            .unwrap_or(0)
    }

    /// How an item was settled, if it was.
    pub fn outcome(&self, id: &NotifId) -> Option<Settled> {
        self.lock().ok().and_then(|s| s.settled.get(id).cloned())
    }

    /// All settled items.
    pub fn outcomes(&self) -> HashMap<NotifId, Settled> {
        self.lock().map(|s| s.settled.clone()).unwrap_or_default()
    }

    fn settle(&self, id: NotifId, how: Settled) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        let queued = match s.seq_of.remove(&id) {
            Some(seq) => s.items.remove(&seq).is_some(),
            None => {
                let before = s.deferred.len();
                s.deferred.retain(|(_, i, _)| *i != id);
                s.deferred.len() != before
            }
        };
        if queued {
            s.settled.insert(id, how);
        }
        drop(s);
        self.settled.notify_waiters();
        Ok(())
    }
}

impl Outbox for MemoryOutbox {
    fn ready(&self, after: Option<u64>, max: usize) -> Result<Vec<OutItem>, StoreError> {
        let mut s = self.lock()?;
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = s.deferred.drain(..).partition(|(t, _, _)| *t <= now);
        s.deferred = later;
        for (_, id, p) in due {
            let seq = self.next.fetch_add(1, Ordering::Relaxed);
            s.items.insert(seq, (id, p));
            s.seq_of.insert(id, seq);
        }
        let start = after.map_or(0, |a| a.saturating_add(1));
        Ok(s.items
            .range(start..)
            .take(max)
            .map(|(seq, (id, p))| OutItem {
                seq: *seq,
                id: *id,
                payload: p.clone(),
            })
            .collect())
    }

    fn acked(&self, ids: &[NotifId]) -> Result<(), StoreError> {
        for id in ids {
            self.settle(*id, Settled::Acked)?;
        }
        Ok(())
    }

    fn dead_letter(&self, id: NotifId, reason: &str) -> Result<(), StoreError> {
        self.settle(id, Settled::Dead(reason.to_string()))
    }

    fn retry_later(&self, id: NotifId, after: Duration, _reason: &str) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        let old = s.seq_of.remove(&id);
        if let Some((id, p)) = old.and_then(|k| s.items.remove(&k)) {
            s.deferred.push((Instant::now() + after, id, p));
        }
        Ok(())
    }

    fn notifier(&self) -> Arc<Notify> {
        self.notify.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_respects_cursor_and_deferral() {
        let o = MemoryOutbox::new();
        let (a, b) = (NotifId::random(), NotifId::random());
        o.push(a, vec![1]);
        o.push(b, vec![2]);
        let r = o.ready(None, 10).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(o.ready(Some(r[0].seq), 10).unwrap().len(), 1);
        o.retry_later(a, Duration::from_secs(60), "full").unwrap();
        // Deferred: not offered now, even after the cursor.
        assert_eq!(o.ready(Some(r[1].seq), 10).unwrap().len(), 0);
        assert_eq!(o.pending(), 2);
        // Once due it comes back after any cursor, even one past items sent meanwhile.
        let c = o.next.load(Ordering::Relaxed) + 5;
        o.next.store(c, Ordering::Relaxed);
        o.lock().unwrap().deferred[0].0 = Instant::now();
        let again = o.ready(Some(c - 1), 10).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].id, a);
        o.acked(&[b]).unwrap();
        assert_eq!(o.outcome(&b), Some(Settled::Acked));
        o.dead_letter(a, "invalid").unwrap();
        assert_eq!(o.outcome(&a), Some(Settled::Dead("invalid".into())));
        assert_eq!(o.pending(), 0);
        // Settling an unknown id records nothing.
        o.acked(&[NotifId::random()]).unwrap();
        assert_eq!(o.outcomes().len(), 2);
    }
}
