//! The payment notice an account in arrears sees instead of its mailbox: a template
//! (`[retrieval] notice_subject`, `notice_text` or `notice_file`, `notice_from`) rendered into
//! an RFC 5322 message for one user.
//!
//! Placeholders in the subject and text:
//!
//! ```text
//! {address}   the account (the login name the backend accepted)
//! {balance}   the account's balance, once billing provides one (see NoticeFacts::balance);
//!             empty until then
//! ```
//!
//! The message is built with mail-builder: `Date`, `From`, `To`, `Subject` (RFC 2047 encoded
//! when it is not ASCII), a `Message-ID` derived from its UIDL, `MIME-Version` and a
//! `text/plain; charset=utf-8` body (7bit, quoted-printable or base64, whichever the text
//! needs), every line ending in CRLF.

use std::io;

/// The operator's notice, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoticeTemplate {
    pub subject: String,
    pub text: String,
    /// The `From` address; empty: `postmaster@` the account's domain.
    pub from: String,
}

/// Default `notice_subject`.
pub const DEFAULT_SUBJECT: &str = "Your mail account is suspended until payment";
/// Default notice text.
pub const DEFAULT_TEXT: &str = "Hello,\n\n\
The mail account {address} is in arrears. Your messages are kept safe, but they cannot be \
read until the account is paid.\n\n\
Please contact your mail provider to settle the account. Once it is paid, your mailbox is \
available again at once.\n";

/// What the notice says about one account. `balance` is the hook for billing: `None` until a
/// billing source provides it (then `{balance}` renders empty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NoticeFacts {
    pub address: String,
    pub balance: Option<String>,
}

/// Where the notice's `{balance}` comes from: the hook billing implements (until then the
/// proxy has none and `{balance}` renders empty).
pub trait Balances: Send + Sync {
    /// The account's balance as the notice should show it (`"-12.50 EUR"`), if known.
    fn balance(&self, account: &str) -> Option<String>;
}

/// A notice rendered for one account: the message (CRLF lines, not dot-stuffed) and the UIDL
/// it is listed under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub message: Vec<u8>,
    pub uid: String,
}

impl NoticeTemplate {
    /// `text` with the placeholders filled in.
    pub fn fill(text: &str, facts: &NoticeFacts) -> String {
        text.replace("{address}", &facts.address)
            .replace("{balance}", facts.balance.as_deref().unwrap_or(""))
    }

    /// The notice for `facts`, dated `date` (Unix seconds). The UIDL depends on the text the
    /// user sees (not the date), so a client that leaves mail on the server downloads it once
    /// per change of wording.
    pub fn render(&self, facts: &NoticeFacts, date: i64) -> io::Result<Notice> {
        let subject = one_header_line(&NoticeTemplate::fill(&self.subject, facts));
        let text = crlf(&NoticeTemplate::fill(&self.text, facts));
        let domain = facts
            .address
            .rsplit_once('@')
            .map_or("localhost", |(_, d)| d);
        let from = if self.from.trim().is_empty() {
            format!("postmaster@{domain}")
        } else {
            self.from.trim().to_owned()
        };
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            format!("{}\0{subject}\0{text}\0{from}", facts.address).as_bytes(),
        );
        let uid = format!(
            "mailbell-notice-{}",
            hex::encode(digest.as_ref().get(..12).unwrap_or_default())
        );
        let message = mail_builder::MessageBuilder::new()
            .from(from.as_str())
            .to(facts.address.as_str())
            .subject(subject)
            .date(date)
            .message_id(format!("{uid}@{domain}"))
            .text_body(text)
            .write_to_vec()?;
        Ok(Notice {
            message: crlf_bytes(&message),
            uid,
        })
    }
}

/// A header value on one line (control characters, CR/LF included, become spaces).
fn one_header_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// Text with every line ending as CRLF and a final one.
fn crlf(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 16);
    for line in s.lines() {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out
}

/// Bytes with every bare LF made CRLF.
fn crlf_bytes(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len() + 16);
    let mut prev = 0u8;
    for &c in b {
        if c == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(c);
        prev = c;
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(text: &str) -> NoticeTemplate {
        NoticeTemplate {
            subject: DEFAULT_SUBJECT.into(),
            text: text.into(),
            from: String::new(),
        }
    }

    fn facts() -> NoticeFacts {
        NoticeFacts {
            address: "alice@example.com".into(),
            balance: None,
        }
    }

    #[test]
    fn the_notice_is_a_valid_rfc5322_message() {
        let n = template(DEFAULT_TEXT)
            .render(&facts(), 1_800_000_000)
            .unwrap();
        let m = mail_parser::MessageParser::default()
            .parse(&n.message)
            .unwrap();
        assert_eq!(m.subject(), Some(DEFAULT_SUBJECT));
        assert_eq!(
            m.from().and_then(|a| a.first()).and_then(|a| a.address()),
            Some("postmaster@example.com")
        );
        assert_eq!(
            m.to().and_then(|a| a.first()).and_then(|a| a.address()),
            Some("alice@example.com")
        );
        assert_eq!(m.date().map(|d| d.to_timestamp()), Some(1_800_000_000));
        assert_eq!(
            m.message_id(),
            Some(format!("{}@example.com", n.uid).as_str())
        );
        let body = m.body_text(0).unwrap();
        assert!(body.contains("alice@example.com is in arrears"), "{body}");
        // Every line ends in CRLF, none is longer than RFC 5322's 998.
        let text = String::from_utf8(n.message.clone()).unwrap();
        assert!(text.ends_with("\r\n"));
        assert!(!text.replace("\r\n", "").contains('\n'));
        assert!(text.split("\r\n").all(|l| l.len() <= 998));
        assert!(n.uid.len() <= 70 && n.uid.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    }

    #[test]
    fn utf8_text_is_mime_encoded_and_placeholders_filled() {
        let mut t = template("您好 {address}:\n余额 {balance} 元\n.leading dot\n");
        t.subject = "账户欠费 {address}\r\nBcc: x@evil.example".into();
        t.from = "billing@isp.example".into();
        let n = t
            .render(
                &NoticeFacts {
                    balance: Some("-12.50".into()),
                    ..facts()
                },
                0,
            )
            .unwrap();
        assert!(n.message.is_ascii(), "encoded for 7-bit transport");
        let m = mail_parser::MessageParser::default()
            .parse(&n.message)
            .unwrap();
        assert_eq!(
            m.subject(),
            Some("账户欠费 alice@example.com  Bcc: x@evil.example")
        );
        assert!(m.header("Bcc").is_none(), "no header injection");
        let body = m.body_text(0).unwrap();
        assert!(body.contains("您好 alice@example.com:"), "{body}");
        assert!(body.contains("余额 -12.50 元"), "{body}");
        assert_eq!(
            m.from().and_then(|a| a.first()).and_then(|a| a.address()),
            Some("billing@isp.example")
        );
        // No balance yet: the placeholder renders empty.
        let n2 = t.render(&facts(), 0).unwrap();
        let m2 = mail_parser::MessageParser::default()
            .parse(&n2.message)
            .unwrap();
        assert!(m2.body_text(0).unwrap().contains("余额  元"));
        assert_ne!(n.uid, n2.uid, "the UIDL follows the wording");
        assert_eq!(n2.uid, t.render(&facts(), 99).unwrap().uid, "not the date");
    }
}
