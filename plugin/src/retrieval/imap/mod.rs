//! An IMAP session as the proxy sees it (RFC 3501 / RFC 9051, LITERAL+ / LITERAL- RFC 7888,
//! SASL-IR RFC 4959).
//!
//! ```text
//! client -> backend   tag SP command [SP args] CRLF; an argument may be a literal:
//!                     {n}CRLF <n bytes>   synchronizing: the client waits for "+ " first
//!                     {n+}CRLF <n bytes>  non-synchronizing (LITERAL+, LITERAL- up to 4096)
//!                     during AUTHENTICATE: one base64 line per "+ " challenge, "*" cancels
//!                     during IDLE: the line DONE
//! backend -> client   "* " untagged | "+ " continuation | tag SP (OK|NO|BAD) ...; any line
//!                     may end in a literal {n}CRLF (or ~{n} for BINARY) followed by n bytes
//!                     and more of the same response
//! ```
//!
//! **When the login is decided.** The account is the first argument of `LOGIN` (atom, quoted
//! string or literal) or the first SASL response of `AUTHENTICATE PLAIN`/`LOGIN`, initial
//! response included ([`ClientEvent::Account`], before any byte carrying the password is
//! forwarded). The backend's tagged `OK` to that command logs the session in
//! ([`ServerEvent::LoggedIn`], before the line is forwarded); `NO`/`BAD` fail it. A greeting of
//! `* PREAUTH` logs in without an account. A `LOGIN` whose user name the proxy cannot read is
//! refused by the proxy, so no login the backend accepts has an account the proxy missed.
//!
//! **What is rewritten.** Before login, every capability list (the greeting's `[CAPABILITY ...]`,
//! `* CAPABILITY` responses, and the `[CAPABILITY ...]` of the login's tagged `OK`): `COMPRESS=*`
//! is removed, so are `AUTH=` mechanisms the proxy cannot see through (unless passed through)
//! and the backend's own `STARTTLS`/`LOGINDISABLED`; the proxy adds `STARTTLS` when it offers it
//! on a plaintext connection and `LOGINDISABLED` (removing `AUTH=PLAIN`/`AUTH=LOGIN`) when
//! plaintext logins are not allowed there. After login the backend's bytes pass unchanged; a
//! `COMPRESS` command is answered `NO` by the proxy, so the stream stays readable.
//!
//! **Metering.** [`ServerEvent::Fetched`] counts, per `* n FETCH` response, the bytes of each
//! literal that is the value of a `BODY[...]`, `BINARY[...]` or `RFC822*` item (with its
//! `<origin>`), with the UID when the response carries one and the mailbox selected.

use std::collections::HashMap;

mod syntax;

use super::line::{one_line, strip_eol, Line, LineBuf};
use super::sasl::{self, Exchange, Mechanism};
use super::{POST_LOGIN_MAX_LINE, PRE_LOGIN_MAX};
use syntax::{counted, section_before, strings};
pub use syntax::{trailing_literal, Literal};

/// What the proxy offers and allows on this connection.
#[derive(Clone, Debug)]
pub struct ImapConfig {
    /// The client connection is TLS already (port 993).
    pub tls: bool,
    /// The proxy offers `STARTTLS` on a plaintext connection.
    pub offer_starttls: bool,
    /// LOGIN and AUTHENTICATE PLAIN/LOGIN are allowed before TLS.
    pub plaintext_login: bool,
    /// SASL mechanisms the proxy cannot see through are advertised and passed through.
    pub pass_through_opaque: bool,
    /// Longest line before login, either direction.
    pub max_line: usize,
    /// Largest client literal before login (a larger announcement ends the session before any
    /// of its bytes is read).
    pub max_literal: usize,
    /// Longest client command line after login (a longer one ends the session), and longest
    /// backend line kept after login (longer ones are skipped, only framing is tracked).
    pub max_line_after_login: usize,
    /// Longest mailbox name remembered from SELECT/EXAMINE.
    pub max_mailbox: usize,
}

impl Default for ImapConfig {
    fn default() -> Self {
        ImapConfig {
            tls: false,
            offer_starttls: true,
            plaintext_login: false,
            pass_through_opaque: false,
            max_line: PRE_LOGIN_MAX,
            max_literal: PRE_LOGIN_MAX,
            max_line_after_login: POST_LOGIN_MAX_LINE,
            max_mailbox: 1024,
        }
    }
}

/// Something in the byte stream the proxy cannot go on with.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImapError {
    #[error("client line longer than {0} bytes")]
    ClientLineTooLong(usize),
    #[error("client literal of {len} bytes exceeds {max} before login")]
    ClientLiteralTooLarge { len: u64, max: usize },
    #[error("backend line longer than {0} bytes before login")]
    BackendLineTooLong(usize),
    #[error("malformed literal announcement")]
    BadLiteral,
    #[error("client command cannot be read")]
    BadCommand,
    #[error("client closed the connection inside a command")]
    Truncated,
    #[error("more than {0} watched commands in flight")]
    TooManyCommands(usize),
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
    /// Answer the client with these bytes.
    Reply(Vec<u8>),
    /// A client command starts here (a command boundary), before anything of it is forwarded
    /// or answered: the place to end a session whose account changed state. `verb` is upper
    /// case (`UID` for UID commands).
    Command { tag: String, verb: String },
    /// The client named this account: check it before acting on later events (they carry the
    /// password to the backend). To refuse it, drop the later events and act on
    /// [`ImapSession::refuse_login`] instead; the session assumes every account it reports and
    /// does not refuse goes on to the backend.
    Account(String),
    /// Start TLS after sending the reply before it, then call [`ImapSession::tls_started`]. What
    /// the client sent after STARTTLS was dropped.
    StartTls,
    /// The client started IDLE (allow the long idle timeout).
    Idle,
    /// The client ended IDLE with DONE.
    IdleDone,
    /// The client sent LOGOUT (forwarded too).
    Logout,
    /// The proxy refused a client input and said so; the session goes on.
    Refused(ImapError),
    /// End the session after the replies before it.
    Close(ImapError),
}

/// What the shell does with what the backend sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// Send these bytes to the client.
    Forward(Vec<u8>),
    /// Send the whole chunk just fed to the client.
    ForwardInput,
    /// The backend's greeting: `ok` for `* OK` or `* PREAUTH`, false for `* BYE`.
    Greeting { ok: bool },
    /// The backend accepted the login (`account` is `None` after PREAUTH or an opaque mechanism).
    LoggedIn { account: Option<String> },
    /// The backend refused the login with this tagged line.
    LoginFailed {
        account: Option<String>,
        reply: String,
    },
    /// A FETCH response carried message bytes.
    Fetched(Fetch),
    /// The response to LOGOUT starts in this chunk: make the session record durable first.
    LogoutReply,
    /// The backend broke the protocol: end the session.
    Close(ImapError),
}

/// The message bytes of one FETCH response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetch {
    /// The mailbox the client selected, as it named it (modified UTF-7).
    pub mailbox: Option<String>,
    pub seq: u32,
    pub uid: Option<u32>,
    pub sections: Vec<SectionBytes>,
    /// False when the backend stream ended inside the response.
    pub complete: bool,
}

/// Bytes of one literal value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionBytes {
    /// The item as sent, e.g. `BODY[]`, `BODY[1.2]<0>`, `BINARY[1]`, `RFC822.TEXT`.
    pub section: String,
    pub bytes: u64,
}

/// A capability list as the client may see it.
fn rewrite_caps(caps: &[u8], s: &ImapSession) -> Vec<u8> {
    let plaintext = s.plaintext_ok();
    let mut out: Vec<&[u8]> = Vec::new();
    for cap in caps.split(|b| *b == b' ').filter(|c| !c.is_empty()) {
        let upper = cap.to_ascii_uppercase();
        if upper.starts_with(b"COMPRESS=") || upper == b"STARTTLS" || upper == b"LOGINDISABLED" {
            continue;
        }
        if let Some(mech) = upper.strip_prefix(b"AUTH=") {
            let mech = Mechanism::parse(&String::from_utf8_lossy(mech));
            let keep = if mech.is_visible() {
                plaintext || s.logged_in
            } else {
                s.cfg.pass_through_opaque
            };
            if !keep {
                continue;
            }
        }
        out.push(cap);
    }
    if !s.logged_in && !s.tls && s.cfg.offer_starttls {
        out.push(b"STARTTLS");
    }
    if !s.logged_in && !plaintext {
        out.push(b"LOGINDISABLED");
    }
    out.join(&b' ')
}

/// Rewrites the capability list in a backend line, if it has one.
fn rewrite_line(text: &[u8], s: &ImapSession) -> Option<Vec<u8>> {
    let upper = text.to_ascii_uppercase();
    if let Some(rest) = upper.strip_prefix(b"* CAPABILITY ") {
        let start = text.len() - rest.len();
        let mut out = text[..start].to_vec();
        out.extend_from_slice(&rewrite_caps(&text[start..], s));
        return Some(out);
    }
    let open = upper.windows(12).position(|w| w == b"[CAPABILITY ")?;
    let close = open + upper[open..].iter().position(|b| *b == b']')?;
    let mut out = text[..open + 12].to_vec();
    out.extend_from_slice(&rewrite_caps(&text[open + 12..close], s));
    out.extend_from_slice(&text[close..]);
    Some(out)
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Pending {
    /// LOGIN with its user name, or AUTHENTICATE (`None`: the account is the exchange's).
    Login(Option<String>),
    Select(Option<String>),
    Deselect,
    Logout,
    Idle,
}

/// The client command being read (its line parts and literals).
#[derive(Debug, Default)]
struct Command {
    tag: Vec<u8>,
    verb: Vec<u8>,
    args: Vec<Vec<u8>>,
    /// Refused by the proxy: read to its end, forward nothing.
    discard: bool,
    /// Bytes of the current client literal still to come.
    literal_left: u64,
    /// Whether to keep the literal as an argument (before login, or a mailbox name).
    capture: Option<Vec<u8>>,
    account_known: bool,
    /// A part of it was forwarded already.
    forwarded: bool,
}

/// The backend response being read.
#[derive(Debug, Default)]
struct Response {
    /// A byte of this response was seen.
    started: bool,
    /// A literal ended an earlier part: the next line part continues this response.
    continued: bool,
    literal_left: u64,
    fetch: Option<FetchAcc>,
}

#[derive(Debug, Default)]
struct FetchAcc {
    seq: u32,
    uid: Option<u32>,
    depth: u32,
    after_uid: bool,
    sections: Vec<SectionBytes>,
    /// The section whose literal is being read.
    counting: Option<SectionBytes>,
}

/// Both directions of one IMAP session.
#[derive(Debug)]
pub struct ImapSession {
    cfg: ImapConfig,
    tls: bool,
    logged_in: bool,
    greeted: bool,
    cline: LineBuf,
    sline: LineBuf,
    cmd: Option<Command>,
    resp: Response,
    /// The SASL exchange in progress and its tag.
    sasl: Option<(Vec<u8>, Exchange)>,
    idle: bool,
    /// Tagged commands the proxy watches, by tag.
    pending: HashMap<Vec<u8>, Pending>,
    /// Commands forwarded and not yet completed.
    outstanding: usize,
    logout_sent: bool,
    logout_reply: bool,
    user: Option<String>,
    account: Option<String>,
    mailbox: Option<String>,
    /// The tag of the login command that reported the account last, or that the backend
    /// accepted.
    login_tag: Vec<u8>,
}

/// Most watched tags held at once (a client cannot make the proxy hold more).
const MAX_PENDING: usize = 1024;
/// Arguments kept of a client command (the proxy reads at most the first two).
const MAX_ARGS: usize = 4;
/// Sections reported per FETCH response; the bytes of any further ones are added to the last,
/// renamed [`MORE_SECTIONS`].
pub const MAX_SECTIONS: usize = 64;
/// The name of the last section when a FETCH response had more than [`MAX_SECTIONS`].
pub const MORE_SECTIONS: &str = "(more sections)";

impl ImapSession {
    pub fn new(cfg: ImapConfig) -> ImapSession {
        ImapSession {
            tls: cfg.tls,
            logged_in: false,
            greeted: false,
            cline: LineBuf::new(cfg.max_line),
            sline: LineBuf::new(cfg.max_line),
            cmd: None,
            resp: Response::default(),
            sasl: None,
            idle: false,
            pending: HashMap::new(),
            outstanding: 0,
            logout_sent: false,
            logout_reply: false,
            user: None,
            account: None,
            mailbox: None,
            login_tag: Vec::new(),
            cfg,
        }
    }

    pub fn account(&self) -> Option<&str> {
        self.account.as_deref()
    }

    pub fn is_logged_in(&self) -> bool {
        self.logged_in
    }

    /// The mailbox selected now.
    pub fn mailbox(&self) -> Option<&str> {
        self.mailbox.as_deref()
    }

    /// The TLS handshake after STARTTLS succeeded.
    pub fn tls_started(&mut self) {
        self.tls = true;
    }

    /// Answers the login command whose [`ClientEvent::Account`] was just reported (or whose
    /// [`ServerEvent::LoggedIn`] was, instead of the backend's `OK`) with `<tag> NO [<code>]
    /// <text>`, then the session ends: the shell acts on these events instead of the ones after
    /// the account (the password is never forwarded; what the client pipelined is dropped).
    /// `code` is `ALERT` (RFC 3501: the client must show the text) or `AUTHORIZATIONFAILED`
    /// (RFC 5530).
    pub fn refuse_login(&mut self, code: &str, text: &str) -> Vec<ClientEvent> {
        let text = one_line(text, 400);
        self.cmd = None;
        self.cline.take();
        let mut out = self.login_tag.clone();
        out.extend_from_slice(format!(" NO [{code}] {text}\r\n").as_bytes());
        vec![
            ClientEvent::Reply(out),
            ClientEvent::Close(ImapError::LoginRefused(text)),
        ]
    }

    /// The backend is not in the middle of a response (a line or a literal): the proxy may send
    /// `* BYE` here without cutting a response short (RFC 3501 §7.1.5 allows BYE at any time,
    /// IDLE included). Commands may still await their completion.
    pub fn between_replies(&self) -> bool {
        self.sline.is_empty() && !self.resp.started
    }

    fn plaintext_ok(&self) -> bool {
        self.tls || self.cfg.plaintext_login
    }

    /// Feeds bytes from the client.
    pub fn client(&mut self, data: &[u8]) -> Vec<ClientEvent> {
        let mut ev = Vec::new();
        let mut at = 0;
        while at < data.len() {
            if let Some(cmd) = self.cmd.as_mut().filter(|c| c.literal_left > 0) {
                let take = (cmd.literal_left.min((data.len() - at) as u64)) as usize;
                let bytes = &data[at..at + take];
                at += take;
                cmd.literal_left -= take as u64;
                match &mut cmd.capture {
                    // Bounded by the announcement check (max_literal, max_mailbox).
                    Some(buf) => buf.extend_from_slice(bytes),
                    None if !cmd.discard => ev.push(ClientEvent::Forward(bytes.to_vec())),
                    None => {}
                }
                if cmd.literal_left == 0 {
                    if let Some(buf) = cmd.capture.take() {
                        if cmd.args.len() < MAX_ARGS {
                            cmd.args.push(buf.clone());
                        }
                        if !self.logged_in {
                            self.learn_account(&mut ev);
                        }
                        if self.cmd.as_ref().is_some_and(|c| !c.discard) {
                            ev.push(ClientEvent::Forward(buf));
                        }
                    }
                }
                continue;
            }
            let (took, done) = self.cline.push(&data[at..]);
            at += took;
            // Client lines are forwarded whole, so they are bounded after login too (as
            // Dovecot's imap_max_line_length).
            if self.cline.overflowed() {
                let cap = if self.logged_in {
                    self.cfg.max_line_after_login
                } else {
                    self.cfg.max_line
                };
                ev.push(ClientEvent::Reply(b"* BYE Line too long\r\n".to_vec()));
                ev.push(ClientEvent::Close(ImapError::ClientLineTooLong(cap)));
                return ev;
            }
            if !done {
                break;
            }
            let line = self.cline.take();
            let result = self.client_part(line, &mut ev);
            if matches!(ev.last(), Some(ClientEvent::Close(_))) {
                return ev;
            }
            match result {
                Ok(true) => {
                    self.cline.take();
                    break;
                }
                Ok(false) => {}
                Err(err) => {
                    ev.push(ClientEvent::Close(err));
                    return ev;
                }
            }
        }
        ev
    }

    /// The client closed its side. Returns `Close` when it stopped inside a command (a literal
    /// or a line part): nothing of a pre-login command cut short was forwarded after the last
    /// complete part.
    pub fn client_eof(&mut self) -> Vec<ClientEvent> {
        if self.cmd.is_some() || !self.cline.is_empty() {
            self.cmd = None;
            self.cline.take();
            return vec![ClientEvent::Close(ImapError::Truncated)];
        }
        Vec::new()
    }

    /// Learns the LOGIN user name once the first argument is complete.
    fn learn_account(&mut self, ev: &mut Vec<ClientEvent>) {
        let Some(cmd) = self.cmd.as_mut() else {
            return;
        };
        if cmd.account_known || cmd.discard || cmd.verb != b"LOGIN" {
            return;
        }
        let Some(user) = cmd.args.first() else {
            return;
        };
        match sasl::account_name(user) {
            Ok(name) => {
                cmd.account_known = true;
                self.user = Some(name.clone());
                self.login_tag.clone_from(&cmd.tag);
                ev.push(ClientEvent::Account(name));
            }
            Err(err) => {
                cmd.discard = true;
                let mut out = cmd.tag.clone();
                out.extend_from_slice(b" BAD Invalid user name\r\n");
                let forwarded = cmd.forwarded;
                ev.push(ClientEvent::Reply(out));
                ev.push(ClientEvent::Refused(err.into()));
                if forwarded {
                    // Part of the command already reached the backend.
                    ev.push(ClientEvent::Close(ImapError::BadCommand));
                }
            }
        }
    }

    fn reply(&self, ev: &mut Vec<ClientEvent>, tag: &[u8], text: &str) {
        let mut out = tag.to_vec();
        out.push(b' ');
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
        ev.push(ClientEvent::Reply(out));
    }

    /// One client line part. Returns Ok(true) after STARTTLS.
    fn client_part(&mut self, line: Line, ev: &mut Vec<ClientEvent>) -> Result<bool, ImapError> {
        // Client lines are whole: client() ends the session on an overlong one.
        let raw_text = line.text().to_vec();
        let literal = trailing_literal(&raw_text)?;
        if !self.logged_in {
            if let Some((lit, _)) = literal {
                if lit.len > self.cfg.max_literal as u64 {
                    ev.push(ClientEvent::Reply(b"* BYE Literal too large\r\n".to_vec()));
                    return Err(ImapError::ClientLiteralTooLarge {
                        len: lit.len,
                        max: self.cfg.max_literal,
                    });
                }
            }
        }
        let text: &[u8] = match literal {
            Some((_, before)) => before,
            None => line.text(),
        };
        let first = self.cmd.is_none();
        if first {
            if self.idle {
                self.idle = false;
                ev.push(ClientEvent::IdleDone);
                ev.push(ClientEvent::Forward(line.head));
                return Ok(false);
            }
            if let Some((tag, exchange)) = self.sasl.as_mut().filter(|(_, x)| !x.is_done()) {
                if text == b"*" {
                    ev.push(ClientEvent::Forward(line.head));
                    return Ok(false);
                }
                match exchange.response(text) {
                    Ok(Some(account)) => {
                        self.login_tag.clone_from(tag);
                        self.user = Some(account.clone());
                        ev.push(ClientEvent::Account(account));
                        ev.push(ClientEvent::Forward(line.head));
                    }
                    Ok(None) => ev.push(ClientEvent::Forward(line.head)),
                    Err(err) => {
                        ev.push(ClientEvent::Refused(err.into()));
                        ev.push(ClientEvent::Forward(b"*\r\n".to_vec()));
                    }
                }
                return Ok(false);
            }
        }
        let words = strings(text);
        let mut cmd = self.cmd.take().unwrap_or_default();
        let mut starttls = false;
        match words {
            Ok(words) if first => {
                let mut words = words.into_iter();
                cmd.tag = words.next().unwrap_or_default();
                cmd.verb = words.next().unwrap_or_default().to_ascii_uppercase();
                cmd.args = words.take(MAX_ARGS).collect();
                ev.push(ClientEvent::Command {
                    tag: String::from_utf8_lossy(&cmd.tag).into_owned(),
                    verb: String::from_utf8_lossy(&cmd.verb).into_owned(),
                });
                starttls = self.start_command(&mut cmd, literal.is_some(), ev);
            }
            Ok(words) => {
                let room = MAX_ARGS.saturating_sub(cmd.args.len());
                cmd.args.extend(words.into_iter().take(room));
            }
            Err(_) if !self.logged_in && !cmd.discard => {
                cmd.discard = true;
                let tag = if first {
                    text.split(|b| *b == b' ')
                        .next()
                        .unwrap_or_default()
                        .to_vec()
                } else {
                    cmd.tag.clone()
                };
                self.reply(ev, &tag, "BAD Command cannot be read");
            }
            Err(_) => {}
        }
        self.cmd = Some(cmd);
        if !self.logged_in {
            self.learn_account(ev);
        }
        let Some(cmd) = self.cmd.as_mut() else {
            return Ok(starttls);
        };
        if cmd.verb == b"LOGIN" && !cmd.account_known && !cmd.discard && literal.is_none() {
            cmd.discard = true;
            let tag = cmd.tag.clone();
            self.reply(ev, &tag, "BAD LOGIN needs a user name");
        }
        let Some(cmd) = self.cmd.as_mut() else {
            return Ok(starttls);
        };
        if !cmd.discard {
            cmd.forwarded = true;
            ev.push(ClientEvent::Forward(line.head));
        }
        match literal {
            // A refused command's synchronizing literal is never sent by the client.
            Some((lit, _)) if !(cmd.discard && lit.sync) => {
                cmd.literal_left = lit.len;
                let keep = !self.logged_in
                    || (matches!(cmd.verb.as_slice(), b"SELECT" | b"EXAMINE")
                        && cmd.args.is_empty()
                        && lit.len <= self.cfg.max_mailbox as u64);
                cmd.capture = keep.then(Vec::new);
                if lit.len == 0 {
                    if cmd.args.len() < MAX_ARGS {
                        cmd.args.push(Vec::new());
                    }
                    cmd.capture = None;
                }
            }
            _ => {
                let done = self.cmd.take().unwrap_or_default();
                if !done.discard {
                    self.command_complete(done, ev);
                }
            }
        }
        Ok(starttls)
    }

    /// Checks a command at its first line part. Returns true for STARTTLS.
    fn start_command(
        &mut self,
        cmd: &mut Command,
        has_literal: bool,
        ev: &mut Vec<ClientEvent>,
    ) -> bool {
        let before_login = !self.logged_in;
        if self.pending.len() >= MAX_PENDING {
            cmd.discard = true;
            ev.push(ClientEvent::Reply(
                b"* BYE Too many commands in flight\r\n".to_vec(),
            ));
            ev.push(ClientEvent::Close(ImapError::TooManyCommands(MAX_PENDING)));
            return false;
        }
        match cmd.verb.as_slice() {
            b"STARTTLS" if before_login && !self.tls && self.cfg.offer_starttls => {
                cmd.discard = true;
                self.reply(ev, &cmd.tag, "OK Begin TLS negotiation now.");
                ev.push(ClientEvent::StartTls);
                return true;
            }
            b"STARTTLS" => {
                cmd.discard = true;
                self.reply(ev, &cmd.tag, "BAD STARTTLS is not available.");
            }
            b"LOGIN" | b"AUTHENTICATE"
                if before_login && !self.plaintext_ok() && {
                    let mech = cmd
                        .args
                        .first()
                        .map(|m| String::from_utf8_lossy(m).into_owned());
                    cmd.verb == b"LOGIN" || mech.is_some_and(|m| Mechanism::parse(&m).is_visible())
                } =>
            {
                cmd.discard = true;
                self.reply(
                    ev,
                    &cmd.tag,
                    "NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.",
                );
            }
            b"AUTHENTICATE" if before_login => {
                let name = cmd
                    .args
                    .first()
                    .map(|m| String::from_utf8_lossy(m).into_owned());
                let mechanism = Mechanism::parse(&name.unwrap_or_default());
                if !mechanism.is_visible() && !self.cfg.pass_through_opaque || has_literal {
                    cmd.discard = true;
                    self.reply(ev, &cmd.tag, "NO Unsupported authentication mechanism.");
                    return false;
                }
                let mut exchange = Exchange::new(mechanism);
                self.user = None;
                if let Some(initial) = cmd.args.get(1) {
                    match exchange.response(initial) {
                        Ok(Some(account)) => {
                            self.user = Some(account.clone());
                            self.login_tag.clone_from(&cmd.tag);
                            ev.push(ClientEvent::Account(account));
                        }
                        Ok(None) => {}
                        Err(err) => {
                            cmd.discard = true;
                            self.reply(ev, &cmd.tag, "BAD Invalid SASL initial response.");
                            ev.push(ClientEvent::Refused(err.into()));
                            return false;
                        }
                    }
                }
                self.sasl = Some((cmd.tag.clone(), exchange));
            }
            b"COMPRESS" => {
                cmd.discard = true;
                self.reply(
                    ev,
                    &cmd.tag,
                    "NO COMPRESS is not available through this proxy.",
                );
            }
            _ => {}
        }
        false
    }

    /// A complete, forwarded command.
    fn command_complete(&mut self, cmd: Command, ev: &mut Vec<ClientEvent>) {
        self.outstanding += 1;
        let watch = match cmd.verb.as_slice() {
            // Captured now: a pipelined LOGIN must not rename this one.
            b"LOGIN" if !self.logged_in => Some(Pending::Login(self.user.clone())),
            b"AUTHENTICATE" if !self.logged_in => Some(Pending::Login(None)),
            b"SELECT" | b"EXAMINE" => Some(Pending::Select(
                cmd.args
                    .first()
                    .filter(|m| m.len() <= self.cfg.max_mailbox)
                    .map(|m| String::from_utf8_lossy(m).into_owned()),
            )),
            b"CLOSE" | b"UNSELECT" => Some(Pending::Deselect),
            b"LOGOUT" => {
                self.logout_sent = true;
                ev.push(ClientEvent::Logout);
                Some(Pending::Logout)
            }
            b"IDLE" => {
                self.idle = true;
                ev.push(ClientEvent::Idle);
                Some(Pending::Idle)
            }
            _ => None,
        };
        if let Some(watch) = watch {
            // start_command keeps this below MAX_PENDING.
            self.pending.insert(cmd.tag, watch);
        }
    }

    /// Feeds bytes from the backend.
    pub fn server(&mut self, data: &[u8]) -> Vec<ServerEvent> {
        let mut ev = Vec::new();
        let mut at = 0;
        let mut relay_from = self.logged_in.then_some(0);
        while at < data.len() {
            if self.resp.literal_left > 0 {
                let take = (self.resp.literal_left.min((data.len() - at) as u64)) as usize;
                if let Some(section) = self.resp.fetch.as_mut().and_then(|f| f.counting.as_mut()) {
                    section.bytes += take as u64;
                }
                if !self.logged_in {
                    ev.push(ServerEvent::Forward(data[at..at + take].to_vec()));
                }
                at += take;
                self.resp.literal_left -= take as u64;
                if self.resp.literal_left == 0 {
                    self.section_done();
                }
                continue;
            }
            if !self.resp.started && !self.resp.continued && self.sline.is_empty() {
                self.resp.started = true;
                if self.logout_sent && !self.logout_reply && self.outstanding <= 1 {
                    self.logout_reply = true;
                    ev.push(ServerEvent::LogoutReply);
                }
            }
            let (took, done) = self.sline.push(&data[at..]);
            at += took;
            if !self.logged_in && self.sline.overflowed() {
                ev.push(ServerEvent::Close(ImapError::BackendLineTooLong(
                    self.cfg.max_line,
                )));
                return ev;
            }
            if !done {
                break;
            }
            let line = self.sline.take();
            let was_logged_in = self.logged_in;
            if let Err(err) = self.server_part(line, &mut ev) {
                ev.push(ServerEvent::Close(err));
                return ev;
            }
            if self.logged_in && !was_logged_in {
                relay_from = Some(at);
            }
        }
        match relay_from {
            Some(0) if !data.is_empty() => ev.push(ServerEvent::ForwardInput),
            Some(from) if from > 0 && from < data.len() => {
                ev.push(ServerEvent::Forward(data[from..].to_vec()))
            }
            _ => {}
        }
        ev
    }

    /// The backend closed its side: reports a FETCH response cut short.
    pub fn server_eof(&mut self) -> Vec<ServerEvent> {
        let mut ev = Vec::new();
        self.section_done();
        if let Some(fetch) = self.resp.fetch.take() {
            self.fetched(fetch, false, &mut ev);
        }
        ev
    }

    fn section_done(&mut self) {
        if let Some(fetch) = self.resp.fetch.as_mut() {
            if let Some(section) = fetch.counting.take() {
                if fetch.sections.len() < MAX_SECTIONS {
                    fetch.sections.push(section);
                } else if let Some(last) = fetch.sections.last_mut() {
                    // Past the cap, the bytes still count, under one summary name.
                    last.section = MORE_SECTIONS.to_owned();
                    last.bytes += section.bytes;
                }
            }
        }
    }

    fn fetched(&self, fetch: FetchAcc, complete: bool, ev: &mut Vec<ServerEvent>) {
        if fetch.sections.is_empty() {
            return;
        }
        ev.push(ServerEvent::Fetched(Fetch {
            mailbox: self.mailbox.clone(),
            seq: fetch.seq,
            uid: fetch.uid,
            sections: fetch.sections,
            complete,
        }));
    }

    /// One backend line part (a whole response line, or the part of one before a literal).
    fn server_part(&mut self, line: Line, ev: &mut Vec<ServerEvent>) -> Result<(), ImapError> {
        let first = !self.resp.continued;
        let tail_text = strip_eol(&line.tail).to_vec();
        let seen = if line.is_whole() {
            line.text()
        } else {
            &tail_text[..]
        };
        let literal = match trailing_literal(seen) {
            Ok(lit) => lit.map(|(lit, before)| (lit, section_before(before).to_vec())),
            Err(_) if self.logged_in => None,
            Err(err) => return Err(err),
        };
        let was_logged_in = self.logged_in;
        if first {
            self.first_part(line.text(), ev);
        }
        if let Some(fetch) = self.resp.fetch.as_mut() {
            scan_fetch(fetch, line.text());
            if let Some((_, section)) = &literal {
                fetch.counting = counted(section).then(|| SectionBytes {
                    section: String::from_utf8_lossy(section).into_owned(),
                    bytes: 0,
                });
            }
        }
        if !was_logged_in {
            let out = if literal.is_none() && first {
                rewrite_line(line.text(), self).map(|mut out| {
                    out.extend_from_slice(b"\r\n");
                    out
                })
            } else {
                None
            };
            ev.push(ServerEvent::Forward(out.unwrap_or(line.head)));
        }
        match literal {
            Some((lit, _)) => {
                self.resp.continued = true;
                self.resp.literal_left = lit.len;
                if lit.len == 0 {
                    self.section_done();
                }
            }
            None => {
                if let Some(fetch) = self.resp.fetch.take() {
                    self.fetched(fetch, true, ev);
                }
                self.resp = Response::default();
            }
        }
        Ok(())
    }

    fn login(&mut self, account: Option<String>, ev: &mut Vec<ServerEvent>) {
        self.logged_in = true;
        self.account = account.clone();
        self.cline.set_cap(self.cfg.max_line_after_login);
        self.sline.set_cap(self.cfg.max_line_after_login);
        ev.push(ServerEvent::LoggedIn { account });
    }

    /// The first part of a backend response: greeting, tagged completion or FETCH start.
    fn first_part(&mut self, text: &[u8], ev: &mut Vec<ServerEvent>) {
        let mut words = text.split(|b| *b == b' ');
        let first = words.next().unwrap_or_default();
        let second = words.next().unwrap_or_default().to_ascii_uppercase();
        if !self.greeted {
            self.greeted = true;
            let preauth = first == b"*" && second == b"PREAUTH";
            ev.push(ServerEvent::Greeting {
                ok: first == b"*" && (second == b"OK" || preauth),
            });
            if preauth {
                self.login(None, ev);
            }
            return;
        }
        if first == b"+" {
            return;
        }
        if first == b"*" {
            let third = words.next().unwrap_or_default();
            if self.logged_in && third.eq_ignore_ascii_case(b"FETCH") {
                if let Some(seq) = std::str::from_utf8(&second)
                    .ok()
                    .and_then(|n| n.parse().ok())
                {
                    self.resp.fetch = Some(FetchAcc {
                        seq,
                        ..FetchAcc::default()
                    });
                }
            }
            return;
        }
        self.outstanding = self.outstanding.saturating_sub(1);
        let ok = second == b"OK";
        if self.sasl.as_ref().is_some_and(|(tag, _)| tag == first) {
            self.sasl = None;
        }
        match self.pending.remove(first) {
            // A second login after the first succeeded changes nothing.
            Some(Pending::Login(user)) if !self.logged_in => {
                let account = user.or_else(|| self.user.clone());
                if ok {
                    self.login_tag = first.to_vec();
                    self.login(account, ev);
                } else {
                    ev.push(ServerEvent::LoginFailed {
                        account,
                        reply: String::from_utf8_lossy(text).into_owned(),
                    });
                }
            }
            Some(Pending::Select(mailbox)) => self.mailbox = if ok { mailbox } else { None },
            Some(Pending::Deselect) if ok => self.mailbox = None,
            // IDLE refused (or ended): the client sends no DONE.
            Some(Pending::Idle) => self.idle = false,
            _ => {}
        }
    }
}

/// Follows a FETCH response's items for `UID n` at the top level of its list.
fn scan_fetch(fetch: &mut FetchAcc, text: &[u8]) {
    fn end_atom(fetch: &mut FetchAcc, atom: &mut Vec<u8>) {
        if atom.is_empty() {
            return;
        }
        if fetch.depth == 1 {
            if fetch.after_uid {
                fetch.uid = std::str::from_utf8(atom).ok().and_then(|n| n.parse().ok());
            }
            fetch.after_uid = atom.eq_ignore_ascii_case(b"UID");
        }
        atom.clear();
    }
    let mut atom = Vec::new();
    let (mut quoted, mut escape, mut bracket) = (false, false, 0u32);
    for &b in text {
        if quoted {
            if escape {
                escape = false;
            } else if b == b'\\' {
                escape = true;
            } else if b == b'"' {
                quoted = false;
            }
            continue;
        }
        match b {
            b'"' => {
                end_atom(fetch, &mut atom);
                fetch.after_uid = false;
                quoted = true;
            }
            b'[' => {
                bracket += 1;
                atom.push(b);
            }
            b']' => {
                bracket = bracket.saturating_sub(1);
                atom.push(b);
            }
            b'(' if bracket == 0 => {
                end_atom(fetch, &mut atom);
                fetch.depth = fetch.depth.saturating_add(1);
            }
            b')' if bracket == 0 => {
                end_atom(fetch, &mut atom);
                fetch.depth = fetch.depth.saturating_sub(1);
            }
            b' ' if bracket == 0 => end_atom(fetch, &mut atom),
            _ if atom.len() < 64 => atom.push(b),
            _ => {}
        }
    }
    end_atom(fetch, &mut atom);
}

#[cfg(test)]
mod tests {
    use super::super::split::{
        proxied, recorded, replay_unchanged, same_for_every_split, sent_by, transcript, Dir, Out,
        Proxied, Seen,
    };
    use super::*;
    use Dir::{CEof, SEof, C, S};

    proxied!(ImapSession);

    fn tls() -> ImapConfig {
        ImapConfig {
            tls: true,
            ..ImapConfig::default()
        }
    }

    fn check(cfg: &ImapConfig, steps: &[(Dir, &[u8])]) -> Seen {
        transcript(|| ImapSession::new(cfg.clone()), steps)
    }

    const GREETING: &[u8] = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR AUTH=PLAIN AUTH=SCRAM-SHA-256 AUTH=XOAUTH2 COMPRESS=DEFLATE STARTTLS] ready\r\n";

    #[test]
    fn whole_session_meters_fetch_literals() {
        // The first literal holds what looks like a response end and another FETCH.
        let body = b"Subject: )\r\n\r\n* 9 FETCH (UID 99 BODY[] {3}\r\nabc)\r\na1 OK x\r\n";
        let mut fetch =
            format!("* 1 FETCH (FLAGS (\\Seen) BODY[] {{{}}}\r\n", body.len()).into_bytes();
        fetch.extend_from_slice(body);
        fetch.extend_from_slice(b" UID 41 BODY[HEADER.FIELDS (FROM TO)] {7}\r\nFrom: x");
        fetch.extend_from_slice(b" ENVELOPE (NIL {2}\r\nhi NIL))\r\n");
        fetch.extend_from_slice(b"* 2 FETCH (UID 42 FLAGS ())\r\nb3 OK Fetch completed.\r\n");
        let seen = check(
            &tls(),
            &[
                (S, GREETING),
                (C, b"a1 LOGIN \"al\\\"ice\" \"pw\"\r\n"),
                (
                    S,
                    b"a1 OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE IDLE] Logged in\r\n",
                ),
                (C, b"b2 SELECT \"INBOX\"\r\n"),
                (S, b"* 2 EXISTS\r\nb2 OK [READ-WRITE] Select completed.\r\n"),
                (C, b"b3 FETCH 1:2 (UID BODY.PEEK[])\r\n"),
                (S, &fetch),
                (C, b"b4 LOGOUT\r\n"),
                (S, b"* BYE Logging out\r\nb4 OK Logout completed.\r\n"),
            ],
        );
        assert_eq!(
            seen.events,
            vec![
                "Greeting { ok: true }".to_string(),
                "Account(\"al\\\"ice\")".into(),
                "LoggedIn { account: Some(\"al\\\"ice\") }".into(),
                format!(
                    "Fetched(Fetch {{ mailbox: Some(\"INBOX\"), seq: 1, uid: Some(41), sections: [SectionBytes {{ section: \"BODY[]\", bytes: {} }}, SectionBytes {{ section: \"BODY[HEADER.FIELDS (FROM TO)]\", bytes: 7 }}], complete: true }})",
                    body.len()
                ),
                "Logout".into(),
                "LogoutReply".into(),
            ]
        );
        assert_eq!(
            seen.commands,
            [
                "Command { tag: \"a1\", verb: \"LOGIN\" }",
                "Command { tag: \"b2\", verb: \"SELECT\" }",
                "Command { tag: \"b3\", verb: \"FETCH\" }",
                "Command { tag: \"b4\", verb: \"LOGOUT\" }",
            ]
        );
        let text = String::from_utf8(seen.to_client).unwrap();
        assert!(text.starts_with(
            "* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR AUTH=PLAIN] ready\r\n\
             a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
        ));
        assert!(text.ends_with("b4 OK Logout completed.\r\n"));
    }

    #[test]
    fn login_with_literals_sync_and_non_sync() {
        let seen = check(
            &tls(),
            &[
                (S, b"* OK hi\r\n"),
                (C, b"a LOGIN {5}\r\n"),
                (S, b"+ OK\r\n"),
                (C, b"alice {6+}\r\nsecret\r\n"),
                (S, b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
                (C, b"b LOGIN bob {2+}\r\npw\r\n"),
                (S, b"b OK Logged in\r\n"),
                (C, b"c IDLE\r\n"),
                (S, b"+ idling\r\n"),
                (C, b"DONE\r\n"),
            ],
        );
        assert_eq!(
            seen.events,
            [
                "Greeting { ok: true }",
                "Account(\"alice\")",
                "LoginFailed { account: Some(\"alice\"), reply: \"a NO [AUTHENTICATIONFAILED] Authentication failed.\" }",
                "Account(\"bob\")",
                "LoggedIn { account: Some(\"bob\") }",
                "Idle",
                "IdleDone",
            ]
        );
        assert_eq!(
            seen.to_backend,
            b"a LOGIN {5}\r\nalice {6+}\r\nsecret\r\nb LOGIN bob {2+}\r\npw\r\nc IDLE\r\nDONE\r\n"
        );
    }

    #[test]
    fn the_account_is_known_before_the_password_is_forwarded() {
        let mut s = ImapSession::new(tls());
        s.server(b"* OK hi\r\n");
        let ev = s.client(b"a LOGIN alice secret\r\n");
        assert_eq!(
            ev,
            vec![
                ClientEvent::Command {
                    tag: "a".into(),
                    verb: "LOGIN".into()
                },
                ClientEvent::Account("alice".into()),
                ClientEvent::Forward(b"a LOGIN alice secret\r\n".to_vec())
            ]
        );
        let ev = s.server(b"a OK [CAPABILITY IMAP4rev1] in\r\n* 1 EXISTS\r\n");
        assert_eq!(
            ev,
            vec![
                ServerEvent::LoggedIn {
                    account: Some("alice".into())
                },
                ServerEvent::Forward(b"a OK [CAPABILITY IMAP4rev1] in\r\n".to_vec()),
                ServerEvent::Forward(b"* 1 EXISTS\r\n".to_vec()),
            ]
        );
        assert_eq!(s.server(b"* 2 EXISTS\r\n"), vec![ServerEvent::ForwardInput]);
    }

    #[test]
    fn authenticate_plain_with_sasl_ir_and_login_without() {
        let seen = check(
            &tls(),
            &[
                (S, b"* OK hi\r\n"),
                (C, b"a AUTHENTICATE PLAIN AGJvYgBwdw==\r\n"),
                (S, b"a NO [AUTHENTICATIONFAILED] no\r\n"),
                (C, b"b AUTHENTICATE LOGIN\r\n"),
                (S, b"+ VXNlcm5hbWU6\r\n"),
                (C, b"Y2Fyb2w=\r\n"),
                (S, b"+ UGFzc3dvcmQ6\r\n"),
                (C, b"cHc=\r\n"),
                (S, b"b OK Logged in\r\n"),
                (C, b"c NOOP\r\n"),
            ],
        );
        assert_eq!(
            seen.events,
            [
                "Greeting { ok: true }",
                "Account(\"bob\")",
                "LoginFailed { account: Some(\"bob\"), reply: \"a NO [AUTHENTICATIONFAILED] no\" }",
                "Account(\"carol\")",
                "LoggedIn { account: Some(\"carol\") }",
            ]
        );
        assert!(seen.to_backend.ends_with(b"cHc=\r\nc NOOP\r\n"));
    }

    #[test]
    fn huge_literal_before_login_closes_before_any_byte_is_read() {
        let mut s = ImapSession::new(tls());
        s.server(b"* OK hi\r\n");
        let ev = s.client(b"a LOGIN {2147483648}\r\nxxxx");
        assert_eq!(
            ev,
            vec![
                ClientEvent::Reply(b"* BYE Literal too large\r\n".to_vec()),
                ClientEvent::Close(ImapError::ClientLiteralTooLarge {
                    len: 2_147_483_648,
                    max: PRE_LOGIN_MAX
                })
            ]
        );
    }

    #[test]
    fn overlong_lines_before_login_close_and_after_login_are_skipped() {
        let mut s = ImapSession::new(tls());
        s.server(b"* OK hi\r\n");
        assert!(s.client(&[b'a'; PRE_LOGIN_MAX]).is_empty());
        assert_eq!(
            s.client(b"a").last(),
            Some(&ClientEvent::Close(ImapError::ClientLineTooLong(
                PRE_LOGIN_MAX
            )))
        );
        // After login a long response line ending in a literal is still framed exactly.
        let mut s = ImapSession::new(tls());
        s.server(b"* OK hi\r\n");
        s.client(b"a LOGIN u p\r\n");
        s.server(b"a OK in\r\n");
        let mut line = b"* 1 FETCH (UID 7 X-LONG \"".to_vec();
        line.extend(std::iter::repeat_n(b'x', 100_000));
        line.extend_from_slice(b"\" BODY[] {3}\r\nabc)\r\n");
        let ev = s.server(&line);
        assert_eq!(ev.len(), 2, "{ev:?}");
        let ServerEvent::Fetched(fetch) = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(fetch.sections[0].bytes, 3);
        assert_eq!(fetch.uid, Some(7));
    }

    #[test]
    fn eof_inside_literals() {
        // The client stops inside the user-name literal: nothing of it reached the backend.
        let seen = check(
            &tls(),
            &[
                (S, b"* OK hi\r\n"),
                (C, b"a LOGIN {5}\r\n"),
                (S, b"+ OK\r\n"),
                (C, b"ali"),
                (CEof, b""),
            ],
        );
        assert_eq!(seen.to_backend, b"a LOGIN {5}\r\n");
        assert_eq!(seen.events.last().unwrap(), "Close(Truncated)");
        // The backend stops inside a FETCH literal: the bytes forwarded are metered.
        let seen = check(
            &tls(),
            &[
                (S, b"* OK hi\r\n"),
                (C, b"a LOGIN u p\r\n"),
                (S, b"a OK in\r\n"),
                (C, b"b UID FETCH 5 BINARY[1]\r\n"),
                (S, b"* 3 FETCH (UID 5 BINARY[1] ~{10}\r\n12345"),
                (SEof, b""),
            ],
        );
        assert_eq!(
            seen.events.last().unwrap(),
            "Fetched(Fetch { mailbox: None, seq: 3, uid: Some(5), sections: [SectionBytes { section: \"BINARY[1]\", bytes: 5 }], complete: false })"
        );
    }

    #[test]
    fn starttls_plaintext_refusal_and_capabilities_before_tls() {
        let seen = check(
            &ImapConfig::default(),
            &[
                (S, GREETING),
                (C, b"a LOGIN alice pw\r\n"),
                (C, b"b AUTHENTICATE PLAIN\r\n"),
                (C, b"c AUTHENTICATE GSSAPI\r\n"),
                (C, b"d CAPABILITY\r\n"),
                (
                    S,
                    b"* CAPABILITY IMAP4rev1 AUTH=PLAIN LOGINDISABLED\r\nd OK done\r\n",
                ),
                (C, b"e STARTTLS\r\n"),
                (C, b"f LOGIN alice pw\r\n"),
            ],
        );
        let text = String::from_utf8(seen.to_client).unwrap();
        assert!(text.starts_with(
            "* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR STARTTLS LOGINDISABLED] ready\r\n"
        ));
        assert_eq!(text.matches("a NO [PRIVACYREQUIRED]").count(), 1);
        assert_eq!(text.matches("b NO [PRIVACYREQUIRED]").count(), 1);
        assert!(text.contains("c NO Unsupported authentication mechanism.\r\n"));
        assert!(text.contains("* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\nd OK done\r\n"));
        assert!(text.ends_with("e OK Begin TLS negotiation now.\r\n"));
        assert_eq!(seen.to_backend, b"d CAPABILITY\r\nf LOGIN alice pw\r\n");
        assert_eq!(seen.events[1..], ["StartTls", "Account(\"alice\")"]);
    }

    #[test]
    fn commands_after_starttls_in_the_same_chunk_are_dropped() {
        let mut s = ImapSession::new(ImapConfig::default());
        let ev = s.client(b"a STARTTLS\r\nb LOGIN mallory pw\r\n");
        assert_eq!(ev.last(), Some(&ClientEvent::StartTls));
        assert_eq!(ev.len(), 3, "Command, Reply, StartTls: {ev:?}");
    }

    #[test]
    fn bad_input_before_login() {
        let seen = check(
            &tls(),
            &[
                // Pipelined before the greeting, with an unexpected continuation from the backend.
                (C, b"a CAPABILITY\r\nb LOGIN\r\nc LOGIN \"unterminated\r\n"),
                (
                    S,
                    b"* OK hi\r\n+ what\r\n* CAPABILITY IMAP4rev1 COMPRESS=DEFLATE\r\na OK\r\n",
                ),
                (C, b"d LOGIN \"a\0b\" pw\r\n"),
                (C, b"e AUTHENTICATE PLAIN %%%\r\n"),
                (C, b"f AUTHENTICATE LOGIN\r\n"),
                (S, b"+ VXNlcm5hbWU6\r\n"),
                (C, b"!!\r\n"),
                (S, b"f BAD cancelled\r\n"),
            ],
        );
        let text = String::from_utf8(seen.to_client).unwrap();
        assert!(text.contains("b BAD LOGIN needs a user name\r\n"), "{text}");
        assert!(text.contains("c BAD Command cannot be read\r\n"));
        assert!(text.contains("+ what\r\n* CAPABILITY IMAP4rev1\r\na OK\r\n"));
        assert!(text.contains("d BAD Invalid user name\r\n"));
        assert!(text.contains("e BAD Invalid SASL initial response.\r\n"));
        assert_eq!(
            seen.to_backend,
            b"a CAPABILITY\r\nf AUTHENTICATE LOGIN\r\n*\r\n"
        );
        assert!(seen
            .events
            .last()
            .unwrap()
            .starts_with("LoginFailed { account: None"));
    }

    #[test]
    fn compress_is_refused_after_login_and_mailbox_follows_select() {
        let seen = check(
            &tls(),
            &[
                (S, b"* PREAUTH hi\r\n"),
                (C, b"a COMPRESS DEFLATE\r\nb EXAMINE {5+}\r\nSpam!\r\n"),
                (S, b"b OK [READ-ONLY] done\r\n"),
                (C, b"c FETCH 1 RFC822\r\nd SELECT nope\r\n"),
                (
                    S,
                    b"* 1 FETCH (RFC822 {0}\r\n)\r\nc OK\r\nd NO no such mailbox\r\n",
                ),
                (C, b"e FETCH 1 RFC822.TEXT\r\n"),
                (
                    S,
                    b"* 1 FETCH (RFC822.TEXT {2}\r\nhi)\r\ne BAD no mailbox\r\n",
                ),
            ],
        );
        assert_eq!(seen.to_backend, b"b EXAMINE {5+}\r\nSpam!\r\nc FETCH 1 RFC822\r\nd SELECT nope\r\ne FETCH 1 RFC822.TEXT\r\n");
        assert!(seen.to_client.starts_with(b"* PREAUTH hi\r\na NO COMPRESS"));
        assert_eq!(
            seen.events,
            [
                "Greeting { ok: true }",
                "LoggedIn { account: None }",
                "Fetched(Fetch { mailbox: Some(\"Spam!\"), seq: 1, uid: None, sections: [SectionBytes { section: \"RFC822\", bytes: 0 }], complete: true })",
                "Fetched(Fetch { mailbox: None, seq: 1, uid: None, sections: [SectionBytes { section: \"RFC822.TEXT\", bytes: 2 }], complete: true })",
            ]
        );
    }

    #[test]
    fn refused_idle_expects_no_done() {
        let seen = check(
            &tls(),
            &[
                (S, b"* OK hi\r\n"),
                (C, b"a LOGIN u p\r\n"),
                (S, b"a OK in\r\n"),
                (C, b"b IDLE\r\n"),
                (S, b"b BAD IDLE not now\r\n"),
                (C, b"c SELECT Work\r\nd FETCH 1 BODY[]\r\n"),
                (S, b"c OK done\r\n* 1 FETCH (BODY[] {1}\r\nx)\r\nd OK\r\n"),
            ],
        );
        assert_eq!(
            seen.events[3..],
            [
                "Idle",
                "Fetched(Fetch { mailbox: Some(\"Work\"), seq: 1, uid: None, sections: [SectionBytes { section: \"BODY[]\", bytes: 1 }], complete: true })"
            ]
        );
    }

    #[test]
    fn opaque_mechanisms_pass_through_when_configured() {
        let cfg = ImapConfig {
            pass_through_opaque: true,
            ..tls()
        };
        let seen = check(
            &cfg,
            &[
                (S, GREETING),
                (C, b"a AUTHENTICATE XOAUTH2 dXNlcj1h\r\n"),
                (S, b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n"),
                (C, b"\r\n"),
                (S, b"a OK done\r\n"),
            ],
        );
        let text = String::from_utf8(seen.to_client).unwrap();
        assert!(text.starts_with(
            "* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR AUTH=PLAIN AUTH=SCRAM-SHA-256 AUTH=XOAUTH2] ready\r\n"
        ));
        assert_eq!(seen.events[1..], ["LoggedIn { account: None }"]);
        assert_eq!(seen.to_backend, b"a AUTHENTICATE XOAUTH2 dXNlcj1h\r\n\r\n");
    }

    #[test]
    fn watched_commands_in_flight_are_bounded() {
        let mut s = ImapSession::new(tls());
        s.server(b"* PREAUTH hi\r\n");
        let many: String = (0..MAX_PENDING + 3)
            .map(|i| format!("t{i} SELECT x\r\n"))
            .collect();
        let ev = s.client(many.as_bytes());
        let forwarded = ev
            .iter()
            .filter(|e| matches!(e, ClientEvent::Forward(_)))
            .count();
        assert_eq!(forwarded, MAX_PENDING);
        assert_eq!(
            ev.last(),
            Some(&ClientEvent::Close(ImapError::TooManyCommands(MAX_PENDING)))
        );
    }

    /// Plays a recorded session once; returns (uid, section, bytes) of every metered section.
    fn meter(cfg: &ImapConfig, steps: &[(Dir, &[u8])]) -> Vec<(Option<u32>, String, u64)> {
        let mut s = ImapSession::new(cfg.clone());
        let mut sections = Vec::new();
        for (dir, bytes) in steps {
            if let S = dir {
                for event in s.server(bytes) {
                    if let ServerEvent::Fetched(f) = event {
                        assert_eq!(f.mailbox.as_deref(), Some("INBOX"));
                        for sec in f.sections {
                            sections.push((f.uid, sec.section, sec.bytes));
                        }
                    }
                }
            } else {
                s.client(bytes);
            }
        }
        sections
    }

    fn recorded_cfg() -> ImapConfig {
        ImapConfig {
            plaintext_login: true,
            offer_starttls: false,
            ..ImapConfig::default()
        }
    }

    #[test]
    fn dovecot_session_meters_what_dovecot_counts() {
        // testdata/README.md: "hdr_count=1 hdr_bytes=32 body_count=4 body_bytes=15254".
        let steps = recorded(include_bytes!("../testdata/dovecot-imap.transcript"));
        let cfg = recorded_cfg();
        let sections = meter(&cfg, &steps);
        let header: u64 = sections
            .iter()
            .filter(|s| s.1.contains("HEADER"))
            .map(|s| s.2)
            .sum();
        let body: Vec<_> = sections
            .iter()
            .filter(|s| !s.1.contains("HEADER"))
            .collect();
        assert_eq!((1, header), (1, 32), "{sections:?}");
        assert_eq!(body.len(), 4, "{sections:?}");
        assert_eq!(body.iter().map(|s| s.2).sum::<u64>(), 15254);
        assert_eq!(
            body.iter().map(|s| s.0).collect::<Vec<_>>(),
            [Some(1), Some(2), Some(3), None]
        );

        let seen = transcript(|| ImapSession::new(cfg.clone()), &steps);
        assert_eq!(seen.to_backend, sent_by(&steps, true));
        assert_eq!(seen.to_client, sent_by(&steps, false));
        assert_eq!(
            seen.events[1..3],
            ["Account(\"bob\")", "LoggedIn { account: Some(\"bob\") }"]
        );
        assert_eq!(seen.events.last().unwrap(), "LogoutReply");
    }

    #[test]
    fn stalwart_session_is_metered_and_its_oauth_mechanisms_hidden() {
        let steps = recorded(include_bytes!("../testdata/stalwart-imap.transcript"));
        let cfg = recorded_cfg();
        let sections = meter(&cfg, &steps);
        let want: Vec<(Option<u32>, String, u64)> = vec![
            (Some(1), "BODY[]".into(), 133),
            (Some(2), "BODY[]".into(), 157),
            (Some(3), "BODY[]".into(), 2795),
            (None, "BODY[HEADER.FIELDS (SUBJECT)]".into(), 32),
            (None, "BODY[TEXT]<2>".into(), 5),
        ];
        assert_eq!(sections, want);

        let seen = transcript(|| ImapSession::new(cfg.clone()), &steps);
        assert_eq!(seen.to_backend, sent_by(&steps, true));
        let backend = String::from_utf8(sent_by(&steps, false)).unwrap();
        let shown = backend.replacen(" AUTH=OAUTHBEARER AUTH=XOAUTH2]", "]", 1);
        assert_ne!(shown, backend);
        assert_eq!(String::from_utf8(seen.to_client).unwrap(), shown);
        assert_eq!(seen.events.last().unwrap(), "LogoutReply");
    }

    #[test]
    fn dovecot_authenticate_exchanges_and_idle() {
        let events = replay_unchanged(
            || ImapSession::new(recorded_cfg()),
            include_bytes!("../testdata/dovecot-imap-auth.transcript"),
        );
        assert_eq!(
            events,
            [
                "Greeting { ok: true }",
                "LoginFailed { account: None, reply: \"t1 BAD Authentication aborted by client.\" }",
                "Account(\"bob\")",
                "LoginFailed { account: Some(\"bob\"), reply: \"t2 NO [AUTHENTICATIONFAILED] Authentication failed.\" }",
                "Account(\"bob\")",
                "LoggedIn { account: Some(\"bob\") }",
                "Idle",
                "IdleDone",
                "Logout",
                "LogoutReply",
            ]
        );
    }

    #[test]
    fn sections_and_arguments_are_bounded() {
        let mut s = ImapSession::new(tls());
        s.server(b"* OK hi\r\n");
        s.client(b"a LOGIN u p\r\n");
        s.server(b"a OK in\r\n");
        let mut response = b"* 1 FETCH (".to_vec();
        for i in 0..MAX_SECTIONS + 10 {
            response.extend_from_slice(format!("BODY[{i}] {{1}}\r\nx ").as_bytes());
        }
        response.extend_from_slice(b"UID 5)\r\n");
        let ev = s.server(&response);
        let ServerEvent::Fetched(f) = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(f.sections.len(), MAX_SECTIONS);
        assert_eq!(f.sections[MAX_SECTIONS - 1].section, MORE_SECTIONS);
        assert_eq!(
            f.sections.iter().map(|s| s.bytes).sum::<u64>(),
            MAX_SECTIONS as u64 + 10
        );

        // Before login every literal is read whole (to find the user name), but only the first
        // arguments are kept.
        let mut s = ImapSession::new(tls());
        s.server(b"* OK hi\r\n");
        let mut command = b"b LOGIN".to_vec();
        for _ in 0..100 {
            command.extend_from_slice(b" {1+}\r\ny");
        }
        let mut ev = s.client(&command);
        assert_eq!(s.cmd.as_ref().map(|c| c.args.len()), Some(MAX_ARGS));
        ev.extend(s.client(b"\r\n"));
        command.extend_from_slice(b"\r\n");
        let forwarded: Vec<u8> = ev
            .iter()
            .flat_map(|e| match e {
                ClientEvent::Forward(b) => b.clone(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(forwarded, command);
        assert!(s.cmd.is_none());
    }

    #[test]
    fn pipelined_logins_keep_their_own_accounts() {
        let seen = check(
            &tls(),
            &[
                (S, b"* OK hi\r\n"),
                (C, b"a LOGIN alice pw\r\nb LOGIN bob pw\r\n"),
                (S, b"a OK in\r\nb BAD already logged in\r\n"),
            ],
        );
        assert_eq!(
            seen.events,
            [
                "Greeting { ok: true }",
                "Account(\"alice\")",
                "Account(\"bob\")",
                "LoggedIn { account: Some(\"alice\") }",
            ]
        );
    }

    /// The shell answers every login with `refuse_login` at its `Account` event.
    fn refused_at_account(chunks: &[Vec<&[u8]>]) -> (Vec<u8>, Vec<u8>, usize) {
        let mut p = ImapSession::new(tls());
        let (mut to_backend, mut to_client, mut closes) = (Vec::new(), Vec::new(), 0);
        p.server(b"* OK ready\r\n");
        for part in chunks.iter().flatten() {
            let mut events = p.client(part).into_iter();
            while let Some(e) = events.next() {
                match e {
                    ClientEvent::Forward(b) => to_backend.extend(b),
                    ClientEvent::Reply(b) => to_client.extend(b),
                    ClientEvent::Account(_) => {
                        events = p
                            .refuse_login("AUTHORIZATIONFAILED", "Not from there.")
                            .into_iter();
                    }
                    ClientEvent::Close(_) => {
                        closes += 1;
                        return (to_backend, to_client, closes);
                    }
                    _ => {}
                }
            }
        }
        (to_backend, to_client, closes)
    }

    #[test]
    fn a_refused_login_is_answered_with_its_tag_and_the_password_never_forwarded() {
        for (input, tag, forwarded) in [
            (
                &b"a1 LOGIN alice secret\r\na2 SELECT INBOX\r\n"[..],
                "a1",
                "",
            ),
            (b"x AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n", "x", ""),
            (
                b"y AUTHENTICATE PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\n",
                "y",
                "y AUTHENTICATE PLAIN\r\n",
            ),
            (
                b"z LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n",
                "z",
                "z LOGIN {5+}\r\n",
            ),
        ] {
            let (to_backend, to_client, closes) =
                same_for_every_split(&[input], refused_at_account);
            assert_eq!(String::from_utf8(to_backend).unwrap(), forwarded);
            let to_client = String::from_utf8(to_client).unwrap();
            assert_eq!(
                to_client,
                format!("{tag} NO [AUTHORIZATIONFAILED] Not from there.\r\n")
            );
            assert_eq!(closes, 1);
        }
    }

    #[test]
    fn after_the_backend_accepted_the_tag_is_the_logins() {
        let mut p = ImapSession::new(tls());
        p.server(b"* OK ready\r\n");
        p.client(b"t1 LOGIN bob pw\r\n");
        let ev = p.server(b"t1 OK Logged in\r\n");
        assert!(matches!(ev.first(), Some(ServerEvent::LoggedIn { .. })));
        assert_eq!(
            p.refuse_login("ALERT", "Pay up."),
            [
                ClientEvent::Reply(b"t1 NO [ALERT] Pay up.\r\n".to_vec()),
                ClientEvent::Close(ImapError::LoginRefused("Pay up.".into())),
            ]
        );
    }

    #[test]
    fn between_replies_outside_responses_and_while_idling() {
        let mut p = ImapSession::new(tls());
        p.server(b"* OK ready\r\n");
        p.client(b"a LOGIN bob pw\r\n");
        p.server(b"a OK done\r\n");
        assert!(p.between_replies());
        p.client(b"b FETCH 1 BODY[]\r\n");
        assert!(p.between_replies(), "no response started");
        p.server(b"* 1 FETCH (BODY[] {3}\r\nab");
        assert!(!p.between_replies(), "inside a literal");
        p.server(b"c)\r\nb OK do");
        assert!(!p.between_replies(), "inside a line");
        p.server(b"ne\r\n");
        assert!(p.between_replies());
        p.client(b"c IDLE\r\n");
        p.server(b"+ idling\r\n");
        assert!(p.between_replies(), "IDLE may be ended at once");
    }
}
