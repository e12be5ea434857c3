//! SPF for the free-zone sender domains, checked by mailbell itself when no trusted MTA wrote
//! an `Authentication-Results` header for the message (Stalwart runs its MTA hooks before it
//! adds its own, docs/billing.md): `[zones] verify_spf = true`.
//!
//! Only a message whose envelope sender is below a free-zone suffix, and not already free by
//! its client address, costs a lookup. DNS never holds the MTA's reply past `dns_timeout`: a
//! check that has not finished by then counts as not passed (foreign). Answers are cached
//! (bounded) for their TTL, so a busy sender domain costs one lookup per TTL.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mail_auth::hickory_resolver::config::{
    NameServerConfig, ProtocolConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{MessageAuthenticator, Parameters, ResolverCache, SpfResult, Txt};

/// TXT answers kept at most; when full, the cache is emptied (simple and bounded).
const CACHE_ENTRIES: usize = 10_000;

/// What a check came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Any other SPF result (fail, softfail, neutral, none, temperror, permerror).
    NotPass,
    /// No answer within `dns_timeout`.
    TimedOut,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct SpfStats {
    pub pass: AtomicU64,
    pub not_pass: AtomicU64,
    pub timed_out: AtomicU64,
}

/// A bounded TXT cache honouring each answer's TTL.
#[derive(Default)]
struct TxtCache(Mutex<HashMap<String, (Txt, Instant)>>);

impl ResolverCache<String, Txt> for TxtCache {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        String: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match m.get(name) {
            Some((v, until)) if *until > Instant::now() => Some(v.clone()),
            Some(_) => {
                m.remove(name);
                None
            }
            None => None,
        }
    }

    fn remove<Q>(&self, name: &Q) -> Option<Txt>
    where
        String: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name)
            .map(|(v, _)| v)
    }

    fn insert(&self, key: String, value: Txt, valid_until: Instant) {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() >= CACHE_ENTRIES {
            m.clear();
        }
        m.insert(key, (value, valid_until));
    }
}

/// Checks the envelope sender's SPF.
pub struct SpfCheck {
    auth: MessageAuthenticator,
    timeout: Duration,
    /// Our name, for SPF macros (%{r}).
    host: String,
    cache: TxtCache,
    pub stats: SpfStats,
}

impl std::fmt::Debug for SpfCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpfCheck")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl SpfCheck {
    /// A checker asking `nameservers` ("ip:port"; empty: the system's resolv.conf).
    pub fn new(nameservers: &[String], timeout: Duration) -> Result<Self, String> {
        let auth = if nameservers.is_empty() {
            MessageAuthenticator::new_system_conf().map_err(|e| {
                format!("zones.verify_spf: cannot read the system's DNS configuration: {e}")
            })?
        } else {
            let mut servers = Vec::new();
            for ns in nameservers {
                let addr: SocketAddr = ns.trim().parse().map_err(|_| {
                    format!("zones.nameservers: {ns:?} is not ip:port (e.g. \"127.0.0.53:53\")")
                })?;
                servers.push(NameServerConfig::new(addr, ProtocolConfig::Udp));
                servers.push(NameServerConfig::new(addr, ProtocolConfig::Tcp));
            }
            let cfg = ResolverConfig::from_parts(None, Vec::new(), servers);
            let mut opts = ResolverOpts::default();
            opts.timeout = timeout;
            opts.attempts = 1;
            MessageAuthenticator::new(cfg, opts)
                .map_err(|e| format!("zones.nameservers: cannot build the resolver: {e}"))?
        };
        Ok(Self {
            auth,
            timeout,
            host: hostname(),
            cache: TxtCache::default(),
            stats: SpfStats::default(),
        })
    }

    /// Does `sender` (an address), connecting from `ip` with `helo`, pass SPF?
    pub async fn mail_from(&self, ip: IpAddr, helo: &str, sender: &str) -> Verdict {
        let params = Parameters::new(SpfParameters::verify_mail_from(
            ip, helo, &self.host, sender,
        ))
        .with_txt_cache(&self.cache);
        let v = match tokio::time::timeout(self.timeout, self.auth.verify_spf(params)).await {
            Ok(out) if out.result() == SpfResult::Pass => Verdict::Pass,
            Ok(out) => {
                tracing::debug!(sender, result = ?out.result(), "SPF did not pass");
                Verdict::NotPass
            }
            Err(_) => Verdict::TimedOut,
        };
        let c = match v {
            Verdict::Pass => &self.stats.pass,
            Verdict::NotPass => &self.stats.not_pass,
            Verdict::TimedOut => &self.stats.timed_out,
        };
        c.fetch_add(1, Ordering::Relaxed);
        v
    }

    /// Puts an SPF record for `domain` in the cache, as if DNS had answered (tests).
    #[cfg(test)]
    pub(crate) fn answer(&self, domain: &str, record: &str) {
        use mail_auth::common::parse::TxtRecordParser;
        let spf = mail_auth::spf::Spf::parse(record.as_bytes()).expect("an SPF record");
        self.cache.insert(
            format!("{}.", domain.trim_end_matches('.')),
            Txt::from(spf),
            Instant::now() + Duration::from_secs(3600),
        );
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resolver that cannot answer (the discard port on loopback): only cached answers count.
    fn check(timeout: Duration) -> SpfCheck {
        SpfCheck::new(&["127.0.0.1:9".to_owned()], timeout).unwrap()
    }

    #[tokio::test]
    async fn pass_fail_and_a_silent_dns_are_bounded() {
        let c = check(Duration::from_millis(300));
        c.answer("uni.example", "v=spf1 ip4:192.0.2.0/24 -all");
        let helo = "mx.uni.example";
        assert_eq!(
            c.mail_from("192.0.2.7".parse().unwrap(), helo, "a@uni.example")
                .await,
            Verdict::Pass
        );
        assert_eq!(
            c.mail_from("198.51.100.7".parse().unwrap(), helo, "a@uni.example")
                .await,
            Verdict::NotPass,
            "a spoofed free-zone domain does not ride free"
        );
        // No answer for this domain: no network, a bounded wait, not passed.
        let t = Instant::now();
        let v = c
            .mail_from("192.0.2.7".parse().unwrap(), helo, "a@other.example")
            .await;
        assert!(matches!(v, Verdict::NotPass | Verdict::TimedOut), "{v:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(c.stats.pass.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn bad_nameservers_name_the_key() {
        let e = SpfCheck::new(&["dns.example".to_owned()], Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("zones.nameservers"), "{e}");
    }
}
