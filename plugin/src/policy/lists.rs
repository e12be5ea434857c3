//! List files the policy rules are loaded from: one entry a line, `#` starts a comment, blank
//! lines are skipped. A bad entry names its file and line, and fails the whole load.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

/// Largest list file read (a research network's published ranges are far smaller).
pub const MAX_FILE: u64 = 64 * 1024 * 1024;

/// Why a list could not be loaded; the reload is refused whole.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is larger than {MAX_FILE} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("{}:{line}: {entry:?} is not {expected}", path.display())]
    Entry {
        path: PathBuf,
        line: usize,
        entry: String,
        expected: &'static str,
    },
}

/// The entries of one list file, each with its line number (1-based).
pub fn read_entries(path: &Path) -> Result<Vec<(usize, String)>, ListError> {
    let read = |source| ListError::Read {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read)?.len();
    if len > MAX_FILE {
        return Err(ListError::TooLarge {
            path: path.to_owned(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    Ok(entries(&text))
}

/// The entries of a list's text: comments and blank lines dropped, the rest trimmed.
pub fn entries(text: &str) -> Vec<(usize, String)> {
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let l = l.split('#').next().unwrap_or("").trim();
            (!l.is_empty()).then(|| (i + 1, l.to_owned()))
        })
        .collect()
}

/// A set of IPv4 and IPv6 networks, searched in O(log n): merged, sorted address ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl CidrSet {
    /// Loads every file; an entry is a CIDR (`192.0.2.0/24`, `2001:db8::/32`) or a single
    /// address.
    pub fn load(files: &[PathBuf]) -> Result<Self, ListError> {
        let mut nets = Vec::new();
        for path in files {
            for (line, entry) in read_entries(path)? {
                let net = parse_net(&entry).ok_or_else(|| ListError::Entry {
                    path: path.clone(),
                    line,
                    entry: entry.clone(),
                    expected: "an IP address or CIDR network",
                })?;
                nets.push(net);
            }
        }
        Ok(Self::from_nets(nets))
    }

    pub fn from_nets(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for n in nets {
            match n.trunc() {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()))),
            }
        }
        Self {
            v4: merge(v4),
            v6: merge(v6),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Whether `ip` is in one of the networks. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`)
    /// is looked up as the IPv4 address it is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => find(&self.v4, u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(a) => find(&self.v4, u32::from(a)),
                None => find(&self.v6, u128::from(a)),
            },
        }
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

fn merge<T: Ord + Copy + num_step::Step>(mut r: Vec<(T, T)>) -> Vec<(T, T)> {
    r.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(r.len());
    for (lo, hi) in r {
        match out.last_mut() {
            Some(last) if lo <= last.1.next_or_max() => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

fn find<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    let i = ranges.partition_point(|r| r.0 <= x);
    i > 0 && ranges.get(i - 1).is_some_and(|r| x <= r.1)
}

mod num_step {
    /// The next value, saturating (adjacent ranges merge).
    pub trait Step {
        fn next_or_max(self) -> Self;
    }
    impl Step for u32 {
        fn next_or_max(self) -> Self {
            self.saturating_add(1)
        }
    }
    impl Step for u128 {
        fn next_or_max(self) -> Self {
            self.saturating_add(1)
        }
    }
}

/// Domain suffixes: `example.edu` matches `example.edu` and `mail.example.edu`, never
/// `badexample.edu`. Stored lower-case, without a leading or trailing dot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SuffixSet {
    suffixes: std::collections::HashSet<String>,
}

impl SuffixSet {
    /// Loads every file; `what` names the entries in errors ("a domain name", "a HELO name").
    pub fn load(files: &[PathBuf], what: &'static str) -> Result<Self, ListError> {
        let mut set = Self::default();
        for path in files {
            for (line, entry) in read_entries(path)? {
                if !set.insert(&entry) {
                    return Err(ListError::Entry {
                        path: path.clone(),
                        line,
                        entry,
                        expected: what,
                    });
                }
            }
        }
        Ok(set)
    }

    /// Adds a suffix; false if it is not a plausible domain name.
    pub fn insert(&mut self, s: &str) -> bool {
        let s = s.trim_matches('.').to_ascii_lowercase();
        let ok = !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if ok {
            self.suffixes.insert(s);
        }
        ok
    }

    pub fn is_empty(&self) -> bool {
        self.suffixes.is_empty()
    }

    /// Whether `domain` is one of the suffixes or below one (case-insensitive).
    pub fn matches(&self, domain: &str) -> bool {
        if self.suffixes.is_empty() {
            return false;
        }
        let d = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut rest = d.as_str();
        loop {
            if self.suffixes.contains(rest) {
                return true;
            }
            match rest.split_once('.') {
                Some((_, tail)) => rest = tail,
                None => return false,
            }
        }
    }
}

/// The domain of an address (`user@Example.ORG` → `example.org`); `None` for the null sender
/// or an address without a domain.
pub fn domain_of(addr: &str) -> Option<String> {
    let a = addr.trim().trim_start_matches('<').trim_end_matches('>');
    let (_, d) = a.rsplit_once('@')?;
    let d = d.trim().trim_end_matches('.');
    (!d.is_empty()).then(|| d.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(nets: &[&str]) -> CidrSet {
        CidrSet::from_nets(nets.iter().map(|n| parse_net(n).unwrap()))
    }

    #[test]
    fn cidr_v4_v6_and_mapped() {
        let s = set(&[
            "192.0.2.0/24",
            "198.51.100.7",
            "2001:db8::/32",
            "10.0.0.0/8",
        ]);
        for yes in [
            "192.0.2.0",
            "192.0.2.255",
            "198.51.100.7",
            "10.9.9.9",
            "2001:db8:1::5",
        ] {
            assert!(s.contains(yes.parse().unwrap()), "{yes}");
        }
        assert!(s.contains("::ffff:192.0.2.9".parse().unwrap()));
        for no in [
            "192.0.3.0",
            "198.51.100.8",
            "11.0.0.0",
            "2001:db9::1",
            "::1",
        ] {
            assert!(!s.contains(no.parse().unwrap()), "{no}");
        }
        assert!(CidrSet::default().is_empty());
    }

    #[test]
    fn cidr_ranges_merge_and_host_bits_are_dropped() {
        let s = set(&[
            "192.0.2.7/24",
            "192.0.3.0/24",
            "192.0.2.128/25",
            "0.0.0.0/0",
        ]);
        assert_eq!(s.v4, vec![(0, u32::MAX)]);
        let s = set(&["::/0", "2001:db8::/32"]);
        assert_eq!(s.v6.len(), 1);
        assert!(s.contains("fe80::1".parse().unwrap()));
    }

    #[test]
    fn suffixes_match_on_label_boundaries() {
        let mut s = SuffixSet::default();
        assert!(s.insert("Example.EDU."));
        assert!(!s.insert("bad domain"));
        assert!(!s.insert("a..b"));
        assert!(s.matches("example.edu"));
        assert!(s.matches("mail.Example.edu."));
        assert!(!s.matches("badexample.edu"));
        assert!(!s.matches("edu"));
        assert_eq!(
            domain_of("<Alice@Mail.Example.EDU>").as_deref(),
            Some("mail.example.edu")
        );
        assert_eq!(domain_of("<>"), None);
        assert_eq!(domain_of("postmaster"), None);
    }

    #[test]
    fn entries_skip_comments_and_keep_line_numbers() {
        let e = entries("# ranges\n\n192.0.2.0/24  # lab\n  2001:db8::/32\n");
        assert_eq!(
            e,
            vec![(3, "192.0.2.0/24".into()), (4, "2001:db8::/32".into())]
        );
    }

    #[test]
    fn a_bad_entry_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("free.txt");
        std::fs::write(&p, "192.0.2.0/24\n# x\n192.0.2.0/33\n").unwrap();
        let e = CidrSet::load(std::slice::from_ref(&p))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("{}:3:", p.display())), "{e}");
        assert!(e.contains("192.0.2.0/33"), "{e}");
        let missing = dir.path().join("nope.txt");
        let e = CidrSet::load(&[missing]).unwrap_err().to_string();
        assert!(e.contains("nope.txt"), "{e}");
        let p2 = dir.path().join("helo.txt");
        std::fs::write(&p2, "ok.example\nnot a name\n").unwrap();
        let e = SuffixSet::load(&[p2], "a HELO name")
            .unwrap_err()
            .to_string();
        assert!(e.contains("helo.txt:2:"), "{e}");
    }
}
