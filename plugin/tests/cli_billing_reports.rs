//! `mailbell billing statement|report|unbilled|write-off` as an operator runs them, on a
//! ledger that the real accounting run (`billing::run::run`) filled from delivery records and
//! retrieval meter records: without a daemon and through its admin API, which must answer
//! the same; the statement's totals against the ledger's own balance; bad input refused with
//! a message naming it; write-offs recorded in the audit log with who and why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::NaiveDate;
use mailbell::billing::ledger::sqlite::SqliteLedger;
use mailbell::billing::ledger::{Delivery, LedgerStore, StandingRules, Tariff, UserAccount};
use mailbell::billing::money::Money;
use mailbell::billing::run::{self, ChargeAt, Expiry, Period, Quiet, RunContext, RunSettings};
use mailbell::billing::tariff::BYTES_PER_MB;
use mailbell::meter::{new_session_id, Entry, Login, MeterConfig, MeterStore, Protocol, Session};
use mailbell::policy::zones::Zone;
use support::cli::{fails, ok, run_all, serve_admin};

const TOKEN: &str = "billing-reports-token-0123456789";
const MB: u64 = BYTES_PER_MB;
const HOUR: i64 = 3_600_000;

fn day(m: u32, d: u32) -> Period {
    Period::day(NaiveDate::from_ymd_opt(2026, m, d).unwrap()).unwrap()
}

fn at(m: u32, d: u32, hour: i64) -> i64 {
    day(m, d).start_ms + hour * HOUR
}

fn money(s: &str) -> Money {
    Money::parse(s).unwrap()
}

/// November 2026 for alice (student: free zone 0, foreign 0.30/MB), bob, and two accounts
/// the ledger does not know, through the real accounting run, one run per day.
fn build_ledger(data: &Path) {
    let path = data.join("billing").join("ledger.sqlite");
    let mut ledger = SqliteLedger::open(&path).unwrap();
    ledger
        .put_user(&UserAccount {
            login: "alice@example.org".into(),
            staff_no: "2026011234".into(),
            real_name: "张三".into(),
            class: "student".into(),
            ..UserAccount::default()
        })
        .unwrap();
    ledger
        .put_user(&UserAccount {
            login: "bob@example.org".into(),
            class: "student".into(),
            ..UserAccount::default()
        })
        .unwrap();
    for (zone, price) in [("free", "0"), ("foreign", "0.30")] {
        ledger
            .put_tariff(&Tariff {
                class: "student".into(),
                zone: zone.into(),
                price_per_mb: money(price),
                min_charge: Money::ZERO,
            })
            .unwrap();
    }
    let topup = |l: &mut SqliteLedger, who: &str, amount: &str, key: &str, at_ms: i64| {
        mailbell::billing::topup(l, who, money(amount), key, "cash desk", at_ms).unwrap();
    };
    topup(
        &mut ledger,
        "alice@example.org",
        "50",
        "t-oct",
        at(10, 20, 9),
    );
    topup(&mut ledger, "bob@example.org", "5", "t-bob", at(10, 20, 9));
    topup(
        &mut ledger,
        "alice@example.org",
        "10",
        "t-nov",
        at(11, 5, 9),
    );
    mailbell::billing::adjust(
        &mut ledger,
        "alice@example.org",
        money("-2.50"),
        "a-nov",
        "duplicate top-up",
        at(11, 10, 9),
    )
    .unwrap();

    let clock = Arc::new(AtomicI64::new(0));
    let c = clock.clone();
    let meter = MeterStore::open_with_clock(
        &data.join("report-test-meter"),
        MeterConfig::default(),
        Arc::new(move || c.load(Ordering::SeqCst)),
    )
    .unwrap();
    let mut seq = 0;
    let mut deliver = |l: &mut SqliteLedger, account: &str, zone: Zone, bytes: u64, at_ms| {
        seq += 1;
        l.record_deliveries(&[Delivery {
            message_key: format!("milter:Q{seq}"),
            account: account.into(),
            zone: Some(zone),
            bytes,
            at_ms,
        }])
        .unwrap();
    };
    let retrieve = |account: &str, at_ms: i64| {
        clock.store(at_ms + 1_000, Ordering::SeqCst);
        meter
            .append(vec![Entry::Session(Session {
                session: new_session_id(),
                account: Some(account.into()),
                client: "198.51.100.7:40000".parse().unwrap(),
                protocol: Protocol::Pop3,
                listener: "pop3".into(),
                tls: false,
                start_ms: at_ms,
                end_ms: at_ms + 1_000,
                login: Login::Ok,
                bytes_to_client: 100,
                bytes_to_backend: 10,
                messages: 2,
                message_bytes: 5 * MB,
                end: "quit".into(),
                retrieved: Vec::new(),
            })])
            .unwrap();
        meter.flush().unwrap();
    };
    // Nov 2: 2 MB foreign and 3 MB free, retrieved at noon: 0.60.
    deliver(
        &mut ledger,
        "alice@example.org",
        Zone::Foreign,
        2 * MB,
        at(11, 2, 10),
    );
    deliver(
        &mut ledger,
        "alice@example.org",
        Zone::Free,
        3 * MB,
        at(11, 2, 10),
    );
    deliver(&mut ledger, "stalwart:77", Zone::Foreign, MB, at(11, 2, 11));
    retrieve("alice@example.org", at(11, 2, 12));
    // Nov 3: 1 MB foreign, not retrieved that day: pending 0.30, posted at Nov 4's retrieval.
    deliver(
        &mut ledger,
        "alice@example.org",
        Zone::Foreign,
        MB,
        at(11, 3, 10),
    );
    deliver(
        &mut ledger,
        "ghost@example.org",
        Zone::Free,
        2 * MB,
        at(11, 3, 11),
    );
    deliver(
        &mut ledger,
        "ghost@example.org",
        Zone::Foreign,
        MB,
        at(11, 4, 8),
    );
    retrieve("alice@example.org", at(11, 4, 9));
    // Nov 30, late: pending at the month's end.
    deliver(
        &mut ledger,
        "alice@example.org",
        Zone::Foreign,
        MB,
        at(11, 30, 23),
    );

    let settings = RunSettings {
        charge: ChargeAt::AtRetrieval,
        pending_expiry_days: 90,
        expired_pending: Expiry::Void,
        rules: StandingRules {
            arrears_below: Money::ZERO,
            warn_below: vec![money("1")],
        },
        batch: 100,
    };
    for d in 1..=30 {
        run::run(
            &mut RunContext {
                store: &mut ledger,
                meter: Some(&meter),
                resolve: &|_| None,
                settings: &settings,
                progress: &Quiet,
                now_ms: &|| 1_900_000_000_000,
            },
            &day(11, d),
        )
        .unwrap();
    }
    assert_eq!(ledger.verify().unwrap().problem, None);
}

fn local_config(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("mailbell.toml");
    std::fs::write(
        &config,
        format!(
            "[mailbell]\ndata_dir = {:?}\n[listen]\nadmin = \"\"\n",
            dir.join("data")
        ),
    )
    .unwrap();
    config
}

fn commands() -> Vec<Vec<String>> {
    [
        "billing statement Alice@Example.org --month 2026-11",
        "billing statement alice@example.org --month 2026-11 --csv",
        "billing statement alice@example.org --month 2026-11 --json",
        "billing statement alice@example.org --month 2026-10",
        "billing statement alice@example.org --month 2026-13",
        "billing statement nobody@example.org --month 2026-11",
        "billing report --month 2026-11",
        "billing report --month 2026-11 --csv",
        "billing report --month 2026-11 --zone foreign --json",
        "billing report --month 11/2026",
        "billing unbilled",
        "billing unbilled --json",
        "billing write-off stalwart:77 --reason spam-trap --by alice-admin",
        "billing write-off stalwart:77 --reason again --by alice-admin",
        "billing write-off ghost@example.org --reason \u{7} --by alice-admin",
        "billing unbilled",
        "billing balance alice@example.org",
    ]
    .iter()
    .map(|l| l.split(' ').map(str::to_owned).collect())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_and_reports_read_the_same_through_the_daemon_and_without_it() {
    let local = tempfile::tempdir().unwrap();
    let served = tempfile::tempdir().unwrap();
    let (l, s) = (local.path().to_owned(), served.path().to_owned());
    tokio::task::spawn_blocking(move || {
        build_ledger(&l.join("data"));
        build_ledger(&s.join("data"));
    })
    .await
    .unwrap();
    let local_config = local_config(local.path());
    let (running, served_config) = serve_admin(served.path(), TOKEN).await;
    let cmds = commands();
    let c = cmds.clone();
    let (sc, lc) = (served_config.clone(), local_config.clone());
    let (without, through) =
        tokio::task::spawn_blocking(move || (run_all(&lc, &c), run_all(&sc, &c)))
            .await
            .unwrap();
    // The write-off is in the daemon's audit log, with who and why.
    let log = tokio::task::spawn_blocking(move || ok(&served_config, &["log", "--limit", "50"]))
        .await
        .unwrap();
    running.stop().await;
    for ((c, w), t) in cmds.iter().zip(&without).zip(&through) {
        assert_eq!(
            w,
            t,
            "`mailbell {}` differs (left: without the daemon)",
            c.join(" ")
        );
    }
    let at = |i: usize| &without[i];
    let okay = |i: usize, text: &str| {
        assert!(
            at(i).0 && at(i).1.contains(text),
            "{i}: {text:?} in {:?}",
            at(i)
        )
    };
    let refused =
        |i: usize, text: &str| assert!(!at(i).0 && at(i).2.contains(text), "{i}: {:?}", at(i));

    // The statement: header, both retrievals with their bytes per zone and charge, the
    // top-up and the adjustment, and totals that add up.
    okay(
        0,
        "Statement 2026-11 for alice@example.org (张三), staff no 2026011234, class student, \
         status normal",
    );
    let text = &at(0).1;
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} in\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        line("2026-11-02 12:00:00"),
        vec![
            "2026-11-02",
            "12:00:00",
            "198.51.100.7",
            "pop3",
            "2",
            "5242880",
            "3145728",
            "2097152",
            "0.60"
        ]
    );
    assert_eq!(
        line("2026-11-04 09:00:00"),
        vec![
            "2026-11-04",
            "09:00:00",
            "198.51.100.7",
            "pop3",
            "2",
            "5242880",
            "0",
            "1048576",
            "0.30"
        ]
    );
    assert_eq!(line("topup")[3..], ["+10.00", "cash", "desk"]);
    assert_eq!(line("adjustment")[3..], ["-2.50", "duplicate", "top-up"]);
    assert_eq!(line("Opening balance"), vec!["Opening", "balance", "50.00"]);
    assert_eq!(line("Top-ups"), vec!["Top-ups", "+10.00"]);
    assert_eq!(line("Adjustments"), vec!["Adjustments", "-2.50"]);
    assert_eq!(line("Charges"), vec!["Charges", "-0.90"]);
    assert_eq!(line("Closing balance"), vec!["Closing", "balance", "56.60"]);
    assert_eq!(line("Pending"), vec!["Pending", "0.30"]);
    assert_eq!(line("Available"), vec!["Available", "56.30"]);
    // Nothing after November: the closing balance is the ledger's.
    okay(16, "balance        56.60");
    okay(16, "available      56.30");

    // CSV: a header row; the opening balance plus the lines' amounts is the closing one.
    let mut csv = csv::Reader::from_reader(at(1).1.as_bytes());
    let head: Vec<String> = csv.headers().unwrap().iter().map(str::to_owned).collect();
    assert_eq!(
        head,
        [
            "time",
            "type",
            "client",
            "protocol",
            "messages",
            "bytes",
            "free_bytes",
            "foreign_bytes",
            "amount",
            "note"
        ]
    );
    let rows: Vec<csv::StringRecord> = csv.records().map(Result::unwrap).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| &r[1]).collect();
    assert_eq!(
        kinds,
        [
            "opening",
            "retrieval",
            "retrieval",
            "topup",
            "adjustment",
            "pending",
            "closing"
        ]
    );
    let amount = |r: &csv::StringRecord| money(&r[8]).minor();
    let inner: i64 = rows[1..5].iter().map(amount).sum();
    assert_eq!(amount(&rows[0]) + inner, amount(&rows[6]));
    assert_eq!(&rows[1][7], "2097152");

    let j: serde_json::Value = serde_json::from_str(&at(2).1).unwrap();
    assert_eq!(j["closing"], "56.60");
    assert_eq!(j["pending"], "0.30");
    assert_eq!(j["retrievals"][0]["client"], "198.51.100.7");
    assert_eq!(j["account"]["real_name"], "张三");
    // October: only the top-up; it is November's opening balance.
    okay(3, "No retrievals.");
    assert!(
        at(3)
            .1
            .lines()
            .any(|l| l.split_whitespace().eq(["Closing", "balance", "50.00"])),
        "{}",
        at(3).1
    );
    refused(4, "month \"2026-13\": expected YYYY-MM");
    refused(5, "unknown account \"nobody@example.org\"");

    // The usage report: every delivery record (known accounts or not) by local day and zone,
    // retrievals per day, and the charges posted that day.
    let report = &at(6).1;
    assert!(report.starts_with("Usage 2026-11 (local days)"), "{report}");
    let rline = |needle: &str| {
        report
            .lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("{needle:?} in\n{report}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        rline("2026-11-02"),
        ["2026-11-02", "free", "1", "3145728", "0.00", "1", "5242880"]
    );
    let nov2 = report
        .lines()
        .position(|l| l.starts_with("2026-11-02"))
        .unwrap();
    let next: Vec<&str> = report
        .lines()
        .nth(nov2 + 1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(next, ["foreign", "2", "3145728", "0.60"]);
    assert_eq!(
        rline("2026-11-04"),
        [
            "2026-11-04",
            "foreign",
            "1",
            "1048576",
            "0.30",
            "1",
            "5242880"
        ]
    );
    assert_eq!(
        rline("2026-11-05"),
        ["2026-11-05", "-", "0", "0", "0.00", "0", "0"]
    );
    assert_eq!(
        rline("total"),
        ["total", "free", "2", "5242880", "0.00", "2", "10485760"]
    );
    let mut csv = csv::Reader::from_reader(at(7).1.as_bytes());
    assert_eq!(
        csv.headers().unwrap().iter().collect::<Vec<_>>(),
        [
            "day",
            "zone",
            "messages",
            "bytes",
            "charged",
            "retrievals",
            "retrieved_bytes"
        ]
    );
    let rows: Vec<csv::StringRecord> = csv.records().map(Result::unwrap).collect();
    assert!(rows
        .iter()
        .any(|r| &r[0] == "total" && &r[1] == "foreign" && &r[2] == "5" && &r[4] == "0.90"));
    assert!(rows
        .iter()
        .any(|r| &r[0] == "total" && &r[1] == "*" && &r[5] == "2"));
    let j: serde_json::Value = serde_json::from_str(&at(8).1).unwrap();
    assert_eq!(j["zone"], "foreign");
    assert_eq!(j["total"]["zones"].as_array().unwrap().len(), 1);
    assert_eq!(j["total"]["zones"][0]["charged"], "0.90");
    refused(9, "month \"11/2026\": expected YYYY-MM");

    // Unbilled: kept per account, never dropped; written off by an operator, once.
    let u = &at(10).1;
    let uline = |acc: &str| -> Vec<&str> {
        u.lines()
            .find(|l| l.starts_with(acc))
            .unwrap()
            .split_whitespace()
            .collect()
    };
    assert_eq!(
        uline("ghost@example.org")[..3],
        ["ghost@example.org", "2", "3145728"]
    );
    assert_eq!(
        uline("stalwart:77"),
        [
            "stalwart:77",
            "1",
            "1048576",
            "2026-11-02",
            "11:00:00",
            "2026-11-02"
        ]
    );
    let j: serde_json::Value = serde_json::from_str(&at(11).1).unwrap();
    assert_eq!(j["total_accounts"], 2);
    assert_eq!(j["accounts"][0]["first_period"], "2026-11-03");
    assert_eq!(j["accounts"][0]["last_period"], "2026-11-04");
    okay(
        12,
        "wrote off 1 deliveries (1048576 bytes, oldest 2026-11-02 11:00:00) to stalwart:77 by \
         alice-admin: spam-trap",
    );
    refused(
        13,
        "no unbilled deliveries to account \"stalwart:77\" (see `mailbell billing unbilled`)",
    );
    refused(
        14,
        "reason: 1 to 500 bytes of text without control characters",
    );
    assert!(!at(15).1.contains("stalwart:77"), "{}", at(15).1);
    assert!(at(15).1.contains("ghost@example.org"), "{}", at(15).1);

    assert!(
        log.contains("alice-admin via admin-api")
            && log.contains("billing write-off: 1 deliveries, 1048576 bytes")
            && log.contains("spam-trap")
            && log.contains("unbilled:stalwart:77"),
        "{log}"
    );
    let log = ok(&local_config, &["log", "--limit", "50"]);
    assert!(
        log.contains("alice-admin via cli") && log.contains("spam-trap"),
        "{log}"
    );
    // The write-off is in the ledger too, with who and why.
    let raw = rusqlite::Connection::open(local.path().join("data/billing/ledger.sqlite")).unwrap();
    let (by, reason, n): (String, String, i64) = raw
        .query_row(
            "SELECT by, reason, deliveries FROM write_offs WHERE account = 'stalwart:77'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        (by.as_str(), reason.as_str(), n),
        ("alice-admin", "spam-trap", 1)
    );
    let e = fails(
        &local_config,
        &["billing", "write-off", "ghost@example.org"],
    );
    assert!(e.contains("--reason"), "{e}");
}

/// Import files: one without the ledger's columns (as before), one with them, one changing
/// an account's state and clearing a field, one with a bad value, and JSON.
fn import_commands(dir: &Path) -> Vec<Vec<String>> {
    let file = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };
    let old = file(
        "old.csv",
        "address,phone,state\nold@example.org,+8613800138000,normal\n",
    );
    let new = file(
        "new.csv",
        "address,state,staff_no,real_name,class,note\n\
         Alice@Example.org,normal,2026011234,张三,student,研究生\n\
         bob@example.org,arrears,,,,\n\
         old@example.org,,,,,\n",
    );
    let change = file(
        "change.csv",
        "address,state,note\nalice@example.org,arrears,-\n",
    );
    let bad = file(
        "bad.csv",
        "address,class,real_name\ncarol@example.org,post grad,\ndan@example.org,staff,李四\n",
    );
    let json = file(
        "users.json",
        r#"[{"address":"erin@example.org","class":"staff","real_name":"王五"},
            {"address":"fay@example.org","note":"x\u0001y"}]"#,
    );
    let mut cmds: Vec<Vec<String>> = vec![
        vec!["user", "import", &old],
        vec!["billing", "balance", "old@example.org"],
        vec!["user", "import", &new],
        vec!["billing", "balance", "alice@example.org"],
        vec!["user", "show", "bob@example.org"],
        vec!["billing", "balance", "bob@example.org"],
        vec!["user", "import", &change],
        vec!["billing", "balance", "alice@example.org"],
        vec!["user", "import", &bad],
        vec!["user", "show", "carol@example.org"],
        vec!["billing", "balance", "dan@example.org"],
        vec!["user", "import", &json],
        vec!["billing", "balance", "erin@example.org"],
        vec!["user", "export"],
        vec!["user", "export", "--format", "json"],
        vec!["user", "import", &new, "--dry-run"],
    ]
    .into_iter()
    .map(|c| c.into_iter().map(str::to_owned).collect())
    .collect();
    cmds.shrink_to_fit();
    cmds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_import_writes_the_ledger_fields_and_export_reads_them() {
    let files = tempfile::tempdir().unwrap();
    let local = tempfile::tempdir().unwrap();
    let local_config = local_config(local.path());
    let served = tempfile::tempdir().unwrap();
    let (running, served_config) = serve_admin(served.path(), TOKEN).await;
    let cmds = import_commands(files.path());
    let c = cmds.clone();
    let (without, through) = tokio::task::spawn_blocking(move || {
        (run_all(&local_config, &c), run_all(&served_config, &c))
    })
    .await
    .unwrap();
    running.stop().await;
    for ((c, w), t) in cmds.iter().zip(&without).zip(&through) {
        assert_eq!(
            w,
            t,
            "`mailbell {}` differs (left: without the daemon)",
            c.join(" ")
        );
    }
    let at = |i: usize| &without[i];
    let okay = |i: usize, text: &str| {
        assert!(
            at(i).0 && at(i).1.contains(text),
            "{i}: {text:?} in {:?}",
            at(i)
        )
    };
    let refused = |i: usize, text: &str| {
        assert!(
            !at(i).0 && at(i).2.contains(text),
            "{i}: {text:?} in {:?}",
            at(i)
        )
    };
    // A file without the ledger's columns imports as before and makes no ledger account.
    okay(0, "added 1, updated 0, skipped 0, failed 0, unchanged 0");
    assert!(!at(0).1.contains("ledger accounts"), "{:?}", at(0));
    refused(1, "unknown account \"old@example.org\"");
    // With them: alice's account is made; bob's line has only a state, old's nothing.
    okay(2, "added 2, updated 0, skipped 0, failed 0, unchanged 1");
    okay(2, "ledger accounts created or changed: 1");
    okay(3, "staff no       2026011234");
    okay(3, "real name      张三");
    okay(3, "class          student");
    okay(3, "status         normal");
    okay(3, "note           研究生");
    okay(4, "state          arrears");
    refused(5, "unknown account \"bob@example.org\"");
    // The state column moves the ledger's status with the registry's; "-" clears a field.
    okay(6, "ledger accounts created or changed: 1");
    okay(7, "status         arrears");
    okay(7, "note           \n");
    okay(7, "real name      张三");
    // A bad value names the line and the column; that line is not imported, the others are.
    refused(
        8,
        "line 2: invalid class \"post grad\": a tariff class is one word (no spaces)",
    );
    assert!(
        at(8).1.contains("added 1, updated 0, skipped 0, failed 1"),
        "{:?}",
        at(8)
    );
    refused(9, "carol@example.org");
    okay(10, "real name      李四");
    okay(10, "class          staff");
    // JSON: the same fields; a bad one names the field.
    refused(11, "invalid note");
    assert!(
        at(11).1.contains("added 1, updated 0, skipped 0, failed 1"),
        "{:?}",
        at(11)
    );
    okay(12, "real name      王五");
    // Export writes them: every field of an account, empty cells for users without one.
    let mut csv = csv::Reader::from_reader(at(13).1.as_bytes());
    let head: Vec<String> = csv.headers().unwrap().iter().map(str::to_owned).collect();
    assert_eq!(head[13..], ["staff_no", "real_name", "class", "note"]);
    let rows: Vec<csv::StringRecord> = csv.records().map(Result::unwrap).collect();
    let row = |a: &str| rows.iter().find(|r| &r[0] == a).unwrap().clone();
    assert_eq!(
        row("alice@example.org").iter().skip(13).collect::<Vec<_>>(),
        ["2026011234", "张三", "student", "-"]
    );
    assert_eq!(
        row("bob@example.org").iter().skip(13).collect::<Vec<_>>(),
        ["", "", "", ""]
    );
    let j: serde_json::Value = serde_json::from_str(&at(14).1).unwrap();
    let alice = j
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["address"] == "alice@example.org")
        .unwrap();
    assert_eq!(alice["staff_no"], "2026011234");
    assert_eq!(alice["class"], "student");
    let bob = j
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["address"] == "bob@example.org")
        .unwrap();
    assert!(bob.get("staff_no").is_none(), "{bob}");
    // A dry run writes nothing to the ledger either.
    okay(15, "dry run, nothing written");
    assert!(!at(15).1.contains("ledger accounts"), "{:?}", at(15));
}

fn error(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["error"].as_str().unwrap().to_owned()
}

/// Bad amounts and prices sent to the admin API as a client other than the CLI would: each
/// refused with 400 and a message naming the field, nothing posted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_bad_topups_and_tariffs_over_the_cap() {
    let served = tempfile::tempdir().unwrap();
    let (running, config) = serve_admin(served.path(), TOKEN).await;
    let addr = running.admin_addr.unwrap();
    let c = config.clone();
    tokio::task::spawn_blocking(move || ok(&c, &["billing", "account", "set", "a@example.org"]))
        .await
        .unwrap();
    let auth = format!("Bearer {TOKEN}");
    let send = |method: &'static str, path: &'static str, body: String| {
        let auth = auth.clone();
        async move {
            mailbell_link::http::request(
                addr,
                method,
                path,
                Some(&auth),
                Some(("application/json", body.as_bytes())),
                std::time::Duration::from_secs(10),
            )
            .await
            .unwrap()
        }
    };
    for (amount, msg) in [
        (r#""-5""#, "amount: \"-5\" must be above zero"),
        (r#""0""#, "amount: \"0\" must be above zero"),
        (r#""ten""#, "amount: \"ten\" is not an amount"),
        (r#""1e3""#, "amount: \"1e3\" is not an amount"),
        (r#""12.345""#, "more than 2 digits after the point"),
        ("12.5", "amount: invalid type"),
        ("null", "amount: invalid type"),
    ] {
        let r = send(
            "POST",
            "/admin/v1/billing/topup",
            format!(r#"{{"user":"a@example.org","amount":{amount},"key":"k1"}}"#),
        )
        .await;
        assert_eq!(r.status, 400, "{amount}: {}", r.body);
        assert!(error(&r.body).contains(msg), "{amount}: {}", r.body);
    }
    for (price, msg) in [
        (
            r#""3000""#,
            "tariff student/foreign: price 3000.00 per MB is above the cap 100.00 \
             (billing.max_price_per_mb)",
        ),
        (r#""100.01""#, "above the cap 100.00"),
        (r#""-0.01""#, "price_per_mb: \"-0.01\""),
        (r#""abc""#, "price_per_mb: \"abc\" is not an amount"),
    ] {
        let r = send(
            "PUT",
            "/admin/v1/billing/tariffs",
            format!(r#"{{"class":"student","zone":"foreign","price_per_mb":{price}}}"#),
        )
        .await;
        assert_eq!(r.status, 400, "{price}: {}", r.body);
        assert!(error(&r.body).contains(msg), "{price}: {}", r.body);
    }
    // At the cap is allowed; the refused ones left nothing behind.
    let r = send(
        "PUT",
        "/admin/v1/billing/tariffs",
        r#"{"class":"student","zone":"foreign","price_per_mb":"100"}"#.to_owned(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let report = running.stores.ledger.call(|s| s.verify()).await.unwrap();
    assert_eq!(report.entries, 0);
    let tariffs = running.stores.ledger.call(|s| s.tariffs()).await.unwrap();
    assert_eq!(tariffs.len(), 1);
    running.stop().await;
}

/// A write-off that cannot be audited is not made; an import whose ledger cannot be opened
/// says so, naming the file (the registry's part is in, as documented).
#[test]
fn failures_name_what_failed_and_write_off_nothing_unaudited() {
    let dir = tempfile::tempdir().unwrap();
    build_ledger(&dir.path().join("data"));
    let config = local_config(dir.path());
    // The audit log's directory is a file: the audit log cannot open.
    std::fs::write(dir.path().join("data/audit"), "not a directory").unwrap();
    let e = fails(
        &config,
        &[
            "billing",
            "write-off",
            "stalwart:77",
            "--reason",
            "spam",
            "--by",
            "op",
        ],
    );
    assert!(e.contains("audit"), "{e}");
    let u = ok(&config, &["billing", "unbilled"]);
    assert!(u.contains("stalwart:77"), "{u}");

    let other = tempfile::tempdir().unwrap();
    let config = local_config(other.path());
    // The ledger's file is a directory.
    std::fs::create_dir_all(other.path().join("data/billing/ledger.sqlite")).unwrap();
    let file = other.path().join("users.csv");
    std::fs::write(&file, "address,class\nzed@example.org,staff\n").unwrap();
    let e = fails(&config, &["user", "import", file.to_str().unwrap()]);
    assert!(e.contains("ledger.sqlite"), "{e}");
    let shown = ok(&config, &["user", "show", "zed@example.org"]);
    assert!(shown.contains("zed@example.org"), "{shown}");
}
