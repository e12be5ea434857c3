//! A POP3 maildrop holding one message, served by the proxy itself: what an account in arrears
//! sees after the backend accepted its password (RFC 1939 TRANSACTION state; the backend's
//! session has been ended with QUIT and never sees these commands).
//!
//! ```text
//! STAT            +OK 1 <size>            (+OK 0 0 once the notice is marked deleted)
//! LIST [1]        +OK ... / 1 <size>      UIDL [1]   +OK ... / 1 <uid>
//! RETR 1          +OK <size> octets, the message dot-stuffed, "."
//! TOP 1 n         +OK, the header, the blank line, n body lines, "."
//! DELE 1          +OK (marked)            RSET       +OK (unmarked)
//! NOOP            +OK                     CAPA       +OK TOP UIDL RESP-CODES PIPELINING .
//! QUIT            +OK, then the session ends (the real mailbox is untouched either way)
//! ```
//!
//! Sans-I/O like the other cores: client bytes in (any chunking, pipelined commands), replies
//! out. Lines are bounded ([`POST_LOGIN_MAX_LINE`]).

use super::line::{strip_eol, LineBuf};
use super::POST_LOGIN_MAX_LINE;

/// What the shell does with what the client sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DropEvent {
    /// Send these bytes to the client.
    Reply(Vec<u8>),
    /// After the replies before it, end the session (QUIT, or a line over the cap).
    End,
}

/// The one-message maildrop.
#[derive(Debug)]
pub struct NoticeDrop {
    message: Vec<u8>,
    uid: String,
    deleted: bool,
    line: LineBuf,
    ended: bool,
}

impl NoticeDrop {
    /// `message`: CRLF lines, not dot-stuffed; `uid`: its UIDL (1 to 70 printable characters).
    pub fn new(message: Vec<u8>, uid: String) -> NoticeDrop {
        NoticeDrop {
            message,
            uid,
            deleted: false,
            line: LineBuf::new(POST_LOGIN_MAX_LINE),
            ended: false,
        }
    }

    /// Whether the client marked the notice deleted (its QUIT changes nothing real).
    pub fn is_deleted(&self) -> bool {
        self.deleted
    }

    /// Feeds client bytes; returns the replies to every complete command, in order.
    pub fn client(&mut self, data: &[u8]) -> Vec<DropEvent> {
        let mut ev = Vec::new();
        let mut at = 0;
        while at < data.len() && !self.ended {
            let (took, done) = self.line.push(&data[at..]);
            at += took;
            if self.line.overflowed() {
                ev.push(DropEvent::Reply(b"-ERR Line too long\r\n".to_vec()));
                ev.push(DropEvent::End);
                self.ended = true;
                break;
            }
            if !done {
                break;
            }
            let line = self.line.take().head;
            self.command(strip_eol(&line), &mut ev);
        }
        ev
    }

    fn command(&mut self, text: &[u8], ev: &mut Vec<DropEvent>) {
        let words: Vec<&[u8]> = text
            .split(|b| *b == b' ')
            .filter(|w| !w.is_empty())
            .collect();
        let verb = words
            .first()
            .copied()
            .unwrap_or_default()
            .to_ascii_uppercase();
        let args = words.get(1..).unwrap_or_default();
        let reply = match (verb.as_slice(), args.len()) {
            (b"STAT", 0) => self.stat(),
            (b"LIST", 0) => self.listing(self.size().to_string()),
            (b"UIDL", 0) => self.listing(self.uid.clone()),
            (b"LIST", 1) => self
                .one(args[0])
                .map(|()| format!("+OK 1 {}\r\n", self.size())),
            (b"UIDL", 1) => self
                .one(args[0])
                .map(|()| format!("+OK 1 {}\r\n", self.uid)),
            (b"RETR", 1) => match self.one(args[0]) {
                Ok(()) => {
                    let mut out = format!("+OK {} octets\r\n", self.size()).into_bytes();
                    stuff(&self.message, usize::MAX, &mut out);
                    ev.push(DropEvent::Reply(out));
                    return;
                }
                Err(e) => Err(e),
            },
            (b"TOP", 2) => match (self.one(args[0]), number(args[1])) {
                (Ok(()), Some(lines)) => {
                    let mut out = b"+OK\r\n".to_vec();
                    stuff(&self.message, lines, &mut out);
                    ev.push(DropEvent::Reply(out));
                    return;
                }
                (Err(e), _) => Err(e),
                (_, None) => Err("-ERR Invalid number of lines\r\n".to_owned()),
            },
            (b"DELE", 1) => self.one(args[0]).map(|()| {
                self.deleted = true;
                "+OK Marked to be deleted.\r\n".to_owned()
            }),
            (b"RSET", 0) => {
                self.deleted = false;
                Ok("+OK\r\n".to_owned())
            }
            (b"NOOP", 0) => Ok("+OK\r\n".to_owned()),
            (b"CAPA", 0) => {
                Ok("+OK\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n.\r\n".to_owned())
            }
            (b"QUIT", 0) => {
                ev.push(DropEvent::Reply(b"+OK Logging out.\r\n".to_vec()));
                ev.push(DropEvent::End);
                self.ended = true;
                return;
            }
            (
                b"STAT" | b"LIST" | b"UIDL" | b"RETR" | b"TOP" | b"DELE" | b"RSET" | b"NOOP"
                | b"CAPA" | b"QUIT",
                _,
            ) => Err("-ERR Invalid arguments.\r\n".to_owned()),
            _ => Err("-ERR Unknown command.\r\n".to_owned()),
        };
        let text = reply.unwrap_or_else(|e| e);
        ev.push(DropEvent::Reply(text.into_bytes()));
    }

    fn size(&self) -> usize {
        self.message.len()
    }

    fn stat(&self) -> Result<String, String> {
        Ok(if self.deleted {
            "+OK 0 0\r\n".to_owned()
        } else {
            format!("+OK 1 {}\r\n", self.size())
        })
    }

    /// The multi-line LIST/UIDL reply: the one line `1 <value>` unless deleted.
    fn listing(&self, value: String) -> Result<String, String> {
        Ok(if self.deleted {
            "+OK 0 messages\r\n.\r\n".to_owned()
        } else {
            format!("+OK 1 messages\r\n1 {value}\r\n.\r\n")
        })
    }

    /// Checks a message number argument: only `1` exists, unless deleted.
    fn one(&self, arg: &[u8]) -> Result<(), String> {
        match number(arg) {
            Some(1) if self.deleted => Err("-ERR Message is deleted.\r\n".to_owned()),
            Some(1) => Ok(()),
            Some(_) => Err("-ERR There's no message by that number.\r\n".to_owned()),
            None => Err("-ERR Invalid message number.\r\n".to_owned()),
        }
    }
}

fn number(w: &[u8]) -> Option<usize> {
    std::str::from_utf8(w).ok()?.parse().ok()
}

/// Appends `message` dot-stuffed (RFC 1939 §3) with the final `.` line: the whole message, or
/// the header, the blank line and the first `body_lines` lines of the body (TOP).
fn stuff(message: &[u8], body_lines: usize, out: &mut Vec<u8>) {
    let mut in_body = false;
    let mut left = body_lines;
    for line in message.split_inclusive(|b| *b == b'\n') {
        if in_body {
            if left == 0 {
                break;
            }
            left -= 1;
        }
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
        if !in_body && (line == b"\r\n" || line == b"\n") {
            in_body = true;
        }
    }
    if !out.ends_with(b"\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retrieval::pop3::retr_bytes;
    use crate::retrieval::split::same_for_every_split;

    const MSG: &[u8] = b"Subject: pay\r\nFrom: a@b\r\n\r\nline 1\r\n.dot line\r\nline 3\r\n";

    fn run(chunks: &[Vec<&[u8]>]) -> (String, bool, bool) {
        let mut d = NoticeDrop::new(MSG.to_vec(), "notice-1".into());
        let mut out = Vec::new();
        let mut ended = false;
        for part in chunks.iter().flatten() {
            for e in d.client(part) {
                match e {
                    DropEvent::Reply(b) => out.extend(b),
                    DropEvent::End => ended = true,
                }
            }
        }
        (String::from_utf8(out).unwrap(), d.is_deleted(), ended)
    }

    #[test]
    fn a_whole_transaction_as_rfc_1939_says_split_every_way() {
        let input: &[u8] =
            b"CAPA\r\nSTAT\r\nLIST\r\nLIST 1\r\nUIDL\r\nuidl 1\r\nRETR 1\r\nTOP 1 1\r\n\
            LIST 2\r\nRETR x\r\nDELE 1\r\nSTAT\r\nLIST\r\nRETR 1\r\nDELE 1\r\nRSET\r\nSTAT\r\n\
            NOOP\r\nTOP 1\r\nUSER bob\r\nDELE 1\r\nQUIT\r\nSTAT\r\n";
        let (out, deleted, ended) = same_for_every_split(&[input], run);
        let want = "+OK\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n.\r\n\
            +OK 1 54\r\n\
            +OK 1 messages\r\n1 54\r\n.\r\n\
            +OK 1 54\r\n\
            +OK 1 messages\r\n1 notice-1\r\n.\r\n\
            +OK 1 notice-1\r\n\
            +OK 54 octets\r\nSubject: pay\r\nFrom: a@b\r\n\r\nline 1\r\n..dot line\r\nline 3\r\n.\r\n\
            +OK\r\nSubject: pay\r\nFrom: a@b\r\n\r\nline 1\r\n.\r\n\
            -ERR There's no message by that number.\r\n\
            -ERR Invalid message number.\r\n\
            +OK Marked to be deleted.\r\n\
            +OK 0 0\r\n\
            +OK 0 messages\r\n.\r\n\
            -ERR Message is deleted.\r\n\
            -ERR Message is deleted.\r\n\
            +OK\r\n\
            +OK 1 54\r\n\
            +OK\r\n\
            -ERR Invalid arguments.\r\n\
            -ERR Unknown command.\r\n\
            +OK Marked to be deleted.\r\n\
            +OK Logging out.\r\n";
        assert_eq!(out, want);
        assert_eq!(MSG.len(), 54);
        assert!(deleted && ended, "nothing after QUIT is answered");
    }

    #[test]
    fn retr_is_dot_stuffed_and_counts_like_a_backend_reply() {
        let (out, _, _) = run(&[vec![b"RETR 1\r\n"]]);
        // The reply parses as a complete POP3 multi-line reply.
        assert!(retr_bytes(out.as_bytes()).is_some());
        // Un-stuffing gives the message back byte for byte.
        let body: Vec<&str> = out
            .split_inclusive("\r\n")
            .skip(1)
            .take_while(|l| *l != ".\r\n")
            .map(|l| l.strip_prefix('.').unwrap_or(l))
            .collect();
        assert_eq!(body.concat().as_bytes(), MSG);
        // TOP with more lines than the body has gives the whole body.
        let (top, _, _) = run(&[vec![b"TOP 1 100\r\n"]]);
        let after_status = |s: &str| s.split_once("\r\n").unwrap().1.to_owned();
        assert_eq!(after_status(&top), after_status(&out));
    }

    #[test]
    fn an_overlong_line_ends_the_session() {
        let long = vec![b'A'; POST_LOGIN_MAX_LINE + 10];
        let (out, _, ended) = run(&[vec![&long]]);
        assert_eq!(out, "-ERR Line too long\r\n");
        assert!(ended);
    }
}
