//! The notice carried by the link (a mail arrival, or a billing notice), and its payload
//! encoding.
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

/// Longest decimal text (tags 13 and 14).
pub const MAX_DECIMAL_LEN: usize = 24;

/// A decimal number as text, `-?DIGITS[.DIGITS]` ("-3.20", "5", "0.5"), at most
/// [`MAX_DECIMAL_LEN`] bytes: the balance and threshold of a billing notice, currency-free,
/// shown as they are.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct DecimalText(String);

/// The text is not a decimal number [`DecimalText`] accepts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a decimal number such as \"-3.20\"")]
pub struct DecimalError(pub String);

impl DecimalText {
    pub fn parse(s: &str) -> Result<Self, DecimalError> {
        let digits = s.strip_prefix('-').unwrap_or(s);
        let (int, frac) = match digits.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (digits, None),
        };
        let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if s.len() > MAX_DECIMAL_LEN || !all_digits(int) || !frac.is_none_or(all_digits) {
            return Err(DecimalError(s.chars().take(MAX_DECIMAL_LEN + 1).collect()));
        }
        Ok(Self(s.to_owned()))
    }

    /// `minor` units with `digits` fraction digits (at most 18): `from_minor(-320, 2)` is
    /// "-3.20". Always valid: at most 21 digits, a sign and a point.
    pub fn from_minor(minor: i64, digits: usize) -> Self {
        let digits = digits.min(18);
        let sign = if minor < 0 { "-" } else { "" };
        let abs = minor.unsigned_abs();
        let per = 10u64.pow(digits as u32);
        Self(match digits {
            0 => format!("{sign}{abs}"),
            _ => format!("{sign}{}.{:0digits$}", abs / per, abs % per),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DecimalText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for DecimalText {
    type Err = DecimalError;
    fn from_str(s: &str) -> Result<Self, DecimalError> {
        Self::parse(s)
    }
}

/// What a notice tells the user (tag 12).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum NoticeKind {
    /// Mail arrived (the fields 3 to 6, 8 and 11 describe it).
    #[default]
    Arrival,
    /// The account has entered arrears: its balance is below the grace threshold.
    BillingArrears { balance: DecimalText },
    /// The balance has fallen to or below a warning threshold.
    BillingWarning {
        balance: DecimalText,
        threshold: DecimalText,
    },
}

impl NoticeKind {
    /// The wire code (tag 12).
    pub fn code(&self) -> u8 {
        match self {
            NoticeKind::Arrival => 0,
            NoticeKind::BillingArrears { .. } => 1,
            NoticeKind::BillingWarning { .. } => 2,
        }
    }

    /// The kind's name: "arrival", "billing-arrears", "billing-warning".
    pub fn name(&self) -> &'static str {
        kind_name(self.code())
    }

    pub fn is_billing(&self) -> bool {
        !matches!(self, NoticeKind::Arrival)
    }
}

fn kind_name(code: u8) -> &'static str {
    match code {
        0 => "arrival",
        1 => "billing-arrears",
        2 => "billing-warning",
        _ => "unknown",
    }
}

/// One notice, as the mail host built it: a mail arrival (the default) or a billing notice.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Notification {
    pub id: NotifId,
    /// What the notice is about; a billing notice uses `phone`, `recipient` (the account's
    /// address), `received_at_ms` (when it was decided), `language` and `max_parts`.
    pub kind: NoticeKind,
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
    #[error("payload field 12 names notice kind {0}, which this build does not know")]
    UnknownKind(u8),
    #[error("payload field {tag} is not a decimal number such as \"-3.20\"")]
    Decimal { tag: u8 },
    #[error("a {kind} notice needs payload field {tag}")]
    Missing { tag: u8, kind: &'static str },
    #[error("payload field {tag} has no place in a {kind} notice")]
    Misplaced { tag: u8, kind: &'static str },
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
const T_KIND: u8 = 12;
const T_BALANCE: u8 = 13;
const T_THRESHOLD: u8 = 14;

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

fn decimal(tag: u8, v: &[u8]) -> Result<DecimalText, PayloadError> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|t| DecimalText::parse(t).ok())
        .ok_or(PayloadError::Decimal { tag })
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
        match self.kind {
            NoticeKind::Arrival => put(&mut out, T_COUNT, &self.count.to_be_bytes())?,
            // The guard: an agent that predates tag 12 refuses an empty count as malformed.
            _ => put(&mut out, T_COUNT, &[])?,
        }
        put(&mut out, T_MAX_PARTS, &[self.max_parts])?;
        if let Some(text) = &self.text {
            put(&mut out, T_TEXT, text.as_bytes())?;
        }
        if self.sole_address {
            put(&mut out, T_SOLE_ADDRESS, &[1])?;
        }
        match &self.kind {
            NoticeKind::Arrival => {}
            NoticeKind::BillingArrears { balance } => {
                put(&mut out, T_KIND, &[self.kind.code()])?;
                put(&mut out, T_BALANCE, balance.as_str().as_bytes())?;
            }
            NoticeKind::BillingWarning { balance, threshold } => {
                put(&mut out, T_KIND, &[self.kind.code()])?;
                put(&mut out, T_BALANCE, balance.as_str().as_bytes())?;
                put(&mut out, T_THRESHOLD, threshold.as_str().as_bytes())?;
            }
        }
        Ok(out)
    }

    /// Decodes a payload; unknown tags are skipped, an unknown notice kind is an error.
    pub fn decode_payload(id: NotifId, mut buf: &[u8]) -> Result<Self, PayloadError> {
        let mut n = Notification {
            id,
            count: 1,
            ..Default::default()
        };
        let mut kind = 0u8;
        // Tag 8 as sent: None absent, Some(true) the empty guard, Some(false) a count.
        let mut guard = None;
        let (mut balance, mut threshold) = (None, None);
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
                T_COUNT if v.is_empty() => guard = Some(true),
                T_COUNT => {
                    n.count = u32::from_be_bytes(fixed(tag, v)?);
                    guard = Some(false);
                }
                T_MAX_PARTS => n.max_parts = fixed::<1>(tag, v)?[0],
                T_TEXT => n.text = Some(text(tag, v)?),
                T_SOLE_ADDRESS => n.sole_address = fixed::<1>(tag, v)?[0] != 0,
                T_KIND => kind = fixed::<1>(tag, v)?[0],
                T_BALANCE => balance = Some(decimal(tag, v)?),
                T_THRESHOLD => threshold = Some(decimal(tag, v)?),
                _ => {}
            }
        }
        n.kind = Self::kind_from(kind, guard, balance, threshold)?;
        Ok(n)
    }

    /// The notice kind from the decoded tags 8, 12, 13 and 14, each where it belongs.
    fn kind_from(
        code: u8,
        guard: Option<bool>,
        balance: Option<DecimalText>,
        threshold: Option<DecimalText>,
    ) -> Result<NoticeKind, PayloadError> {
        let name = kind_name(code);
        let missing = |tag| PayloadError::Missing { tag, kind: name };
        let misplaced = |tag| PayloadError::Misplaced { tag, kind: name };
        if code == 0 {
            if guard == Some(true) {
                return Err(PayloadError::Width {
                    tag: T_COUNT,
                    len: 0,
                    expected: 4,
                });
            }
            if balance.is_some() {
                return Err(misplaced(T_BALANCE));
            }
            if threshold.is_some() {
                return Err(misplaced(T_THRESHOLD));
            }
            return Ok(NoticeKind::Arrival);
        }
        if code > 2 {
            return Err(PayloadError::UnknownKind(code));
        }
        match guard {
            None => return Err(missing(T_COUNT)),
            Some(false) => return Err(misplaced(T_COUNT)),
            Some(true) => {}
        }
        let balance = balance.ok_or_else(|| missing(T_BALANCE))?;
        match (code, threshold) {
            (1, None) => Ok(NoticeKind::BillingArrears { balance }),
            (1, Some(_)) => Err(misplaced(T_THRESHOLD)),
            (_, None) => Err(missing(T_THRESHOLD)),
            (_, Some(threshold)) => Ok(NoticeKind::BillingWarning { balance, threshold }),
        }
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
            kind: NoticeKind::Arrival,
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

    fn dec(s: &str) -> DecimalText {
        DecimalText::parse(s).unwrap()
    }

    fn billing(kind: NoticeKind) -> Notification {
        Notification {
            id: NotifId::random(),
            kind,
            phone: "+8613800138000".into(),
            recipient: "alice@example.com".into(),
            received_at_ms: 1_790_000_000_123,
            language: "zh".into(),
            count: 1,
            max_parts: 2,
            ..Default::default()
        }
    }

    fn arrears() -> Notification {
        billing(NoticeKind::BillingArrears {
            balance: dec("-3.20"),
        })
    }

    fn warning() -> Notification {
        billing(NoticeKind::BillingWarning {
            balance: dec("4.80"),
            threshold: dec("5.00"),
        })
    }

    /// `p` without the fields whose tag is in `tags`.
    fn without(mut p: &[u8], tags: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        while !p.is_empty() {
            let len = 3 + usize::from(u16::from_be_bytes([p[1], p[2]]));
            if !tags.contains(&p[0]) {
                out.extend_from_slice(&p[..len]);
            }
            p = &p[len..];
        }
        out
    }

    #[test]
    fn billing_notices_round_trip() {
        for n in [arrears(), warning()] {
            let p = n.encode_payload().unwrap();
            assert_eq!(Notification::decode_payload(n.id, &p).unwrap(), n);
            // Every cut inside a field is truncated; on a boundary it lacks a tag it needs,
            // or (before the guard) it is an arrival, as any TLV payload cut there would be.
            let guard_at =
                without(&p, &[T_COUNT, T_MAX_PARTS, T_KIND, T_BALANCE, T_THRESHOLD]).len();
            for cut in 1..p.len() {
                match Notification::decode_payload(n.id, &p[..cut]) {
                    Ok(d) if cut <= guard_at && d.kind == NoticeKind::Arrival => {}
                    Ok(d) => panic!("a cut payload decoded: {d:?}"),
                    Err(PayloadError::Truncated | PayloadError::Missing { .. }) => {}
                    Err(PayloadError::Width { tag: T_COUNT, .. }) => {} // cut before tag 12
                    Err(e) => panic!("cut at {cut}: {e}"),
                }
            }
        }
        assert_eq!(arrears().kind.name(), "billing-arrears");
        assert_eq!(warning().kind.code(), 2);
        assert!(!NoticeKind::Arrival.is_billing());
    }

    /// An agent that predates tag 12 skips tags 12-14 and decodes the rest as an arrival: the
    /// empty tag 8 makes that a malformed payload (a permanent NACK), never an empty SMS.
    #[test]
    fn an_old_agent_refuses_a_billing_notice() {
        for n in [arrears(), warning()] {
            let p = n.encode_payload().unwrap();
            let old_view = without(&p, &[T_KIND, T_BALANCE, T_THRESHOLD]);
            assert_eq!(
                Notification::decode_payload(n.id, &old_view),
                Err(PayloadError::Width {
                    tag: T_COUNT,
                    len: 0,
                    expected: 4
                })
            );
        }
        // An arrival keeps its exact old encoding: no tag 12, a 4-byte count.
        let p = sample().encode_payload().unwrap();
        assert_eq!(without(&p, &[T_KIND]), p);
    }

    #[test]
    fn billing_payloads_are_strict() {
        let id = NotifId::random();
        let decode = |p: &[u8]| Notification::decode_payload(id, p);
        let a = arrears().encode_payload().unwrap();
        let w = warning().encode_payload().unwrap();
        // A kind from a later version is refused, not rendered as something else.
        let mut later = a.clone();
        later.extend_from_slice(&[T_KIND, 0, 1, 3]);
        assert_eq!(decode(&later), Err(PayloadError::UnknownKind(3)));
        assert!(PayloadError::UnknownKind(3).to_string().contains("kind 3"));
        // The guard is required, and a count has no place in a billing notice.
        assert_eq!(
            decode(&without(&a, &[T_COUNT])),
            Err(PayloadError::Missing {
                tag: T_COUNT,
                kind: "billing-arrears"
            })
        );
        let mut counted = a.clone();
        counted.extend_from_slice(&[T_COUNT, 0, 4, 0, 0, 0, 1]);
        assert_eq!(
            decode(&counted),
            Err(PayloadError::Misplaced {
                tag: T_COUNT,
                kind: "billing-arrears"
            })
        );
        assert_eq!(
            decode(&without(&a, &[T_BALANCE])),
            Err(PayloadError::Missing {
                tag: T_BALANCE,
                kind: "billing-arrears"
            })
        );
        assert_eq!(
            decode(&without(&w, &[T_THRESHOLD])),
            Err(PayloadError::Missing {
                tag: T_THRESHOLD,
                kind: "billing-warning"
            })
        );
        let mut extra = a.clone();
        extra.extend_from_slice(&[T_THRESHOLD, 0, 1, b'5']);
        assert_eq!(
            decode(&extra),
            Err(PayloadError::Misplaced {
                tag: T_THRESHOLD,
                kind: "billing-arrears"
            })
        );
        // An arrival with billing fields or the guard is refused too.
        let mut p = sample().encode_payload().unwrap();
        p.extend_from_slice(&[T_BALANCE, 0, 1, b'1']);
        assert_eq!(
            decode(&p),
            Err(PayloadError::Misplaced {
                tag: T_BALANCE,
                kind: "arrival"
            })
        );
        let mut bad = without(&a, &[T_BALANCE]);
        bad.extend_from_slice(&[T_BALANCE, 0, 4, b'1', b',', b'5', b'0']);
        assert_eq!(decode(&bad), Err(PayloadError::Decimal { tag: T_BALANCE }));
        let mut bad = without(&a, &[T_BALANCE]);
        bad.extend_from_slice(&[T_BALANCE, 0, 1, 0xff]);
        assert_eq!(decode(&bad), Err(PayloadError::Decimal { tag: T_BALANCE }));
        assert_eq!(
            decode(&[T_KIND, 0, 2, 1, 1]),
            Err(PayloadError::Width {
                tag: T_KIND,
                len: 2,
                expected: 1
            })
        );
        // Tags after 14 are still skipped.
        let mut future = w.clone();
        future.extend_from_slice(&[99, 0, 1, 7]);
        assert_eq!(decode(&future).unwrap().kind, warning().kind);
    }

    #[test]
    fn decimal_text() {
        for ok in ["0", "-3.20", "5", "0.5", "123456.789", "-0"] {
            assert_eq!(DecimalText::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "", "-", ".5", "5.", "1,50", "+1", " 1", "1e3", "--1", "1.2.3", "٣",
        ] {
            assert!(DecimalText::parse(bad).is_err(), "{bad:?}");
        }
        for (minor, digits, text) in [
            (-320, 2, "-3.20"),
            (5, 2, "0.05"),
            (0, 2, "0.00"),
            (1234, 0, "1234"),
            (-7, 3, "-0.007"),
            (i64::MIN, 2, "-92233720368547758.08"),
            (i64::MAX, 18, "9.223372036854775807"),
            (1, 40, "0.000000000000000001"),
        ] {
            let d = DecimalText::from_minor(minor, digits);
            assert_eq!(d.as_str(), text);
            assert_eq!(DecimalText::parse(text), Ok(d));
        }
        let long = "1".repeat(MAX_DECIMAL_LEN + 1);
        assert!(DecimalText::parse(&long).is_err());
        assert!(DecimalText::parse(&long[1..]).is_ok());
        assert_eq!(
            DecimalText::parse("x").unwrap_err().to_string(),
            "\"x\" is not a decimal number such as \"-3.20\""
        );
    }
}
