//! A bounded line accumulator shared by the POP3 and IMAP parsers.
//!
//! It keeps at most `cap` bytes of a line (the head) and the last [`TAIL`] bytes (enough to see
//! an IMAP literal announcement such as `{4294967295+}\r\n` at the end of an overlong line). The
//! caller decides whether an overlong line is an error (before login) or is skipped (after login,
//! where only framing matters).

/// How many trailing bytes of a line are always kept.
pub const TAIL: usize = 32;

#[derive(Debug)]
pub struct LineBuf {
    head: Vec<u8>,
    tail: Vec<u8>,
    total: usize,
    cap: usize,
}

/// A complete line: its first `cap` bytes, its last bytes, and its full length.
#[derive(Debug, Default)]
pub struct Line {
    pub head: Vec<u8>,
    pub tail: Vec<u8>,
    pub total: usize,
}

impl Line {
    /// Whether the whole line was kept.
    pub fn is_whole(&self) -> bool {
        self.head.len() == self.total
    }

    /// The kept head without its line ending (CRLF or a bare LF).
    pub fn text(&self) -> &[u8] {
        strip_eol(&self.head)
    }
}

/// Operator or error text made safe for one protocol line: control characters (CR, LF) are
/// dropped, so it cannot inject a line, and it is cut at `max` characters.
pub fn one_line(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// `line` without a trailing LF or CRLF.
pub fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

impl LineBuf {
    pub fn new(cap: usize) -> LineBuf {
        LineBuf {
            head: Vec::new(),
            tail: Vec::new(),
            total: 0,
            cap,
        }
    }

    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap;
    }

    /// Takes bytes from `data` up to and including the first LF. Returns how many bytes it took
    /// and whether the line is now complete.
    pub fn push(&mut self, data: &[u8]) -> (usize, bool) {
        let (take, done) = match data.iter().position(|b| *b == b'\n') {
            Some(at) => (at + 1, true),
            None => (data.len(), false),
        };
        let room = self.cap.saturating_sub(self.head.len());
        self.head.extend_from_slice(&data[..take.min(room)]);
        self.total += take;
        let taken = &data[..take];
        if taken.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&taken[taken.len() - TAIL..]);
        } else {
            self.tail.extend_from_slice(taken);
            let extra = self.tail.len().saturating_sub(TAIL);
            self.tail.drain(..extra);
        }
        (take, done)
    }

    /// Whether the line so far is longer than the cap.
    pub fn overflowed(&self) -> bool {
        self.total > self.cap
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Hands out the line and starts a new one.
    pub fn take(&mut self) -> Line {
        let line = Line {
            head: std::mem::take(&mut self.head),
            tail: std::mem::take(&mut self.tail),
            total: self.total,
        };
        self.total = 0;
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlong_line_keeps_head_and_tail() {
        let mut buf = LineBuf::new(4);
        let data = b"0123456789abcdefghijklmnopqrstuvwxyzABCD\r\nnext";
        let (took, done) = buf.push(data);
        assert!(done);
        assert_eq!(took, data.len() - 4);
        assert!(buf.overflowed());
        let line = buf.take();
        assert_eq!(line.head, b"0123");
        assert_eq!(line.tail, &data[took - TAIL..took]);
        assert_eq!(line.total, took);
        assert!(!line.is_whole());
        assert!(buf.is_empty());
    }

    #[test]
    fn strip_eol_takes_crlf_or_lf() {
        assert_eq!(strip_eol(b"a\r\n"), b"a");
        assert_eq!(strip_eol(b"a\n"), b"a");
        assert_eq!(strip_eol(b"a"), b"a");
    }
}
