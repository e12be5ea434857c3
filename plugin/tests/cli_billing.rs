//! `mailbell billing …` as an operator runs it: without a daemon (the ledger file opened by
//! the command) and through a running daemon's admin API, which must answer the same; bad
//! input refused with a message naming it; `verify` naming a row edited behind the ledger's
//! back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;

use support::cli::{fails, ok, run_all, serve_admin};

const TOKEN: &str = "billing-test-token-0123456789";

fn local_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let config = dir.join("mailbell.toml");
    std::fs::write(
        &config,
        format!(
            "[mailbell]\ndata_dir = {:?}\n[listen]\nadmin = \"\"\n{extra}",
            dir.join("data")
        ),
    )
    .unwrap();
    config
}

/// Every billing command, successes and failures alike (keys given: the answers are the same
/// on every run).
fn commands() -> Vec<Vec<String>> {
    [
        "billing account set Alice@Example.org --staff-no 2026011234 --name 张三 --class student",
        "billing account set bob@example.org --status arrears --note 研究生",
        "billing account set bob@example.org --status banned",
        "billing topup alice@example.org 50 --key t1 --note cash-desk",
        "billing topup alice@example.org 50 --key t1",
        "billing topup alice@example.org 51 --key t1",
        "billing topup alice@example.org -5 --key t2",
        "billing topup alice@example.org 0 --key t2",
        "billing topup alice@example.org ten --key t2",
        "billing topup alice@example.org 1.005 --key t2",
        "billing topup alice@example.org 99999999999999999999 --key t2",
        "billing topup nobody@example.org 5 --key t3",
        "billing adjust alice@example.org -2.50 --reason refund --key a1",
        "billing adjust alice@example.org 0 --reason nothing --key a2",
        "billing adjust nobody@example.org 1 --reason x --key a3",
        "billing balance ALICE@example.org",
        "billing balance nobody@example.org",
        "billing tariff set student foreign 0.30 --min-charge 0.10",
        "billing tariff set student free 0",
        "billing tariff set student foreign 3000",
        "billing tariff set student foreign -1",
        "billing tariff list",
        "billing balance alice@example.org --json",
    ]
    .iter()
    .map(|l| l.split(' ').map(str::to_owned).collect())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_commands_read_the_same_through_the_daemon_and_without_it() {
    let local = tempfile::tempdir().unwrap();
    let local_config = local_config(local.path(), "");
    let served = tempfile::tempdir().unwrap();
    let (running, served_config) = serve_admin(served.path(), TOKEN).await;
    let cmds = commands();
    let c = cmds.clone();
    let (without, through) = tokio::task::spawn_blocking(move || {
        (run_all(&local_config, &c), run_all(&served_config, &c))
    })
    .await
    .unwrap();
    let report = running.stores.ledger.call(|s| s.verify()).await.unwrap();
    running.stop().await;
    assert_eq!(report.problem, None);
    assert_eq!(report.entries, 2);

    for ((c, w), t) in cmds.iter().zip(&without).zip(&through) {
        assert_eq!(
            w,
            t,
            "`mailbell {}` differs (left: without the daemon)",
            c.join(" ")
        );
    }
    let at = |i: usize| &without[i];
    let okay =
        |i: usize, text: &str| assert!(at(i).0 && at(i).1.contains(text), "{i}: {:?}", at(i));
    let refused =
        |i: usize, text: &str| assert!(!at(i).0 && at(i).2.contains(text), "{i}: {:?}", at(i));
    okay(0, "alice@example.org: class student, status normal");
    okay(1, "bob@example.org: class default, status arrears");
    refused(2, "\"banned\" is not one of normal, arrears, unwelcome");
    okay(3, "entry 1: topup 50.00 (key t1); balance 50.00");
    okay(4, "replayed, nothing changed: entry 1");
    refused(
        5,
        "idempotency key \"t1\" was used by entry 1 for a different request",
    );
    refused(6, "amount: \"-5\" must be above zero");
    refused(7, "amount: \"0\" must be above zero");
    refused(8, "amount: \"ten\" is not an amount");
    refused(9, "more than 2 digits after the point");
    refused(10, "is too large");
    refused(11, "unknown account \"nobody@example.org\"");
    okay(12, "entry 2: adjustment 2.50 (key a1); balance 47.50");
    refused(13, "an adjustment of zero changes nothing");
    refused(14, "unknown account \"nobody@example.org\"");
    okay(15, "balance        47.50");
    okay(15, "real name      张三");
    refused(16, "unknown account \"nobody@example.org\"");
    okay(17, "tariff student/foreign: 0.30/MB, min 0.10");
    refused(
        19,
        "price 3000.00 per MB is above the cap 100.00 (billing.max_price_per_mb)",
    );
    refused(20, "price_per_mb: \"-1\"");
    okay(
        21,
        "student\tforeign\t0.30/MB\tmin 0.10\nstudent\tfree\t0.00/MB\tmin 0.00\n",
    );
    let j: serde_json::Value = serde_json::from_str(&at(22).1).unwrap();
    assert_eq!(j["balance"]["credits_posted"], "50.00");
    assert_eq!(j["account"]["staff_no"], "2026011234");
}

#[test]
fn the_price_cap_is_a_config_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = local_config(dir.path(), "[billing]\nmax_price_per_mb = \"5000\"\n");
    ok(
        &config,
        &["billing", "tariff", "set", "staff", "foreign", "3000"],
    );
    let config = local_config(dir.path(), "[billing]\nmax_price_per_mb = \"0.5\"\n");
    let e = fails(
        &config,
        &["billing", "tariff", "set", "staff", "foreign", "0.51"],
    );
    assert!(e.contains("above the cap 0.50"), "{e}");
}

#[test]
fn verify_names_an_edited_row_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let config = local_config(dir.path(), "");
    ok(&config, &["billing", "account", "set", "a@example.org"]);
    for k in ["k1", "k2", "k3"] {
        ok(
            &config,
            &["billing", "topup", "a@example.org", "1.00", "--key", k],
        );
    }
    let out = ok(&config, &["billing", "verify"]);
    assert!(out.starts_with("ledger ok: 3 entries, 2 accounts"), "{out}");
    let raw = rusqlite::Connection::open(dir.path().join("data/billing/ledger.sqlite")).unwrap();
    raw.execute("UPDATE entries SET memo = 'forged' WHERE id = 2", [])
        .unwrap();
    let e = fails(&config, &["billing", "verify"]);
    assert!(
        e.contains("ledger verify failed: entry 2: hash does not match"),
        "{e}"
    );
    let e = fails(&config, &["billing", "verify", "--json"]);
    assert!(e.contains("entry 2"), "{e}");
}

/// `mailbell billing notify-test`: queues the billing SMS for the balance now through the
/// daemon's outbox, says why not when it cannot, and needs the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_test_queues_the_notice_for_the_balance_now() {
    let served = tempfile::tempdir().unwrap();
    let (running, config) = serve_admin(served.path(), TOKEN).await;
    let mut alice = mailbell::users::User::new("alice@example.org");
    alice.phone = "+8613800138000".into();
    alice.language = "zh".into();
    running.stores.users.upsert(alice).unwrap();
    let c = config.clone();
    let (queued, warned, refused) = tokio::task::spawn_blocking(move || {
        for args in [
            "billing account set alice@example.org",
            "billing account set carol@example.org",
            "billing adjust alice@example.org -3.20 --reason test --key n1",
        ] {
            ok(&c, &args.split(' ').collect::<Vec<_>>());
        }
        let queued = ok(
            &c,
            &[
                "billing",
                "notify-test",
                "Alice@example.org",
                "--kind",
                "arrears",
            ],
        );
        let warned = ok(
            &c,
            &[
                "billing",
                "notify-test",
                "alice@example.org",
                "--kind",
                "warning",
                "--threshold",
                "5",
                "--json",
            ],
        );
        let refused = [
            vec![
                "billing",
                "notify-test",
                "carol@example.org",
                "--kind",
                "arrears",
            ],
            vec![
                "billing",
                "notify-test",
                "alice@example.org",
                "--kind",
                "warning",
            ],
            vec![
                "billing",
                "notify-test",
                "alice@example.org",
                "--kind",
                "late",
            ],
            vec![
                "billing",
                "notify-test",
                "nobody@example.org",
                "--kind",
                "arrears",
            ],
        ]
        .map(|a| fails(&c, &a));
        (queued, warned, refused)
    })
    .await
    .unwrap();
    assert!(
        queued.starts_with("arrears notice ")
            && queued.contains(" for alice@example.org queued: balance -3.20"),
        "{queued}"
    );
    let j: serde_json::Value = serde_json::from_str(&warned).unwrap();
    assert_eq!(
        (&j["kind"], &j["balance"], &j["threshold"], &j["queued"]),
        (
            &serde_json::json!("warning"),
            &serde_json::json!("-3.20"),
            &serde_json::json!("5.00"),
            &serde_json::json!(true)
        )
    );
    assert!(
        refused[0].contains("for carol@example.org not sent: unknown_user (balance 0.00)"),
        "{}",
        refused[0]
    );
    assert!(
        refused[1].contains("a warning needs the threshold"),
        "{}",
        refused[1]
    );
    assert!(
        refused[2].contains("invalid value 'late'"),
        "{}",
        refused[2]
    );
    assert!(
        refused[3].contains("unknown account \"nobody@example.org\""),
        "{}",
        refused[3]
    );
    // Both are in the outbox for the agent, as billing notices.
    let kinds: Vec<&'static str> = running
        .stores
        .outbox
        .list(10)
        .unwrap()
        .iter()
        .map(|q| q.notification().unwrap().kind.name())
        .collect();
    assert_eq!(kinds, ["billing-arrears", "billing-warning"]);
    // And `queue list` tells them from arrival notices.
    let c = config.clone();
    let listed = tokio::task::spawn_blocking(move || ok(&c, &["queue", "list"]))
        .await
        .unwrap();
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(
        lines[0].contains(" billing-arrears to=alice@example.org "),
        "{listed}"
    );
    assert!(
        lines[1].contains(" billing-warning to=alice@example.org "),
        "{listed}"
    );
    running.stop().await;

    // Without the daemon the command says what it needs.
    let local = tempfile::tempdir().unwrap();
    let config = local_config(local.path(), "");
    let e = tokio::task::spawn_blocking(move || {
        fails(
            &config,
            &[
                "billing",
                "notify-test",
                "alice@example.org",
                "--kind",
                "arrears",
            ],
        )
    })
    .await
    .unwrap();
    assert!(e.contains("needs the running daemon"), "{e}");
}
