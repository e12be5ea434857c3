//! The milter protocol's packets, without I/O: what the MTA sends, parsed in place, and the
//! replies we send, encoded. [`crate::mta::milter`] reads and writes them.
//!
//! ```text
//! packet  = len:u32be cmd:u8 payload[len-1]
//! O  optneg   version:u32be actions:u32be protocol:u32be
//! D  macros   stage:u8 { name NUL value NUL }*
//! C  connect  hostname NUL family:u8 [ port:u16be address NUL ]     family: U L 4 6
//! H  helo     name NUL
//! M  mail     { arg NUL }+       (the first is the path)
//! R  rcpt     { arg NUL }+
//! L  header   name NUL value NUL
//! B  body     chunk
//! E  eom      [ last chunk ]
//! T  data,  N  end of headers,  A  abort,  Q  quit,  K  quit, new connection follows
//! U  unknown  command NUL
//!
//! replies: c continue, a accept, t tempfail, r reject, y "code xcode text" NUL,
//!          O version actions protocol (no macro lists: we ask for the MTA's defaults)
//! ```
//!
//! Framing (lengths, known commands, order) is checked before a packet gets here, by the
//! connection's `FrameGuard`; a payload that does not parse is a [`WireError`] and ends the
//! connection.

use std::net::IpAddr;

use indymilter::ProtoOpts;

/// Highest protocol version we speak (libmilter's and Postfix's).
pub(crate) const PROTOCOL_VERSION: u32 = 6;

/// A payload that does not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WireError {
    #[error("milter command '{}' with a truncated or malformed payload", char::from(*.0))]
    Malformed(u8),
    #[error("milter protocol version {0} is not supported (2 to 6 are)")]
    Version(u32),
}

/// One command from the MTA, borrowing its payload.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Command<'a> {
    OptNeg {
        version: u32,
        actions: u32,
        opts: ProtoOpts,
    },
    Macros {
        stage: u8,
        /// `name NUL value NUL` pairs, as sent.
        pairs: &'a [u8],
    },
    Connect {
        host: &'a [u8],
        /// The client's address, if the family is IPv4 or IPv6 and it parses.
        ip: Option<IpAddr>,
    },
    Helo(&'a [u8]),
    Mail(&'a [u8]),
    Rcpt(&'a [u8]),
    Data,
    Header {
        name: &'a [u8],
        value: &'a [u8],
    },
    Eoh,
    Body(&'a [u8]),
    Eom(&'a [u8]),
    Abort,
    Quit,
    QuitNewConnection,
    Unknown,
}

impl<'a> Command<'a> {
    /// Parses one packet's command byte and payload.
    pub(crate) fn parse(cmd: u8, payload: &'a [u8]) -> Result<Self, WireError> {
        let bad = || WireError::Malformed(cmd);
        Ok(match cmd {
            b'O' => {
                let word = |i: usize| {
                    payload
                        .get(i..i + 4)
                        .and_then(|b| b.try_into().ok())
                        .map(u32::from_be_bytes)
                        .ok_or_else(bad)
                };
                Command::OptNeg {
                    version: word(0)?,
                    actions: word(4)?,
                    opts: ProtoOpts::from_bits_retain(word(8)?),
                }
            }
            // Postfix sends empty macro packets at times; like libmilter, take them as none.
            b'D' => match payload.split_first() {
                Some((&stage, pairs)) => Command::Macros { stage, pairs },
                None => Command::Macros {
                    stage: b'?',
                    pairs: &[],
                },
            },
            b'C' => {
                let (host, rest) = c_str(payload).ok_or_else(bad)?;
                let (&family, rest) = rest.split_first().ok_or_else(bad)?;
                // Unknown (no address), a Unix socket's path, IPv4, IPv6; libmilter knows no
                // other family.
                let ip = match family {
                    b'U' => None,
                    b'L' | b'4' | b'6' => {
                        let addr = rest.get(2..).and_then(c_str).ok_or_else(bad)?.0;
                        (family != b'L')
                            .then(|| std::str::from_utf8(addr).ok().and_then(parse_ip))
                            .flatten()
                    }
                    _ => return Err(bad()),
                };
                Command::Connect { host, ip }
            }
            b'H' => Command::Helo(c_str(payload).ok_or_else(bad)?.0),
            b'M' => Command::Mail(c_str(payload).ok_or_else(bad)?.0),
            b'R' => Command::Rcpt(c_str(payload).ok_or_else(bad)?.0),
            b'T' => Command::Data,
            b'L' => {
                let (name, rest) = c_str(payload).ok_or_else(bad)?;
                let (value, _) = c_str(rest).ok_or_else(bad)?;
                Command::Header { name, value }
            }
            b'N' => Command::Eoh,
            b'B' => Command::Body(payload),
            b'E' => Command::Eom(payload),
            b'A' => Command::Abort,
            b'Q' => Command::Quit,
            b'K' => Command::QuitNewConnection,
            b'U' => Command::Unknown,
            _ => return Err(bad()),
        })
    }
}

/// Bytes up to the first NUL, and what follows it; `None` without a NUL.
fn c_str(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((&b[..end], &b[end + 1..]))
}

/// An address as MTAs write it: `192.0.2.1`, `2001:db8::1`, `IPv6:2001:db8::1`, in brackets
/// or not.
pub(crate) fn parse_ip(v: &str) -> Option<IpAddr> {
    let v = v.trim().trim_start_matches('[').trim_end_matches(']');
    let v = match v.get(..5) {
        Some(p) if p.eq_ignore_ascii_case("ipv6:") => &v[5..],
        _ => v,
    };
    v.parse().ok()
}

/// The value of macro `name` (without braces for one-letter names, `{client_addr}` style
/// otherwise) in a macro packet's pairs.
pub(crate) fn macro_value<'a>(mut pairs: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    while let Some((k, rest)) = c_str(pairs) {
        let (v, rest) = c_str(rest)?;
        if k == name {
            return Some(v);
        }
        pairs = rest;
    }
    None
}

/// The stages a macro packet can belong to, in session order (`D`'s stage byte).
pub(crate) const MACRO_STAGES: [u8; 8] = *b"CHMRTLNE";

/// Where `stage` falls in [`MACRO_STAGES`] (an unknown stage counts as end of message).
pub(crate) fn stage_index(stage: u8) -> usize {
    MACRO_STAGES
        .iter()
        .position(|&s| s == stage)
        .unwrap_or(MACRO_STAGES.len() - 1)
}

/// A reply to the MTA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    Continue,
    Accept,
    /// With `"451 4.3.0 text"`, or the MTA's own text if `None`.
    Tempfail(Option<String>),
    /// With `"550 5.7.1 text"`, or the MTA's own text if `None`.
    Reject(Option<String>),
}

impl Reply {
    /// The packet, ready to write.
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            Reply::Continue => packet(b'c', &[]),
            Reply::Accept => packet(b'a', &[]),
            Reply::Tempfail(None) => packet(b't', &[]),
            Reply::Reject(None) => packet(b'r', &[]),
            Reply::Tempfail(Some(text)) | Reply::Reject(Some(text)) => {
                let mut payload = text.as_bytes().to_vec();
                payload.push(0);
                packet(b'y', &payload)
            }
        }
    }
}

/// The option negotiation reply: no actions, `opts`, no macro lists.
pub(crate) fn optneg_reply(version: u32, opts: ProtoOpts) -> Vec<u8> {
    let mut payload = Vec::with_capacity(12);
    payload.extend_from_slice(&version.to_be_bytes());
    payload.extend_from_slice(&0u32.to_be_bytes());
    payload.extend_from_slice(&opts.bits().to_be_bytes());
    packet(b'O', &payload)
}

/// The protocol version to answer an MTA offering `offered` with.
pub(crate) fn version(offered: u32) -> Result<u32, WireError> {
    if offered < 2 {
        return Err(WireError::Version(offered));
    }
    Ok(offered.min(PROTOCOL_VERSION))
}

/// `"code xcode text"` as a `y` reply carries it; `text` must be one line.
pub(crate) fn reply_line(code: &str, xcode: &str, text: &str) -> String {
    if text.is_empty() {
        format!("{code} {xcode}")
    } else {
        format!("{code} {xcode} {text}")
    }
}

fn packet(cmd: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len() + 1).unwrap_or(u32::MAX);
    let mut p = Vec::with_capacity(payload.len() + 5);
    p.extend_from_slice(&len.to_be_bytes());
    p.push(cmd);
    p.extend_from_slice(payload);
    p
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn parses_what_postfix_sends() {
        let mut optneg = Vec::new();
        for w in [6u32, 0x1ff, 0x1f_ffff] {
            optneg.extend_from_slice(&w.to_be_bytes());
        }
        assert_eq!(
            Command::parse(b'O', &optneg).unwrap(),
            Command::OptNeg {
                version: 6,
                actions: 0x1ff,
                opts: ProtoOpts::from_bits_retain(0x1f_ffff)
            }
        );
        assert_eq!(
            Command::parse(b'C', b"mx.example\x004\x00\x19192.0.2.7\x00").unwrap(),
            Command::Connect {
                host: b"mx.example",
                ip: Some("192.0.2.7".parse().unwrap())
            }
        );
        assert_eq!(
            Command::parse(b'C', b"[2001:db8::1]\x006\x00\x19IPv6:2001:db8::1\x00").unwrap(),
            Command::Connect {
                host: b"[2001:db8::1]",
                ip: Some("2001:db8::1".parse().unwrap())
            }
        );
        assert_eq!(
            Command::parse(b'C', b"localhost\x00L\x00\x00/run/smtpd.sock\x00").unwrap(),
            Command::Connect {
                host: b"localhost",
                ip: None
            }
        );
        // Unknown family: no port, no address.
        assert_eq!(
            Command::parse(b'C', b"localhost\x00U").unwrap(),
            Command::Connect {
                host: b"localhost",
                ip: None
            }
        );
        assert_eq!(
            Command::parse(b'M', b"<a@b.example>\x00SIZE=10\x00").unwrap(),
            Command::Mail(b"<a@b.example>")
        );
        assert_eq!(
            Command::parse(b'L', b"Subject\x00 hi there\x00").unwrap(),
            Command::Header {
                name: b"Subject",
                value: b" hi there"
            }
        );
        assert_eq!(Command::parse(b'E', b"").unwrap(), Command::Eom(b""));
        assert_eq!(Command::parse(b'B', b"abc").unwrap(), Command::Body(b"abc"));
        assert_eq!(
            Command::parse(b'K', b"").unwrap(),
            Command::QuitNewConnection
        );
        assert_eq!(
            Command::parse(b'D', b"").unwrap(),
            Command::Macros {
                stage: b'?',
                pairs: b""
            }
        );
    }

    #[test]
    fn malformed_payloads_are_errors() {
        for (cmd, payload) in [
            (b'O', &b"\0\0\0\x06\0\0"[..]),
            (b'C', b"no-nul"),
            (b'C', b"host\x00"),
            (b'C', b"host\x00X\x00\x00"),
            (b'C', b"host\x004\x00\x19192.0.2.7"),
            (b'H', b"helo-without-nul"),
            (b'M', b""),
            (b'R', b"<a@b>"),
            (b'L', b"Subject\x00no-nul"),
        ] {
            assert_eq!(
                Command::parse(cmd, payload),
                Err(WireError::Malformed(cmd)),
                "{}",
                char::from(cmd)
            );
        }
        assert_eq!(version(1), Err(WireError::Version(1)));
        assert_eq!(version(2), Ok(2));
        assert_eq!(version(9), Ok(6));
    }

    #[test]
    fn macros_are_found_by_name() {
        let pairs = b"j\x00mx\x00{client_addr}\x00192.0.2.1\x00i\x00ABC123\x00";
        assert_eq!(
            macro_value(pairs, b"{client_addr}"),
            Some(&b"192.0.2.1"[..])
        );
        assert_eq!(macro_value(pairs, b"i"), Some(&b"ABC123"[..]));
        assert_eq!(macro_value(pairs, b"{daemon_name}"), None);
        // A name without its value is ignored.
        assert_eq!(macro_value(b"i\x00", b"i"), None);
        assert_eq!(stage_index(b'C'), 0);
        assert_eq!(stage_index(b'E'), 7);
        assert_eq!(stage_index(b'?'), 7);
    }

    #[test]
    fn replies_are_packets() {
        assert_eq!(Reply::Continue.encode(), b"\0\0\0\x01c");
        assert_eq!(Reply::Accept.encode(), b"\0\0\0\x01a");
        assert_eq!(Reply::Tempfail(None).encode(), b"\0\0\0\x01t");
        assert_eq!(Reply::Reject(None).encode(), b"\0\0\0\x01r");
        let line = reply_line("451", "4.3.0", "try later");
        assert_eq!(
            Reply::Tempfail(Some(line)).encode(),
            b"\0\0\0\x15y451 4.3.0 try later\0"
        );
        assert_eq!(
            optneg_reply(6, ProtoOpts::NO_DATA),
            [
                &[0, 0, 0, 13, b'O'][..],
                &6u32.to_be_bytes(),
                &[0; 4],
                &ProtoOpts::NO_DATA.bits().to_be_bytes()
            ]
            .concat()
        );
        assert_eq!(
            parse_ip("[IPv6:2001:db8::1]"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(parse_ip("unknown"), None);
    }
}
