//! Statements and usage reports on a ledger at the scale, on the disk under `TMPDIR`:
//!
//! - setup: 200,000 user accounts, a month of delivery records (10,000,000 by default,
//!   through `record_deliveries` in batches of 10,000: records/s with the report's index),
//!   and about 1,000,000 charge entries spread over the month;
//! - `billing report` for the month (31 days, per zone): the time;
//! - `billing statement` for one user: the time;
//! - `billing unbilled` with nothing unbilled: the time.
//!
//! Sizes: `REPORT_ACCOUNTS`, `REPORT_DELIVERIES`, `REPORT_ENTRIES`. Run:
//! `cargo bench -p mailbell --bench billing_report`. Prints figures; never fails on speed.

use std::process::ExitCode;
use std::time::Instant;

use mailbell::billing::ledger::sqlite::SqliteLedger;
use mailbell::billing::ledger::{
    AccountRef, Delivery, Kind, LedgerStore, Posting, Request, UserAccount,
};
use mailbell::billing::money::Money;
use mailbell::billing::report::{self, Month};
use mailbell::policy::zones::Zone;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn login(i: usize) -> String {
    format!("user{i:06}@mail.example.edu.cn")
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("billing_report: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let accounts = env("REPORT_ACCOUNTS", 200_000).max(1);
    let deliveries = env("REPORT_DELIVERIES", 10_000_000);
    let entries = env("REPORT_ENTRIES", 1_000_000);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ledger.sqlite");
    let mut l = SqliteLedger::open(&path)?;
    let month = Month::parse_or_current(Some("2026-11"), 0)?;
    let span = month.end_ms - month.start_ms;

    let t = Instant::now();
    let users: Vec<UserAccount> = (0..accounts)
        .map(|i| UserAccount {
            login: login(i),
            class: "student".into(),
            ..UserAccount::default()
        })
        .collect();
    l.put_users(&users)?;
    println!(
        "setup: {accounts} accounts in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..deliveries {
        batch.push(Delivery {
            message_key: format!("stalwart:{i}"),
            account: login(i % accounts),
            zone: Some(if i % 3 == 0 {
                Zone::Free
            } else {
                Zone::Foreign
            }),
            bytes: 20_000 + (i as u64 % 50_000),
            // In time order over the month, as they arrive.
            at_ms: month.start_ms + (i as i64 * span) / deliveries.max(1) as i64,
        });
        if batch.len() == 10_000 {
            l.record_deliveries(&batch)?;
            batch.clear();
        }
    }
    l.record_deliveries(&batch)?;
    let s = t.elapsed().as_secs_f64();
    println!(
        "setup: {deliveries} delivery records in {s:.1} s ({:.0} records/s)",
        deliveries as f64 / s
    );

    let t = Instant::now();
    let mut reqs = Vec::with_capacity(10_000);
    for i in 0..entries {
        reqs.push(Request {
            key: format!("charge:{i}"),
            posting: Posting::Transfer {
                kind: Kind::Charge,
                debit: AccountRef::User(login(i % accounts)),
                credit: AccountRef::Revenue("foreign".into()),
                amount: Money::from_minor(1 + (i as i64 % 90)),
                pending: false,
            },
            memo: String::new(),
            at_ms: month.start_ms + (i as i64 * span) / entries.max(1) as i64,
        });
        if reqs.len() == 10_000 {
            l.post_batch(&reqs)?;
            reqs.clear();
        }
    }
    l.post_batch(&reqs)?;
    println!(
        "setup: {entries} charge entries in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    drop(l);

    // As the daemon reads them: a read-only connection of their own.
    let r = SqliteLedger::open_read_only(&path)?;
    let t = Instant::now();
    let (days, end) = month.days();
    let mut bounds: Vec<i64> = days.iter().map(|d| d.1).collect();
    bounds.push(end);
    let rows = r.usage(&bounds)?;
    let names: Vec<String> = days.into_iter().map(|d| d.0).collect();
    let u = report::usage(&month, None, &names, &rows)?;
    let messages: u64 = u.total.zones.iter().map(|z| z.messages).sum();
    println!(
        "billing report, month of {messages} delivery records: {:.2} s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let who = login(accounts / 2);
    let d = r.statement_data(&who, month.start_ms, month.end_ms)?;
    let s = report::statement(d.account, &month, &d.entries, &d.retrievals, &d.charges)?;
    println!(
        "billing statement, one user ({} entries, charges {}): {:.1} ms",
        d.entries.len(),
        s.charges,
        t.elapsed().as_secs_f64() * 1e3
    );

    let t = Instant::now();
    let (un, _) = r.unbilled_accounts()?;
    println!(
        "billing unbilled ({} accounts): {:.1} ms",
        un.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!("ledger file: {:.0} MiB", size as f64 / (1 << 20) as f64);
    Ok(())
}
