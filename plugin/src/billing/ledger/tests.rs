#![allow(clippy::unwrap_used, clippy::expect_used)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::Connection;

use super::sqlite::SqliteLedger;
use super::*;
use crate::billing::{adjust, topup};

fn m(s: &str) -> Money {
    Money::parse(s).unwrap()
}

fn user(login: &str) -> UserAccount {
    UserAccount {
        login: login.into(),
        staff_no: "2026011234".into(),
        real_name: "张三".into(),
        class: "student".into(),
        status: Status::Normal,
        note: String::new(),
    }
}

fn open() -> (tempfile::TempDir, SqliteLedger, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("billing").join("ledger.sqlite");
    let mut l = SqliteLedger::open(&path).unwrap();
    for u in ["alice@example.org", "bob@example.org", "carol@example.org"] {
        l.put_user(&user(u)).unwrap();
    }
    (dir, l, path)
}

fn charge(key: &str, login: &str, zone: &str, amount: &str, pending: bool) -> Request {
    Request {
        key: key.into(),
        posting: Posting::Transfer {
            kind: Kind::Charge,
            debit: AccountRef::User(login.into()),
            credit: AccountRef::Revenue(zone.into()),
            amount: m(amount),
            pending,
        },
        memo: String::new(),
        at_ms: 1_000,
    }
}

fn resolve(key: &str, pending_id: i64, post: Option<Option<&str>>) -> Request {
    Request {
        key: key.into(),
        posting: match post {
            Some(amount) => Posting::PostPending {
                pending_id,
                amount: amount.map(m),
            },
            None => Posting::VoidPending { pending_id },
        },
        memo: String::new(),
        at_ms: 2_000,
    }
}

fn posted(l: &SqliteLedger, login: &str) -> Money {
    l.statement(login).unwrap().balance.posted().unwrap()
}

fn ok(l: &SqliteLedger) -> VerifyReport {
    let r = l.verify().unwrap();
    assert_eq!(r.problem, None, "{r:?}");
    r
}

#[test]
fn topups_adjustments_and_charges_move_balances_and_sum_to_zero() {
    let (_d, mut l, _) = open();
    topup(
        &mut l,
        "alice@example.org",
        m("50.00"),
        "t1",
        "cash desk",
        1,
    )
    .unwrap();
    adjust(
        &mut l,
        "alice@example.org",
        m("-2.50"),
        "a1",
        "refund error",
        2,
    )
    .unwrap();
    adjust(&mut l, "bob@example.org", m("1.00"), "a2", "goodwill", 3).unwrap();
    l.post(&charge("c1", "alice@example.org", "foreign", "3.07", false))
        .unwrap();
    assert_eq!(posted(&l, "alice@example.org"), m("44.43"));
    assert_eq!(posted(&l, "bob@example.org"), m("1.00"));
    let rev = l
        .balance(&AccountRef::Revenue("foreign".into()))
        .unwrap()
        .unwrap();
    assert_eq!(rev.posted().unwrap(), m("3.07"));
    let cash = l.balance(&AccountRef::Cash).unwrap().unwrap();
    assert_eq!(cash.posted().unwrap(), m("-50.00"));
    let r = ok(&l);
    assert_eq!(r.entries, 4);
    // 3 users, cash, adjustment, revenue:foreign
    assert_eq!(r.accounts, 6);
}

#[test]
fn unknown_users_and_bad_amounts_are_refused() {
    let (_d, mut l, _) = open();
    let e = topup(&mut l, "nobody@example.org", m("5"), "k", "", 1).unwrap_err();
    assert!(matches!(e, LedgerError::UnknownUser(ref u) if u == "nobody@example.org"));
    assert!(e.to_string().contains("nobody@example.org"));
    assert!(matches!(
        topup(&mut l, "alice@example.org", m("-5"), "k", "", 1),
        Err(LedgerError::NotPositive(_))
    ));
    assert!(matches!(
        topup(&mut l, "alice@example.org", Money::ZERO, "k", "", 1),
        Err(LedgerError::NotPositive(_))
    ));
    assert!(matches!(
        adjust(&mut l, "alice@example.org", m("1"), "k", " ", 1),
        Err(LedgerError::Invalid {
            field: "reason",
            ..
        })
    ));
    let e = l
        .post(&charge("c", "nobody@example.org", "foreign", "1", false))
        .unwrap_err();
    assert!(matches!(e, LedgerError::UnknownUser(_)));
    let mut same = charge("c", "alice@example.org", "x", "1", false);
    same.posting = Posting::Transfer {
        kind: Kind::Charge,
        debit: AccountRef::Cash,
        credit: AccountRef::Cash,
        amount: m("1"),
        pending: false,
    };
    assert!(matches!(l.post(&same), Err(LedgerError::SameAccount(_))));
    let mut nokey = charge("", "alice@example.org", "x", "1", false);
    assert!(matches!(
        l.post(&nokey),
        Err(LedgerError::Invalid { field: "key", .. })
    ));
    nokey.key = "k".repeat(MAX_KEY_LEN + 1);
    assert!(l.post(&nokey).is_err());
    // Nothing of the refused requests was written.
    assert_eq!(ok(&l).entries, 0);
}

#[test]
fn a_replayed_request_changes_nothing_and_returns_the_original() {
    let (_d, mut l, path) = open();
    let first = topup(&mut l, "alice@example.org", m("10"), "t-1", "", 1).unwrap();
    assert!(!first.replayed);
    let again = topup(
        &mut l,
        "alice@example.org",
        m("10"),
        "t-1",
        "other note",
        99,
    )
    .unwrap();
    assert!(again.replayed);
    assert_eq!(again.entry, first.entry);
    assert_eq!(posted(&l, "alice@example.org"), m("10"));
    let before = std::fs::read(&path).unwrap().len();
    // A replay inside a batch too.
    let r = l
        .post_batch(&[
            charge("c-1", "alice@example.org", "foreign", "1", true),
            charge("c-1", "alice@example.org", "foreign", "1", true),
        ])
        .unwrap();
    assert!(!r[0].replayed && r[1].replayed);
    assert_eq!(r[0].entry, r[1].entry);
    assert!(std::fs::read(&path).unwrap().len() >= before);
    // The same key for another request is a conflict, and writes nothing.
    let e = topup(&mut l, "alice@example.org", m("11"), "t-1", "", 1).unwrap_err();
    assert!(matches!(e, LedgerError::KeyConflict { id: 1, .. }), "{e}");
    let e = topup(&mut l, "bob@example.org", m("10"), "t-1", "", 1).unwrap_err();
    assert!(matches!(e, LedgerError::KeyConflict { .. }));
    assert_eq!(ok(&l).entries, 2);
}

#[test]
fn a_failing_batch_writes_nothing() {
    let (_d, mut l, _) = open();
    let e = l
        .post_batch(&[
            charge("b1", "alice@example.org", "foreign", "1", false),
            charge("b2", "nobody@example.org", "foreign", "1", false),
        ])
        .unwrap_err();
    assert!(matches!(e, LedgerError::UnknownUser(_)));
    assert_eq!(ok(&l).entries, 0);
    assert_eq!(posted(&l, "alice@example.org"), Money::ZERO);
}

#[test]
fn two_phase_transfers_reserve_then_post_or_void_once() {
    let (_d, mut l, _) = open();
    topup(&mut l, "alice@example.org", m("20"), "t", "", 1).unwrap();
    let p1 = l
        .post(&charge("p1", "alice@example.org", "foreign", "5.00", true))
        .unwrap()
        .entry;
    let p2 = l
        .post(&charge("p2", "alice@example.org", "foreign", "3.00", true))
        .unwrap()
        .entry;
    let b = l.statement("alice@example.org").unwrap().balance;
    assert_eq!(b.posted().unwrap(), m("20"));
    assert_eq!(b.debits_pending, m("8"));
    assert_eq!(b.available().unwrap(), m("12"));
    assert_eq!(l.open_pending(i64::MAX, 10).unwrap().len(), 2);

    // Post part of p1: the rest of its reservation is released.
    let post = l
        .post(&resolve("p1-post", p1.id, Some(Some("4.50"))))
        .unwrap();
    assert_eq!(post.entry.phase, Phase::Post);
    assert_eq!(post.entry.pending_id, Some(p1.id));
    let v = l.post(&resolve("p2-void", p2.id, None)).unwrap();
    assert_eq!(v.entry.amount, m("3.00"));
    let b = l.statement("alice@example.org").unwrap().balance;
    assert_eq!(b.posted().unwrap(), m("15.50"));
    assert_eq!(b.debits_pending, Money::ZERO);
    assert!(l.open_pending(i64::MAX, 10).unwrap().is_empty());

    // Each resolves once; a replay of the resolution is fine.
    assert!(
        l.post(&resolve("p1-post", p1.id, Some(Some("4.50"))))
            .unwrap()
            .replayed
    );
    assert!(matches!(
        l.post(&resolve("p1-again", p1.id, None)),
        Err(LedgerError::AlreadyResolved { pending, by }) if pending == p1.id && by == post.entry.id
    ));
    let p3 = l
        .post(&charge("p3", "alice@example.org", "foreign", "1.00", true))
        .unwrap()
        .entry;
    assert!(matches!(
        l.post(&resolve("p3-post", p3.id, Some(Some("1.01")))),
        Err(LedgerError::PostExceedsPending { .. })
    ));
    assert!(matches!(
        l.post(&resolve("x", 1, None)),
        Err(LedgerError::NotPending(1))
    ));
    assert!(matches!(
        l.post(&resolve("y", 999, None)),
        Err(LedgerError::UnknownEntry(999))
    ));
    // A full post (amount left out).
    let full = l.post(&resolve("p3-post", p3.id, Some(None))).unwrap();
    assert_eq!(full.entry.amount, m("1.00"));
    assert_eq!(l.open_pending(0, 10).unwrap().len(), 0);
    ok(&l);
}

/// A seeded random sequence of postings (a property test without proptest: the seed is
/// printed on failure).
#[test]
fn random_postings_always_sum_to_zero_and_verify() {
    for seed in 0..8u64 {
        let (_d, mut l, _) = open();
        let mut rng = StdRng::seed_from_u64(seed);
        let users = ["alice@example.org", "bob@example.org", "carol@example.org"];
        let mut pending: Vec<i64> = Vec::new();
        for i in 0..300 {
            let u = users[rng.gen_range(0..users.len())];
            let amount = Money::from_minor(rng.gen_range(1..10_000));
            let key = format!("k{}", rng.gen_range(0..400)); // collisions: replays/conflicts
            let r = match rng.gen_range(0..6) {
                0 => topup(&mut l, u, amount, &key, "", i),
                1 => adjust(
                    &mut l,
                    u,
                    if rng.gen() {
                        amount
                    } else {
                        amount.checked_neg().unwrap()
                    },
                    &key,
                    "r",
                    i,
                ),
                2 | 3 => l.post(&charge(
                    &key,
                    u,
                    ["free", "foreign"][i as usize % 2],
                    "0.01",
                    rng.gen(),
                )),
                _ if !pending.is_empty() => {
                    let id = pending.swap_remove(rng.gen_range(0..pending.len()));
                    let post = rng.gen::<bool>().then_some(None);
                    l.post(&resolve(&key, id, post))
                }
                _ => continue,
            };
            if let Ok(p) = &r {
                if p.entry.phase == Phase::Pending && !p.replayed {
                    pending.push(p.entry.id);
                }
            }
        }
        let r = l.verify().unwrap();
        assert_eq!(r.problem, None, "seed {seed}");
        let conn = Connection::open(l.path()).unwrap();
        let sums: (i64, i64, i64, i64) = conn
            .query_row(
                "SELECT sum(credits_posted - debits_posted), sum(credits_pending - debits_pending), \
                 sum(debits_posted), count(*) FROM accounts",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!((sums.0, sums.1), (0, 0), "seed {seed}");
        assert!(sums.2 > 0, "seed {seed}: nothing was posted");
    }
}

fn ledger_with_entries() -> (tempfile::TempDir, SqliteLedger, Connection) {
    let (d, mut l, path) = open();
    for i in 0..5 {
        topup(&mut l, "alice@example.org", m("1"), &format!("t{i}"), "", i).unwrap();
    }
    ok(&l);
    let raw = Connection::open(path).unwrap();
    (d, l, raw)
}

#[test]
fn verify_names_an_edited_row() {
    let (_d, l, raw) = ledger_with_entries();
    raw.execute("UPDATE entries SET amount = 1000 WHERE id = 3", [])
        .unwrap();
    let p = l.verify().unwrap().problem.unwrap();
    assert_eq!(p.entry, Some(3), "{p}");
    assert!(p.what.contains("hash does not match"), "{p}");
    assert!(p.to_string().starts_with("entry 3: "));
}

#[test]
fn verify_names_a_deleted_row() {
    let (_d, l, raw) = ledger_with_entries();
    raw.execute("DELETE FROM entries WHERE id = 2", []).unwrap();
    let p = l.verify().unwrap().problem.unwrap();
    assert_eq!(p.entry, Some(2), "{p}");
    assert!(p.what.contains("missing"), "{p}");
}

#[test]
fn verify_finds_a_deleted_last_row() {
    let (_d, l, raw) = ledger_with_entries();
    raw.execute("DELETE FROM entries WHERE id = 5", []).unwrap();
    let p = l.verify().unwrap().problem.unwrap();
    assert_eq!(p.entry, Some(5), "{p}");
    assert!(p.what.contains("recorded head is entry 5"), "{p}");
}

#[test]
fn verify_finds_a_rehashed_forgery_by_the_chain_or_the_balances() {
    // An attacker who edits a row and recomputes its hash breaks the next row's prev_hash.
    let (_d, l, raw) = ledger_with_entries();
    let mut e = l.entry(2).unwrap().unwrap();
    e.amount = m("100");
    e.hash = chain::hash(&e.prev_hash, &e);
    raw.execute(
        "UPDATE entries SET amount = ?1, hash = ?2 WHERE id = 2",
        rusqlite::params![e.amount.minor(), &e.hash[..]],
    )
    .unwrap();
    let p = l.verify().unwrap().problem.unwrap();
    assert_eq!(p.entry, Some(3), "{p}");
    assert!(p.what.contains("prev_hash"), "{p}");
}

#[test]
fn verify_names_an_account_whose_balance_was_edited() {
    let (_d, l, raw) = ledger_with_entries();
    raw.execute(
        "UPDATE accounts SET credits_posted = credits_posted + 100 \
         WHERE kind = 'user' AND name = 'alice@example.org'",
        [],
    )
    .unwrap();
    let p = l.verify().unwrap().problem.unwrap();
    assert_eq!(p.entry, None);
    assert!(
        p.account
            .as_deref()
            .unwrap()
            .starts_with("user:alice@example.org"),
        "{p}"
    );
    // Edited on both sides, each account is still wrong against its entries.
    raw.execute(
        "UPDATE accounts SET debits_posted = debits_posted + 100 WHERE kind = 'cash'",
        [],
    )
    .unwrap();
    assert!(l.verify().unwrap().problem.is_some());
}

#[test]
fn verify_names_a_row_with_garbage_in_it() {
    let (_d, l, raw) = ledger_with_entries();
    raw.execute("UPDATE entries SET phase = 'maybe' WHERE id = 4", [])
        .unwrap();
    let p = l.verify().unwrap().problem.unwrap();
    assert_eq!(p.entry, Some(4), "{p}");
    assert!(p.what.contains("maybe"), "{p}");
}

#[test]
fn accounts_carry_the_seeds_fields_and_tariffs_respect_the_cap() {
    let (_d, mut l, _) = open();
    let mut u = user("dave@example.org");
    u.note = "研究生".into();
    u.status = Status::Arrears;
    l.put_user(&u).unwrap();
    assert_eq!(l.user("dave@example.org").unwrap().unwrap(), u);
    u.class = "staff".into();
    l.put_user(&u).unwrap();
    assert_eq!(l.user("dave@example.org").unwrap().unwrap().class, "staff");
    assert!(l.user("nobody@example.org").unwrap().is_none());
    let bad = UserAccount {
        note: "x".repeat(MAX_TEXT_LEN + 1),
        ..user("e@example.org")
    };
    assert!(matches!(
        l.put_user(&bad),
        Err(LedgerError::Invalid { field: "note", .. })
    ));

    let cap = m("100");
    let t = |price: &str| Tariff {
        class: "student".into(),
        zone: "foreign".into(),
        price_per_mb: m(price),
        min_charge: m("0.10"),
    };
    l.put_tariff(&t("0.30").checked(cap).unwrap()).unwrap();
    l.put_tariff(&Tariff {
        zone: "free".into(),
        price_per_mb: Money::ZERO,
        ..t("0")
    })
    .unwrap();
    let e = t("3000").checked(cap).unwrap_err();
    assert!(matches!(e, LedgerError::PriceOverCap { .. }));
    assert!(e.to_string().contains("billing.max_price_per_mb"), "{e}");
    assert!(t("-1").checked(cap).is_err());
    let all = l.tariffs().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].price_per_mb, m("0.30"));
    assert_eq!(all[1].zone, "free");
}

#[test]
fn the_ledger_reopens_with_its_chain() {
    let (_d, mut l, path) = open();
    topup(&mut l, "alice@example.org", m("1"), "a", "", 1).unwrap();
    drop(l);
    let mut l = SqliteLedger::open(&path).unwrap();
    topup(&mut l, "alice@example.org", m("1"), "b", "", 1).unwrap();
    assert_eq!(ok(&l).entries, 2);
    let mode: String = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn the_async_handle_runs_on_the_ledger_thread() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = crate::billing::Ledger::open(&dir.path().join("l.sqlite")).unwrap();
    ledger
        .call(|s| s.put_user(&user("a@example.org")))
        .await
        .unwrap();
    let p = ledger
        .call(|s| topup(s, "a@example.org", m("2"), "k", "", 1))
        .await
        .unwrap();
    assert_eq!(p.entry.id, 1);
    let e = ledger
        .call(|s| topup(s, "b@example.org", m("2"), "k2", "", 1))
        .await
        .unwrap_err();
    assert!(matches!(e, LedgerError::UnknownUser(_)));
    // verify reads beside the writer, on its own connection.
    let r = ledger.verify().await.unwrap();
    assert_eq!((r.entries, r.problem), (1, None));
    let path = dir.path().join("l.sqlite");
    let e = SqliteLedger::open_read_only(&dir.path().join("missing.sqlite"))
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("missing.sqlite: open to read"),
        "{e}"
    );
    let ro = SqliteLedger::open_read_only(&path).unwrap();
    assert_eq!(ro.verify().unwrap().entries, 1);
}

#[test]
fn two_writers_on_one_file_keep_one_chain() {
    // The daemon and a local CLI may both write: BEGIN IMMEDIATE serialises them.
    let (_d, l, path) = open();
    drop(l);
    let threads: Vec<_> = (0..2)
        .map(|w| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut l = SqliteLedger::open(&path).unwrap();
                for i in 0..50 {
                    topup(
                        &mut l,
                        "alice@example.org",
                        m("1"),
                        &format!("w{w}-{i}"),
                        "",
                        i,
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let l = SqliteLedger::open(&path).unwrap();
    assert_eq!(ok(&l).entries, 100);
    assert_eq!(posted(&l, "alice@example.org"), m("100"));
}
