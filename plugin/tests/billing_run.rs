//! `mailbell billing run` as an operator runs it: through the daemon (states reach the
//! registry the proxy enforces, a top-up restores at once), without it (retrievals from the
//! meter store charge the pending traffic; a finished day is not run twice; a second run at
//! the same time refuses), and killed with SIGKILL at random points, then resumed: the
//! ledger ends equal in content to one from a run that never stopped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use mailbell::billing::ledger::sqlite::SqliteLedger;
use mailbell::billing::ledger::{Delivery, LedgerStore, Tariff, UserAccount};
use mailbell::billing::money::Money;
use mailbell::billing::run::Period;
use mailbell::meter::{new_session_id, Entry, Login, MeterConfig, MeterStore, Protocol, Session};
use mailbell::policy::zones::Zone;
use mailbell::users::access::AccountState;
use mailbell::users::{User, UserStore};
use support::cli::{fails, ok, serve_admin, BIN};

const TOKEN: &str = "billing-run-test-token-0123456789";
const MB: u64 = 1 << 20;
const HOUR: i64 = 3_600_000;
const DAY: &str = "2026-11-02";

/// A registry user with a phone number.
fn user(address: &str, n: usize) -> User {
    let mut u = User::new(address);
    u.phone = format!("+86138{:08}", n);
    u
}

fn period() -> Period {
    Period::day(NaiveDate::parse_from_str(DAY, "%Y-%m-%d").unwrap()).unwrap()
}

fn local_config(dir: &Path) -> PathBuf {
    let config = dir.join("mailbell.toml");
    std::fs::write(
        &config,
        format!(
            "[mailbell]\ndata_dir = {:?}\n[listen]\nadmin = \"\"\n[billing]\nwarn_below = [\"5.00\"]\n",
            dir.join("data")
        ),
    )
    .unwrap();
    config
}

fn delivery(n: usize, account: &str, zone: Zone, bytes: u64, at_ms: i64) -> Delivery {
    Delivery {
        message_key: format!("milter:Q{n}"),
        account: account.into(),
        zone: Some(zone),
        bytes,
        at_ms,
    }
}

fn session(account: &str, at_ms: i64) -> Entry {
    Entry::Session(Session {
        session: new_session_id(),
        account: Some(account.into()),
        client: "203.0.113.9:51000".parse().unwrap(),
        protocol: Protocol::Imap,
        listener: "imap".into(),
        tls: true,
        start_ms: at_ms,
        end_ms: at_ms + 2_000,
        login: Login::Ok,
        bytes_to_client: 10,
        bytes_to_backend: 10,
        messages: 1,
        message_bytes: MB,
        end: "logout".into(),
        retrieved: Vec::new(),
    })
}

/// Retrieval meter records written as the proxy writes them, with their write time.
fn meter_sessions(data: &Path, sessions: &[(String, i64)]) {
    let clock = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let c = clock.clone();
    let m = MeterStore::open_with_clock(
        &data.join("meter"),
        MeterConfig::default(),
        Arc::new(move || c.load(std::sync::atomic::Ordering::SeqCst)),
    )
    .unwrap();
    for (who, at) in sessions {
        clock.store(at + 2_000, std::sync::atomic::Ordering::SeqCst);
        m.append(vec![session(who, *at)]).unwrap();
    }
    m.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_daemon_arrears_reach_the_registry_and_a_topup_restores_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (running, config) = serve_admin(dir.path(), TOKEN).await;
    running
        .stores
        .users
        .insert(user("alice@example.org", 1))
        .unwrap();
    let cfg = config.clone();
    let p = period();
    tokio::task::spawn_blocking(move || {
        ok(
            &cfg,
            &[
                "billing",
                "account",
                "set",
                "alice@example.org",
                "--class",
                "student",
            ],
        );
        ok(
            &cfg,
            &["billing", "tariff", "set", "student", "foreign", "0.30"],
        );
        ok(&cfg, &["billing", "tariff", "set", "student", "free", "0"]);
        ok(
            &cfg,
            &[
                "billing",
                "topup",
                "alice@example.org",
                "1.00",
                "--key",
                "k1",
            ],
        );
    })
    .await
    .unwrap();
    // 10 MB foreign (3.00, pending: never retrieved) and 10 MB free on the day.
    running
        .stores
        .ledger
        .call(move |s| {
            s.record_deliveries(&[
                delivery(
                    1,
                    "alice@example.org",
                    Zone::Foreign,
                    10 * MB,
                    p.start_ms + HOUR,
                ),
                delivery(
                    2,
                    "alice@example.org",
                    Zone::Free,
                    10 * MB,
                    p.start_ms + HOUR,
                ),
            ])
        })
        .await
        .unwrap();
    let cfg = config.clone();
    let out = tokio::task::spawn_blocking(move || ok(&cfg, &["billing", "run", "--date", DAY]))
        .await
        .unwrap();
    assert!(out.contains("2 deliveries"), "{out}");
    assert!(out.contains("1 pending (3.00)"), "{out}");
    assert!(out.contains("1 state changes"), "{out}");
    let state = |r: &mailbell::app::Running| {
        r.stores
            .users
            .get("alice@example.org")
            .unwrap()
            .unwrap()
            .state
    };
    assert_eq!(
        state(&running),
        AccountState::Arrears,
        "the proxy now shows only the notice"
    );
    let cfg = config.clone();
    let again = tokio::task::spawn_blocking(move || ok(&cfg, &["billing", "run", "--date", DAY]))
        .await
        .unwrap();
    assert!(
        again.contains("accounted before: nothing changed"),
        "{again}"
    );
    // 1.00 + 1.50 = 2.50 < 3.00: still arrears; + 1.00 more: normal at once.
    let cfg = config.clone();
    tokio::task::spawn_blocking(move || {
        ok(
            &cfg,
            &[
                "billing",
                "topup",
                "alice@example.org",
                "1.50",
                "--key",
                "k2",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(state(&running), AccountState::Arrears);
    let cfg = config.clone();
    tokio::task::spawn_blocking(move || {
        ok(
            &cfg,
            &[
                "billing",
                "topup",
                "alice@example.org",
                "1.00",
                "--key",
                "k3",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(
        state(&running),
        AccountState::Normal,
        "restored by the top-up, not at night"
    );
    let cfg = config.clone();
    let e = tokio::task::spawn_blocking(move || {
        fails(&cfg, &["billing", "run", "--date", "2999-01-01"])
    })
    .await
    .unwrap();
    assert!(e.contains("has not ended yet"), "{e}");
    let cfg = config.clone();
    let e = tokio::task::spawn_blocking(move || {
        fails(&cfg, &["billing", "run", "--date", "2026-13-01"])
    })
    .await
    .unwrap();
    assert!(e.contains("is not a date"), "{e}");
    running.stop().await;
}

/// Users, tariffs, a day of deliveries and retrievals written into `data` through the
/// library, as the daemon writes them.
fn seed(data: &Path, users: usize, per_user: usize) {
    let p = period();
    let mut l = SqliteLedger::open(&data.join("billing").join("ledger.sqlite")).unwrap();
    let registry = UserStore::open(&data.join("users")).unwrap();
    let accounts: Vec<UserAccount> = (0..users)
        .map(|i| UserAccount {
            login: format!("u{i:06}@example.org"),
            class: "student".into(),
            ..UserAccount::default()
        })
        .collect();
    for (i, a) in accounts.iter().enumerate().take(50) {
        registry.insert(user(&a.login, i)).unwrap();
    }
    drop(registry);
    l.put_users(&accounts).unwrap();
    for (zone, price) in [("free", 0), ("foreign", 30)] {
        l.put_tariff(&Tariff {
            class: "student".into(),
            zone: zone.into(),
            price_per_mb: Money::from_minor(price),
            min_charge: Money::from_minor(0),
        })
        .unwrap();
    }
    let mut n = 0;
    let mut batch = Vec::new();
    let mut sessions = Vec::new();
    for (i, a) in accounts.iter().enumerate() {
        for k in 0..per_user {
            n += 1;
            let zone = if k % 3 == 0 {
                Zone::Free
            } else {
                Zone::Foreign
            };
            let at = p.start_ms + (k as i64 * 20 + i as i64 % 17) * 60_000;
            batch.push(delivery(n, &a.login, zone, (k as u64 + 1) * 100_000, at));
            if batch.len() == 1_000 {
                l.record_deliveries(&batch).unwrap();
                batch.clear();
            }
        }
        // One retrieval in the middle of the day: half the traffic stays pending.
        sessions.push((
            a.login.clone(),
            p.start_ms + (per_user as i64 * 10) * 60_000,
        ));
    }
    l.record_deliveries(&batch).unwrap();
    l.record_deliveries(&[delivery(
        n + 1,
        "stranger@example.org",
        Zone::Foreign,
        MB,
        p.start_ms + HOUR,
    )])
    .unwrap();
    drop(l);
    sessions.sort_by_key(|s| s.1);
    meter_sessions(data, &sessions);
}

/// The ledger's content as text (ids, keys, amounts, hashes, balances, charges, standings,
/// effects), without the run's own wall-clock times.
fn dump(data: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(data.join("billing").join("ledger.sqlite")).unwrap();
    let mut out = Vec::new();
    for q in [
        "SELECT id, key, kind, phase, debit, credit, amount, pending_id, at_ms, memo, hex(prev_hash) || hex(hash) FROM entries ORDER BY id",
        "SELECT id, kind, name, debits_posted, credits_posted, debits_pending, credits_pending, '', '', '', '' FROM accounts ORDER BY id",
        "SELECT key, period, login, zone, bytes, amount, meter_id, entry_id, at_ms, '', '' FROM charges ORDER BY key",
        "SELECT login, status, staff_no, real_name, class, note, '', '', '', '', '' FROM users ORDER BY login",
        "SELECT id, period, login, kind, status, balance, threshold, '', '', '', '' FROM effects ORDER BY id",
        "SELECT meter_id, period, login, at_ms, client, protocol, messages, bytes, '', '', '' FROM retrievals ORDER BY meter_id",
        "SELECT delivery_id, period, account, zone, bytes, at_ms, '', '', '', '', '' FROM unbilled ORDER BY delivery_id",
        "SELECT name, value, '', '', '', '', '', '', '', '', '' FROM cursors ORDER BY name",
        "SELECT login, warned_below, '', '', '', '', '', '', '', '', '' FROM warnings ORDER BY login",
    ] {
        let mut s = conn.prepare(q).unwrap();
        let mut rows = s.query([]).unwrap();
        while let Some(r) = rows.next().unwrap() {
            let cols: Vec<String> = (0..11).map(|i| format!("{:?}", r.get_ref(i).unwrap())).collect();
            out.push(cols.join("|"));
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

#[test]
fn without_the_daemon_retrievals_charge_and_a_second_run_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let config = local_config(dir.path());
    let data = dir.path().join("data");
    seed(&data, 3, 4);
    let json = ok(&config, &["billing", "run", "--date", DAY, "--json"]);
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    let s = &r["summary"];
    assert_eq!(s["deliveries"], 13, "{json}");
    assert_eq!(s["retrievals"], 3, "{json}");
    assert_eq!(s["unbilled"], 1, "{json}");
    // Per user: 100,000 / 200,000 / 300,000 / 400,000 bytes (free, foreign, foreign, free)
    // at 0, 20, 40, 60 minutes (+ the user's index); the retrieval at 40 minutes takes the
    // first two: one foreign charge of round(200,000 × 0.30 / 1,048,576) = 0.06 each; the
    // rest stays pending.
    assert_eq!(s["charges"], 3, "{json}");
    assert_eq!(s["charged"], "0.18", "{json}");
    assert_eq!(s["pending"], 3, "{json}");
    assert_eq!(s["already"], false);
    let again = ok(&config, &["billing", "run", "--date", DAY]);
    assert!(again.contains("accounted before"), "{again}");
    // Plain log lines off a terminal, no colour codes.
    let o = run_command(&config, "2026-11-03")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("accounting run stage"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "no colour codes off a terminal: {err}"
    );
    // Two runs at once: the second refuses and names the first.
    let _held = mailbell::billing::run::RunLock::acquire(
        &data.join("billing").join("ledger.sqlite"),
        "2026-11-04",
        0,
    )
    .unwrap();
    let e = fails(&config, &["billing", "run", "--date", "2026-11-04"]);
    assert!(e.contains("another accounting run is in progress"), "{e}");
    assert!(e.contains("period 2026-11-04"), "{e}");
    assert!(ok(&config, &["billing", "verify"]).contains("ledger ok"));
}

/// The day's data seeded into `dir/clean` and copied to `dir/<name>`; the clean copy is
/// run to the end (the reference), and how long that took is returned.
fn reference_and_copy(dir: &Path, name: &str) -> (PathBuf, PathBuf, Duration) {
    let clean = dir.join("clean");
    let copy = dir.join(name);
    std::fs::create_dir_all(&clean).unwrap();
    seed(&clean.join("data"), 4_000, 30);
    copy_dir(&clean, &copy);
    let t = std::time::Instant::now();
    ok(&local_config(&clean), &["billing", "run", "--date", DAY]);
    (clean, copy, t.elapsed())
}

/// `mailbell --config CONFIG billing run --date DATE`, not started yet.
fn run_command(config: &Path, date: &str) -> std::process::Command {
    let mut c = std::process::Command::new(BIN);
    c.arg("--config")
        .arg(config)
        .args(["billing", "run", "--date", date]);
    c
}

/// `mailbell billing run --date DAY` started in the background; its output piped or dropped.
fn spawn_run(config: &Path, piped: bool) -> std::process::Child {
    let out = || {
        if piped {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        }
    };
    run_command(config, DAY)
        .env("RUST_LOG", "warn")
        .stdout(out())
        .stderr(out())
        .spawn()
        .unwrap()
}

/// SIGKILL at random points of a run, then the run again: the same ledger as a run that
/// never stopped, and verify passes.
#[test]
fn a_run_killed_at_random_points_resumes_to_the_same_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let (clean, killed, full) = reference_and_copy(dir.path(), "killed");
    let killed_cfg = local_config(&killed);
    let mut kills = 0;
    // Random points between 15 % and 75 % of a whole run (process start included).
    let mut x = u64::from(std::process::id()).wrapping_mul(2_654_435_761) | 1;
    for _ in 0..4 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let frac = 0.15 + 0.6 * ((x % 10_000) as f64 / 10_000.0);
        let at = u64::try_from((full.as_secs_f64() * frac * 1000.0) as i64).unwrap_or(0);
        let mut child = spawn_run(&killed_cfg, false);
        std::thread::sleep(Duration::from_millis(at));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        eprintln!("killed at {at} ms of a {full:?} run");
    }
    let out = ok(&killed_cfg, &["billing", "run", "--date", DAY]);
    eprintln!("{out}");
    assert!(kills > 0, "no run was killed: the run took {full:?}");
    assert_eq!(dump(&killed.join("data")), dump(&clean.join("data")));
    assert!(ok(&killed_cfg, &["billing", "verify"]).contains("ledger ok"));
}

/// A top-up sent (and retried with its key) while a run is posting is applied exactly once,
/// and the account it paid for is judged with it: normal, while the others are in arrears.
#[test]
fn a_topup_racing_a_run_is_applied_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    // How long a run takes here, to send the top-up while the run is posting.
    let (_, raced, full) = reference_and_copy(dir.path(), "raced");
    let config = local_config(&raced);
    let data = raced.join("data");
    let run = spawn_run(&config, true);
    std::thread::sleep(full.mul_f64(0.4));
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(ok(
            &config,
            &[
                "billing",
                "topup",
                "u000001@example.org",
                "100",
                "--key",
                "race",
            ],
        ));
    }
    let out = run.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!answers[0].starts_with("replayed"), "{answers:?}");
    assert!(
        answers[1..].iter().all(|a| a.starts_with("replayed")),
        "{answers:?}"
    );
    let conn = rusqlite::Connection::open(data.join("billing").join("ledger.sqlite")).unwrap();
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM entries WHERE key = 'race'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(n, 1);
    let around: (i64, i64) = conn
        .query_row(
            "SELECT (SELECT COUNT(*) FROM entries WHERE kind = 'charge' AND id < r.id), \
             (SELECT COUNT(*) FROM entries WHERE kind = 'charge' AND id > r.id) \
             FROM entries r WHERE r.key = 'race'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    eprintln!(
        "the run posted {} charges before the top-up and {} after it",
        around.0, around.1
    );
    let status = |login: &str| -> String {
        conn.query_row("SELECT status FROM users WHERE login = ?1", [login], |r| {
            r.get(0)
        })
        .unwrap()
    };
    // Judged with the top-up, whichever came first (the run's last transaction, or the
    // top-up's own restore after it).
    assert_eq!(status("u000001@example.org"), "normal");
    assert_eq!(status("u000002@example.org"), "arrears");
    assert!(ok(&config, &["billing", "verify"]).contains("ledger ok"));
}
