//! The retrieval proxy's protocol cores: POP3 and IMAP as the proxy between a mail client and
//! the backend (Stalwart, Dovecot) sees them, plus the PROXY v2 header it opens the backend
//! connection with. Everything here is sans-I/O: byte chunks in, events out, no sockets, tasks
//! or clocks; the listener, TLS and the backend connection are built on top.
//!
//! - [`pop3`]: a POP3 session (RFC 1939, CAPA RFC 2449, AUTH RFC 5034) seen from the middle:
//!   client commands one way, backend replies the other.
//! - [`imap`]: the same for IMAP (RFC 3501/9051, LITERAL+ RFC 7888, SASL-IR RFC 4959).
//! - [`sasl`]: PLAIN (RFC 4616) and LOGIN responses, read to learn the account.
//! - [`proxy_v2`]: the PROXY protocol v2 header.
//! - [`gate`]: account gating by the registry's state and networks; [`maildrop`] and
//!   [`notice`]: the one-message POP3 maildrop and payment notice an account in arrears sees.
//!
//! Both sessions follow one contract. The shell feeds what it reads from the client to
//! `client(chunk)` and what it reads from the backend to `server(chunk)`, and acts on the
//! returned events in order: `Forward(bytes)` sends those bytes on, `ForwardInput` sends the
//! whole backend chunk just fed to the client (unchanged, no copy: every backend chunk after
//! login), `Reply(bytes)` answers the client itself. `Command` marks each client command
//! boundary before any of it is forwarded. Client commands are small and are always forwarded as
//! `Forward` once complete (IMAP literals as they arrive). Nothing reaches the other side unless
//! an event says so, so an event that precedes a forward (the account at login, the end of a
//! retrieval, the reply to QUIT) can be acted on before the peer sees anything that follows it. Every buffer is bounded:
//! before login a line or literal over the cap ends the session; after login only framing is
//! tracked and long lines are skipped, never stored.

pub mod certs;
pub mod gate;
pub mod greeting;
pub mod imap;
mod line;
pub mod maildrop;
mod metering;
pub mod notice;
mod pipe;
pub mod pop3;
pub mod proxy_v2;
pub mod sasl;
pub mod server;

/// Default cap on a line (and, for IMAP, a literal) before login.
pub const PRE_LOGIN_MAX: usize = 8 * 1024;
/// Default cap on a client command line after login, and on a backend status line.
pub const POST_LOGIN_MAX_LINE: usize = 64 * 1024;

#[cfg(test)]
pub(crate) mod split {
    use std::fmt::Debug;

    /// Feeds `steps` (for a session: client and backend chunks in turn) whole, then with each
    /// step split in two at every byte position, then byte by byte, and asserts every run gives
    /// what the whole run gave. `run` gets, for each step, the chunks to feed. Returns the result.
    pub(crate) fn same_for_every_split<T: PartialEq + Debug>(
        steps: &[&[u8]],
        run: impl Fn(&[Vec<&[u8]>]) -> T,
    ) -> T {
        let whole: Vec<Vec<&[u8]>> = steps.iter().map(|s| vec![*s]).collect();
        let want = run(&whole);
        for (k, step) in steps.iter().enumerate() {
            for at in 0..=step.len() {
                let mut split = whole.clone();
                split[k] = vec![&step[..at], &step[at..]];
                assert_eq!(run(&split), want, "step {k} split at byte {at}");
            }
        }
        let bytes: Vec<Vec<&[u8]>> = steps.iter().map(|s| s.chunks(1).collect()).collect();
        assert_eq!(run(&bytes), want, "byte by byte");
        want
    }

    /// An event of either session, as the test shell sorts it.
    pub(crate) enum Out {
        ToBackend(Vec<u8>),
        ToClient(Vec<u8>),
        /// Forward the chunk just fed from the backend to the client.
        InputToClient,
        StartTls,
        Close(String),
        /// A command boundary (kept apart so other tests can list the events that matter).
        Command(String),
        Event(String),
    }

    /// A session driven by [`transcript`].
    pub(crate) trait Proxied {
        fn client(&mut self, data: &[u8]) -> Vec<Out>;
        fn server(&mut self, data: &[u8]) -> Vec<Out>;
        fn client_eof(&mut self) -> Vec<Out>;
        fn server_eof(&mut self) -> Vec<Out>;
        fn tls_started(&mut self);
    }

    /// Implements [`Proxied`] for a session type whose `ClientEvent`/`ServerEvent` enums have
    /// the shared variants (`Forward`, `Reply`, `StartTls`, `Close`; `Forward`, `ForwardInput`,
    /// `Close`), in the calling module's scope.
    macro_rules! proxied {
        ($session:ident) => {
            fn client_out(event: ClientEvent) -> Out {
                match event {
                    ClientEvent::Forward(b) => Out::ToBackend(b),
                    ClientEvent::Reply(b) => Out::ToClient(b),
                    ClientEvent::StartTls => Out::StartTls,
                    ClientEvent::Close(e) => Out::Close(format!("{e:?}")),
                    ClientEvent::Command { .. } => Out::Command(format!("{event:?}")),
                    other => Out::Event(format!("{other:?}")),
                }
            }

            fn server_out(event: ServerEvent) -> Out {
                match event {
                    ServerEvent::Forward(b) => Out::ToClient(b),
                    ServerEvent::ForwardInput => Out::InputToClient,
                    ServerEvent::Close(e) => Out::Close(format!("{e:?}")),
                    other => Out::Event(format!("{other:?}")),
                }
            }

            impl Proxied for $session {
                fn client(&mut self, data: &[u8]) -> Vec<Out> {
                    $session::client(self, data)
                        .into_iter()
                        .map(client_out)
                        .collect()
                }
                fn server(&mut self, data: &[u8]) -> Vec<Out> {
                    $session::server(self, data)
                        .into_iter()
                        .map(server_out)
                        .collect()
                }
                fn client_eof(&mut self) -> Vec<Out> {
                    $session::client_eof(self)
                        .into_iter()
                        .map(client_out)
                        .collect()
                }
                fn server_eof(&mut self) -> Vec<Out> {
                    $session::server_eof(self)
                        .into_iter()
                        .map(server_out)
                        .collect()
                }
                fn tls_started(&mut self) {
                    $session::tls_started(self)
                }
            }
        };
    }
    pub(crate) use proxied;

    /// Who sends a step: client or backend bytes, or either side closing.
    #[derive(Clone, Copy)]
    pub(crate) enum Dir {
        C,
        S,
        CEof,
        SEof,
    }

    /// What a shell would have done: bytes each way (merged) and the other events in order.
    #[derive(Debug, Default, PartialEq)]
    pub(crate) struct Seen {
        pub to_backend: Vec<u8>,
        pub to_client: Vec<u8>,
        pub events: Vec<String>,
        /// `Command` events, in order.
        pub commands: Vec<String>,
    }

    fn run<P: Proxied>(session: &mut P, dirs: &[Dir], chunks: &[Vec<&[u8]>]) -> Seen {
        let mut seen = Seen::default();
        for (dir, parts) in dirs.iter().zip(chunks) {
            let mut outs = Vec::new();
            match dir {
                Dir::CEof => outs.push((session.client_eof(), &b""[..])),
                Dir::SEof => outs.push((session.server_eof(), &b""[..])),
                Dir::C => {
                    for part in parts {
                        outs.push((session.client(part), *part));
                    }
                }
                Dir::S => {
                    for part in parts {
                        outs.push((session.server(part), *part));
                    }
                }
            }
            // Events are taken in feeding order; a Close stops the shell.
            for (events, part) in outs {
                for out in events {
                    match out {
                        Out::ToBackend(b) => seen.to_backend.extend(b),
                        Out::ToClient(b) => seen.to_client.extend(b),
                        Out::InputToClient => seen.to_client.extend(part),
                        Out::StartTls => {
                            session.tls_started();
                            seen.events.push("StartTls".into());
                        }
                        Out::Close(why) => {
                            seen.events.push(format!("Close({why})"));
                            return seen;
                        }
                        Out::Event(e) => seen.events.push(e),
                        Out::Command(c) => seen.commands.push(c),
                    }
                }
            }
        }
        seen
    }

    /// Reads a recorded session (testdata/README.md): records of `C <len>\n` or `S <len>\n`
    /// followed by the bytes.
    pub(crate) fn recorded(mut raw: &[u8]) -> Vec<(Dir, &[u8])> {
        let mut steps = Vec::new();
        while !raw.is_empty() {
            let nl = raw.iter().position(|b| *b == b'\n').expect("record header");
            let header = std::str::from_utf8(&raw[..nl]).expect("ascii header");
            let (dir, len) = header.split_once(' ').expect("direction and length");
            let len: usize = len.parse().expect("length");
            let dir = if dir == "C" { Dir::C } else { Dir::S };
            steps.push((dir, &raw[nl + 1..nl + 1 + len]));
            raw = &raw[nl + 1 + len..];
        }
        steps
    }

    /// All bytes one side sent in a recorded session.
    pub(crate) fn sent_by(steps: &[(Dir, &[u8])], client: bool) -> Vec<u8> {
        steps
            .iter()
            .filter(|s| matches!(s.0, Dir::C) == client)
            .flat_map(|s| s.1.iter().copied())
            .collect()
    }

    /// Replays a recorded session split every way, asserts that both sides' bytes passed
    /// unchanged, and returns the events.
    pub(crate) fn replay_unchanged<P: Proxied>(new: impl Fn() -> P, raw: &[u8]) -> Vec<String> {
        let steps = recorded(raw);
        let seen = transcript(new, &steps);
        assert_eq!(seen.to_backend, sent_by(&steps, true));
        assert_eq!(seen.to_client, sent_by(&steps, false));
        seen.events
    }

    /// Runs a client/backend transcript through fresh sessions, split every way, and returns
    /// what the shell saw (the same for every split).
    pub(crate) fn transcript<P: Proxied>(new: impl Fn() -> P, steps: &[(Dir, &[u8])]) -> Seen {
        let dirs: Vec<Dir> = steps.iter().map(|s| s.0).collect();
        let bytes: Vec<&[u8]> = steps.iter().map(|s| s.1).collect();
        same_for_every_split(&bytes, |chunks| run(&mut new(), &dirs, chunks))
    }
}
