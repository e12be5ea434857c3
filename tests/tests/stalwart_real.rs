//! Interop with a real Stalwart (`stalwart`, e.g. crates.io stalwart-lite 0.16.0 = the 0.15 code
//! base): the shipped stanza `config/stalwart/mailbell-0.15.toml` is what this test configures.
//!
//! ```text
//! SMTP client ──► Stalwart ──MTA hook (data, Bearer token)──► mailbell serve ──link──► agent
//!   (raw TCP)       │  └─REST /api/principal◄── account map ────┘                  (simulated
//!                   └──webhook message-ingest.ham (signed)──────►                      modem)
//! ```
//!
//! Stalwart runs as a child process in a fresh directory (offline boot: spam filter and pyzor
//! off, no TLS, `session.auth.require = false`, free loopback ports), research §8. mailbell and
//! the agent run in this process (`mailbell_tests::system`): this test is about the Stalwart
//! wire formats and configuration, not crash safety. Covered:
//!
//! 1. a message to a local Stalwart user who is not registered with mailbell: the hook and the
//!    ham confirmation arrive, no notice is created, no SMS;
//! 2. a message with an RFC 2047 Chinese Subject and From display name to a registered user: one
//!    SMS to her phone with the decoded subject and name, released by the signed
//!    `message-ingest.ham` webhook (confirm timeout 600 s, so never by the timeout);
//! 3. with `[stalwart_api]` set (account map), a message to two registered users of which only
//!    one can receive mail (Stalwart `disabledPermissions` `email-receive` on the other): only
//!    the delivered user's notice is released; the other stays waiting.
//!
//! Without a `stalwart` binary (PATH, `$STALWART_BIN` or `~/.cargo/bin`) the test is skipped,
//! except under `CI=true`, where it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use base64::Engine;
use mailbell::users::User;
use mailbell_tests::stalwart::{self, Reserved, Stalwart, ADMIN, DOMAIN, HOOK_TOKEN};
use mailbell_tests::system::{self, System};

const ALICE: &str = "alice@test.local";
const ALICE_PHONE: &str = "+8613800138000";
const BOB: &str = "bob@test.local";
const BOB_PHONE: &str = "+8613900139000";
/// A Stalwart account mailbell does not know.
const CAROL: &str = "carol@test.local";

const SUBJECT: &str = "新邮件到达通知测试";
const FROM_NAME: &str = "张三";
const SENDER: &str = "zhangsan@remote.example";

/// Longest wait for one step (Stalwart's webhook throttle is 1 s in the stanza).
const STEP: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalwart_hook_and_webhook_release_the_sms() {
    let Some(bin) = stalwart::binary() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but no stalwart binary (PATH, $STALWART_BIN, ~/.cargo/bin): install stalwart-lite");
        }
        mailbell_tests::skip("no stalwart binary on PATH, in $STALWART_BIN or ~/.cargo/bin");
        return;
    };
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();

    // Stalwart first, so that its principals exist when mailbell loads the account map.
    let mailbell_http = Reserved::new().unwrap();
    let mut stalwart = Stalwart::start(&bin, dir.path(), Some(mailbell_http.addr)).unwrap();
    stalwart.wait_ready(STEP).await.unwrap();
    setup_principals(&stalwart).await.unwrap();

    let http = mailbell_http.release();
    let api_url = format!("http://{}", stalwart.http);
    let sys = system::start(dir.path(), |m, _| {
        m.http_listen = Some(http);
        m.stalwart.hook_token = Some(HOOK_TOKEN.into());
        m.stalwart_api.url = api_url;
        m.stalwart_api.user = ADMIN.0.into();
        m.stalwart_api.secret = ADMIN.1.into();
        m.intake.confirm_timeout_secs = 600;
        m.intake.rate_limit_secs = 0;
    })
    .await
    .unwrap();
    for (addr, phone) in [(ALICE, ALICE_PHONE), (BOB, BOB_PHONE)] {
        let mut u = User::new(addr);
        u.phone = phone.into();
        u.language = "zh".into();
        sys.mail.stores.users.upsert(u).unwrap();
    }
    sys.wait_modems_ready(STEP).await.unwrap();

    let r = scenarios(&stalwart, &sys).await;
    sys.stop().await;
    // Stalwart is still up here: on failure its guard prints its log while unwinding.
    r.unwrap();
    drop(stalwart);
    eprintln!(
        "stalwart_real: passed in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

async fn scenarios(stalwart: &Stalwart, sys: &System) -> anyhow::Result<()> {
    let intake = sys.mail.intake_stats();
    let stat = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);

    // 1. An unregistered local user: the whole path runs, nothing is created or sent.
    let reply =
        stalwart::smtp_send(stalwart.smtp, SENDER, &[CAROL], &message(CAROL, "carol-1")).await?;
    ensure!(reply.starts_with("250"), "carol: {reply}");
    // The webhook brings queue.queue-message and then message-ingest.ham; wait for the ham.
    wait_until("the ham confirmation for carol's message", || {
        stat(&intake.unmatched_confirmations) >= 1
    })
    .await?;
    ensure!(
        stat(&intake.messages) == 1,
        "the hook's data stage reached the intake"
    );
    ensure!(stat(&intake.notices_created) == 0, "no notice for carol");
    ensure!(stat(&intake.unmatched_confirmations) >= 1);
    ensure!(sys.pdus().is_empty(), "no SMS for an unregistered user");

    // 2. A registered user, Chinese headers: released by the ham webhook.
    let sent = Instant::now();
    let reply =
        stalwart::smtp_send(stalwart.smtp, SENDER, &[ALICE], &message(ALICE, "alice-1")).await?;
    ensure!(reply.starts_with("250"), "alice: {reply}");
    let pdus = sys.wait_pdus(0, STEP).await?;
    let waited = sent.elapsed();
    ensure!(pdus.len() == 1, "one SMS, got {}", pdus.len());
    let (to, text) = system::decode(&pdus[0])?;
    ensure!(to == ALICE_PHONE, "SMS to {to}");
    ensure!(text.contains(SUBJECT), "subject missing from {text:?}");
    ensure!(
        text.contains(FROM_NAME),
        "sender name missing from {text:?}"
    );
    // Alice has one address: the SMS leaves it out and keeps room for the subject (issue 9).
    ensure!(
        !text.contains(ALICE),
        "recipient of a one-address user in {text:?}"
    );
    ensure!(
        stat(&intake.confirm_timeouts) == 0,
        "released by the confirmation timeout, not by the webhook"
    );
    ensure!(stat(&intake.confirmations) >= 2);
    eprintln!("stalwart_real: SMTP 250 -> SMS in {waited:?}: {text}");

    // 3. Account map: bob's copy is refused by Stalwart at delivery, so only alice's ham comes;
    //    it must release alice's notice only (without the map it would release bob's too).
    let reply = stalwart::smtp_send(
        stalwart.smtp,
        SENDER,
        &[ALICE, BOB],
        &message(&format!("{ALICE}, {BOB}"), "both-1"),
    )
    .await?;
    ensure!(reply.starts_with("250"), "alice+bob: {reply}");
    let pdus = sys.wait_pdus(1, STEP).await?;
    ensure!(pdus.len() == 1, "one more SMS, got {}", pdus.len());
    let (to, text) = system::decode(&pdus[0])?;
    ensure!(to == ALICE_PHONE, "SMS to {to}: {text}");
    ensure!(
        stat(&intake.notices_created) == 3,
        "the hook listed both recipients ({} notices)",
        stat(&intake.notices_created)
    );
    // Released entries are queued in the same round as alice's: bob's would show here.
    ensure!(
        stat(&intake.queued) == 2,
        "bob's notice was released with alice's ({} queued)",
        stat(&intake.queued)
    );
    ensure!(stat(&intake.confirm_timeouts) == 0);

    let s = sys.mail.stalwart_stats.snapshot();
    ensure!(s.hook_data == 3, "hook data calls: {}", s.hook_data);
    ensure!(s.hook_unauthorized == 0 && s.webhook_bad_signatures == 0);
    ensure!(s.hook_bad_requests == 0 && s.webhook_bad_requests == 0);
    ensure!(sys.pdus().len() == 2, "no SMS for bob");
    Ok(())
}

/// A UTF-8 message with RFC 2047 encoded Subject and From display name and an 8-bit body with
/// a line that needs dot-stuffing.
fn message(to: &str, id: &str) -> String {
    let b = |s: &str| {
        format!(
            "=?UTF-8?B?{}?=",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
    };
    format!(
        "From: {} <{SENDER}>\r\nTo: {to}\r\nSubject: {}\r\nMessage-ID: <{id}@remote.example>\r\n\
         Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
         您好，\r\n这是一封测试邮件。\r\n.这一行以点开头\r\n",
        b(FROM_NAME),
        b(SUBJECT)
    )
}

/// The local domain, alice, bob (who may not receive mail) and carol.
async fn setup_principals(stalwart: &Stalwart) -> anyhow::Result<()> {
    stalwart.add_domain(DOMAIN).await?;
    for addr in [ALICE, BOB, CAROL] {
        stalwart.add_user(addr).await?;
    }
    stalwart
        .api(
            "PATCH",
            "/api/principal/bob",
            Some(serde_json::json!([{"action": "addItem", "field": "disabledPermissions", "value": "email-receive"}])),
        )
        .await?;
    Ok(())
}

/// Polls `done` every 20 ms for up to [`STEP`].
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + STEP;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
