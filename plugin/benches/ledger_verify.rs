//! The ledger of record at the scale, on the disk under `TMPDIR`
//! (`synchronous = FULL`: every commit is durable):
//!
//! - setup: 200,000 user accounts (one transaction), one top-up each;
//! - a night's postings, batched (10,000 per transaction): for every account a pending
//!   delivery charge, for most of them the post at the next retrieval, and direct charges,
//!   about 1,000,000 entries in all; postings/s;
//! - the baseline: 20,000 postings, one transaction each; postings/s and the ratio;
//! - `verify` over the whole ledger (target < 30 s); peak RSS.
//!
//! Sizes: `LEDGER_ACCOUNTS`, `LEDGER_POSTINGS`, `LEDGER_SINGLE`. Run:
//! `cargo bench -p mailbell --bench ledger_verify`. Prints figures; exits non-zero only when
//! verify finds a problem, never because of speed.

use std::process::ExitCode;
use std::time::Instant;

use mailbell::billing::ledger::sqlite::SqliteLedger;
use mailbell::billing::ledger::{AccountRef, Kind, LedgerStore, Posting, Request};
use mailbell::billing::money::Money;

#[path = "common/mod.rs"]
mod common;
use common::{login, peak_rss_kib, users};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn transfer(
    key: String,
    kind: Kind,
    debit: AccountRef,
    credit: AccountRef,
    minor: i64,
    pending: bool,
) -> Request {
    Request {
        key,
        posting: Posting::Transfer {
            kind,
            debit,
            credit,
            amount: Money::from_minor(minor),
            pending,
        },
        memo: String::new(),
        at_ms: 1_796_083_200_000,
    }
}

/// Posts `requests` in batches of `batch`; returns the seconds taken.
fn post_batched(l: &mut SqliteLedger, requests: Vec<Request>, batch: usize) -> Result<f64, String> {
    let t = Instant::now();
    for chunk in requests.chunks(batch) {
        l.post_batch(chunk).map_err(|e| e.to_string())?;
    }
    Ok(t.elapsed().as_secs_f64())
}

fn run() -> Result<(), String> {
    let accounts = env("LEDGER_ACCOUNTS", 200_000);
    let postings = env("LEDGER_POSTINGS", 1_000_000);
    let single = env("LEDGER_SINGLE", 20_000);
    const BATCH: usize = 10_000;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("ledger.sqlite");
    let mut l = SqliteLedger::open(&path).map_err(|e| e.to_string())?;

    let t = Instant::now();
    l.put_users(&users(accounts)).map_err(|e| e.to_string())?;
    let topups: Vec<Request> = (0..accounts)
        .map(|i| {
            transfer(
                format!("topup-{i}"),
                Kind::Topup,
                AccountRef::Cash,
                AccountRef::User(login(i)),
                50_00,
                false,
            )
        })
        .collect();
    post_batched(&mut l, topups, BATCH)?;
    println!(
        "setup: {accounts} accounts and {accounts} top-ups in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The night: pending delivery charges, posted at retrieval; the rest direct charges.
    // Entries 1..=accounts are the top-ups; the pending charges follow.
    let base = i64::try_from(accounts).map_err(|e| e.to_string())?;
    let pendings = (postings * 2 / 5).min(accounts * 4);
    let mut night = Vec::with_capacity(postings);
    for n in 0..pendings {
        let u = n % accounts;
        let zone = if n % 3 == 0 { "free" } else { "foreign" };
        night.push(transfer(
            format!("deliver-{n}"),
            Kind::Charge,
            AccountRef::User(login(u)),
            AccountRef::Revenue(zone.into()),
            1 + (n as i64 % 97),
            true,
        ));
    }
    let posts = (postings * 2 / 5).min(pendings);
    for n in 0..posts {
        night.push(Request {
            key: format!("retrieve-{n}"),
            posting: Posting::PostPending {
                pending_id: base + 1 + n as i64,
                amount: None,
            },
            memo: String::new(),
            at_ms: 1_796_090_000_000,
        });
    }
    let mut n = 0;
    while night.len() < postings {
        night.push(transfer(
            format!("charge-{n}"),
            Kind::Charge,
            AccountRef::User(login(n % accounts)),
            AccountRef::Revenue("foreign".into()),
            3,
            false,
        ));
        n += 1;
    }
    let count = night.len();
    let secs = post_batched(&mut l, night, BATCH)?;
    let batched = count as f64 / secs;
    println!(
        "batched: {count} postings in {secs:.1} s, {batched:.0} postings/s ({BATCH} per transaction)"
    );

    let t = Instant::now();
    for i in 0..single {
        l.post(&transfer(
            format!("single-{i}"),
            Kind::Charge,
            AccountRef::User(login(i % accounts)),
            AccountRef::Revenue("foreign".into()),
            1,
            false,
        ))
        .map_err(|e| e.to_string())?;
    }
    let secs = t.elapsed().as_secs_f64();
    let one = single as f64 / secs;
    println!(
        "baseline: {single} postings in {secs:.1} s, {one:.0} postings/s (one transaction each); \
         batched/baseline = {:.1}x",
        batched / one
    );

    let t = Instant::now();
    let r = l.verify().map_err(|e| e.to_string())?;
    let secs = t.elapsed().as_secs_f64();
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!(
        "verify: {} entries, {} accounts in {secs:.1} s ({:.0} entries/s); file {:.0} MB; \
         peak RSS {} MiB",
        r.entries,
        r.accounts,
        r.entries as f64 / secs,
        size as f64 / 1e6,
        peak_rss_kib() / 1024
    );
    match r.problem {
        Some(p) => Err(format!("verify found a problem: {p}")),
        None => Ok(()),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ledger_verify: {e}");
            ExitCode::FAILURE
        }
    }
}
