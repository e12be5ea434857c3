//! The arrival notice carried by the link, and its payload encoding.
//!
//! The payload is a list of tag-length-value fields so either side can add fields without a
//! protocol version bump: a receiver skips tags it does not know.
//!
//! ```text
//! field   = tag:u8  len:u16be  value:len bytes
//! tags    1 phone (UTF-8, E.164 "+8613800138000")     2 recipient mailbox (UTF-8)
//!         3 sender display name (UTF-8, decoded)       4 sender address (UTF-8)
//!         5 subject (UTF-8, decoded)                   6 received at (i64be, Unix milliseconds)
//!         7 language tag (UTF-8, "zh", "en"; empty = agent default)
//!         8 message count (u32be, >= 1; > 1 for a coalesced notice)
//!         9 maximum SMS parts (u8; 0 = agent default)
//!        10 literal SMS text (UTF-8): replaces the agent's template (operator test messages)
//!        11 sole address (u8 1; absent = 0): the recipient is the user's only address, so
//!           the SMS may leave it out
//! ```
//! The notification id travels in the frame header, not in the payload, so that a receiver can
//! always answer a payload it cannot decode with a NACK naming the id.

use crate::id::NotifId;

/// The languages the agent has a built-in template for (tag 7). The mail side accepts only
/// these (or a subtag of one, e.g. "en-US", which the agent renders with "en"), so a user is
/// never registered with a language no agent renders.
pub const BUILTIN_LANGUAGES: &[&str] = &["zh", "en"];

/// Whether the agent has a built-in template for `tag`: a [`BUILTIN_LANGUAGES`] entry or a
/// subtag of one, case-insensitive; the empty tag (agent default) too.
pub fn is_builtin_language(tag: &str) -> bool {
    has_template(tag, &[])
}

/// [`is_builtin_language`], or `tag` (or its primary subtag) is one of `extra`: the languages
/// the operator gave the agents templates for (`[sms.templates.<lang>]`).
pub fn has_template(tag: &str, extra: &[String]) -> bool {
    let primary = tag.split(['-', '_']).next().unwrap_or_default();
    tag.is_empty()
        || BUILTIN_LANGUAGES
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str))
            .any(|l| l.eq_ignore_ascii_case(primary) || l.eq_ignore_ascii_case(tag))
}

/// The most SMS parts a notice may ask for (tag 9) and an agent sends (its `sms.max_parts_cap`
/// may not exceed it).
pub const MAX_SMS_PARTS: u8 = 10;

/// One arrival notice, as the mail host built it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Notification {
    pub id: NotifId,
    /// Destination phone number, E.164 with a leading `+`.
    pub phone: String,
    /// The registered address (primary or alias, as registered) that received the message.
    pub recipient: String,
    /// The recipient is the user's only address: the SMS need not name it.
    pub sole_address: bool,
    /// Decoded display name of the sender (may be empty).
    pub from_name: String,
    /// Envelope or header sender address.
    pub from_addr: String,
    /// Decoded subject (may be empty).
    pub subject: String,
    /// Arrival time, Unix milliseconds.
    pub received_at_ms: i64,
    /// Language of the SMS template; empty means the agent's default.
    pub language: String,
    /// Number of messages this notice stands for (1 unless coalesced).
    pub count: u32,
    /// Upper bound on SMS parts; 0 means the agent's default.
    pub max_parts: u8,
    /// Literal SMS text replacing the template (e.g. `send-test`); `None` renders the template.
    pub text: Option<String>,
}

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PayloadError {
    #[error("payload field truncated")]
    Truncated,
    #[error("payload field {tag} is not valid UTF-8")]
    Utf8 { tag: u8 },
    #[error("payload field {tag} has length {len}, expected {expected}")]
    Width {
        tag: u8,
        len: usize,
        expected: usize,
    },
    #[error("payload field {tag} is longer than 65535 bytes")]
    TooLong { tag: u8 },
}

const T_PHONE: u8 = 1;
const T_RECIPIENT: u8 = 2;
const T_FROM_NAME: u8 = 3;
const T_FROM_ADDR: u8 = 4;
const T_SUBJECT: u8 = 5;
const T_RECEIVED: u8 = 6;
const T_LANG: u8 = 7;
const T_COUNT: u8 = 8;
const T_MAX_PARTS: u8 = 9;
const T_TEXT: u8 = 10;
const T_SOLE_ADDRESS: u8 = 11;

fn put(out: &mut Vec<u8>, tag: u8, value: &[u8]) -> Result<(), PayloadError> {
    let len = u16::try_from(value.len()).map_err(|_| PayloadError::TooLong { tag })?;
    out.push(tag);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(value);
    Ok(())
}

fn text(tag: u8, v: &[u8]) -> Result<String, PayloadError> {
    String::from_utf8(v.to_vec()).map_err(|_| PayloadError::Utf8 { tag })
}

fn fixed<const N: usize>(tag: u8, v: &[u8]) -> Result<[u8; N], PayloadError> {
    v.try_into().map_err(|_| PayloadError::Width {
        tag,
        len: v.len(),
        expected: N,
    })
}

impl Notification {
    /// Encodes the payload (everything but the id).
    pub fn encode_payload(&self) -> Result<Vec<u8>, PayloadError> {
        let mut out = Vec::with_capacity(
            64 + self.phone.len()
                + self.recipient.len()
                + self.from_name.len()
                + self.from_addr.len()
                + self.subject.len(),
        );
        put(&mut out, T_PHONE, self.phone.as_bytes())?;
        put(&mut out, T_RECIPIENT, self.recipient.as_bytes())?;
        put(&mut out, T_FROM_NAME, self.from_name.as_bytes())?;
        put(&mut out, T_FROM_ADDR, self.from_addr.as_bytes())?;
        put(&mut out, T_SUBJECT, self.subject.as_bytes())?;
        put(&mut out, T_RECEIVED, &self.received_at_ms.to_be_bytes())?;
        put(&mut out, T_LANG, self.language.as_bytes())?;
        put(&mut out, T_COUNT, &self.count.to_be_bytes())?;
        put(&mut out, T_MAX_PARTS, &[self.max_parts])?;
        if let Some(text) = &self.text {
            put(&mut out, T_TEXT, text.as_bytes())?;
        }
        if self.sole_address {
            put(&mut out, T_SOLE_ADDRESS, &[1])?;
        }
        Ok(out)
    }

    /// Decodes a payload; unknown tags are skipped.
    pub fn decode_payload(id: NotifId, mut buf: &[u8]) -> Result<Self, PayloadError> {
        let mut n = Notification {
            id,
            count: 1,
            ..Default::default()
        };
        while !buf.is_empty() {
            if buf.len() < 3 {
                return Err(PayloadError::Truncated);
            }
            let tag = buf[0];
            let len = usize::from(u16::from_be_bytes([buf[1], buf[2]]));
            let rest = &buf[3..];
            if rest.len() < len {
                return Err(PayloadError::Truncated);
            }
            let (v, tail) = rest.split_at(len);
            buf = tail;
            match tag {
                T_PHONE => n.phone = text(tag, v)?,
                T_RECIPIENT => n.recipient = text(tag, v)?,
                T_FROM_NAME => n.from_name = text(tag, v)?,
                T_FROM_ADDR => n.from_addr = text(tag, v)?,
                T_SUBJECT => n.subject = text(tag, v)?,
                T_RECEIVED => n.received_at_ms = i64::from_be_bytes(fixed(tag, v)?),
                T_LANG => n.language = text(tag, v)?,
                T_COUNT => n.count = u32::from_be_bytes(fixed(tag, v)?),
                T_MAX_PARTS => n.max_parts = fixed::<1>(tag, v)?[0],
                T_TEXT => n.text = Some(text(tag, v)?),
                T_SOLE_ADDRESS => n.sole_address = fixed::<1>(tag, v)?[0] != 0,
                _ => {}
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_languages() {
        for ok in ["", "zh", "EN", "en-US", "zh_CN"] {
            assert!(is_builtin_language(ok), "{ok}");
        }
        for bad in ["fr", "pt-BR", "-en"] {
            assert!(!is_builtin_language(bad), "{bad}");
        }
    }

    fn sample() -> Notification {
        Notification {
            id: NotifId::random(),
            phone: "+8613800138000".into(),
            recipient: "alice@example.com".into(),
            sole_address: true,
            from_name: "张三".into(),
            from_addr: "zhang@example.cn".into(),
            subject: "会议通知 Meeting".into(),
            received_at_ms: 1_790_000_000_123,
            language: "zh".into(),
            count: 3,
            max_parts: 2,
            text: None,
        }
    }

    #[test]
    fn round_trip() {
        let n = sample();
        let p = n.encode_payload().unwrap();
        assert_eq!(Notification::decode_payload(n.id, &p).unwrap(), n);
    }

    #[test]
    fn literal_text_round_trips() {
        let mut n = sample();
        n.text = Some("test message".into());
        let p = n.encode_payload().unwrap();
        assert_eq!(Notification::decode_payload(n.id, &p).unwrap(), n);
    }

    #[test]
    fn sole_address_is_absent_unless_set() {
        let mut n = sample();
        n.sole_address = false;
        let p = n.encode_payload().unwrap();
        assert!(
            !p.contains(&T_SOLE_ADDRESS),
            "an older agent sees the same payload"
        );
        assert_eq!(Notification::decode_payload(n.id, &p).unwrap(), n);
    }

    #[test]
    fn unknown_tags_are_skipped() {
        let n = sample();
        let mut p = n.encode_payload().unwrap();
        p.extend_from_slice(&[200, 0, 2, 1, 2]);
        assert_eq!(Notification::decode_payload(n.id, &p).unwrap(), n);
    }

    #[test]
    fn truncated_and_invalid_are_errors() {
        let n = sample();
        let p = n.encode_payload().unwrap();
        for cut in 1..p.len() {
            // A cut inside a field is always an error; a cut on a field boundary decodes.
            let r = Notification::decode_payload(n.id, &p[..cut]);
            if let Err(e) = r {
                assert_eq!(e, PayloadError::Truncated);
            }
        }
        assert_eq!(
            Notification::decode_payload(n.id, &[T_SUBJECT, 0, 1, 0xff]),
            Err(PayloadError::Utf8 { tag: T_SUBJECT })
        );
        assert_eq!(
            Notification::decode_payload(n.id, &[T_COUNT, 0, 1, 1]),
            Err(PayloadError::Width {
                tag: T_COUNT,
                len: 1,
                expected: 4
            })
        );
    }

    #[test]
    fn oversized_field_is_refused() {
        let mut n = sample();
        n.subject = "x".repeat(70_000);
        assert_eq!(
            n.encode_payload(),
            Err(PayloadError::TooLong { tag: T_SUBJECT })
        );
    }
}
