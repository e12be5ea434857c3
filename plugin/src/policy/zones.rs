//! Source zones: each delivered message is free-zone or foreign. Free when the client IP is in
//! a free-zone network, or when the envelope sender's domain is below a free-zone suffix *and*
//! a trusted `Authentication-Results` header says that domain was authenticated
//! ([`super::authres`]). Everything else, unknown included, is foreign.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::authres;
use super::lists::{domain_of, CidrSet, ListError, SuffixSet};

/// `[zones]` in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZonesConfig {
    /// Files of free-zone networks (CIDR or address, IPv4 and IPv6, one a line).
    pub free_networks: Vec<PathBuf>,
    /// Files of free-zone sender-domain suffixes; they count only for authenticated senders.
    pub free_domains: Vec<PathBuf>,
    /// authserv-id of the trusted MTA's `Authentication-Results` header. Empty: no header is
    /// trusted.
    pub authserv_id: String,
    /// Check the envelope sender's SPF in mailbell when no trusted header decided (with
    /// Stalwart, whose hooks run before it adds its own header): `free_domains` then count
    /// for senders whose SPF passes. Read at start (a change needs a restart).
    pub verify_spf: bool,
    /// The longest an SPF check may hold the MTA's reply; not finished by then = foreign.
    #[serde(deserialize_with = "mailbell_link::units::de_duration")]
    pub dns_timeout: std::time::Duration,
    /// DNS servers for SPF ("ip:port"); empty: the system's resolv.conf.
    pub nameservers: Vec<String>,
}

impl Default for ZonesConfig {
    fn default() -> Self {
        Self {
            free_networks: Vec::new(),
            free_domains: Vec::new(),
            authserv_id: String::new(),
            verify_spf: false,
            dns_timeout: std::time::Duration::from_secs(2),
            nameservers: Vec::new(),
        }
    }
}

/// What the rules say before any DNS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Zone(Zone),
    /// The sender's domain is below a free suffix but no trusted header vouches for it: free
    /// if its SPF passes (when mailbell checks SPF), else foreign.
    CheckSpf,
}

/// The zone of a delivery.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Zone {
    Free,
    Foreign,
}

impl Zone {
    pub fn as_str(self) -> &'static str {
        match self {
            Zone::Free => "free",
            Zone::Foreign => "foreign",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "free" => Some(Zone::Free),
            "foreign" => Some(Zone::Foreign),
            _ => None,
        }
    }
}

/// What a delivery is classified by.
#[derive(Clone, Copy, Debug, Default)]
pub struct Source<'a> {
    pub client_ip: Option<IpAddr>,
    /// Envelope sender (MAIL FROM), as given.
    pub env_from: &'a str,
    /// Values of every `Authentication-Results` field of the message.
    pub auth_results: &'a [String],
}

/// The loaded zone rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Zones {
    networks: CidrSet,
    domains: SuffixSet,
    authserv_id: String,
}

impl Zones {
    /// Loads every file; the first bad entry fails the whole load.
    pub fn load(cfg: &ZonesConfig) -> Result<Self, ListError> {
        Ok(Self {
            networks: CidrSet::load(&cfg.free_networks)?,
            domains: SuffixSet::load(&cfg.free_domains, "a domain name")?,
            authserv_id: cfg.authserv_id.trim().to_owned(),
        })
    }

    /// Whether any rule is configured (none: everything is foreign, at no cost).
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty() && self.domains.is_empty()
    }

    /// The zone by the rules and a trusted header alone (no DNS).
    pub fn classify(&self, src: &Source<'_>) -> Zone {
        match self.decide(src) {
            Decision::Zone(z) => z,
            Decision::CheckSpf => Zone::Foreign,
        }
    }

    /// [`Zones::classify`], or [`Decision::CheckSpf`] when only the sender's SPF could make
    /// the message free.
    pub fn decide(&self, src: &Source<'_>) -> Decision {
        if src.client_ip.is_some_and(|ip| self.networks.contains(ip)) {
            return Decision::Zone(Zone::Free);
        }
        if self.domains.is_empty() {
            return Decision::Zone(Zone::Foreign);
        }
        let Some(domain) = domain_of(src.env_from) else {
            return Decision::Zone(Zone::Foreign);
        };
        if !self.domains.matches(&domain) {
            return Decision::Zone(Zone::Foreign);
        }
        let authenticated = !self.authserv_id.is_empty()
            && src
                .auth_results
                .iter()
                .any(|v| authres::authenticated_domains(v, &self.authserv_id).contains(&domain));
        if authenticated {
            Decision::Zone(Zone::Free)
        } else if src.client_ip.is_some() {
            Decision::CheckSpf
        } else {
            Decision::Zone(Zone::Foreign)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zones(dir: &std::path::Path) -> Zones {
        let nets = dir.join("nets.txt");
        std::fs::write(&nets, "192.0.2.0/24\n2001:db8::/32\n").unwrap();
        let doms = dir.join("domains.txt");
        std::fs::write(&doms, "uni.example\n").unwrap();
        Zones::load(&ZonesConfig {
            free_networks: vec![nets],
            free_domains: vec![doms],
            authserv_id: "mx.example.org".into(),
            ..ZonesConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn by_network_then_by_authenticated_domain() {
        let dir = tempfile::tempdir().unwrap();
        let z = zones(dir.path());
        let ip = |s: &str| Some(s.parse().unwrap());
        let none: &[String] = &[];
        let free_ip = Source {
            client_ip: ip("192.0.2.9"),
            env_from: "x@elsewhere.example",
            auth_results: none,
        };
        assert_eq!(z.classify(&free_ip), Zone::Free);
        let v6 = Source {
            client_ip: ip("2001:db8::25"),
            ..free_ip
        };
        assert_eq!(z.classify(&v6), Zone::Free);
        let auth = vec!["mx.example.org; spf=pass smtp.mailfrom=lab.uni.example".to_owned()];
        let by_domain = Source {
            client_ip: ip("203.0.113.1"),
            env_from: "<a@lab.uni.example>",
            auth_results: &auth,
        };
        assert_eq!(z.classify(&by_domain), Zone::Free);
        // The same domain without a trusted header, or with one from another authserv-id.
        let unauth = Source {
            auth_results: none,
            ..by_domain
        };
        assert_eq!(z.classify(&unauth), Zone::Foreign);
        let spoof = vec!["evil.example; spf=pass smtp.mailfrom=lab.uni.example".to_owned()];
        let spoofed = Source {
            auth_results: &spoof,
            ..by_domain
        };
        assert_eq!(z.classify(&spoofed), Zone::Foreign);
        // Authenticated, but for another domain than the envelope sender's.
        let other = vec!["mx.example.org; spf=pass smtp.mailfrom=other.example".to_owned()];
        assert_eq!(
            z.classify(&Source {
                auth_results: &other,
                ..by_domain
            }),
            Zone::Foreign
        );
        // Unknown: no IP, null sender.
        assert_eq!(z.classify(&Source::default()), Zone::Foreign);
    }

    #[test]
    fn no_authserv_id_means_domains_never_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut z = zones(dir.path());
        z.authserv_id.clear();
        let auth = vec!["mx.example.org; spf=pass smtp.mailfrom=uni.example".to_owned()];
        let s = Source {
            client_ip: None,
            env_from: "a@uni.example",
            auth_results: &auth,
        };
        assert_eq!(z.classify(&s), Zone::Foreign);
        assert!(Zones::default().is_empty());
        assert_eq!(Zone::parse(Zone::Free.as_str()), Some(Zone::Free));
    }
}
