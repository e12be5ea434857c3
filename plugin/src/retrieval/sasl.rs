//! The SASL responses the proxy reads to learn the account at login: PLAIN (RFC 4616) and
//! LOGIN (the de-facto mechanism: base64 user name, then base64 password). Both protocols carry
//! them the same way (POP3 `AUTH`, RFC 5034; IMAP `AUTHENTICATE`, RFC 3501 and SASL-IR, RFC 4959):
//! each client response is one line of base64, `=` is an empty initial response and `*` cancels.
//!
//! ```text
//! PLAIN   base64( authzid NUL authcid NUL password )
//! LOGIN   base64( user name )  then  base64( password )
//! ```
//!
//! **Which name is the account.** For PLAIN the account is the *authorization identity* when it
//! is not empty (the user the session acts as, e.g. a master user logging in as someone else),
//! otherwise the *authentication identity*. For LOGIN it is the user name. The proxy never
//! checks the password; it forwards the client's bytes unchanged and the backend decides.
//!
//! Mechanisms whose responses do not carry the account in the clear (SCRAM-*, OAUTHBEARER,
//! XOAUTH2, GSSAPI, ...) are [`Mechanism::Opaque`]: the proxy either hides them or passes them
//! through unmetered, by operator choice.

use base64::Engine;

/// Longest decoded response the proxy accepts (RFC 4616 allows 255 bytes per field).
pub const MAX_RESPONSE: usize = 2048;
/// Longest account name.
pub const MAX_ACCOUNT: usize = 255;

/// A response the proxy cannot read: it refuses the login rather than forward credentials whose
/// account it does not know.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SaslError {
    #[error("sasl response is not valid base64")]
    Base64,
    #[error("sasl response of {0} encoded bytes exceeds the maximum")]
    TooLong(usize),
    #[error("plain response is not authzid, authcid and password separated by nul")]
    PlainShape,
    #[error("account name is empty")]
    EmptyAccount,
    #[error("account name is longer than {MAX_ACCOUNT} bytes")]
    AccountTooLong,
    #[error("account name is not valid utf-8 or contains control characters")]
    BadAccount,
}

/// Decodes one client response line (without CRLF). `=` is the empty response (RFC 4959).
pub fn decode(line: &[u8]) -> Result<Vec<u8>, SaslError> {
    if line == b"=" {
        return Ok(Vec::new());
    }
    if line.len() > MAX_RESPONSE.div_ceil(3) * 4 {
        return Err(SaslError::TooLong(line.len()));
    }
    base64::engine::general_purpose::STANDARD
        .decode(line)
        .map_err(|_| SaslError::Base64)
}

/// Checks and converts an account name.
pub fn account_name(raw: &[u8]) -> Result<String, SaslError> {
    if raw.is_empty() {
        return Err(SaslError::EmptyAccount);
    }
    if raw.len() > MAX_ACCOUNT {
        return Err(SaslError::AccountTooLong);
    }
    let name = std::str::from_utf8(raw).map_err(|_| SaslError::BadAccount)?;
    if name.chars().any(char::is_control) {
        return Err(SaslError::BadAccount);
    }
    Ok(name.to_owned())
}

/// The identities of a decoded PLAIN response (the password is not kept).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plain {
    /// Authorization identity; empty when the client acts as itself.
    pub authzid: String,
    /// Authentication identity, whose password was given.
    pub authcid: String,
}

impl Plain {
    /// Parses `authzid NUL authcid NUL password`.
    pub fn parse(decoded: &[u8]) -> Result<Plain, SaslError> {
        let mut parts = decoded.split(|b| *b == 0);
        let (Some(authzid), Some(authcid), Some(_password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SaslError::PlainShape);
        };
        let authzid = if authzid.is_empty() {
            String::new()
        } else {
            account_name(authzid)?
        };
        Ok(Plain {
            authzid,
            authcid: account_name(authcid)?,
        })
    }

    /// The account the session acts as: the authzid when given, else the authcid.
    pub fn account(&self) -> &str {
        if self.authzid.is_empty() {
            &self.authcid
        } else {
            &self.authzid
        }
    }
}

/// A SASL mechanism as the proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
    /// Any other mechanism: its responses do not reveal the account to the proxy.
    Opaque(String),
}

impl Mechanism {
    /// Parses a mechanism name (case-insensitive).
    pub fn parse(name: &str) -> Mechanism {
        if name.eq_ignore_ascii_case("PLAIN") {
            Mechanism::Plain
        } else if name.eq_ignore_ascii_case("LOGIN") {
            Mechanism::Login
        } else {
            Mechanism::Opaque(name.to_ascii_uppercase())
        }
    }

    /// Whether the proxy learns the account from this mechanism's responses.
    pub fn is_visible(&self) -> bool {
        !matches!(self, Mechanism::Opaque(_))
    }
}

/// Follows one exchange, response by response, until the account is known.
#[derive(Clone, Debug)]
pub struct Exchange {
    mechanism: Mechanism,
    responses: u32,
    account: Option<String>,
}

impl Exchange {
    pub fn new(mechanism: Mechanism) -> Exchange {
        Exchange {
            mechanism,
            responses: 0,
            account: None,
        }
    }

    pub fn mechanism(&self) -> &Mechanism {
        &self.mechanism
    }

    /// Whether every response that carries credentials has been read (PLAIN: one, LOGIN: two;
    /// an opaque mechanism is never known to be done, the backend's final reply ends it).
    pub fn is_done(&self) -> bool {
        match self.mechanism {
            Mechanism::Plain => self.responses >= 1,
            Mechanism::Login => self.responses >= 2,
            Mechanism::Opaque(_) => false,
        }
    }

    /// The account, once a response named it.
    pub fn account(&self) -> Option<&str> {
        self.account.as_deref()
    }

    /// Reads the next client response (one base64 line, the initial response included).
    /// Returns the account when this response is the one that names it.
    pub fn response(&mut self, line: &[u8]) -> Result<Option<String>, SaslError> {
        self.responses += 1;
        let first = self.responses == 1;
        let found = match &self.mechanism {
            Mechanism::Plain if first => Plain::parse(&decode(line)?)?.account().to_owned(),
            Mechanism::Login if first => account_name(&decode(line)?)?,
            // The LOGIN password: only checked to be base64, the backend judges it.
            Mechanism::Login if self.responses == 2 => {
                decode(line)?;
                return Ok(None);
            }
            _ => return Ok(None),
        };
        self.account = Some(found.clone());
        Ok(Some(found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(data: &[u8]) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .encode(data)
            .into_bytes()
    }

    #[test]
    fn plain_without_authzid_is_the_authcid() {
        let mut ex = Exchange::new(Mechanism::parse("plain"));
        let got = ex.response(&b64(b"\0alice\0secret")).unwrap();
        assert_eq!(got.as_deref(), Some("alice"));
        assert_eq!(ex.account(), Some("alice"));
    }

    #[test]
    fn plain_with_authzid_is_the_authzid() {
        let p = Plain::parse(b"bob\0master\0pw").unwrap();
        assert_eq!(p.account(), "bob");
        assert_eq!(p.authcid, "master");
    }

    #[test]
    fn plain_shapes_that_are_refused() {
        assert_eq!(Plain::parse(b"alice\0pw"), Err(SaslError::PlainShape));
        assert_eq!(Plain::parse(b"\0a\0b\0c"), Err(SaslError::PlainShape));
        assert_eq!(Plain::parse(b"\0\0pw"), Err(SaslError::EmptyAccount));
        assert_eq!(Plain::parse(b"\0a\nb\0pw"), Err(SaslError::BadAccount));
        assert_eq!(Plain::parse(b"\0\xff\0pw"), Err(SaslError::BadAccount));
        let long = [vec![0], vec![b'a'; 256], vec![0, b'p']].concat();
        assert_eq!(Plain::parse(&long), Err(SaslError::AccountTooLong));
    }

    #[test]
    fn login_user_then_password() {
        let mut ex = Exchange::new(Mechanism::Login);
        assert_eq!(
            ex.response(&b64(b"carol")).unwrap().as_deref(),
            Some("carol")
        );
        assert!(!ex.is_done());
        assert_eq!(ex.response(&b64(b"pw")).unwrap(), None);
        assert!(ex.is_done());
        assert_eq!(
            ex.response(b"!!"),
            Ok(None),
            "a third response is the backend's problem"
        );
    }

    #[test]
    fn bad_base64_is_an_error() {
        assert_eq!(decode(b"not base64!"), Err(SaslError::Base64));
        assert_eq!(decode(b"YWJj="), Err(SaslError::Base64));
        assert_eq!(
            Exchange::new(Mechanism::Login).response(b"%%%%"),
            Err(SaslError::Base64)
        );
        let mut ex = Exchange::new(Mechanism::Login);
        ex.response(&b64(b"carol")).unwrap();
        assert_eq!(ex.response(b"pw with spaces"), Err(SaslError::Base64));
    }

    #[test]
    fn empty_response_and_size_bound() {
        assert_eq!(decode(b"=").unwrap(), Vec::<u8>::new());
        assert_eq!(
            Exchange::new(Mechanism::Plain).response(b"="),
            Err(SaslError::PlainShape)
        );
        let huge = vec![b'A'; 4096];
        assert_eq!(decode(&huge), Err(SaslError::TooLong(4096)));
    }

    #[test]
    fn opaque_mechanisms_reveal_nothing() {
        let m = Mechanism::parse("scram-sha-256");
        assert_eq!(m, Mechanism::Opaque("SCRAM-SHA-256".into()));
        assert!(!m.is_visible());
        assert!(Mechanism::Plain.is_visible());
        let mut ex = Exchange::new(m);
        assert_eq!(ex.response(&b64(b"n,,n=alice,r=abc")).unwrap(), None);
        assert_eq!(ex.account(), None);
    }
}
