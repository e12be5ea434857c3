//! The retrieval proxy's I/O shell: the POP3/IMAP listeners, the backend connection and the
//! loop that drives a sans-I/O session ([`super::pop3`], [`super::imap`]).
//!
//! One task per connection: accept (a slot of `max_connections` is taken before accept, by
//! [`Acceptor`]), implicit TLS where the listener says so, connect to the backend within
//! `connect_timeout` and write the PROXY v2 header first, then poll both reads and both pending
//! writes at once (bounded output queues, [`super::pipe`]) and act on the session's events in
//! order. Every wait has a deadline: the pre-login timeout until the backend accepted a login,
//! the protocol's idle timeout after. On shutdown every session ends with `-ERR` / `* BYE` and
//! a reason.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use mailbell_link::listen::{Acceptor, Limits, ListenerStats, Ticket};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use super::imap::{self, ImapConfig, ImapSession};
use super::pipe::{Outbox, Reader};
use super::pop3::{self, Pop3Config, Pop3Session};
use super::proxy_v2::{Header, TlsInfo};
use crate::config::RetrievalConfig;

/// Which protocol a listener speaks, and whether TLS starts at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Pop3,
    Pop3s,
    Imap,
    Imaps,
}

impl Listener {
    /// The listener's name in logs and `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Listener::Pop3 => "pop3",
            Listener::Pop3s => "pop3s",
            Listener::Imap => "imap",
            Listener::Imaps => "imaps",
        }
    }

    fn implicit_tls(self) -> bool {
        matches!(self, Listener::Pop3s | Listener::Imaps)
    }

    fn is_imap(self) -> bool {
        matches!(self, Listener::Imap | Listener::Imaps)
    }
}

/// How long the backend may take to answer and close after the client closed its side.
const LINGER: Duration = Duration::from_secs(10);

/// What every session of the proxy shares.
pub struct Shared {
    pub cfg: RetrievalConfig,
    pub tls: TlsAcceptor,
    pub stats: Arc<RetrievalStats>,
}

/// Totals over every ended session of all retrieval listeners (monotonic), added when a session
/// ends. The durable per-session meter store is a later step.
#[derive(Debug, Default)]
pub struct RetrievalStats {
    /// Sessions ended.
    pub sessions: AtomicU64,
    /// Sessions the backend logged in.
    pub logins: AtomicU64,
    /// Bytes relayed from the backend to clients (the proxy's own replies included).
    pub bytes_to_client: AtomicU64,
    /// Bytes of client commands forwarded to the backend.
    pub bytes_to_backend: AtomicU64,
    /// POP3 RETR/TOP replies and IMAP FETCH responses that carried message bytes.
    pub retrieved: AtomicU64,
    /// Their bytes as `docs/retrieval.md` defines them (POP3 `retr_bytes`, IMAP literal bytes).
    pub retrieved_bytes: AtomicU64,
}

/// The `mailbell_retrieval_*` families, read at scrape time.
impl mailbell_link::metrics::Collector for RetrievalStats {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (name, help, c) in [
            (
                "mailbell_retrieval_sessions_total",
                "Retrieval proxy sessions ended.",
                &self.sessions,
            ),
            (
                "mailbell_retrieval_logins_total",
                "Retrieval proxy sessions the backend logged in.",
                &self.logins,
            ),
            (
                "mailbell_retrieval_bytes_to_client_total",
                "Bytes the retrieval proxy sent to clients.",
                &self.bytes_to_client,
            ),
            (
                "mailbell_retrieval_bytes_to_backend_total",
                "Bytes of client commands the retrieval proxy forwarded to the backend.",
                &self.bytes_to_backend,
            ),
            (
                "mailbell_retrieval_messages_total",
                "POP3 RETR/TOP replies and IMAP FETCH responses that carried message bytes.",
                &self.retrieved,
            ),
            (
                "mailbell_retrieval_message_bytes_total",
                "Message bytes retrieved (POP3 retr_bytes, IMAP literal bytes; docs/retrieval.md).",
                &self.retrieved_bytes,
            ),
        ] {
            mailbell_link::metrics::counter(&mut enc, name, help, v(c))?;
        }
        Ok(())
    }
}

impl RetrievalStats {
    fn add(&self, m: &Meter) {
        let add = |c: &AtomicU64, v: u64| c.fetch_add(v, Ordering::Relaxed);
        add(&self.logins, u64::from(m.logged_in));
        add(&self.bytes_to_client, m.to_client);
        add(&self.bytes_to_backend, m.to_backend);
        add(&self.retrieved, m.retrieved);
        add(&self.retrieved_bytes, m.retrieved_bytes);
        add(&self.sessions, 1);
    }
}

/// Errors that end the accept loop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Listen(#[from] mailbell_link::listen::ListenError),
}

/// Accepts on `listener` until `stop`, one tracked task per connection; returns once every
/// session has ended.
pub async fn serve(
    listener: TcpListener,
    kind: Listener,
    shared: Arc<Shared>,
    stats: Arc<ListenerStats>,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    let limits = Limits {
        max_pending: shared.cfg.max_connections,
        max_per_source: None,
    };
    let mut acceptor = Acceptor::new(listener, limits, kind.name(), stats);
    // Logged-in sessions leave the pending pool for these slots.
    let slots = Arc::new(Semaphore::new(shared.cfg.max_connections));
    let sessions = TaskTracker::new();
    let result = loop {
        match acceptor.accept(&stop).await {
            Ok(Some(accepted)) => {
                let local = accepted.stream.local_addr().unwrap_or(accepted.peer);
                let span = info_span!("retrieval", proto = kind.name(), peer = %accepted.peer);
                let (shared, stop, slots) = (shared.clone(), stop.clone(), slots.clone());
                sessions.spawn(
                    async move {
                        let place = Place {
                            ticket: accepted.ticket,
                            slots,
                        };
                        connection(
                            accepted.stream,
                            accepted.peer,
                            local,
                            place,
                            kind,
                            &shared,
                            &stop,
                        )
                        .await;
                    }
                    .instrument(span),
                );
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.into()),
        }
    };
    sessions.close();
    sessions.wait().await;
    result
}

/// A connection's place: its acceptor ticket (a pending slot until login), and the listener's
/// session slots it moves to once the backend accepted its login.
struct Place {
    ticket: Ticket,
    slots: Arc<Semaphore>,
}

/// The client side: plain TCP, or TLS (implicit or after STLS/STARTTLS).
enum ClientIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while the handshake runs.
    Gone,
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ClientIo::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ClientIo::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ClientIo::Gone => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ClientIo::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// A session event in the shell's terms, the same for both protocols.
#[derive(Debug)]
enum Act {
    ToBackend(Vec<u8>),
    ToClient(Vec<u8>),
    /// The backend chunk just fed goes to the client unchanged.
    InputToClient,
    StartTls,
    Account(String),
    LoggedIn(Option<String>),
    LoginFailed(Option<String>, String),
    /// Message bytes retrieved (POP3 RETR/TOP, IMAP FETCH literals).
    Retrieved(u64),
    /// End the session; `true`: tell the client why (the core's own reply came first otherwise).
    Close(String, bool),
    /// Nothing for the shell to do (boundaries, greetings, IDLE, QUIT/LOGOUT marks).
    Note,
    /// The backend's reply to QUIT/LOGOUT starts: its closing the connection next is the
    /// normal end, not a failure to report.
    Ending,
}

/// The two sessions behind one face.
enum Core {
    Pop3(Box<Pop3Session>),
    Imap(Box<ImapSession>),
}

fn pop3_client(e: pop3::ClientEvent) -> Act {
    use pop3::ClientEvent as E;
    match e {
        E::Forward(b) => Act::ToBackend(b),
        E::Reply(b) => Act::ToClient(b),
        E::StartTls => Act::StartTls,
        E::Account(a) => Act::Account(a),
        E::Close(e) => Act::Close(e.to_string(), false),
        E::Refused(e) => {
            debug!(error = %e, "client input refused");
            Act::Note
        }
        E::Command(_) | E::Quit => Act::Note,
    }
}

fn pop3_server(e: pop3::ServerEvent) -> Act {
    use pop3::ServerEvent as E;
    match e {
        E::Forward(b) => Act::ToClient(b),
        E::ForwardInput => Act::InputToClient,
        E::LoggedIn { account } => Act::LoggedIn(account),
        E::LoginFailed { account, reply } => Act::LoginFailed(account, reply),
        E::Retrieved(r) => {
            debug!(msg = r.msg, uid = ?r.uid, bytes = r.bytes, complete = r.complete, "retrieved");
            Act::Retrieved(r.bytes)
        }
        E::Close(e) => Act::Close(e.to_string(), true),
        E::QuitReply => Act::Ending,
        E::Greeting { .. } => Act::Note,
    }
}

fn imap_client(e: imap::ClientEvent) -> Act {
    use imap::ClientEvent as E;
    match e {
        E::Forward(b) => Act::ToBackend(b),
        E::Reply(b) => Act::ToClient(b),
        E::StartTls => Act::StartTls,
        E::Account(a) => Act::Account(a),
        E::Close(e) => Act::Close(e.to_string(), false),
        E::Refused(e) => {
            debug!(error = %e, "client input refused");
            Act::Note
        }
        _ => Act::Note,
    }
}

fn imap_server(e: imap::ServerEvent) -> Act {
    use imap::ServerEvent as E;
    match e {
        E::Forward(b) => Act::ToClient(b),
        E::ForwardInput => Act::InputToClient,
        E::LoggedIn { account } => Act::LoggedIn(account),
        E::LoginFailed { account, reply } => Act::LoginFailed(account, reply),
        E::Fetched(f) => {
            let bytes = f.sections.iter().map(|s| s.bytes).sum();
            debug!(mailbox = ?f.mailbox, seq = f.seq, uid = ?f.uid, bytes, complete = f.complete, "fetched");
            Act::Retrieved(bytes)
        }
        E::Close(e) => Act::Close(e.to_string(), true),
        E::LogoutReply => Act::Ending,
        E::Greeting { .. } => Act::Note,
    }
}

impl Core {
    fn client(&mut self, data: &[u8]) -> Vec<Act> {
        match self {
            Core::Pop3(s) => s.client(data).into_iter().map(pop3_client).collect(),
            Core::Imap(s) => s.client(data).into_iter().map(imap_client).collect(),
        }
    }

    fn server(&mut self, data: &[u8]) -> Vec<Act> {
        match self {
            Core::Pop3(s) => s.server(data).into_iter().map(pop3_server).collect(),
            Core::Imap(s) => s.server(data).into_iter().map(imap_server).collect(),
        }
    }

    fn client_eof(&mut self) -> Vec<Act> {
        match self {
            Core::Pop3(s) => s.client_eof().into_iter().map(pop3_client).collect(),
            Core::Imap(s) => s.client_eof().into_iter().map(imap_client).collect(),
        }
    }

    fn server_eof(&mut self) -> Vec<Act> {
        match self {
            Core::Pop3(s) => s.server_eof().into_iter().map(pop3_server).collect(),
            Core::Imap(s) => s.server_eof().into_iter().map(imap_server).collect(),
        }
    }

    fn tls_started(&mut self) {
        match self {
            Core::Pop3(s) => s.tls_started(),
            Core::Imap(s) => s.tls_started(),
        }
    }

    fn logged_in(&self) -> bool {
        match self {
            Core::Pop3(s) => s.is_logged_in(),
            Core::Imap(s) => s.is_logged_in(),
        }
    }
}

/// The proxy's own last words to a client: `-ERR` (POP3) or `* BYE` (IMAP), with a reason.
fn bye(imap: bool, code: &str, reason: &str) -> Vec<u8> {
    let reason: String = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    if imap {
        format!("* BYE [{code}] {reason}\r\n").into_bytes()
    } else {
        format!("-ERR [SYS/TEMP] {reason}\r\n").into_bytes()
    }
}

/// What one session did, logged when it ends (the durable meter store comes later).
#[derive(Debug, Default)]
struct Meter {
    account: Option<String>,
    logged_in: bool,
    tls: bool,
    /// Bytes from the backend relayed to the client, and the client's bytes to the backend.
    to_client: u64,
    to_backend: u64,
    /// Messages (POP3) or FETCH responses (IMAP) with message bytes, and their bytes.
    retrieved: u64,
    retrieved_bytes: u64,
    /// The backend is answering QUIT/LOGOUT.
    ending: bool,
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    mut ticket: Place,
    kind: Listener,
    shared: &Shared,
    stop: &CancellationToken,
) {
    let started = Instant::now();
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let cfg = &shared.cfg;
    let imap = kind.is_imap();
    let mut meter = Meter::default();
    let mut client = ClientIo::Plain(stream);
    let mut tls_info = None;
    if kind.implicit_tls() {
        let ClientIo::Plain(tcp) = client else {
            return;
        };
        let handshake = tokio::select! {
            () = stop.cancelled() => return,
            () = ticket.ticket.evicted() => {
                debug!("evicted during the TLS handshake");
                return;
            }
            r = tokio::time::timeout(cfg.prelogin_timeout, shared.tls.accept(tcp)) => r,
        };
        match handshake {
            Ok(Ok(tls)) => {
                tls_info = Some(tls_facts(&tls));
                client = ClientIo::Tls(Box::new(tls));
                meter.tls = true;
            }
            Ok(Err(e)) => {
                info!(error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                ticket.ticket.timed_out();
                info!("TLS handshake timed out");
                return;
            }
        }
    }

    if !kind.implicit_tls() && !cfg.allow_plaintext_login {
        // The header goes out before the client's STLS/STARTTLS, and the proxy lets no
        // credentials through before TLS: tell the backend the client is on TLS (PP2_CLIENT_SSL,
        // version unknown yet), so that its own plaintext-login refusal (Dovecot's default
        // disable_plaintext_auth = yes) does not refuse the logins the proxy let through.
        tls_info = Some(TlsInfo::default());
    }
    let backend_addr = if imap {
        &cfg.backend_imap
    } else {
        &cfg.backend_pop3
    };
    let mut backend = match connect_backend(backend_addr, cfg, peer, local, tls_info).await {
        Ok(b) => b,
        Err(e) => {
            warn!(backend = %backend_addr, error = %e, "backend unavailable");
            let words = bye(imap, "UNAVAILABLE", &format!("backend unavailable: {e}"));
            let _ = tokio::time::timeout(cfg.prelogin_timeout, async {
                client.write_all(&words).await?;
                client.shutdown().await
            })
            .await;
            return;
        }
    };

    let plain = !kind.implicit_tls();
    let mut core = if imap {
        Core::Imap(Box::new(ImapSession::new(ImapConfig {
            tls: !plain,
            offer_starttls: plain,
            plaintext_login: cfg.allow_plaintext_login,
            ..ImapConfig::default()
        })))
    } else {
        Core::Pop3(Box::new(Pop3Session::new(Pop3Config {
            tls: !plain,
            offer_stls: plain,
            plaintext_login: cfg.allow_plaintext_login,
            ..Pop3Config::default()
        })))
    };

    let end = relay(
        &mut client,
        &mut backend,
        &mut core,
        &mut meter,
        &mut ticket,
        kind,
        shared,
        stop,
    )
    .await;
    let reason = match &end {
        End::Words(code, why) => {
            let words = bye(imap, code, why);
            let _ = tokio::time::timeout(Duration::from_secs(5), client.write_all(&words)).await;
            why.clone()
        }
        End::Quiet(why) | End::ClientGone(why) => why.clone(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), backend.shutdown()).await;
    info!(
        account = meter.account.as_deref().unwrap_or(""),
        logged_in = meter.logged_in,
        tls = meter.tls,
        bytes_to_client = meter.to_client,
        bytes_to_backend = meter.to_backend,
        retrieved = meter.retrieved,
        retrieved_bytes = meter.retrieved_bytes,
        duration_ms = started.elapsed().as_millis() as u64,
        end = %reason,
        "retrieval session ended"
    );
    shared.stats.add(&meter);
    drop(ticket);
}

fn tls_facts(tls: &TlsStream<TcpStream>) -> TlsInfo {
    let (_, conn) = tls.get_ref();
    TlsInfo {
        version: conn.protocol_version().map(|v| match v {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_owned(),
            other => format!("{other:?}"),
        }),
        sni: conn.server_name().map(str::to_owned),
    }
}

/// Connects to the backend within `connect_timeout` and writes the PROXY v2 header.
async fn connect_backend(
    addr: &str,
    cfg: &RetrievalConfig,
    peer: SocketAddr,
    local: SocketAddr,
    tls: Option<TlsInfo>,
) -> io::Result<TcpStream> {
    let mut s = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    if cfg.proxy_protocol {
        let header = Header::Proxy {
            source: peer,
            destination: local,
            tls,
        }
        .to_bytes()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        tokio::time::timeout(cfg.connect_timeout, s.write_all(&header))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "PROXY header write timed out")
            })??;
    }
    Ok(s)
}

/// How a session ended: with words to the client (`-ERR` / `* BYE` code and reason) or quietly
/// (the client left, or the backend's own reply said it all).
enum End {
    Words(&'static str, String),
    Quiet(String),
    /// Writing to the client failed: nothing more is written to it.
    ClientGone(String),
}

/// The session's two streams and what waits to be written to each.
struct Pipes<'a> {
    client: &'a mut ClientIo,
    backend: &'a mut TcpStream,
    to_client: Outbox,
    to_backend: Outbox,
}

/// What one poll of both sides found.
enum Step {
    /// A client chunk (empty: end of stream).
    Client(io::Result<Vec<u8>>),
    /// A backend chunk (empty: end of stream).
    Server(io::Result<Vec<u8>>),
    /// Queued bytes went out, nothing was read.
    Wrote,
    ClientWriteFailed(io::Error),
    BackendWriteFailed(io::Error),
}

/// Relays until the session ends, then writes what is still queued for the client (the core's
/// last reply) so that the caller's last words come after it.
#[allow(clippy::too_many_arguments)]
async fn relay(
    client: &mut ClientIo,
    backend: &mut TcpStream,
    core: &mut Core,
    meter: &mut Meter,
    ticket: &mut Place,
    kind: Listener,
    shared: &Shared,
    stop: &CancellationToken,
) -> End {
    let mut pipes = Pipes {
        client,
        backend,
        to_client: Outbox::default(),
        to_backend: Outbox::default(),
    };
    let end = relay_loop(&mut pipes, core, meter, ticket, kind, shared, stop).await;
    if !matches!(end, End::ClientGone(_)) && !pipes.to_client.is_idle() {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            pipes.to_client.drain(&mut *pipes.client),
        )
        .await;
    }
    end
}

/// Polls both reads and both pending writes at once, one session core fed in order: a side is
/// read only while the queue its bytes go to has room ([`pipe`](super::pipe)). Every wait has
/// a deadline: the pre-login timeout until the backend accepted a login, the idle timeout
/// after, counted from the last byte read or written either way.
#[allow(clippy::too_many_arguments)]
async fn relay_loop(
    pipes: &mut Pipes<'_>,
    core: &mut Core,
    meter: &mut Meter,
    ticket: &mut Place,
    kind: Listener,
    shared: &Shared,
    stop: &CancellationToken,
) -> End {
    let cfg = &shared.cfg;
    let idle = if kind.is_imap() {
        cfg.imap_idle_timeout
    } else {
        cfg.pop3_idle_timeout
    };
    let mut creader = Reader::new(16 * 1024);
    let mut sreader = Reader::new(64 * 1024);
    let mut client_open = true;
    let mut backend_shut = false;
    // Which side is read first this time (the other when both have data).
    let mut server_first = true;
    loop {
        if !client_open && !backend_shut && pipes.to_backend.is_idle() {
            // Pass the client's end on; the backend answers what it still has, then closes.
            backend_shut = true;
            if tokio::time::timeout(LINGER, pipes.backend.shutdown())
                .await
                .is_err()
            {
                return End::Quiet("client closed the connection".into());
            }
        }
        let limit = match (client_open, core.logged_in()) {
            // The client has said all it will: its last replies may take this long.
            (false, _) => LINGER.min(idle),
            (true, true) => idle,
            (true, false) => cfg.prelogin_timeout,
        };
        server_first = !server_first;
        let step = std::future::poll_fn(|cx| {
            poll_step(
                pipes,
                &mut creader,
                &mut sreader,
                client_open,
                server_first,
                cx,
            )
        });
        let step = tokio::select! {
            biased;
            () = stop.cancelled() => return End::Words("UNAVAILABLE", "server shutting down".into()),
            () = ticket.ticket.evicted() => return End::Words("UNAVAILABLE", "too many connections".into()),
            () = tokio::time::sleep(limit) => {
                if !client_open {
                    return End::Quiet("backend did not finish after the client closed".into());
                }
                if !core.logged_in() {
                    ticket.ticket.timed_out();
                }
                return End::Words("UNAVAILABLE", format!("no activity for {}s, closing", limit.as_secs()));
            }
            s = step => s,
        };
        let (acts, input) = match step {
            Step::Wrote => continue,
            Step::ClientWriteFailed(e) => {
                return End::ClientGone(format!("client write failed: {e}"));
            }
            Step::BackendWriteFailed(e) => {
                return End::Words("UNAVAILABLE", format!("backend write failed: {e}"));
            }
            Step::Client(Ok(buf)) if !buf.is_empty() => {
                // Client chunks are never forwarded whole: the core says what goes on.
                let acts = core.client(&buf);
                creader.recycle(buf);
                (acts, None)
            }
            Step::Client(_) => {
                client_open = false;
                (core.client_eof(), None)
            }
            Step::Server(Ok(buf)) if buf.is_empty() => {
                let acts = core.server_eof();
                if let Some(end) = act(pipes, core, meter, ticket, &acts, &mut None, shared).await {
                    return end;
                }
                if meter.ending || !client_open {
                    return End::Quiet("backend closed the connection".into());
                }
                return End::Words("UNAVAILABLE", "backend closed the connection".into());
            }
            Step::Server(Err(e)) => {
                return End::Words("UNAVAILABLE", format!("backend connection failed: {e}"));
            }
            Step::Server(Ok(buf)) => (core.server(&buf), Some(buf)),
        };
        let mut input = input;
        if let Some(end) = act(pipes, core, meter, ticket, &acts, &mut input, shared).await {
            return end;
        }
        if let Some(buf) = input {
            sreader.recycle(buf);
        }
    }
}

/// One poll of the session's four directions: writes first (they free queue room), then the
/// reads whose queues have room, `server_first` or the client first.
fn poll_step(
    pipes: &mut Pipes<'_>,
    creader: &mut Reader,
    sreader: &mut Reader,
    client_open: bool,
    server_first: bool,
    cx: &mut std::task::Context<'_>,
) -> Poll<Step> {
    let wrote = match pipes.to_client.poll_drain(&mut *pipes.client, cx) {
        Ok(n) => n,
        Err(e) => return Poll::Ready(Step::ClientWriteFailed(e)),
    };
    let wrote = wrote
        + match pipes.to_backend.poll_drain(&mut *pipes.backend, cx) {
            Ok(n) => n,
            Err(e) => return Poll::Ready(Step::BackendWriteFailed(e)),
        };
    for server in [server_first, !server_first] {
        if server && pipes.to_client.has_room() {
            if let Poll::Ready(r) = sreader.poll_read(&mut *pipes.backend, cx) {
                return Poll::Ready(Step::Server(r));
            }
        }
        if !server && client_open && pipes.to_backend.has_room() {
            if let Poll::Ready(r) = creader.poll_read(&mut *pipes.client, cx) {
                return Poll::Ready(Step::Client(r));
            }
        }
    }
    if wrote > 0 {
        Poll::Ready(Step::Wrote)
    } else {
        Poll::Pending
    }
}

/// Acts on a session's events in order; `Some` ends the session. Bytes are queued
/// ([`Pipes`]); `input` is the backend chunk the events are about, moved to the client's
/// queue on [`Act::InputToClient`].
async fn act(
    pipes: &mut Pipes<'_>,
    core: &mut Core,
    meter: &mut Meter,
    ticket: &mut Place,
    acts: &[Act],
    input: &mut Option<Vec<u8>>,
    shared: &Shared,
) -> Option<End> {
    for a in acts {
        match a {
            Act::ToBackend(b) => {
                meter.to_backend += b.len() as u64;
                pipes.to_backend.push(b.clone());
            }
            Act::ToClient(b) => {
                meter.to_client += b.len() as u64;
                pipes.to_client.push(b.clone());
            }
            Act::InputToClient => {
                // The cores forward a chunk whole at most once.
                let Some(b) = input.take() else {
                    return Some(End::Words(
                        "UNAVAILABLE",
                        "internal error: a backend chunk forwarded twice".into(),
                    ));
                };
                meter.to_client += b.len() as u64;
                pipes.to_client.push(b);
            }
            Act::StartTls => {
                // The core's go-ahead reply goes out in plain text before the handshake.
                let flushed = tokio::time::timeout(
                    shared.cfg.prelogin_timeout,
                    pipes.to_client.drain(&mut *pipes.client),
                )
                .await;
                match flushed {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        return Some(End::ClientGone(format!("client write failed: {e}")))
                    }
                    Err(_) => return Some(End::Quiet("client write timed out".into())),
                }
                let ClientIo::Plain(tcp) = std::mem::replace(pipes.client, ClientIo::Gone) else {
                    return Some(End::Quiet("STARTTLS on a TLS connection".into()));
                };
                match tokio::time::timeout(shared.cfg.prelogin_timeout, shared.tls.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => {
                        *pipes.client = ClientIo::Tls(Box::new(tls));
                        core.tls_started();
                        meter.tls = true;
                    }
                    Ok(Err(e)) => return Some(End::Quiet(format!("TLS handshake failed: {e}"))),
                    Err(_) => return Some(End::Quiet("TLS handshake timed out".into())),
                }
            }
            Act::Account(a) => {
                // No gating yet: every account goes on to the backend, which decides.
                meter.account = Some(a.clone());
            }
            Act::LoggedIn(account) => {
                meter.logged_in = true;
                if account.is_some() {
                    meter.account.clone_from(account);
                }
                // The session leaves the pending pool (where it could be evicted) for a
                // session slot; the backend has already accepted the login, so a full house
                // ends it with a reason.
                let promoted = tokio::time::timeout(
                    shared.cfg.prelogin_timeout,
                    ticket.ticket.promote(ticket.slots.clone()),
                )
                .await;
                if !matches!(promoted, Ok(Ok(()))) {
                    return Some(End::Words("UNAVAILABLE", "too many sessions".into()));
                }
                info!(account = account.as_deref().unwrap_or(""), "logged in");
            }
            Act::LoginFailed(account, reply) => {
                info!(account = account.as_deref().unwrap_or(""), reply = %reply, "login refused by the backend");
            }
            Act::Retrieved(bytes) => {
                meter.retrieved += 1;
                meter.retrieved_bytes += bytes;
            }
            Act::Close(why, true) => return Some(End::Words("ALERT", why.clone())),
            Act::Close(why, false) => return Some(End::Quiet(why.clone())),
            Act::Ending => meter.ending = true,
            Act::Note => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_words_are_one_line_in_each_protocols_form() {
        assert_eq!(
            bye(false, "UNAVAILABLE", "backend unavailable: refused"),
            b"-ERR [SYS/TEMP] backend unavailable: refused\r\n"
        );
        assert_eq!(
            bye(true, "UNAVAILABLE", "server shutting down"),
            b"* BYE [UNAVAILABLE] server shutting down\r\n"
        );
        // A reason carrying CR/LF (an io::Error text, a backend line) cannot inject a line.
        let words = bye(true, "ALERT", "bad\r\na1 OK injected");
        assert_eq!(words, b"* BYE [ALERT] bada1 OK injected\r\n");
        assert_eq!(
            bye(false, "x", &"y".repeat(1000)).len(),
            "-ERR [SYS/TEMP] ".len() + 200 + 2
        );
    }
}
