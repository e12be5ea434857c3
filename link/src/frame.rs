//! The link's wire codec: length-prefixed, typed frames with a hard size cap.
//!
//! ```text
//! frame    = length:u32be  type:u8  body          length = 1 + body length, <= max frame size
//!
//! HELLO    1  client -> agent   magic "MBLK"  version:u16  window:u16  max_frame:u32
//!                               name_len:u8  name (UTF-8, the mail host's display name)
//! WELCOME  2  agent -> client   version:u16  window:u16  max_frame:u32  heartbeat_ms:u32
//! REFUSE   3  agent -> client   code:u16  reason (UTF-8, rest of body)
//! NOTIFY   4  client -> agent   id:16  payload (see notification.rs)
//! ACK      5  agent -> client   id:16
//! NACK     6  agent -> client   id:16  class:u8 (1 retry-later, 2 permanent)
//!                               retry_after_ms:u32  reason (UTF-8, rest of body)
//! PING     7  either            nonce:u64
//! PONG     8  either            nonce:u64
//! BYE      9  either            reason (UTF-8, rest of body): orderly close
//! ```
//!
//! [`decode`] keeps *incomplete* (`Ok(None)`: read more) apart from *invalid* (`Err`: close the
//! connection). A length above the negotiated maximum is invalid as soon as the 4-byte prefix
//! is seen, so an attacker cannot make a peer buffer more than the cap.

use crate::id::NotifId;

/// The magic that opens a HELLO body.
pub const MAGIC: &[u8; 4] = b"MBLK";
/// Default and hard upper bound of a frame (prefix excluded).
pub const DEFAULT_MAX_FRAME: u32 = 64 * 1024;
/// The smallest maximum frame size a peer may announce.
pub const MIN_MAX_FRAME: u32 = 1024;
/// Longest reason text carried in REFUSE, NACK and BYE (longer reasons are cut on encode).
pub const MAX_REASON: usize = 512;

/// Why the agent refused a session.
pub mod refuse {
    pub const UNSUPPORTED_VERSION: u16 = 1;
    pub const BAD_HELLO: u16 = 2;
    pub const BUSY: u16 = 3;
    pub const SHUTTING_DOWN: u16 = 4;
    pub const NOT_AUTHORISED: u16 = 5;
}

/// How the sender must treat a negative acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NackClass {
    /// The receiver could not take the item now (store full or failing): back off, resend.
    RetryLater,
    /// The item can never succeed (invalid phone, empty text, malformed): dead-letter it.
    Permanent,
}

impl NackClass {
    fn code(self) -> u8 {
        match self {
            NackClass::RetryLater => 1,
            NackClass::Permanent => 2,
        }
    }
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u16,
        window: u16,
        max_frame: u32,
        name: String,
    },
    Welcome {
        version: u16,
        window: u16,
        max_frame: u32,
        heartbeat_ms: u32,
    },
    Refuse {
        code: u16,
        reason: String,
    },
    Notify {
        id: NotifId,
        payload: Vec<u8>,
    },
    Ack {
        id: NotifId,
    },
    Nack {
        id: NotifId,
        class: NackClass,
        retry_after_ms: u32,
        reason: String,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    Bye {
        reason: String,
    },
}

/// A frame that can never be valid: the connection must be closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: u64, max: u32 },
    #[error("empty frame")]
    Empty,
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("{kind} frame body is malformed")]
    Malformed { kind: &'static str },
    #[error("hello does not start with the mailbell magic")]
    BadMagic,
    #[error("{kind} frame carries invalid UTF-8")]
    Utf8 { kind: &'static str },
    #[error("unknown nack class {0}")]
    NackClass(u8),
}

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_REFUSE: u8 = 3;
const T_NOTIFY: u8 = 4;
const T_ACK: u8 = 5;
const T_NACK: u8 = 6;
const T_PING: u8 = 7;
const T_PONG: u8 = 8;
const T_BYE: u8 = 9;

fn cut(reason: &str) -> &str {
    if reason.len() <= MAX_REASON {
        return reason;
    }
    let mut end = MAX_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

impl Frame {
    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Welcome { .. } => "welcome",
            Frame::Refuse { .. } => "refuse",
            Frame::Notify { .. } => "notify",
            Frame::Ack { .. } => "ack",
            Frame::Nack { .. } => "nack",
            Frame::Ping { .. } => "ping",
            Frame::Pong { .. } => "pong",
            Frame::Bye { .. } => "bye",
        }
    }

    /// Appends the encoded frame (length prefix included) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0, 0]);
        match self {
            Frame::Hello {
                version,
                window,
                max_frame,
                name,
            } => {
                out.push(T_HELLO);
                out.extend_from_slice(MAGIC);
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(&window.to_be_bytes());
                out.extend_from_slice(&max_frame.to_be_bytes());
                let mut name = cut(name);
                while name.len() > 255 {
                    let mut end = 255;
                    while !name.is_char_boundary(end) {
                        end -= 1;
                    }
                    name = &name[..end];
                }
                out.push(name.len() as u8);
                out.extend_from_slice(name.as_bytes());
            }
            Frame::Welcome {
                version,
                window,
                max_frame,
                heartbeat_ms,
            } => {
                out.push(T_WELCOME);
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(&window.to_be_bytes());
                out.extend_from_slice(&max_frame.to_be_bytes());
                out.extend_from_slice(&heartbeat_ms.to_be_bytes());
            }
            Frame::Refuse { code, reason } => {
                out.push(T_REFUSE);
                out.extend_from_slice(&code.to_be_bytes());
                out.extend_from_slice(cut(reason).as_bytes());
            }
            Frame::Notify { id, payload } => {
                out.push(T_NOTIFY);
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(payload);
            }
            Frame::Ack { id } => {
                out.push(T_ACK);
                out.extend_from_slice(id.as_bytes());
            }
            Frame::Nack {
                id,
                class,
                retry_after_ms,
                reason,
            } => {
                out.push(T_NACK);
                out.extend_from_slice(id.as_bytes());
                out.push(class.code());
                out.extend_from_slice(&retry_after_ms.to_be_bytes());
                out.extend_from_slice(cut(reason).as_bytes());
            }
            Frame::Ping { nonce } => {
                out.push(T_PING);
                out.extend_from_slice(&nonce.to_be_bytes());
            }
            Frame::Pong { nonce } => {
                out.push(T_PONG);
                out.extend_from_slice(&nonce.to_be_bytes());
            }
            Frame::Bye { reason } => {
                out.push(T_BYE);
                out.extend_from_slice(cut(reason).as_bytes());
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// The encoded size of a NOTIFY frame with this payload length, prefix included.
    pub fn notify_len(payload_len: usize) -> usize {
        4 + 1 + 16 + payload_len
    }
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame, `Ok(Some((frame, consumed)))` for a
/// whole one, and `Err` for a frame that can never be valid.
pub fn decode(buf: &[u8], max_frame: u32) -> Result<Option<(Frame, usize)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len > max_frame {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max: max_frame,
        });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    let total = 4 + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let kind = buf[4];
    let body = &buf[5..total];
    let frame = parse(kind, body)?;
    Ok(Some((frame, total)))
}

struct Body<'a> {
    b: &'a [u8],
    kind: &'static str,
}

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.b.len() < n {
            return Err(FrameError::Malformed { kind: self.kind });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_be_bytes(a))
    }
    fn id(&mut self) -> Result<NotifId, FrameError> {
        let s = self.take(16)?;
        let mut a = [0u8; 16];
        a.copy_from_slice(s);
        Ok(NotifId(a))
    }
    fn text(&mut self, n: usize) -> Result<String, FrameError> {
        let kind = self.kind;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| FrameError::Utf8 { kind })
    }
    fn rest_text(&mut self) -> Result<String, FrameError> {
        let n = self.b.len();
        if n > MAX_REASON {
            return Err(FrameError::Malformed { kind: self.kind });
        }
        self.text(n)
    }
    fn end(&self) -> Result<(), FrameError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Malformed { kind: self.kind })
        }
    }
}

fn parse(kind: u8, body: &[u8]) -> Result<Frame, FrameError> {
    let name = match kind {
        T_HELLO => "hello",
        T_WELCOME => "welcome",
        T_REFUSE => "refuse",
        T_NOTIFY => "notify",
        T_ACK => "ack",
        T_NACK => "nack",
        T_PING => "ping",
        T_PONG => "pong",
        T_BYE => "bye",
        other => return Err(FrameError::UnknownType(other)),
    };
    let mut b = Body {
        b: body,
        kind: name,
    };
    let frame = match kind {
        T_HELLO => {
            if b.take(4)? != MAGIC {
                return Err(FrameError::BadMagic);
            }
            let version = b.u16()?;
            let window = b.u16()?;
            let max_frame = b.u32()?;
            let n = usize::from(b.u8()?);
            let name = b.text(n)?;
            b.end()?;
            Frame::Hello {
                version,
                window,
                max_frame,
                name,
            }
        }
        T_WELCOME => {
            let f = Frame::Welcome {
                version: b.u16()?,
                window: b.u16()?,
                max_frame: b.u32()?,
                heartbeat_ms: b.u32()?,
            };
            b.end()?;
            f
        }
        T_REFUSE => Frame::Refuse {
            code: b.u16()?,
            reason: b.rest_text()?,
        },
        T_NOTIFY => {
            let id = b.id()?;
            Frame::Notify {
                id,
                payload: b.b.to_vec(),
            }
        }
        T_ACK => {
            let id = b.id()?;
            b.end()?;
            Frame::Ack { id }
        }
        T_NACK => {
            let id = b.id()?;
            let class = match b.u8()? {
                1 => NackClass::RetryLater,
                2 => NackClass::Permanent,
                other => return Err(FrameError::NackClass(other)),
            };
            let retry_after_ms = b.u32()?;
            Frame::Nack {
                id,
                class,
                retry_after_ms,
                reason: b.rest_text()?,
            }
        }
        T_PING | T_PONG => {
            let nonce = b.u64()?;
            b.end()?;
            if kind == T_PING {
                Frame::Ping { nonce }
            } else {
                Frame::Pong { nonce }
            }
        }
        _ => Frame::Bye {
            reason: b.rest_text()?,
        },
    };
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Frame> {
        let id = NotifId::random();
        vec![
            Frame::Hello {
                version: 1,
                window: 128,
                max_frame: DEFAULT_MAX_FRAME,
                name: "mx1.example".into(),
            },
            Frame::Welcome {
                version: 1,
                window: 64,
                max_frame: 65536,
                heartbeat_ms: 10_000,
            },
            Frame::Refuse {
                code: refuse::UNSUPPORTED_VERSION,
                reason: "unsupported protocol version 9".into(),
            },
            Frame::Notify {
                id,
                payload: vec![1, 2, 3, 4],
            },
            Frame::Notify {
                id,
                payload: vec![],
            },
            Frame::Ack { id },
            Frame::Nack {
                id,
                class: NackClass::Permanent,
                retry_after_ms: 0,
                reason: "invalid phone number".into(),
            },
            Frame::Nack {
                id,
                class: NackClass::RetryLater,
                retry_after_ms: 5000,
                reason: "inbox full".into(),
            },
            Frame::Ping { nonce: 7 },
            Frame::Pong { nonce: u64::MAX },
            Frame::Bye {
                reason: "shutting down".into(),
            },
        ]
    }

    #[test]
    fn round_trip_every_type() {
        for f in all() {
            let mut buf = Vec::new();
            f.encode(&mut buf);
            let (g, n) = decode(&buf, DEFAULT_MAX_FRAME).unwrap().unwrap();
            assert_eq!(g, f);
            assert_eq!(n, buf.len());
        }
    }

    #[test]
    fn split_at_every_byte_decodes_the_same() {
        let mut stream = Vec::new();
        for f in all() {
            f.encode(&mut stream);
        }
        for split in 0..=stream.len() {
            let mut got = Vec::new();
            let mut buf = Vec::new();
            for chunk in [&stream[..split], &stream[split..]] {
                buf.extend_from_slice(chunk);
                while let Some((f, n)) = decode(&buf, DEFAULT_MAX_FRAME).unwrap() {
                    got.push(f);
                    buf.drain(..n);
                }
            }
            assert_eq!(got, all_with_ids(&stream));
            assert!(buf.is_empty());
        }
    }

    fn all_with_ids(stream: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        let mut s = stream;
        while let Some((f, n)) = decode(s, DEFAULT_MAX_FRAME).unwrap() {
            out.push(f);
            s = &s[n..];
        }
        out
    }

    #[test]
    fn oversized_length_is_rejected_from_the_prefix_alone() {
        let buf = (DEFAULT_MAX_FRAME + 1).to_be_bytes();
        assert_eq!(
            decode(&buf, DEFAULT_MAX_FRAME),
            Err(FrameError::TooLarge {
                len: u64::from(DEFAULT_MAX_FRAME) + 1,
                max: DEFAULT_MAX_FRAME
            })
        );
    }

    #[test]
    fn garbage_is_invalid_not_incomplete() {
        assert_eq!(decode(&[0, 0, 0, 0], 100), Err(FrameError::Empty));
        assert_eq!(
            decode(&[0, 0, 0, 1, 99], 100),
            Err(FrameError::UnknownType(99))
        );
        assert_eq!(
            decode(&[0, 0, 0, 3, T_ACK, 1, 2], 100),
            Err(FrameError::Malformed { kind: "ack" })
        );
        let mut hello = Vec::new();
        Frame::Hello {
            version: 1,
            window: 1,
            max_frame: 1024,
            name: "x".into(),
        }
        .encode(&mut hello);
        hello[5] = b'X';
        assert_eq!(decode(&hello, 100), Err(FrameError::BadMagic));
        let mut nack = Vec::new();
        Frame::Nack {
            id: NotifId::random(),
            class: NackClass::Permanent,
            retry_after_ms: 0,
            reason: String::new(),
        }
        .encode(&mut nack);
        nack[21] = 9;
        assert_eq!(decode(&nack, 100), Err(FrameError::NackClass(9)));
        // A TLS ClientHello or HTTP request sent by mistake is refused, not buffered.
        assert!(decode(b"GET / HTTP/1.1\r\n", DEFAULT_MAX_FRAME).is_err());
    }

    #[test]
    fn long_reasons_are_cut_at_a_char_boundary() {
        let f = Frame::Bye {
            reason: "错".repeat(400),
        };
        let mut buf = Vec::new();
        f.encode(&mut buf);
        let (g, _) = decode(&buf, DEFAULT_MAX_FRAME).unwrap().unwrap();
        let Frame::Bye { reason } = g else { panic!() };
        assert!(reason.len() <= MAX_REASON && reason.chars().all(|c| c == '错'));
    }
}
