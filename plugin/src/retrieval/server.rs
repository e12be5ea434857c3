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
//!
//! Each session counts into a [`Meter`] and leaves one record in the meter store
//! ([`super::metering`]): when it ends, or, with `sync = "per-session"`, when the backend
//! starts its QUIT/LOGOUT reply (before the reply is forwarded). While the store cannot write,
//! a login is refused at the command that names the account.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use mailbell_link::listen::{Acceptor, Limits, ListenerStats, Ticket};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use super::gate::{self, Gate, Verdict};
use super::greeting::{Greeting, GreetingError, Step as GreetingStep};
use super::imap::{self, ImapConfig, ImapSession};
use super::maildrop::{DropEvent, NoticeDrop};
use super::metering::{self, Meter};
use super::notice::{Balances, NoticeFacts};
use super::pipe::{Outbox, Reader};
use super::pop3::{self, Pop3Config, Pop3Session};
use super::proxy_v2::{Header, TlsInfo};
use crate::config::{backend_host, RetrievalConfig};
use crate::meter::{Login, MeterStore};
use crate::users::UserStore;

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
    /// The client side's TLS (certificates chosen by SNI, reloaded: [`super::certs`]).
    pub tls: TlsAcceptor,
    /// TLS to the backend, when `backend_tls` is on.
    pub backend_tls: Option<TlsConnector>,
    pub stats: Arc<RetrievalStats>,
    /// Where each session's record goes ([`metering`]).
    pub meter: MeterStore,
    /// The registry the gate reads (account state and networks) and watches for changes.
    pub users: UserStore,
    /// Where the payment notice's `{balance}` comes from (billing); `None`: empty.
    pub balances: Option<Arc<dyn Balances>>,
}

/// Totals over every ended session of all retrieval listeners (monotonic), added when a session
/// ends; each session's own record goes to the meter store.
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
    /// Logins the gate refused before the backend was asked: account unwelcome.
    pub refused_unwelcome: AtomicU64,
    /// ... client address outside the account's networks.
    pub refused_network: AtomicU64,
    /// Logins of accounts in arrears the backend accepted, answered with the payment notice
    /// (POP3 maildrop) or `NO [ALERT]` (IMAP).
    pub arrears_notices: AtomicU64,
    /// Live sessions ended because their account's state or networks changed.
    pub closed_by_change: AtomicU64,
    /// Listener certificates replaced by a new version of their files.
    pub cert_reloads: AtomicU64,
    /// New versions of certificate files that did not load (the old certificate stayed).
    pub cert_reload_failures: AtomicU64,
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
            (
                "mailbell_retrieval_cert_reloads_total",
                "Retrieval listener certificates replaced by a new version of their files.",
                &self.cert_reloads,
            ),
            (
                "mailbell_retrieval_cert_reload_failures_total",
                "New versions of retrieval certificate files that did not load (old one kept).",
                &self.cert_reload_failures,
            ),
        ] {
            mailbell_link::metrics::counter(&mut enc, name, help, v(c))?;
        }
        mailbell_link::metrics::counter_family(
            &mut enc,
            "mailbell_retrieval_logins_refused_total",
            "Logins the retrieval proxy answered itself by account gating, by reason \
             (unwelcome, network: refused before the backend was asked; arrears: the backend \
             accepted the password and the client got the payment notice).",
            [
                ("unwelcome", &self.refused_unwelcome),
                ("network", &self.refused_network),
                ("arrears", &self.arrears_notices),
            ]
            .map(|(reason, c)| ([("reason", reason)], v(c))),
        )?;
        mailbell_link::metrics::counter(
            &mut enc,
            "mailbell_retrieval_sessions_closed_by_change_total",
            "Live retrieval sessions closed because their account's state or networks changed.",
            v(&self.closed_by_change),
        )?;
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

/// One side's stream: plain TCP, or TLS over it (`T`: the server or client TLS stream).
enum Io<T> {
    Plain(TcpStream),
    Tls(Box<T>),
    /// Only while a handshake runs.
    Gone,
}

/// The client side: plain TCP, or TLS (implicit or after STLS/STARTTLS).
type ClientIo = Io<TlsStream<TcpStream>>;

/// The backend side: plain TCP, or TLS after the PROXY v2 header (`backend_tls`).
type BackendIo = Io<tokio_rustls::client::TlsStream<TcpStream>>;

impl<T: AsyncRead + Unpin> AsyncRead for Io<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Io<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Gone => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Gone => Poll::Ready(Ok(())),
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
    /// Message bytes retrieved (POP3 RETR/TOP, IMAP FETCH literals): one RETR/TOP reply or
    /// FETCH response, a message per section.
    Retrieved(Vec<crate::meter::Message>),
    /// End the session; `true`: tell the client why (the core's own reply came first otherwise).
    Close(String, bool),
    /// Nothing for the shell to do (boundaries, greetings, IDLE, QUIT/LOGOUT marks).
    Note,
    /// The backend's reply to QUIT/LOGOUT starts: its closing the connection next is the
    /// normal end, not a failure to report.
    Ending,
    /// A client command starts (keyword, upper case): a command boundary.
    Command(String),
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
        E::Command(c) => Act::Command(c.verb),
        E::Quit => Act::Note,
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
            Act::Retrieved(metering::pop3_message(r))
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
        E::Command { verb, .. } => Act::Command(verb),
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
            let bytes: u64 = f.sections.iter().map(|s| s.bytes).sum();
            debug!(mailbox = ?f.mailbox, seq = f.seq, uid = ?f.uid, bytes, complete = f.complete, "fetched");
            Act::Retrieved(metering::imap_messages(f))
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

    /// The backend is not in the middle of a reply: the proxy may add its last words.
    fn between_replies(&self) -> bool {
        match self {
            Core::Pop3(s) => s.between_replies(),
            Core::Imap(s) => s.between_replies(),
        }
    }

    /// The core's answer to the login being decided, in place of the backend's: POP3
    /// `-ERR [AUTH] text`, IMAP `<tag> NO [<imap_code>] text`; then the session ends.
    fn refuse_login(&mut self, imap_code: &str, text: &str) -> Vec<Act> {
        match self {
            Core::Pop3(s) => s.refuse_login(text).into_iter().map(pop3_client).collect(),
            Core::Imap(s) => s
                .refuse_login(imap_code, text)
                .into_iter()
                .map(imap_client)
                .collect(),
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

/// The proxy's words when the gate ends a live session: `-ERR [AUTH]` or `* BYE [ALERT]`.
fn gate_bye(imap: bool, text: &str) -> Vec<u8> {
    let text = super::line::one_line(text, 400);
    if imap {
        format!("* BYE [ALERT] {text}\r\n").into_bytes()
    } else {
        format!("-ERR [AUTH] {text}\r\n").into_bytes()
    }
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
    let mut meter = Meter::new(peer, kind.name(), imap);
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
    let backend_started = match connect_backend(backend_addr, shared, peer, local, tls_info).await {
        Ok(mut b) => match backend_greeting(&mut b, imap, cfg, stop).await {
            Ok(greeting) => Ok((b, greeting)),
            Err(reason) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), b.shutdown()).await;
                Err(reason)
            }
        },
        Err(e) => Err(format!("backend unavailable: {e}")),
    };
    let (mut backend, greeting) = match backend_started {
        Ok(b) => b,
        Err(reason) => {
            warn!(backend = %backend_addr, error = %reason, "backend unavailable");
            let words = bye(imap, "UNAVAILABLE", &reason);
            let _ = tokio::time::timeout(cfg.prelogin_timeout, async {
                client.write_all(&words).await?;
                client.shutdown().await
            })
            .await;
            meter.to_client += words.len() as u64;
            meter.store(&shared.meter, &reason).await;
            return;
        }
    };

    let plain = !kind.implicit_tls();
    let mut core = if imap {
        Core::Imap(Box::new(ImapSession::new(ImapConfig {
            tls: !plain,
            offer_starttls: plain,
            plaintext_login: cfg.allow_plaintext_login,
            pass_through_opaque: cfg.pass_through_opaque_sasl,
            ..ImapConfig::default()
        })))
    } else {
        Core::Pop3(Box::new(Pop3Session::new(Pop3Config {
            tls: !plain,
            offer_stls: plain,
            plaintext_login: cfg.allow_plaintext_login,
            pass_through_opaque: cfg.pass_through_opaque_sasl,
            ..Pop3Config::default()
        })))
    };

    let mut gate = Gate::new(shared.users.clone(), peer.ip());
    let mut end = relay(
        &mut client,
        &mut backend,
        greeting,
        &mut core,
        &mut meter,
        &mut ticket,
        &mut gate,
        kind,
        shared,
        stop,
    )
    .await;
    if let End::Notice(held) = end {
        end = serve_notice(
            &mut client,
            &mut backend,
            &mut gate,
            held,
            &mut meter,
            shared,
            stop,
        )
        .await;
    }
    // A reply cut short by the proxy's own end (a timeout, shutdown, a failed write) is
    // metered with what was relayed of it, as when the backend closes; and the proxy's words
    // are not put inside it (they would read as message lines, or as the rest of a literal).
    let mid_reply = !core.between_replies();
    for a in core.server_eof() {
        if let Act::Retrieved(messages) = a {
            meter.retrieved(&shared.meter, messages);
        }
    }
    let reason = match &end {
        End::Words(_, why) if mid_reply => format!("{why} (in the middle of a reply)"),
        End::Words(code, why) => {
            let words = bye(imap, code, why);
            if tokio::time::timeout(Duration::from_secs(5), client.write_all(&words))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                meter.to_client += words.len() as u64;
            }
            why.clone()
        }
        End::Gate(text) => {
            shared
                .stats
                .closed_by_change
                .fetch_add(1, Ordering::Relaxed);
            info!(
                account = gate.account().unwrap_or(""),
                "session closed: the account changed"
            );
            let words = gate_bye(imap, text);
            meter.to_client += words.len() as u64;
            let _ = tokio::time::timeout(Duration::from_secs(5), client.write_all(&words)).await;
            format!("account changed: {text}")
        }
        End::Quiet(why) | End::ClientGone(why) => why.clone(),
        End::Notice(_) => "payment notice".into(),
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
        session = %meter.session,
        end = %reason,
        "retrieval session ended"
    );
    meter.store(&shared.meter, &reason).await;
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

/// Connects to the backend within `connect_timeout`, writes the PROXY v2 header, then (with
/// `backend_tls`) runs the TLS handshake within `connect_timeout` too: the header goes first,
/// in clear, as haproxy's `send-proxy-v2 ssl` does and Dovecot's `haproxy = yes` TLS
/// listeners expect.
async fn connect_backend(
    addr: &str,
    shared: &Shared,
    peer: SocketAddr,
    local: SocketAddr,
    tls: Option<TlsInfo>,
) -> io::Result<BackendIo> {
    let cfg = &shared.cfg;
    let timed_out =
        |what: &str| io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"));
    let mut s = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| timed_out("connect"))??;
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
            .map_err(|_| timed_out("PROXY header write"))??;
    }
    let (Some(connector), Some(settings)) = (&shared.backend_tls, &cfg.backend_tls) else {
        return Ok(Io::Plain(s));
    };
    let name = settings
        .server_name
        .as_deref()
        .unwrap_or_else(|| backend_host(addr));
    let name = rustls::pki_types::ServerName::try_from(name.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls = tokio::time::timeout(cfg.connect_timeout, connector.connect(name, s))
        .await
        .map_err(|_| timed_out("TLS handshake"))?
        .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
    Ok(Io::Tls(Box::new(tls)))
}

/// Reads the backend's greeting within `connect_timeout` and, with `proxy_protocol` on, checks
/// with a command of the proxy's own that the backend took the PROXY header as a header
/// ([`Greeting`]), before any client byte goes to it. Returns the greeting (and any bytes after
/// the exchange) for the session core, or the reason the session cannot go on.
async fn backend_greeting(
    backend: &mut BackendIo,
    imap: bool,
    cfg: &RetrievalConfig,
    stop: &CancellationToken,
) -> Result<Vec<u8>, String> {
    let mut check = Greeting::new(imap, cfg.proxy_protocol);
    // Without the header, a backend that expects one waits for it, then gives up.
    let hint = if cfg.proxy_protocol {
        ""
    } else {
        " (proxy_protocol = false: does the backend expect a PROXY header?)"
    };
    let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
    let mut buf = vec![0u8; 4096];
    loop {
        let read = tokio::select! {
            () = stop.cancelled() => return Err("server shutting down".into()),
            r = tokio::time::timeout_at(deadline, backend.read(&mut buf)) => r,
        };
        let n = match read {
            Err(_) if check.greeted() => {
                return Err(format!(
                    "backend did not answer the proxy's check within {:?} of connecting",
                    cfg.connect_timeout
                ))
            }
            Err(_) => {
                return Err(format!(
                    "backend sent no greeting within {:?}{hint}",
                    cfg.connect_timeout
                ))
            }
            Ok(Err(e)) => return Err(format!("backend connection failed: {e}")),
            Ok(Ok(0)) => return Err(format!("{}{hint}", check.eof())),
            Ok(Ok(n)) => n,
        };
        match check.feed(buf.get(..n).unwrap_or_default()) {
            Ok(GreetingStep::More) => {}
            Ok(GreetingStep::SendProbe) => {
                let sent =
                    tokio::time::timeout_at(deadline, backend.write_all(check.probe_command()))
                        .await;
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(format!("backend write failed: {e}")),
                    Err(_) => return Err("backend write timed out".into()),
                }
            }
            Ok(GreetingStep::Ready { mut greeting, rest }) => {
                greeting.extend_from_slice(&rest);
                return Ok(greeting);
            }
            Err(e) => {
                if let GreetingError::ProxyHeaderRefused { answer } = &e {
                    warn!(answer = %answer, "the backend read the PROXY header as commands");
                }
                return Err(e.to_string());
            }
        }
    }
}

/// How a session ended: with words to the client (`-ERR` / `* BYE` code and reason) or quietly
/// (the client left, or the backend's own reply said it all).
enum End {
    Words(&'static str, String),
    Quiet(String),
    /// Writing to the client failed: nothing more is written to it.
    ClientGone(String),
    /// The gate ends the session: the account's state or networks changed.
    Gate(String),
    /// The backend accepted the POP3 login of an account in arrears: serve the payment notice
    /// (with the client bytes held behind the login).
    Notice(Vec<u8>),
}

/// The session's two streams and what waits to be written to each.
struct Pipes<'a> {
    client: &'a mut ClientIo,
    backend: &'a mut BackendIo,
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
    /// The user registry changed: the gate judges the account again.
    Changed,
    ClientWriteFailed(io::Error),
    BackendWriteFailed(io::Error),
}

/// Relays until the session ends, then writes what is still queued for the client (the core's
/// last reply) so that the caller's last words come after it.
#[allow(clippy::too_many_arguments)]
async fn relay(
    client: &mut ClientIo,
    backend: &mut BackendIo,
    greeting: Vec<u8>,
    core: &mut Core,
    meter: &mut Meter,
    ticket: &mut Place,
    gate: &mut Gate,
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
    let end = relay_loop(
        &mut pipes, greeting, core, meter, ticket, gate, kind, shared, stop,
    )
    .await;
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
/// after, counted from the last byte read or written either way. `greeting`: the backend's
/// first bytes, read by [`backend_greeting`], fed to the core first.
#[allow(clippy::too_many_arguments)]
async fn relay_loop(
    pipes: &mut Pipes<'_>,
    greeting: Vec<u8>,
    core: &mut Core,
    meter: &mut Meter,
    ticket: &mut Place,
    gate: &mut Gate,
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
    let mut greeting = Some(greeting).filter(|g| !g.is_empty());
    loop {
        if let Some(buf) = greeting.take() {
            let acts = core.server(&buf);
            let mut input = Some(buf);
            if let Some(end) =
                act(pipes, core, meter, ticket, gate, &acts, &mut input, shared).await
            {
                return end;
            }
            continue;
        }
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
            () = gate.changed() => Step::Changed,
            s = step => s,
        };
        let (acts, input) = match step {
            Step::Wrote => continue,
            Step::Changed => {
                gate.recheck(&cfg.texts);
                (Vec::new(), None)
            }
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
                let mid_reply = !core.between_replies();
                let acts = core.server_eof();
                if let Some(end) =
                    act(pipes, core, meter, ticket, gate, &acts, &mut None, shared).await
                {
                    return end;
                }
                if meter.ending || !client_open {
                    return End::Quiet("backend closed the connection".into());
                }
                if mid_reply {
                    // No words inside a reply (they would read as message lines, or as the
                    // rest of an IMAP literal): the client sees the reply cut short.
                    return End::Quiet(
                        "backend closed the connection in the middle of a reply".into(),
                    );
                }
                return End::Words("UNAVAILABLE", "backend closed the connection".into());
            }
            Step::Server(Err(e)) => {
                return End::Words("UNAVAILABLE", format!("backend connection failed: {e}"));
            }
            Step::Server(Ok(buf)) => (core.server(&buf), Some(buf)),
        };
        let mut input = input;
        if let Some(end) = act(pipes, core, meter, ticket, gate, &acts, &mut input, shared).await {
            return end;
        }
        if let Some(buf) = input {
            sreader.recycle(buf);
        }
        // A session whose account changed ends at the first point where the backend is not
        // in the middle of a reply: at once, IMAP IDLE included, or right after that reply.
        if let Some(text) = gate.closing() {
            if core.between_replies() {
                return End::Gate(text.to_owned());
            }
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
#[allow(clippy::too_many_arguments)]
async fn act(
    pipes: &mut Pipes<'_>,
    core: &mut Core,
    meter: &mut Meter,
    ticket: &mut Place,
    gate: &mut Gate,
    acts: &[Act],
    input: &mut Option<Vec<u8>>,
    shared: &Shared,
) -> Option<End> {
    // Writes the proxy makes itself around a login (not queued).
    let limit = shared.cfg.prelogin_timeout;
    let imap_listener = matches!(core, Core::Imap(_));
    let mut input_counted = false;
    let mut notice = None;
    for a in acts {
        match a {
            Act::ToBackend(b) => {
                match gate.hold(b) {
                    Some(Ok(())) => continue,
                    Some(Err(())) => {
                        return Some(End::Words(
                            "UNAVAILABLE",
                            "too many commands before the login was answered".into(),
                        ))
                    }
                    None => {}
                }
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
                if !input_counted {
                    meter.to_client += b.len() as u64;
                }
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
            Act::Account(login) => {
                let a = &shared.cfg.account_of(login);
                meter.account = Some(a.clone());
                if let Err(verdict) = gate.named(a) {
                    // Refused before the backend hears of the account or its password.
                    meter.login = Login::Refused;
                    let acts = refuse(core, gate, verdict, shared);
                    return Some(say(pipes, &acts, meter));
                }
                // No login goes on while its session could not be metered.
                if let Err(cause) = shared.meter.health() {
                    warn!(account = %a, error = %cause, "login refused: metering unavailable");
                    meter.login = Login::Refused;
                    let text = format!("metering unavailable: {cause}");
                    if !imap_listener {
                        return Some(End::Words("UNAVAILABLE", text));
                    }
                    let acts = core.refuse_login("UNAVAILABLE", &text);
                    let _ = say(pipes, &acts, meter);
                    return Some(End::Quiet(text));
                }
            }
            Act::Command(verb) => {
                // The command is answered with the reason instead of being forwarded (unless
                // a reply is being relayed: then the session ends right after it).
                if let Some(text) = gate.closing().filter(|_| core.between_replies()) {
                    return Some(End::Gate(text.to_owned()));
                }
                gate.command(verb, core.logged_in());
            }
            Act::LoggedIn(login) => {
                let account = &login.as_deref().map(|l| shared.cfg.account_of(l));
                meter.logged_in = true;
                meter.login = Login::Ok;
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
                // Judged again: the registry may have changed while the backend decided.
                match gate.logged_in(account.as_deref()) {
                    (Verdict::Pass, _) => {}
                    (Verdict::Arrears, held) if matches!(core, Core::Pop3(_)) => {
                        // The backend's +OK goes on (the acts after this one); then the
                        // proxy serves the notice.
                        shared.stats.arrears_notices.fetch_add(1, Ordering::Relaxed);
                        info!(
                            account = gate.account().unwrap_or(""),
                            "account in arrears: serving the payment notice"
                        );
                        notice = Some(held);
                    }
                    (verdict, _) => {
                        // IMAP in arrears, or unwelcome / outside the networks by now: the
                        // login is answered NO / -ERR instead of the backend's OK.
                        meter.login = Login::Refused;
                        let acts = refuse(core, gate, verdict, shared);
                        let end = say(pipes, &acts, meter);
                        if verdict == Verdict::Arrears {
                            pipes.to_client.push(b"* BYE Logging out\r\n".to_vec());
                            pipes.to_backend.push(b"ZZ LOGOUT\r\n".to_vec());
                            let _ = tokio::time::timeout(
                                limit,
                                pipes.to_backend.drain(&mut *pipes.backend),
                            )
                            .await;
                        }
                        return Some(end);
                    }
                }
            }
            Act::LoginFailed(account, reply) => {
                meter.login = Login::Refused;
                info!(account = account.as_deref().unwrap_or(""), reply = %reply, "login refused by the backend");
                let held = gate.login_failed();
                if !held.is_empty() {
                    meter.to_backend += held.len() as u64;
                    pipes.to_backend.push(held);
                }
            }
            Act::Retrieved(messages) => meter.retrieved(&shared.meter, messages.clone()),
            Act::Close(why, true) => return Some(End::Words("ALERT", why.clone())),
            Act::Close(why, false) => return Some(End::Quiet(why.clone())),
            Act::Ending => {
                meter.ending = true;
                if shared.meter.config().sync == crate::meter::Sync::PerSession {
                    // The record is durable before the client gets the reply; the chunk that
                    // starts it goes out next and is counted now.
                    meter.to_client += input.as_ref().map_or(0, Vec::len) as u64;
                    input_counted = true;
                    let end = if imap_listener { "logout" } else { "quit" };
                    meter.store(&shared.meter, end).await;
                }
            }
            Act::Note => {}
        }
    }
    notice.map(End::Notice)
}

/// The core's refusal of the login being decided, counted and logged.
fn refuse(core: &mut Core, gate: &Gate, verdict: Verdict, shared: &Shared) -> Vec<Act> {
    let texts = &shared.cfg.texts;
    let account = gate.account().unwrap_or("");
    let (code, counter) = match verdict {
        Verdict::Network => {
            warn!(account, client = %gate.client(), "login refused: client address outside the account's networks");
            ("AUTHORIZATIONFAILED", &shared.stats.refused_network)
        }
        Verdict::Arrears => ("ALERT", &shared.stats.arrears_notices),
        _ => {
            info!(account, client = %gate.client(), "login refused: account unwelcome");
            ("ALERT", &shared.stats.refused_unwelcome)
        }
    };
    counter.fetch_add(1, Ordering::Relaxed);
    core.refuse_login(code, gate::refusal_text(verdict, texts))
}

/// Queues the core's own replies (written before the session ends) and ends the session as
/// its Close says.
fn say(pipes: &mut Pipes<'_>, acts: &[Act], meter: &mut Meter) -> End {
    for a in acts {
        match a {
            Act::ToClient(b) => {
                meter.to_client += b.len() as u64;
                pipes.to_client.push(b.clone());
            }
            Act::Close(why, _) => return End::Quiet(why.clone()),
            _ => {}
        }
    }
    End::Quiet("login refused".into())
}

/// Serves the one-message maildrop of an account in arrears ([`NoticeDrop`]) after the backend
/// accepted its POP3 login: the backend session is ended with QUIT first (it never sees a
/// RETR or DELE), then the proxy answers every command itself until QUIT, the idle timeout, a
/// registry change or shutdown.
async fn serve_notice(
    client: &mut ClientIo,
    backend: &mut BackendIo,
    gate: &mut Gate,
    held: Vec<u8>,
    meter: &mut Meter,
    shared: &Shared,
    stop: &CancellationToken,
) -> End {
    let cfg = &shared.cfg;
    let _ = tokio::time::timeout(LINGER, async {
        backend.write_all(b"QUIT\r\n").await?;
        let mut sink = [0u8; 512];
        while backend.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
    let address = gate.account().unwrap_or_default().to_owned();
    let facts = NoticeFacts {
        balance: shared.balances.as_ref().and_then(|b| b.balance(&address)),
        address,
    };
    let now = chrono::Utc::now().timestamp();
    let notice = match cfg.notice.render(&facts, now) {
        Ok(n) => n,
        Err(e) => return End::Words("UNAVAILABLE", format!("cannot build the notice: {e}")),
    };
    let mut drop = NoticeDrop::new(notice.message, notice.uid);
    let mut buf = vec![0u8; 4096];
    let mut input = held;
    loop {
        for e in drop.client(&std::mem::take(&mut input)) {
            match e {
                DropEvent::Reply(b) => {
                    meter.to_client += b.len() as u64;
                    if let Err(e) = write(client, &b, cfg.pop3_idle_timeout).await {
                        return End::Quiet(format!("client write failed: {e}"));
                    }
                }
                DropEvent::End => return End::Quiet("client quit (payment notice)".into()),
            }
        }
        let n = tokio::select! {
            biased;
            () = stop.cancelled() => return End::Words("UNAVAILABLE", "server shutting down".into()),
            () = gate.changed() => {
                match gate.recheck(&cfg.texts) {
                    Some(text) => return End::Gate(text),
                    None => continue,
                }
            }
            () = tokio::time::sleep(cfg.pop3_idle_timeout) => {
                return End::Words("UNAVAILABLE", format!("no activity for {}s, closing", cfg.pop3_idle_timeout.as_secs()));
            }
            r = client.read(&mut buf) => r,
        };
        match n {
            Ok(0) | Err(_) => return End::Quiet("client closed the connection".into()),
            Ok(n) => input = buf.get(..n).unwrap_or_default().to_vec(),
        }
    }
}

async fn write<W: AsyncWrite + Unpin>(w: &mut W, b: &[u8], limit: Duration) -> io::Result<()> {
    match tokio::time::timeout(limit, w.write_all(b)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_counters_are_exposed_by_reason() {
        let stats = RetrievalStats::default();
        stats.refused_network.fetch_add(2, Ordering::Relaxed);
        stats.arrears_notices.fetch_add(1, Ordering::Relaxed);
        stats.closed_by_change.fetch_add(3, Ordering::Relaxed);
        let text = mailbell_link::metrics::encode_one(stats);
        for line in [
            "mailbell_retrieval_logins_refused_total{reason=\"unwelcome\"} 0",
            "mailbell_retrieval_logins_refused_total{reason=\"network\"} 2",
            "mailbell_retrieval_logins_refused_total{reason=\"arrears\"} 1",
            "mailbell_retrieval_sessions_closed_by_change_total 3",
        ] {
            assert!(text.contains(line), "{line} not in {text}");
        }
    }

    #[test]
    fn gate_words_are_one_line() {
        assert_eq!(
            gate_bye(false, "closed\r\n+OK x"),
            b"-ERR [AUTH] closed+OK x\r\n"
        );
        assert_eq!(gate_bye(true, "pay"), b"* BYE [ALERT] pay\r\n");
    }

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
