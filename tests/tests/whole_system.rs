//! The whole system in one process (tests/src/system.rs): the admin API, audit log, metrics
//! and the Stalwart path through the real link to the simulated modem.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use mailbell::users::User;
use mailbell_tests::system::{self, ADMIN_TOKEN};

fn alice() -> User {
    let mut u = User::new("alice@example.com");
    u.phone = "+8613800138000".into();
    u.language = "en".into();
    u
}

async fn admin(
    sys: &system::System,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let r = mailbell_link::http::request(
        sys.mail.admin_addr.unwrap(),
        method,
        path,
        Some(&format!("Bearer {ADMIN_TOKEN}")),
        body.map(|b| ("application/json", b.as_bytes())),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let v = serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null);
    (r.status, v)
}

/// The mail side alone, its link pointed at a port nothing listens on; alice registered.
async fn mail_without_agent(
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut mailbell::config::Config),
) -> (mailbell::app::Running, mailbell::config::Config) {
    let mut cfg = system::mail_config(dir).unwrap();
    cfg.intake.rate_limit_secs = 0;
    cfg.link.agents[0].addr = "127.0.0.1:9".into();
    tweak(&mut cfg);
    let mail = mailbell::app::start(cfg.clone(), tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    mail.stores.users.upsert(alice()).unwrap();
    (mail, cfg)
}

/// Posts a data-stage hook request for one message to alice; returns status and answer.
async fn hook_to_alice(
    mail: &mailbell::app::Running,
    cfg: &mailbell::config::Config,
    queue_id: u64,
    subject: &str,
) -> (u16, String) {
    let req = system::hook_data_request(
        queue_id,
        "c@r.example",
        &["alice@example.com"],
        &[("Subject", subject)],
        "x",
    );
    let r = mailbell_link::http::request(
        mail.http_addr.unwrap(),
        "POST",
        &cfg.stalwart.hook_path,
        None,
        Some(("application/json", req.as_bytes())),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    (r.status, r.body)
}

fn events(log: &serde_json::Value) -> Vec<String> {
    log.as_array()
        .unwrap()
        .iter()
        .map(|r| r["event"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalwart_delivery_is_notified_logged_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let sys = system::start(dir.path(), |m, _| m.intake.rate_limit_secs = 0)
        .await
        .unwrap();
    sys.mail.stores.users.upsert(alice()).unwrap();
    sys.wait_modems_ready(Duration::from_secs(30))
        .await
        .unwrap();
    let q = 0x04bf_063e_c5c0_016e_u64;
    let req = system::hook_data_request(
        q,
        "carol@remote.example",
        &["alice@example.com", "stranger@example.com"],
        &[
            ("From", "Carol Sender <carol@remote.example>"),
            ("Subject", "Quarterly figures"),
        ],
        "Hello Alice,\r\n",
    );
    assert_eq!(
        sys.hook(&req).await.unwrap(),
        (200, r#"{"action":"accept"}"#.to_owned())
    );
    // A forged confirmation is refused and releases nothing.
    let forged = system::ham_batch(q, 2);
    let addr = sys.mail.http_addr.unwrap();
    let r = mailbell_link::http::request(
        addr,
        "POST",
        "/stalwart/events",
        None,
        Some(("application/json", forged.as_bytes())),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        sys.pdus().is_empty(),
        "released without a valid confirmation"
    );
    let (status, _) = sys.webhook(&system::ham_batch(q, 2)).await.unwrap();
    assert_eq!(status, 200);
    let pdus = sys.wait_pdus(0, Duration::from_secs(20)).await.unwrap();
    assert_eq!(pdus.len(), 1);
    let (to, text) = system::decode(&pdus[0]).unwrap();
    assert_eq!(to, "+8613800138000");
    assert!(
        text.contains("Quarterly figures") && text.contains("Carol Sender"),
        "{text}"
    );

    // The audit log has the notice's whole history and the link session.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let names = loop {
        let (status, log) = admin(&sys, "GET", "/admin/v1/log?user=alice@example.com", None).await;
        assert_eq!(status, 200);
        let names = events(&log);
        if names.iter().any(|n| n == "acked") || tokio::time::Instant::now() > deadline {
            break names;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for e in ["created", "queued", "sent", "acked"] {
        assert!(names.iter().any(|n| n == e), "{e} missing from {names:?}");
    }
    let (_, all) = admin(&sys, "GET", "/admin/v1/log?since=1h", None).await;
    assert!(
        events(&all).iter().any(|n| n == "session-up"),
        "{:?}",
        events(&all)
    );

    // An admin change is applied at once and audited.
    let (status, u) = admin(
        &sys,
        "PATCH",
        "/admin/v1/users/alice@example.com",
        Some(r#"{"notify":false}"#),
    )
    .await;
    assert_eq!(status, 200, "{u}");
    assert_eq!(u["notify"], false);
    let req = system::hook_data_request(
        q + 1,
        "carol@remote.example",
        &["alice@example.com"],
        &[("Subject", "again")],
        "x",
    );
    assert_eq!(sys.hook(&req).await.unwrap().0, 200);
    sys.webhook(&system::ham_batch(q + 1, 2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sys.pdus().len(), 1, "notices are off");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, log) = admin(&sys, "GET", "/admin/v1/log?since=1h", None).await;
        let found =
            log.as_array().unwrap().iter().any(|r| {
                r["event"] == "admin" && r["target"] == "/admin/v1/users/alice@example.com"
            });
        if found {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "admin change not audited: {log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Metrics and status, no token needed.
    let m = mailbell_link::http::request(
        sys.mail.admin_addr.unwrap(),
        "GET",
        "/metrics",
        None,
        None,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(m.status, 200);
    assert!(m.body.contains("mailbell_messages_total 2"), "{}", m.body);
    assert!(
        m.body.contains("mailbell_unknown_recipients_total 1"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("mailbell_stalwart_webhook_errors_total{reason=\"bad_signature\"} 1"),
        "{}",
        m.body
    );
    // Without the token the admin API refuses.
    let r = mailbell_link::http::request(
        sys.mail.admin_addr.unwrap(),
        "GET",
        "/admin/v1/queue",
        None,
        None,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_agent_the_queue_holds_notices_in_arrival_order() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens where the link goes: it keeps failing and backing off.
    let (mail, cfg) = mail_without_agent(dir.path(), |_| {}).await;
    let addr = mail.http_addr.unwrap();
    for i in 0..3u64 {
        let (status, _) = hook_to_alice(&mail, &cfg, 100 + i, &format!("n{i}")).await;
        assert_eq!(status, 200);
        let (status, _) = system::post_webhook(
            addr,
            &cfg.stalwart.webhook_path,
            &system::ham_batch(100 + i, 2),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
    }
    let r = mailbell_link::http::request(
        mail.admin_addr.unwrap(),
        "GET",
        "/admin/v1/queue",
        Some(&format!("Bearer {ADMIN_TOKEN}")),
        None,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let q: Vec<serde_json::Value> = serde_json::from_str(&r.body).unwrap();
    let subjects: Vec<&str> = q.iter().map(|e| e["subject"].as_str().unwrap()).collect();
    assert_eq!(subjects, ["n0", "n1", "n2"], "queued in arrival order");
    assert_eq!(q[0]["phone"], "+86138****8000", "phone masked");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, log) = {
        let r = mailbell_link::http::request(
            mail.admin_addr.unwrap(),
            "GET",
            "/admin/v1/log?since=1h",
            Some(&format!("Bearer {ADMIN_TOKEN}")),
            None,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        (
            r.status,
            serde_json::from_str::<serde_json::Value>(&r.body).unwrap(),
        )
    };
    assert!(
        events(&log).iter().any(|e| e == "connect-failed"),
        "link failures are audited: {:?}",
        events(&log)
    );
    mail.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_tempfails_the_mta_and_dead_letters_can_be_retried_and_purged() {
    use mailbell_link::net::Outbox as _;
    let dir = tempfile::tempdir().unwrap();
    let (mail, cfg) = mail_without_agent(dir.path(), |c| c.outbox_max_depth = 2).await;
    let addr = mail.http_addr.unwrap();
    let mut answers = Vec::new();
    for i in 0..3u64 {
        answers.push(hook_to_alice(&mail, &cfg, 200 + i, &format!("f{i}")).await);
    }
    assert_eq!(answers[0].1, r#"{"action":"accept"}"#);
    assert_eq!(answers[1].1, r#"{"action":"accept"}"#);
    let third: serde_json::Value = serde_json::from_str(&answers[2].1).unwrap();
    assert_eq!(third["action"], "reject", "{third}");
    assert_eq!(
        third["response"]["status"], 451,
        "a full queue is a temporary failure"
    );

    // Dead letters through the admin API: the link refused one for good.
    for i in 0..2u64 {
        let (s, _) = system::post_webhook(
            addr,
            &cfg.stalwart.webhook_path,
            &system::ham_batch(200 + i, 2),
        )
        .await
        .unwrap();
        assert_eq!(s, 200);
    }
    let ob = &mail.stores.outbox;
    let ready = ob.ready(None, 10).unwrap();
    assert_eq!(ready.len(), 2);
    ob.dead_letter(ready[0].id, "test: permanent refusal")
        .unwrap();
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let admin = |method: &'static str, path: String| {
        let bearer = bearer.clone();
        let a = mail.admin_addr.unwrap();
        async move {
            let r = mailbell_link::http::request(
                a,
                method,
                &path,
                Some(&bearer),
                None,
                Duration::from_secs(10),
            )
            .await
            .unwrap();
            (
                r.status,
                serde_json::from_str::<serde_json::Value>(&r.body).unwrap_or_default(),
            )
        }
    };
    let (s, dead) = admin("GET", "/admin/v1/queue/dead".into()).await;
    assert_eq!(s, 200);
    assert_eq!(dead.as_array().unwrap().len(), 1);
    assert_eq!(dead[0]["reason"], "test: permanent refusal");
    let (s, e) = admin("POST", "/admin/v1/queue/retry?id=nothex".into()).await;
    assert_eq!(s, 400, "{e}");
    let (s, n) = admin("POST", format!("/admin/v1/queue/retry?id={}", ready[0].id)).await;
    assert_eq!((s, n["count"].as_u64()), (200, Some(1)));
    let (_, q) = admin("GET", "/admin/v1/queue".into()).await;
    assert_eq!(q.as_array().unwrap().len(), 2, "back in the queue");
    let again = ob.ready(None, 10).unwrap();
    ob.dead_letter(again[0].id, "refused again").unwrap();
    let (s, n) = admin("POST", "/admin/v1/queue/purge?older_than=1h".into()).await;
    assert_eq!(
        (s, n["count"].as_u64()),
        (200, Some(0)),
        "too young to purge"
    );
    let (s, n) = admin("POST", "/admin/v1/queue/purge".into()).await;
    assert_eq!((s, n["count"].as_u64()), (200, Some(1)));
    let (_, dead) = admin("GET", "/admin/v1/queue/dead".into()).await;
    assert!(dead.as_array().unwrap().is_empty());
    // Dead letters do not count against max_depth: one queued notice, room for one more.
    assert_eq!(ob.held(), (1, 2));
    let answer = hook_to_alice(&mail, &cfg, 210, "after the dead letters").await;
    assert_eq!(answer.1, r#"{"action":"accept"}"#);
    let answer = hook_to_alice(&mail, &cfg, 211, "one too many").await;
    assert!(answer.1.contains(r#""status":451"#), "{}", answer.1);
    mail.stop().await;
}

/// Issue 8: a hook request for many registered recipients counts one notice each while they
/// wait for their delivery confirmation, and one that would pass the limit is refused whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_for_many_recipients_counts_every_unconfirmed_notice() {
    let dir = tempfile::tempdir().unwrap();
    let (mail, cfg) = mail_without_agent(dir.path(), |c| c.outbox_max_depth = 5).await;
    let rcpts = ["alice@example.com", "bob@example.com", "carol@example.com"];
    for (i, a) in rcpts.iter().enumerate().skip(1) {
        let mut u = User::new(a);
        u.phone = format!("+861380013800{i}");
        mail.stores.users.upsert(u).unwrap();
    }
    let hook = |queue_id: u64, to: &'static [&'static str]| {
        let req = system::hook_data_request(queue_id, "c@r.example", to, &[("Subject", "s")], "x");
        let (addr, path) = (mail.http_addr.unwrap(), cfg.stalwart.hook_path.clone());
        async move {
            let r = mailbell_link::http::request(
                addr,
                "POST",
                &path,
                None,
                Some(("application/json", req.as_bytes())),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
            assert_eq!(r.status, 200);
            serde_json::from_str::<serde_json::Value>(&r.body).unwrap()
        }
    };
    const ALL: &[&str] = &["alice@example.com", "bob@example.com", "carol@example.com"];
    assert_eq!(hook(300, ALL).await["action"], "accept");
    let ob = &mail.stores.outbox;
    assert_eq!(
        ob.held(),
        (3, 5),
        "three notices wait for their confirmation"
    );
    assert_eq!(ob.depth(), 0);
    let refused = hook(301, ALL).await;
    assert_eq!(refused["action"], "reject", "{refused}");
    assert_eq!(refused["response"]["status"], 451);
    assert_eq!(refused["response"]["enhanced_status"], "4.3.0");
    assert_eq!(ob.held().0, 3, "refused whole: none of its notices is held");
    assert_eq!(hook(302, &ALL[..2]).await["action"], "accept");
    assert_eq!(ob.held().0, 5);
    let m = mailbell_link::http::request(
        mail.admin_addr.unwrap(),
        "GET",
        "/metrics",
        None,
        None,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    for want in [
        "mailbell_outbox_held 5\n",
        "mailbell_outbox_max_depth 5\n",
        "mailbell_outbox_staged_notices 5\n",
        "mailbell_outbox_depth 0\n",
    ] {
        assert!(m.body.contains(want), "{want:?} in {}", m.body);
    }
    mail.stop().await;
}

/// Issue 9: the demo's closing hint `mailbell --config <file> user list` works as printed: the
/// file it writes names the running mail side's admin address, token and data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_cli_config_reaches_the_running_mail_side() {
    let dir = tempfile::tempdir().unwrap();
    let sys = system::start(dir.path(), |_, _| {}).await.unwrap();
    let path = sys.write_cli_config().unwrap();
    assert!(path.is_absolute(), "{}", path.display());
    let cfg = mailbell::config::Config::load(Some(&path)).unwrap();
    assert_eq!(cfg.admin_listen, sys.mail.admin_addr);
    assert_eq!(cfg.admin_token, ADMIN_TOKEN);
    assert_eq!(
        cfg.data_dir,
        std::path::absolute(dir.path()).unwrap().join("mail")
    );
    sys.stop().await;
}

/// Waits until the outbox is empty (every notice acknowledged by the agent).
async fn outbox_drained(sys: &system::System) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while sys.mail.stores.outbox.depth() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "outbox not drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Billing notices (issue 12 §7) through the real path: the admin API's
/// `POST /admin/v1/billing/notice` for the user's ledger balance, the outbox, the mTLS link,
/// the agent's zh and en templates, the simulated modem; a rerun of the same decision is sent
/// once; the audit log tells whether and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_notices_reach_the_modem_in_the_users_language() {
    use mailbell::billing::money::Money;
    use mailbell::notify::billing::{send_billing_notices, BillingKind, BillingNotice, Outcome};

    let dir = tempfile::tempdir().unwrap();
    let sys = system::start(dir.path(), |_, _| {}).await.unwrap();
    sys.mail.stores.users.upsert(alice()).unwrap();
    let mut bob = User::new("bob@example.com");
    bob.phone = "+8613900139000".into();
    bob.language = "zh".into();
    sys.mail.stores.users.upsert(bob).unwrap();
    sys.wait_modems_ready(Duration::from_secs(30))
        .await
        .unwrap();
    // Ledger accounts: alice at -3.20, bob at 4.80, carol (no registered user) at -1.00.
    for (user, amount) in [
        ("alice@example.com", "-3.20"),
        ("bob@example.com", "4.80"),
        ("carol@example.com", "-1.00"),
    ] {
        let (status, a) = admin(
            &sys,
            "PUT",
            &format!("/admin/v1/billing/accounts/{user}"),
            Some("{}"),
        )
        .await;
        assert_eq!(status, 200, "{a}");
        let body =
            format!(r#"{{"user":"{user}","amount":"{amount}","key":"k-{user}","reason":"test"}}"#);
        let (status, r) = admin(&sys, "POST", "/admin/v1/billing/adjust", Some(&body)).await;
        assert_eq!(status, 200, "{r}");
    }

    let (status, r) = admin(
        &sys,
        "POST",
        "/admin/v1/billing/notice",
        Some(r#"{"user":"Alice@Example.com","kind":"arrears"}"#),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        (&r["queued"], &r["balance"], &r["user"]),
        (
            &serde_json::json!(true),
            &serde_json::json!("-3.20"),
            &serde_json::json!("alice@example.com")
        )
    );
    let pdus = sys.wait_pdus(0, Duration::from_secs(20)).await.unwrap();
    let (to, text) = system::decode(&pdus[0]).unwrap();
    assert_eq!(to, "+8613800138000");
    assert_eq!(
        text,
        "Your mailbox alice@example.com is in arrears: balance -3.20. Please top up soon."
    );

    let (status, r) = admin(
        &sys,
        "POST",
        "/admin/v1/billing/notice",
        Some(r#"{"user":"bob@example.com","kind":"warning","threshold":"5.00"}"#),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let pdus = sys.wait_pdus(1, Duration::from_secs(20)).await.unwrap();
    let (to, text) = system::decode(&pdus[0]).unwrap();
    assert_eq!(to, "+8613900139000");
    assert_eq!(
        text,
        "您的邮箱 bob@example.com 余额 4.80 元，已低于 5.00 元，请及时充值。"
    );

    // Refusals: no registered user (recorded, not sent), bad input, no ledger account.
    let (status, r) = admin(
        &sys,
        "POST",
        "/admin/v1/billing/notice",
        Some(r#"{"user":"carol@example.com","kind":"arrears"}"#),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["queued"], false);
    assert_eq!(r["reason"], "unknown_user");
    for (body, status, text) in [
        (
            r#"{"user":"bob@example.com","kind":"warning"}"#,
            400,
            "threshold",
        ),
        (
            r#"{"user":"bob@example.com","kind":"arrears","threshold":"1"}"#,
            400,
            "only a warning",
        ),
        (
            r#"{"user":"bob@example.com","kind":"overdue"}"#,
            400,
            "not one of arrears, warning",
        ),
        (
            r#"{"user":"bob@example.com","kind":"warning","threshold":"x"}"#,
            400,
            "threshold",
        ),
        (
            r#"{"user":"nobody@example.com","kind":"arrears"}"#,
            404,
            "unknown account",
        ),
    ] {
        let (s, r) = admin(&sys, "POST", "/admin/v1/billing/notice", Some(body)).await;
        assert_eq!(s, status, "{body}: {r}");
        assert!(r.to_string().contains(text), "{body}: {r}");
    }

    // The accounting run's path: the same decision passed twice (a resumed run) is one SMS.
    outbox_drained(&sys).await;
    let before = sys.pdu_count();
    let decision = BillingNotice {
        login: "alice@example.com".into(),
        kind: BillingKind::Warning {
            balance: Money::parse("-3.20").unwrap(),
            threshold: Money::parse("0").unwrap(),
        },
        at_ms: 1_795_305_600_000,
    };
    let s = &sys.mail.stores;
    let first = send_billing_notices(&s.outbox, &s.users, &s.audit, vec![decision.clone()])
        .await
        .unwrap();
    assert!(matches!(first[0], Outcome::Queued { .. }));
    let new = sys
        .wait_pdus(before, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(
        system::decode(&new[0]).unwrap().1,
        "Your mailbox alice@example.com balance is -3.20, at or below 0.00. Please top up."
    );
    outbox_drained(&sys).await;
    let again = send_billing_notices(&s.outbox, &s.users, &s.audit, vec![decision])
        .await
        .unwrap();
    assert_eq!(again[0].id(), first[0].id());
    outbox_drained(&sys).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sys.pdu_count(), before + 1, "the rerun sent a second SMS");

    // The audit log answers "was she told, and if not, why".
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let names = loop {
        let (_, log) = admin(&sys, "GET", "/admin/v1/log?user=alice@example.com", None).await;
        let names = events(&log);
        if names.iter().filter(|n| *n == "acked").count() >= 3
            || tokio::time::Instant::now() > deadline
        {
            break names;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        names.iter().filter(|n| *n == "billing-notice").count(),
        3,
        "{names:?}"
    );
    for e in ["queued", "sent", "acked"] {
        assert!(names.iter().any(|n| n == e), "{e} missing from {names:?}");
    }
    let (_, log) = admin(&sys, "GET", "/admin/v1/log?user=carol@example.com", None).await;
    assert_eq!(events(&log), ["billing-notice", "dropped"], "{log}");
    assert_eq!(log[1]["reason"], "unknown_user");
    sys.stop().await;
}
