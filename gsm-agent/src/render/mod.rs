//! SMS text from a notice (a mail arrival or a billing notice) and a per-language template.
//!
//! ```text
//! template     = { item | "{[" { item } "]}" }
//! item         = literal | "{" name "}" | "{{" | "}}"
//! name         = recipient | sender | subject | time | count
//! {[ … ]}      = left out with what it holds when it holds {recipient} and the notice says the
//!                recipient is the user's only address (nothing to tell apart)
//! {recipient}  = the registered address the mail reached, as the mail host sends it
//! {sender}     = the decoded display name; the address when there is none, or when the name is
//!                still MIME-encoded (`=?UTF-8?B?…?=` that the mail host could not decode)
//! {time}       = received_at in the configured UTC offset, chrono strftime (default %m-%d %H:%M)
//! {count}      = messages a coalesced notice stands for; count > 1 picks the coalesced template
//! ```
//! Billing notices (link tag 12) use the `arrears` and `warning` texts of the language, with
//! their own names: `{address}` (the account's address, shown and cut like `{recipient}`),
//! `{balance}`, `{threshold}` (warning only; both decimal text as the mail host sent them, never
//! cut) and `{time}` (when the notice was decided). A language configured without them takes
//! the built-in ones of that language, or else the default language's.
//! Header-derived fields (recipient, sender, subject) lose control and invisible formatting
//! characters, get whitespace runs collapsed to one space, and curly quotes and dashes turned
//! into ASCII so English text stays in GSM-7. The result always fits the part budget as
//! [`pdu::measure`] counts it: when it is too long a sender shown as an address becomes its
//! local part first, then the subject is cut, then the sender, then the local part of the
//! recipient, each ending in "…" (or "..." when "…" would be the only thing forcing UCS-2).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, FixedOffset};
use mailbell_link::notification::{NoticeKind, MAX_SMS_PARTS};
use mailbell_link::Notification;

use crate::modem::pdu::{self, Alphabet};

/// The texts of one language.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// Used for a notice about one message.
    pub single: String,
    /// Used when the notice stands for `count > 1` messages.
    pub coalesced: String,
    /// Billing notice: the account has entered arrears. `None`: the built-in text of this
    /// language, or the default language's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrears: Option<String>,
    /// Billing notice: the balance has reached a warning threshold. `None` as for `arrears`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// Everything the renderer needs, usually from the `[render]` config section.
#[derive(Clone, Debug)]
pub struct RenderConfig {
    /// Language used when a notice names none or one without a template.
    pub default_language: String,
    /// Templates by language tag ("zh", "en"; matched case-insensitively, "en-US" falls back
    /// to "en").
    pub templates: BTreeMap<String, Template>,
    /// Offset of the local time shown in `{time}`, minutes east of UTC.
    pub utc_offset_minutes: i32,
    /// chrono strftime format of `{time}`.
    pub time_format: String,
    /// Part budget of a notice with `max_parts == 0`.
    pub default_max_parts: u8,
    /// Upper bound on any notice's part budget.
    pub max_parts_cap: u8,
}

impl Default for RenderConfig {
    fn default() -> Self {
        RenderConfig {
            default_language: "zh".to_owned(),
            templates: builtin_templates(),
            utc_offset_minutes: 8 * 60,
            time_format: "%m-%d %H:%M".to_owned(),
            default_max_parts: 1,
            max_parts_cap: 4,
        }
    }
}

/// The built-in "zh" and "en" templates.
pub fn builtin_templates() -> BTreeMap<String, Template> {
    let mut m = BTreeMap::new();
    m.insert(
        "zh".to_owned(),
        Template {
            single: "新邮件{[ {recipient}]}：来自 {sender}，主题：{subject}，{time}".to_owned(),
            coalesced:
                "{count}封新邮件{[ {recipient}]}：最新来自 {sender}，主题：{subject}，{time}"
                    .to_owned(),
            arrears: Some("您的邮箱 {address} 余额 {balance} 元，已欠费，请尽快充值。".to_owned()),
            warning: Some(
                "您的邮箱 {address} 余额 {balance} 元，已低于 {threshold} 元，请及时充值。"
                    .to_owned(),
            ),
        },
    );
    m.insert(
        "en".to_owned(),
        Template {
            single: "New mail{[ for {recipient}]} from {sender}: {subject} ({time})".to_owned(),
            coalesced:
                "{count} new messages{[ for {recipient}]}, latest from {sender}: {subject} ({time})"
                    .to_owned(),
            arrears: Some(
                "Your mailbox {address} is in arrears: balance {balance}. Please top up soon."
                    .to_owned(),
            ),
            warning: Some(
                "Your mailbox {address} balance is {balance}, at or below {threshold}. Please top up."
                    .to_owned(),
            ),
        },
    );
    m
}

/// Why a configuration was refused or a notice could not be rendered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RenderError {
    #[error("unknown placeholder {{{name}}} in the {kind} template for language {language:?}")]
    UnknownPlaceholder {
        language: String,
        kind: &'static str,
        name: String,
    },
    #[error("unclosed placeholder in the {kind} template for language {language:?}")]
    UnclosedPlaceholder {
        language: String,
        kind: &'static str,
    },
    #[error("unmatched '}}' in the {kind} template for language {language:?} (write '}}}}' for a literal brace)")]
    UnmatchedBrace {
        language: String,
        kind: &'static str,
    },
    #[error("unclosed or nested '{{[' section in the {kind} template for language {language:?}")]
    UnclosedSection {
        language: String,
        kind: &'static str,
    },
    #[error("the {kind} template for language {language:?} is empty")]
    EmptyTemplate {
        language: String,
        kind: &'static str,
    },
    #[error("default language {0:?} has no template")]
    MissingDefaultLanguage(String),
    #[error("no {kind} template for language {language:?} nor the default language (add `{kind} = \"…\"` to [sms.templates.{language}])")]
    MissingBillingTemplate {
        language: String,
        kind: &'static str,
    },
    #[error("invalid time format {0:?}")]
    InvalidTimeFormat(String),
    #[error("utc offset of {0} minutes is out of range")]
    InvalidUtcOffset(i32),
    #[error("{0} must be at least 1")]
    ZeroMaxParts(&'static str),
    #[error("received time {0} ms is out of range")]
    TimestampOutOfRange(i64),
    #[error("rendered text is empty")]
    Empty,
    #[error("sms.max_parts_cap = {0} is more than the {max} parts a notice may ask for", max = MAX_SMS_PARTS)]
    MaxPartsCapTooHigh(u8),
    #[error("text does not fit in {max_parts} sms parts even after truncation")]
    DoesNotFit { max_parts: u8 },
    #[error("text needs {parts} sms parts, more than the {max_parts} allowed (a notice may ask for up to sms.max_parts_cap = {cap})")]
    LiteralTooLong {
        parts: usize,
        max_parts: u8,
        cap: u8,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    /// `{recipient}`, and `{address}` in billing templates.
    Recipient,
    Sender,
    Subject,
    Time,
    Count,
    Balance,
    Threshold,
}

/// The placeholders each kind of template may name.
const ARRIVAL_NAMES: &[(&str, Field)] = &[
    ("recipient", Field::Recipient),
    ("sender", Field::Sender),
    ("subject", Field::Subject),
    ("time", Field::Time),
    ("count", Field::Count),
];
const ARREARS_NAMES: &[(&str, Field)] = &[
    ("address", Field::Recipient),
    ("balance", Field::Balance),
    ("time", Field::Time),
];
const WARNING_NAMES: &[(&str, Field)] = &[
    ("address", Field::Recipient),
    ("balance", Field::Balance),
    ("threshold", Field::Threshold),
    ("time", Field::Time),
];

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Field(Field),
    /// `{[ … ]}`: left out when it holds a field the notice leaves out.
    Section(Vec<Segment>),
}

/// Whether `field` appears in `segs` (in a section too).
fn uses(segs: &[Segment], field: Field) -> bool {
    segs.iter().any(|s| match s {
        Segment::Field(f) => *f == field,
        Segment::Section(inner) => uses(inner, field),
        Segment::Literal(_) => false,
    })
}

#[derive(Clone, Debug)]
struct Compiled {
    single: Vec<Segment>,
    coalesced: Vec<Segment>,
    /// `None`: the default language's.
    arrears: Option<Vec<Segment>>,
    warning: Option<Vec<Segment>>,
    no_subject: &'static str,
}

/// Renders notices; built once from a validated [`RenderConfig`].
#[derive(Clone, Debug)]
pub struct Renderer {
    templates: BTreeMap<String, Compiled>,
    default_template: Compiled,
    offset: FixedOffset,
    time_format: String,
    default_max_parts: u8,
    max_parts_cap: u8,
}

impl Renderer {
    /// Checks every template (placeholders, braces, non-empty), the default language, the time
    /// format, the offset and the part limits.
    pub fn new(cfg: RenderConfig) -> Result<Self, RenderError> {
        let mut templates = BTreeMap::new();
        let builtin = builtin_templates();
        for (language, t) in &cfg.templates {
            let key = normalize_language(language);
            let own = builtin.get(&key);
            let billing = |text: &Option<String>,
                           fallback: Option<&Option<String>>,
                           kind: &'static str,
                           names: &[(&str, Field)]| {
                text.as_ref()
                    .or(fallback.and_then(Option::as_ref))
                    .map(|src| parse_template(src, language, kind, names))
                    .transpose()
            };
            let compiled = Compiled {
                single: parse_template(&t.single, language, "single", ARRIVAL_NAMES)?,
                coalesced: parse_template(&t.coalesced, language, "coalesced", ARRIVAL_NAMES)?,
                arrears: billing(
                    &t.arrears,
                    own.map(|b| &b.arrears),
                    "arrears",
                    ARREARS_NAMES,
                )?,
                warning: billing(
                    &t.warning,
                    own.map(|b| &b.warning),
                    "warning",
                    WARNING_NAMES,
                )?,
                no_subject: no_subject_placeholder(&key),
            };
            templates.insert(key, compiled);
        }
        let default_template = templates
            .get(&normalize_language(&cfg.default_language))
            .cloned()
            .ok_or_else(|| RenderError::MissingDefaultLanguage(cfg.default_language.clone()))?;

        if StrftimeItems::new(&cfg.time_format).any(|i| matches!(i, Item::Error)) {
            return Err(RenderError::InvalidTimeFormat(cfg.time_format));
        }
        let offset = cfg
            .utc_offset_minutes
            .checked_mul(60)
            .and_then(FixedOffset::east_opt)
            .ok_or(RenderError::InvalidUtcOffset(cfg.utc_offset_minutes))?;
        if cfg.default_max_parts == 0 {
            return Err(RenderError::ZeroMaxParts("default_max_parts"));
        }
        if cfg.max_parts_cap == 0 {
            return Err(RenderError::ZeroMaxParts("max_parts_cap"));
        }
        if cfg.max_parts_cap > MAX_SMS_PARTS {
            return Err(RenderError::MaxPartsCapTooHigh(cfg.max_parts_cap));
        }
        Ok(Renderer {
            templates,
            default_template,
            offset,
            time_format: cfg.time_format,
            default_max_parts: cfg.default_max_parts,
            max_parts_cap: cfg.max_parts_cap,
        })
    }

    /// The part budget of `n`: its own `max_parts`, or the default when 0, capped.
    pub fn max_parts_for(&self, n: &Notification) -> u8 {
        let wanted = match n.max_parts {
            0 => self.default_max_parts,
            m => m,
        };
        wanted.min(self.max_parts_cap).max(1)
    }

    /// Checks a literal text (`send-test`) against the part budget of `n`: it is sent as is,
    /// never cut, so one over the budget is refused at receipt rather than dead-lettered.
    pub fn check_literal(&self, n: &Notification, text: &str) -> Result<(), RenderError> {
        let max_parts = self.max_parts_for(n);
        let parts = pdu::measure(text).parts;
        if parts > usize::from(max_parts) {
            return Err(RenderError::LiteralTooLong {
                parts,
                max_parts,
                cap: self.max_parts_cap,
            });
        }
        Ok(())
    }

    /// The SMS text for `n`, within [`Renderer::max_parts_for`] parts.
    pub fn render(&self, n: &Notification) -> Result<String, RenderError> {
        let tpl = self.template_for(&n.language);
        let (segs, balance, threshold) = match &n.kind {
            NoticeKind::Arrival if n.count > 1 => (&tpl.coalesced[..], "", ""),
            NoticeKind::Arrival => (&tpl.single[..], "", ""),
            NoticeKind::BillingArrears { balance } => (
                self.billing_template(tpl, |t| &t.arrears)
                    .ok_or_else(|| missing_billing(n, "arrears"))?,
                balance.as_str(),
                "",
            ),
            NoticeKind::BillingWarning { balance, threshold } => (
                self.billing_template(tpl, |t| &t.warning)
                    .ok_or_else(|| missing_billing(n, "warning"))?,
                balance.as_str(),
                threshold.as_str(),
            ),
        };
        let max_parts = self.max_parts_for(n);

        let recipient = sanitize(&n.recipient);
        let (local, domain) = match recipient.rfind('@') {
            Some(at) => recipient.split_at(at),
            None => (recipient.as_str(), ""),
        };
        let mut sender = sanitize(&n.from_name);
        if still_encoded(&sender) {
            sender.clear();
        }
        let sender_is_address = sender.is_empty();
        if sender_is_address {
            sender = sanitize(&n.from_addr);
        }
        // A sender shown as an address gives way to its local part before the subject is cut.
        let sender_local = match sender.rfind('@') {
            Some(at) if sender_is_address && at > 0 => sender[..at].to_owned(),
            _ => sender.clone(),
        };
        let mut subject = sanitize(&n.subject);
        if subject.is_empty() {
            subject = tpl.no_subject.to_owned();
        }
        let time = self.format_time(n.received_at_ms)?;
        let count = n.count.to_string();

        let mut v = Values {
            omit_recipient: n.sole_address,
            recipient_local: Piece::new(local),
            recipient_domain: domain,
            sender: Piece::new(&sender),
            subject: Piece::new(&subject),
            time: &time,
            count: &count,
            balance,
            threshold,
        };
        let fits = |t: &str| pdu::measure(t).parts <= usize::from(max_parts);

        let text = finish(segs, &v);
        if text.trim().is_empty() {
            return Err(RenderError::Empty);
        }
        if fits(&text) {
            return Ok(text);
        }
        if sender_local != sender {
            v.sender = Piece::new(&sender_local);
            let text = finish(segs, &v);
            if fits(&text) {
                return Ok(text);
            }
        }
        // No prefix longer than this many characters can fit, whatever the alphabet.
        let most = pdu::capacity(Alphabet::Gsm7, max_parts);
        for which in [Cut::Subject, Cut::Sender, Cut::RecipientLocal] {
            let field = match which {
                Cut::Subject => Field::Subject,
                Cut::Sender => Field::Sender,
                Cut::RecipientLocal => Field::Recipient,
            };
            if !uses(segs, field) || (field == Field::Recipient && v.omit_recipient) {
                continue;
            }
            let len = v.piece(which).full.chars().count();
            if len == 0 {
                continue;
            }
            v.piece_mut(which).keep = Some(0);
            if !fits(&finish(segs, &v)) {
                continue; // leave it at "…" and cut the next field too
            }
            // Largest kept prefix that fits; `lo` always fits.
            let (mut lo, mut hi) = (0, (len - 1).min(most));
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                v.piece_mut(which).keep = Some(mid);
                if fits(&finish(segs, &v)) {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            v.piece_mut(which).keep = Some(lo);
            return Ok(finish(segs, &v));
        }
        Err(RenderError::DoesNotFit { max_parts })
    }

    /// The language's billing template, or the default language's.
    fn billing_template<'a>(
        &'a self,
        tpl: &'a Compiled,
        which: impl Fn(&Compiled) -> &Option<Vec<Segment>>,
    ) -> Option<&'a [Segment]> {
        which(tpl)
            .as_deref()
            .or(which(&self.default_template).as_deref())
    }

    /// The billing kinds ("arrears", "warning") the default language has no text for: such a
    /// notice in a language without its own text is refused at receipt (a permanent NACK
    /// naming the key to add), so the agent warns about them at start.
    pub fn missing_billing_templates(&self) -> Vec<&'static str> {
        let d = &self.default_template;
        [("arrears", &d.arrears), ("warning", &d.warning)]
            .into_iter()
            .filter(|(_, t)| t.is_none())
            .map(|(k, _)| k)
            .collect()
    }

    fn template_for(&self, language: &str) -> &Compiled {
        let l = normalize_language(language);
        if let Some(t) = self.templates.get(&l) {
            return t;
        }
        if let Some((primary, _)) = l.split_once('-') {
            if let Some(t) = self.templates.get(primary) {
                return t;
            }
        }
        &self.default_template
    }

    fn format_time(&self, ms: i64) -> Result<String, RenderError> {
        let utc =
            DateTime::from_timestamp_millis(ms).ok_or(RenderError::TimestampOutOfRange(ms))?;
        let mut out = String::new();
        write!(
            out,
            "{}",
            utc.with_timezone(&self.offset).format(&self.time_format)
        )
        .map_err(|_| RenderError::InvalidTimeFormat(self.time_format.clone()))?;
        Ok(out)
    }
}

fn missing_billing(n: &Notification, kind: &'static str) -> RenderError {
    RenderError::MissingBillingTemplate {
        language: n.language.clone(),
        kind,
    }
}

fn normalize_language(l: &str) -> String {
    l.trim().to_ascii_lowercase().replace('_', "-")
}

fn no_subject_placeholder(language: &str) -> &'static str {
    if language == "zh" || language.starts_with("zh-") {
        "(无主题)"
    } else {
        "(no subject)"
    }
}

fn parse_template(
    src: &str,
    language: &str,
    kind: &'static str,
    names: &[(&str, Field)],
) -> Result<Vec<Segment>, RenderError> {
    let mut segs = Vec::new();
    // The segments before the open section, while one is open.
    let mut outer: Option<Vec<Segment>> = None;
    let mut lit = String::new();
    let mut chars = src.chars().peekable();
    let unclosed = || RenderError::UnclosedSection {
        language: language.to_owned(),
        kind,
    };
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                lit.push('{');
            }
            '{' if chars.peek() == Some(&'[') => {
                chars.next();
                if outer.is_some() {
                    return Err(unclosed());
                }
                if !lit.is_empty() {
                    segs.push(Segment::Literal(std::mem::take(&mut lit)));
                }
                outer = Some(std::mem::take(&mut segs));
            }
            ']' if chars.peek() == Some(&'}') && outer.is_some() => {
                chars.next();
                if !lit.is_empty() {
                    segs.push(Segment::Literal(std::mem::take(&mut lit)));
                }
                let inner = std::mem::take(&mut segs);
                segs = outer.take().unwrap_or_default();
                segs.push(Segment::Section(inner));
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some('{') | None => {
                            return Err(RenderError::UnclosedPlaceholder {
                                language: language.to_owned(),
                                kind,
                            })
                        }
                        Some(c) => name.push(c),
                    }
                }
                let Some(&(_, field)) = names.iter().find(|(n, _)| *n == name) else {
                    return Err(RenderError::UnknownPlaceholder {
                        language: language.to_owned(),
                        kind,
                        name,
                    });
                };
                if !lit.is_empty() {
                    segs.push(Segment::Literal(std::mem::take(&mut lit)));
                }
                segs.push(Segment::Field(field));
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                lit.push('}');
            }
            '}' => {
                return Err(RenderError::UnmatchedBrace {
                    language: language.to_owned(),
                    kind,
                })
            }
            c => lit.push(c),
        }
    }
    if outer.is_some() {
        return Err(unclosed());
    }
    if !lit.is_empty() {
        segs.push(Segment::Literal(lit));
    }
    let blank = segs
        .iter()
        .all(|s| matches!(s, Segment::Literal(l) if l.trim().is_empty()));
    if blank {
        return Err(RenderError::EmptyTemplate {
            language: language.to_owned(),
            kind,
        });
    }
    Ok(segs)
}

/// Whether a display name still holds a MIME encoded word (`=?charset?B|Q?…?=`): the mail host
/// could not decode it, and the SMS shows the address instead of the raw encoding.
fn still_encoded(name: &str) -> bool {
    name.find("=?")
        .is_some_and(|start| name[start + 2..].contains("?="))
}

/// Cleans a header-derived value for an SMS: drops control and invisible formatting characters
/// (bidi overrides, zero-width spaces, BOM, soft hyphen), maps curly quotes and dashes to ASCII,
/// collapses whitespace runs (newlines included) to one space and trims.
fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.chars() {
        let c = match c {
            '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}' => '\'',
            '\u{201C}' | '\u{201D}' | '\u{201E}' => '"',
            '\u{2010}'..='\u{2015}' => '-',
            c => c,
        };
        if c.is_whitespace() {
            space = true;
            continue;
        }
        if c.is_control()
            || matches!(c, '\u{00AD}' | '\u{200B}' | '\u{200C}' | '\u{200E}' | '\u{200F}'
                | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}'
                | '\u{FEFF}')
        {
            continue;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        space = false;
        out.push(c);
    }
    out
}

#[derive(Clone, Copy, Debug)]
enum Cut {
    Subject,
    Sender,
    RecipientLocal,
}

/// A field value, possibly cut to its first `keep` characters plus an ellipsis.
#[derive(Clone, Copy, Debug)]
struct Piece<'a> {
    full: &'a str,
    keep: Option<usize>,
}

impl<'a> Piece<'a> {
    fn new(full: &'a str) -> Self {
        Piece { full, keep: None }
    }

    fn push(&self, out: &mut String, ellipsis: &str) {
        match self.keep {
            None => out.push_str(self.full),
            Some(k) => {
                let end = self
                    .full
                    .char_indices()
                    .nth(k)
                    .map_or(self.full.len(), |(i, _)| i);
                out.push_str(
                    self.full[..end]
                        .trim_end_matches(|c: char| c.is_whitespace() || c == '\u{200D}'),
                );
                out.push_str(ellipsis);
            }
        }
    }
}

struct Values<'a> {
    /// The recipient is the user's only address: sections holding it are left out.
    omit_recipient: bool,
    recipient_local: Piece<'a>,
    recipient_domain: &'a str,
    sender: Piece<'a>,
    subject: Piece<'a>,
    time: &'a str,
    count: &'a str,
    balance: &'a str,
    threshold: &'a str,
}

impl<'a> Values<'a> {
    fn piece(&self, which: Cut) -> &Piece<'a> {
        match which {
            Cut::Subject => &self.subject,
            Cut::Sender => &self.sender,
            Cut::RecipientLocal => &self.recipient_local,
        }
    }

    fn piece_mut(&mut self, which: Cut) -> &mut Piece<'a> {
        match which {
            Cut::Subject => &mut self.subject,
            Cut::Sender => &mut self.sender,
            Cut::RecipientLocal => &mut self.recipient_local,
        }
    }

    fn any_cut(&self) -> bool {
        [self.subject, self.sender, self.recipient_local]
            .iter()
            .any(|p| p.keep.is_some())
    }
}

fn assemble(segs: &[Segment], v: &Values<'_>, ellipsis: &str) -> String {
    let mut out = String::new();
    assemble_into(&mut out, segs, v, ellipsis);
    out
}

fn assemble_into(out: &mut String, segs: &[Segment], v: &Values<'_>, ellipsis: &str) {
    for s in segs {
        match s {
            Segment::Section(inner) => {
                if !(v.omit_recipient && uses(inner, Field::Recipient)) {
                    assemble_into(out, inner, v, ellipsis);
                }
            }
            Segment::Literal(l) => out.push_str(l),
            Segment::Field(Field::Recipient) => {
                v.recipient_local.push(out, ellipsis);
                out.push_str(v.recipient_domain);
            }
            Segment::Field(Field::Sender) => v.sender.push(out, ellipsis),
            Segment::Field(Field::Subject) => v.subject.push(out, ellipsis),
            Segment::Field(Field::Time) => out.push_str(v.time),
            Segment::Field(Field::Count) => out.push_str(v.count),
            Segment::Field(Field::Balance) => out.push_str(v.balance),
            Segment::Field(Field::Threshold) => out.push_str(v.threshold),
        }
    }
}

/// The text with cut fields ending in "…", or in "..." when "…" would be the only
/// non-GSM-7 character.
fn finish(segs: &[Segment], v: &Values<'_>) -> String {
    if !v.any_cut() {
        return assemble(segs, v, "");
    }
    let ascii = assemble(segs, v, "...");
    if pdu::measure(&ascii).alphabet == Alphabet::Gsm7 {
        ascii
    } else {
        assemble(segs, v, "…")
    }
}

#[cfg(test)]
mod tests;
