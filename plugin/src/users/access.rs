//! What an account may do at the retrieval proxy: its [`AccountState`] and the client
//! [`Networks`] it may log in from. Both are fields of [`super::User`]; records written before
//! they existed load as [`AccountState::Normal`] and any network.
//!
//! ```text
//! state     normal | arrears | unwelcome
//! networks  "10.0.0.0/8, 2001:db8::/32, 192.0.2.7"   (CIDR or bare address; empty = any)
//! ```

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::UserError;

/// Most networks one account may list.
pub const MAX_NETWORKS: usize = 100;

/// An account's standing, set by the operator (and later by billing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountState {
    /// Logs in and retrieves as usual.
    #[default]
    Normal,
    /// Logs in (the password must be right) but sees only the payment notice.
    Arrears,
    /// Refused at login, before the backend is asked.
    Unwelcome,
}

impl AccountState {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountState::Normal => "normal",
            AccountState::Arrears => "arrears",
            AccountState::Unwelcome => "unwelcome",
        }
    }
}

impl fmt::Display for AccountState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AccountState {
    type Err = UserError;
    fn from_str(s: &str) -> Result<Self, UserError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "normal" => Ok(AccountState::Normal),
            "arrears" => Ok(AccountState::Arrears),
            "unwelcome" => Ok(AccountState::Unwelcome),
            _ => Err(UserError::InvalidField {
                field: "state",
                input: s.to_owned(),
                reason: "expected normal, arrears or unwelcome",
            }),
        }
    }
}

/// The client networks an account may log in from; empty allows any address. Serialises as a
/// list of strings in CIDR form (`"10.0.0.0/8"`); a bare address reads as a host route
/// (`/32`, `/128`). Host bits are cleared (`10.1.2.3/8` is `10.0.0.0/8`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Networks(Vec<IpNet>);

impl Networks {
    /// Any address.
    pub fn any() -> Networks {
        Networks(Vec::new())
    }

    /// Parses a list separated by commas, semicolons or white space; `""`, `any` and `none`
    /// are the empty list (any address). Errors name the field and the bad item.
    pub fn parse(s: &str) -> Result<Networks, UserError> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("any") || t.eq_ignore_ascii_case("none") {
            return Ok(Networks::any());
        }
        Networks::from_items(
            t.split([',', ';', ' ', '\t'])
                .filter(|w| !w.is_empty())
                .map(str::to_owned),
        )
    }

    fn from_items(items: impl IntoIterator<Item = String>) -> Result<Networks, UserError> {
        let mut nets: Vec<IpNet> = Vec::new();
        for item in items {
            let net = parse_net(item.trim())?;
            if !nets.contains(&net) {
                nets.push(net);
            }
            if nets.len() > MAX_NETWORKS {
                return Err(UserError::TooMany {
                    what: "networks",
                    count: nets.len(),
                    limit: MAX_NETWORKS,
                });
            }
        }
        Ok(Networks(nets))
    }

    /// True when the list is empty (any address).
    pub fn is_any(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a client at `addr` may log in. An IPv4 client seen as IPv4-mapped IPv6
    /// (`::ffff:10.1.2.3`, a dual-stack listener) is matched as IPv4.
    pub fn allows(&self, addr: IpAddr) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&addr))
    }

    pub fn iter(&self) -> impl Iterator<Item = &IpNet> {
        self.0.iter()
    }

    /// The list as `sep`-separated CIDR text (`""` for any).
    pub fn join(&self, sep: &str) -> String {
        self.0
            .iter()
            .map(IpNet::to_string)
            .collect::<Vec<_>>()
            .join(sep)
    }
}

fn parse_net(item: &str) -> Result<IpNet, UserError> {
    let bad = |reason| UserError::InvalidField {
        field: "networks",
        input: item.to_owned(),
        reason,
    };
    if item.contains('/') {
        item.parse::<IpNet>()
            .map(|n| n.trunc())
            .map_err(|_| bad("expected a CIDR network like 10.0.0.0/8 or 2001:db8::/32"))
    } else {
        item.parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| bad("expected an IP address or a CIDR network"))
    }
}

impl fmt::Display for Networks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("any")
        } else {
            f.write_str(&self.join(", "))
        }
    }
}

impl TryFrom<Vec<String>> for Networks {
    type Error = UserError;
    fn try_from(v: Vec<String>) -> Result<Self, UserError> {
        Networks::from_items(v)
    }
}

impl From<Networks> for Vec<String> {
    fn from(n: Networks) -> Self {
        n.0.iter().map(IpNet::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn states_parse_and_name_the_field_when_wrong() {
        assert_eq!(
            "Arrears".parse::<AccountState>().unwrap(),
            AccountState::Arrears
        );
        assert_eq!(
            " unwelcome ".parse::<AccountState>().unwrap(),
            AccountState::Unwelcome
        );
        assert_eq!(AccountState::default(), AccountState::Normal);
        let e = "banned".parse::<AccountState>().unwrap_err().to_string();
        assert!(e.contains("state") && e.contains("\"banned\""), "{e}");
        assert_eq!(
            serde_json::to_string(&AccountState::Arrears).unwrap(),
            "\"arrears\""
        );
    }

    #[test]
    fn networks_parse_v4_v6_and_bare_addresses() {
        let n = Networks::parse("10.1.2.3/8, 2001:db8::/32;192.0.2.7  ::1").unwrap();
        assert_eq!(n.join(","), "10.0.0.0/8,2001:db8::/32,192.0.2.7/32,::1/128");
        assert!(n.allows(ip("10.200.0.1")));
        assert!(n.allows(ip("2001:db8:ffff::1")));
        assert!(n.allows(ip("192.0.2.7")));
        assert!(
            n.allows(ip("::ffff:10.9.9.9")),
            "IPv4-mapped is matched as IPv4"
        );
        assert!(!n.allows(ip("192.0.2.8")));
        assert!(!n.allows(ip("11.0.0.1")));
        assert!(!n.allows(ip("2001:db9::1")));
        for any in ["", " ", "any", "NONE"] {
            let n = Networks::parse(any).unwrap();
            assert!(n.is_any() && n.allows(ip("203.0.113.1")), "{any:?}");
        }
        // Duplicates collapse.
        assert_eq!(
            Networks::parse("10.0.0.0/8,10.3.0.0/8").unwrap().join(","),
            "10.0.0.0/8"
        );
    }

    #[test]
    fn bad_networks_name_the_field_and_the_item() {
        for bad in [
            "10.0.0.0/33",
            "10.0.0",
            "2001:db8::/129",
            "example.com",
            "10.0.0.0/8/1",
        ] {
            let e = Networks::parse(&format!("192.0.2.0/24,{bad}"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("networks") && e.contains(&format!("{bad:?}")),
                "{e}"
            );
        }
        let many: Vec<String> = (0..=MAX_NETWORKS)
            .map(|i| format!("10.0.{i}.0/24"))
            .collect();
        let e = Networks::parse(&many.join(",")).unwrap_err().to_string();
        assert!(e.contains("too many networks"), "{e}");
    }

    #[test]
    fn networks_serialise_as_a_list_of_strings() {
        let n = Networks::parse("10.0.0.0/8,2001:db8::/32").unwrap();
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(json, r#"["10.0.0.0/8","2001:db8::/32"]"#);
        assert_eq!(serde_json::from_str::<Networks>(&json).unwrap(), n);
        let e = serde_json::from_str::<Networks>(r#"["10.0.0.0/99"]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("networks"), "{e}");
    }
}
