//! The milter endpoint: an arrival notice for every message a milter client (Postfix,
//! Sendmail, Stalwart) is about to accept.
//!
//! This module speaks the protocol (packets: `milter_wire.rs`), keeps what one message's notice
//! needs and hands it to the [`Intake`] at end of message. It rejects mail only from sources the blocklist
//! names ([`Gate`], `milter_policy.rs`: 550 with the operator's text at connect, HELO or MAIL,
//! the replies for those stages negotiated only when their list is non-empty); otherwise the
//! only verdict other than "accept" is a tempfail when the notice (or the delivery meter's
//! record) cannot be recorded, so the MTA keeps the message and retries.
//!
//! ```text
//! packet = len:u32be cmd:u8 payload[len-1]          len <= 1 MiB (MAX_PACKET)
//!
//! O  negotiate  ask only for what the MTA offers: no DATA/EOH/unknown stages, no replies
//!               before end of message (NR_*), no actions, no macros
//! C  connect    client IP from the socket info, else the {client_addr} macro
//! H  helo       HELO/EHLO name
//! M  mail       starts a transaction: envelope sender, <> stripped, ESMTP args dropped
//! R  rcpt       one envelope recipient, <> stripped, ESMTP args dropped
//! L  header     offered to HeaderCollector; its bytes are counted
//! B  body       bytes counted, never kept
//! E  eom        Intake::accept: Ok -> accept, Err -> "451 4.3.0 mailbell: ..." tempfail
//! A  abort      the transaction is dropped
//! ```
//!
//! Each connection is one task with its own `milter{peer=..}` span: it reads packets into one
//! buffer, handles each in place and writes a reply only where the negotiation left one. A
//! [`FrameGuard`] follows every byte read, so garbage, oversized packets and transaction
//! commands outside a transaction end that connection with a warning, while other connections
//! carry on. (Until issue 8 the session was indymilter's: a stream task and a session task per
//! connection, a channel round trip, a timer and a zeroed buffer per packet, and every macro
//! kept; at Postfix's one connection per SMTP session that was most of the milter's CPU, see
//! docs/benchmarks.md.)
//!
//! A connection is accepted through [`mailbell_link::listen::Acceptor`] and goes through two
//! phases:
//!
//! ```text
//! accepted ── OPTNEG arrived whole ──► negotiated (session)
//!   pending slot (max_pending),          session slot (max_connections), waited for at
//!   evictable, oldest first;             most negotiate_timeout; never evicted;
//!   closed after negotiate_timeout       a started packet must arrive within
//!                                        command_timeout, between packets the idle timeout
//! ```
//!
//! The first phase reads the bare socket through the guard; the session starts with the bytes
//! it read once the connection has its session slot.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use indymilter::ProtoOpts;
use mailbell_link::metrics::{self, Collector};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{oneshot, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

use mailbell_link::listen::{
    Accepted, Acceptor, Limits, Listen, ListenError, ListenerStats, Ticket,
};
use mailbell_link::units::de_duration;

use crate::mta::headers::HeaderCollector;
pub use crate::mta::milter_policy::Gate;
use crate::mta::milter_wire::{
    self as wire, macro_value, stage_index, Command, Reply, WireError, MACRO_STAGES,
};
use crate::notify::arrival::{Arrival, Intake, IntakeError, Origin};

/// Reply code and enhanced status code of the tempfail reply.
const TEMPFAIL_CODE: &str = "451";
const TEMPFAIL_XCODE: &str = "4.3.0";
/// Longest tempfail reply text sent (an SMTP reply line is at most 512 bytes).
const MAX_REPLY_TEXT: usize = 400;
/// Longest HELO name or address kept; longer ones are cut.
const MAX_NAME: usize = 512;
/// Most recipients kept per message (Postfix's default `smtpd_recipient_limit`).
const MAX_RCPTS: usize = 1000;
/// Longest milter packet accepted, command byte included (libmilter's limit).
const MAX_PACKET: u32 = 1024 * 1024;
/// Most bytes read before option negotiation (macros the MTA may send first, then OPTNEG).
const MAX_PRE_NEGOTIATION: usize = 64 * 1024;
/// Events of one kind closer together than this belong to one episode, logged once.
const EPISODE_GAP: Duration = Duration::from_secs(60);

/// `[milter]` settings.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MilterConfig {
    /// Most milter sessions served at once. Postfix holds one per smtpd process, Stalwart one
    /// per message being filtered. A connection takes a session slot only once it has sent its
    /// option negotiation; one that finds them all taken waits up to `negotiate_timeout`.
    pub max_connections: NonZeroUsize,
    /// Most connections that have not negotiated yet; when all are taken the oldest is closed
    /// to make room. Default: twice `max_connections`.
    pub max_pending: Option<NonZeroUsize>,
    /// A new connection must have sent its option negotiation (the MTA's first packet) within
    /// this, or it is closed. The MTA sends it as soon as it connects.
    #[serde(deserialize_with = "de_duration")]
    pub negotiate_timeout: Duration,
    /// Once the first byte of a packet has arrived, the whole packet must arrive within this,
    /// or the connection is closed.
    #[serde(deserialize_with = "de_duration")]
    pub command_timeout: Duration,
    /// Longest wait for the MTA's next packet (or for a reply to be sent); the connection is
    /// closed after it. The MTA keeps its milter connection idle while its SMTP client thinks,
    /// so this must exceed the MTA's own SMTP timeouts; the default is libmilter's.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Text of the `451 4.3.0` reply sent when the notice cannot be recorded; `{error}` is
    /// replaced by the cause.
    pub tempfail_reply: String,
    /// Threads that run the sessions, each with its own single-threaded runtime; a connection
    /// stays on the thread it was given. Default: one per core.
    pub threads: Option<NonZeroUsize>,
    /// With `listen.milter = "unix:/path"`: the socket file's permissions (octal). The MTA's
    /// user must be able to write to it.
    pub socket_mode: String,
    /// With `listen.milter = "unix:/path"`: the group the socket file is given (the MTA's, e.g.
    /// `postfix`; the daemon's user must be a member, or root). Unset: the daemon's group.
    pub socket_group: Option<String>,
}

impl Default for MilterConfig {
    fn default() -> Self {
        Self {
            max_connections: NonZeroUsize::new(100).unwrap_or(NonZeroUsize::MIN),
            max_pending: None,
            negotiate_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(7210),
            tempfail_reply: "mailbell: cannot record the arrival notice ({error}), try again later"
                .to_owned(),
            threads: None,
            socket_mode: "0660".to_owned(),
            socket_group: None,
        }
    }
}

impl MilterConfig {
    /// `max_pending`, or its default: twice `max_connections`.
    pub fn max_pending(&self) -> usize {
        self.max_pending.map_or(
            self.max_connections.get().saturating_mul(2),
            NonZeroUsize::get,
        )
    }

    /// `socket_mode` as permission bits.
    pub fn socket_mode(&self) -> Result<u32, String> {
        match u32::from_str_radix(self.socket_mode.trim(), 8) {
            Ok(m) if m <= 0o777 => Ok(m),
            _ => Err(format!(
                "milter.socket_mode {:?} is not octal permission bits such as \"0660\"",
                self.socket_mode
            )),
        }
    }

    /// `threads`, or its default: one per core.
    pub fn threads(&self) -> usize {
        self.threads.map_or_else(
            || std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
            NonZeroUsize::get,
        )
    }
}

/// Upper bounds (seconds) of the end-of-message latency histogram's buckets.
const EOM_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The milter's counters, for `/metrics` (it is their collector).
#[derive(Debug)]
pub struct MilterStats {
    /// Sessions that negotiated (one per MTA milter connection that got a session slot).
    pub sessions: AtomicU64,
    /// Messages that reached end of message.
    pub messages: AtomicU64,
    /// Messages answered with a tempfail (the notice could not be recorded).
    pub tempfails: AtomicU64,
    /// End-of-message latency in seconds (recording the arrival, until the verdict), in the
    /// buckets of [`EOM_BUCKETS`].
    eom: Histogram,
}

impl Default for MilterStats {
    fn default() -> Self {
        Self {
            sessions: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            tempfails: AtomicU64::new(0),
            eom: Histogram::new(EOM_BUCKETS),
        }
    }
}

impl MilterStats {
    /// Notes one end-of-message verdict that took `took`.
    fn observe_eom(&self, took: Duration, tempfail: bool) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        if tempfail {
            self.tempfails.fetch_add(1, Ordering::Relaxed);
        }
        self.eom.observe(took.as_secs_f64());
    }
}

/// The counters and the latency histogram.
impl Collector for MilterStats {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (name, help, c) in [
            (
                "mailbell_milter_sessions_total",
                "Milter sessions negotiated.",
                &self.sessions,
            ),
            (
                "mailbell_milter_messages_total",
                "Messages that reached the milter's end of message.",
                &self.messages,
            ),
            (
                "mailbell_milter_tempfails_total",
                "Messages the milter answered with a tempfail (notice not recorded).",
                &self.tempfails,
            ),
        ] {
            metrics::counter(&mut enc, name, help, v(c))?;
        }
        self.eom.encode(enc.encode_descriptor(
            "mailbell_milter_eom_duration_seconds",
            "Time from end of message to the milter's verdict (recording the arrival).",
            None,
            MetricType::Histogram,
        )?)
    }
}

/// Why [`serve`] stopped before it was told to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MilterError {
    /// The listening socket cannot go on; the daemon should exit non-zero.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// A session thread or its runtime could not start.
    #[error("cannot start the milter session threads: {0}")]
    Threads(io::Error),
}

/// Serves milter clients on `listener` until `shutdown` is cancelled, then waits for the open
/// sessions to finish the command they are processing.
///
/// Connections are accepted through an [`Acceptor`] (no per-source cap: an MTA connects from
/// one address with many connections) whose counters are kept in `stats`, for `/metrics` as
/// listener `"milter"`, and its sessions, messages, tempfails and end-of-message latency in
/// `milter_stats`. A connection holds a pending slot until its option negotiation has
/// arrived (evictable, `negotiate_timeout`), then a session slot (`max_connections`). Only a
/// listening socket that cannot go on is an error; a failing connection is logged in its span
/// and closed.
pub async fn serve<I: Intake, L: MilterListener>(
    listener: L,
    intake: Arc<I>,
    cfg: MilterConfig,
    stats: Arc<ListenerStats>,
    milter_stats: Arc<MilterStats>,
    gate: Gate,
    shutdown: CancellationToken,
) -> Result<(), MilterError> {
    let local = listener.describe();
    let limits = Limits {
        max_pending: cfg.max_pending(),
        max_per_source: None,
    };
    info!(
        addr = %local,
        max_connections = cfg.max_connections.get(),
        max_pending = limits.max_pending,
        "milter listening"
    );
    let threads = SessionThreads::start(cfg.threads()).map_err(MilterError::Threads)?;
    let mut acceptor = Acceptor::new(listener, limits, "milter", stats);
    let tracker = TaskTracker::new();
    // Sessions stop on shutdown, and also when the listener breaks.
    let stop = shutdown.child_token();
    let shared = Arc::new(Shared {
        intake,
        reply: Arc::from(cfg.tempfail_reply.as_str()),
        sessions: Arc::new(Semaphore::new(cfg.max_connections.get())),
        timeout: cfg.timeout,
        negotiate_timeout: cfg.negotiate_timeout,
        command_timeout: cfg.command_timeout,
        evictions: Episode::default(),
        not_negotiated: Episode::default(),
        no_session_slot: Episode::default(),
        stats: milter_stats,
        gate,
    });
    let result = loop {
        match acceptor.accept(&stop).await {
            Ok(Some(accepted)) => {
                let (thread, place) = threads.pick();
                let span = info_span!("milter", peer = %accepted.peer);
                let (shared, stop) = (shared.clone(), stop.clone());
                let Some(handle) = thread else {
                    let session = connection(accepted, shared, stop);
                    tracker.spawn(place.holding(session).instrument(span));
                    continue;
                };
                // Off this runtime's reactor, onto the other thread's.
                let Accepted {
                    stream,
                    peer,
                    ticket,
                } = accepted;
                let stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(%peer, error = %e, "accepted connection unusable, closed");
                        continue;
                    }
                };
                let session = async move {
                    match L::Stream::from_std(stream) {
                        Ok(stream) => {
                            let accepted = Accepted::<L> {
                                stream,
                                peer,
                                ticket,
                            };
                            connection(accepted, shared, stop).await;
                        }
                        Err(e) => debug!(error = %e, "cannot register the connection, closed"),
                    }
                };
                tracker.spawn_on(place.holding(session).instrument(span), handle);
            }
            Ok(None) => break Ok(()),
            // The acceptor has logged it.
            Err(e) => break Err(MilterError::from(e)),
        }
    };
    stop.cancel();
    drop(acceptor);
    tracker.close();
    tracker.wait().await;
    info!("milter stopped");
    result
}

/// The threads the milter's sessions run on, each with a single-threaded runtime of its own.
///
/// On the daemon's multi-threaded runtime the sessions (then indymilter's, two tasks each) kept
/// waking the other worker thread, several times per message; at Postfix's pace (one
/// connection per SMTP session, a few hundred messages/s) waking threads was most of the
/// milter's CPU (docs/benchmarks.md, "Postfix at 20 sessions"). Here a connection stays on one
/// thread, and a connection goes to the first thread serving fewer than
/// [`SPILL_AT`] connections (else to the least busy one): at an MTA's usual dozens of
/// connections one thread, the one that accepts them, serves them all and takes the packets of
/// many in one wake-up, while a heavy load still spreads over every core. The other threads
/// end when this is dropped, after [`serve`] has waited for its sessions.
struct SessionThreads {
    threads: Vec<SessionThread>,
    stop: CancellationToken,
}

/// Connections one session thread takes before the next thread gets new ones.
const SPILL_AT: usize = 32;

struct SessionThread {
    handle: tokio::runtime::Handle,
    /// Connections it is serving now.
    live: Arc<AtomicUsize>,
}

/// A connection's place on its session thread; dropped with the connection.
struct OnThread(Arc<AtomicUsize>);

impl OnThread {
    /// `session`, keeping this place until it ends.
    async fn holding(self, session: impl Future<Output = ()>) {
        session.await;
        drop(self);
    }
}

impl Drop for OnThread {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SessionThreads {
    /// The caller's runtime is the first thread (the acceptor runs there too, so a connection
    /// it keeps costs no hand-over); `count - 1` more are started. Call inside a runtime.
    fn start(count: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut threads = vec![SessionThread {
            handle: tokio::runtime::Handle::current(),
            live: Arc::default(),
        }];
        for i in 1..count.max(1) {
            match runtime_thread(format!("milter-{i}"), stop.clone()) {
                Ok(handle) => threads.push(SessionThread {
                    handle,
                    live: Arc::default(),
                }),
                Err(e) => {
                    stop.cancel();
                    return Err(e);
                }
            }
        }
        Ok(Self { threads, stop })
    }

    /// The thread for a new connection (`None`: the caller's own), and the connection's
    /// place on it.
    fn pick(&self) -> (Option<&tokio::runtime::Handle>, OnThread) {
        let live = |i: &usize| self.threads[*i].live.load(Ordering::Relaxed);
        let all = 0..self.threads.len();
        let i = all
            .clone()
            .find(|i| live(i) < SPILL_AT)
            .or_else(|| all.min_by_key(live))
            .unwrap_or(0);
        let t = &self.threads[i];
        t.live.fetch_add(1, Ordering::Relaxed);
        ((i > 0).then_some(&t.handle), OnThread(t.live.clone()))
    }
}

impl Drop for SessionThreads {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The milter's own thread, `milter-0`, with a single-threaded runtime: [`serve_on`] runs the
/// accept loop there, and it is also the first session thread ([`SessionThreads`]). The daemon
/// starts the intake's scheduler on it too (app.rs), so that an arrival from the MTA reaches
/// the scheduler, and its commit's answer reaches the session, without waking another thread
/// (docs/benchmarks.md, "Postfix: a milter that does nothing"). The thread runs until the
/// last clone of its [`MilterThread::keep`] is dropped.
pub struct MilterThread {
    pub handle: tokio::runtime::Handle,
    /// Keeps the thread running while held; hold it until everything spawned on it has ended.
    pub keep: Arc<tokio_util::sync::DropGuard>,
}

impl MilterThread {
    pub fn start() -> io::Result<Self> {
        let stop = CancellationToken::new();
        let handle = runtime_thread("milter-0".into(), stop.clone())?;
        Ok(Self {
            handle,
            keep: Arc::new(stop.drop_guard()),
        })
    }
}

/// Runs `serve` (a call of [`serve`] on the listener it is given) on `thread`; the answer
/// arrives when it returns.
pub fn serve_on<L, F, Fut>(
    thread: &tokio::runtime::Handle,
    listener: L,
    serve: F,
) -> io::Result<oneshot::Receiver<Result<(), MilterError>>>
where
    L: MilterListener,
    F: FnOnce(L) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), MilterError>> + Send + 'static,
{
    let listener = listener.into_std()?;
    let (tx, rx) = oneshot::channel();
    thread.spawn(async move {
        let result = match L::from_std(listener) {
            Ok(listener) => serve(listener).await,
            Err(e) => Err(MilterError::Threads(e)),
        };
        let _ = tx.send(result);
    });
    Ok(rx)
}

/// Starts thread `name` with a single-threaded runtime that runs what is spawned on it until
/// `until` is cancelled, under the caller's tracing subscriber (which need not be the global
/// one: tests set their own). Returns the runtime's handle, for spawning onto it.
fn runtime_thread(name: String, until: CancellationToken) -> io::Result<tokio::runtime::Handle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    std::thread::Builder::new().name(name).spawn(move || {
        tracing::dispatcher::with_default(&dispatch, || rt.block_on(until.cancelled()))
    })?;
    Ok(handle)
}

/// What every connection of one [`serve`] shares.
struct Shared<I> {
    intake: Arc<I>,
    reply: Arc<str>,
    /// `max_connections`: taken once a connection has negotiated.
    sessions: Arc<Semaphore>,
    timeout: Duration,
    negotiate_timeout: Duration,
    command_timeout: Duration,
    evictions: Episode,
    not_negotiated: Episode,
    no_session_slot: Episode,
    stats: Arc<MilterStats>,
    gate: Gate,
}

/// A kind of event that comes in floods (a thousand idle connections time out together): the
/// first of an episode is logged at warn, the rest at debug, until none has come for
/// [`EPISODE_GAP`]. The counters in `/metrics` have the numbers.
#[derive(Default)]
struct Episode {
    last: Mutex<Option<Instant>>,
}

impl Episode {
    /// Notes one event; true if it starts a new episode.
    fn starts(&self) -> bool {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let new = last.is_none_or(|t| now.duration_since(t) >= EPISODE_GAP);
        *last = Some(now);
        new
    }
}

/// One milter connection: the pre-negotiation phase on the bare socket, then the session
/// ([`run_session`]). The ticket (pending slot, then session slot) lives as long as the connection.
async fn connection<I: Intake, L: MilterListener>(
    accepted: Accepted<L>,
    shared: Arc<Shared<I>>,
    stop: CancellationToken,
) {
    let Accepted {
        mut stream,
        mut ticket,
        ..
    } = accepted;
    let session = async move {
        debug!("connection accepted");
        stream.prepare();
        let (guard, replay) =
            match negotiation(&mut stream, &ticket, shared.negotiate_timeout, &stop).await {
                Ok(proven) => proven,
                Err(why) => {
                    unproven(why, &ticket, &shared);
                    return;
                }
            };
        // Proven: trade the pending slot for a session slot, waiting no longer than a
        // negotiation may take.
        let promoted = tokio::select! {
            biased;
            () = stop.cancelled() => {
                debug!("connection closed for shutdown");
                return;
            }
            r = tokio::time::timeout(
                shared.negotiate_timeout,
                ticket.promote(shared.sessions.clone()),
            ) => r,
        };
        match promoted {
            Ok(Ok(())) => {}
            // Never closed.
            Ok(Err(_)) => return,
            Err(_) => {
                ticket.timed_out();
                if shared.no_session_slot.starts() {
                    warn!(
                        wait = ?shared.negotiate_timeout,
                        "every milter session slot stayed taken, closing a negotiated connection (raise [milter] max_connections?); more at debug level"
                    );
                } else {
                    debug!("no session slot freed in time, connection closed");
                }
                return;
            }
        }
        run_session(stream, guard, replay, &shared, stop).await;
        drop(ticket);
    };
    session.await;
}

/// Why a connection closed before it negotiated.
#[derive(Debug)]
enum Unproven {
    Shutdown,
    Closed,
    Evicted,
    TimedOut,
    Rejected(FrameError),
    Failed(io::Error),
}

/// Reads the MTA's first packets on the bare socket until option negotiation has arrived
/// whole, within `limit`, unless the acceptor wants the slot first. Returns the guard that
/// followed them and the bytes read, which the session handles first.
async fn negotiation<S: MilterStream>(
    stream: &mut S,
    ticket: &Ticket,
    limit: Duration,
    stop: &CancellationToken,
) -> Result<(FrameGuard, Bytes), Unproven> {
    let mut guard = FrameGuard::default();
    let mut read = BytesMut::new();
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    while !guard.proven {
        let n = tokio::select! {
            biased;
            () = stop.cancelled() => return Err(Unproven::Shutdown),
            r = stream.read(&mut chunk) => r.map_err(Unproven::Failed)?,
            () = ticket.evicted() => return Err(Unproven::Evicted),
            () = &mut deadline => return Err(Unproven::TimedOut),
        };
        let new = chunk.get(..n).unwrap_or_default();
        if new.is_empty() {
            return Err(Unproven::Closed);
        }
        guard
            .feed(new)
            .map_err(|rejected| Unproven::Rejected(rejected.error))?;
        read.extend_from_slice(new);
    }
    Ok((guard, read.freeze()))
}

/// Logs and counts a connection that closed before it negotiated.
fn unproven<I>(why: Unproven, ticket: &Ticket, shared: &Shared<I>) {
    match why {
        Unproven::Shutdown => debug!("connection closed for shutdown"),
        Unproven::Closed => debug!("closed by the peer before option negotiation"),
        Unproven::Failed(e) => debug!(error = %e, "connection failed before option negotiation"),
        Unproven::Rejected(error) => {
            warn!(%error, "malformed milter data, closing the connection");
        }
        Unproven::Evicted => {
            if shared.evictions.starts() {
                warn!("every pending milter slot is taken by connections that have not negotiated, closing the oldest to make room; more at debug level");
            } else {
                debug!("closed to make room: not negotiated yet");
            }
        }
        Unproven::TimedOut => {
            ticket.timed_out();
            let limit = shared.negotiate_timeout;
            if shared.not_negotiated.starts() {
                warn!(?limit, "closing milter connections that did not negotiate in time; more at debug level");
            } else {
                debug!(?limit, "not negotiated in time, connection closed");
            }
        }
    }
}

/// How a negotiated connection ended.
#[derive(Debug)]
enum End {
    Quit,
    Eof,
    Io(io::Error),
    /// A packet did not arrive whole within the command timeout.
    Stalled,
    /// Nothing arrived within the idle timeout.
    Idle,
    Shutdown,
    /// The guard refused the bytes (logged when it did).
    Rejected,
    /// A packet the guard let through did not parse.
    Malformed(WireError),
}

/// Room each read asks for: the buffer's usual size.
const READ_CHUNK: usize = 16 * 1024;

/// A negotiated connection's socket, read packet by packet through its [`FrameGuard`].
struct Conn<S> {
    stream: S,
    /// Whole packets and the start of the next one; everything in it has passed the guard.
    buf: BytesMut,
    guard: FrameGuard,
    /// The guard refused what followed `buf`: the connection ends once `buf` is used up.
    rejected: bool,
    last_activity: Instant,
    /// When a read first found the packet in `buf` incomplete.
    partial_since: Option<Instant>,
    /// Runs out at or before the next deadline (idle or command timeout); moved only when
    /// a deadline comes earlier or it has run out, so most reads set no timer.
    timer: Pin<Box<Sleep>>,
}

impl<S: MilterStream> Conn<S> {
    fn new(stream: S, guard: FrameGuard, replay: &[u8], idle: Duration) -> Self {
        let mut buf = BytesMut::with_capacity(READ_CHUNK.max(replay.len()));
        buf.extend_from_slice(replay);
        let now = Instant::now();
        Self {
            stream,
            buf,
            guard,
            rejected: false,
            last_activity: now,
            partial_since: None,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
        }
    }

    /// A whole packet from the front of `buf` (length, command, payload).
    fn take_packet(&mut self) -> Option<Bytes> {
        let head: [u8; 4] = self.buf.get(..4)?.try_into().ok()?;
        // The guard let only lengths of 1 ..= MAX_PACKET through.
        let whole = 4 + u32::from_be_bytes(head) as usize;
        if self.buf.len() < whole {
            return None;
        }
        let packet = self.buf.split_to(whole).freeze();
        if whole > 4 * READ_CHUNK {
            // What is left still shares the allocation a large packet grew, and would keep it
            // (up to MAX_PACKET) for as long as the MTA keeps the connection: move it out.
            let mut own = BytesMut::with_capacity(READ_CHUNK.max(self.buf.len()));
            own.extend_from_slice(&self.buf);
            self.buf = own;
        }
        Some(packet)
    }

    /// The next packet, within the idle timeout (between packets) or the command timeout
    /// (once one has started), unless `stop` comes first.
    async fn next(
        &mut self,
        idle: Duration,
        command: Duration,
        stop: &CancellationToken,
    ) -> Result<Bytes, End> {
        loop {
            if let Some(p) = self.take_packet() {
                self.partial_since = None;
                return Ok(p);
            }
            if self.rejected {
                return Err(End::Rejected);
            }
            let partial = !self.buf.is_empty();
            let due = if partial {
                *self.partial_since.get_or_insert_with(Instant::now) + command
            } else {
                self.last_activity + idle
            };
            if self.timer.deadline() > due {
                self.timer.as_mut().reset(due);
            }
            self.buf.reserve(READ_CHUNK);
            let before = self.buf.len();
            tokio::select! {
                biased;
                () = stop.cancelled() => return Err(End::Shutdown),
                r = self.stream.read_buf(&mut self.buf) => match r {
                    Ok(0) => return Err(End::Eof),
                    Ok(_) => {}
                    Err(e) => return Err(End::Io(e)),
                },
                () = &mut self.timer => {
                    if Instant::now() >= due {
                        return Err(if partial { End::Stalled } else { End::Idle });
                    }
                    // An earlier deadline that has moved on.
                    self.timer.as_mut().reset(due);
                    continue;
                }
            }
            self.last_activity = Instant::now();
            self.stream.ack_now();
            if let Err(Rejected { valid, error }) = self.guard.feed(&self.buf[before..]) {
                warn!(%error, "malformed milter data, closing the connection");
                self.buf.truncate(before + valid);
                self.rejected = true;
            }
        }
    }

    async fn write(&mut self, packet: &[u8], limit: Duration) -> Result<(), End> {
        match tokio::time::timeout(limit, self.stream.write_all(packet)).await {
            Ok(Ok(())) => {
                self.last_activity = Instant::now();
                Ok(())
            }
            Ok(Err(e)) => Err(End::Io(e)),
            Err(_) => Err(End::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "the MTA took no reply within the idle timeout",
            ))),
        }
    }
}

/// The negotiated connection's session: packets in, replies out, the notice at end of
/// message. `replay` holds the bytes read (and followed by `guard`) while negotiating.
async fn run_session<I: Intake, S: MilterStream>(
    stream: S,
    guard: FrameGuard,
    replay: Bytes,
    shared: &Shared<I>,
    stop: CancellationToken,
) {
    shared.stats.sessions.fetch_add(1, Ordering::Relaxed);
    let mut conn = Conn::new(stream, guard, &replay, shared.timeout);
    let mut proto = Proto::default();
    let end = loop {
        let packet = match conn
            .next(shared.timeout, shared.command_timeout, &stop)
            .await
        {
            Ok(p) => p,
            Err(end) => break end,
        };
        let (cmd, payload) = (packet[4], &packet[5..]);
        let command = match Command::parse(cmd, payload) {
            Ok(c) => c,
            Err(e) => break End::Malformed(e),
        };
        let reply = match proto.on_command(command, &shared.gate) {
            Step::Quiet => continue,
            Step::Quit => break End::Quit,
            Step::Failed(e) => break End::Malformed(e),
            Step::Send(bytes) => bytes,
            Step::Eom => {
                let started = Instant::now();
                let reply = proto
                    .eom(&*shared.intake, &shared.reply, &shared.gate)
                    .await;
                let tempfail = matches!(reply, Reply::Tempfail(_));
                shared.stats.observe_eom(started.elapsed(), tempfail);
                reply.encode()
            }
        };
        if let Err(end) = conn.write(&reply, shared.timeout).await {
            break end;
        }
    };
    let mid_message = conn.guard.in_tx;
    match end {
        End::Rejected => debug!("connection closed"),
        End::Quit => debug!("session ended"),
        End::Stalled => {
            info!(command_timeout = ?shared.command_timeout, cmd = %char::from(conn.guard.cmd), mid_message, "milter packet incomplete after the command timeout, connection closed");
        }
        End::Io(e) => info!(error = %e, mid_message, "connection failed"),
        End::Eof if mid_message => info!("MTA closed the connection in the middle of a message"),
        End::Eof => debug!("MTA closed the connection without QUIT"),
        End::Shutdown => debug!("connection closed for shutdown"),
        End::Idle => {
            info!(timeout = ?shared.timeout, mid_message, "connection closed after the idle timeout");
        }
        End::Malformed(error) => {
            warn!(%error, "malformed or unsupported milter command, closing the connection");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The protocol's state (no I/O)

/// Protocol options we would like: stages we do not need, and no replies before end of message
/// (we never act before it). Only what the MTA offers is requested (an MTA may close the
/// connection if we ask for more), and Stalwart offers just NO_HELO | NO_EOH.
fn wanted_opts(offered: ProtoOpts) -> ProtoOpts {
    let wanted = ProtoOpts::NO_DATA
        | ProtoOpts::NO_EOH
        | ProtoOpts::NO_UNKNOWN
        | ProtoOpts::NOREPLY_CONNECT
        | ProtoOpts::NOREPLY_HELO
        | ProtoOpts::NOREPLY_MAIL
        | ProtoOpts::NOREPLY_RCPT
        | ProtoOpts::NOREPLY_DATA
        | ProtoOpts::NOREPLY_HEADER
        | ProtoOpts::NOREPLY_EOH
        | ProtoOpts::NOREPLY_BODY
        | ProtoOpts::NOREPLY_UNKNOWN;
    wanted & offered
}

/// What to do after a command.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Nothing to send (a macro packet, a stage negotiated without reply, abort).
    Quiet,
    /// Send this packet.
    Send(Vec<u8>),
    /// End of message: record the notice, then reply.
    Eom,
    Quit,
    Failed(WireError),
}

/// The two macros we use, as one stage's macro packet defined them.
#[derive(Debug, Default, Clone)]
struct StageMacros {
    client_addr: Option<IpAddr>,
    queue_id: Option<String>,
}

/// One connection's protocol state: the negotiated options, the session, and the macros of
/// each stage (a stage's command drops the macros of the stages after it, as libmilter does).
#[derive(Debug, Default)]
struct Proto {
    session: Session,
    macros: [StageMacros; MACRO_STAGES.len()],
}

impl Proto {
    fn on_command(&mut self, command: Command<'_>, gate: &Gate) -> Step {
        let s = &mut self.session;
        match command {
            Command::OptNeg {
                version,
                actions,
                opts: offered,
            } => {
                let version = match wire::version(version) {
                    Ok(v) => v,
                    Err(e) => return Step::Failed(e),
                };
                // Replies only where a blocklist must be able to refuse.
                let opts = wanted_opts(offered) - gate.replies_needed();
                debug!(actions = format_args!("{actions:#x}"), ?offered, requested = ?opts, "negotiated");
                self.macros = Default::default();
                *s = Session {
                    opts,
                    ..Session::default()
                };
                Step::Send(wire::optneg_reply(version, opts))
            }
            Command::Macros { stage, pairs } => {
                self.macros[stage_index(stage)] = StageMacros {
                    client_addr: macro_value(pairs, b"{client_addr}")
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(wire::parse_ip),
                    queue_id: macro_value(pairs, b"i").map(|v| lossy(v, MAX_NAME)),
                };
                Step::Quiet
            }
            Command::Connect { host, ip } => {
                self.clear_after(b'C');
                let ip = ip.or_else(|| self.client_addr());
                let s = &mut self.session;
                // A new SMTP connection (also after QUIT_NC): nothing of the previous one
                // carries over.
                *s = Session {
                    opts: s.opts,
                    client_ip: ip,
                    ..Session::default()
                };
                debug!(client_ip = ?ip, client_host = %String::from_utf8_lossy(host), "client connected");
                s.verdict(ProtoOpts::NOREPLY_CONNECT, gate)
            }
            Command::Helo(name) => {
                self.clear_after(b'H');
                let s = &mut self.session;
                s.tx = None;
                s.helo = lossy(name, MAX_NAME);
                s.verdict(ProtoOpts::NOREPLY_HELO, gate)
            }
            Command::Mail(arg) => {
                self.clear_after(b'M');
                let s = &mut self.session;
                let from = path(arg);
                debug!(from = %from, "mail transaction");
                s.tx = Some(Transaction::new(from));
                s.verdict(ProtoOpts::NOREPLY_MAIL, gate)
            }
            Command::Rcpt(arg) => {
                self.clear_after(b'R');
                let s = &mut self.session;
                s.tx().add_rcpt(path(arg));
                s.ack(ProtoOpts::NOREPLY_RCPT)
            }
            Command::Data => s.ack(ProtoOpts::NOREPLY_DATA),
            Command::Header { name, value } => {
                s.tx().add_header(name, value);
                s.ack(ProtoOpts::NOREPLY_HEADER)
            }
            Command::Eoh => s.ack(ProtoOpts::NOREPLY_EOH),
            Command::Body(chunk) => {
                s.tx().add_body(chunk.len());
                s.ack(ProtoOpts::NOREPLY_BODY)
            }
            Command::Eom(chunk) => {
                s.tx().add_body(chunk.len());
                Step::Eom
            }
            Command::Abort => {
                if s.tx.take().is_some() {
                    debug!("mail transaction aborted");
                }
                Step::Quiet
            }
            Command::Quit => Step::Quit,
            Command::QuitNewConnection => {
                s.tx = None;
                self.macros = Default::default();
                Step::Quiet
            }
            Command::Unknown => s.ack(ProtoOpts::NOREPLY_UNKNOWN),
        }
    }

    /// Drops the macros of the stages after `stage`.
    fn clear_after(&mut self, stage: u8) {
        for m in self.macros.iter_mut().skip(stage_index(stage) + 1) {
            *m = StageMacros::default();
        }
    }

    /// The client IP from the `{client_addr}` macro (Stalwart and Sendmail send it; Sendmail
    /// writes IPv6 as `IPv6:2001:db8::1`), latest stage first.
    fn client_addr(&self) -> Option<IpAddr> {
        self.macros.iter().rev().find_map(|m| m.client_addr)
    }

    /// The MTA's queue id (`{i}`), latest stage first.
    fn queue_id(&self) -> Option<String> {
        self.macros.iter().rev().find_map(|m| m.queue_id.clone())
    }

    /// End of message: the blocklist's last word, then the notice (and the delivery meter's
    /// record); a tempfail if either cannot be recorded.
    async fn eom<I: Intake>(&mut self, intake: &I, reply: &str, gate: &Gate) -> Reply {
        let macro_ip = self.client_addr();
        let queue_id = self.queue_id().unwrap_or_default();
        let s = &mut self.session;
        if s.client_ip.is_none() {
            s.client_ip = macro_ip;
        }
        // A list loaded after this connection negotiated (or a stage the MTA wants answered
        // only here) still refuses, at the latest now.
        let from = s.tx.as_ref().map(|t| t.env_from.as_str());
        if let Some(r) = gate.refusal(s.client_ip, Some(&s.helo), from) {
            s.tx = None;
            return gate.reject(s.client_ip, &r);
        }
        let arrival = s.arrival(now_ms(), (!queue_id.is_empty()).then(|| queue_id.clone()));
        let (rcpts, size) = (arrival.rcpts.len(), arrival.size);
        let deliveries = gate.deliveries(&arrival).await;
        let accepted = match (intake.accept(arrival).await, deliveries) {
            (Ok(a), None) => Ok(a),
            // Metered after the intake: a tempfail makes the client send the message again
            // under a new queue id, so a record made for a message then refused would bill it
            // twice.
            (Ok(a), Some(d)) => match gate.meter(d).await {
                Ok(_) => Ok(a),
                Err(why) => Err(IntakeError::Store(format!("delivery meter: {why}"))),
            },
            (Err(e), _) => Err(e),
        };
        match accepted {
            Ok(accepted) => {
                info!(
                    queue_id,
                    rcpts,
                    size,
                    notices = accepted.notices,
                    "arrival recorded"
                );
                Reply::Accept
            }
            Err(e) => {
                if matches!(e, IntakeError::ShuttingDown) {
                    warn!(queue_id, error = %e, "arrival not recorded, tempfailing the message");
                } else {
                    error!(queue_id, error = %e, "arrival not recorded, tempfailing the message");
                }
                let text = tempfail_text(reply, &e);
                Reply::Tempfail(Some(wire::reply_line(TEMPFAIL_CODE, TEMPFAIL_XCODE, &text)))
            }
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .unwrap_or(0)
}

/// The tempfail reply text: `template` with `{error}` replaced, one line of printable text,
/// `%` doubled (libmilter treats the text as a format string), cut to [`MAX_REPLY_TEXT`].
fn tempfail_text(template: &str, error: &IntakeError) -> String {
    reply_text(&template.replace("{error}", &error.to_string()))
}

/// An SMTP reply text as libmilter wants it: one line of printable text, `%` doubled, cut to
/// [`MAX_REPLY_TEXT`].
pub(crate) fn reply_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_REPLY_TEXT));
    for c in text.chars() {
        let piece: &str = match c {
            '%' => "%%",
            c if c.is_control() => " ",
            _ => {
                if out.len() + c.len_utf8() > MAX_REPLY_TEXT {
                    break;
                }
                out.push(c);
                continue;
            }
        };
        if out.len() + piece.len() > MAX_REPLY_TEXT {
            break;
        }
        out.push_str(piece);
    }
    out.trim().to_owned()
}

// ---------------------------------------------------------------------------------------------
// Per-connection and per-message state (no I/O)

/// One milter connection's state.
#[derive(Debug, Default)]
struct Session {
    /// Negotiated protocol options (which stages expect no reply).
    opts: ProtoOpts,
    client_ip: Option<IpAddr>,
    helo: String,
    /// The message in progress, from MAIL to end of message or abort.
    tx: Option<Transaction>,
}

impl Session {
    /// The reply for a stage we never act on.
    fn ack(&self, noreply: ProtoOpts) -> Step {
        if self.opts.contains(noreply) {
            Step::Quiet
        } else {
            Step::Send(Reply::Continue.encode())
        }
    }

    /// The reply for connect, HELO or MAIL: the blocklist's refusal if the stage answers and
    /// what was seen so far is listed, else as [`Session::ack`].
    fn verdict(&mut self, noreply: ProtoOpts, gate: &Gate) -> Step {
        if self.opts.contains(noreply) {
            return Step::Quiet;
        }
        let from = self.tx.as_ref().map(|t| t.env_from.as_str());
        let helo = (!self.helo.is_empty()).then_some(self.helo.as_str());
        let reply = match gate.refusal(self.client_ip, helo, from) {
            Some(r) => {
                self.tx = None;
                gate.reject(self.client_ip, &r)
            }
            None => Reply::Continue,
        };
        Step::Send(reply.encode())
    }

    /// The transaction in progress (an empty one if MAIL was not seen).
    fn tx(&mut self) -> &mut Transaction {
        self.tx.get_or_insert_with(Transaction::default)
    }

    /// Ends the transaction in progress and describes it; `queue_id` is the MTA's (`{i}`).
    fn arrival(&mut self, received_at_ms: i64, queue_id: Option<String>) -> Arrival {
        let tx = self.tx.take().unwrap_or_default();
        Arrival {
            origin: Origin::Milter,
            client_ip: self.client_ip,
            helo: self.helo.clone(),
            size: tx.size(),
            env_from: tx.env_from,
            rcpts: tx.rcpts,
            headers: tx.headers.finish(),
            received_at_ms,
            mta_queue_id: queue_id,
        }
    }
}

/// One message: envelope, the header fields we decode, and byte counts. The body is counted,
/// never kept.
#[derive(Debug, Default)]
struct Transaction {
    env_from: String,
    rcpts: Vec<String>,
    rcpts_dropped: usize,
    headers: HeaderCollector,
    header_bytes: u64,
    body_bytes: u64,
}

impl Transaction {
    fn new(env_from: String) -> Self {
        Self {
            env_from,
            ..Self::default()
        }
    }

    fn add_rcpt(&mut self, rcpt: String) {
        if self.rcpts.len() < MAX_RCPTS {
            self.rcpts.push(rcpt);
            return;
        }
        self.rcpts_dropped += 1;
        if self.rcpts_dropped == 1 {
            warn!(
                max = MAX_RCPTS,
                "too many recipients, the rest get no notice"
            );
        }
    }

    /// One header field as the MTA sends it (name, value without the CRLF).
    fn add_header(&mut self, name: &[u8], value: &[u8]) {
        let name = String::from_utf8_lossy(name);
        self.headers.add(&name, value);
        // "Name: value\r\n"
        let len = name.len() + value.len() + 4;
        self.header_bytes = self.header_bytes.saturating_add(len as u64);
    }

    fn add_body(&mut self, len: usize) {
        self.body_bytes = self.body_bytes.saturating_add(len as u64);
    }

    /// Approximate message size: header fields, the blank line, the body.
    fn size(&self) -> u64 {
        let blank = if self.header_bytes > 0 || self.body_bytes > 0 {
            2
        } else {
            0
        };
        self.header_bytes
            .saturating_add(blank)
            .saturating_add(self.body_bytes)
    }
}

/// An envelope path: `<a@b>` → `a@b`, `<>` → empty; lossy UTF-8, cut to [`MAX_NAME`].
fn path(arg: &[u8]) -> String {
    let s = String::from_utf8_lossy(arg);
    let s = s.trim();
    let s = s.strip_prefix('<').unwrap_or(s);
    let s = s.strip_suffix('>').unwrap_or(s);
    cut(s.trim(), MAX_NAME).to_owned()
}

fn lossy(v: &[u8], max: usize) -> String {
    cut(&String::from_utf8_lossy(v), max).to_owned()
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// Wire guard

/// Why the guard closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
enum FrameError {
    #[error("milter packet with zero length")]
    Empty,
    #[error(
        "milter packet of {0} bytes exceeds the {MAX_PACKET}-byte limit (not a milter client?)"
    )]
    Oversized(u32),
    #[error("unknown milter command {0:#04x}")]
    UnknownCommand(u8),
    #[error("milter command '{}' {why}", char::from(*.cmd))]
    OutOfOrder { cmd: u8, why: &'static str },
    #[error("more than {MAX_PRE_NEGOTIATION} bytes before option negotiation")]
    LongPreamble,
}

/// A bad packet: `valid` bytes of the input fed last precede it and may still be processed.
#[derive(Debug, PartialEq, Eq)]
struct Rejected {
    valid: usize,
    error: FrameError,
}

/// Follows the packet framing of the MTA's byte stream and rejects garbage, oversized packets,
/// unknown commands, anything before option negotiation, and transaction commands (RCPT,
/// DATA, header, body, end of message) outside a mail transaction. Inside a transaction the
/// session takes commands as they come (HELO or connect ends the transaction, as in
/// libmilter).
///
/// It also tells the connection where it stands: [`proven`](Self::proven) once option
/// negotiation has arrived whole (the connection may then take a session slot), and
/// [`in_packet`](Self::in_packet) between the first and the last byte of a packet (the command
/// timeout runs) as opposed to between packets (the idle timeout runs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct FrameGuard {
    head: [u8; 5],
    head_len: usize,
    payload_left: usize,
    /// Command of the packet being read (or last read).
    cmd: u8,
    /// Bytes announced by packet headers up to and including option negotiation.
    preamble: usize,
    /// Option negotiation's header has been accepted.
    negotiated: bool,
    /// Option negotiation has arrived whole.
    proven: bool,
    /// Packets that have arrived whole.
    packets: u64,
    in_tx: bool,
    quit: bool,
}

impl FrameGuard {
    /// Follows the next bytes of the stream.
    fn feed(&mut self, data: &[u8]) -> Result<(), Rejected> {
        let mut pos = 0;
        // Where in `data` the packet being read starts (0 if it started earlier).
        let mut packet_start = 0;
        while pos < data.len() {
            if self.payload_left > 0 {
                let take = self.payload_left.min(data.len() - pos);
                pos += take;
                self.payload_left -= take;
                if self.payload_left == 0 {
                    self.complete();
                    packet_start = pos;
                }
                continue;
            }
            self.head[self.head_len] = data[pos];
            self.head_len += 1;
            pos += 1;
            if self.head_len < self.head.len() {
                continue;
            }
            self.head_len = 0;
            let [a, b, c, d, cmd] = self.head;
            let len = u32::from_be_bytes([a, b, c, d]);
            self.check(len, cmd).map_err(|error| Rejected {
                valid: packet_start,
                error,
            })?;
            // check() ensures 1 <= len <= MAX_PACKET.
            self.cmd = cmd;
            self.payload_left = (len - 1) as usize;
            if self.payload_left == 0 {
                self.complete();
                packet_start = pos;
            }
        }
        Ok(())
    }

    /// Between the first and the last byte of a packet.
    #[cfg(test)]
    fn in_packet(&self) -> bool {
        self.head_len > 0 || self.payload_left > 0
    }

    /// The packet being read has arrived whole.
    fn complete(&mut self) {
        self.packets += 1;
        if self.cmd == b'O' {
            self.proven = true;
        }
    }

    fn check(&mut self, len: u32, cmd: u8) -> Result<(), FrameError> {
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > MAX_PACKET {
            return Err(FrameError::Oversized(len));
        }
        if !b"ABCDEHKLMNOQRTU".contains(&cmd) {
            return Err(FrameError::UnknownCommand(cmd));
        }
        let out_of_order = |why| Err(FrameError::OutOfOrder { cmd, why });
        if !self.negotiated {
            // Length field and packet: all of it is read before the connection is proven.
            self.preamble = self.preamble.saturating_add(len as usize + 4);
            if self.preamble > MAX_PRE_NEGOTIATION {
                return Err(FrameError::LongPreamble);
            }
            return match cmd {
                b'O' => {
                    self.negotiated = true;
                    Ok(())
                }
                b'D' => Ok(()),
                _ => out_of_order("before option negotiation"),
            };
        }
        match cmd {
            b'O' => out_of_order("repeats option negotiation"),
            b'M' => {
                self.in_tx = true;
                Ok(())
            }
            b'R' | b'T' | b'L' | b'N' | b'B' | b'E' if !self.in_tx => {
                out_of_order("outside a mail transaction")
            }
            b'E' | b'A' | b'C' | b'H' | b'K' => {
                self.in_tx = false;
                Ok(())
            }
            b'Q' => {
                self.in_tx = false;
                self.quit = true;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A milter connection's socket: TCP, or a Unix-domain socket for an MTA on the same host
/// (cheaper: no TCP handshake, acknowledgements or Nagle to work around per connection, and
/// Postfix opens one milter connection per SMTP session).
pub trait MilterStream: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// The same socket off any runtime, to move it to a session thread.
    type Std: Send + 'static;
    fn into_std(self) -> io::Result<Self::Std>;
    /// Back onto the current runtime.
    fn from_std(s: Self::Std) -> io::Result<Self>;
    /// Prepares a new connection (TCP: no Nagle delay on our replies).
    fn prepare(&self);
    /// Called after every read that returned data (TCP: an immediate ACK, see its impl).
    fn ack_now(&self);
}

impl MilterStream for TcpStream {
    type Std = std::net::TcpStream;

    fn into_std(self) -> io::Result<Self::Std> {
        TcpStream::into_std(self)
    }

    fn from_std(s: Self::Std) -> io::Result<Self> {
        TcpStream::from_std(s)
    }

    fn prepare(&self) {
        if let Err(e) = self.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY");
        }
    }

    /// Acknowledges what was just read at once (TCP_QUICKACK; Linux clears it again by itself, so
    /// it is set after every read).
    ///
    /// We negotiate no reply for most stages (NR_*), so Postfix writes several commands in a row
    /// without waiting for an answer, on a socket with Nagle's algorithm on: a small write waits
    /// until the previous one is acknowledged. Our kernel, which had seen us answer promptly
    /// (negotiation), delays that ACK by up to 40 ms for a reply to ride on, and no reply comes.
    /// A real Postfix 3.7 stalled this way on every message, between the envelope smtpd sends and
    /// the headers and body cleanup sends: docs/benchmarks.md, "Real MTAs".
    fn ack_now(&self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Err(e) = socket2::SockRef::from(self).set_tcp_quickack(true) {
            debug!(error = %e, "cannot set TCP_QUICKACK");
        }
    }
}

impl MilterStream for UnixStream {
    type Std = std::os::unix::net::UnixStream;

    fn into_std(self) -> io::Result<Self::Std> {
        UnixStream::into_std(self)
    }

    fn from_std(s: Self::Std) -> io::Result<Self> {
        UnixStream::from_std(s)
    }

    fn prepare(&self) {}

    fn ack_now(&self) {}
}

/// A listening socket the milter serves: TCP, or a Unix-domain socket.
pub trait MilterListener: Listen<Stream: MilterStream> + Sized {
    /// The same socket off any runtime, to move it to the milter's thread.
    type Std: Send + 'static;
    fn into_std(self) -> io::Result<Self::Std>;
    /// Back onto the current runtime.
    fn from_std(s: Self::Std) -> io::Result<Self>;
}

impl MilterListener for TcpListener {
    type Std = std::net::TcpListener;

    fn into_std(self) -> io::Result<Self::Std> {
        TcpListener::into_std(self)
    }

    fn from_std(s: Self::Std) -> io::Result<Self> {
        TcpListener::from_std(s)
    }
}

impl MilterListener for UnixListener {
    type Std = std::os::unix::net::UnixListener;

    fn into_std(self) -> io::Result<Self::Std> {
        UnixListener::into_std(self)
    }

    fn from_std(s: Self::Std) -> io::Result<Self> {
        UnixListener::from_std(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Config parsing

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn packet(cmd: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
        p.push(cmd);
        p.extend_from_slice(payload);
        p
    }

    /// A whole MTA side of a session: negotiation, two messages (one aborted), quit.
    fn session_bytes() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(packet(b'D', b"C{client_addr}\x00192.0.2.1\x00"));
        s.extend(packet(
            b'O',
            &[0, 0, 0, 6, 0, 0, 0, 0xff, 0, 0x1f, 0xff, 0xff],
        ));
        s.extend(packet(b'C', b"mx.example\x004\x00\x19192.0.2.1\x00"));
        s.extend(packet(b'H', b"mx.example\x00"));
        s.extend(packet(b'M', b"<a@example.org>\x00"));
        s.extend(packet(b'R', b"<b@example.com>\x00"));
        s.extend(packet(b'R', b"<c@example.com>\x00"));
        s.extend(packet(b'T', b""));
        s.extend(packet(b'L', b"Subject\x00hi\x00"));
        s.extend(packet(b'N', b""));
        s.extend(packet(b'B', &[b'x'; 300]));
        s.extend(packet(b'E', b""));
        s.extend(packet(b'M', b"<>\x00"));
        s.extend(packet(b'A', b""));
        s.extend(packet(b'U', b"NOOP\x00"));
        s.extend(packet(b'Q', b""));
        s
    }

    #[test]
    fn guard_follows_a_whole_session() {
        let mut g = FrameGuard::default();
        g.feed(&session_bytes()).unwrap();
        assert!(g.quit);
        assert!(!g.in_tx);
        assert_eq!((g.head_len, g.payload_left), (0, 0));
    }

    #[test]
    fn guard_same_result_at_every_split() {
        let bytes = session_bytes();
        for i in 0..=bytes.len() {
            let mut g = FrameGuard::default();
            g.feed(&bytes[..i]).unwrap();
            g.feed(&bytes[i..]).unwrap();
            assert!(g.quit, "split at {i}");
            assert_eq!((g.head_len, g.payload_left), (0, 0), "split at {i}");
        }
        let mut g = FrameGuard::default();
        for b in &bytes {
            g.feed(std::slice::from_ref(b)).unwrap();
        }
        assert!(g.quit);
    }

    #[test]
    fn guard_state_is_the_same_at_every_split() {
        let bytes = session_bytes();
        let mut whole = FrameGuard::default();
        whole.feed(&bytes).unwrap();
        for i in 0..=bytes.len() {
            // One piece up to i, against byte by byte up to i.
            let mut g = FrameGuard::default();
            g.feed(&bytes[..i]).unwrap();
            let mut bytewise = FrameGuard::default();
            for b in &bytes[..i] {
                bytewise.feed(std::slice::from_ref(b)).unwrap();
            }
            assert_eq!(g, bytewise, "state after {i} bytes");
            g.feed(&bytes[i..]).unwrap();
            assert_eq!(g, whole, "split at {i}");
        }
    }

    #[test]
    fn guard_tells_negotiation_and_packet_boundaries() {
        let macros = packet(b'D', b"C{client_addr}\x00192.0.2.1\x00");
        let optneg = packet(b'O', &[0, 0, 0, 6, 0, 0, 0, 0xff, 0, 0x1f, 0xff, 0xff]);
        let mut g = FrameGuard::default();
        assert!(!g.in_packet() && !g.proven && g.packets == 0);
        g.feed(&macros[..1]).unwrap();
        assert!(g.in_packet(), "one byte of a length field");
        g.feed(&macros[1..]).unwrap();
        assert!(!g.in_packet() && !g.proven && g.packets == 1);
        g.feed(&optneg[..5]).unwrap();
        assert!(g.in_packet() && !g.proven, "header only");
        g.feed(&optneg[5..optneg.len() - 1]).unwrap();
        assert!(g.in_packet() && !g.proven, "one byte short");
        g.feed(&optneg[optneg.len() - 1..]).unwrap();
        assert!(!g.in_packet() && g.proven && g.packets == 2);
        // A packet without payload is whole with its header.
        g.feed(&packet(b'A', b"")[..4]).unwrap();
        assert!(g.in_packet());
        g.feed(b"A").unwrap();
        assert!(!g.in_packet() && g.packets == 3);
    }

    #[test]
    fn guard_caps_what_comes_before_negotiation() {
        let macros = packet(b'D', &[b'x'; 30_000]);
        let mut g = FrameGuard::default();
        g.feed(&macros).unwrap();
        g.feed(&macros).unwrap();
        let e = g.feed(&macros).unwrap_err();
        assert_eq!(e.error, FrameError::LongPreamble);
        assert!(!g.proven);
        // After negotiation, only the packet limit applies.
        let mut g = FrameGuard::default();
        g.feed(&packet(b'O', &[0; 12])).unwrap();
        g.feed(&packet(b'M', b"<>\x00")).unwrap();
        for _ in 0..4 {
            g.feed(&packet(b'B', &[b'x'; 30_000])).unwrap();
        }
    }

    #[test]
    fn guard_rejects_garbage_and_oversized() {
        let mut g = FrameGuard::default();
        let e = g.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err();
        assert_eq!(e.valid, 0);
        assert!(matches!(e.error, FrameError::Oversized(0x4745_5420)));

        let mut g = FrameGuard::default();
        let mut bytes = packet(b'O', &[0; 12]);
        bytes.extend_from_slice(&(MAX_PACKET + 1).to_be_bytes());
        bytes.push(b'B');
        let e = g.feed(&bytes).unwrap_err();
        assert_eq!(e.error, FrameError::Oversized(MAX_PACKET + 1));
        assert_eq!(e.valid, 17, "the negotiation packet before it stays valid");

        let mut g = FrameGuard::default();
        assert_eq!(
            g.feed(&[0, 0, 0, 0, b'O']).unwrap_err().error,
            FrameError::Empty
        );

        let mut g = FrameGuard::default();
        assert_eq!(
            g.feed(&packet(b'Z', b"")).unwrap_err().error,
            FrameError::UnknownCommand(b'Z')
        );
    }

    #[test]
    fn guard_largest_packet_passes() {
        let mut g = FrameGuard::default();
        g.feed(&packet(b'O', &[0; 12])).unwrap();
        g.feed(&packet(b'M', b"<>\x00")).unwrap();
        g.feed(&MAX_PACKET.to_be_bytes()).unwrap();
        g.feed(b"B").unwrap();
        g.feed(&vec![0; MAX_PACKET as usize - 1]).unwrap();
        g.feed(&packet(b'E', b"")).unwrap();
    }

    #[test]
    fn guard_rejects_commands_out_of_order() {
        let mut g = FrameGuard::default();
        let e = g.feed(&packet(b'C', b"x\x00U")).unwrap_err();
        assert!(matches!(e.error, FrameError::OutOfOrder { cmd: b'C', .. }));

        let mut g = FrameGuard::default();
        g.feed(&packet(b'O', &[0; 12])).unwrap();
        let e = g.feed(&packet(b'R', b"<b@x>\x00")).unwrap_err();
        assert!(matches!(e.error, FrameError::OutOfOrder { cmd: b'R', .. }));
        assert_eq!(
            e.error.to_string(),
            "milter command 'R' outside a mail transaction"
        );

        // Body after the transaction was aborted.
        let mut g = FrameGuard::default();
        let mut bytes = packet(b'O', &[0; 12]);
        bytes.extend(packet(b'M', b"<>\x00"));
        bytes.extend(packet(b'A', b""));
        let valid = bytes.len();
        bytes.extend(packet(b'B', b"late"));
        let e = g.feed(&bytes).unwrap_err();
        assert_eq!(e.valid, valid);

        let mut g = FrameGuard::default();
        g.feed(&packet(b'O', &[0; 12])).unwrap();
        assert!(g.feed(&packet(b'O', &[0; 12])).is_err());
    }

    #[test]
    fn paths_lose_brackets() {
        assert_eq!(path(b"<a@example.org>"), "a@example.org");
        assert_eq!(path(b"<>"), "");
        assert_eq!(path(b" b@example.org "), "b@example.org");
        let long = format!("<{}>", "é".repeat(400));
        let p = path(long.as_bytes());
        assert!(p.len() <= MAX_NAME && p.chars().all(|c| c == 'é'));
    }

    #[test]
    fn client_addr_macro_forms() {
        assert_eq!(
            wire::parse_ip("192.0.2.7"),
            Some("192.0.2.7".parse().unwrap())
        );
        assert_eq!(
            wire::parse_ip("IPv6:2001:db8::1"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            wire::parse_ip("[2001:db8::2]"),
            Some("2001:db8::2".parse().unwrap())
        );
        assert_eq!(wire::parse_ip("unknown"), None);
        assert_eq!(wire::parse_ip(""), None);
    }

    #[test]
    fn tempfail_text_is_one_safe_line() {
        let t = tempfail_text(
            &MilterConfig::default().tempfail_reply,
            &IntakeError::Store("disk\r\nfull 100%".into()),
        );
        assert_eq!(
            t,
            "mailbell: cannot record the arrival notice (notice store unavailable: disk  full 100%%), try again later"
        );
        let t = tempfail_text("{error}", &IntakeError::Full("é".repeat(1000)));
        assert!(t.len() <= MAX_REPLY_TEXT);
        assert!(t.starts_with("notice store full: é") && t.ends_with('é'));
    }

    #[test]
    fn transaction_counts_and_caps() {
        let mut tx = Transaction::new("a@example.org".into());
        assert_eq!(tx.size(), 0);
        tx.add_header(b"Subject", b"hello");
        assert_eq!(tx.size(), "Subject: hello\r\n\r\n".len() as u64);
        tx.add_body(1000);
        tx.add_body(24);
        assert_eq!(tx.size(), "Subject: hello\r\n\r\n".len() as u64 + 1024);
        for i in 0..MAX_RCPTS + 5 {
            tx.add_rcpt(format!("r{i}@example.com"));
        }
        assert_eq!(tx.rcpts.len(), MAX_RCPTS);
        assert_eq!(tx.rcpts_dropped, 5);
    }

    #[test]
    fn arrival_ends_the_transaction() {
        let mut s = Session {
            client_ip: Some("192.0.2.9".parse().unwrap()),
            helo: "mx.example".into(),
            ..Session::default()
        };
        s.tx = Some(Transaction::new("a@example.org".into()));
        s.tx().add_rcpt("b@example.com".into());
        s.tx().add_header(b"Subject", b"=?UTF-8?B?5L2g5aW9?=");
        let a = s.arrival(42, Some("4XyZ1c2d3e".into()));
        assert_eq!(a.origin, Origin::Milter);
        assert_eq!(a.mta_queue_id.as_deref(), Some("4XyZ1c2d3e"));
        assert_eq!(a.env_from, "a@example.org");
        assert_eq!(a.rcpts, ["b@example.com"]);
        assert_eq!(a.headers.subject, "你好");
        assert_eq!(a.received_at_ms, 42);
        assert!(s.tx.is_none());
        let b = s.arrival(43, None);
        assert!(b.rcpts.is_empty() && b.env_from.is_empty() && b.headers.subject.is_empty());
        assert_eq!(b.helo, "mx.example");
    }

    #[test]
    fn negotiation_asks_only_for_what_is_offered() {
        let postfix = ProtoOpts::all();
        let got = wanted_opts(postfix);
        assert!(got.contains(ProtoOpts::NOREPLY_BODY | ProtoOpts::NOREPLY_HEADER));
        assert!(!got.intersects(
            ProtoOpts::NO_CONNECT
                | ProtoOpts::NO_HELO
                | ProtoOpts::NO_MAIL
                | ProtoOpts::NO_RCPT
                | ProtoOpts::NO_HEADER
                | ProtoOpts::NO_BODY
                | ProtoOpts::SKIP
        ));
        let stalwart = ProtoOpts::from_bits_retain(0x42);
        assert_eq!(wanted_opts(stalwart), ProtoOpts::NO_EOH);
        assert_eq!(wanted_opts(ProtoOpts::empty()), ProtoOpts::empty());
    }

    /// Feeds `packets` to a fresh [`Proto`]; returns each step.
    fn steps(proto: &mut Proto, packets: &[(u8, &[u8])]) -> Vec<Step> {
        let gate = Gate::none();
        packets
            .iter()
            .map(|(cmd, payload)| proto.on_command(Command::parse(*cmd, payload).unwrap(), &gate))
            .collect()
    }

    fn optneg_payload(version: u32, opts: ProtoOpts) -> Vec<u8> {
        [version, 0x1ff, opts.bits()]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect()
    }

    #[test]
    fn postfix_gets_no_reply_before_end_of_message() {
        let mut proto = Proto::default();
        let optneg = optneg_payload(6, ProtoOpts::all());
        let got = steps(
            &mut proto,
            &[
                (b'O', &optneg),
                (b'D', b"C{client_addr}\x00192.0.2.9\x00"),
                (b'C', b"mx.example\x00U"),
                (b'H', b"mx.example\x00"),
                (b'D', b"Mi\x00Q1\x00"),
                (b'M', b"<a@example.org>\x00"),
                (b'R', b"<b@example.com>\x00"),
                (b'L', b"Subject\x00hi\x00"),
                (b'B', b"body\r\n"),
                (b'D', b"Ei\x00Q2\x00"),
                (b'E', b""),
            ],
        );
        let opts = wanted_opts(ProtoOpts::all());
        assert_eq!(got[0], Step::Send(wire::optneg_reply(6, opts)));
        assert!(got[1..10].iter().all(|s| *s == Step::Quiet), "{got:?}");
        assert_eq!(got[10], Step::Eom);
        // No address in the connect packet: the macro's; the latest stage's queue id.
        assert_eq!(proto.session.client_ip, Some("192.0.2.9".parse().unwrap()));
        assert_eq!(proto.queue_id().as_deref(), Some("Q2"));
        let a = proto.session.arrival(0, proto.queue_id());
        assert_eq!(a.env_from, "a@example.org");
        assert_eq!(a.rcpts, ["b@example.com"]);
        assert_eq!(a.headers.subject, "hi");
        assert_eq!(a.size, "Subject: hi\r\n\r\nbody\r\n".len() as u64);
    }

    #[test]
    fn a_client_that_wants_replies_gets_continue_for_each_stage() {
        // Stalwart offers only NO_HELO | NO_EOH: every stage it sends is answered.
        let mut proto = Proto::default();
        let optneg = optneg_payload(6, ProtoOpts::from_bits_retain(0x42));
        let cont = Step::Send(Reply::Continue.encode());
        let got = steps(
            &mut proto,
            &[
                (b'O', &optneg),
                (b'C', b"mx\x004\x00\x19192.0.2.1\x00"),
                (b'M', b"<a@example.org>\x00"),
                (b'R', b"<b@example.com>\x00"),
                (b'T', b""),
                (b'L', b"Subject\x00x\x00"),
                (b'B', b"x"),
                (b'U', b"XYZZY\x00"),
            ],
        );
        assert_eq!(got[0], Step::Send(wire::optneg_reply(6, ProtoOpts::NO_EOH)));
        assert!(got[1..].iter().all(|s| *s == cont), "{got:?}");
        // An old MTA: the version we answer is its own.
        assert_eq!(
            steps(
                &mut Proto::default(),
                &[(b'O', &optneg_payload(2, ProtoOpts::empty()))]
            ),
            [Step::Send(wire::optneg_reply(2, ProtoOpts::empty()))]
        );
        assert_eq!(
            steps(
                &mut Proto::default(),
                &[(b'O', &optneg_payload(1, ProtoOpts::empty()))]
            ),
            [Step::Failed(WireError::Version(1))]
        );
    }

    #[test]
    fn stages_drop_later_macros_and_a_new_connection_drops_the_session() {
        let mut proto = Proto::default();
        let optneg = optneg_payload(6, ProtoOpts::all());
        steps(
            &mut proto,
            &[
                (b'O', &optneg),
                (b'C', b"mx\x004\x00\x19192.0.2.1\x00"),
                (b'D', b"Mi\x00OLD\x00"),
                (b'M', b"<a@example.org>\x00"),
                (b'D', b"Ei\x00OLDER-EOM\x00"),
                (b'A', b""),
            ],
        );
        assert!(proto.session.tx.is_none());
        // The next MAIL drops the end-of-message macros of the message before.
        steps(
            &mut proto,
            &[(b'D', b"Mi\x00NEW\x00"), (b'M', b"<c@example.org>\x00")],
        );
        assert_eq!(proto.queue_id().as_deref(), Some("NEW"));
        // HELO in the middle of a transaction ends it.
        steps(&mut proto, &[(b'H', b"again\x00")]);
        assert!(proto.session.tx.is_none());
        // QUIT_NC, then a new client: nothing of the old one is left.
        let got = steps(
            &mut proto,
            &[
                (b'K', b""),
                (b'C', b"other\x006\x00\x19IPv6:2001:db8::7\x00"),
            ],
        );
        assert_eq!(got, [Step::Quiet, Step::Quiet]);
        assert_eq!(
            proto.session.client_ip,
            Some("2001:db8::7".parse().unwrap())
        );
        assert!(proto.session.helo.is_empty());
        assert_eq!(proto.queue_id(), None);
        assert_eq!(steps(&mut proto, &[(b'Q', b"")]), [Step::Quit]);
    }

    #[test]
    fn config_defaults_and_toml() {
        let d = MilterConfig::default();
        assert_eq!(d.max_connections.get(), 100);
        assert_eq!(d.max_pending(), 200);
        assert_eq!(d.negotiate_timeout, Duration::from_secs(10));
        assert_eq!(d.command_timeout, Duration::from_secs(10));
        assert_eq!(d.timeout, Duration::from_secs(7210));
        let c: MilterConfig = toml::from_str(
            "max_pending = 50\nnegotiate_timeout = \"3s\"\ncommand_timeout = \"500ms\"\n",
        )
        .unwrap();
        assert_eq!(c.max_pending(), 50);
        assert_eq!(c.negotiate_timeout, Duration::from_secs(3));
        assert_eq!(c.command_timeout, Duration::from_millis(500));
        assert!(toml::from_str::<MilterConfig>("max_pending = 0").is_err());
        let c: MilterConfig = toml::from_str("max_connections = 8\ntimeout = \"5m\"\n").unwrap();
        assert_eq!(c.max_connections.get(), 8);
        assert_eq!(c.max_pending(), 16, "twice max_connections");
        assert_eq!(c.timeout, Duration::from_secs(300));
        assert_eq!(c.tempfail_reply, d.tempfail_reply);
        assert!(toml::from_str::<MilterConfig>("max_connections = 0").is_err());
        assert!(toml::from_str::<MilterConfig>("timeout = \"5 parsecs\"").is_err());
        assert!(toml::from_str::<MilterConfig>("max_conections = 8").is_err());
        assert!(d.threads() >= 1, "one per core by default");
        let c: MilterConfig = toml::from_str("threads = 3").unwrap();
        assert_eq!(c.threads(), 3);
        assert!(toml::from_str::<MilterConfig>("threads = 0").is_err());
    }

    /// New connections fill the first session thread (the caller's) up to SPILL_AT, then the
    /// next; once all are full, the least busy one; a closed connection frees its place.
    #[tokio::test]
    async fn session_threads_fill_the_first_thread_then_spill() {
        let threads = SessionThreads::start(2).unwrap();
        let live = |i: usize| threads.threads[i].live.load(Ordering::Relaxed);
        let mut places = Vec::new();
        for _ in 0..SPILL_AT {
            let (thread, place) = threads.pick();
            assert!(thread.is_none(), "the accepting runtime itself");
            places.push(place);
        }
        assert_eq!((live(0), live(1)), (SPILL_AT, 0));
        let (thread, place) = threads.pick();
        assert!(thread.is_some(), "the 33rd goes to the second thread");
        places.push(place);
        assert_eq!((live(0), live(1)), (SPILL_AT, 1));
        for _ in 0..SPILL_AT {
            places.push(threads.pick().1);
        }
        assert_eq!((live(0), live(1)), (SPILL_AT + 1, SPILL_AT));
        // Both full: the least busy takes the next.
        let extra = threads.pick().1;
        assert_eq!((live(0), live(1)), (SPILL_AT + 1, SPILL_AT + 1));
        drop(extra);
        // places[0] and places[1] are on the first thread.
        drop(places.swap_remove(1));
        drop(places.swap_remove(0));
        assert_eq!((live(0), live(1)), (SPILL_AT - 1, SPILL_AT));
        // A place freed on the first thread is taken again before the second gets more.
        let _again = threads.pick().1;
        assert_eq!((live(0), live(1)), (SPILL_AT, SPILL_AT));
    }

    /// A connection spilled to another session thread runs there.
    #[tokio::test]
    async fn spilled_sessions_run_on_their_own_thread() {
        let threads = SessionThreads::start(2).unwrap();
        let _kept: Vec<OnThread> = (0..SPILL_AT).map(|_| threads.pick().1).collect();
        let (thread, place) = threads.pick();
        let name = thread
            .unwrap()
            .spawn(async move {
                let _place = place;
                std::thread::current().name().map(str::to_owned)
            })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("milter-1"));
        assert_eq!(threads.threads[1].live.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn milter_families_follow_the_verdicts() {
        let stats = Arc::new(MilterStats::default());
        let empty = metrics::encode_one(stats.clone());
        assert!(
            empty.contains("mailbell_milter_messages_total 0\n"),
            "{empty}"
        );
        assert!(empty.contains("mailbell_milter_eom_duration_seconds_count 0\n"));
        stats.sessions.fetch_add(1, Ordering::Relaxed);
        stats.observe_eom(Duration::from_micros(300), false);
        stats.observe_eom(Duration::from_millis(20), true);
        stats.observe_eom(Duration::from_secs(3), false);
        let text = metrics::encode_one(stats);
        for line in [
            "# TYPE mailbell_milter_sessions_total counter\n",
            "mailbell_milter_sessions_total 1\n",
            "mailbell_milter_messages_total 3\n",
            "mailbell_milter_tempfails_total 1\n",
            "# TYPE mailbell_milter_eom_duration_seconds histogram\n",
            // Cumulative: 300 µs is in every bucket, 20 ms from 25 ms on, 3 s only in +Inf.
            "mailbell_milter_eom_duration_seconds_bucket{le=\"0.0005\"} 1\n",
            "mailbell_milter_eom_duration_seconds_bucket{le=\"0.01\"} 1\n",
            "mailbell_milter_eom_duration_seconds_bucket{le=\"0.025\"} 2\n",
            "mailbell_milter_eom_duration_seconds_bucket{le=\"2.5\"} 2\n",
            "mailbell_milter_eom_duration_seconds_bucket{le=\"+Inf\"} 3\n",
            "mailbell_milter_eom_duration_seconds_count 3\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert_eq!(text.matches("_bucket{").count(), EOM_BUCKETS.len() + 1);
        let sum: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("mailbell_milter_eom_duration_seconds_sum "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 3.0203).abs() < 1e-9, "{sum}");
    }
}
