//! The HTTP server behind every HTTP listener of both daemons (the Stalwart endpoints, the admin
//! API and the agent's status port): an [`Acceptor`] in front, hyper's HTTP/1 connection
//! behind, and a watchdog per connection so that no peer can hold a connection, a slot or a
//! descriptor for longer than the configured timeouts.
//!
//! ```text
//! accept ──► head ──► request (body, handler, response) ──► idle ──► head ──► …
//!            │         │ body: whole body within body_timeout  │
//!            │         │ response: no write progress for        │ idle_timeout from the end of
//!            │         │   write_timeout                        │ the response to the first
//!            │         │ handler: its own business              │ byte of the next request
//!            header_timeout from accept (first request) or from the first byte (later ones)
//! ```
//!
//! - **Slots.** Each connection holds one of the acceptor's `max_connections` slots, taken
//!   before `accept()`. It is *unproven* until the headers of its first request are complete:
//!   while unproven it can be evicted (oldest first) when a new connection finds every slot
//!   taken, so a flood of idle connections cannot lock a real client out. Once proven it keeps
//!   its slot until it closes, times out (at most `idle_timeout` after its last response) or the
//!   server shuts down; when every slot is held by proven connections, new connections wait in
//!   the listen backlog for one of them to finish.
//! - **Timeouts** are enforced by the watchdog, with tokio's clock (so tests can pause it).
//!   hyper's own `header_read_timeout` (hyper 1.x `proto/h1/conn.rs` `poll_read_head`) is armed
//!   whenever hyper waits for a request head, which includes the keep-alive wait after each
//!   response (`State::idle` sets `notify_read` so the head read, and its timer, start at once):
//!   one timer for both the idle wait and the next head. It is set here to
//!   `idle_timeout + header_timeout`, a backstop that never fires before the watchdog does.
//! - **`ConnectInfo<SocketAddr>`** is put into every request's extensions, as
//!   `into_make_service_with_connect_info` did.
//! - **Shutdown** (the `stop` token): the listener stops accepting; unproven connections close
//!   at once; the others finish their request in flight (hyper's graceful shutdown) for at most
//!   `shutdown_timeout`, then close.
//! - **Errors.** A connection's error ends that connection (logged at debug). Only a fatal
//!   [`ListenError`] from the acceptor ends [`serve`], after its connections have closed.
//!
//! Counters: the acceptor's [`ListenerStats`](crate::listen::ListenerStats) and
//! [`HttpStats`] (requests, timeouts by phase), both as Prometheus text.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, Instrument};

use crate::listen::{Accepted, Acceptor, Limits, ListenError};
use crate::units::de_duration;

/// One HTTP listener's settings (a `[http…]` table of a daemon's configuration).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Time allowed for a request's headers: from accept for the first request, from its first
    /// byte for the next ones on a kept-alive connection.
    #[serde(deserialize_with = "de_duration")]
    pub header_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// Time allowed to receive a whole request body, from the end of its headers.
    #[serde(deserialize_with = "de_duration")]
    pub body_timeout: Duration,
    /// A response that makes no write progress for this long (the client does not read) is
    /// abandoned and the connection closed.
    #[serde(deserialize_with = "de_duration")]
    pub write_timeout: Duration,
    /// At shutdown, time given to requests in flight before their connections are closed.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_timeout: Duration,
    /// Connections open at once (slots taken before accept). `None`: the listener's default.
    pub max_connections: Option<usize>,
    /// Most connections from one source address that have not completed a request yet
    /// (0: no per-source cap).
    pub max_per_source: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(15),
            body_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            max_connections: None,
            max_per_source: 0,
        }
    }
}

impl HttpConfig {
    /// The acceptor limits, with `default_max` when `max_connections` is not set.
    pub fn limits(&self, default_max: usize) -> Limits {
        Limits {
            max_pending: self.max_connections.unwrap_or(default_max).max(1),
            max_per_source: (self.max_per_source > 0).then_some(self.max_per_source),
        }
    }

    /// Checks that every timeout is above zero; `table` names the section in the error.
    pub fn validate(&self, table: &str) -> Result<(), String> {
        for (key, d) in [
            ("header_timeout", self.header_timeout),
            ("idle_timeout", self.idle_timeout),
            ("body_timeout", self.body_timeout),
            ("write_timeout", self.write_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{table}.{key} must be above zero"));
            }
        }
        if self.max_connections == Some(0) {
            return Err(format!("{table}.max_connections must be at least 1"));
        }
        Ok(())
    }
}

/// Per-listener HTTP counters (monotonic), beside the acceptor's [`ListenerStats`].
///
/// [`ListenerStats`]: crate::listen::ListenerStats
#[derive(Debug, Default)]
pub struct HttpStats {
    /// Requests whose headers were complete (handed to the router).
    pub requests: AtomicU64,
    /// Connections closed because a request's headers took longer than `header_timeout`.
    pub header_timeouts: AtomicU64,
    /// Kept-alive connections closed after `idle_timeout` without a request.
    pub idle_timeouts: AtomicU64,
    /// Connections closed because a request body took longer than `body_timeout`.
    pub body_timeouts: AtomicU64,
    /// Connections closed because a response made no progress for `write_timeout`.
    pub write_timeouts: AtomicU64,
}

/// Exposes the [`HttpStats`] of a daemon's HTTP listeners: `mailbell_http_requests_total` and
/// `mailbell_http_timeouts_total` by `phase`, a sample per listener. Nothing is written for no
/// listener.
#[derive(Debug, Clone, Default)]
pub struct HttpCollector {
    pub listeners: Vec<(&'static str, Arc<HttpStats>)>,
}

impl crate::metrics::Collector for HttpCollector {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        if self.listeners.is_empty() {
            return Ok(());
        }
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        crate::metrics::counter_family(
            &mut enc,
            "mailbell_http_requests_total",
            "HTTP requests received (headers complete).",
            self.listeners
                .iter()
                .map(|(l, s)| ([("listener", *l)], g(&s.requests))),
        )?;
        crate::metrics::counter_family(
            &mut enc,
            "mailbell_http_timeouts_total",
            "HTTP connections closed by a timeout, by phase.",
            self.listeners.iter().flat_map(|(l, s)| {
                [
                    ("header", &s.header_timeouts),
                    ("idle", &s.idle_timeouts),
                    ("body", &s.body_timeouts),
                    ("write", &s.write_timeouts),
                ]
                .map(|(phase, v)| ([("listener", *l), ("phase", phase)], g(v)))
            }),
        )
    }
}

/// Serves `router` on the connections `acceptor` hands out until `stop` is cancelled, then
/// shuts down gracefully (bounded by `cfg.shutdown_timeout`). Returns `Err` only when the
/// listening socket cannot go on (after its connections have closed).
pub async fn serve(
    mut acceptor: Acceptor,
    router: Router,
    cfg: HttpConfig,
    stats: Arc<HttpStats>,
    stop: CancellationToken,
) -> Result<(), ListenError> {
    let conns = TaskTracker::new();
    // Cancelled on `stop`, or when the listener fails: the connections wind down either way.
    let closing = stop.child_token();
    let cfg = Arc::new(cfg);
    let local = acceptor
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let result = loop {
        match acceptor.accept(&stop).await {
            Ok(Some(accepted)) => {
                let span = tracing::debug_span!("http", local = %local, peer = %accepted.peer);
                conns.spawn(
                    connection(
                        accepted,
                        router.clone(),
                        cfg.clone(),
                        stats.clone(),
                        closing.clone(),
                    )
                    .instrument(span),
                );
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    drop(acceptor);
    closing.cancel();
    conns.close();
    conns.wait().await;
    result
}

/// Why the watchdog closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    Header,
    Idle,
    Body,
    Write,
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Waiting for (the rest of) a request head since `since`.
    Head { since: Instant },
    /// A request is in hand (headers complete at `since`).
    Request { since: Instant },
    /// Between requests, since `since`.
    Idle { since: Instant },
}

struct Inner {
    phase: Phase,
    /// The request body has not ended (nor been dropped).
    body_open: bool,
    /// The handler answered; the response body is being written.
    writing: bool,
    /// A request head has been complete at least once.
    proven: bool,
    last_progress: Instant,
}

/// What the connection's IO, service and watchdog share.
struct ConnState {
    inner: Mutex<Inner>,
    changed: Notify,
}

impl ConnState {
    fn new(now: Instant) -> Self {
        Self {
            inner: Mutex::new(Inner {
                phase: Phase::Head { since: now },
                body_open: false,
                writing: false,
                proven: false,
                last_progress: now,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes moved (either way).
    fn progress(&self, read: bool) {
        let now = Instant::now();
        let mut s = self.lock();
        s.last_progress = now;
        if read {
            if let Phase::Idle { .. } = s.phase {
                s.phase = Phase::Head { since: now };
                drop(s);
                self.changed.notify_one();
            }
        }
    }

    fn request_started(&self, body_open: bool) {
        {
            let mut s = self.lock();
            s.phase = Phase::Request {
                since: Instant::now(),
            };
            s.body_open = body_open;
            s.writing = false;
            s.proven = true;
        }
        self.changed.notify_one();
    }

    fn body_done(&self) {
        self.lock().body_open = false;
        self.changed.notify_one();
    }

    fn responding(&self) {
        {
            let mut s = self.lock();
            s.writing = true;
            s.last_progress = Instant::now();
        }
        self.changed.notify_one();
    }

    fn response_done(&self) {
        {
            let mut s = self.lock();
            s.writing = false;
            s.body_open = false;
            s.phase = Phase::Idle {
                since: Instant::now(),
            };
        }
        self.changed.notify_one();
    }

    fn proven(&self) -> bool {
        self.lock().proven
    }

    fn in_head_of_first_request(&self) -> bool {
        let s = self.lock();
        !s.proven && matches!(s.phase, Phase::Head { .. })
    }

    /// The earliest deadline now in force, and what it is for.
    fn deadline(&self, cfg: &HttpConfig) -> Option<(Instant, Expiry)> {
        let s = self.lock();
        match s.phase {
            Phase::Head { since } => Some((since + cfg.header_timeout, Expiry::Header)),
            Phase::Idle { since } => Some((since + cfg.idle_timeout, Expiry::Idle)),
            Phase::Request { since } => {
                let body = s
                    .body_open
                    .then_some((since + cfg.body_timeout, Expiry::Body));
                let write = s
                    .writing
                    .then_some((s.last_progress + cfg.write_timeout, Expiry::Write));
                match (body, write) {
                    (Some(b), Some(w)) => Some(if b.0 <= w.0 { b } else { w }),
                    (b, w) => b.or(w),
                }
            }
        }
    }
}

/// Serves one connection until it ends, times out, is evicted or shut down.
async fn connection(
    accepted: Accepted,
    router: Router,
    cfg: Arc<HttpConfig>,
    stats: Arc<HttpStats>,
    stop: CancellationToken,
) {
    let Accepted {
        stream,
        peer,
        mut ticket,
    } = accepted;
    let _ = stream.set_nodelay(true);
    let state = Arc::new(ConnState::new(Instant::now()));
    let io = TokioIo::new(ProgressIo {
        inner: stream,
        state: state.clone(),
    });
    let service = ConnService {
        router: TowerToHyperService::new(router),
        peer,
        state: state.clone(),
        stats: stats.clone(),
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(cfg.idle_timeout + cfg.header_timeout);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut proven = false;
    let mut evict_seen = false;
    let mut shutdown_by: Option<Instant> = None;
    loop {
        if !proven && state.proven() {
            ticket.proven();
            proven = true;
        }
        let mut deadline = state.deadline(&cfg);
        if let Some(by) = shutdown_by {
            if deadline.is_none_or(|(d, _)| by < d) {
                deadline = Some((by, Expiry::Idle));
            }
        }
        let sleep_to = deadline.map(|(d, _)| d);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = ticket.evicted(), if !proven && !evict_seen => {
                evict_seen = true;
                if !state.proven() {
                    debug!("evicted to make room for a newer connection");
                    return;
                }
            }
            () = state.changed.notified() => {}
            () = sleep_until_opt(sleep_to) => {
                let now = Instant::now();
                let Some((at, why)) = deadline else { continue };
                if now < at {
                    continue;
                }
                if shutdown_by.is_some_and(|by| now >= by) {
                    debug!("still busy at the end of the shutdown grace period: closed");
                    return;
                }
                // The deadline may have moved (progress) since it was computed.
                match state.deadline(&cfg) {
                    Some((at, why2)) if at <= now && why2 == why => {}
                    _ => continue,
                }
                let counter = match why {
                    Expiry::Header => {
                        if !proven {
                            ticket.timed_out();
                        }
                        &stats.header_timeouts
                    }
                    Expiry::Idle => &stats.idle_timeouts,
                    Expiry::Body => &stats.body_timeouts,
                    Expiry::Write => &stats.write_timeouts,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                debug!(phase = ?why, "timed out: closed");
                return;
            }
            () = stop.cancelled(), if shutdown_by.is_none() => {
                if state.in_head_of_first_request() {
                    return;
                }
                conn.as_mut().graceful_shutdown();
                shutdown_by = Some(Instant::now() + cfg.shutdown_timeout);
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The router as hyper's service for one connection: marks the request's phases, adds
/// `ConnectInfo`.
struct ConnService {
    router: TowerToHyperService<Router>,
    peer: SocketAddr,
    state: Arc<ConnState>,
    stats: Arc<HttpStats>,
}

type ServiceFuture =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(ConnectInfo(self.peer));
        let open = !body.is_end_stream();
        self.state.request_started(open);
        let body = RequestBody {
            inner: body,
            state: self.state.clone(),
            open,
        };
        let fut = self.router.call(Request::from_parts(parts, body));
        let state = self.state.clone();
        Box::pin(async move {
            let resp = fut.await?;
            state.responding();
            Ok(resp.map(|inner| ResponseBody { inner, state }))
        })
    }
}

/// The request body, telling the watchdog when it has ended (or was dropped unread).
struct RequestBody {
    inner: Incoming,
    state: Arc<ConnState>,
    open: bool,
}

impl RequestBody {
    fn finish(&mut self) {
        if std::mem::take(&mut self.open) {
            self.state.body_done();
        }
    }
}

impl Body for RequestBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None | Some(Err(_)))) || self.inner.is_end_stream() {
            self.finish();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The response body, telling the watchdog when it has been handed over whole.
pub struct ResponseBody {
    inner: axum::body::Body,
    state: Arc<ConnState>,
}

impl Body for ResponseBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.state.response_done();
    }
}

/// The socket, noting every byte of progress for the watchdog.
struct ProgressIo {
    inner: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for ProgressIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.progress(true);
        }
        r
    }
}

impl AsyncWrite for ProgressIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.state.progress(false);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.state.progress(false);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::listen::ListenerStats;
    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    struct Server {
        addr: SocketAddr,
        listener: Arc<ListenerStats>,
        http: Arc<HttpStats>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), ListenError>>,
    }

    fn quick() -> HttpConfig {
        HttpConfig {
            header_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(3),
            body_timeout: Duration::from_secs(4),
            write_timeout: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(5),
            max_connections: Some(4),
            max_per_source: 0,
        }
    }

    async fn start(cfg: HttpConfig) -> Server {
        let router = Router::new()
            .route(
                "/peer",
                get(|ConnectInfo(p): ConnectInfo<SocketAddr>| async move { p.to_string() }),
            )
            .route(
                "/echo",
                post(|body: axum::body::Bytes| async move { body.len().to_string() }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    "done"
                }),
            );
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let listener = Arc::new(ListenerStats::default());
        let acceptor = Acceptor::new(
            l,
            cfg.limits(cfg.max_connections.unwrap_or(4)),
            "test",
            listener.clone(),
        );
        let http = Arc::new(HttpStats::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(acceptor, router, cfg, http.clone(), stop.clone()));
        Server {
            addr,
            listener,
            http,
            stop,
            task,
        }
    }

    /// Reads until EOF (or reset); returns what came. Fails if the server keeps it open for
    /// `within` (on the test's clock).
    async fn read_to_close(s: &mut TcpStream, within: Duration) -> Vec<u8> {
        let mut out = Vec::new();
        let r = tokio::time::timeout(within, async {
            let mut b = [0u8; 4096];
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => out.extend_from_slice(&b[..n]),
                }
            }
        })
        .await;
        assert!(r.is_ok(), "still open after {within:?}");
        out
    }

    /// Reads one response with a `content-length` (no close).
    async fn read_response(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let mut b = [0u8; 1024];
        loop {
            let n = s.read(&mut b).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&b[..n]);
            let text = String::from_utf8_lossy(&out).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if body.len() >= len {
                    return text;
                }
            }
        }
    }

    const GET_PEER: &[u8] = b"GET /peer HTTP/1.1\r\nHost: x\r\n\r\n";

    #[tokio::test(start_paused = true)]
    async fn a_dribbled_header_is_closed_at_the_header_timeout() {
        let srv = start(quick()).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        let started = Instant::now();
        let writer = async {
            for b in GET_PEER.iter().take(GET_PEER.len() - 1) {
                if s.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        // Dribbles for longer than the header timeout; the server closes in between.
        writer.await;
        read_to_close(&mut s, Duration::from_secs(1)).await;
        assert!(started.elapsed() >= Duration::from_secs(2));
        assert_eq!(srv.http.header_timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(srv.listener.timed_out.load(Ordering::Relaxed), 1);
        assert_eq!(srv.http.requests.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_at_the_header_timeout() {
        let srv = start(quick()).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        let started = Instant::now();
        read_to_close(&mut s, Duration::from_secs(10)).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(srv.http.header_timeouts.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_serves_then_idles_out() {
        let srv = start(quick()).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        let local = s.local_addr().unwrap();
        s.write_all(GET_PEER).await.unwrap();
        let r = read_response(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(
            r.ends_with(&local.to_string()),
            "ConnectInfo reaches the router: {r}"
        );
        // A second request on the same connection after a pause shorter than idle_timeout.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        s.write_all(GET_PEER).await.unwrap();
        assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
        let idle_from = Instant::now();
        read_to_close(&mut s, Duration::from_secs(10)).await;
        let took = idle_from.elapsed();
        assert!(
            took >= Duration::from_secs(3) && took < Duration::from_secs(4),
            "{took:?}"
        );
        assert_eq!(srv.http.idle_timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(srv.http.requests.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_header_after_idle_has_its_own_timeout() {
        let srv = start(quick()).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(GET_PEER).await.unwrap();
        read_response(&mut s).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The first byte of the next request ends the idle wait; the head then has 2 s.
        s.write_all(b"GET /pe").await.unwrap();
        let from = Instant::now();
        read_to_close(&mut s, Duration::from_secs(10)).await;
        let took = from.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(srv.http.header_timeouts.load(Ordering::Relaxed), 1);
        // A proven connection's header timeout is not an unproven one's.
        assert_eq!(srv.listener.timed_out.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dribbled_body_is_closed_at_the_body_timeout() {
        let srv = start(quick()).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            .await
            .unwrap();
        let from = Instant::now();
        for _ in 0..30 {
            if s.write_all(b"a").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        read_to_close(&mut s, Duration::from_secs(1)).await;
        assert!(from.elapsed() >= Duration::from_secs(4));
        assert_eq!(srv.http.body_timeouts.load(Ordering::Relaxed), 1);
        // A whole body is fine.
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            .await
            .unwrap();
        assert!(read_response(&mut s).await.ends_with("\r\n\r\n3"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_handler_is_not_a_timeout() {
        let srv = start(quick()).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(read_response(&mut s).await.ends_with("done"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_idle_connections_does_not_lock_out_a_request() {
        let srv = start(quick()).await;
        let mut idle = Vec::new();
        for _ in 0..12 {
            idle.push(TcpStream::connect(srv.addr).await.unwrap());
        }
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(GET_PEER).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(1), read_response(&mut s))
            .await
            .expect("served during the flood");
        assert!(r.starts_with("HTTP/1.1 200"));
        assert!(srv.listener.evicted.load(Ordering::Relaxed) >= 9);
        assert!(srv.listener.open.load(Ordering::Relaxed) <= 4);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_lets_a_request_in_flight_finish() {
        let srv = start(quick()).await;
        let mut busy = TcpStream::connect(srv.addr).await.unwrap();
        busy.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut unproven = TcpStream::connect(srv.addr).await.unwrap();
        // Let both be accepted and the request reach the handler.
        while srv.http.requests.load(Ordering::Relaxed) == 0
            || srv.listener.open.load(Ordering::Relaxed) < 2
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        srv.stop.cancel();
        read_to_close(&mut unproven, Duration::from_millis(100)).await;
        let r = read_to_close(&mut busy, Duration::from_secs(5)).await;
        assert!(String::from_utf8_lossy(&r).ends_with("done"));
        srv.task.await.unwrap().unwrap();
        assert!(TcpStream::connect(srv.addr).await.is_err());
    }

    #[test]
    fn config_parses_and_checks() {
        let c: HttpConfig = toml::from_str(
            "header_timeout = \"5s\"\nidle_timeout = 7\nmax_connections = 9\nmax_per_source = 2",
        )
        .unwrap();
        assert_eq!(c.header_timeout, Duration::from_secs(5));
        assert_eq!(c.idle_timeout, Duration::from_secs(7));
        assert_eq!(c.body_timeout, HttpConfig::default().body_timeout);
        assert_eq!(
            c.limits(100),
            Limits {
                max_pending: 9,
                max_per_source: Some(2)
            }
        );
        assert_eq!(HttpConfig::default().limits(100).max_pending, 100);
        assert!(toml::from_str::<HttpConfig>("nope = 1").is_err());
        let zero = HttpConfig {
            write_timeout: Duration::ZERO,
            ..HttpConfig::default()
        };
        assert!(zero
            .validate("http")
            .unwrap_err()
            .contains("http.write_timeout"));
    }

    #[test]
    fn http_families_follow_the_stats() {
        let a = Arc::new(HttpStats::default());
        let collector = HttpCollector {
            listeners: vec![("stalwart", a.clone()), ("admin", Arc::default())],
        };
        let before = crate::metrics::encode_one(collector.clone());
        assert!(before
            .contains("mailbell_http_timeouts_total{listener=\"stalwart\",phase=\"idle\"} 0\n"));
        a.idle_timeouts.store(3, Ordering::Relaxed);
        a.requests.store(5, Ordering::Relaxed);
        let out = crate::metrics::encode_one(collector);
        assert!(
            out.contains("mailbell_http_timeouts_total{listener=\"stalwart\",phase=\"idle\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("mailbell_http_timeouts_total{listener=\"admin\",phase=\"write\"} 0\n")
        );
        assert!(out.contains("mailbell_http_requests_total{listener=\"stalwart\"} 5\n"));
        assert_eq!(out.matches("# TYPE").count(), 2);
        assert!(crate::metrics::encode_one(HttpCollector::default()).is_empty());
    }
}
