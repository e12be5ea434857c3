//! E.164 phone numbers: the only destination form the agent sends SMS to.
//!
//! ```text
//! E164 = "+" digit{8,15}      first digit (the country code's) is not 0
//! ```
//! Parsing is strict: no spaces, dashes, dots or brackets, so a number is stored and compared
//! in one canonical form. [`E164::masked`] is what logs print; `Display` prints the full number
//! and is meant for the modem and for trace-level output only.

use std::fmt;
use std::str::FromStr;

/// Fewest digits (country code included) accepted after the `+`.
pub const MIN_DIGITS: usize = 8;
/// Most digits E.164 allows (ITU-T E.164 §6.1).
pub const MAX_DIGITS: usize = 15;

/// A validated international number, `+` followed by 8 to 15 digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct E164(String);

/// Why a string is not an E.164 number.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PhoneError {
    #[error("phone number is empty")]
    Empty,
    #[error("phone number must start with '+' and the country code")]
    MissingPlus,
    #[error("phone number contains separator {ch:?} at position {pos}; write it without spaces or dashes")]
    Separator { ch: char, pos: usize },
    #[error("phone number contains invalid character {ch:?} at position {pos}; only digits may follow '+'")]
    InvalidChar { ch: char, pos: usize },
    #[error("phone number has a country code starting with 0")]
    LeadingZero,
    #[error("phone number has {digits} digits, fewer than the minimum of {MIN_DIGITS}")]
    TooShort { digits: usize },
    #[error("phone number has {digits} digits, more than the E.164 maximum of {MAX_DIGITS}")]
    TooLong { digits: usize },
}

impl FromStr for E164 {
    type Err = PhoneError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = match s.strip_prefix('+') {
            Some(rest) => rest,
            None if s.is_empty() => return Err(PhoneError::Empty),
            None => return Err(PhoneError::MissingPlus),
        };
        // Positions are in characters of the whole input, the '+' being position 0.
        for (i, ch) in rest.chars().enumerate() {
            if ch.is_ascii_digit() {
                continue;
            }
            let pos = i + 1;
            return Err(
                if matches!(ch, ' ' | '-' | '.' | '(' | ')' | '/') || ch.is_whitespace() {
                    PhoneError::Separator { ch, pos }
                } else {
                    PhoneError::InvalidChar { ch, pos }
                },
            );
        }
        let digits = rest.len();
        if digits == 0 {
            return Err(PhoneError::TooShort { digits });
        }
        if rest.starts_with('0') {
            return Err(PhoneError::LeadingZero);
        }
        if digits < MIN_DIGITS {
            return Err(PhoneError::TooShort { digits });
        }
        if digits > MAX_DIGITS {
            return Err(PhoneError::TooLong { digits });
        }
        Ok(E164(s.to_owned()))
    }
}

impl E164 {
    /// The full number with its leading `+`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The digits without the leading `+`.
    pub fn digits(&self) -> &str {
        self.0.get(1..).unwrap_or_default()
    }

    /// The number for logs, as both daemons print it: [`mailbell_link::phone::mask_phone`]
    /// (`+86138****8000`).
    pub fn masked(&self) -> String {
        mailbell_link::phone::mask_phone(self.as_str())
    }
}

impl fmt::Display for E164 {
    /// The full number; logs above trace use [`E164::masked`] instead.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for E164 {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<E164, PhoneError> {
        s.parse()
    }

    #[test]
    fn valid_numbers() {
        let n = p("+8613800138000").unwrap();
        assert_eq!(n.as_str(), "+8613800138000");
        assert_eq!(n.digits(), "8613800138000");
        assert_eq!(
            n.to_string(),
            "+8613800138000",
            "Display prints the full number"
        );
        assert!(p("+12345678").is_ok(), "8 digits is the minimum");
        assert!(p("+123456789012345").is_ok(), "15 digits is the maximum");
        assert_eq!(p("+8613800138000").unwrap(), n);
    }

    #[test]
    fn missing_plus_and_empty() {
        assert_eq!(p("8613800138000"), Err(PhoneError::MissingPlus));
        assert_eq!(p("008613800138000"), Err(PhoneError::MissingPlus));
        assert_eq!(p(""), Err(PhoneError::Empty));
        assert_eq!(p("+"), Err(PhoneError::TooShort { digits: 0 }));
    }

    #[test]
    fn length_limits() {
        assert_eq!(p("+1234567"), Err(PhoneError::TooShort { digits: 7 }));
        assert_eq!(
            p("+1234567890123456"),
            Err(PhoneError::TooLong { digits: 16 })
        );
    }

    #[test]
    fn separators_and_letters_are_rejected_with_position() {
        assert_eq!(
            p("+86 138 0013 8000"),
            Err(PhoneError::Separator { ch: ' ', pos: 3 })
        );
        assert_eq!(
            p("+86-13800138000"),
            Err(PhoneError::Separator { ch: '-', pos: 3 })
        );
        assert_eq!(
            p("+8613800138000 "),
            Err(PhoneError::Separator { ch: ' ', pos: 14 })
        );
        assert_eq!(
            p("+86138OO138000"),
            Err(PhoneError::InvalidChar { ch: 'O', pos: 6 })
        );
        assert_eq!(
            p("+８613800138000"),
            Err(PhoneError::InvalidChar { ch: '８', pos: 1 })
        );
        assert_eq!(
            p("++8613800138000"),
            Err(PhoneError::InvalidChar { ch: '+', pos: 1 })
        );
        let msg = PhoneError::Separator { ch: '-', pos: 3 }.to_string();
        assert!(
            msg.starts_with("phone number contains separator '-' at position 3"),
            "{msg}"
        );
    }

    #[test]
    fn leading_zero_rejected() {
        assert_eq!(p("+0613800138000"), Err(PhoneError::LeadingZero));
    }

    #[test]
    fn masking_keeps_country_code_and_ends() {
        assert_eq!(p("+8613800138000").unwrap().masked(), "+86138****8000");
        assert_eq!(p("+16502530000").unwrap().masked(), "+1650***0000");
        assert_eq!(p("+447911123456").unwrap().masked(), "+44791***3456");
        assert_eq!(p("+353871234567").unwrap().masked(), "+35387***4567");
        // Short numbers still hide at least three digits.
        assert_eq!(p("+35312345").unwrap().masked(), "+353***45");
        assert_eq!(p("+12345678").unwrap().masked(), "+1***5678");
        for s in [
            "+12345678",
            "+35312345",
            "+123456789012345",
            "+8613800138000",
        ] {
            let m = p(s).unwrap().masked();
            assert_eq!(m.len(), s.len(), "{s} -> {m}");
            assert!(m.matches('*').count() >= 3, "{s} -> {m}");
        }
    }
}
