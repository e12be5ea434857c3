//! The SMTP-time blocklist: source networks, HELO names and sender domains. A match is refused
//! with a 5xx carrying the operator's text, at the first stage that sees it (connect, HELO,
//! MAIL FROM).

use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::lists::{domain_of, CidrSet, ListError, SuffixSet};

/// `[blocklist]` in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlocklistConfig {
    /// Files of refused client networks (CIDR or address, one a line).
    pub networks: Vec<PathBuf>,
    /// Files of refused HELO/EHLO names (a name matches itself and every name below it).
    pub helo: Vec<PathBuf>,
    /// Files of refused envelope-sender domains (suffixes, as `helo`).
    pub sender_domains: Vec<PathBuf>,
    /// The text of the 550 reply.
    pub reply: String,
}

impl Default for BlocklistConfig {
    fn default() -> Self {
        Self {
            networks: Vec::new(),
            helo: Vec::new(),
            sender_domains: Vec::new(),
            reply: "mail from this source is refused by local policy".into(),
        }
    }
}

impl BlocklistConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.reply.trim().is_empty() || self.reply.len() > 400 {
            return Err("blocklist.reply must be 1 to 400 characters".into());
        }
        if self.reply.chars().any(|c| c.is_control()) {
            return Err("blocklist.reply must not hold control characters (CR, LF)".into());
        }
        Ok(())
    }
}

/// The SMTP stage a check is made at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Connect,
    Helo,
    Mail,
}

impl Check {
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Connect => "connect",
            Check::Helo => "helo",
            Check::Mail => "mail",
        }
    }
}

/// A refused source: which list matched, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub stage: Check,
    pub matched: String,
}

/// The loaded blocklist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocklist {
    networks: CidrSet,
    helo: SuffixSet,
    senders: SuffixSet,
    pub reply: String,
}

impl Default for Blocklist {
    fn default() -> Self {
        Self {
            networks: CidrSet::default(),
            helo: SuffixSet::default(),
            senders: SuffixSet::default(),
            reply: BlocklistConfig::default().reply,
        }
    }
}

impl Blocklist {
    pub fn load(cfg: &BlocklistConfig) -> Result<Self, ListError> {
        Ok(Self {
            networks: CidrSet::load(&cfg.networks)?,
            helo: SuffixSet::load(&cfg.helo, "a HELO name")?,
            senders: SuffixSet::load(&cfg.sender_domains, "a domain name")?,
            reply: cfg.reply.clone(),
        })
    }

    /// Which stages have a list (the milter asks the MTA for replies only at these).
    pub fn stages(&self) -> (bool, bool, bool) {
        (
            !self.networks.is_empty(),
            !self.helo.is_empty(),
            !self.senders.is_empty(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.stages() == (false, false, false)
    }

    pub fn connect(&self, ip: Option<IpAddr>) -> Option<Refusal> {
        let ip = ip?;
        self.networks.contains(ip).then(|| Refusal {
            stage: Check::Connect,
            matched: ip.to_string(),
        })
    }

    pub fn helo(&self, helo: &str) -> Option<Refusal> {
        let h = helo.trim();
        self.helo.matches(h).then(|| Refusal {
            stage: Check::Helo,
            matched: h.to_owned(),
        })
    }

    pub fn mail(&self, env_from: &str) -> Option<Refusal> {
        let d = domain_of(env_from)?;
        self.senders.matches(&d).then_some(Refusal {
            stage: Check::Mail,
            matched: d,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_list_refuses_at_its_stage() {
        let dir = tempfile::tempdir().unwrap();
        let w = |n: &str, t: &str| {
            let p = dir.path().join(n);
            std::fs::write(&p, t).unwrap();
            vec![p]
        };
        let b = Blocklist::load(&BlocklistConfig {
            networks: w("n", "203.0.113.0/24\n2001:db8:bad::/48\n"),
            helo: w("h", "spam.example\n"),
            sender_domains: w("s", "junk.example\n"),
            reply: "go away".into(),
        })
        .unwrap();
        assert!(b.connect(Some("203.0.113.5".parse().unwrap())).is_some());
        assert!(b
            .connect(Some("2001:db8:bad::1".parse().unwrap()))
            .is_some());
        assert!(b.connect(Some("198.51.100.1".parse().unwrap())).is_none());
        assert!(b.connect(None).is_none());
        assert_eq!(
            b.helo("mx1.SPAM.example").unwrap().matched,
            "mx1.SPAM.example"
        );
        assert!(b.helo("notspam.example").is_none());
        assert!(b.helo("[192.0.2.1]").is_none());
        assert_eq!(
            b.mail("<x@a.junk.example>").unwrap().matched,
            "a.junk.example"
        );
        assert!(b.mail("<>").is_none());
        assert_eq!(b.stages(), (true, true, true));
        assert!(Blocklist::default().is_empty());
    }

    #[test]
    fn reply_text_is_checked() {
        let mut c = BlocklistConfig::default();
        assert!(c.validate().is_ok());
        c.reply = "a\r\n250 ok".into();
        assert!(c.validate().is_err());
        c.reply = String::new();
        assert!(c.validate().is_err());
    }
}
