//! Decoding the header fields a notice needs (From, Subject, Message-ID, Date) with
//! mail-parser, from header fields as the MTA hands them over one by one.
//!
//! Only the fields we use are kept, each capped, so a message with megabytes of headers costs
//! at most [`MAX_FIELD`] per kept field. Values are raw (folded, RFC 2047 encoded, any charset);
//! mail-parser does the unfolding and decoding, and never fails: a broken encoded word is kept
//! as text, an unparseable Date is simply absent.

use mail_parser::MessageParser;

use crate::notify::arrival::HeaderFacts;

/// Longest raw value kept for one field; the rest is cut (a subject is at most an SMS anyway).
pub const MAX_FIELD: usize = 4096;

/// The fields we decode, lower-case.
const WANTED: [&str; 4] = ["from", "subject", "message-id", "date"];

/// Most `Authentication-Results` fields kept (the trusted MTA's own is added on top; a sender
/// can add any number below it).
pub const MAX_AUTH_RESULTS: usize = 8;

const AUTH_RESULTS: &str = "authentication-results";

/// Whether a header field is one [`HeaderCollector`] decodes (the others may be skipped unread).
pub fn wants(name: &str) -> bool {
    let name = name.trim();
    WANTED.iter().any(|w| w.eq_ignore_ascii_case(name)) || name.eq_ignore_ascii_case(AUTH_RESULTS)
}

/// Collects the wanted header fields, then decodes them.
#[derive(Debug, Default, Clone)]
pub struct HeaderCollector {
    /// Re-serialised header block of the wanted fields (first occurrence of each).
    block: Vec<u8>,
    seen: [bool; 4],
    auth_results: Vec<String>,
}

impl HeaderCollector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Offers one header field. `value` is raw, as in the message (leading space, folding and a
    /// trailing CRLF are all fine).
    pub fn add(&mut self, name: &str, value: &[u8]) {
        let name = name.trim();
        if name.eq_ignore_ascii_case(AUTH_RESULTS) {
            if self.auth_results.len() < MAX_AUTH_RESULTS {
                let v = cut(trim_crlf(value), MAX_FIELD);
                self.auth_results
                    .push(String::from_utf8_lossy(v).trim().to_owned());
            }
            return;
        }
        let Some(i) = WANTED.iter().position(|w| w.eq_ignore_ascii_case(name)) else {
            return;
        };
        if self.seen[i] {
            return;
        }
        self.seen[i] = true;
        let value = trim_crlf(value);
        let value = cut(value, MAX_FIELD);
        self.block.extend_from_slice(WANTED[i].as_bytes());
        self.block.push(b':');
        if value.first().is_some_and(|b| *b != b' ' && *b != b'\t') {
            self.block.push(b' ');
        }
        // A bare CR or LF not followed by folding whitespace would end the field early and
        // start a bogus one; make every line break a fold.
        let mut prev_nl = false;
        for &b in value {
            if prev_nl && b != b' ' && b != b'\t' {
                self.block.push(b' ');
            }
            prev_nl = b == b'\n';
            if b == b'\r' {
                continue;
            }
            if b == b'\n' {
                self.block.extend_from_slice(b"\r\n");
                continue;
            }
            self.block.push(b);
        }
        if prev_nl {
            self.block.push(b' ');
        }
        self.block.extend_from_slice(b"\r\n");
    }

    /// Decodes what was collected.
    pub fn finish(mut self) -> HeaderFacts {
        self.block.extend_from_slice(b"\r\n");
        let auth_results = std::mem::take(&mut self.auth_results);
        let Some(msg) = MessageParser::new().parse_headers(&self.block) else {
            return HeaderFacts {
                auth_results,
                ..HeaderFacts::default()
            };
        };
        let (from_name, from_addr) = msg
            .from()
            .and_then(|a| a.first())
            .map(|a| {
                (
                    clean(a.name.as_deref().unwrap_or("")),
                    clean(a.address.as_deref().unwrap_or("")),
                )
            })
            .unwrap_or_default();
        HeaderFacts {
            from_name,
            from_addr,
            subject: clean(msg.subject().unwrap_or("")),
            message_id: clean(msg.message_id().unwrap_or("")),
            date_ms: msg
                .date()
                .filter(|d| d.is_valid())
                .and_then(|d| d.to_timestamp().checked_mul(1000)),
            auth_results,
        }
    }
}

/// Decodes a whole header block given as (name, raw value) pairs.
pub fn decode<'a>(fields: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> HeaderFacts {
    let mut c = HeaderCollector::new();
    for (n, v) in fields {
        c.add(n, v);
    }
    c.finish()
}

fn trim_crlf(v: &[u8]) -> &[u8] {
    let mut end = v.len();
    while end > 0 && matches!(v[end - 1], b'\r' | b'\n') {
        end -= 1;
    }
    &v[..end]
}

/// Cuts at `max` bytes without splitting a UTF-8 sequence.
fn cut(v: &[u8], max: usize) -> &[u8] {
    if v.len() <= max {
        return v;
    }
    let mut end = max;
    while end > 0 && (v[end] & 0xC0) == 0x80 {
        end -= 1;
    }
    &v[..end]
}

/// Collapses whitespace runs and drops control characters (an SMS has no room for them).
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.chars() {
        if c.is_whitespace() || c.is_control() {
            space = !out.is_empty();
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(fields: &[(&str, &str)]) -> HeaderFacts {
        decode(fields.iter().map(|(n, v)| (*n, v.as_bytes())))
    }

    #[test]
    fn plain_fields_as_stalwart_sends_them() {
        let f = facts(&[
            ("From", " Carol Sender <carol@remote.example>\r\n"),
            ("To", " alice@test.local\r\n"),
            ("Subject", " Plain ASCII test message\r\n"),
            ("Message-ID", " <plain-0001@remote.example>\r\n"),
            ("Date", " Mon, 11 May 2026 10:00:00 +0000\r\n"),
        ]);
        assert_eq!(f.from_name, "Carol Sender");
        assert_eq!(f.from_addr, "carol@remote.example");
        assert_eq!(f.subject, "Plain ASCII test message");
        assert_eq!(f.message_id, "plain-0001@remote.example");
        assert_eq!(f.date_ms, Some(1_778_493_600_000));
        assert!(f.auth_results.is_empty());
    }

    #[test]
    fn authentication_results_are_kept_in_order_and_capped() {
        let mut fields = vec![(
            "Authentication-Results",
            " mx.example.org;\r\n\tspf=pass smtp.mailfrom=uni.example\r\n",
        )];
        fields.extend(std::iter::repeat_n(
            ("authentication-results", " evil; none"),
            20,
        ));
        let f = facts(&fields);
        assert_eq!(f.auth_results.len(), MAX_AUTH_RESULTS);
        assert_eq!(
            f.auth_results[0],
            "mx.example.org;\r\n\tspf=pass smtp.mailfrom=uni.example"
        );
        assert_eq!(f.auth_results[1], "evil; none");
    }

    #[test]
    fn rfc2047_utf8_and_gbk() {
        let f = facts(&[
            ("From", "=?UTF-8?B?5byg5LiJ?= <zhang@example.cn>"),
            ("Subject", "=?GBK?B?xOO6ww==?= =?UTF-8?Q?_world?="),
        ]);
        assert_eq!(f.from_name, "张三");
        assert_eq!(f.subject, "你好 world");
    }

    #[test]
    fn folded_subject_is_unfolded() {
        let f = facts(&[("Subject", " first part\r\n second part\r\n")]);
        assert_eq!(f.subject, "first part second part");
    }

    #[test]
    fn broken_encoded_word_is_kept_not_fatal() {
        let f = facts(&[
            ("Subject", "=?UTF-8?B?not base64!!?= tail"),
            ("From", "=?X-UNKNOWN?Q?abc?= <a@b.example>"),
            ("Date", "yesterday at noon"),
        ]);
        assert!(f.subject.contains("tail"), "{:?}", f.subject);
        assert_eq!(f.from_addr, "a@b.example");
        assert_eq!(f.date_ms, None);
    }

    #[test]
    fn bare_newlines_cannot_inject_fields() {
        let f = facts(&[("Subject", "hello\nFrom: evil@x.example\nworld")]);
        assert_eq!(f.from_addr, "");
        assert!(f.subject.starts_with("hello"), "{:?}", f.subject);
    }

    #[test]
    fn first_occurrence_wins_and_values_are_capped() {
        let long = "x".repeat(100_000);
        let f = facts(&[("Subject", &long), ("subject", "second")]);
        assert_eq!(f.subject.len(), MAX_FIELD);
    }

    #[test]
    fn missing_and_garbage_fields_give_empty_facts() {
        assert_eq!(facts(&[]), HeaderFacts::default());
        let f = facts(&[("From", "<<<@@@>>>"), ("Subject", "\u{0}\u{7}ok")]);
        assert_eq!(f.subject, "ok");
    }
}
