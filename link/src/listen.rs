//! Accepting connections so that no peer can take a listener down by holding connections.
//!
//! Every listener of both daemons (the milter, the Stalwart endpoints, the admin API, the
//! agent's link and status ports) accepts through an [`Acceptor`]:
//!
//! - **A slot is taken before `accept()`.** The number of connections that have not proved
//!   anything yet (no complete HTTP request, no milter negotiation, no TLS handshake) never
//!   passes `max_pending`, so neither do the descriptors they hold.
//! - **The unproven are evicted, oldest first.** When every pending slot is taken, the oldest
//!   unproven connection is told to close ([`Ticket::evicted`]) and its slot goes to the new
//!   one. A real peer proves itself within milliseconds of connecting, so a flood of idle
//!   connections cannot lock it out; it only churns through itself.
//! - **A per-source cap** (optional): a source address that already holds `max_per_source`
//!   unproven connections loses the oldest of them to each new one, so one host cannot take the
//!   pool, and a flood from a real peer's own address (NAT, the same box) cannot lock it out.
//! - **Proof trades the pending slot for a session slot** ([`Ticket::promote`]): sessions are
//!   bounded by the caller's own semaphore, and the pending slot is released for the next peer.
//! - **`accept()` errors never end a listener while it can go on.** Errors that concern one
//!   connection are skipped. Running out of descriptors, memory or buffers (EMFILE, ENFILE,
//!   ENOMEM, ENOBUFS) is logged once per episode and retried after a growing pause
//!   (10 ms … 1 s) for as long as the process lives. Any other error means the socket itself is
//!   unusable: [`Acceptor::accept`] returns it, and the daemon exits non-zero so that its
//!   supervisor restarts it.
//!
//! Each acceptor keeps [`ListenerStats`], exposed on the daemons' `/metrics` by a
//! [`ListenerCollector`].
//!
//! An acceptor takes connections from any [`Listen`]er: a TCP listener, or a Unix-domain
//! socket (`UnixListener`, for a peer on the same host such as Postfix's milter client). Every
//! peer of a Unix-domain socket counts as one source, the local host.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::{debug, error, info, warn};

/// First pause after a resource error; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(10);
/// Longest pause between two `accept()` attempts while resources are exhausted.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Per-connection `accept()` errors in a row retried at once; after them, pauses.
const MAX_QUICK_RETRIES: u32 = 8;
/// How long an eviction may take before the next oldest unproven connection goes too.
const EVICT_WAIT: Duration = Duration::from_millis(50);
/// While resources stay exhausted, a reminder is logged this often.
const REMIND_EVERY: Duration = Duration::from_secs(30);

/// A listening socket an [`Acceptor`] takes connections from.
pub trait Listen: Send + 'static {
    /// An accepted connection.
    type Stream: Send + 'static;
    /// Who is at the other end, for logs.
    type Peer: Copy + fmt::Display + fmt::Debug + Send + 'static;

    /// Polls for the next connection.
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Self::Stream, Self::Peer)>>;

    /// The source address a per-source cap counts `peer` against.
    fn source(peer: &Self::Peer) -> IpAddr;

    /// Where it listens, for logs and errors.
    fn describe(&self) -> String;
}

impl Listen for TcpListener {
    type Stream = TcpStream;
    type Peer = SocketAddr;

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        TcpListener::poll_accept(self, cx)
    }

    fn source(peer: &SocketAddr) -> IpAddr {
        peer.ip()
    }

    fn describe(&self) -> String {
        self.local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into())
    }
}

/// The process at the other end of a Unix-domain socket connection, as the kernel reports it
/// when the connection is accepted (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalPeer {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
}

impl fmt::Display for LocalPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("local")?;
        if let Some(uid) = self.uid {
            write!(f, " uid {uid}")?;
        }
        if let Some(pid) = self.pid {
            write!(f, " pid {pid}")?;
        }
        Ok(())
    }
}

impl Listen for UnixListener {
    type Stream = UnixStream;
    type Peer = LocalPeer;

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(UnixStream, LocalPeer)>> {
        UnixListener::poll_accept(self, cx).map_ok(|(stream, _)| {
            let peer = stream
                .peer_cred()
                .map(|c| LocalPeer {
                    uid: Some(c.uid()),
                    pid: c.pid(),
                })
                .unwrap_or_default();
            (stream, peer)
        })
    }

    /// Every local peer is one source.
    fn source(_: &LocalPeer) -> IpAddr {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    }

    fn describe(&self) -> String {
        match self.local_addr() {
            Ok(a) => match a.as_pathname() {
                Some(p) => format!("unix:{}", p.display()),
                None => "unix:(unnamed)".into(),
            },
            Err(_) => "unix:?".into(),
        }
    }
}

/// Limits of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most connections that have not proved themselves yet (slots taken before `accept()`).
    pub max_pending: usize,
    /// Most unproven connections from one source address (`None`: no per-source cap).
    pub max_per_source: Option<usize>,
}

/// Counters of one listener (monotonic unless noted), for `/metrics`.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections open now, proven or not (gauge).
    pub open: AtomicU64,
    /// Connections open now that have not proved themselves (gauge).
    pub pending: AtomicU64,
    /// Times a new connection found every pending slot taken.
    pub at_capacity: AtomicU64,
    /// Unproven connections closed to make room for a newer one.
    pub evicted: AtomicU64,
    /// Unproven connections closed because their source held `max_per_source` already (the
    /// source's oldest goes; a new one is refused only while all of them are already closing).
    pub refused_per_source: AtomicU64,
    /// Connections closed because they did not prove themselves in time (counted by the
    /// protocol that runs the timer).
    pub timed_out: AtomicU64,
    /// `accept()` errors of any kind.
    pub accept_errors: AtomicU64,
    /// Pauses taken because descriptors, memory or buffers ran out.
    pub accept_backoffs: AtomicU64,
}

/// Which counter of a [`ListenerStats`] a family shows.
type StatsField = fn(&ListenerStats) -> &AtomicU64;

/// The `mailbell_listener_*` families of every listener of a daemon, read at scrape time:
/// `(name, help, is_gauge, field)` in exposition order.
const LISTENER_FAMILIES: [(&str, &str, bool, StatsField); 9] = [
    (
        "mailbell_listener_connections_accepted_total",
        "Connections accepted.",
        false,
        |s| &s.accepted,
    ),
    (
        "mailbell_listener_connections_open",
        "Connections open now.",
        true,
        |s| &s.open,
    ),
    (
        "mailbell_listener_connections_pending",
        "Connections open now that have not proved themselves yet.",
        true,
        |s| &s.pending,
    ),
    (
        "mailbell_listener_at_capacity_total",
        "Times a new connection found every pending slot taken.",
        false,
        |s| &s.at_capacity,
    ),
    (
        "mailbell_listener_evicted_total",
        "Unproven connections closed to make room for a newer one.",
        false,
        |s| &s.evicted,
    ),
    (
        "mailbell_listener_refused_per_source_total",
        "Unproven connections closed because their source held too many.",
        false,
        |s| &s.refused_per_source,
    ),
    (
        "mailbell_listener_timed_out_total",
        "Connections closed for not proving themselves in time.",
        false,
        |s| &s.timed_out,
    ),
    (
        "mailbell_listener_accept_errors_total",
        "accept() errors.",
        false,
        |s| &s.accept_errors,
    ),
    (
        "mailbell_listener_accept_backoffs_total",
        "Pauses taken because descriptors, memory or buffers ran out.",
        false,
        |s| &s.accept_backoffs,
    ),
];

/// Exposes the [`ListenerStats`] of a daemon's listeners, each family once with a sample per
/// listener (`listener="milter"`, ...). Nothing is written for no listener.
#[derive(Debug, Clone, Default)]
pub struct ListenerCollector {
    pub listeners: Vec<(&'static str, Arc<ListenerStats>)>,
}

impl crate::metrics::Collector for ListenerCollector {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        if self.listeners.is_empty() {
            return Ok(());
        }
        for (name, help, is_gauge, field) in LISTENER_FAMILIES {
            let samples = self
                .listeners
                .iter()
                .map(|(l, s)| ([("listener", *l)], field(s).load(Ordering::Relaxed)));
            if is_gauge {
                crate::metrics::gauge_family(&mut enc, name, help, samples)?;
            } else {
                crate::metrics::counter_family(&mut enc, name, help, samples)?;
            }
        }
        Ok(())
    }
}

/// What an `accept()` error means for the listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptFailure {
    /// It concerned the one connection being accepted: try again at once.
    Connection,
    /// Descriptors, memory or buffers ran out: pause, then try again.
    Resources,
    /// The listening socket is unusable.
    Fatal,
}

/// Classifies an `accept()` error (accept(2): the network errors listed there are to be
/// treated like EAGAIN).
pub fn classify(e: &io::Error) -> AcceptFailure {
    match e.raw_os_error() {
        Some(
            libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOMEM | libc_errno::ENOBUFS,
        ) => return AcceptFailure::Resources,
        Some(
            libc_errno::EBADF | libc_errno::EINVAL | libc_errno::ENOTSOCK | libc_errno::EFAULT,
        ) => return AcceptFailure::Fatal,
        _ => {}
    }
    match e.kind() {
        io::ErrorKind::OutOfMemory => AcceptFailure::Resources,
        io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported => AcceptFailure::Fatal,
        _ => AcceptFailure::Connection,
    }
}

/// Linux errno values used by [`classify`] (kept here so the link crate needs no libc).
mod libc_errno {
    pub const EBADF: i32 = 9;
    pub const ENOMEM: i32 = 12;
    pub const EFAULT: i32 = 14;
    pub const EINVAL: i32 = 22;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    pub const ENOTSOCK: i32 = 88;
    pub const ENOBUFS: i32 = 105;
}

/// The listening socket cannot go on.
#[derive(Debug, thiserror::Error)]
#[error("{what} listener on {addr} cannot accept connections")]
pub struct ListenError {
    pub what: &'static str,
    pub addr: String,
    #[source]
    pub source: io::Error,
}

/// The unproven connections of one acceptor, oldest first.
#[derive(Default)]
struct PendingSet {
    next_id: u64,
    /// Evictable connections by acceptance order, with their source.
    order: BTreeMap<u64, (IpAddr, CancellationToken)>,
    /// Unproven connections per source address.
    per_source: HashMap<IpAddr, usize>,
}

struct Shared {
    pending: Mutex<PendingSet>,
    stats: Arc<ListenerStats>,
}

impl Shared {
    fn set(&self) -> std::sync::MutexGuard<'_, PendingSet> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Accepts connections under [`Limits`]; see the module docs.
pub struct Acceptor<L: Listen = TcpListener> {
    listener: L,
    slots: Arc<Semaphore>,
    limits: Limits,
    shared: Arc<Shared>,
    what: &'static str,
    /// Resource-error episode: when it started, pauses so far, last reminder.
    exhausted: Option<(Instant, u32, Instant)>,
    /// Per-connection `accept()` errors in a row.
    failures: u32,
}

/// One accepted connection.
pub struct Accepted<L: Listen = TcpListener> {
    pub stream: L::Stream,
    pub peer: L::Peer,
    /// Its place in the pending pool; drop it (with the stream) to close.
    pub ticket: Ticket,
}

impl Acceptor<TcpListener> {
    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

impl<L: Listen> Acceptor<L> {
    /// `what` names the listener in logs and errors.
    pub fn new(listener: L, limits: Limits, what: &'static str, stats: Arc<ListenerStats>) -> Self {
        let max = limits.max_pending.max(1);
        Self {
            listener,
            slots: Arc::new(Semaphore::new(max)),
            limits: Limits {
                max_pending: max,
                max_per_source: limits.max_per_source.map(|n| n.max(1)),
            },
            shared: Arc::new(Shared {
                pending: Mutex::new(PendingSet::default()),
                stats,
            }),
            what,
            exhausted: None,
            failures: 0,
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<ListenerStats> {
        &self.shared.stats
    }

    /// Waits for a pending slot (evicting the oldest unproven connection when all are taken),
    /// then for a connection. `Ok(None)` once `stop` is cancelled; `Err` only when the listening
    /// socket cannot go on.
    pub async fn accept(
        &mut self,
        stop: &CancellationToken,
    ) -> Result<Option<Accepted<L>>, ListenError> {
        loop {
            let permit = match self.slot(stop).await {
                Some(p) => p,
                None => return Ok(None),
            };
            let accepted = tokio::select! {
                biased;
                () = stop.cancelled() => return Ok(None),
                r = poll_fn(|cx| self.listener.poll_accept(cx)) => r,
            };
            let stats = self.shared.stats.clone();
            match accepted {
                Ok((stream, peer)) => {
                    self.failures = 0;
                    if let Some((since, pauses, _)) = self.exhausted.take() {
                        info!(
                            listener = self.what,
                            pauses,
                            after = ?since.elapsed(),
                            "accepting connections again"
                        );
                    }
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    match self.register(L::source(&peer), permit) {
                        Some(ticket) => {
                            return Ok(Some(Accepted {
                                stream,
                                peer,
                                ticket,
                            }))
                        }
                        None => {
                            stats.refused_per_source.fetch_add(1, Ordering::Relaxed);
                            debug!(listener = self.what, %peer, "too many unproven connections from this source, closed");
                            drop(stream);
                        }
                    }
                }
                Err(e) => {
                    drop(permit);
                    stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    match classify(&e) {
                        AcceptFailure::Connection => {
                            debug!(listener = self.what, error = %e, "accept failed for one connection");
                            // A per-connection error that repeats without end would spin: after
                            // a few in a row, pause as for exhausted resources.
                            self.failures += 1;
                            if self.failures > MAX_QUICK_RETRIES {
                                let pause = self.note_exhausted(&e);
                                stats.accept_backoffs.fetch_add(1, Ordering::Relaxed);
                                tokio::select! {
                                    () = stop.cancelled() => return Ok(None),
                                    () = tokio::time::sleep(pause) => {}
                                }
                            }
                        }
                        AcceptFailure::Resources => {
                            let pause = self.note_exhausted(&e);
                            stats.accept_backoffs.fetch_add(1, Ordering::Relaxed);
                            tokio::select! {
                                () = stop.cancelled() => return Ok(None),
                                () = tokio::time::sleep(pause) => {}
                            }
                        }
                        AcceptFailure::Fatal => {
                            let addr = self.listener.describe();
                            error!(listener = self.what, %addr, error = %e, "listener cannot go on");
                            return Err(ListenError {
                                what: self.what,
                                addr,
                                source: e,
                            });
                        }
                    }
                }
            }
        }
    }

    /// A pending slot: a free one, or the oldest unproven connection's once it has closed.
    async fn slot(&self, stop: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Some(p);
        }
        self.shared
            .stats
            .at_capacity
            .fetch_add(1, Ordering::Relaxed);
        loop {
            let oldest = {
                let mut set = self.shared.set();
                let first = set.order.keys().next().copied();
                first.and_then(|id| set.order.remove(&id)).map(|(_, t)| t)
            };
            let evicting = oldest.is_some();
            if let Some(token) = oldest {
                self.shared.stats.evicted.fetch_add(1, Ordering::Relaxed);
                token.cancel();
            }
            // An evicted connection closes as soon as its task runs; if it proved itself in
            // the meantime (and so keeps its slot), the next oldest goes.
            let wait = if evicting { EVICT_WAIT } else { Duration::MAX };
            tokio::select! {
                biased;
                () = stop.cancelled() => return None,
                p = self.slots.clone().acquire_owned() => return p.ok(),
                () = sleep_or_forever(wait) => {}
            }
        }
    }

    fn register(&self, ip: IpAddr, permit: OwnedSemaphorePermit) -> Option<Ticket> {
        let evict = CancellationToken::new();
        let id = {
            let mut set = self.shared.set();
            let count = set.per_source.get(&ip).copied().unwrap_or(0);
            if self.limits.max_per_source.is_some_and(|max| count >= max) {
                // The source's oldest unproven connection goes: a flood from the same address
                // as a real peer churns through itself instead of locking the peer out.
                let oldest = set
                    .order
                    .iter()
                    .find(|(_, (src, _))| *src == ip)
                    .map(|(id, _)| *id);
                let token = oldest.and_then(|id| set.order.remove(&id));
                match token {
                    Some((_, token)) => {
                        token.cancel();
                        self.shared
                            .stats
                            .refused_per_source
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    // Every one of them is already on its way out.
                    None => return None,
                }
            }
            *set.per_source.entry(ip).or_insert(0) += 1;
            let id = set.next_id;
            set.next_id += 1;
            set.order.insert(id, (ip, evict.clone()));
            id
        };
        let stats = &self.shared.stats;
        stats.open.fetch_add(1, Ordering::Relaxed);
        stats.pending.fetch_add(1, Ordering::Relaxed);
        Some(Ticket {
            id,
            ip,
            pending: true,
            permit: Some(permit),
            session: None,
            evict,
            shared: self.shared.clone(),
        })
    }

    /// Starts or continues a resource-error episode; returns the pause before the next try.
    fn note_exhausted(&mut self, e: &io::Error) -> Duration {
        let now = Instant::now();
        let (since, pauses, reminded) = self.exhausted.get_or_insert((now, 0, now));
        *pauses += 1;
        if *pauses == 1 {
            warn!(listener = self.what, error = %e, "out of resources, pausing accept() and retrying");
        } else if now.duration_since(*reminded) >= REMIND_EVERY {
            *reminded = now;
            warn!(
                listener = self.what,
                error = %e,
                pauses = *pauses,
                since = ?now.duration_since(*since),
                "still out of resources, still retrying"
            );
        }
        let shift = (*pauses - 1).min(7);
        (MIN_BACKOFF * (1u32 << shift)).min(MAX_BACKOFF)
    }
}

async fn sleep_or_forever(d: Duration) {
    if d == Duration::MAX {
        std::future::pending::<()>().await
    } else {
        tokio::time::sleep(d).await
    }
}

/// A connection's place in its acceptor: a pending slot until it proves itself, then
/// (optionally) a session slot. Dropping it frees whatever it holds.
pub struct Ticket {
    id: u64,
    ip: IpAddr,
    /// Still unproven: listed for eviction and counted against its source.
    pending: bool,
    permit: Option<OwnedSemaphorePermit>,
    session: Option<OwnedSemaphorePermit>,
    evict: CancellationToken,
    shared: Arc<Shared>,
}

impl Ticket {
    /// Resolves when the acceptor wants this unproven connection's slot for a newer one: close
    /// the connection then. Never resolves once the connection has proved itself.
    pub fn evicted(&self) -> WaitForCancellationFuture<'_> {
        self.evict.cancelled()
    }

    /// Whether the acceptor has asked this connection to close.
    pub fn is_evicted(&self) -> bool {
        self.evict.is_cancelled()
    }

    /// The peer proved itself: it can no longer be evicted, and no longer counts against the
    /// per-source cap. It keeps its pending slot (use [`promote`](Self::promote) to trade it
    /// for a session slot instead).
    pub fn proven(&mut self) {
        self.leave_pending();
    }

    /// The peer proved itself: waits for a slot of `sessions`, then releases the pending slot.
    /// While it waits it can no longer be evicted.
    pub async fn promote(&mut self, sessions: Arc<Semaphore>) -> Result<(), AcquireError> {
        self.leave_pending();
        let session = sessions.acquire_owned().await?;
        self.session = Some(session);
        self.permit = None;
        Ok(())
    }

    /// Counts one timeout of an unproven connection.
    pub fn timed_out(&self) {
        self.shared.stats.timed_out.fetch_add(1, Ordering::Relaxed);
    }

    fn leave_pending(&mut self) {
        if !std::mem::take(&mut self.pending) {
            return;
        }
        {
            let mut set = self.shared.set();
            set.order.remove(&self.id);
            if let Some(n) = set.per_source.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    set.per_source.remove(&self.ip);
                }
            }
        }
        self.shared.stats.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.leave_pending();
        self.shared.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use tokio::net::TcpSocket;

    async fn acceptor(limits: Limits) -> Acceptor {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Acceptor::new(l, limits, "test", Arc::new(ListenerStats::default()))
    }

    async fn connect_from(src: &str, to: SocketAddr) -> TcpStream {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(format!("{src}:0").parse().unwrap()).unwrap();
        s.connect(to).await.unwrap()
    }

    fn load(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn the_oldest_unproven_connection_makes_room() {
        let mut a = acceptor(Limits {
            max_pending: 2,
            max_per_source: None,
        })
        .await;
        let addr = a.local_addr().unwrap();
        let stop = CancellationToken::new();
        let _c1 = connect_from("127.0.0.1", addr).await;
        let first = a.accept(&stop).await.unwrap().unwrap();
        let _c2 = connect_from("127.0.0.1", addr).await;
        let mut second = a.accept(&stop).await.unwrap().unwrap();
        assert!(!first.ticket.is_evicted());
        // The third connection finds both slots taken: the first (oldest) is asked to go.
        let _c3 = connect_from("127.0.0.1", addr).await;
        let third = tokio::spawn(async move {
            let got = a.accept(&stop).await.unwrap().unwrap();
            (a, got)
        });
        tokio::time::timeout(Duration::from_secs(5), first.ticket.evicted())
            .await
            .expect("oldest evicted");
        assert!(!second.ticket.is_evicted());
        second.ticket.proven();
        drop(first);
        let (a, third) = third.await.unwrap();
        assert_eq!(load(&a.stats().evicted), 1);
        assert_eq!(load(&a.stats().at_capacity), 1);
        assert_eq!(load(&a.stats().accepted), 3);
        assert_eq!(load(&a.stats().open), 2);
        assert_eq!(
            load(&a.stats().pending),
            1,
            "second is proven, third pending"
        );
        drop(third);
        drop(second);
        assert_eq!(load(&a.stats().open), 0);
        assert_eq!(load(&a.stats().pending), 0);
    }

    #[tokio::test]
    async fn proven_connections_are_never_evicted() {
        let mut a = acceptor(Limits {
            max_pending: 1,
            max_per_source: None,
        })
        .await;
        let addr = a.local_addr().unwrap();
        let stop = CancellationToken::new();
        let _c1 = connect_from("127.0.0.1", addr).await;
        let mut first = a.accept(&stop).await.unwrap().unwrap();
        first.ticket.proven();
        let _c2 = connect_from("127.0.0.1", addr).await;
        let stop2 = stop.clone();
        let waiting = tokio::spawn(async move { a.accept(&stop2).await.map(|r| r.is_some()) });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!first.ticket.is_evicted());
        assert!(
            !waiting.is_finished(),
            "no slot while the proven one holds it"
        );
        drop(first);
        assert!(tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap());
    }

    #[tokio::test]
    async fn promotion_frees_the_pending_slot() {
        let mut a = acceptor(Limits {
            max_pending: 1,
            max_per_source: None,
        })
        .await;
        let addr = a.local_addr().unwrap();
        let stop = CancellationToken::new();
        let sessions = Arc::new(Semaphore::new(1));
        let _c1 = connect_from("127.0.0.1", addr).await;
        let mut first = a.accept(&stop).await.unwrap().unwrap();
        first.ticket.promote(sessions.clone()).await.unwrap();
        assert_eq!(sessions.available_permits(), 0);
        // The pending slot is free again: the next accept needs no eviction.
        let _c2 = connect_from("127.0.0.1", addr).await;
        let second = a.accept(&stop).await.unwrap().unwrap();
        assert_eq!(load(&a.stats().at_capacity), 0);
        assert_eq!(load(&a.stats().open), 2);
        assert_eq!(load(&a.stats().pending), 1);
        drop(first);
        assert_eq!(sessions.available_permits(), 1);
        drop(second);
    }

    #[tokio::test]
    async fn one_source_cannot_take_the_pool() {
        let mut a = acceptor(Limits {
            max_pending: 8,
            max_per_source: Some(2),
        })
        .await;
        let addr = a.local_addr().unwrap();
        let stop = CancellationToken::new();
        let _c1 = connect_from("127.0.0.2", addr).await;
        let first = a.accept(&stop).await.unwrap().unwrap();
        let _c2 = connect_from("127.0.0.2", addr).await;
        let mut second = a.accept(&stop).await.unwrap().unwrap();
        // The third from 127.0.0.2 takes the place of the oldest from there; one from
        // 127.0.0.3 is not affected.
        let _c3 = connect_from("127.0.0.2", addr).await;
        let third = a.accept(&stop).await.unwrap().unwrap();
        assert_eq!(third.peer.ip().to_string(), "127.0.0.2");
        tokio::time::timeout(Duration::from_secs(5), first.ticket.evicted())
            .await
            .expect("the source's oldest is evicted");
        assert!(!second.ticket.is_evicted());
        let _c4 = connect_from("127.0.0.3", addr).await;
        let other = a.accept(&stop).await.unwrap().unwrap();
        assert_eq!(other.peer.ip().to_string(), "127.0.0.3");
        assert_eq!(load(&a.stats().refused_per_source), 1);
        assert_eq!(
            load(&a.stats().evicted),
            0,
            "no global eviction: the pool has room"
        );
        drop(first);
        // A proven connection no longer counts against its source.
        second.ticket.proven();
        let _c5 = connect_from("127.0.0.2", addr).await;
        let again = a.accept(&stop).await.unwrap().unwrap();
        assert!(!third.ticket.is_evicted());
        assert_eq!(again.peer.ip().to_string(), "127.0.0.2");
    }

    #[tokio::test]
    async fn stop_ends_a_waiting_accept() {
        let mut a = acceptor(Limits {
            max_pending: 1,
            max_per_source: None,
        })
        .await;
        let stop = CancellationToken::new();
        let s2 = stop.clone();
        let t = tokio::spawn(async move { a.accept(&s2).await.map(|r| r.is_none()) });
        stop.cancel();
        assert!(t.await.unwrap().unwrap());
    }

    #[test]
    fn accept_errors_are_classified() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(classify(&os(24)), AcceptFailure::Resources); // EMFILE
        assert_eq!(classify(&os(23)), AcceptFailure::Resources); // ENFILE
        assert_eq!(classify(&os(12)), AcceptFailure::Resources); // ENOMEM
        assert_eq!(classify(&os(105)), AcceptFailure::Resources); // ENOBUFS
        assert_eq!(classify(&os(103)), AcceptFailure::Connection); // ECONNABORTED
        assert_eq!(classify(&os(71)), AcceptFailure::Connection); // EPROTO
        assert_eq!(classify(&os(1)), AcceptFailure::Connection); // EPERM (firewall)
        assert_eq!(classify(&os(9)), AcceptFailure::Fatal); // EBADF
        assert_eq!(classify(&os(22)), AcceptFailure::Fatal); // EINVAL: not listening
        assert_eq!(classify(&os(88)), AcceptFailure::Fatal); // ENOTSOCK
    }

    #[test]
    fn resource_pauses_grow_to_a_second() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut a = rt.block_on(acceptor(Limits {
            max_pending: 1,
            max_per_source: None,
        }));
        let e = io::Error::from_raw_os_error(24);
        let pauses: Vec<_> = (0..10).map(|_| a.note_exhausted(&e)).collect();
        assert_eq!(pauses[0], Duration::from_millis(10));
        assert_eq!(pauses[1], Duration::from_millis(20));
        assert_eq!(pauses[6], Duration::from_millis(640));
        assert_eq!(pauses[7], Duration::from_secs(1));
        assert_eq!(pauses[9], Duration::from_secs(1));
    }

    #[test]
    fn listener_families_follow_the_stats() {
        let a = Arc::new(ListenerStats::default());
        let b = Arc::new(ListenerStats::default());
        let collector = ListenerCollector {
            listeners: vec![("stalwart", a.clone()), ("admin", b.clone())],
        };
        let before = crate::metrics::encode_one(collector.clone());
        assert!(before.contains("mailbell_listener_evicted_total{listener=\"admin\"} 0\n"));
        b.evicted.store(2, Ordering::Relaxed);
        a.accepted.store(3, Ordering::Relaxed);
        a.open.store(1, Ordering::Relaxed);
        let out = crate::metrics::encode_one(collector);
        let lines: Vec<&str> = out.lines().collect();
        // Each family once, its listeners together (the text format wants one group).
        let i = lines
            .iter()
            .position(|l| *l == "# TYPE mailbell_listener_evicted_total counter")
            .unwrap();
        assert_eq!(
            lines[i + 1],
            "mailbell_listener_evicted_total{listener=\"stalwart\"} 0"
        );
        assert_eq!(
            lines[i + 2],
            "mailbell_listener_evicted_total{listener=\"admin\"} 2"
        );
        assert!(
            out.contains("mailbell_listener_connections_accepted_total{listener=\"stalwart\"} 3\n")
        );
        assert!(out.contains("# TYPE mailbell_listener_connections_open gauge\n"));
        assert!(out.contains("mailbell_listener_connections_open{listener=\"stalwart\"} 1\n"));
        assert_eq!(out.matches("# TYPE ").count(), 9);
        assert_eq!(out.matches("# HELP ").count(), 9);
        assert!(crate::metrics::encode_one(ListenerCollector::default()).is_empty());
    }
}
