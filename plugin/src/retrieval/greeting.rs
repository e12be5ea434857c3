//! The backend's greeting, and whether the backend took the PROXY v2 header as a header.
//!
//! A backend listener that does not expect PROXY v2 (Dovecot without `haproxy = yes`, Stalwart
//! without `proxy.trusted-networks` covering the proxy) greets at once and reads the header as
//! commands: its signature holds CRLF CRLF NUL CRLF `QUIT` LF. Its answers to those lines come
//! after the greeting and before the answer to anything the client sends, so a client whose
//! commands were relayed at once would get the answers meant for the header (a desynchronised
//! session). So, with `proxy_protocol` on, the shell sends one command of its own after the
//! greeting and relays nothing of the client's before that command's answer came back clean:
//!
//! ```text
//! proxy -> backend   PROXY v2 header
//! backend -> proxy   +OK Dovecot ready.                 * OK [CAPABILITY ...] ready.
//! proxy -> backend   CAPA                               mailbell-probe NOOP
//! backend -> proxy   +OK / capability lines / .         mailbell-probe OK NOOP completed.
//! ```
//!
//! The header was not taken when anything else comes first: POP3 `-ERR` (Dovecot: `-ERR Unknown
//! command.` for the signature's empty line), IMAP `* BAD`, `* BYE` or another tag; or when the
//! backend closes before answering the probe. The greeting then goes to the session core as if
//! it had just arrived; the probe's answer is never relayed. A POP3 backend must support CAPA
//! (RFC 2449), as the core relies on it too.

use super::line::{one_line, strip_eol, LineBuf};
use super::PRE_LOGIN_MAX;

/// The IMAP probe's tag: never one of the client's (its commands go to the backend only after
/// the probe's answer).
const IMAP_TAG: &[u8] = b"mailbell-probe";

/// Why the backend cannot serve the session.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GreetingError {
    /// The backend read the PROXY header as commands; `answer` is its first answer to them.
    #[error(
        "backend did not accept the PROXY header \
         (check haproxy_trusted_networks / proxy.trusted-networks)"
    )]
    ProxyHeaderRefused { answer: String },
    #[error("backend line longer than {0} bytes before its greeting was checked")]
    LineTooLong(usize),
    #[error("backend closed the connection before its greeting")]
    ClosedBeforeGreeting,
    /// Closed after the greeting, before the probe's answer: as a backend that read the
    /// header's `QUIT` would.
    #[error(
        "backend closed the connection after its greeting: it did not accept the PROXY header \
         (check haproxy_trusted_networks / proxy.trusted-networks)"
    )]
    ClosedAfterGreeting,
}

/// Where the exchange stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    /// The probe's answer is awaited (POP3: its status line).
    Probe,
    /// POP3: inside the CAPA reply's lines, up to ".".
    Capa,
    Done,
}

/// The greeting and the probe, fed with what the backend sends.
#[derive(Debug)]
pub struct Greeting {
    imap: bool,
    probe: bool,
    state: State,
    line: LineBuf,
    greeting: Vec<u8>,
}

/// What feeding found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// More bytes are needed.
    More,
    /// The greeting came: send [`Greeting::probe_command`] now, then feed its answer.
    SendProbe,
    /// The backend is ready: `greeting` (and `rest`, bytes after the exchange) go to the core.
    Ready { greeting: Vec<u8>, rest: Vec<u8> },
}

impl Greeting {
    /// `probe`: check that the PROXY header was taken (with `proxy_protocol` on).
    pub fn new(imap: bool, probe: bool) -> Greeting {
        Greeting {
            imap,
            probe,
            state: State::Greeting,
            line: LineBuf::new(PRE_LOGIN_MAX),
            greeting: Vec::new(),
        }
    }

    /// The command the shell sends after [`Step::SendProbe`].
    pub fn probe_command(&self) -> &'static [u8] {
        if self.imap {
            b"mailbell-probe NOOP\r\n"
        } else {
            b"CAPA\r\n"
        }
    }

    /// Feeds bytes from the backend. Lines after the greeting in the same chunk are taken as
    /// answers to the probe (a backend that took the header sends nothing before the probe).
    pub fn feed(&mut self, data: &[u8]) -> Result<Step, GreetingError> {
        let mut at = 0;
        let mut send = false;
        while at < data.len() {
            let (took, done) = self.line.push(&data[at..]);
            at += took;
            if self.line.overflowed() {
                return Err(GreetingError::LineTooLong(PRE_LOGIN_MAX));
            }
            if !done {
                break;
            }
            let line = self.line.take().head;
            match self.on_line(line)? {
                Some(Step::Ready { greeting, .. }) => {
                    return Ok(Step::Ready {
                        greeting,
                        rest: data[at..].to_vec(),
                    })
                }
                Some(Step::SendProbe) => send = true,
                _ => {}
            }
        }
        Ok(if send { Step::SendProbe } else { Step::More })
    }

    /// The backend closed its side before the exchange ended.
    pub fn eof(&self) -> GreetingError {
        match self.state {
            State::Greeting => GreetingError::ClosedBeforeGreeting,
            _ => GreetingError::ClosedAfterGreeting,
        }
    }

    /// Whether the greeting came (for the shell's timeout reason).
    pub fn greeted(&self) -> bool {
        self.state != State::Greeting
    }

    fn on_line(&mut self, line: Vec<u8>) -> Result<Option<Step>, GreetingError> {
        let text = strip_eol(&line);
        let refused = || GreetingError::ProxyHeaderRefused {
            answer: one_line(&String::from_utf8_lossy(text), 200),
        };
        match self.state {
            State::Greeting => {
                // A greeting that refuses service (POP3 -ERR, IMAP * BYE) goes to the client
                // as it is, unprobed.
                let ok = if self.imap {
                    text.starts_with(b"* OK") || text.starts_with(b"* PREAUTH")
                } else {
                    text.starts_with(b"+OK")
                };
                self.greeting = line;
                if self.probe && ok {
                    self.state = State::Probe;
                    return Ok(Some(Step::SendProbe));
                }
                Ok(Some(self.ready()))
            }
            State::Probe if self.imap => {
                let tagged = text
                    .strip_prefix(IMAP_TAG)
                    .and_then(|r| r.strip_prefix(b" "));
                match tagged {
                    Some(r) if r.starts_with(b"OK") => Ok(Some(self.ready())),
                    Some(_) => Err(refused()),
                    // Untagged data the backend may send any time (not BAD or BYE) is fine.
                    None if text.starts_with(b"* ")
                        && !text.starts_with(b"* BAD")
                        && !text.starts_with(b"* BYE") =>
                    {
                        Ok(None)
                    }
                    None => Err(refused()),
                }
            }
            State::Probe => {
                if text.starts_with(b"+OK") {
                    self.state = State::Capa;
                    Ok(None)
                } else {
                    Err(refused())
                }
            }
            State::Capa if text == b"." => Ok(Some(self.ready())),
            State::Capa | State::Done => Ok(None),
        }
    }

    fn ready(&mut self) -> Step {
        self.state = State::Done;
        Step::Ready {
            greeting: std::mem::take(&mut self.greeting),
            rest: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `backend` split at `at`; the outcome (the backend closing after it).
    fn run(imap: bool, probe: bool, backend: &[u8], at: usize) -> Result<Step, GreetingError> {
        let mut g = Greeting::new(imap, probe);
        let (a, b) = backend.split_at(at);
        for chunk in [a, b] {
            if let step @ Step::Ready { .. } = g.feed(chunk)? {
                return Ok(step);
            }
        }
        Err(g.eof())
    }

    fn every_split(imap: bool, probe: bool, backend: &[u8]) -> Result<Step, GreetingError> {
        let whole = run(imap, probe, backend, 0);
        for at in 1..=backend.len() {
            assert_eq!(run(imap, probe, backend, at), whole, "split at {at}");
        }
        whole
    }

    fn ready(greeting: &[u8]) -> Result<Step, GreetingError> {
        Ok(Step::Ready {
            greeting: greeting.to_vec(),
            rest: Vec::new(),
        })
    }

    #[test]
    fn a_backend_that_took_the_header_passes_the_probe() {
        let pop3 = b"+OK Dovecot ready.\r\n+OK\r\nCAPA\r\nTOP\r\nSASL PLAIN\r\n.\r\n";
        assert_eq!(
            every_split(false, true, pop3),
            ready(b"+OK Dovecot ready.\r\n")
        );
        let imap = b"* OK [CAPABILITY IMAP4rev1] ready.\r\nmailbell-probe OK NOOP completed.\r\n";
        assert_eq!(
            every_split(true, true, imap),
            ready(b"* OK [CAPABILITY IMAP4rev1] ready.\r\n")
        );
        assert_eq!(Greeting::new(false, true).probe_command(), b"CAPA\r\n");
        assert_eq!(
            Greeting::new(true, true).probe_command(),
            b"mailbell-probe NOOP\r\n"
        );
    }

    /// What Dovecot without `haproxy = yes` answered in retrieval_hostile.rs.
    #[test]
    fn a_backend_that_read_the_header_as_commands_is_named() {
        let pop3 =
            b"+OK Dovecot (Debian) ready.\r\n-ERR Unknown command.\r\n-ERR Unknown command.\r\n";
        assert_eq!(
            every_split(false, true, pop3),
            Err(GreetingError::ProxyHeaderRefused {
                answer: "-ERR Unknown command.".into()
            })
        );
        let imap = b"* OK [CAPABILITY IMAP4rev1] Dovecot (Debian) ready.\r\n\
                     * BAD Error in IMAP command received by server.\r\n";
        let err = every_split(true, true, imap).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("backend did not accept the PROXY header (check haproxy_trusted"),
            "{err}"
        );
        // A tag the proxy did not send, a BYE, a NO to the probe.
        for answer in [
            &b"QUIT BAD Error\r\n"[..],
            b"* BYE Too many invalid IMAP commands.\r\n",
            b"mailbell-probe NO what\r\n",
        ] {
            let input = [&b"* OK hi\r\n"[..], answer].concat();
            assert!(matches!(
                every_split(true, true, &input),
                Err(GreetingError::ProxyHeaderRefused { .. })
            ));
        }
        // Closed after the greeting (a POP3 backend that read the header's QUIT).
        assert_eq!(
            every_split(false, true, b"+OK hi\r\n"),
            Err(GreetingError::ClosedAfterGreeting)
        );
    }

    #[test]
    fn untagged_data_before_the_probes_answer_is_fine() {
        let imap = b"* OK hi\r\n* CAPABILITY IMAP4rev1\r\nmailbell-probe OK done\r\n";
        assert_eq!(every_split(true, true, imap), ready(b"* OK hi\r\n"));
    }

    #[test]
    fn without_the_probe_or_with_a_refusing_greeting_it_is_ready_at_once() {
        assert_eq!(
            every_split(false, false, b"+OK hi\r\n"),
            ready(b"+OK hi\r\n")
        );
        assert_eq!(
            every_split(false, true, b"-ERR go away\r\n"),
            ready(b"-ERR go away\r\n")
        );
        assert_eq!(
            every_split(true, true, b"* BYE busy\r\n"),
            ready(b"* BYE busy\r\n")
        );
        assert_eq!(
            every_split(true, false, b""),
            Err(GreetingError::ClosedBeforeGreeting)
        );
    }

    #[test]
    fn bytes_after_the_exchange_are_kept_and_long_lines_refused() {
        let mut g = Greeting::new(false, false);
        assert_eq!(
            g.feed(b"+OK hi\r\n-ERR later\r\n"),
            Ok(Step::Ready {
                greeting: b"+OK hi\r\n".to_vec(),
                rest: b"-ERR later\r\n".to_vec()
            })
        );
        let mut g = Greeting::new(true, true);
        assert_eq!(
            g.feed(&vec![b'*'; PRE_LOGIN_MAX + 1]),
            Err(GreetingError::LineTooLong(PRE_LOGIN_MAX))
        );
        assert!(!g.greeted());
    }
}
