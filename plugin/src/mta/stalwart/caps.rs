//! Size caps on every field of a hook request except `message.contents`, enforced on the raw
//! bytes before serde_json sees them.
//!
//! serde_json collects every string it hands to a visitor (object keys included, and any value
//! deserialised as `String`) whole in a scratch buffer, so a 60 MB HELO costs 60 MB or more
//! before any visitor could refuse it. Only strings deserialised as `IgnoredAny` are skipped
//! without a copy. [`FieldCaps`] is a small JSON lexer that watches the bytes go by (it keeps
//! only a stack of open containers and the current key's first bytes) and stops the parse as
//! soon as a string, an array or the nesting passes its cap:
//!
//! ```text
//! object key                                        MAX_KEY      256 bytes
//! "stage", "ip", "id", "ptr" values                 MAX_SHORT    256 bytes
//! "address", "helo" values                          MAX_ADDRESS  1 KiB
//! any other string (each header name and value)     MAX_STRING   64 KiB
//! message.contents                                  no cap (skipped unread by the parser)
//! items of one array (recipients, header fields)    MAX_ITEMS    10 000
//! nesting                                           MAX_DEPTH    32
//! ```
//! Lengths are counted on the JSON text (escapes included). The lexer does not validate JSON:
//! malformed input is left to serde_json.

use std::io::{self, Read};

pub(crate) const MAX_KEY: u64 = 256;
pub(crate) const MAX_SHORT: u64 = 256;
pub(crate) const MAX_ADDRESS: u64 = 1024;
pub(crate) const MAX_STRING: u64 = 64 * 1024;
pub(crate) const MAX_ITEMS: u64 = 10_000;
pub(crate) const MAX_DEPTH: usize = 32;

/// Bytes of a key kept to name it (longer keys are never ones we look for).
const KEY_KEPT: usize = 16;

/// A cap that was passed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum CapExceeded {
    #[error("hook field {field:?} longer than {limit} bytes")]
    String { field: String, limit: u64 },
    #[error("more than {limit} items in hook field {field:?}")]
    Items { field: String, limit: u64 },
    #[error("hook request nested deeper than {MAX_DEPTH} levels")]
    Depth,
}

#[derive(Debug)]
enum Open {
    Object {
        /// First bytes of the current key.
        key: Vec<u8>,
        expect_key: bool,
    },
    Array {
        /// Key the array is the value of.
        key: Vec<u8>,
        commas: u64,
    },
}

#[derive(Debug)]
struct Str {
    len: u64,
    limit: u64,
    is_key: bool,
    escape: bool,
}

/// The lexer; feed it every byte of the request in order.
#[derive(Debug, Default)]
pub(crate) struct FieldCaps {
    stack: Vec<Open>,
    string: Option<Str>,
    key: Vec<u8>,
    exceeded: Option<CapExceeded>,
}

fn name(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

impl FieldCaps {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The cap that was passed, if any (sticky).
    pub(crate) fn exceeded(&self) -> Option<&CapExceeded> {
        self.exceeded.as_ref()
    }

    /// Watches `bytes`; `Err` from the first byte that passes a cap on.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Result<(), CapExceeded> {
        if let Some(e) = &self.exceeded {
            return Err(e.clone());
        }
        for &b in bytes {
            if let Err(e) = self.byte(b) {
                self.exceeded = Some(e.clone());
                return Err(e);
            }
        }
        Ok(())
    }

    fn byte(&mut self, b: u8) -> Result<(), CapExceeded> {
        if let Some(s) = &mut self.string {
            if s.escape {
                s.escape = false;
            } else if b == b'\\' {
                s.escape = true;
            } else if b == b'"' {
                let is_key = s.is_key;
                self.string = None;
                if is_key {
                    if let Some(Open::Object { key, expect_key }) = self.stack.last_mut() {
                        key.clear();
                        key.extend_from_slice(&self.key);
                        *expect_key = false;
                    }
                }
                return Ok(());
            }
            s.len += 1;
            if s.is_key && self.key.len() < KEY_KEPT {
                self.key.push(b);
            }
            if s.len > s.limit {
                let (is_key, limit) = (s.is_key, s.limit);
                let field = if is_key {
                    format!("{}…", name(&self.key))
                } else {
                    self.current_field()
                };
                return Err(CapExceeded::String { field, limit });
            }
            return Ok(());
        }
        match b {
            b'"' => {
                let is_key = matches!(
                    self.stack.last(),
                    Some(Open::Object {
                        expect_key: true,
                        ..
                    })
                );
                let limit = if is_key { MAX_KEY } else { self.value_limit() };
                self.key.clear();
                self.string = Some(Str {
                    len: 0,
                    limit,
                    is_key,
                    escape: false,
                });
            }
            b'{' | b'[' => {
                if self.stack.len() >= MAX_DEPTH {
                    return Err(CapExceeded::Depth);
                }
                self.stack.push(if b == b'{' {
                    Open::Object {
                        key: Vec::new(),
                        expect_key: true,
                    }
                } else {
                    // An array in an array is named after the outer one ("headers").
                    let key = match self.stack.last() {
                        Some(Open::Array { key, .. }) => key.clone(),
                        _ => self.current_key().to_vec(),
                    };
                    Open::Array { key, commas: 0 }
                });
            }
            b'}' | b']' => {
                self.stack.pop();
            }
            b',' => match self.stack.last_mut() {
                Some(Open::Object { expect_key, .. }) => *expect_key = true,
                Some(Open::Array { key, commas }) => {
                    *commas += 1;
                    if *commas >= MAX_ITEMS {
                        return Err(CapExceeded::Items {
                            field: name(key),
                            limit: MAX_ITEMS,
                        });
                    }
                }
                None => {}
            },
            _ => {}
        }
        Ok(())
    }

    /// The key whose value is being read (empty inside an array or at the top).
    fn current_key(&self) -> &[u8] {
        match self.stack.last() {
            Some(Open::Object { key, .. }) => key,
            _ => b"",
        }
    }

    fn current_field(&self) -> String {
        match self.stack.last() {
            Some(Open::Array { key, .. }) => format!("{} item", name(key)),
            _ => name(self.current_key()),
        }
    }

    fn value_limit(&self) -> u64 {
        if let [Open::Object { key: top, .. }, Open::Object { key, .. }] = &self.stack[..] {
            if top == b"message" && key == b"contents" {
                return u64::MAX;
            }
        }
        match self.stack.last() {
            Some(Open::Object { key, .. }) => match &key[..] {
                b"stage" | b"ip" | b"id" | b"ptr" => MAX_SHORT,
                b"address" | b"helo" => MAX_ADDRESS,
                _ => MAX_STRING,
            },
            _ => MAX_STRING,
        }
    }
}

/// A reader that passes bytes through [`FieldCaps`] and fails (`InvalidData`) at the first cap
/// passed; [`CappedReader::exceeded`] then says which.
pub(crate) struct CappedReader<R> {
    inner: R,
    caps: FieldCaps,
}

impl<R: Read> CappedReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            caps: FieldCaps::new(),
        }
    }

    pub(crate) fn exceeded(&self) -> Option<&CapExceeded> {
        self.caps.exceeded()
    }
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Once over a cap, never read on: a caller that tries again gets the same error.
        if let Some(e) = self.caps.exceeded() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, e.clone()));
        }
        let n = self.inner.read(buf)?;
        self.caps
            .feed(&buf[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str) -> Result<(), CapExceeded> {
        FieldCaps::new().feed(json.as_bytes())
    }

    fn long(n: u64) -> String {
        "x".repeat(usize::try_from(n).unwrap_or(0))
    }

    #[test]
    fn ordinary_requests_pass() {
        for f in [
            include_str!("../../../tests/fixtures/stalwart/mta-hook-data-plain.json"),
            include_str!("../../../tests/fixtures/stalwart/mta-hook-data-chinese.json"),
        ] {
            let v: serde_json::Value = serde_json::from_str(f).unwrap();
            let body = v["body_raw"].as_str().unwrap();
            assert_eq!(check(body), Ok(()));
        }
    }

    #[test]
    fn each_field_has_its_cap() {
        let at = |limit: u64, make: &dyn Fn(&str) -> String| {
            assert_eq!(check(&make(&long(limit))), Ok(()));
            check(&make(&long(limit + 1))).unwrap_err()
        };
        let e = at(MAX_SHORT, &|s| {
            format!(r#"{{"context":{{"stage":"{s}"}}}}"#)
        });
        assert_eq!(
            e,
            CapExceeded::String {
                field: "stage".into(),
                limit: MAX_SHORT
            }
        );
        at(MAX_ADDRESS, &|s| {
            format!(r#"{{"context":{{"client":{{"ip":"1","helo":"{s}"}}}}}}"#)
        });
        let e = at(MAX_ADDRESS, &|s| {
            format!(r#"{{"envelope":{{"to":[{{"address":"a"}},{{"address":"{s}"}}]}}}}"#)
        });
        assert!(e.to_string().contains("\"address\""), "{e}");
        at(MAX_ADDRESS, &|s| {
            format!(r#"{{"envelope":{{"from":{{"address":"{s}"}}}}}}"#)
        });
        let e = at(MAX_STRING, &|s| {
            format!(r#"{{"message":{{"headers":[["Subject","{s}"]]}}}}"#)
        });
        assert!(e.to_string().contains("headers item"), "{e}");
        at(MAX_STRING, &|s| {
            format!(r#"{{"message":{{"headers":[["{s}"," v"]]}}}}"#)
        });
        at(MAX_KEY, &|s| format!(r#"{{"{s}":1}}"#));
        // The body is the one field without a cap; a "contents" key elsewhere has one.
        let big = long(MAX_STRING * 4);
        assert_eq!(
            check(&format!(
                r#"{{"message":{{"headers":[],"contents":"{big}","size":1}}}}"#
            )),
            Ok(())
        );
        assert!(check(&format!(r#"{{"context":{{"contents":"{big}"}}}}"#)).is_err());
    }

    #[test]
    fn escapes_do_not_end_a_string() {
        let s = format!(r#"{{"context":{{"stage":"\"{}"}}}}"#, long(MAX_SHORT));
        assert!(check(&s).is_err());
        assert_eq!(check(r#"{"a\"b":"\\","stage":"x"}"#), Ok(()));
    }

    #[test]
    fn arrays_and_nesting_are_capped() {
        let items = |n: u64| {
            let v: Vec<&str> = (0..n).map(|_| r#"{"address":"a@b"}"#).collect();
            format!(r#"{{"envelope":{{"to":[{}]}}}}"#, v.join(","))
        };
        assert_eq!(check(&items(MAX_ITEMS)), Ok(()));
        assert_eq!(
            check(&items(MAX_ITEMS + 1)),
            Err(CapExceeded::Items {
                field: "to".into(),
                limit: MAX_ITEMS
            })
        );
        assert_eq!(check(&"[".repeat(MAX_DEPTH)), Ok(()));
        assert_eq!(check(&"[".repeat(MAX_DEPTH + 1)), Err(CapExceeded::Depth));
    }

    /// A reader asked again after a cap was passed answers the same error and reads nothing
    /// more of the request (serde_json may ask more than once).
    #[test]
    fn the_reader_reads_nothing_after_a_cap() {
        let json = format!(r#"{{"context":{{"stage":"{}"}}}}"#, long(MAX_SHORT + 10));
        let mut src = std::io::Cursor::new(json.into_bytes());
        let mut r = CappedReader::new(&mut src);
        let mut buf = [0u8; 64];
        let mut err = None;
        for _ in 0..100 {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::InvalidData));
        let at = src_position(&r);
        for _ in 0..3 {
            let e = r.read(&mut buf).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        }
        assert_eq!(src_position(&r), at, "read on after the cap");
        assert!(r.exceeded().is_some());
    }

    fn src_position(r: &CappedReader<&mut std::io::Cursor<Vec<u8>>>) -> u64 {
        r.inner.position()
    }

    /// The same input split at every byte position is judged the same.
    #[test]
    fn chunk_split() {
        let ok = r#"{"context":{"stage":"data"},"message":{"contents":"a\"b","size":1}}"#;
        let bad = format!(r#"{{"context":{{"helo":"{}"}}}}"#, long(MAX_ADDRESS + 1));
        for input in [ok, bad.as_str()] {
            let whole = check(input);
            for cut in 0..=input.len() {
                let mut c = FieldCaps::new();
                let r = c
                    .feed(&input.as_bytes()[..cut])
                    .and_then(|()| c.feed(&input.as_bytes()[cut..]));
                assert_eq!(r, whole, "split at {cut}");
            }
        }
    }
}
