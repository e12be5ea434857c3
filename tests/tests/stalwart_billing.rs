//! Traffic billing with a real Stalwart (e.g. crates.io stalwart-lite 0.16.0) end to end:
//! mail delivered by Stalwart is metered from its `message-ingest.ham` webhook events (the
//! account id mapped to the address through `[stalwart_api]`), retrieved over IMAP through
//! mailbell's proxy (metered with the client's address), and charged by `mailbell billing
//! run --now`: accounted before the retrieval it is pending; the retrieval posts it. With a
//! third message pending the account is in arrears: the registry
//! state reaches the proxy, and Stalwart's own read permissions are withheld through its
//! management API (`disabledPermissions` pop3-retr, imap-fetch). A top-up restores both at
//! once. Without a `stalwart` binary or python3 the test is skipped, except under `CI=true`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use mailbell::users::access::AccountState;
use mailbell::users::User;
use mailbell_tests::stalwart::{self, Reserved, Stalwart, ADMIN, DOMAIN, HOOK_TOKEN};
use mailbell_tests::system;

const ALICE: &str = "alice@test.local";
const STEP: Duration = Duration::from_secs(30);

/// IMAP through the proxy (implicit TLS): LOGIN with Stalwart's account name (the proxy's
/// `default_realm` makes it the address for gating and metering), SELECT, FETCH every
/// message; prints "msgs N" and "ok", or "refused: ..." when the login or FETCH fails.
const IMAP_SCRIPT: &str = r#"
import imaplib, ssl, sys
port, ca, user, pw = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca)
m = imaplib.IMAP4_SSL("127.0.0.1", int(port), ssl_context=ctx, timeout=10)
try:
    m.login(user, pw)
except imaplib.IMAP4.error as e:
    print("refused:", e)
    sys.exit(0)
typ, data = m.select("INBOX")
n = int(data[0])
for i in range(1, n + 1):
    typ, data = m.fetch(str(i), "(BODY.PEEK[])")
print("msgs", n)
m.logout()
print("ok")
"#;

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A message of about `kb` KiB.
fn message(id: &str, kb: usize) -> String {
    let line = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstu\r\n";
    format!(
        "From: <sender@remote.example>\r\nTo: <{ALICE}>\r\nSubject: traffic {id}\r\n\
         Message-ID: <{id}@remote.example>\r\n\r\n{}",
        line.repeat(kb * 1024 / line.len())
    )
}

/// One admin API call (what `mailbell billing ...` sends); the JSON answer.
async fn admin(
    sys: &system::System,
    method: &str,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let b = body.to_string();
    let r = mailbell_link::http::request(
        sys.mail.admin_addr.unwrap(),
        method,
        path,
        Some(&format!("Bearer {}", system::ADMIN_TOKEN)),
        (method != "GET").then_some(("application/json", b.as_bytes())),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{method} {path}: {}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

async fn imap(port: u16, ca: &str) -> String {
    let (port, ca) = (port.to_string(), ca.to_owned());
    let o = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-c", IMAP_SCRIPT, &port, &ca, "alice", "alicepw"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn disabled_permissions(st: &Stalwart) -> Vec<String> {
    let v = st.api("GET", "/api/principal/alice", None).await.unwrap();
    v["data"]["disabledPermissions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalwart_deliveries_are_charged_at_the_retrieval_and_arrears_reach_stalwart() {
    let Some(bin) = stalwart::binary() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but no stalwart binary (PATH, $STALWART_BIN, ~/.cargo/bin)"
        );
        mailbell_tests::skip("no stalwart binary on PATH, in $STALWART_BIN or ~/.cargo/bin");
        return;
    };
    if !have("python3") {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3 missing under CI"
        );
        mailbell_tests::skip("python3 not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The free zone's sender domain and its SPF record, served on loopback.
    let dns = mailbell_tests::dns::start(&[("uni.example", "v=spf1 ip4:127.0.0.0/8 -all")])
        .await
        .unwrap();
    let free_domains = dir.path().join("free-domains.txt");
    std::fs::write(&free_domains, "uni.example\n").unwrap();
    let mailbell_http = Reserved::new().unwrap();
    let mut st = Stalwart::start(&bin, dir.path(), Some(mailbell_http.addr)).unwrap();
    st.wait_ready(STEP).await.unwrap();
    st.add_domain(DOMAIN).await.unwrap();
    st.add_user(ALICE).await.unwrap();

    let pki = mailbell_link::pki::ensure_dev_pki(
        &dir.path().join("pki"),
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
        "mailhost",
        false,
    )
    .unwrap();
    let http = mailbell_http.release();
    let toml = format!(
        "[mailbell]\ndata_dir = {data:?}\n[listen]\nhttp = \"{http}\"\nmilter = \"\"\n\
         admin = \"127.0.0.1:0\"\n[admin]\ntoken = \"{token}\"\n\
         [stalwart]\nsignature_key = \"{key}\"\nhook_token = \"{HOOK_TOKEN}\"\n\
         [stalwart_api]\nurl = \"http://{api}\"\nuser = \"{user}\"\nsecret = \"{secret}\"\n\
         [link]\ndev_pki_dir = {pki_dir:?}\n\
         [billing]\nmeter_deliveries = true\nstalwart_permissions = true\n\
         [zones]\nfree_domains = [{free_domains:?}]\nverify_spf = true\n\
         nameservers = [\"{dns}\"]\ndns_timeout = \"2s\"\n\
         [retrieval]\nimaps = \"127.0.0.1:0\"\nbackend_imap = \"{backend}\"\n\
         backend_pop3 = \"127.0.0.1:9\"\ncert = {cert:?}\nkey = {keyfile:?}\n\
         default_realm = \"{DOMAIN}\"\n",
        data = dir.path().join("mail"),
        token = system::ADMIN_TOKEN,
        key = system::WEBHOOK_KEY,
        api = st.http,
        user = ADMIN.0,
        secret = ADMIN.1,
        pki_dir = dir.path().join("pki"),
        backend = st.imap_proxied,
        cert = pki.agent_cert,
        keyfile = pki.agent_key,
        dns = dns.addr,
    );
    let sys = system::start(dir.path(), |m, _| {
        let agents = m.link.agents.clone();
        *m = mailbell::config::Config::from_toml(&toml, "test").unwrap();
        m.link.agents = agents;
    })
    .await
    .unwrap();
    let mut u = User::new(ALICE);
    u.phone = "+8613800138000".into();
    sys.mail.stores.users.upsert(u).unwrap();
    let account = format!("/admin/v1/billing/accounts/{ALICE}");
    admin(
        &sys,
        "PUT",
        &account,
        serde_json::json!({"class": "student"}),
    )
    .await;
    for (zone, price) in [("foreign", "100"), ("free", "0")] {
        admin(
            &sys,
            "PUT",
            "/admin/v1/billing/tariffs",
            serde_json::json!({"class": "student", "zone": zone, "price_per_mb": price}),
        )
        .await;
    }
    let topup =
        |amount: &str, key: &str| serde_json::json!({"user": ALICE, "amount": amount, "key": key});
    admin(
        &sys,
        "POST",
        "/admin/v1/billing/topup",
        topup("10.00", "t1"),
    )
    .await;

    // A message from the free zone: its sender's SPF passes for Stalwart's client address
    // (checked by mailbell: Stalwart's hooks run before it adds Authentication-Results).
    let reply = stalwart::smtp_send(st.smtp, "prof@uni.example", &[ALICE], &message("f1", 40))
        .await
        .unwrap();
    assert!(reply.starts_with("250"), "{reply}");
    // Two messages of ~40 KiB from outside the free zone: about 3.9 each at 100.00 per MB.
    for id in ["m1", "m2"] {
        let reply =
            stalwart::smtp_send(st.smtp, "sender@remote.example", &[ALICE], &message(id, 40))
                .await
                .unwrap();
        assert!(reply.starts_with("250"), "{reply}");
    }
    let deadline = Instant::now() + STEP;
    loop {
        let n = sys
            .mail
            .stores
            .ledger
            .call(|s| s.unconsumed_deliveries(10))
            .await
            .unwrap();
        if n.len() == 3 {
            assert!(
                n.iter().all(|d| d.account.starts_with("stalwart:")),
                "{n:?}"
            );
            // Stalwart's queue delivers the three in any order (they can land in the same
            // millisecond), so count the zones rather than expect an order.
            use mailbell::policy::zones::Zone;
            let free = n.iter().filter(|d| d.zone == Zone::Free).count();
            let foreign = n.iter().filter(|d| d.zone == Zone::Foreign).count();
            assert_eq!((free, foreign), (1, 2), "{n:?}");
            break;
        }
        assert!(Instant::now() < deadline, "deliveries not metered: {n:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let run_now = || async {
        // The session record is written at LOGOUT; then an ad-hoc run takes it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        admin(
            &sys,
            "POST",
            "/admin/v1/billing/run",
            serde_json::json!({"now": true}),
        )
        .await
    };
    let money = |v: &serde_json::Value| -> f64 { v.as_str().unwrap().parse().unwrap() };
    // Accounted before any retrieval: the traffic is pending (reserved, not charged).
    let r = run_now().await;
    let run = r.to_string();
    let s = &r["summary"];
    assert_eq!(
        (s["deliveries"].as_u64(), s["retrievals"].as_u64()),
        (Some(3), Some(0)),
        "{run}"
    );
    assert_eq!(
        s["unbilled"], 0,
        "the Stalwart account id maps to the address: {run}"
    );
    assert_eq!(
        (s["charges"].as_u64(), s["pending"].as_u64()),
        (Some(0), Some(1)),
        "{run}"
    );
    let first = money(&s["pending_amount"]);
    assert!(first > 7.0 && first < 9.0, "{run}");
    assert_eq!(r["effects"]["states"], 0, "still above zero: {run}");
    assert_eq!(r["effects"]["notices"], 1, "below the 10.00 warning: {run}");

    let port = sys
        .mail
        .retrieval_addrs
        .iter()
        .find(|(n, _)| *n == "imaps")
        .unwrap()
        .1
        .port();
    let ca = pki.ca_cert.display().to_string();
    let out = imap(port, &ca).await;
    assert!(out.contains("msgs 3") && out.ends_with("ok\n"), "{out}");
    // One more message after the retrieval.
    let reply = stalwart::smtp_send(
        st.smtp,
        "sender@remote.example",
        &[ALICE],
        &message("m3", 40),
    )
    .await
    .unwrap();
    assert!(reply.starts_with("250"), "{reply}");
    let deadline = Instant::now() + STEP;
    while sys
        .mail
        .stores
        .ledger
        .call(|s| s.unconsumed_deliveries(10))
        .await
        .unwrap()
        .len()
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "the third delivery was not metered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The retrieval posts the pending charge (with its time and client address); the third
    // message is pending now, and the two together overdraw the account.
    let r = run_now().await;
    let run = r.to_string();
    let s = &r["summary"];
    assert_eq!(
        (s["deliveries"].as_u64(), s["retrievals"].as_u64()),
        (Some(1), Some(1)),
        "{run}"
    );
    assert_eq!(s["pending_posted"], 1, "{run}");
    assert_eq!(money(&s["charged"]), first, "{run}");
    let third = money(&s["pending_amount"]);
    let charged = first + third;
    assert!(10.0 - charged < 0.0, "{run}");
    assert_eq!(r["effects"]["states"], 1, "{run}");
    assert_eq!(
        r["effects"]["notices"], 1,
        "the arrears SMS is queued: {run}"
    );
    assert_eq!(r["effects"]["stalwart_failed"], 0, "{run}");

    let statement = admin(&sys, "GET", &account, serde_json::json!(null)).await;
    assert_eq!(statement["account"]["status"], "arrears", "{statement}");
    assert_eq!(
        sys.mail.stores.users.get(ALICE).unwrap().unwrap().state,
        AccountState::Arrears
    );
    let mut perms = disabled_permissions(&st).await;
    perms.sort();
    assert!(
        perms.contains(&"imap-fetch".to_owned()) && perms.contains(&"pop3-retr".to_owned()),
        "{perms:?}"
    );
    // The arrears SMS reaches the modem, with the available balance.
    let balance = format!("{:.2}", 10.0 - charged);
    let deadline = Instant::now() + STEP;
    let sms = loop {
        let texts: Vec<String> = sys
            .pdus()
            .iter()
            .filter_map(|p| system::decode(p).ok().map(|(_, t)| t))
            .collect();
        if let Some(t) = texts.iter().find(|t| t.contains(&balance)) {
            break t.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no arrears SMS with {balance}: {texts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(sms.contains(ALICE), "{sms}");
    // Through the proxy: refused with the payment alert.
    let out = imap(port, &ca).await;
    assert!(out.contains("refused:") && out.contains("arrears"), "{out}");

    // Paid: the registry and Stalwart give the mailbox back at once.
    admin(
        &sys,
        "POST",
        "/admin/v1/billing/topup",
        topup("20.00", "t2"),
    )
    .await;
    assert_eq!(
        sys.mail.stores.users.get(ALICE).unwrap().unwrap().state,
        AccountState::Normal
    );
    let perms = disabled_permissions(&st).await;
    assert!(
        !perms.contains(&"imap-fetch".to_owned()) && !perms.contains(&"pop3-retr".to_owned()),
        "{perms:?}"
    );
    let out = imap(port, &ca).await;
    assert!(out.contains("msgs 4") && out.ends_with("ok\n"), "{out}");
    assert!(dns.queries.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    let v = admin(
        &sys,
        "GET",
        "/admin/v1/billing/verify",
        serde_json::json!(null),
    )
    .await;
    assert!(v["problem"].is_null(), "{v}");
    sys.stop().await;
    drop(st);
}
