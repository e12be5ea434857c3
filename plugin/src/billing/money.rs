//! Money in integer minor units (fen: 1/100 of a yuan), never floats.
//!
//! ```text
//! "12.34" -> Money(1234)    "12" -> 1200    "0.5" -> 50    "-3.07" -> -307
//! refused: "12.345" (finer than a minor unit: no silent rounding), "1e3", "12,5", " ",
//!          "+-1", "nan", anything past i64::MAX minor units
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Minor units per major unit, and the digits after the point.
pub const MINOR_PER_MAJOR: i64 = 100;
pub const MINOR_DIGITS: usize = 2;

/// An amount in minor units. Arithmetic is checked: an overflow is an error, never a wrap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(i64);

/// Why a text is not an amount.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum MoneyError {
    #[error("{0:?} is not an amount: expected digits with at most {MINOR_DIGITS} after the point, like 12.34")]
    Syntax(String),
    #[error(
        "{0:?} has more than {MINOR_DIGITS} digits after the point (amounts are never rounded)"
    )]
    TooPrecise(String),
    #[error("{0:?} is too large")]
    Overflow(String),
    #[error("{0:?} must be above zero")]
    NotPositive(String),
    #[error("amount arithmetic overflowed")]
    Arithmetic,
}

impl Money {
    pub const ZERO: Money = Money(0);

    pub const fn from_minor(minor: i64) -> Self {
        Money(minor)
    }

    pub const fn minor(self) -> i64 {
        self.0
    }

    pub const fn is_positive(self) -> bool {
        self.0 > 0
    }

    pub const fn is_negative(self) -> bool {
        self.0 < 0
    }

    pub fn checked_add(self, o: Money) -> Result<Money, MoneyError> {
        self.0
            .checked_add(o.0)
            .map(Money)
            .ok_or(MoneyError::Arithmetic)
    }

    pub fn checked_sub(self, o: Money) -> Result<Money, MoneyError> {
        self.0
            .checked_sub(o.0)
            .map(Money)
            .ok_or(MoneyError::Arithmetic)
    }

    pub fn checked_neg(self) -> Result<Money, MoneyError> {
        self.0
            .checked_neg()
            .map(Money)
            .ok_or(MoneyError::Arithmetic)
    }

    pub fn checked_mul(self, n: i64) -> Result<Money, MoneyError> {
        self.0
            .checked_mul(n)
            .map(Money)
            .ok_or(MoneyError::Arithmetic)
    }

    /// The magnitude (for a signed adjustment turned into a transfer).
    pub fn checked_abs(self) -> Result<Money, MoneyError> {
        self.0
            .checked_abs()
            .map(Money)
            .ok_or(MoneyError::Arithmetic)
    }

    /// Parses a signed amount ("-3.07" allowed).
    pub fn parse(s: &str) -> Result<Money, MoneyError> {
        let syntax = || MoneyError::Syntax(s.to_owned());
        let (neg, body) = match s.as_bytes().first() {
            Some(b'-') => (true, &s[1..]),
            Some(b'+') => (false, &s[1..]),
            _ => (false, s),
        };
        let (int, frac) = body.split_once('.').unwrap_or((body, ""));
        let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty() || !digits(int) || !digits(frac) || (body.ends_with('.')) {
            return Err(syntax());
        }
        if frac.len() > MINOR_DIGITS {
            return Err(MoneyError::TooPrecise(s.to_owned()));
        }
        let overflow = || MoneyError::Overflow(s.to_owned());
        let mut minor: i64 = 0;
        for b in int.bytes() {
            minor = minor
                .checked_mul(10)
                .and_then(|m| m.checked_add(i64::from(b - b'0')))
                .ok_or_else(overflow)?;
        }
        minor = minor.checked_mul(MINOR_PER_MAJOR).ok_or_else(overflow)?;
        let mut scale = MINOR_PER_MAJOR;
        for b in frac.bytes() {
            scale /= 10;
            minor = minor
                .checked_add(i64::from(b - b'0') * scale)
                .ok_or_else(overflow)?;
        }
        Ok(Money(if neg { -minor } else { minor }))
    }

    /// Parses an amount that must be above zero (a top-up, a price cap).
    pub fn parse_positive(s: &str) -> Result<Money, MoneyError> {
        let m = Money::parse(s)?;
        if !m.is_positive() {
            return Err(MoneyError::NotPositive(s.to_owned()));
        }
        Ok(m)
    }

    /// Parses an amount that may be zero but not negative (a price, a minimum charge).
    pub fn parse_non_negative(s: &str) -> Result<Money, MoneyError> {
        let m = Money::parse(s)?;
        if m.is_negative() {
            return Err(MoneyError::Syntax(s.to_owned()));
        }
        Ok(m)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let per = MINOR_PER_MAJOR.unsigned_abs();
        write!(
            f,
            "{sign}{}.{:0width$}",
            abs / per,
            abs % per,
            width = MINOR_DIGITS
        )
    }
}

impl FromStr for Money {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Money::parse(s)
    }
}

/// JSON carries amounts as strings ("12.34"): no float ever touches them.
impl Serialize for Money {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Money::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn parses_and_prints_minor_units() {
        for (s, minor, shown) in [
            ("12.34", 1234, "12.34"),
            ("12", 1200, "12.00"),
            ("0.5", 50, "0.50"),
            ("0.05", 5, "0.05"),
            ("-3.07", -307, "-3.07"),
            ("-0.05", -5, "-0.05"),
            ("+1.00", 100, "1.00"),
            ("0", 0, "0.00"),
        ] {
            let m = Money::parse(s).unwrap();
            assert_eq!(m.minor(), minor, "{s}");
            assert_eq!(m.to_string(), shown);
            assert_eq!(Money::parse(&m.to_string()).unwrap(), m);
        }
        let max = Money::from_minor(i64::MAX);
        assert_eq!(Money::parse(&max.to_string()).unwrap(), max);
    }

    #[test]
    fn refuses_what_is_not_an_exact_amount() {
        for s in [
            "", " ", "-", ".5", "5.", "1e3", "12,5", "+-1", "--1", "nan", "inf", "1.2.3", " 1",
            "1 ", "0x10", "١٢",
        ] {
            assert!(
                matches!(Money::parse(s), Err(MoneyError::Syntax(_))),
                "{s:?}: {:?}",
                Money::parse(s)
            );
        }
        assert_eq!(
            Money::parse("12.345"),
            Err(MoneyError::TooPrecise("12.345".into()))
        );
        assert_eq!(
            Money::parse("0.001"),
            Err(MoneyError::TooPrecise("0.001".into()))
        );
        for s in ["92233720368547758.08", "99999999999999999999"] {
            assert_eq!(Money::parse(s), Err(MoneyError::Overflow(s.into())));
        }
        assert!(matches!(
            Money::parse_positive("0"),
            Err(MoneyError::NotPositive(_))
        ));
        assert!(matches!(
            Money::parse_positive("-5"),
            Err(MoneyError::NotPositive(_))
        ));
        assert!(Money::parse_non_negative("-0.01").is_err());
        assert_eq!(Money::parse_non_negative("0").unwrap(), Money::ZERO);
    }

    #[test]
    fn arithmetic_is_checked() {
        let a = Money::from_minor(i64::MAX);
        assert_eq!(
            a.checked_add(Money::from_minor(1)),
            Err(MoneyError::Arithmetic)
        );
        assert_eq!(
            Money::from_minor(i64::MIN).checked_sub(Money::from_minor(1)),
            Err(MoneyError::Arithmetic)
        );
        assert_eq!(
            Money::from_minor(i64::MIN).checked_neg(),
            Err(MoneyError::Arithmetic)
        );
        assert_eq!(
            Money::from_minor(i64::MIN).checked_abs(),
            Err(MoneyError::Arithmetic)
        );
        assert_eq!(a.checked_mul(2), Err(MoneyError::Arithmetic));
        assert_eq!(
            Money::from_minor(250)
                .checked_sub(Money::from_minor(300))
                .unwrap(),
            Money::from_minor(-50)
        );
        assert_eq!(
            Money::from_minor(-7).checked_abs().unwrap(),
            Money::from_minor(7)
        );
    }

    #[test]
    fn json_carries_strings() {
        let m = Money::from_minor(-1234);
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"-12.34\"");
        assert_eq!(
            serde_json::from_str::<Money>("\"5.5\"").unwrap().minor(),
            550
        );
        assert!(serde_json::from_str::<Money>("5.5").is_err());
        assert!(serde_json::from_str::<Money>("\"5.555\"").is_err());
    }
}
