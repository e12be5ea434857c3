//! What the zone and blocklist rules cost per message, and how fast the delivery meter makes
//! records durable.
//!
//! - lookups in a CIDR set of 100,000 IPv4 and 20,000 IPv6 networks (a large national
//!   research network's published ranges are a few thousand);
//! - `Zones::classify` of a message that is free by an authenticated sender domain (the
//!   slowest path: CIDR miss, suffix match, Authentication-Results parse);
//! - the check every hook call and milter stage makes when no rules are configured;
//! - the delivery meter: batches of 1,000 records (a webhook batch is at most that) and the
//!   baseline of one transaction per record, in the ledger's SQLite file under `TMPDIR`.
//!
//! Run: `cargo bench -p mailbell --bench policy`. Prints figures; fails only if a record is
//! missing.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::ExitCode;
use std::time::Instant;

use mailbell::billing::ledger::sqlite::SqliteLedger;
use mailbell::billing::ledger::{Delivery, LedgerStore};
use mailbell::policy::lists::CidrSet;
use mailbell::policy::zones::{Source, Zone, Zones, ZonesConfig};
use mailbell::policy::Policy;

/// A small deterministic generator (xorshift), so runs compare.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn per_op(n: u64, started: Instant) -> f64 {
    started.elapsed().as_nanos() as f64 / n as f64
}

fn main() -> ExitCode {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("temp dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    // CIDR lookups.
    let mut text = String::new();
    for _ in 0..100_000 {
        let a = Ipv4Addr::from((rng.next() as u32) & 0xffff_ff00);
        text.push_str(&format!("{a}/24\n"));
    }
    for _ in 0..20_000 {
        let a = Ipv6Addr::from(u128::from(rng.next()) << 64);
        text.push_str(&format!("{a}/48\n"));
    }
    let nets = dir.path().join("nets.txt");
    let domains = dir.path().join("domains.txt");
    if std::fs::write(&nets, &text).is_err() || std::fs::write(&domains, "uni.example\n").is_err() {
        eprintln!("cannot write the list files");
        return ExitCode::FAILURE;
    }
    let t = Instant::now();
    let set = match CidrSet::load(std::slice::from_ref(&nets)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "load 120,000 networks ({} KB file): {:.0} ms",
        text.len() / 1024,
        t.elapsed().as_secs_f64() * 1e3
    );
    let n = 2_000_000u64;
    let ips: Vec<IpAddr> = (0..1024)
        .map(|i| {
            if i % 5 == 0 {
                IpAddr::from(Ipv6Addr::from(u128::from(rng.next()) << 64 | 1))
            } else {
                IpAddr::from(Ipv4Addr::from(rng.next() as u32))
            }
        })
        .collect();
    let t = Instant::now();
    let mut hits = 0u64;
    for i in 0..n {
        hits += u64::from(set.contains(black_box(ips[(i % 1024) as usize])));
    }
    println!("CIDR lookup: {:.0} ns ({hits} hits of {n})", per_op(n, t));

    // classify, slowest path.
    let zones = match Zones::load(&ZonesConfig {
        free_networks: vec![nets.clone()],
        free_domains: vec![domains.clone()],
        authserv_id: "mx.isp.example".into(),
        ..ZonesConfig::default()
    }) {
        Ok(z) => z,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let auth = vec![
        "mx.isp.example; spf=pass (sender ip is 203.0.113.9) smtp.mailfrom=lab.uni.example; \
         dkim=pass header.d=lab.uni.example; dmarc=pass (p=none) header.from=lab.uni.example"
            .to_owned(),
    ];
    let src = Source {
        client_ip: Some(IpAddr::from([203, 0, 113, 9])),
        env_from: "prof@lab.uni.example",
        auth_results: &auth,
    };
    let n = 500_000u64;
    let t = Instant::now();
    let mut free = 0u64;
    for _ in 0..n {
        free += u64::from(zones.classify(black_box(&src)) == Zone::Free);
    }
    println!(
        "classify (free by authenticated domain): {:.0} ns",
        per_op(n, t)
    );
    if free != n {
        eprintln!("classify: {free} free of {n}");
        return ExitCode::FAILURE;
    }

    // The no-rules check.
    let empty = Policy::empty();
    let n = 20_000_000u64;
    let t = Instant::now();
    let mut listed = 0u64;
    for _ in 0..n {
        listed += u64::from(!black_box(&empty).blocklist().is_empty());
    }
    println!(
        "no rules configured, per stage: {:.1} ns ({listed})",
        per_op(n, t)
    );

    // Delivery meter.
    let path = dir.path().join("ledger.sqlite");
    let mut ledger = match SqliteLedger::open(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let delivery = |i: u64, key: &str| Delivery {
        message_key: format!("{key}:{}", i / 2),
        account: format!("stalwart:{}", i % 200_000),
        zone: None,
        bytes: 50_000,
        at_ms: 1_796_000_000_000,
    };
    let (batches, per) = (200u64, 1_000u64);
    let t = Instant::now();
    for b in 0..batches {
        let batch: Vec<_> = (b * per..(b + 1) * per)
            .map(|i| delivery(i, "stalwart"))
            .collect();
        if let Err(e) = ledger.record_deliveries(&batch) {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let batched = (batches * per) as f64 / secs;
    println!(
        "delivery meter, batches of {per}: {batched:.0} records/s durable ({} in {secs:.2} s)",
        batches * per
    );
    let single = 2_000u64;
    let t = Instant::now();
    for i in 0..single {
        if let Err(e) = ledger.record_deliveries(&[delivery(i, "milter")]) {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let one = single as f64 / secs;
    println!(
        "delivery meter, one record per transaction: {one:.0} records/s ({:.2} ms each)",
        secs * 1e3 / single as f64
    );
    println!("ratio batched / one per transaction: {:.1}x", batched / one);
    // A replay of the first batch adds nothing.
    let replay: Vec<_> = (0..per).map(|i| delivery(i, "stalwart")).collect();
    match ledger.record_deliveries(&replay) {
        Ok(r) if r.added == 0 && r.replayed == per as usize => ExitCode::SUCCESS,
        Ok(r) => {
            eprintln!("replay changed the meter: {r:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
