//! Mail policy from operator-maintained list files: source zones (what a delivery costs,
//! [`zones`]) and the SMTP-time blocklist ([`blocklist`]). Both are loaded at start and again
//! on SIGHUP ([`Policy::reload`]); a reload with any bad file is refused whole and the rules in
//! force stay. Readers take the current rules without a lock ([`arc_swap`]).

pub mod authres;
pub mod blocklist;
pub mod lists;
pub mod spf;
pub mod zones;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

use crate::audit::{AuditEvent, AuditLog};
use blocklist::{Blocklist, BlocklistConfig, Check, Refusal};
use lists::ListError;
use zones::{Zones, ZonesConfig};

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct PolicyStats {
    pub refused_connect: AtomicU64,
    pub refused_helo: AtomicU64,
    pub refused_mail: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

/// The rules in force, and how to reload them.
pub struct Policy {
    zones_cfg: ZonesConfig,
    blocklist_cfg: BlocklistConfig,
    zones: ArcSwap<Zones>,
    blocklist: ArcSwap<Blocklist>,
    audit: Option<AuditLog>,
    /// SPF for free-zone sender domains (`zones.verify_spf`).
    spf: Option<spf::SpfCheck>,
    pub stats: PolicyStats,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("zones", &self.zones_cfg)
            .field("blocklist", &self.blocklist_cfg)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Loads the files both configs name; refusals are recorded in `audit` if given.
    pub fn load(
        zones_cfg: ZonesConfig,
        blocklist_cfg: BlocklistConfig,
        audit: Option<AuditLog>,
    ) -> Result<Self, ListError> {
        let zones = Zones::load(&zones_cfg)?;
        let blocklist = Blocklist::load(&blocklist_cfg)?;
        Ok(Self {
            zones_cfg,
            blocklist_cfg,
            zones: ArcSwap::from_pointee(zones),
            blocklist: ArcSwap::from_pointee(blocklist),
            audit,
            spf: None,
            stats: PolicyStats::default(),
        })
    }

    /// Checks SPF for free-zone sender domains with `check` (built from `zones.verify_spf`).
    pub fn with_spf(mut self, check: Option<spf::SpfCheck>) -> Self {
        self.spf = check;
        self
    }

    /// SPF counters, when mailbell checks SPF.
    pub fn spf_stats(&self) -> Option<&spf::SpfStats> {
        self.spf.as_ref().map(|c| &c.stats)
    }

    /// The zone of a message: the rules, a trusted header, then (if configured and it can
    /// decide) the sender's SPF, bounded by `zones.dns_timeout`.
    pub async fn zone_of(&self, src: &zones::Source<'_>, helo: &str) -> zones::Zone {
        let decision = self.zones().decide(src);
        match (decision, &self.spf, src.client_ip) {
            (zones::Decision::Zone(z), _, _) => z,
            (zones::Decision::CheckSpf, Some(check), Some(ip)) => {
                match check.mail_from(ip, helo, src.env_from).await {
                    spf::Verdict::Pass => zones::Zone::Free,
                    spf::Verdict::NotPass => zones::Zone::Foreign,
                    spf::Verdict::TimedOut => {
                        tracing::info!(
                            sender = src.env_from,
                            "SPF check timed out (zones.dns_timeout): foreign"
                        );
                        zones::Zone::Foreign
                    }
                }
            }
            (zones::Decision::CheckSpf, _, _) => zones::Zone::Foreign,
        }
    }

    /// No rules at all: every delivery is foreign, nothing is refused.
    pub fn empty() -> Self {
        Self {
            zones_cfg: ZonesConfig::default(),
            blocklist_cfg: BlocklistConfig::default(),
            zones: ArcSwap::from_pointee(Zones::default()),
            blocklist: ArcSwap::from_pointee(Blocklist::default()),
            audit: None,
            spf: None,
            stats: PolicyStats::default(),
        }
    }

    /// Reads every file again. Any error: nothing changes, and the error names file and line.
    pub fn reload(&self) -> Result<(), ListError> {
        let loaded = Zones::load(&self.zones_cfg)
            .and_then(|z| Blocklist::load(&self.blocklist_cfg).map(|b| (z, b)));
        match loaded {
            Ok((z, b)) => {
                self.zones.store(Arc::new(z));
                self.blocklist.store(Arc::new(b));
                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    pub fn zones(&self) -> Guard<Arc<Zones>> {
        self.zones.load()
    }

    pub fn blocklist(&self) -> Guard<Arc<Blocklist>> {
        self.blocklist.load()
    }

    /// Counts and audits a refusal; returns the reply text.
    pub fn refused(&self, mta: &str, client_ip: Option<IpAddr>, r: &Refusal) -> String {
        let counter = match r.stage {
            Check::Connect => &self.stats.refused_connect,
            Check::Helo => &self.stats.refused_helo,
            Check::Mail => &self.stats.refused_mail,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            mta,
            stage = r.stage.as_str(),
            client_ip = client_ip.map(tracing::field::display),
            matched = %r.matched,
            "blocklist: refused"
        );
        if let Some(a) = &self.audit {
            a.record(AuditEvent::Refused {
                mta: mta.to_owned(),
                stage: r.stage.as_str().to_owned(),
                client_ip: client_ip.map(|i| i.to_string()).unwrap_or_default(),
                matched: r.matched.clone(),
            });
        }
        self.blocklist().reply.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A free-zone sender domain counts when its SPF passes for the client address (mailbell
    /// checking, as with Stalwart); a spoofed one does not; DNS answers are injected.
    #[tokio::test]
    async fn free_domains_count_when_mailbell_checks_spf() {
        let dir = tempfile::tempdir().unwrap();
        let doms = dir.path().join("free-domains.txt");
        std::fs::write(&doms, "uni.example\n").unwrap();
        let cfg = ZonesConfig {
            free_domains: vec![doms],
            ..Default::default()
        };
        let check = spf::SpfCheck::new(
            &["127.0.0.1:9".to_owned()],
            std::time::Duration::from_millis(300),
        )
        .unwrap();
        check.answer("lab.uni.example", "v=spf1 ip4:192.0.2.0/24 -all");
        let with = Policy::load(cfg.clone(), BlocklistConfig::default(), None)
            .unwrap()
            .with_spf(Some(check));
        let without = Policy::load(cfg, BlocklistConfig::default(), None).unwrap();
        let src = |ip: &str, from: &'static str| zones::Source {
            client_ip: Some(ip.parse().unwrap()),
            env_from: from,
            auth_results: &[],
        };
        let good = src("192.0.2.10", "alice@lab.uni.example");
        let spoofed = src("198.51.100.10", "alice@lab.uni.example");
        let outside = src("192.0.2.10", "bob@elsewhere.example");
        assert_eq!(
            with.zone_of(&good, "mx.lab.uni.example").await,
            zones::Zone::Free
        );
        assert_eq!(
            with.zone_of(&spoofed, "mx.evil.example").await,
            zones::Zone::Foreign
        );
        assert_eq!(with.zone_of(&outside, "mx").await, zones::Zone::Foreign);
        assert_eq!(without.zone_of(&good, "mx").await, zones::Zone::Foreign);
        let st = with.spf_stats().unwrap();
        assert_eq!(
            (
                st.pass.load(Ordering::Relaxed),
                st.not_pass.load(Ordering::Relaxed)
            ),
            (1, 1),
            "only candidates cost a check"
        );
    }

    #[test]
    fn a_bad_reload_is_refused_whole_and_the_old_rules_stay() {
        let dir = tempfile::tempdir().unwrap();
        let nets = dir.path().join("free.txt");
        let block = dir.path().join("block.txt");
        std::fs::write(&nets, "192.0.2.0/24\n").unwrap();
        std::fs::write(&block, "203.0.113.0/24\n").unwrap();
        let p = Policy::load(
            ZonesConfig {
                free_networks: vec![nets.clone()],
                ..Default::default()
            },
            BlocklistConfig {
                networks: vec![block.clone()],
                ..Default::default()
            },
            None,
        )
        .unwrap();
        let free = zones::Source {
            client_ip: Some("192.0.2.1".parse().unwrap()),
            ..Default::default()
        };
        let bad_ip = Some("203.0.113.9".parse().unwrap());
        assert_eq!(p.zones().classify(&free), zones::Zone::Free);
        assert!(p.blocklist().connect(bad_ip).is_some());

        // The zone file is fine, the blocklist file is not: neither changes.
        std::fs::write(&nets, "198.51.100.0/24\n").unwrap();
        std::fs::write(&block, "203.0.113.0/24\n\nnot-an-address\n").unwrap();
        let e = p.reload().unwrap_err().to_string();
        assert!(e.contains(&format!("{}:3:", block.display())), "{e}");
        assert_eq!(p.zones().classify(&free), zones::Zone::Free);
        assert!(p.blocklist().connect(bad_ip).is_some());
        assert_eq!(p.stats.reload_failures.load(Ordering::Relaxed), 1);

        // Fixed: both change at once.
        std::fs::write(&block, "# empty now\n").unwrap();
        p.reload().unwrap();
        assert_eq!(p.zones().classify(&free), zones::Zone::Foreign);
        assert!(p.blocklist().connect(bad_ip).is_none());
        assert!(p.blocklist().is_empty());
    }

    #[test]
    fn refusals_are_counted() {
        let p = Policy::empty();
        let r = Refusal {
            stage: Check::Helo,
            matched: "x".into(),
        };
        let text = p.refused("milter", None, &r);
        assert_eq!(text, BlocklistConfig::default().reply);
        assert_eq!(p.stats.refused_helo.load(Ordering::Relaxed), 1);
    }
}
