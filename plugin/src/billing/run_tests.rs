//! The accounting run against a real SQLite ledger and a real meter store.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::NaiveDate;

use super::ledger::sqlite::SqliteLedger;
use super::ledger::{AccountRef, Delivery, EffectKind, LedgerStore, Status, Tariff, UserAccount};
use super::money::Money;
use super::run::{self, ChargeAt, Expiry, Period, Quiet, RunContext, RunError, RunSettings};
use super::tariff::BYTES_PER_MB;
use crate::billing::ledger::StandingRules;
use crate::meter::{new_session_id, Entry, Login, MeterConfig, MeterStore, Protocol, Session};
use crate::policy::zones::Zone;

const MB: u64 = BYTES_PER_MB;
const HOUR: i64 = 3_600_000;

fn m(minor: i64) -> Money {
    Money::from_minor(minor)
}

fn day(d: u32) -> Period {
    Period::day(NaiveDate::from_ymd_opt(2026, 11, d).unwrap()).unwrap()
}

fn settings() -> RunSettings {
    RunSettings {
        charge: ChargeAt::AtRetrieval,
        pending_expiry_days: 3,
        expired_pending: Expiry::Void,
        rules: StandingRules {
            arrears_below: m(0),
            warn_below: vec![m(1_000), m(200)],
        },
        batch: 2,
    }
}

struct World {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    ledger: SqliteLedger,
    meter: MeterStore,
    clock: Arc<AtomicI64>,
    seq: u32,
}

impl World {
    fn new() -> World {
        Self::new_with(|_| {})
    }

    /// A world whose ledger file `before` prepared (an older schema) before it is opened.
    fn new_with(before: impl FnOnce(&std::path::Path)) -> World {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("billing").join("ledger.sqlite");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        before(&path);
        let mut ledger = SqliteLedger::open(&path).unwrap();
        for login in ["a@x.example", "b@x.example"] {
            ledger
                .put_user(&UserAccount {
                    login: login.into(),
                    class: "student".into(),
                    ..UserAccount::default()
                })
                .unwrap();
        }
        for (zone, price) in [("free", 0), ("foreign", 30)] {
            ledger
                .put_tariff(&Tariff {
                    class: "student".into(),
                    zone: zone.into(),
                    price_per_mb: m(price),
                    min_charge: m(0),
                })
                .unwrap();
        }
        let clock = Arc::new(AtomicI64::new(0));
        let c = clock.clone();
        let meter = MeterStore::open_with_clock(
            &dir.path().join("meter"),
            MeterConfig::default(),
            Arc::new(move || c.load(Ordering::SeqCst)),
        )
        .unwrap();
        World {
            path,
            _dir: dir,
            ledger,
            meter,
            clock,
            seq: 0,
        }
    }

    fn topup(&mut self, login: &str, amount: i64) {
        super::topup(
            &mut self.ledger,
            login,
            m(amount),
            &format!("t-{login}-{amount}"),
            "",
            1,
        )
        .unwrap();
    }

    fn deliver(&mut self, account: &str, zone: Zone, bytes: u64, at_ms: i64) {
        self.seq += 1;
        self.ledger
            .record_deliveries(&[Delivery {
                message_key: format!("milter:Q{}", self.seq),
                account: account.into(),
                zone: Some(zone),
                bytes,
                at_ms,
            }])
            .unwrap();
    }

    /// A successful POP3 login of `account` at `at_ms` (written when it ended, 1 s later).
    fn retrieve(&mut self, account: &str, at_ms: i64) {
        self.clock.store(at_ms + 1_000, Ordering::SeqCst);
        self.meter
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
                message_bytes: 3 * MB,
                end: "quit".into(),
                retrieved: Vec::new(),
            })])
            .unwrap();
        self.meter.flush().unwrap();
    }

    fn run(&mut self, p: &Period) -> Result<run::RunSummary, RunError> {
        self.run_with(p, &settings(), &|| 1_900_000_000_000)
    }

    fn run_with(
        &mut self,
        p: &Period,
        s: &RunSettings,
        now: &dyn Fn() -> i64,
    ) -> Result<run::RunSummary, RunError> {
        run::run(
            &mut RunContext {
                store: &mut self.ledger,
                meter: Some(&self.meter),
                resolve: &|_| None,
                settings: s,
                progress: &Quiet,
                now_ms: now,
            },
            p,
        )
    }

    fn available(&self, login: &str) -> Money {
        self.ledger
            .balance(&AccountRef::User(login.into()))
            .unwrap()
            .unwrap()
            .available()
            .unwrap()
    }

    fn posted(&self, login: &str) -> Money {
        self.ledger
            .balance(&AccountRef::User(login.into()))
            .unwrap()
            .unwrap()
            .posted()
            .unwrap()
    }

    /// Every entry, as text: two ledgers with the same dump have the same content.
    fn dump(&self) -> Vec<String> {
        let conn = rusqlite::Connection::open(&self.path).unwrap();
        let mut out = Vec::new();
        for q in [
            "SELECT id, key, kind, phase, debit, credit, amount, pending_id, at_ms, memo, \
             hex(prev_hash), hex(hash) FROM entries ORDER BY id",
            "SELECT id, kind, name, debits_posted, credits_posted, debits_pending, \
             credits_pending, '', '', '', '', '' FROM accounts ORDER BY id",
            "SELECT key, period, login, zone, bytes, amount, meter_id, entry_id, at_ms, '', '', '' \
             FROM charges ORDER BY key",
            "SELECT login, status, '', '', '', '', '', '', '', '', '', '' FROM users ORDER BY login",
        ] {
            let mut s = conn.prepare(q).unwrap();
            let mut rows = s.query([]).unwrap();
            while let Some(r) = rows.next().unwrap() {
                let cols: Vec<String> = (0..12)
                    .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                    .collect();
                out.push(cols.join("|"));
            }
        }
        out
    }
}

/// The seed's model: traffic is charged at the next retrieval; what is not retrieved by the
/// end of the day stays pending and is posted at the next retrieval.
#[test]
fn delivered_traffic_is_charged_at_the_next_retrieval() {
    let mut w = World::new();
    let d1 = day(1);
    let d2 = day(2);
    w.topup("a@x.example", 10_000);
    w.deliver("a@x.example", Zone::Foreign, 2 * MB, d1.start_ms + HOUR);
    w.deliver("a@x.example", Zone::Free, 5 * MB, d1.start_ms + HOUR);
    w.retrieve("a@x.example", d1.start_ms + 2 * HOUR);
    w.deliver("a@x.example", Zone::Foreign, 3 * MB, d1.start_ms + 3 * HOUR);
    let s = w.run(&d1).unwrap();
    assert_eq!(s.deliveries, 3);
    assert_eq!(s.retrievals, 1);
    assert_eq!(s.charges, 1, "{s:?}");
    assert_eq!(s.charged, m(60));
    assert_eq!(s.pending, 1);
    assert_eq!(s.pending_amount, m(90));
    assert_eq!(w.posted("a@x.example"), m(10_000 - 60));
    assert_eq!(w.available("a@x.example"), m(10_000 - 150));

    // The next day's retrieval posts the pending 0.90, with that retrieval's time.
    w.retrieve("a@x.example", d2.start_ms + HOUR);
    let s = w.run(&d2).unwrap();
    assert_eq!((s.pending_posted, s.charged), (1, m(90)), "{s:?}");
    assert_eq!(w.posted("a@x.example"), m(10_000 - 150));
    assert_eq!(w.available("a@x.example"), m(10_000 - 150));

    // The statement rows: both retrievals, with client address and the bytes per zone.
    let (rets, charges) = w
        .ledger
        .statement_rows("a@x.example", d1.start_ms, d2.end_ms)
        .unwrap();
    assert_eq!(rets.len(), 2);
    assert_eq!(rets[0].client, "198.51.100.7");
    let at_first: Vec<_> = charges
        .iter()
        .filter(|c| c.meter_id == Some(rets[0].meter_id))
        .map(|c| (c.zone.as_str(), c.bytes, c.amount))
        .collect();
    assert_eq!(
        at_first,
        vec![("foreign", 2 * MB, m(60)), ("free", 5 * MB, m(0))]
    );
    let at_second: Vec<_> = charges
        .iter()
        .filter(|c| c.meter_id == Some(rets[1].meter_id))
        .map(|c| (c.zone.as_str(), c.bytes, c.amount))
        .collect();
    assert_eq!(at_second, vec![("foreign", 3 * MB, m(90))]);
    let v = w.ledger.verify().unwrap();
    assert!(v.problem.is_none(), "{v:?}");
}

#[test]
fn a_period_runs_once_and_not_before_it_ends() {
    let mut w = World::new();
    let d1 = day(1);
    w.topup("a@x.example", 10_000);
    w.deliver("a@x.example", Zone::Foreign, MB, d1.start_ms + HOUR);
    w.retrieve("a@x.example", d1.start_ms + 2 * HOUR);
    // A zone remembered at SMTP time long ago is forgotten by the run; a recent one stays.
    w.ledger
        .remember_source("stalwart:1", Zone::Free, d1.end_ms - 40 * 86_400_000)
        .unwrap();
    w.ledger
        .remember_source("stalwart:2", Zone::Free, d1.end_ms - HOUR)
        .unwrap();
    let first = w.run(&d1).unwrap();
    let conn = rusqlite::Connection::open(&w.path).unwrap();
    let kept: Vec<String> = column(&conn, "SELECT message_key FROM delivery_sources");
    assert_eq!(kept, ["stalwart:2"]);
    let before = w.dump();
    let again = w.run(&d1).unwrap();
    assert!(again.already && !first.already);
    assert_eq!(again.charged, first.charged);
    assert_eq!(w.dump(), before, "a rerun changes nothing");
    let e = w
        .run_with(&day(3), &settings(), &|| day(3).end_ms - 1)
        .unwrap_err();
    assert!(matches!(e, RunError::NotEnded { .. }), "{e}");
    assert!(e.to_string().contains("2026-11-03"), "{e}");
}

/// Deliveries after the period's end are the next run's, and a delivery to an account the
/// ledger does not know is kept (unbilled) until the account exists, then charged once.
#[test]
fn unknown_accounts_are_kept_then_charged_once_the_account_exists() {
    let mut w = World::new();
    let (d1, d2, d3) = (day(1), day(2), day(3));
    w.deliver("new@x.example", Zone::Foreign, 10 * MB, d1.start_ms + HOUR);
    w.deliver("gone@x.example", Zone::Foreign, MB, d1.start_ms + HOUR);
    w.deliver("a@x.example", Zone::Foreign, MB, d2.start_ms + HOUR);
    let s = w.run(&d1).unwrap();
    assert_eq!((s.deliveries, s.unbilled), (2, 2), "{s:?}");
    assert_eq!(w.ledger.unbilled(None).unwrap().len(), 2);
    // A second run of the day before does not take day 2's delivery either.
    w.ledger
        .put_user(&UserAccount {
            login: "new@x.example".into(),
            class: "student".into(),
            ..UserAccount::default()
        })
        .unwrap();
    w.retrieve("new@x.example", d2.start_ms + 2 * HOUR);
    let s = w.run(&d2).unwrap();
    assert_eq!(
        (s.deliveries, s.unbilled_billed, s.charged),
        (1, 1, m(300)),
        "{s:?}"
    );
    assert_eq!(w.posted("new@x.example"), m(-300));
    let left = w.ledger.unbilled(None).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].account, "gone@x.example");
    assert_eq!(w.ledger.write_off("gone@x.example", "ops", 5).unwrap(), 1);
    let s = w.run(&d3).unwrap();
    assert_eq!(s.unbilled_billed, 0);
    assert!(w.ledger.unbilled(None).unwrap().is_empty());
}

#[test]
fn arrears_warnings_and_a_topup_that_restores_at_once() {
    let mut w = World::new();
    let (d1, d2, d3) = (day(1), day(2), day(3));
    let rules = settings().rules;
    w.topup("a@x.example", 1_500);
    w.topup("b@x.example", 5_000);
    // 20 MB foreign = 6.00: 15.00 -> 9.00, below the 10.00 warning.
    w.deliver("a@x.example", Zone::Foreign, 20 * MB, d1.start_ms + HOUR);
    w.retrieve("a@x.example", d1.start_ms + 2 * HOUR);
    w.run(&d1).unwrap();
    let e = w.ledger.open_effects(10).unwrap();
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(
        (e[0].kind, e[0].threshold, e[0].balance),
        (EffectKind::Warning, m(1_000), m(900))
    );
    w.ledger.effects_done(&[e[0].id], 7).unwrap();
    // 40 MB more = 12.00: 9.00 -> -3.00: arrears (state + SMS), no second warning.
    w.deliver("a@x.example", Zone::Foreign, 40 * MB, d2.start_ms + HOUR);
    w.retrieve("a@x.example", d2.start_ms + 2 * HOUR);
    w.run(&d2).unwrap();
    let e = w.ledger.open_effects(10).unwrap();
    let kinds: Vec<_> = e.iter().map(|e| (e.kind, e.status, e.balance)).collect();
    assert_eq!(
        kinds,
        vec![
            (EffectKind::State, Status::Arrears, m(-300)),
            (EffectKind::Arrears, Status::Arrears, m(-300)),
        ]
    );
    assert_eq!(
        w.ledger.user("a@x.example").unwrap().unwrap().status,
        Status::Arrears
    );
    w.ledger
        .effects_done(&e.iter().map(|e| e.id).collect::<Vec<_>>(), 8)
        .unwrap();
    // A top-up that leaves the balance below the threshold changes nothing...
    w.topup("a@x.example", 100);
    assert!(!w
        .ledger
        .restore_if_paid("a@x.example", &rules, "topup", 9)
        .unwrap());
    // ... one that restores it makes the account normal at once.
    w.topup("a@x.example", 5_000);
    assert!(w
        .ledger
        .restore_if_paid("a@x.example", &rules, "topup", 9)
        .unwrap());
    assert_eq!(
        w.ledger.user("a@x.example").unwrap().unwrap().status,
        Status::Normal
    );
    let e = w.ledger.open_effects(10).unwrap();
    assert_eq!(e.len(), 1);
    assert_eq!(
        (e[0].kind, e[0].status),
        (EffectKind::State, Status::Normal)
    );
    // Back above every threshold: the next fall warns again.
    w.ledger.effects_done(&[e[0].id], 9).unwrap();
    w.deliver("a@x.example", Zone::Foreign, 160 * MB, d3.start_ms + HOUR);
    w.retrieve("a@x.example", d3.start_ms + 2 * HOUR);
    w.run(&d3).unwrap();
    let e = w.ledger.open_effects(10).unwrap();
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!((e[0].kind, e[0].threshold), (EffectKind::Warning, m(200)));
    // Unwelcome is the operator's: the run never touches it.
    let mut u = w.ledger.user("b@x.example").unwrap().unwrap();
    u.status = Status::Unwelcome;
    w.ledger.put_user(&u).unwrap();
    assert_eq!(
        w.ledger.user("b@x.example").unwrap().unwrap().status,
        Status::Unwelcome
    );
}

#[test]
fn pending_traffic_never_retrieved_expires() {
    let mut w = World::new();
    w.deliver(
        "a@x.example",
        Zone::Foreign,
        10 * MB,
        day(1).start_ms + HOUR,
    );
    w.run(&day(1)).unwrap();
    assert_eq!(w.available("a@x.example"), m(-300));
    // Three days later it is not yet expired, on the fourth it is voided.
    for d in 2..=3 {
        assert_eq!(w.run(&day(d)).unwrap().expired, 0);
    }
    let s = w.run(&day(4)).unwrap();
    assert_eq!(s.expired, 1, "{s:?}");
    assert_eq!(w.available("a@x.example"), m(0));
    assert_eq!(w.posted("a@x.example"), m(0));
    // Configured to charge instead:
    w.deliver(
        "b@x.example",
        Zone::Foreign,
        10 * MB,
        day(5).start_ms + HOUR,
    );
    let charge = RunSettings {
        expired_pending: Expiry::Charge,
        ..settings()
    };
    for d in 5..=9 {
        w.run_with(&day(d), &charge, &|| 1_900_000_000_000).unwrap();
    }
    assert_eq!(w.posted("b@x.example"), m(-300));
    assert!(w.ledger.verify().unwrap().problem.is_none());
}

/// A run that stops in the middle (here: the store fails after some batches; the process
/// test kills it with SIGKILL) is resumed by the next run of the period, and the ledger ends
/// equal, in content, to one from a run that never stopped. The wall clock running
/// backwards during the run changes nothing either.
#[test]
fn a_run_that_stopped_resumes_to_the_same_ledger() {
    let build = || {
        let mut w = World::new();
        let d0 = day(1);
        for (i, u) in ["a@x.example", "b@x.example"].iter().enumerate() {
            w.topup(u, 2_000);
            for k in 0..40 {
                let at = d0.start_ms + 10 * 60_000 * (k as i64 + 1);
                w.deliver(u, Zone::Foreign, (k + 1) * MB, at);
                w.retrieve(u, at + 60_000 + i as i64);
            }
            w.deliver(u, Zone::Foreign, 7 * MB, d0.end_ms - HOUR);
        }
        w
    };
    let mut clean = build();
    let clean_entries = clean.run(&day(1)).unwrap().new_entries;
    clean.run(&day(2)).unwrap();

    let mut w = build();
    // The ledger file may grow only a little: the run fails part-way with "database or
    // disk is full", as on a full disk.
    let pages: i64 = w.ledger.pragma_i64("page_count");
    w.ledger.limit_pages(pages + 1);
    let e = w.run(&day(1)).unwrap_err();
    let mut text = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        text = format!("{text}: {s}");
        src = s.source();
    }
    assert!(text.contains("database or disk is full"), "{text}");
    assert!(
        w.ledger.verify().unwrap().problem.is_none(),
        "the ledger is intact"
    );
    w.ledger.limit_pages(1 << 30);
    // Resumed with a clock that runs backwards on every reading.
    let t = AtomicI64::new(1_900_000_000_000);
    let back = || t.fetch_sub(3_600_000, Ordering::SeqCst);
    let s = w.run_with(&day(1), &settings(), &back).unwrap();
    assert!(s.resumed, "{s:?}");
    assert!(s.new_entries < clean_entries, "{s:?}: resumed, not redone");
    w.run(&day(2)).unwrap();
    assert_eq!(w.dump(), clean.dump());
}

#[test]
fn two_runs_at_once_the_second_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.sqlite");
    let first = run::RunLock::acquire(&ledger, "2026-11-01", 0).unwrap();
    let e = run::RunLock::acquire(&ledger, "2026-11-02", 0)
        .err()
        .unwrap();
    let text = e.to_string();
    assert!(matches!(e, RunError::Busy { .. }), "{text}");
    assert!(
        text.contains("another accounting run is in progress"),
        "{text}"
    );
    assert!(
        text.contains(&format!("pid {}", std::process::id())),
        "{text}"
    );
    drop(first);
    run::RunLock::acquire(&ledger, "2026-11-02", 0).unwrap();
}

#[test]
fn charge_at_delivery_and_retrieved_bytes() {
    let mut w = World::new();
    w.ledger
        .put_tariff(&Tariff {
            class: "student".into(),
            zone: run::RETRIEVED.into(),
            price_per_mb: m(10),
            min_charge: m(0),
        })
        .unwrap();
    w.deliver(
        "a@x.example",
        Zone::Foreign,
        10 * MB,
        day(1).start_ms + HOUR,
    );
    w.deliver(
        "a@x.example",
        Zone::Foreign,
        10 * MB,
        day(1).start_ms + 2 * HOUR,
    );
    let at_delivery = RunSettings {
        charge: ChargeAt::AtDelivery,
        ..settings()
    };
    let s = w
        .run_with(&day(1), &at_delivery, &|| 1_900_000_000_000)
        .unwrap();
    assert_eq!((s.charges, s.charged, s.pending), (1, m(600), 0), "{s:?}");
    // Retrieved bytes: 3 MB per retrieval at 0.10.
    w.retrieve("b@x.example", day(2).start_ms + HOUR);
    let retrieved = RunSettings {
        charge: ChargeAt::RetrievedBytes,
        ..settings()
    };
    let s = w
        .run_with(&day(2), &retrieved, &|| 1_900_000_000_000)
        .unwrap();
    assert_eq!((s.charges, s.charged), (1, m(30)), "{s:?}");
    assert_eq!(w.posted("b@x.example"), m(-30));
}

/// A webhook batch Stalwart resends and a meter segment read again (the meter cursor set
/// back, as after restoring a backup of the cursor) change nothing.
#[test]
fn replayed_deliveries_and_meter_records_change_nothing() {
    let mut w = World::new();
    let (d1, d2) = (day(1), day(2));
    w.topup("a@x.example", 10_000);
    let batch = [Delivery {
        message_key: "stalwart:77".into(),
        account: "a@x.example".into(),
        zone: Some(Zone::Foreign),
        bytes: 4 * MB,
        at_ms: d1.start_ms + HOUR,
    }];
    w.ledger.record_deliveries(&batch).unwrap();
    w.retrieve("a@x.example", d1.start_ms + 2 * HOUR);
    w.deliver("a@x.example", Zone::Foreign, MB, d1.start_ms + 3 * HOUR);
    w.run(&d1).unwrap();
    let after_first = (w.posted("a@x.example"), w.available("a@x.example"));
    // The same webhook batch again: nothing recorded.
    let r = w.ledger.record_deliveries(&batch).unwrap();
    assert_eq!((r.added, r.replayed), (0, 1));
    // The meter records read again by the next run.
    let conn = rusqlite::Connection::open(&w.path).unwrap();
    conn.execute("UPDATE cursors SET value = 0 WHERE name = 'meter'", [])
        .unwrap();
    let s = w.run(&d2).unwrap();
    assert_eq!(
        (s.retrievals, s.replayed_retrievals, s.charges),
        (0, 1, 0),
        "{s:?}"
    );
    assert_eq!(
        (w.posted("a@x.example"), w.available("a@x.example")),
        after_first
    );
    assert!(w.ledger.verify().unwrap().problem.is_none());
}

/// A ledger file from before delivery account numbers (schema 1: `deliveries` without
/// `account_no`) is upgraded when opened; its records (no number) and those recorded after
/// the upgrade (numbered) are charged together, and the ledger is the one a file recorded
/// from the start with numbers gets.
#[test]
fn a_schema_1_ledger_is_upgraded_and_its_old_deliveries_are_charged() {
    let d1 = day(1);
    let old_rows = [
        (
            "milter:old1",
            "a@x.example",
            "foreign",
            2 * MB,
            d1.start_ms + HOUR,
        ),
        (
            "milter:old2",
            "gone@x.example",
            "foreign",
            MB,
            d1.start_ms + HOUR,
        ),
    ];
    let mut old = World::new_with(|path| {
        let c = rusqlite::Connection::open(path).unwrap();
        c.execute_batch(
            "CREATE TABLE deliveries (id INTEGER PRIMARY KEY, message_key TEXT NOT NULL, \
             account TEXT NOT NULL, zone TEXT NOT NULL, bytes INTEGER NOT NULL, \
             at_ms INTEGER NOT NULL, run TEXT, UNIQUE (message_key, account)); \
             PRAGMA user_version = 1;",
        )
        .unwrap();
        for (key, account, zone, bytes, at) in old_rows {
            c.execute(
                "INSERT INTO deliveries (message_key, account, zone, bytes, at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![key, account, zone, bytes as i64, at],
            )
            .unwrap();
        }
    });
    let mut fresh = World::new();
    for (key, account, zone, bytes, at) in old_rows {
        fresh
            .ledger
            .record_deliveries(&[Delivery {
                message_key: key.into(),
                account: account.into(),
                zone: Zone::parse(zone),
                bytes,
                at_ms: at,
            }])
            .unwrap();
    }
    let conn = rusqlite::Connection::open(&old.path).unwrap();
    let numbers: Vec<Option<i64>> = column(&conn, "SELECT account_no FROM deliveries ORDER BY id");
    assert_eq!(numbers, [None, None], "old records keep no number");
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 2);
    // Opening again changes nothing.
    drop(SqliteLedger::open(&old.path).unwrap());
    let mut summaries = Vec::new();
    for w in [&mut old, &mut fresh] {
        w.topup("a@x.example", 10_000);
        w.deliver("a@x.example", Zone::Foreign, 3 * MB, d1.start_ms + 2 * HOUR);
        w.deliver("gone@x.example", Zone::Free, MB, d1.start_ms + 2 * HOUR);
        w.retrieve("a@x.example", d1.start_ms + 3 * HOUR);
        summaries.push(w.run(&d1).unwrap());
    }
    let s = &summaries[0];
    assert_eq!((s.deliveries, s.unbilled, s.charges), (4, 2, 1), "{s:?}");
    assert_eq!(
        s.charged,
        m(150),
        "2 MB before the upgrade and 3 MB after, at 0.30/MB"
    );
    assert_eq!(summaries[0].charged, summaries[1].charged);
    assert_eq!(old.dump(), fresh.dump());
    let numbered: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM deliveries WHERE account_no IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        numbered, 2,
        "records made after the upgrade carry their number"
    );
}

/// The first column of every row `sql` selects.
fn column<T: rusqlite::types::FromSql>(conn: &rusqlite::Connection, sql: &str) -> Vec<T> {
    conn.prepare(sql)
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}
