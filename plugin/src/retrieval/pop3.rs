//! A POP3 session as the proxy sees it (RFC 1939, CAPA RFC 2449, AUTH RFC 5034).
//!
//! ```text
//! client -> proxy -> backend   commands, one per line, CRLF:  USER alice | PASS pw
//!                              | APOP alice digest | AUTH PLAIN [initial] | AUTH LOGIN [initial]
//!                              | CAPA | STLS | LIST [n] | UIDL [n] | RETR n | TOP n m | QUIT | ...
//!                              during AUTH: one base64 line per "+ " challenge, "*" cancels
//! backend -> proxy -> client   +OK ... / -ERR ...  ("+ challenge" during AUTH); after +OK the
//!                              replies to CAPA, LIST, UIDL, RETR, TOP (and bare AUTH) go on
//!                              with dot-stuffed lines up to a line holding only "."
//! ```
//!
//! **When the login is decided.** The account is learned from `USER`, `APOP`, or the first SASL
//! response of `AUTH PLAIN`/`AUTH LOGIN` ([`ClientEvent::Account`], before those bytes are
//! forwarded, so the shell can refuse an account before the backend is asked). The login
//! succeeds when the backend answers `+OK` to `PASS`, `APOP` or the final step of `AUTH`
//! ([`ServerEvent::LoggedIn`], before that `+OK` line is forwarded) and fails on `-ERR`.
//!
//! **What is rewritten.** Only the backend's reply to `CAPA` (and to a bare `AUTH`) before
//! login: SASL mechanisms the proxy cannot see through are removed unless configured to pass
//! through; `STLS` is removed, and added when the proxy offers it on a plaintext connection;
//! when plaintext logins are not allowed and the connection is not yet TLS, `USER` and the
//! PLAIN/LOGIN mechanisms are removed. `STLS` is answered by the proxy, never forwarded.
//!
//! **Metering.** See [`retr_bytes`].

use std::collections::VecDeque;

use super::line::{one_line, strip_eol, LineBuf};
use super::sasl::{self, Exchange, Mechanism};
use super::{POST_LOGIN_MAX_LINE, PRE_LOGIN_MAX};

/// The byte count of one RETR or TOP, given the complete multi-line reply as it came from the
/// backend: the `+OK` status line and the dot-stuffed message lines, CRLFs included, but not the
/// final `.` CRLF line. This is Dovecot's `retr_bytes` definition. `None` when `reply` is not a
/// complete positive multi-line reply.
///
/// ```text
/// +OK 12 octets\r\n      counted (15)
/// Hi\r\n                 counted (4)
/// ..dot\r\n              counted (7: the stuffing dot too, as sent)
/// .\r\n                  not counted
/// ```
pub fn retr_bytes(reply: &[u8]) -> Option<u64> {
    if !reply.starts_with(b"+OK") {
        return None;
    }
    let end = if reply.ends_with(b"\r\n.\r\n") || reply.ends_with(b"\n.\r\n") {
        reply.len() - 3
    } else if reply.ends_with(b"\n.\n") {
        reply.len() - 2
    } else {
        return None;
    };
    Some(end as u64)
}

/// What the proxy offers and allows on this connection.
#[derive(Clone, Debug)]
pub struct Pop3Config {
    /// The client connection is TLS already (port 995).
    pub tls: bool,
    /// The proxy offers `STLS` on a plaintext connection.
    pub offer_stls: bool,
    /// USER/PASS and AUTH PLAIN/LOGIN are allowed before TLS.
    pub plaintext_login: bool,
    /// SASL mechanisms the proxy cannot see through are advertised and passed through (the
    /// session is then logged in without a known account) instead of removed.
    pub pass_through_opaque: bool,
    /// Longest line before login, either direction.
    pub max_line: usize,
    /// Longest line after login: a client command, a backend status or UIDL line.
    pub max_line_after_login: usize,
    /// Most UIDs remembered from UIDL replies (each costs 8 bytes plus the UID, at most 70).
    pub max_uids: usize,
}

impl Default for Pop3Config {
    fn default() -> Self {
        Pop3Config {
            tls: false,
            offer_stls: true,
            plaintext_login: false,
            pass_through_opaque: false,
            max_line: PRE_LOGIN_MAX,
            max_line_after_login: POST_LOGIN_MAX_LINE,
            max_uids: 65_536,
        }
    }
}

/// Something in the byte stream the proxy cannot go on with: the session must end.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Pop3Error {
    #[error("client line longer than {0} bytes")]
    ClientLineTooLong(usize),
    #[error("backend line longer than {0} bytes")]
    BackendLineTooLong(usize),
    #[error("client closed the connection inside a command")]
    Truncated,
    #[error("more than {0} commands in flight")]
    TooManyCommands(usize),
    #[error("backend reply is neither +OK nor -ERR")]
    BackendGarbage,
    #[error("client sasl response refused: {0}")]
    Sasl(#[from] sasl::SaslError),
    #[error("login refused by the proxy: {0}")]
    LoginRefused(String),
}

/// What the shell does with what the client sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// Send these bytes to the backend.
    Forward(Vec<u8>),
    /// Answer the client with these bytes (the proxy's own reply).
    Reply(Vec<u8>),
    /// A client command starts here (a command boundary), before anything of it is forwarded
    /// or answered: the place to end a session whose account changed state, or to answer a
    /// command in the proxy's place.
    Command(Command),
    /// The client named this account: check it before acting on later events (they carry the
    /// command, and the password, to the backend). To refuse it, drop the later events and act
    /// on [`Pop3Session::refuse_login`] instead; the session assumes every account it reports
    /// and does not refuse goes on to the backend.
    Account(String),
    /// After sending the reply before it, start TLS and then call [`Pop3Session::tls_started`].
    /// Bytes the client sent after `STLS` were dropped (no command injection across the
    /// handshake).
    StartTls,
    /// The client sent QUIT (it is forwarded too).
    Quit,
    /// The proxy refused a client input and said so; the session goes on.
    Refused(Pop3Error),
    /// End the session after the replies before it.
    Close(Pop3Error),
}

/// A client command as the shell sees it. Arguments of the commands that carry credentials
/// (PASS, APOP, AUTH) are left out, so the event can be logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// The keyword, upper case (`RETR`).
    pub verb: String,
    /// At most two arguments (`["1"]`).
    pub args: Vec<String>,
}

impl Command {
    fn new(verb: &[u8], text: &[u8]) -> Command {
        let verb = String::from_utf8_lossy(verb).into_owned();
        let args = match verb.as_str() {
            "PASS" | "APOP" | "AUTH" => Vec::new(),
            _ => (1..3)
                .filter_map(|n| word(text, n))
                .map(|w| String::from_utf8_lossy(&w[..w.len().min(256)]).into_owned())
                .collect(),
        };
        Command { verb, args }
    }
}

/// What the shell does with what the backend sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// Send these bytes to the client.
    Forward(Vec<u8>),
    /// Send the whole chunk just fed to the client.
    ForwardInput,
    /// The backend's greeting (`ok` = `+OK`).
    Greeting { ok: bool },
    /// The backend accepted the login. `account` is `None` after a passed-through opaque SASL
    /// mechanism.
    LoggedIn { account: Option<String> },
    /// The backend refused the login with this status line.
    LoginFailed {
        account: Option<String>,
        reply: String,
    },
    /// A RETR or TOP reply ended (or the backend stream ended inside it).
    Retrieved(Retrieval),
    /// The reply to QUIT starts in this chunk: make the session record durable first.
    QuitReply,
    /// The backend broke the protocol: end the session.
    Close(Pop3Error),
}

/// One message retrieval, counted as [`retr_bytes`] defines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retrieval {
    /// The message number in the maildrop.
    pub msg: u32,
    /// `Some(lines)` for TOP, `None` for RETR.
    pub top_lines: Option<u32>,
    /// The UIDL of the message, when the session learned it.
    pub uid: Option<String>,
    pub bytes: u64,
    /// False when the backend stream ended before the final `.` line.
    pub complete: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmd {
    Greeting,
    User,
    Pass,
    Apop,
    Auth,
    AuthList,
    Capa,
    Retr(u32),
    Top(u32, u32),
    Uidl(Option<u32>),
    List(Option<u32>),
    Quit,
    Other,
}

impl Cmd {
    fn multi_line(self) -> bool {
        matches!(
            self,
            Cmd::AuthList
                | Cmd::Capa
                | Cmd::Retr(_)
                | Cmd::Top(..)
                | Cmd::Uidl(None)
                | Cmd::List(None)
        )
    }
}

/// UIDLs learned from the backend, packed: 8 bytes plus the UID per message. Later entries win.
#[derive(Debug, Default)]
struct UidTable {
    text: Vec<u8>,
    /// (message number, end of its UID in `text`)
    entries: Vec<(u32, u32)>,
}

impl UidTable {
    /// Keeps a UID that RFC 1939 allows: 1 to 70 characters 0x21 to 0x7E.
    fn insert(&mut self, msg: u32, uid: &[u8]) {
        if uid.is_empty() || uid.len() > 70 || !uid.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return;
        }
        self.text.extend_from_slice(uid);
        self.entries.push((msg, self.text.len() as u32));
    }

    fn get(&self, msg: u32) -> Option<&str> {
        let (i, &(_, end)) = self
            .entries
            .iter()
            .enumerate()
            .rev()
            .find(|(_, e)| e.0 == msg)?;
        let start = i.checked_sub(1).map_or(0, |p| self.entries[p].1);
        std::str::from_utf8(self.text.get(start as usize..end as usize)?).ok()
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Where the backend stream is inside a multi-line body (after login it is scanned, not stored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scan {
    LineStart,
    Dot,
    DotCr,
    Mid,
}

#[derive(Debug)]
struct Body {
    cmd: Cmd,
    scan: Scan,
    bytes: u64,
    pending: u64,
}

/// Both directions of one POP3 session.
#[derive(Debug)]
pub struct Pop3Session {
    cfg: Pop3Config,
    tls: bool,
    logged_in: bool,
    cline: LineBuf,
    sline: LineBuf,
    expect: VecDeque<Cmd>,
    /// The SASL exchange in progress (client lines are responses, not commands).
    sasl: Option<Exchange>,
    user: Option<String>,
    /// The user named for each PASS and APOP in flight, in order (a pipelined USER must not
    /// rename an earlier login).
    login_users: VecDeque<Option<String>>,
    account: Option<String>,
    /// A multi-line body being read; before login it is read line by line.
    body: Option<Body>,
    uids: UidTable,
}

/// Most commands forwarded and not yet answered (RFC 2449 PIPELINING): the proxy remembers one
/// entry per command to know which replies are multi-line.
pub const MAX_PIPELINE: usize = 1024;

const STLS_OK: &[u8] = b"+OK Begin TLS negotiation\r\n";
const NO_PLAINTEXT: &[u8] =
    b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n";
const NO_MECH: &[u8] = b"-ERR [AUTH] Unsupported authentication mechanism.\r\n";

fn word(text: &[u8], n: usize) -> Option<&[u8]> {
    text.split(|b| *b == b' ').filter(|w| !w.is_empty()).nth(n)
}

fn number(word: Option<&[u8]>) -> Option<u32> {
    std::str::from_utf8(word?).ok()?.parse().ok()
}

impl Pop3Session {
    pub fn new(cfg: Pop3Config) -> Pop3Session {
        Pop3Session {
            tls: cfg.tls,
            logged_in: false,
            cline: LineBuf::new(cfg.max_line),
            sline: LineBuf::new(cfg.max_line),
            expect: VecDeque::from([Cmd::Greeting]),
            sasl: None,
            user: None,
            login_users: VecDeque::new(),
            account: None,
            body: None,
            uids: UidTable::default(),
            cfg,
        }
    }

    /// The account of a logged-in session (`None` before login or after opaque SASL).
    pub fn account(&self) -> Option<&str> {
        self.account.as_deref()
    }

    pub fn is_logged_in(&self) -> bool {
        self.logged_in
    }

    /// The UIDL of message `msg`, when a UIDL reply told it.
    pub fn uid(&self, msg: u32) -> Option<&str> {
        self.uids.get(msg)
    }

    /// The TLS handshake after `STLS` succeeded.
    pub fn tls_started(&mut self) {
        self.tls = true;
    }

    /// Refuses the login whose [`ClientEvent::Account`] was just reported, instead of acting on
    /// the events after it: `-ERR [AUTH] <text>` (RFC 3206), then the session ends (the
    /// backend never heard of the account; whatever the client pipelined after it is dropped).
    pub fn refuse_login(&mut self, text: &str) -> Vec<ClientEvent> {
        let text = one_line(text, 200);
        self.cline.take();
        vec![
            ClientEvent::Reply(format!("-ERR [AUTH] {text}\r\n").into_bytes()),
            ClientEvent::Close(Pop3Error::LoginRefused(text)),
        ]
    }

    /// The backend is not in the middle of a reply (none started, or the last one is complete):
    /// the proxy may add a line of its own here, such as a last `-ERR`, without cutting a reply
    /// short. Commands may still await their replies; the client takes the proxy's line for the
    /// reply to the oldest.
    pub fn between_replies(&self) -> bool {
        self.sline.is_empty() && self.body.is_none()
    }

    fn plaintext_ok(&self) -> bool {
        self.tls || self.cfg.plaintext_login
    }

    /// Feeds bytes from the client.
    pub fn client(&mut self, data: &[u8]) -> Vec<ClientEvent> {
        let mut ev = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let (took, done) = self.cline.push(&data[at..]);
            at += took;
            if self.cline.overflowed() {
                let err = Pop3Error::ClientLineTooLong(self.cline_cap());
                ev.push(ClientEvent::Reply(b"-ERR Line too long\r\n".to_vec()));
                ev.push(ClientEvent::Close(err));
                return ev;
            }
            if !done {
                break;
            }
            let line = self.cline.take().head;
            if self.command(line, &mut ev) {
                // STLS (whatever followed in this chunk is dropped) or the session ends.
                self.cline.take();
                break;
            }
        }
        ev
    }

    fn cline_cap(&self) -> usize {
        if self.logged_in {
            self.cfg.max_line_after_login
        } else {
            self.cfg.max_line
        }
    }

    /// One complete client line. Returns true after STLS or a Close.
    fn command(&mut self, line: Vec<u8>, ev: &mut Vec<ClientEvent>) -> bool {
        let text = strip_eol(&line);
        // SASL responses until the exchange has all it needs; the final reply ends it.
        if let Some(exchange) = self.sasl.as_mut().filter(|x| !x.is_done()) {
            if text == b"*" {
                ev.push(ClientEvent::Forward(line));
                return false;
            }
            match exchange.response(text) {
                Ok(Some(account)) => {
                    self.user = Some(account.clone());
                    ev.push(ClientEvent::Account(account));
                    ev.push(ClientEvent::Forward(line));
                }
                Ok(None) => ev.push(ClientEvent::Forward(line)),
                Err(err) => {
                    // Cancel the exchange: the backend's -ERR ends the login.
                    ev.push(ClientEvent::Refused(err.into()));
                    ev.push(ClientEvent::Forward(b"*\r\n".to_vec()));
                }
            }
            return false;
        }
        let verb = word(text, 0).unwrap_or_default().to_ascii_uppercase();
        let arg1 = word(text, 1);
        let before_login = !self.logged_in;
        ev.push(ClientEvent::Command(Command::new(&verb, text)));
        let cmd = match verb.as_slice() {
            b"STLS" if before_login && !self.tls && self.cfg.offer_stls => {
                ev.push(ClientEvent::Reply(STLS_OK.to_vec()));
                ev.push(ClientEvent::StartTls);
                return true;
            }
            b"STLS" => {
                ev.push(ClientEvent::Reply(b"-ERR STLS not available\r\n".to_vec()));
                return false;
            }
            b"USER" | b"PASS" if before_login && !self.plaintext_ok() => {
                ev.push(ClientEvent::Reply(NO_PLAINTEXT.to_vec()));
                return false;
            }
            b"USER" | b"APOP" if before_login => {
                // A name the proxy cannot read is refused, never forwarded unread.
                match sasl::account_name(arg1.unwrap_or_default()) {
                    Ok(name) => {
                        self.user = Some(name.clone());
                        ev.push(ClientEvent::Account(name));
                    }
                    Err(err) => {
                        self.user = None;
                        ev.push(ClientEvent::Reply(
                            b"-ERR [AUTH] Invalid user name\r\n".to_vec(),
                        ));
                        ev.push(ClientEvent::Refused(err.into()));
                        return false;
                    }
                }
                if verb == b"USER" {
                    Cmd::User
                } else {
                    Cmd::Apop
                }
            }
            b"PASS" if before_login => Cmd::Pass,
            b"AUTH" if before_login && arg1.is_none() => Cmd::AuthList,
            b"AUTH" if before_login => {
                let name = String::from_utf8_lossy(arg1.unwrap_or_default()).into_owned();
                let mechanism = Mechanism::parse(&name);
                if !mechanism.is_visible() && !self.cfg.pass_through_opaque {
                    ev.push(ClientEvent::Reply(NO_MECH.to_vec()));
                    return false;
                }
                if mechanism.is_visible() && !self.plaintext_ok() {
                    ev.push(ClientEvent::Reply(NO_PLAINTEXT.to_vec()));
                    return false;
                }
                self.user = None;
                let mut exchange = Exchange::new(mechanism);
                if let Some(initial) = word(text, 2) {
                    match exchange.response(initial) {
                        Ok(Some(account)) => {
                            self.user = Some(account.clone());
                            ev.push(ClientEvent::Account(account));
                        }
                        Ok(None) => {}
                        Err(err) => {
                            ev.push(ClientEvent::Reply(
                                b"-ERR [AUTH] Invalid base64 data in initial response\r\n".to_vec(),
                            ));
                            ev.push(ClientEvent::Refused(err.into()));
                            return false;
                        }
                    }
                }
                self.sasl = Some(exchange);
                Cmd::Auth
            }
            b"CAPA" => Cmd::Capa,
            b"RETR" => number(arg1).map_or(Cmd::Other, Cmd::Retr),
            b"TOP" => match (number(arg1), number(word(text, 2))) {
                (Some(n), Some(lines)) => Cmd::Top(n, lines),
                _ => Cmd::Other,
            },
            b"UIDL" => match arg1 {
                None => Cmd::Uidl(None),
                Some(_) => number(arg1).map_or(Cmd::Other, |n| Cmd::Uidl(Some(n))),
            },
            b"LIST" => match arg1 {
                None => Cmd::List(None),
                Some(_) => number(arg1).map_or(Cmd::Other, |n| Cmd::List(Some(n))),
            },
            b"QUIT" => {
                ev.push(ClientEvent::Quit);
                Cmd::Quit
            }
            _ => Cmd::Other,
        };
        if self.expect.len() >= MAX_PIPELINE {
            ev.push(ClientEvent::Reply(
                b"-ERR Too many commands in flight\r\n".to_vec(),
            ));
            ev.push(ClientEvent::Close(Pop3Error::TooManyCommands(MAX_PIPELINE)));
            return true;
        }
        if let Cmd::Pass | Cmd::Apop = cmd {
            self.login_users.push_back(self.user.clone());
        }
        self.expect.push_back(cmd);
        ev.push(ClientEvent::Forward(line));
        false
    }

    /// Feeds bytes from the backend.
    pub fn server(&mut self, data: &[u8]) -> Vec<ServerEvent> {
        let mut ev = Vec::new();
        let mut at = 0;
        let mut relay_from = self.logged_in.then_some(0);
        while at < data.len() {
            if self.logged_in {
                match self.relay(&data[at..], &mut ev) {
                    Ok(took) => at += took,
                    Err(err) => {
                        ev.push(ServerEvent::Close(err));
                        return ev;
                    }
                }
                continue;
            }
            let (took, done) = self.sline.push(&data[at..]);
            at += took;
            if self.sline.overflowed() {
                ev.push(ServerEvent::Close(Pop3Error::BackendLineTooLong(
                    self.cfg.max_line,
                )));
                return ev;
            }
            if done {
                let line = self.sline.take().head;
                if let Err(err) = self.server_line(line, &mut ev) {
                    ev.push(ServerEvent::Close(err));
                    return ev;
                }
                if self.logged_in {
                    relay_from = Some(at);
                }
            }
        }
        match relay_from {
            Some(0) if !data.is_empty() => ev.push(ServerEvent::ForwardInput),
            Some(from) if from < data.len() => ev.push(ServerEvent::Forward(data[from..].to_vec())),
            _ => {}
        }
        ev
    }

    /// The client closed its side. Returns `Close` when it stopped inside a command line (none
    /// of which was forwarded).
    pub fn client_eof(&mut self) -> Vec<ClientEvent> {
        if self.cline.is_empty() {
            return Vec::new();
        }
        self.cline.take();
        vec![ClientEvent::Close(Pop3Error::Truncated)]
    }

    /// The backend closed its side: reports a RETR or TOP cut short (the bytes forwarded so far).
    /// A reply cut inside its status line is not a retrieval.
    pub fn server_eof(&mut self) -> Vec<ServerEvent> {
        let mut ev = Vec::new();
        if let Some(body) = self.body.take() {
            self.retrieved(body.cmd, body.bytes + body.pending, false, &mut ev);
        }
        ev
    }

    fn retrieved(&self, cmd: Cmd, bytes: u64, complete: bool, ev: &mut Vec<ServerEvent>) {
        let (msg, top_lines) = match cmd {
            Cmd::Retr(n) => (n, None),
            Cmd::Top(n, lines) => (n, Some(lines)),
            _ => return,
        };
        ev.push(ServerEvent::Retrieved(Retrieval {
            msg,
            top_lines,
            uid: self.uids.get(msg).map(str::to_owned),
            bytes,
            complete,
        }));
    }

    fn learn_uid(&mut self, text: &[u8]) {
        if let (Some(n), Some(uid)) = (number(word(text, 0)), word(text, 1)) {
            if self.uids.len() < self.cfg.max_uids {
                self.uids.insert(n, uid);
            }
        }
    }

    /// One complete backend line before login.
    fn server_line(&mut self, line: Vec<u8>, ev: &mut Vec<ServerEvent>) -> Result<(), Pop3Error> {
        let text = strip_eol(&line);
        if let Some(body) = &self.body {
            let cmd = body.cmd;
            if text == b"." {
                self.body = None;
                if cmd == Cmd::Capa && !self.tls && self.cfg.offer_stls {
                    ev.push(ServerEvent::Forward(b"STLS\r\n".to_vec()));
                }
                ev.push(ServerEvent::Forward(line));
                return Ok(());
            }
            let out = match cmd {
                Cmd::Capa => self.capa_line(text),
                Cmd::AuthList => self.mech_visible(text).then(|| text.to_vec()),
                _ => Some(text.to_vec()),
            };
            if let Some(mut out) = out {
                if out.as_slice() == text {
                    ev.push(ServerEvent::Forward(line));
                } else {
                    out.extend_from_slice(b"\r\n");
                    ev.push(ServerEvent::Forward(out));
                }
            }
            return Ok(());
        }
        let cmd = self.expect.front().copied().unwrap_or(Cmd::Other);
        if cmd == Cmd::Quit {
            ev.push(ServerEvent::QuitReply);
        }
        let ok = text.starts_with(b"+OK");
        if cmd == Cmd::Auth && !ok && (text == b"+" || text.starts_with(b"+ ")) {
            ev.push(ServerEvent::Forward(line));
            return Ok(());
        }
        if !ok && !text.starts_with(b"-ERR") {
            return Err(Pop3Error::BackendGarbage);
        }
        self.expect.pop_front();
        match cmd {
            Cmd::Greeting => ev.push(ServerEvent::Greeting { ok }),
            Cmd::Pass | Cmd::Apop | Cmd::Auth => {
                self.sasl = None;
                let user = match cmd {
                    // AUTH cannot be pipelined: its exchange named the account.
                    Cmd::Auth => self.user.clone(),
                    _ => self.login_users.pop_front().flatten(),
                };
                if ok {
                    self.logged_in = true;
                    self.account = user;
                    self.cline.set_cap(self.cfg.max_line_after_login);
                    self.sline.set_cap(self.cfg.max_line_after_login);
                    ev.push(ServerEvent::LoggedIn {
                        account: self.account.clone(),
                    });
                } else {
                    ev.push(ServerEvent::LoginFailed {
                        account: user,
                        reply: String::from_utf8_lossy(text).into_owned(),
                    });
                }
            }
            _ => {}
        }
        if ok && cmd.multi_line() {
            self.body = Some(Body {
                cmd,
                scan: Scan::LineStart,
                bytes: line.len() as u64,
                pending: 0,
            });
        }
        ev.push(ServerEvent::Forward(line));
        Ok(())
    }

    fn mech_visible(&self, mech: &[u8]) -> bool {
        let mech = Mechanism::parse(&String::from_utf8_lossy(mech));
        if mech.is_visible() {
            self.plaintext_ok()
        } else {
            self.cfg.pass_through_opaque
        }
    }

    /// A CAPA line as the client may see it (`None`: dropped).
    fn capa_line(&self, text: &[u8]) -> Option<Vec<u8>> {
        let name = word(text, 0).unwrap_or_default().to_ascii_uppercase();
        match name.as_slice() {
            b"STLS" => None,
            b"USER" if !self.plaintext_ok() => None,
            b"SASL" => {
                let mut out = b"SASL".to_vec();
                let mut any = false;
                for mech in text.split(|b| *b == b' ').skip(1).filter(|w| !w.is_empty()) {
                    if self.mech_visible(mech) {
                        out.push(b' ');
                        out.extend_from_slice(mech);
                        any = true;
                    }
                }
                any.then_some(out)
            }
            _ => Some(text.to_vec()),
        }
    }

    /// After login: follows backend replies without storing bodies. Returns the bytes taken.
    fn relay(&mut self, data: &[u8], ev: &mut Vec<ServerEvent>) -> Result<usize, Pop3Error> {
        if matches!(&self.body, Some(body) if body.cmd != Cmd::Uidl(None)) {
            return Ok(self.scan_body(data, ev));
        }
        let cmd = self.expect.front().copied().unwrap_or(Cmd::Other);
        if self.body.is_none() && self.sline.is_empty() && cmd == Cmd::Quit {
            ev.push(ServerEvent::QuitReply);
        }
        let (took, done) = self.sline.push(data);
        if !done {
            return Ok(took);
        }
        let line = self.sline.take();
        let text = line.text();
        if self.body.is_some() {
            // A UIDL listing line: "n uid", up to ".".
            if text == b"." {
                self.body = None;
            } else {
                let text = text.to_vec();
                self.learn_uid(&text);
            }
            return Ok(took);
        }
        let ok = text.starts_with(b"+OK");
        if !ok && !text.starts_with(b"-ERR") {
            return Err(Pop3Error::BackendGarbage);
        }
        self.expect.pop_front();
        if ok {
            if let Cmd::Uidl(Some(_)) = cmd {
                let rest = text.get(4..).unwrap_or_default().to_vec();
                self.learn_uid(&rest);
            }
            if cmd == Cmd::Uidl(None) {
                // A full listing replaces what was learned.
                self.uids = UidTable::default();
            }
            if cmd.multi_line() {
                self.body = Some(Body {
                    cmd,
                    scan: Scan::LineStart,
                    bytes: line.total as u64,
                    pending: 0,
                });
            }
        }
        Ok(took)
    }

    /// Scans a multi-line body for its final `.` line, counting bytes. Returns the bytes taken.
    fn scan_body(&mut self, data: &[u8], ev: &mut Vec<ServerEvent>) -> usize {
        let Some(body) = self.body.as_mut() else {
            return 0;
        };
        let mut at = 0;
        while at < data.len() {
            let byte = data[at];
            match (body.scan, byte) {
                (Scan::Mid, _) => {
                    let end = data[at..]
                        .iter()
                        .position(|b| *b == b'\n')
                        .map_or(data.len(), |p| at + p + 1);
                    body.bytes += (end - at) as u64;
                    if data[end - 1] == b'\n' {
                        body.scan = Scan::LineStart;
                    }
                    at = end;
                }
                (Scan::LineStart, b'.') | (Scan::Dot, b'\r') => {
                    body.scan = if byte == b'.' { Scan::Dot } else { Scan::DotCr };
                    body.pending += 1;
                    at += 1;
                }
                (Scan::Dot | Scan::DotCr, b'\n') => {
                    let (cmd, bytes) = (body.cmd, body.bytes);
                    self.body = None;
                    self.retrieved(cmd, bytes, true, ev);
                    return at + 1;
                }
                _ => {
                    // Not the final line: a held dot (and CR) were message bytes.
                    body.bytes += body.pending;
                    body.pending = 0;
                    body.scan = Scan::Mid;
                }
            }
        }
        at
    }
}

#[cfg(test)]
mod tests {
    use super::super::split::{
        proxied, recorded, replay_unchanged, same_for_every_split, sent_by, transcript, Dir, Out,
        Proxied, Seen,
    };
    use super::*;
    use Dir::{CEof, SEof, C, S};

    proxied!(Pop3Session);

    fn check(cfg: &Pop3Config, steps: &[(Dir, &[u8])]) -> Seen {
        transcript(|| Pop3Session::new(cfg.clone()), steps)
    }

    fn tls() -> Pop3Config {
        Pop3Config {
            tls: true,
            ..Pop3Config::default()
        }
    }

    const RETR1: &[u8] = b"+OK 27 octets\r\nSubject: x\r\n\r\n..dot\r\n..\r\n.\r\n";

    #[test]
    fn retr_bytes_counts_status_and_stuffed_body_not_the_final_dot() {
        assert_eq!(retr_bytes(RETR1), Some(RETR1.len() as u64 - 3));
        assert_eq!(retr_bytes(b"+OK\r\n.\r\n"), Some(5));
        assert_eq!(retr_bytes(b"-ERR no such message\r\n"), None);
        assert_eq!(retr_bytes(b"+OK\r\nbody\r\n"), None);
    }

    #[test]
    fn whole_session_over_tls() {
        let seen = check(
            &tls(),
            &[
                (S, b"+OK Dovecot ready.\r\n"),
                (C, b"CAPA\r\n"),
                (
                    S,
                    b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nSTLS\r\nUSER\r\nSASL PLAIN LOGIN SCRAM-SHA-256 XOAUTH2\r\n.\r\n",
                ),
                (C, b"USER alice\r\n"),
                (S, b"+OK\r\n"),
                (C, b"PASS secret\r\n"),
                (S, b"+OK Logged in.\r\n"),
                (C, b"UIDL\r\nRETR 1\r\nTOP 2 0\r\nLIST\r\nQUIT\r\n"),
                (S, b"+OK\r\n1 u-one\r\n2 u-two\r\n.\r\n"),
                (S, RETR1),
                (S, b"+OK\r\nHead: y\r\n\r\n.\r\n+OK 2 messages\r\n1 27\r\n2 40\r\n.\r\n"),
                (S, b"+OK Logging out.\r\n"),
            ],
        );
        assert_eq!(
            seen.events,
            vec![
                "Greeting { ok: true }".to_string(),
                "Account(\"alice\")".into(),
                "LoggedIn { account: Some(\"alice\") }".into(),
                "Quit".into(),
                format!(
                    "Retrieved(Retrieval {{ msg: 1, top_lines: None, uid: Some(\"u-one\"), bytes: {}, complete: true }})",
                    RETR1.len() - 3
                ),
                "Retrieved(Retrieval { msg: 2, top_lines: Some(0), uid: Some(\"u-two\"), bytes: 16, complete: true })".into(),
                "QuitReply".into(),
            ]
        );
        let verbs: Vec<&str> = seen
            .commands
            .iter()
            .map(|c| c.split('"').nth(1).unwrap_or_default())
            .collect();
        assert_eq!(
            verbs,
            ["CAPA", "USER", "PASS", "UIDL", "RETR", "TOP", "LIST", "QUIT"]
        );
        assert!(
            seen.commands[2].contains("args: []"),
            "PASS arguments are left out"
        );
        assert!(seen.commands[5].contains("args: [\"2\", \"0\"]"));
        let client_saw = String::from_utf8(seen.to_client).unwrap();
        assert!(
            client_saw.contains("+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n")
        );
        assert!(client_saw.ends_with("+OK Logging out.\r\n"));
        assert_eq!(
            seen.to_backend,
            b"CAPA\r\nUSER alice\r\nPASS secret\r\nUIDL\r\nRETR 1\r\nTOP 2 0\r\nLIST\r\nQUIT\r\n"
        );
    }

    #[test]
    fn auth_plain_with_and_without_initial_response() {
        let ir = b"AUTH PLAIN AGJvYgBwdw==\r\n"; // "\0bob\0pw"
        let seen = check(
            &tls(),
            &[(S, b"+OK hi\r\n"), (C, ir), (S, b"+OK Logged in.\r\n")],
        );
        assert_eq!(
            seen.events[1..],
            ["Account(\"bob\")", "LoggedIn { account: Some(\"bob\") }"]
        );
        assert_eq!(seen.to_backend, ir);

        let seen = check(
            &tls(),
            &[
                (S, b"+OK hi\r\n"),
                (C, b"AUTH PLAIN\r\n"),
                (S, b"+ \r\n"),
                (C, b"AGJvYgBwdw==\r\n"),
                (S, b"-ERR [AUTH] Authentication failed.\r\n"),
            ],
        );
        assert_eq!(
            seen.events[1..],
            [
                "Account(\"bob\")",
                "LoginFailed { account: Some(\"bob\"), reply: \"-ERR [AUTH] Authentication failed.\" }"
            ]
        );
        assert_eq!(
            seen.to_client,
            b"+OK hi\r\n+ \r\n-ERR [AUTH] Authentication failed.\r\n"
        );
    }

    #[test]
    fn auth_login_with_and_without_initial_response() {
        for (auth, steps) in [
            (&b"AUTH LOGIN Y2Fyb2w=\r\n"[..], 1),
            (&b"AUTH LOGIN\r\n"[..], 2),
        ] {
            let mut script: Vec<(Dir, &[u8])> = vec![(S, b"+OK hi\r\n"), (C, auth)];
            if steps == 2 {
                script.push((S, b"+ VXNlcm5hbWU6\r\n"));
                script.push((C, b"Y2Fyb2w=\r\n"));
            }
            script.push((S, b"+ UGFzc3dvcmQ6\r\n"));
            script.push((C, b"cHc=\r\n"));
            script.push((S, b"+OK Logged in.\r\n"));
            script.push((C, b"STAT\r\n"));
            let seen = check(&tls(), &script);
            assert_eq!(
                seen.events[1..],
                [
                    "Account(\"carol\")",
                    "LoggedIn { account: Some(\"carol\") }"
                ]
            );
            assert!(seen.to_backend.ends_with(b"cHc=\r\nSTAT\r\n"));
        }
    }

    #[test]
    fn plaintext_login_refused_before_tls_and_stls_offered() {
        let cfg = Pop3Config::default();
        let seen = check(
            &cfg,
            &[
                (S, b"+OK hi\r\n"),
                (C, b"CAPA\r\n"),
                (
                    S,
                    b"+OK\r\nUSER\r\nSASL PLAIN GSSAPI\r\nPIPELINING\r\n.\r\n",
                ),
                (C, b"USER alice\r\n"),
                (C, b"AUTH PLAIN AGJvYgBwdw==\r\n"),
                (C, b"AUTH SCRAM-SHA-1\r\n"),
                (C, b"STLS\r\n"),
                (C, b"USER alice\r\n"),
            ],
        );
        let text = String::from_utf8(seen.to_client).unwrap();
        assert!(
            text.contains("+OK\r\nPIPELINING\r\nSTLS\r\n.\r\n"),
            "{text}"
        );
        assert_eq!(
            text.matches("Plaintext authentication disallowed").count(),
            2
        );
        assert!(text.contains("Unsupported authentication mechanism"));
        assert!(text.ends_with("+OK Begin TLS negotiation\r\n"));
        assert_eq!(seen.to_backend, b"CAPA\r\nUSER alice\r\n");
        assert_eq!(seen.events[1..], ["StartTls", "Account(\"alice\")"]);
    }

    #[test]
    fn commands_after_stls_in_the_same_chunk_are_dropped() {
        let mut s = Pop3Session::new(Pop3Config::default());
        let ev = s.client(b"STLS\r\nUSER mallory\r\nPASS x\r\n");
        assert_eq!(
            ev,
            vec![
                ClientEvent::Command(Command {
                    verb: "STLS".into(),
                    args: vec![]
                }),
                ClientEvent::Reply(STLS_OK.to_vec()),
                ClientEvent::StartTls
            ]
        );
        s.tls_started();
        assert_eq!(
            s.client(b"USER alice\r\n"),
            vec![
                ClientEvent::Command(Command {
                    verb: "USER".into(),
                    args: vec!["alice".into()]
                }),
                ClientEvent::Account("alice".into()),
                ClientEvent::Forward(b"USER alice\r\n".to_vec())
            ]
        );
        // STLS again, now over TLS, is refused.
        assert_eq!(
            s.client(b"STLS\r\n")[1..],
            [ClientEvent::Reply(b"-ERR STLS not available\r\n".to_vec())]
        );
    }

    #[test]
    fn pipelined_commands_before_the_greeting() {
        let seen = check(
            &tls(),
            &[
                (C, b"CAPA\r\nUSER alice\r\nPASS pw\r\nRETR 1\r\n"),
                (S, b"+OK hi\r\n+OK\r\nUSER\r\n.\r\n+OK\r\n+OK in\r\n"),
                (S, RETR1),
            ],
        );
        assert_eq!(seen.events.len(), 4, "{:?}", seen.events);
        assert!(seen.events[3].contains("msg: 1"));
    }

    #[test]
    fn overlong_line_before_login_closes_at_the_cap() {
        let mut s = Pop3Session::new(tls());
        let mut ev = s.client(&[b'A'; 8192]);
        assert!(ev.is_empty(), "exactly the cap is still buffered");
        ev = s.client(b"A");
        assert_eq!(
            ev,
            vec![
                ClientEvent::Reply(b"-ERR Line too long\r\n".to_vec()),
                ClientEvent::Close(Pop3Error::ClientLineTooLong(8192))
            ]
        );
        let mut s = Pop3Session::new(tls());
        let ev = s.server(&vec![b'+'; 9000]);
        assert_eq!(
            ev,
            vec![ServerEvent::Close(Pop3Error::BackendLineTooLong(8192))]
        );
    }

    #[test]
    fn bad_base64_and_nul_bytes_are_refused_not_forwarded() {
        let seen = check(
            &tls(),
            &[
                (S, b"+OK hi\r\n"),
                (C, b"AUTH PLAIN %%%\r\n"),
                (C, b"USER a\0b\r\n"),
                (C, b"AUTH LOGIN\r\n"),
                (S, b"+ VXNlcm5hbWU6\r\n"),
                (C, b"not*base64\r\n"),
                (S, b"-ERR [AUTH] cancelled\r\n"),
            ],
        );
        assert_eq!(seen.to_backend, b"AUTH LOGIN\r\n*\r\n");
        assert!(seen.events.iter().any(|e| e.contains("Base64")));
        assert!(seen.events.iter().any(|e| e.contains("BadAccount")));
        assert!(seen
            .events
            .last()
            .unwrap()
            .starts_with("LoginFailed { account: None"));
    }

    #[test]
    fn backend_closing_mid_retr_reports_the_bytes_forwarded() {
        let seen = check(
            &tls(),
            &[
                (S, b"+OK hi\r\n"),
                (C, b"USER a\r\nPASS b\r\nRETR 3\r\nRETR 4\r\n"),
                (
                    S,
                    b"+OK\r\n+OK\r\n-ERR no such message\r\n+OK 9 octets\r\nline\r\n.",
                ),
                (SEof, b""),
            ],
        );
        assert_eq!(
            seen.events.last().unwrap(),
            "Retrieved(Retrieval { msg: 4, top_lines: None, uid: None, bytes: 21, complete: false })"
        );
        assert_eq!(
            seen.events
                .iter()
                .filter(|e| e.contains("Retrieved"))
                .count(),
            1
        );
    }

    #[test]
    fn backend_garbage_ends_the_session() {
        let mut s = Pop3Session::new(tls());
        assert_eq!(
            s.server(b"HELLO\r\n"),
            vec![ServerEvent::Close(Pop3Error::BackendGarbage)]
        );
    }

    #[test]
    fn single_line_replies_uidl_n_and_bare_auth_listing() {
        let seen = check(
            &tls(),
            &[
                (S, b"+OK hi\r\n"),
                (C, b"AUTH\r\n"),
                (S, b"+OK\r\nPLAIN\r\nSCRAM-SHA-1\r\nLOGIN\r\n.\r\n"),
                (
                    C,
                    b"USER a\r\nPASS b\r\nUIDL 2\r\nLIST 2\r\nTOP 2 5\r\nTOP 9 1\r\n",
                ),
                (
                    S,
                    b"+OK\r\n+OK\r\n+OK 2 zz\r\n+OK 2 40\r\n+OK\r\nX: y\r\n.\r\n-ERR no\r\n",
                ),
            ],
        );
        assert!(seen
            .to_client
            .starts_with(b"+OK hi\r\n+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"));
        assert_eq!(
            seen.events.last().unwrap(),
            "Retrieved(Retrieval { msg: 2, top_lines: Some(5), uid: Some(\"zz\"), bytes: 11, complete: true })"
        );
    }

    #[test]
    fn opaque_mechanisms_pass_through_when_configured() {
        let cfg = Pop3Config {
            pass_through_opaque: true,
            ..tls()
        };
        let seen = check(
            &cfg,
            &[
                (S, b"+OK hi\r\n"),
                (C, b"CAPA\r\n"),
                (S, b"+OK\r\nSASL SCRAM-SHA-256 PLAIN\r\n.\r\n"),
                (C, b"AUTH SCRAM-SHA-256 biwsbj11c2VyLHI9YWJj\r\n"),
                (S, b"+ cj1hYmM=\r\n"),
                (C, b"Yz1iaXdzLHI9YWJj\r\n"),
                (S, b"+OK Logged in.\r\n"),
            ],
        );
        assert!(seen
            .to_client
            .starts_with(b"+OK hi\r\n+OK\r\nSASL SCRAM-SHA-256 PLAIN\r\n.\r\n"));
        assert_eq!(seen.events[1..], ["LoggedIn { account: None }"]);
        assert!(seen.to_backend.ends_with(b"Yz1iaXdzLHI9YWJj\r\n"));
    }

    #[test]
    fn pipelining_is_bounded() {
        let mut s = Pop3Session::new(tls());
        s.server(b"+OK hi\r\n");
        let ev = s.client(&b"NOOP\r\n".repeat(MAX_PIPELINE + 5));
        let forwarded = ev
            .iter()
            .filter(|e| matches!(e, ClientEvent::Forward(_)))
            .count();
        assert_eq!(forwarded, MAX_PIPELINE);
        assert_eq!(
            ev.last(),
            Some(&ClientEvent::Close(Pop3Error::TooManyCommands(
                MAX_PIPELINE
            )))
        );
    }

    #[test]
    fn uid_table_keeps_the_latest_valid_uid() {
        let mut t = UidTable::default();
        t.insert(1, b"aa");
        t.insert(2, b"bbb");
        t.insert(1, b"cc");
        t.insert(3, b"has space");
        t.insert(4, &[b'x'; 71]);
        assert_eq!(t.get(1), Some("cc"));
        assert_eq!(t.get(2), Some("bbb"));
        assert_eq!(t.get(3), None);
        assert_eq!(t.get(4), None);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn dovecot_session_meters_what_dovecot_counts() {
        // testdata/README.md: "Logged out top=1/63, retr=3/15304".
        let steps = recorded(include_bytes!("testdata/dovecot-pop3.transcript"));
        let cfg = Pop3Config {
            plaintext_login: true,
            offer_stls: false,
            ..Pop3Config::default()
        };
        let mut s = Pop3Session::new(cfg.clone());
        let (mut retr, mut top) = ((0, 0), (0, 0));
        for (dir, bytes) in &steps {
            if let S = dir {
                for event in s.server(bytes) {
                    if let ServerEvent::Retrieved(r) = event {
                        assert!(r.complete && r.uid.is_some(), "{r:?}");
                        let sum = if r.top_lines.is_some() {
                            &mut top
                        } else {
                            &mut retr
                        };
                        *sum = (sum.0 + 1, sum.1 + r.bytes);
                    }
                }
            } else {
                s.client(bytes);
            }
        }
        assert_eq!((retr, top), ((3, 15304), (1, 63)));

        let seen = transcript(|| Pop3Session::new(cfg.clone()), &steps);
        assert_eq!(seen.to_backend, sent_by(&steps, true));
        assert_eq!(seen.to_client, sent_by(&steps, false));
        assert!(seen
            .events
            .contains(&"LoggedIn { account: Some(\"bob\") }".to_string()));
    }

    #[test]
    fn dovecot_auth_exchanges() {
        let cfg = Pop3Config {
            plaintext_login: true,
            offer_stls: false,
            ..Pop3Config::default()
        };
        let events = replay_unchanged(
            || Pop3Session::new(cfg.clone()),
            include_bytes!("testdata/dovecot-pop3-auth.transcript"),
        );
        assert_eq!(
            events,
            [
                "Greeting { ok: true }",
                "Account(\"bob\")",
                "LoginFailed { account: Some(\"bob\"), reply: \"-ERR [AUTH] Authentication failed.\" }",
                "Account(\"bob\")",
                "LoggedIn { account: Some(\"bob\") }",
                "Quit",
                "QuitReply",
            ]
        );
    }

    #[test]
    fn client_closing_inside_a_command_forwards_none_of_it() {
        let seen = check(
            &tls(),
            &[
                (S, b"+OK hi\r\n"),
                (C, b"USER alice\r\nPASS sec"),
                (CEof, b""),
            ],
        );
        assert_eq!(seen.to_backend, b"USER alice\r\n");
        assert_eq!(seen.events.last().unwrap(), "Close(Truncated)");
    }

    #[test]
    fn pipelined_logins_keep_their_own_accounts() {
        let seen = check(
            &tls(),
            &[
                (S, b"+OK hi\r\n"),
                (C, b"USER alice\r\nPASS pw\r\nUSER bob\r\nPASS pw\r\n"),
                (S, b"+OK\r\n-ERR [AUTH] no\r\n+OK\r\n+OK in\r\n"),
            ],
        );
        assert_eq!(
            seen.events,
            [
                "Greeting { ok: true }",
                "Account(\"alice\")",
                "Account(\"bob\")",
                "LoginFailed { account: Some(\"alice\"), reply: \"-ERR [AUTH] no\" }",
                "LoggedIn { account: Some(\"bob\") }",
            ]
        );
    }

    /// The shell refuses every account at its `Account` event: what reached each side.
    fn refused_at_account(chunks: &[Vec<&[u8]>]) -> (Vec<u8>, Vec<u8>, Vec<String>) {
        let mut p = Pop3Session::new(tls());
        let (mut to_backend, mut to_client, mut closes) = (Vec::new(), Vec::new(), Vec::new());
        p.server(b"+OK ready\r\n");
        for part in chunks.iter().flatten() {
            let mut events = p.client(part).into_iter();
            while let Some(e) = events.next() {
                match e {
                    ClientEvent::Forward(b) => to_backend.extend(b),
                    ClientEvent::Reply(b) => to_client.extend(b),
                    ClientEvent::Account(_) => {
                        // Drop the rest of this batch; act on the refusal instead.
                        events = p.refuse_login("Closed.\r\n-ERR injected").into_iter();
                    }
                    ClientEvent::Close(e) => {
                        closes.push(e.to_string());
                        return (to_backend, to_client, closes);
                    }
                    _ => {}
                }
            }
        }
        (to_backend, to_client, closes)
    }

    #[test]
    fn a_refused_account_never_reaches_the_backend() {
        for input in [
            &b"CAPA\r\nUSER alice\r\nPASS secret\r\nRETR 1\r\n"[..],
            b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nRETR 1\r\n",
            b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n",
        ] {
            let (to_backend, to_client, closes) =
                same_for_every_split(&[input], refused_at_account);
            let before = if input.starts_with(b"CAPA") {
                "CAPA\r\n"
            } else {
                ""
            };
            assert_eq!(
                String::from_utf8(to_backend).unwrap(),
                before,
                "nothing after the account"
            );
            assert_eq!(to_client, b"-ERR [AUTH] Closed.-ERR injected\r\n");
            assert_eq!(closes, ["login refused by the proxy: Closed.-ERR injected"]);
        }
    }

    #[test]
    fn between_replies_only_outside_a_reply() {
        let mut p = Pop3Session::new(tls());
        assert!(p.between_replies(), "the greeting has not started");
        p.server(b"+OK rea");
        assert!(!p.between_replies(), "inside the greeting");
        p.server(b"dy\r\n");
        p.client(b"USER a\r\nPASS b\r\n");
        p.server(b"+OK\r\n+OK logged in\r\n");
        assert!(p.between_replies());
        p.client(b"RETR 1\r\n");
        assert!(p.between_replies(), "its reply has not started");
        p.server(b"+OK 3 octets\r\nabc");
        assert!(!p.between_replies(), "inside the message");
        p.server(b"\r\n.\r\n");
        assert!(p.between_replies());
        p.client(b"UIDL\r\n");
        p.server(b"+OK\r\n1 a");
        assert!(!p.between_replies(), "inside a listing line");
        p.server(b"\r\n.\r\n");
        assert!(p.between_replies());
    }
}
