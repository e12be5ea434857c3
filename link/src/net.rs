//! The thin tokio shell around the sans-I/O state machines: a client that drains an outbox
//! into one of several agents (failover in configuration order), and a server that feeds an
//! inbox. Every read and write has a timeout; the number of sessions is bounded; every task is
//! tracked and stops on the cancellation token.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::frame::{self, Frame, FrameError, DEFAULT_MAX_FRAME};
use crate::id::NotifId;
use crate::listen::{Accepted, Acceptor, Limits, ListenError, ListenerStats, Ticket};
use crate::receiver::{self, Outcome, Receiver, ReceiverConfig, ReceiverError};
use crate::sender::{self, Sender, SenderConfig, SenderEvent, SessionError};
use crate::tls::{self, TlsError};

/// Items per store request (see `server_session`).
const STORE_CHUNK: usize = 64;

/// A storage error from an outbox or inbox implementation.
pub type StoreError = Box<dyn std::error::Error + Send + Sync>;

/// One item ready to be sent.
#[derive(Clone, Debug)]
pub struct OutItem {
    /// Position in the outbox; the client asks for items after the last one it sent.
    pub seq: u64,
    pub id: NotifId,
    pub payload: Vec<u8>,
}

/// The sender's durable queue, as the link client sees it.
pub trait Outbox: Send + Sync + 'static {
    /// Up to `max` items ready to send with a position after `after` (all items when `None`),
    /// oldest first.
    fn ready(&self, after: Option<u64>, max: usize) -> Result<Vec<OutItem>, StoreError>;
    /// The agent holds these durably: forget them.
    fn acked(&self, ids: &[NotifId]) -> Result<(), StoreError>;
    /// The agent will never take this one.
    fn dead_letter(&self, id: NotifId, reason: &str) -> Result<(), StoreError>;
    /// The agent could not take this one now: offer it again after `after`.
    fn retry_later(&self, id: NotifId, after: Duration, reason: &str) -> Result<(), StoreError>;
    /// Signalled (with `notify_one`) whenever new items may be ready.
    fn notifier(&self) -> Arc<Notify>;
    /// Told about every link session (for an audit log); the default ignores it. Called on
    /// the client task: must not block.
    fn session_event(&self, _event: SessionEvent<'_>) {}
}

/// What happened to a link session, for [`Outbox::session_event`].
#[derive(Clone, Copy)]
pub enum SessionEvent<'a> {
    /// Connected, TLS and HELLO done.
    Up { agent: &'a str, window: u16 },
    /// An established session ended.
    Down {
        agent: &'a str,
        reason: &'a dyn std::fmt::Display,
        sent: u64,
        acked: u64,
    },
    /// The agent could not be reached or refused the session.
    Failed {
        agent: &'a str,
        reason: &'a dyn std::fmt::Display,
    },
}

/// The receiver's durable store, as the link server sees it.
pub trait Inbox: Clone + Send + Sync + 'static {
    /// Makes a batch durable (one group commit) and returns one outcome per item, in order.
    /// Must answer `Duplicate` for an id it already holds or has delivered, and a
    /// `RetryLater` rejection when it cannot store (the sender then backs off and resends).
    fn store(
        &self,
        peer: Arc<str>,
        batch: Vec<(NotifId, Vec<u8>)>,
    ) -> impl Future<Output = Vec<Outcome>> + Send;
}

/// Where to find an agent.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `host:port`.
    pub addr: String,
    /// The name the agent's certificate must carry.
    pub server_name: String,
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Tried in order; the first that answers is used.
    pub agents: Vec<Endpoint>,
    pub tls: Arc<rustls::ClientConfig>,
    pub sender: SenderConfig,
    pub connect_timeout: Duration,
    /// Limit for the TLS handshake, the HELLO exchange and every write.
    pub io_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

/// Counters a client keeps (for metrics).
#[derive(Debug, Default)]
pub struct ClientStats {
    pub sessions: AtomicU64,
    pub connected: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub retry_later: AtomicU64,
    pub session_errors: AtomicU64,
    /// TCP connect probes made while waiting out a backoff (see [`RECONNECT_SPACING`]).
    pub probes: AtomicU64,
    /// The agent the session is up with: its index in [`ClientSettings::agents`] plus one,
    /// 0 while no session is up. Read it with [`ClientStats::up_agent`].
    pub up: AtomicU64,
}

impl ClientStats {
    /// The index (in [`ClientSettings::agents`]) of the agent a session is up with, if any.
    pub fn up_agent(&self) -> Option<usize> {
        match self.up.load(Ordering::Relaxed) {
            0 => None,
            n => usize::try_from(n - 1).ok(),
        }
    }
}

/// Why a client session ended. Logged with `%e`, so each cause is in `Display` and none is
/// also a `source()` (printed once either way).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    #[error("connect to {addr}: {cause}")]
    Connect { addr: String, cause: io::Error },
    #[error("connect to {addr} timed out")]
    ConnectTimeout { addr: String },
    #[error("tls: {}", with_causes(.0))]
    Tls(TlsError),
    #[error("tls handshake: {0}")]
    Handshake(io::Error),
    #[error("i/o: {0}")]
    Io(io::Error),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("peer closed the connection")]
    Closed,
    #[error("invalid frame: {0}")]
    Frame(FrameError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Receiver(#[from] ReceiverError),
    #[error("store: {0}")]
    Store(StoreError),
}

/// An error and its `source()` chain on one line: [`TlsError`] keeps its cause in `source()`,
/// which a log line of [`LinkError`] would otherwise lose.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

impl From<TlsError> for LinkError {
    fn from(e: TlsError) -> Self {
        Self::Tls(e)
    }
}

impl From<io::Error> for LinkError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<FrameError> for LinkError {
    fn from(e: FrameError) -> Self {
        Self::Frame(e)
    }
}

/// After an established session ends, the next session starts no sooner than this after the
/// previous one started: a peer that completes the handshake and drops at once gets at most
/// one handshake per interval (the backoff itself starts again from `backoff_min`). Also the
/// period of the TCP connect probe while the client waits out a long backoff after every
/// agent was unreachable. Capped by `backoff_max`.
pub const RECONNECT_SPACING: Duration = Duration::from_secs(2);

/// How one round over the agents ended.
#[derive(Debug, PartialEq, Eq)]
enum RoundEnd {
    /// A session was established and then ended (it started at this instant).
    SessionEnded(Instant),
    /// Every agent failed at the TCP connect: refused, unreachable or timed out.
    Unreachable,
    /// At least one agent took the TCP connection but the session did not come up (TLS,
    /// HELLO/WELCOME, REFUSE): a TCP probe would tell nothing new.
    Failed,
}

/// The wait before the next round and whether to probe during it: the sans-I/O part of the
/// reconnect policy (see docs/protocol.md §8).
#[derive(Debug)]
struct Reconnect {
    backoff: Duration,
    min: Duration,
    max: Duration,
    spacing: Duration,
}

impl Reconnect {
    fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Self {
            backoff: min,
            min,
            max,
            spacing: RECONNECT_SPACING.min(max),
        }
    }

    /// The wait after a round (before jitter is applied to the backoff part, `jitter` in
    /// 0.75..=1.25) and whether TCP probes may end it early. Doubles the backoff for the next.
    fn after(&mut self, end: &RoundEnd, jitter: f64, now: Instant) -> (Duration, bool) {
        if let RoundEnd::SessionEnded(_) = end {
            // A handshake completed: the path works, so start again from the minimum.
            self.backoff = self.min;
        }
        let mut wait = self.backoff.mul_f64(jitter);
        if let RoundEnd::SessionEnded(started) = end {
            // ...but never more than one session start per `spacing` against a flapping peer.
            let next = *started + self.spacing;
            wait = wait.max(next.saturating_duration_since(now));
        }
        self.backoff = (self.backoff * 2).min(self.max);
        let probe = *end == RoundEnd::Unreachable && wait > self.spacing;
        (wait, probe)
    }
}

/// Waits `wait`, probing every agent with a plain TCP connect every [`Reconnect::spacing`];
/// returns early when one accepts. Returns false on shutdown.
async fn wait_probing(
    settings: &ClientSettings,
    wait: Duration,
    every: Duration,
    shutdown: &CancellationToken,
    stats: &ClientStats,
) -> bool {
    let end = Instant::now() + wait;
    loop {
        let next = (Instant::now() + every).min(end);
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep_until(next.into()) => {}
        }
        if Instant::now() >= end {
            return true;
        }
        for ep in &settings.agents {
            stats.probes.fetch_add(1, Ordering::Relaxed);
            let limit = settings.connect_timeout.min(every);
            if let Ok(Ok(_)) = tokio::time::timeout(limit, TcpStream::connect(&ep.addr)).await {
                debug!(agent = %ep.addr, "agent accepts connections again; reconnecting now");
                return true;
            }
        }
    }
}

/// Runs the client until `shutdown`: connects to the first reachable agent, sends everything
/// the outbox holds, reconnects with exponential backoff and jitter. A session that came up
/// resets the backoff (with at most one session start per [`RECONNECT_SPACING`]); a long wait
/// after every agent was unreachable is cut short by a TCP connect probe that succeeds.
pub async fn run_client<O: Outbox + ?Sized>(
    settings: ClientSettings,
    outbox: Arc<O>,
    shutdown: CancellationToken,
    stats: Arc<ClientStats>,
) {
    let connector = TlsConnector::from(settings.tls.clone());
    let mut policy = Reconnect::new(settings.backoff_min, settings.backoff_max);
    while !shutdown.is_cancelled() {
        let mut end = RoundEnd::Unreachable;
        for (index, ep) in settings.agents.iter().enumerate() {
            if shutdown.is_cancelled() {
                return;
            }
            let span = info_span!("link", agent = %ep.addr);
            let started = Instant::now();
            stats.sessions.fetch_add(1, Ordering::Relaxed);
            let (sent0, acked0) = (
                stats.sent.load(Ordering::Relaxed),
                stats.acked.load(Ordering::Relaxed),
            );
            let r = client_session(&settings, index, &connector, &outbox, &shutdown, &stats)
                .instrument(span.clone())
                .await;
            stats.up.store(0, Ordering::Relaxed);
            let _g = span.enter();
            let counts = || {
                (
                    stats.sent.load(Ordering::Relaxed).saturating_sub(sent0),
                    stats.acked.load(Ordering::Relaxed).saturating_sub(acked0),
                )
            };
            match r {
                Ok(()) => {
                    let (sent, acked) = counts();
                    outbox.session_event(SessionEvent::Down {
                        agent: &ep.addr,
                        reason: &"shutting down",
                        sent,
                        acked,
                    });
                    return;
                }
                Err((e, connected)) => {
                    stats.session_errors.fetch_add(1, Ordering::Relaxed);
                    if connected {
                        let (sent, acked) = counts();
                        outbox.session_event(SessionEvent::Down {
                            agent: &ep.addr,
                            reason: &e,
                            sent,
                            acked,
                        });
                    } else {
                        outbox.session_event(SessionEvent::Failed {
                            agent: &ep.addr,
                            reason: &e,
                        });
                    }
                    if connected {
                        warn!(error = %e, "link session ended; reconnecting");
                        end = RoundEnd::SessionEnded(started);
                        // A session that was up goes back to the first agent after backoff.
                        break;
                    }
                    if !matches!(
                        e,
                        LinkError::Connect { .. } | LinkError::ConnectTimeout { .. }
                    ) {
                        end = RoundEnd::Failed;
                    }
                    warn!(error = %e, "agent unreachable; trying the next one");
                }
            }
        }
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        let (wait, probe) = policy.after(&end, jitter, Instant::now());
        debug!(?wait, probe, "backing off before reconnecting");
        if probe {
            if !wait_probing(&settings, wait, policy.spacing, &shutdown, &stats).await {
                return;
            }
        } else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

async fn with_timeout<T>(
    d: Duration,
    what: &'static str,
    f: impl Future<Output = Result<T, LinkError>>,
) -> Result<T, LinkError> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| LinkError::Timeout(what))?
}

/// Reads until one whole frame is buffered.
async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    max: u32,
) -> Result<Frame, LinkError> {
    loop {
        if let Some((f, n)) = frame::decode(buf, max)? {
            buf.drain(..n);
            return Ok(f);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(LinkError::Closed);
        }
    }
}

async fn write_all<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut Vec<u8>,
    d: Duration,
) -> Result<(), LinkError> {
    if out.is_empty() {
        return Ok(());
    }
    with_timeout(d, "write", async {
        stream.write_all(out).await?;
        stream.flush().await?;
        Ok(())
    })
    .await?;
    out.clear();
    Ok(())
}

/// One session. `Err((e, true))` means the session had been established.
async fn client_session<O: Outbox + ?Sized>(
    s: &ClientSettings,
    index: usize,
    connector: &TlsConnector,
    outbox: &Arc<O>,
    shutdown: &CancellationToken,
    stats: &ClientStats,
) -> Result<(), (LinkError, bool)> {
    let ep = &s.agents[index];
    let pre = |e| (e, false);
    let tcp = tokio::time::timeout(s.connect_timeout, TcpStream::connect(&ep.addr))
        .await
        .map_err(|_| {
            pre(LinkError::ConnectTimeout {
                addr: ep.addr.clone(),
            })
        })?
        .map_err(|cause| {
            pre(LinkError::Connect {
                addr: ep.addr.clone(),
                cause,
            })
        })?;
    tcp.set_nodelay(true).map_err(|e| pre(e.into()))?;
    let name: ServerName<'static> =
        tls::agent_server_name(&ep.server_name).map_err(|e| pre(e.into()))?;
    let mut stream = tokio::time::timeout(s.io_timeout, connector.connect(name, tcp))
        .await
        .map_err(|_| pre(LinkError::Timeout("tls handshake")))?
        .map_err(|e| pre(LinkError::Handshake(e)))?;
    let mut out = Vec::with_capacity(64 * 1024);
    let mut inbuf = Vec::with_capacity(64 * 1024);
    sender::hello(&s.sender).encode(&mut out);
    write_all(&mut stream, &mut out, s.io_timeout)
        .await
        .map_err(pre)?;
    let welcome = with_timeout(
        s.io_timeout,
        "welcome",
        read_frame(&mut stream, &mut inbuf, DEFAULT_MAX_FRAME),
    )
    .await
    .map_err(pre)?;
    let neg = sender::check_welcome(&s.sender, welcome).map_err(|e| pre(e.into()))?;
    info!(window = neg.window, "link session established");
    stats.connected.fetch_add(1, Ordering::Relaxed);
    stats
        .up
        .store(u64::try_from(index).map_or(0, |i| i + 1), Ordering::Relaxed);
    outbox.session_event(SessionEvent::Up {
        agent: &ep.addr,
        window: neg.window,
    });
    let on = |e| (e, true);
    let mut snd = Sender::new(s.sender.clone(), neg, Instant::now());
    let notify = outbox.notifier();
    let mut cursor: Option<u64> = None;
    let mut acked = Vec::with_capacity(usize::from(neg.window));
    let result: Result<(), LinkError> = async {
        loop {
            // Fill the window from the outbox.
            let cap = snd.capacity();
            if cap > 0 {
                // A store read may block (disk, or a commit being applied): off the workers.
                let items = {
                    let o = outbox.clone();
                    tokio::task::spawn_blocking(move || o.ready(cursor, cap))
                        .await
                        .map_err(|e| LinkError::Store(e.into()))?
                        .map_err(LinkError::Store)?
                };
                let now = Instant::now();
                for item in items {
                    cursor = Some(item.seq);
                    if Frame::notify_len(item.payload.len()) > neg.max_frame as usize + 4 {
                        let reason = format!(
                            "notification of {} bytes exceeds the agent's maximum frame size {}",
                            item.payload.len(),
                            neg.max_frame
                        );
                        warn!(notif_id = %item.id, %reason, "dead-lettered before sending");
                        outbox.dead_letter(item.id, &reason).map_err(LinkError::Store)?;
                        stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if !snd.is_in_flight(&item.id) {
                        snd.send(item.id, item.payload, now, &mut out);
                        stats.sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            write_all(&mut stream, &mut out, s.io_timeout).await?;
            let deadline = snd.next_deadline().min(Instant::now() + Duration::from_secs(1));
            tokio::select! {
                _ = shutdown.cancelled() => {
                    Frame::Bye { reason: "sender shutting down".into() }.encode(&mut out);
                    let _ = write_all(&mut stream, &mut out, s.io_timeout).await;
                    return Ok(());
                }
                r = stream.read_buf(&mut inbuf) => {
                    if r? == 0 {
                        return Err(LinkError::Closed);
                    }
                    let now = Instant::now();
                    let mut at = 0;
                    while let Some((f, n)) = frame::decode(&inbuf[at..], neg.max_frame)? {
                        at += n;
                        match snd.on_frame(f, now, &mut out)? {
                            Some(SenderEvent::Acked(id)) => acked.push(id),
                            Some(SenderEvent::DeadLetter { id, reason }) => {
                                warn!(notif_id = %id, %reason, "agent refused notice permanently; dead-lettered");
                                outbox.dead_letter(id, &reason).map_err(LinkError::Store)?;
                                stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(SenderEvent::RetryLater { id, after, reason }) => {
                                debug!(notif_id = %id, ?after, %reason, "agent asked to retry later");
                                outbox.retry_later(id, after, &reason).map_err(LinkError::Store)?;
                                stats.retry_later.fetch_add(1, Ordering::Relaxed);
                            }
                            None => {}
                        }
                    }
                    inbuf.drain(..at);
                    if !acked.is_empty() {
                        outbox.acked(&acked).map_err(LinkError::Store)?;
                        stats.acked.fetch_add(acked.len() as u64, Ordering::Relaxed);
                        acked.clear();
                    }
                }
                _ = notify.notified(), if snd.capacity() > 0 => {}
                _ = tokio::time::sleep_until(deadline.into()) => {
                    snd.poll(Instant::now(), &mut out)?;
                }
            }
        }
    }
    .await;
    if let Err(e) = &result {
        debug!(in_flight = snd.in_flight(), error = %e, "session closing");
    }
    result.map_err(on)
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub tls: Arc<rustls::ServerConfig>,
    /// Client certificate names allowed in (empty: any certificate from the CA).
    pub allowed_client_names: Vec<String>,
    pub receiver: ReceiverConfig,
    /// Limit for the HELLO, counted from the end of the TLS handshake.
    pub handshake_timeout: Duration,
    /// Limit for every write.
    pub io_timeout: Duration,
    /// Sessions served at once. Only connections that finished the TLS handshake and passed
    /// the client-name check take a session slot.
    pub max_sessions: usize,
    /// Connections that have not finished the TLS handshake yet.
    pub unproven: UnprovenLimits,
}

/// Limits for connections that have not proved themselves yet: from `accept()` until the TLS
/// handshake and the client-name check are done (see [`serve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnprovenLimits {
    /// Most connections in the TLS handshake at once (the pending pool). When all are taken,
    /// the oldest is closed to make room for a new one.
    pub max_handshakes: usize,
    /// Most connections in the TLS handshake from one source address (`None`: no cap);
    /// further ones are closed at once.
    pub max_per_source: Option<usize>,
    /// Limit for the TCP-accept-to-authorised part: the TLS handshake and the client check.
    pub tls_timeout: Duration,
    /// How long an authorised connection waits for a session slot before it is refused with
    /// REFUSE `BUSY`.
    pub session_wait: Duration,
}

impl Default for UnprovenLimits {
    fn default() -> Self {
        Self {
            max_handshakes: 128,
            max_per_source: Some(8),
            tls_timeout: Duration::from_secs(10),
            session_wait: Duration::from_secs(5),
        }
    }
}

/// Counters a server keeps (for metrics).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Sessions holding a session slot now (at most `max_sessions`).
    pub sessions_active: AtomicU64,
    /// Connections that got a session slot.
    pub sessions_total: AtomicU64,
    /// TLS handshakes that failed or timed out, and clients whose name is not allowed.
    pub tls_failures: AtomicU64,
    /// REFUSE frames sent (`refused_busy` included).
    pub refused: AtomicU64,
    /// Authorised connections refused with REFUSE `BUSY`: no session slot freed in time.
    pub refused_busy: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub received: AtomicU64,
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub nacked_permanent: AtomicU64,
    pub nacked_retry: AtomicU64,
    /// The listener's accept counters: pending pool, evictions, per-source refusals, TLS
    /// handshake timeouts, accept errors.
    pub listener: Arc<ListenerStats>,
}

/// How often, at most, [`serve`] logs a warning that unproven connections are being closed.
const PRESSURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Accepts sessions until `shutdown`, then waits for them to finish. A failing connection ends
/// that connection alone; only a listening socket that cannot go on ends `serve` early (its
/// sessions are told BYE first), with the error.
///
/// Connections go through [`listen::Acceptor`]: a connection takes a slot of the pending pool
/// (`unproven.max_handshakes`, at most `unproven.max_per_source` per source address) before
/// `accept()`, and keeps it through the TLS handshake and the client-name check, within
/// `unproven.tls_timeout`. Until then it can be closed to make room for a newer connection.
/// Once authorised, it trades that slot for one of `max_sessions` (waiting at most
/// `unproven.session_wait`, else REFUSE `BUSY`), and the HELLO follows within
/// `handshake_timeout`. So a flood of idle TCP connections churns through the pending pool and
/// never holds a session slot.
pub async fn serve<I: Inbox>(
    listener: TcpListener,
    settings: Arc<ServerSettings>,
    inbox: I,
    shutdown: CancellationToken,
    stats: Arc<ServerStats>,
) -> Result<(), ListenError> {
    let tls = TlsAcceptor::from(settings.tls.clone());
    let sessions = Arc::new(Semaphore::new(settings.max_sessions.max(1)));
    let mut acceptor = Acceptor::new(
        listener,
        Limits {
            max_pending: settings.unproven.max_handshakes,
            max_per_source: settings.unproven.max_per_source,
        },
        "link",
        stats.listener.clone(),
    );
    let pressure = Arc::new(PressureLog::new(&stats));
    // Our own token, so that a failed listener can end its sessions before returning.
    let stop = shutdown.child_token();
    let tracker = TaskTracker::new();
    let result = loop {
        let Accepted {
            stream,
            peer,
            ticket,
        } = match acceptor.accept(&stop).await {
            Ok(Some(a)) => a,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        pressure.note(&stats);
        let conn = Conn {
            settings: settings.clone(),
            tls: tls.clone(),
            sessions: sessions.clone(),
            stop: stop.clone(),
            stats: stats.clone(),
            pressure: pressure.clone(),
        };
        let inbox = inbox.clone();
        tracker.spawn(
            conn.run(stream, ticket, inbox)
                .instrument(info_span!("link", peer = %peer, client = tracing::field::Empty)),
        );
    };
    stop.cancel();
    tracker.close();
    tracker.wait().await;
    result
}

/// What one connection task needs from [`serve`].
struct Conn {
    settings: Arc<ServerSettings>,
    tls: TlsAcceptor,
    sessions: Arc<Semaphore>,
    stop: CancellationToken,
    stats: Arc<ServerStats>,
    pressure: Arc<PressureLog>,
}

impl Conn {
    /// One connection: TLS and authorisation as an unproven connection, then a session slot,
    /// then the session.
    async fn run<I: Inbox>(self, tcp: TcpStream, mut ticket: Ticket, inbox: I) {
        let s = &*self.settings;
        let stats = &*self.stats;
        // Unproven: evictable, under the short TLS timeout.
        let proved = tokio::select! {
            biased;
            () = self.stop.cancelled() => return,
            () = ticket.evicted() => {
                debug!("closed before its TLS handshake finished, to make room for a newer connection");
                self.pressure.note(stats);
                return;
            }
            r = tokio::time::timeout(s.unproven.tls_timeout, tls_handshake(tcp, s, &self.tls)) => r,
        };
        let (mut stream, client) = match proved {
            Ok(Ok(Proof::Authorised(stream, client))) => (stream, client),
            Ok(Ok(Proof::NotAuthorised(mut stream, e))) => {
                stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "client certificate not authorised");
                // The TLS session is up, so the client can be told why it is turned away.
                let mut out = Vec::new();
                Frame::Refuse {
                    code: frame::refuse::NOT_AUTHORISED,
                    reason: format!("client certificate not authorised: {e}"),
                }
                .encode(&mut out);
                tokio::select! {
                    () = ticket.evicted() => {}
                    () = close_gracefully(&mut stream, &mut out, s.io_timeout) => {}
                }
                return;
            }
            Ok(Err(e)) => {
                stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, "tls handshake failed");
                self.pressure.note(stats);
                return;
            }
            Err(_) => {
                stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                ticket.timed_out();
                debug!(timeout = ?s.unproven.tls_timeout, "tls handshake timed out");
                self.pressure.note(stats);
                return;
            }
        };
        tracing::Span::current().record("client", &*client);
        // Proven: trade the pending slot for a session slot, or say BUSY.
        let promoted = tokio::select! {
            () = self.stop.cancelled() => return,
            r = tokio::time::timeout(s.unproven.session_wait, ticket.promote(self.sessions.clone())) => r,
        };
        match promoted {
            Ok(Ok(())) => {}
            // The semaphore is never closed.
            Ok(Err(_)) => return,
            Err(_) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                stats.refused_busy.fetch_add(1, Ordering::Relaxed);
                debug!(
                    max_sessions = s.max_sessions,
                    waited = ?s.unproven.session_wait,
                    "every session slot taken; refusing as busy"
                );
                self.pressure.note(stats);
                let mut out = Vec::new();
                Frame::Refuse {
                    code: frame::refuse::BUSY,
                    reason: format!(
                        "agent busy: all {} sessions in use, retry later",
                        s.max_sessions
                    ),
                }
                .encode(&mut out);
                close_gracefully(&mut stream, &mut out, s.io_timeout).await;
                return;
            }
        }
        stats.sessions_total.fetch_add(1, Ordering::Relaxed);
        stats.sessions_active.fetch_add(1, Ordering::Relaxed);
        match server_session(stream, client, s, inbox, &self.stop, stats).await {
            Ok(()) => info!("link session closed"),
            Err(e) => warn!(error = %e, "link session ended"),
        }
        stats.sessions_active.fetch_sub(1, Ordering::Relaxed);
        drop(ticket);
    }
}

/// The result of the unproven phase that needs more than closing the connection.
enum Proof {
    Authorised(TlsStream<TcpStream>, Arc<str>),
    NotAuthorised(TlsStream<TcpStream>, TlsError),
}

/// The TLS handshake and the client-name check.
async fn tls_handshake(
    tcp: TcpStream,
    s: &ServerSettings,
    acceptor: &TlsAcceptor,
) -> Result<Proof, io::Error> {
    tcp.set_nodelay(true)?;
    let stream = acceptor.accept(tcp).await?;
    Ok(
        match tls::authorize_client(stream.get_ref().1, &s.allowed_client_names) {
            Ok(name) => Proof::Authorised(stream, name.into()),
            Err(e) => Proof::NotAuthorised(stream, e),
        },
    )
}

/// Warns, at most once per [`PRESSURE_LOG_EVERY`], that unproven connections were closed
/// (evicted, timed out, refused per source, failed TLS) or authorised ones refused as busy, so
/// that a flood shows in the log as one line a minute; each connection is logged at `debug`.
struct PressureLog {
    state: std::sync::Mutex<PressureState>,
}

struct PressureState {
    /// No warning before this instant.
    quiet_until: Instant,
    /// The counters at the last warning.
    seen: [u64; 5],
}

impl PressureLog {
    fn new(stats: &ServerStats) -> Self {
        Self {
            state: std::sync::Mutex::new(PressureState {
                quiet_until: Instant::now(),
                seen: Self::counters(stats),
            }),
        }
    }

    fn counters(stats: &ServerStats) -> [u64; 5] {
        let l = &stats.listener;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            g(&l.evicted),
            g(&l.timed_out),
            g(&l.refused_per_source),
            g(&stats.tls_failures),
            g(&stats.refused_busy),
        ]
    }

    fn note(&self, stats: &ServerStats) {
        let now = Instant::now();
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now < st.quiet_until {
            return;
        }
        let counters = Self::counters(stats);
        let d: Vec<u64> = counters
            .iter()
            .zip(st.seen)
            .map(|(now, then)| now.saturating_sub(then))
            .collect();
        if d.iter().all(|&n| n == 0) {
            return;
        }
        st.seen = counters;
        st.quiet_until = now + PRESSURE_LOG_EVERY;
        drop(st);
        warn!(
            evicted = d[0],
            tls_timed_out = d[1],
            refused_per_source = d[2],
            tls_failed = d[3],
            refused_busy = d[4],
            pending = stats.listener.pending.load(Ordering::Relaxed),
            sessions = stats.sessions_active.load(Ordering::Relaxed),
            "link connections closed before their session started (counts since the last such warning; at most one a minute, details at debug)"
        );
    }
}

/// Writes the last frames, closes our side and drains what the peer still sends for a moment,
/// so that the kernel does not answer unread data with a reset that destroys our last frame.
async fn close_gracefully<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut Vec<u8>,
    io_timeout: Duration,
) {
    let _ = write_all(stream, out, io_timeout).await;
    let _ = tokio::time::timeout(io_timeout, stream.shutdown()).await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        let mut total = 0usize;
        while total < 1 << 20 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// Writes the ACK or NACK for each item of a stored batch.
fn complete_stored(
    rcv: &mut Receiver,
    stats: &ServerStats,
    ids: Vec<NotifId>,
    outcomes: Vec<Outcome>,
    out: &mut Vec<u8>,
) {
    let now = Instant::now();
    for (i, id) in ids.into_iter().enumerate() {
        let outcome = outcomes.get(i).cloned().unwrap_or(Outcome::Rejected {
            class: frame::NackClass::RetryLater,
            retry_after: Duration::from_secs(1),
            reason: "inbox returned no outcome".into(),
        });
        let counter = match &outcome {
            Outcome::Stored => &stats.stored,
            Outcome::Duplicate => &stats.duplicates,
            Outcome::Rejected {
                class: frame::NackClass::Permanent,
                ..
            } => &stats.nacked_permanent,
            Outcome::Rejected { .. } => &stats.nacked_retry,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        rcv.complete(id, outcome, now, out);
    }
}

async fn server_session<I: Inbox>(
    mut stream: TlsStream<TcpStream>,
    client: Arc<str>,
    s: &ServerSettings,
    inbox: I,
    shutdown: &CancellationToken,
    stats: &ServerStats,
) -> Result<(), LinkError> {
    let mut inbuf = Vec::with_capacity(64 * 1024);
    let mut out = Vec::with_capacity(16 * 1024);
    let hello = with_timeout(
        s.handshake_timeout,
        "hello",
        read_frame(&mut stream, &mut inbuf, s.receiver.max_frame),
    )
    .await;
    let hello = match hello {
        Ok(f) => f,
        Err(e) => {
            stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    let (window, max_frame) = match receiver::accept_hello(&s.receiver, hello) {
        Ok((welcome, window, name)) => {
            let max = match &welcome {
                Frame::Welcome { max_frame, .. } => *max_frame,
                _ => s.receiver.max_frame,
            };
            welcome.encode(&mut out);
            info!(client = %client, sender = %name, window, "link session established");
            (window, max)
        }
        Err(refuse) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            warn!(client = %client, ?refuse, "refusing link session");
            refuse.encode(&mut out);
            close_gracefully(&mut stream, &mut out, s.io_timeout).await;
            return Ok(());
        }
    };
    write_all(&mut stream, &mut out, s.io_timeout).await?;
    let mut rcv = Receiver::new(s.receiver.clone(), window, Instant::now());
    let mut batch: Vec<(NotifId, Vec<u8>)> = Vec::with_capacity(usize::from(window));
    // Frames may already sit in the buffer behind the HELLO.
    let mut buffered = !inbuf.is_empty();
    // Batches handed to the store, oldest first; answered in order.
    type Storing<'a> = (
        Vec<NotifId>,
        Pin<Box<dyn Future<Output = Vec<Outcome>> + Send + 'a>>,
    );
    let mut storing: VecDeque<Storing<'_>> = VecDeque::new();
    let result: Result<(), LinkError> = async {
        loop {
            let deadline = rcv.next_deadline();
            tokio::select! {
                _ = shutdown.cancelled() => {
                    Frame::Bye { reason: "agent shutting down".into() }.encode(&mut out);
                    let _ = write_all(&mut stream, &mut out, s.io_timeout).await;
                    return Ok(());
                }
                r = stream.read_buf(&mut inbuf), if !buffered => {
                    if r? == 0 {
                        return Err(LinkError::Closed);
                    }
                }
                _ = std::future::ready(()), if buffered => {}
                outcomes = async {
                    match storing.front_mut() {
                        Some((_, f)) => f.as_mut().await,
                        None => std::future::pending().await,
                    }
                }, if !storing.is_empty() => {
                    if let Some((ids, _)) = storing.pop_front() {
                        complete_stored(&mut rcv, stats, ids, outcomes, &mut out);
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    rcv.poll(Instant::now(), &mut out)?;
                }
            }
            buffered = false;
            let now = Instant::now();
            let mut at = 0;
            let decoded_all: Result<bool, LinkError> = loop {
                let (f, n) = match frame::decode(&inbuf[at..], max_frame) {
                    Ok(Some(x)) => x,
                    Ok(None) => break Ok(true),
                    Err(e) => break Err(e.into()),
                };
                at += n;
                match rcv.on_frame(f, now, &mut out) {
                    Ok(Some(item)) => batch.push(item),
                    Ok(None) => {}
                    Err(ReceiverError::Bye(reason)) => {
                        info!(%reason, "sender closed the session");
                        break Ok(false);
                    }
                    Err(e) => break Err(e.into()),
                }
            };
            let decoded_all = match decoded_all {
                Ok(go_on) => Ok(go_on),
                Err(e) => {
                    // One clear line to the peer, then close; nothing else is affected.
                    stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    Frame::Bye {
                        reason: format!("protocol error: {e}"),
                    }
                    .encode(&mut out);
                    close_gracefully(&mut stream, &mut out, s.io_timeout).await;
                    Err(e)
                }
            };
            inbuf.drain(..at);
            if !decoded_all? {
                return Ok(());
            }
            if !batch.is_empty() {
                // Hand the batch to the store and go on reading: the store group-commits
                // whatever arrives meanwhile, so the window never waits on an idle disk.
                // Small chunks let the store answer the first ones while it commits the rest,
                // so the sender refills its window continuously instead of in lock-step.
                let mut items = std::mem::take(&mut batch);
                stats
                    .received
                    .fetch_add(items.len() as u64, Ordering::Relaxed);
                while !items.is_empty() {
                    let rest = items.split_off(items.len().min(STORE_CHUNK));
                    let chunk = std::mem::replace(&mut items, rest);
                    let ids: Vec<NotifId> = chunk.iter().map(|(id, _)| *id).collect();
                    storing.push_back((ids, Box::pin(inbox.store(client.clone(), chunk))));
                }
            }
            write_all(&mut stream, &mut out, s.io_timeout).await?;
        }
    }
    .await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Printed whole (`{:#}` of an anyhow chain, or a log line's `%e`), every cause shows once.
    #[test]
    fn each_cause_of_a_link_error_is_printed_once() {
        let refused = LinkError::Connect {
            addr: "127.0.0.1:9".into(),
            cause: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        assert_eq!(
            with_causes(&refused),
            "connect to 127.0.0.1:9: connection refused"
        );
        let tls = LinkError::from(TlsError::Read {
            path: "/etc/mailbell/pki/ca.pem".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        });
        assert_eq!(tls.to_string(), with_causes(&tls));
        assert_eq!(
            tls.to_string(),
            "tls: cannot read /etc/mailbell/pki/ca.pem: entity not found"
        );
        let io = LinkError::from(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(with_causes(&io), "i/o: broken pipe");
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn failed_rounds_double_the_backoff_up_to_the_maximum() {
        let mut p = Reconnect::new(ms(500), Duration::from_secs(30));
        let now = Instant::now();
        let waits: Vec<Duration> = (0..9)
            .map(|_| p.after(&RoundEnd::Failed, 1.0, now).0)
            .collect();
        assert_eq!(waits[0], ms(500));
        assert_eq!(waits[1], ms(1000));
        assert_eq!(waits[5], ms(16_000));
        assert_eq!(waits[6], ms(30_000));
        assert_eq!(waits[8], ms(30_000));
        // Jitter scales the wait.
        assert_eq!(p.after(&RoundEnd::Failed, 0.75, now).0, ms(22_500));
    }

    #[test]
    fn probes_only_after_every_agent_was_unreachable_and_the_wait_is_long() {
        let mut p = Reconnect::new(ms(500), Duration::from_secs(30));
        let now = Instant::now();
        // 0.5 s, 1 s, 2 s: no longer than the probe period, so no probe.
        for _ in 0..3 {
            assert!(!p.after(&RoundEnd::Unreachable, 1.0, now).1);
        }
        let (wait, probe) = p.after(&RoundEnd::Unreachable, 1.0, now);
        assert_eq!((wait, probe), (ms(4000), true));
        // A peer that takes the TCP connection and then fails tells a probe nothing.
        let (wait, probe) = p.after(&RoundEnd::Failed, 1.0, now);
        assert_eq!((wait, probe), (ms(8000), false));
    }

    #[test]
    fn a_session_that_came_up_resets_the_backoff_but_keeps_session_starts_apart() {
        let mut p = Reconnect::new(ms(500), Duration::from_secs(30));
        let t0 = Instant::now();
        for _ in 0..8 {
            p.after(&RoundEnd::Failed, 1.0, t0);
        }
        // A session that lasted 100 ms: the next one starts 2 s after it started, not after
        // the 30 s the backoff had reached.
        let (wait, probe) = p.after(&RoundEnd::SessionEnded(t0), 1.0, t0 + ms(100));
        assert_eq!(wait, ms(1900));
        assert!(!probe);
        // One that lasted longer than the spacing: the minimum backoff.
        let (wait, _) = p.after(&RoundEnd::SessionEnded(t0), 1.0, t0 + ms(60_000));
        assert_eq!(wait, ms(500));
        // Flapping forever: at most one session start per spacing, never a growing wait.
        for i in 0..50u64 {
            let start = t0 + Duration::from_secs(i * 2);
            let (wait, _) = p.after(&RoundEnd::SessionEnded(start), 1.25, start + ms(10));
            assert_eq!(wait, ms(1990), "flap {i}");
        }
        // The spacing never exceeds the configured maximum backoff.
        let mut small = Reconnect::new(ms(20), ms(200));
        let (wait, _) = small.after(&RoundEnd::SessionEnded(t0), 1.0, t0);
        assert_eq!(wait, ms(200));
    }
}
