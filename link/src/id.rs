//! Stable 128-bit notification ids, assigned once at intake and carried end to end.

use std::fmt;
use std::str::FromStr;

/// A notification id: 16 random bytes, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NotifId(pub [u8; 16]);

impl NotifId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for NotifId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for NotifId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NotifId({self})")
    }
}

/// The text was not 32 hex digits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("notification id must be 32 hex digits")]
pub struct ParseIdError;

impl FromStr for NotifId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseIdError)?;
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let id = NotifId::random();
        assert_eq!(id.to_string().len(), 32);
        assert_eq!(id.to_string().parse::<NotifId>(), Ok(id));
        assert_eq!("xyz".parse::<NotifId>(), Err(ParseIdError));
    }
}
