//! Black-box tests of the retrieval proxy's account gating (docs/retrieval.md, "Account
//! gating") against the private Dovecot of `retrieval_support` with poplib, imaplib, raw TCP
//! and the `mailbell` CLI going through the daemon's admin API. Without dovecot the tests print
//! `SKIPPED ...`; under `CI=true` they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mailbell::users::{AccountState, Networks, User};
use support::retrieval::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const TOKEN: &str = "gate-test-token-0123456789";

fn register(p: &Proxy, name: &str, state: AccountState, networks: &str) {
    p.running()
        .stores
        .users
        .upsert(User {
            state,
            networks: Networks::parse(networks).unwrap(),
            notify: false,
            ..User::new(name)
        })
        .unwrap();
}

/// `[ refused unwelcome, refused network, arrears notices, closed by change ]`.
fn gate_stats(p: &Proxy) -> [u64; 4] {
    let st = &p.running().retrieval_stats;
    [
        st.refused_unwelcome.load(Relaxed),
        st.refused_network.load(Relaxed),
        st.arrears_notices.load(Relaxed),
        st.closed_by_change.load(Relaxed),
    ]
}

/// Dovecot's log lines that name `user` (its login, its auth lookups).
fn dovecot_saw(d: &Dovecot, user: &str) -> Vec<String> {
    d.log()
        .lines()
        .filter(|l| l.contains(&format!("user=<{user}>")) || l.contains(&format!("({user},")))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwelcome_and_foreign_networks_are_refused_before_dovecot_hears_of_them() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(
        d.pop3,
        d.imap,
        "unwelcome_text = \"Account closed, call us.\"",
    )
    .await;
    register(&p, "alice@example.org", AccountState::Unwelcome, "");
    // The clients come from 127.0.0.2: outside 10.0.0.0/8 and 2001:db8::/32.
    register(
        &p,
        "bob@example.org",
        AccountState::Normal,
        "10.0.0.0/8,2001:db8::/32",
    );
    for (user, pop3_want, imap_want) in [
        (
            "alice@example.org",
            "-ERR [AUTH] Account closed, call us.",
            "[ALERT] Account closed, call us.",
        ),
        (
            "bob@example.org",
            "-ERR [AUTH] Logins to this account are not allowed from your network.",
            "[AUTHORIZATIONFAILED] Logins to this account are not allowed from your network.",
        ),
    ] {
        let pw = if user == "alice@example.org" {
            "secret"
        } else {
            "hunter2"
        };
        let out = python(POP3_SCRIPT, args(p.port("pop3"), "stls", user, pw, &p.ca)).await;
        assert!(
            out.contains("refused:") && out.contains(pop3_want),
            "{user}: {out}"
        );
        let out = python(IMAP_SCRIPT, args(p.port("imaps"), "ssl", user, pw, &p.ca)).await;
        assert!(
            out.contains("refused:") && out.contains(imap_want),
            "{user}: {out}"
        );
        // Dovecot never heard of the account: no login, no passdb lookup.
        assert_eq!(dovecot_saw(&d, user), Vec::<String>::new(), "{}", d.log());
    }
    assert_eq!(gate_stats(&p), [2, 2, 0, 0]);
    // From an allowed network bob logs in (Dovecot decides the password).
    register(&p, "bob@example.org", AccountState::Normal, "127.0.0.0/8");
    let out = python(
        IMAP_SCRIPT,
        args(p.port("imaps"), "ssl", "bob@example.org", "hunter2", &p.ca),
    )
    .await;
    assert!(out.ends_with("ok\n"), "{out}");
    // An account the registry does not know passes through and is metered by its name.
    p.running()
        .stores
        .users
        .remove("alice@example.org")
        .unwrap();
    let out = python(
        POP3_SCRIPT,
        args(p.port("pop3s"), "ssl", "alice@example.org", "secret", &p.ca),
    )
    .await;
    assert!(out.ends_with("ok\n"), "{out}");
    assert_eq!(field(&out, "msg").len(), messages().len());
    let [logins, retrieved, ..] = p.stats_after(6).await;
    assert_eq!((logins, retrieved), (2, 3));
    // The meter store has every session: the four the gate refused, bob's, and the unknown
    // alice's retrievals under her login name.
    let store = p.meter().clone();
    let records = tokio::task::spawn_blocking(move || {
        store.flush().unwrap();
        store
            .query(&mailbell::meter::MeterQuery {
                limit: 100,
                ..Default::default()
            })
            .unwrap()
            .records
    })
    .await
    .unwrap();
    let seen: Vec<(Option<&str>, mailbell::meter::Login, u64)> = records
        .iter()
        .filter_map(|r| match &r.entry {
            mailbell::meter::Entry::Session(s) => Some((s.account.as_deref(), s.login, s.messages)),
            mailbell::meter::Entry::Messages(_) => None,
        })
        .collect();
    use mailbell::meter::Login::{Ok as In, Refused};
    let (alice, bob) = (Some("alice@example.org"), Some("bob@example.org"));
    assert_eq!(
        seen,
        [
            (alice, Refused, 0),
            (alice, Refused, 0),
            (bob, Refused, 0),
            (bob, Refused, 0),
            (bob, In, 0),
            (alice, In, 3)
        ]
    );
    p.stop().await;
}

/// POP3 as a client of an account in arrears would use it: STAT, LIST, UIDL, RETR and TOP of
/// every message, DELE of every message, QUIT. Prints what it saw.
const ARREARS_POP3: &str = r#"
import poplib, socket, ssl, sys
port, user, password, ca, src = sys.argv[1:6]
poplib.POP3._create_socket = lambda self, timeout: socket.create_connection(
    (self.host, self.port), timeout, source_address=(src, 0))
ctx = ssl.create_default_context(cafile=ca)
p = poplib.POP3_SSL("127.0.0.1", int(port), context=ctx, timeout=10)
try:
    p.user(user)
    p.pass_(password)
except poplib.error_proto as e:
    print("refused:", e)
    sys.exit(0)
count, size = p.stat()
print("stat", count, size)
print("list", p.list()[1])
print("uidl", p.uidl()[1])
for i in range(1, count + 1):
    resp, lines, octets = p.retr(i)
    print("msg", b"".join(l + b"\r\n" for l in lines).hex())
    print("top", len(p.top(i, 0)[1]))
    print("dele", p.dele(i))
print("stat_after_dele", p.stat())
print("quit", p.quit())
print("ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrears_sees_only_the_payment_notice_and_the_mailbox_is_untouched() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(
        d.pop3,
        d.imap,
        "notice_subject = \"Unpaid: {address}\"\nnotice_from = \"billing@isp.example\"",
    )
    .await;
    register(&p, "alice@example.org", AccountState::Arrears, "");
    let run = |user: &str, pw: &str| {
        vec![
            p.port("pop3s").to_string(),
            user.into(),
            pw.into(),
            p.ca.display().to_string(),
            CLIENT_IP.into(),
        ]
    };
    // The password must still be right: Dovecot refuses a wrong one.
    let out = python(ARREARS_POP3, run("alice@example.org", "wrong")).await;
    assert!(
        out.contains("refused:") && !out.contains("arrears"),
        "{out}"
    );
    let out = python(ARREARS_POP3, run("alice@example.org", "secret")).await;
    assert!(out.ends_with("ok\n"), "{out}\n{}", d.log());
    // Exactly one message, listed and sized consistently, and it is the notice.
    let stat = field(&out, "stat")[0];
    let size: usize = stat.strip_prefix("1 ").unwrap().parse().unwrap();
    assert_eq!(field(&out, "list"), [format!("[b'1 {size}']")]);
    assert!(
        field(&out, "uidl")[0].starts_with("[b'1 mailbell-notice-"),
        "{out}"
    );
    let notices = field(&out, "msg");
    assert_eq!(notices.len(), 1, "{out}");
    let bytes = (0..notices[0].len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&notices[0][i..i + 2], 16).unwrap())
        .collect::<Vec<u8>>();
    assert_eq!(bytes.len(), size, "RETR gives STAT's size once un-stuffed");
    let notice = String::from_utf8(bytes).unwrap();
    for want in [
        "From: <billing@isp.example>",
        "To: <alice@example.org>",
        "Subject: Unpaid: alice@example.org",
        "Message-ID: <mailbell-notice-",
        "Date: ",
        "The mail account alice@example.org is in arrears",
    ] {
        assert!(notice.contains(want), "{want:?} not in {notice}");
    }
    assert_eq!(field(&out, "stat_after_dele"), ["(0, 0)"]);
    assert!(field(&out, "quit")[0].starts_with("b'+OK"), "{out}");
    // Dovecot logged alice in (the password was checked) and she retrieved and deleted
    // nothing there: the session ended with QUIT before any other command.
    let log = wait_log(&d, "retr=0/0").await;
    assert!(log.contains("user=<alice@example.org>"), "{log}");
    assert!(log.contains("retr=0/0, del=0/3"), "{log}");
    // A client that pipelines RETR and DELE behind its password: they are held until Dovecot
    // accepted it, then answered from the notice; Dovecot sees none of them.
    let mut s = tls_connect(p.addr("pop3s"), &p.ca).await;
    let (greeting, _) = read_until(&mut s, Duration::from_secs(3), |g| g.ends_with("\r\n")).await;
    assert!(greeting.starts_with("+OK"), "{greeting:?}");
    s.write_all(b"USER alice@example.org\r\nPASS secret\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n")
        .await
        .unwrap();
    let (got, eof) = read_until(&mut s, Duration::from_secs(5), |_| false).await;
    assert!(eof, "{got:?}");
    assert!(
        got.contains("Subject: Unpaid: alice@example.org"),
        "{got:?}"
    );
    assert!(
        got.ends_with(".\r\n+OK Marked to be deleted.\r\n+OK Logging out.\r\n"),
        "{got:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.log().matches("retr=0/0, del=0/3").count() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        d.log().matches("retr=0/0, del=0/3").count(),
        2,
        "{}",
        d.log()
    );
    // IMAP: the login is answered NO [ALERT] after Dovecot accepted the password.
    let out = python(
        IMAP_SCRIPT,
        args(p.port("imaps"), "ssl", "alice@example.org", "secret", &p.ca),
    )
    .await;
    assert!(
        out.contains("refused:") && out.contains("[ALERT] This account is in arrears"),
        "{out}"
    );
    // Pipelined behind the LOGIN, a SELECT and a FETCH never reach Dovecot.
    let mut s = tls_connect(p.addr("imaps"), &p.ca).await;
    let (greeting, _) = read_until(&mut s, Duration::from_secs(3), |g| g.ends_with("\r\n")).await;
    assert!(greeting.starts_with("* OK"), "{greeting:?}");
    s.write_all(b"a LOGIN alice@example.org secret\r\nb SELECT INBOX\r\nc FETCH 1 BODY[]\r\n")
        .await
        .unwrap();
    let (got, eof) = read_until(&mut s, Duration::from_secs(5), |_| false).await;
    assert!(eof, "{got:?}");
    assert!(
        got.starts_with("a NO [ALERT] This account is in arrears")
            && got.ends_with("\r\n* BYE Logging out\r\n"),
        "{got:?}"
    );
    // Dovecot's two IMAP sessions for alice read only the proxy's LOGOUT after the login.
    let logouts = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("imap(alice@example.org)") && l.contains("Logged out"))
            .map(str::to_owned)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while logouts(&d.log()).len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines = logouts(&d.log());
    assert_eq!(lines.len(), 2, "{}", d.log());
    for l in lines {
        // in= counts what the mail process read after the login: "ZZ LOGOUT" (Dovecot 2.3
        // gives 9), not the 38 bytes of the SELECT and FETCH.
        let input: u64 = l
            .split("in=")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            input <= "ZZ LOGOUT\r\n".len() as u64 && l.contains("body_count=0"),
            "{l}"
        );
    }
    assert_eq!(gate_stats(&p), [0, 0, 4, 0]);
    // Paid: the real mailbox is all there, untouched by the DELE in arrears.
    register(&p, "alice@example.org", AccountState::Normal, "");
    let out = python(
        POP3_SCRIPT,
        args(p.port("pop3s"), "ssl", "alice@example.org", "secret", &p.ca),
    )
    .await;
    assert!(out.ends_with("ok\n"), "{out}");
    let want: Vec<String> = messages().iter().map(|m| hex(m)).collect();
    assert_eq!(field(&out, "msg"), want);
    p.stop().await;
}

/// A config file for the `mailbell` CLI that goes through the proxy daemon's admin API.
fn cli_config(dir: &Path, p: &Proxy) -> PathBuf {
    let admin = p.running().admin_addr.unwrap();
    let path = dir.join("mailbell.toml");
    std::fs::write(
        &path,
        format!(
            "[mailbell]\ndata_dir = {:?}\n[listen]\nadmin = \"{admin}\"\n[admin]\ntoken = \"{TOKEN}\"\n",
            dir.join("data")
        ),
    )
    .unwrap();
    path
}

async fn cli(config: &Path, args: &[&str]) {
    let what = args.join(" ");
    let (config, args): (PathBuf, Vec<String>) = (
        config.to_owned(),
        args.iter().map(|a| a.to_string()).collect(),
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_mailbell"))
            .arg("--config")
            .arg(&config)
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "mailbell {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Connects to `listener` (implicit TLS), sends `login` and waits for `done`.
async fn logged_in(
    p: &Proxy,
    listener: &str,
    login: &[u8],
    done: &'static str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut s = tls_connect(p.addr(listener), &p.ca).await;
    let (greeting, _) = read_until(&mut s, Duration::from_secs(3), |g| g.ends_with("\r\n")).await;
    assert!(greeting.ends_with("\r\n"), "{greeting:?}");
    s.write_all(login).await.unwrap();
    let (got, eof) = read_until(&mut s, Duration::from_secs(5), |g| g.contains(done)).await;
    assert!(got.contains(done) && !eof, "{listener}: {got:?}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_session_ends_when_user_set_changes_its_account() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start_with(d.pop3, d.imap, Some(TOKEN), "").await;
    let dir = tempfile::tempdir().unwrap();
    let config = cli_config(dir.path(), &p);
    register(&p, "bob@example.org", AccountState::Normal, "");
    let mut pop = logged_in(
        &p,
        "pop3s",
        b"USER bob@example.org\r\nPASS hunter2\r\nSTAT\r\n",
        "+OK 0 0",
    )
    .await;
    // IMAP in IDLE: the command boundary is now, not when IDLE ends (up to 30 minutes).
    let mut imap = logged_in(
        &p,
        "imaps",
        b"a1 LOGIN bob@example.org hunter2\r\na2 SELECT INBOX\r\na3 IDLE\r\n",
        "+ idling",
    )
    .await;
    let started = Instant::now();
    cli(
        &config,
        &["user", "set", "bob@example.org", "--state", "unwelcome"],
    )
    .await;
    let answered = started.elapsed();
    let (got, eof) = read_until(&mut imap, Duration::from_secs(5), |g| g.ends_with("\r\n")).await;
    eprintln!(
        "user set answered after {answered:?}, IDLE session told after {:?}",
        started.elapsed()
    );
    assert_eq!(
        got,
        "* BYE [ALERT] This account is closed. Please contact your mail provider.\r\n"
    );
    let (rest, eof) = if eof {
        (String::new(), eof)
    } else {
        read_until(&mut imap, Duration::from_secs(5), |_| false).await
    };
    assert_eq!(rest, "");
    assert!(eof);
    let (got, eof) = read_until(&mut pop, Duration::from_secs(5), |_| false).await;
    assert_eq!(
        got,
        "-ERR [AUTH] This account is closed. Please contact your mail provider.\r\n"
    );
    assert!(eof);
    assert!(started.elapsed() < Duration::from_secs(5));
    // A network change reaches a live session the same way.
    cli(
        &config,
        &["user", "set", "bob@example.org", "--state", "normal"],
    )
    .await;
    let mut pop = logged_in(
        &p,
        "pop3s",
        b"USER bob@example.org\r\nPASS hunter2\r\n",
        "+OK Logged in",
    )
    .await;
    cli(
        &config,
        &[
            "user",
            "set",
            "bob@example.org",
            "--networks",
            "10.0.0.0/8, 2001:db8::/32",
        ],
    )
    .await;
    let (got, eof) = read_until(&mut pop, Duration::from_secs(5), |_| false).await;
    assert_eq!(
        got,
        "-ERR [AUTH] Logins to this account are not allowed from your network.\r\n"
    );
    assert!(eof);
    // A change to another account leaves a session alone.
    cli(
        &config,
        &["user", "set", "bob@example.org", "--networks", "any"],
    )
    .await;
    let mut pop = logged_in(
        &p,
        "pop3s",
        b"USER bob@example.org\r\nPASS hunter2\r\n",
        "+OK Logged in",
    )
    .await;
    register(&p, "carol@example.org", AccountState::Unwelcome, "");
    pop.write_all(b"NOOP\r\n").await.unwrap();
    let (got, _) = read_until(&mut pop, Duration::from_secs(3), |g| g.ends_with("\r\n")).await;
    assert_eq!(got, "+OK\r\n");
    assert_eq!(gate_stats(&p)[3], 3);
    p.stop().await;
}

/// A POP3 backend that logs anyone in and answers `RETR` in two halves, the second once
/// `release` is notified.
async fn two_part_backend(release: std::sync::Arc<tokio::sync::Notify>) -> u16 {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        assert!(skip_proxy_header(&mut s).await);
        s.write_all(b"+OK fake\r\n").await.unwrap();
        assert!(answer_probe(&mut s).await);
        let mut lines = BufReader::new(s);
        let mut line = String::new();
        while lines.read_line(&mut line).await.unwrap() > 0 {
            let s = lines.get_mut();
            if line.starts_with("RETR") {
                s.write_all(b"+OK 14 octets\r\npart 1\r\n").await.unwrap();
                release.notified().await;
                s.write_all(b"part 2\r\n.\r\n").await.unwrap();
            } else {
                s.write_all(b"+OK\r\n").await.unwrap();
            }
            line.clear();
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_during_a_reply_ends_the_session_right_after_it() {
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let backend = two_part_backend(release.clone()).await;
    let p = Proxy::start(backend, backend, "").await;
    register(&p, "bob@example.org", AccountState::Normal, "");
    let mut s = logged_in(
        &p,
        "pop3s",
        b"USER bob@example.org\r\nPASS x\r\n",
        "+OK\r\n+OK\r\n",
    )
    .await;
    s.write_all(b"RETR 1\r\n").await.unwrap();
    let (got, _) = read_until(&mut s, Duration::from_secs(3), |g| g.contains("part 1")).await;
    assert_eq!(got, "+OK 14 octets\r\npart 1\r\n");
    register(&p, "bob@example.org", AccountState::Unwelcome, "");
    // Give the session time to see the change mid-message (it must not cut the message).
    tokio::time::sleep(Duration::from_millis(200)).await;
    release.notify_one();
    let (rest, eof) = read_until(&mut s, Duration::from_secs(3), |_| false).await;
    assert_eq!(
        rest,
        "part 2\r\n.\r\n-ERR [AUTH] This account is closed. Please contact your mail provider.\r\n"
    );
    assert!(eof);
    p.stop().await;
}

/// The accounting run drives an account into arrears (pending traffic above its prepaid
/// balance): through the proxy, poplib sees only the payment notice, with the balance from
/// the ledger; a top-up through the CLI restores the mailbox at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_arrears_shows_the_notice_with_the_balance_until_a_topup() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start_with(
        d.pop3,
        d.imap,
        Some(TOKEN),
        "notice_text = \"Account {address} is in arrears: balance {balance} yuan. Please top up.\"",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = cli_config(dir.path(), &p);
    register(&p, "alice@example.org", AccountState::Normal, "");
    for args in [
        &[
            "billing",
            "account",
            "set",
            "alice@example.org",
            "--class",
            "student",
        ][..],
        &["billing", "tariff", "set", "student", "foreign", "0.30"],
        &[
            "billing",
            "topup",
            "alice@example.org",
            "1.00",
            "--key",
            "k1",
        ],
    ] {
        cli(&config, args).await;
    }
    // 10 MB of foreign mail delivered on a past day and never retrieved: 3.00 pending.
    let day =
        mailbell::billing::run::Period::day(chrono::NaiveDate::from_ymd_opt(2026, 11, 2).unwrap())
            .unwrap();
    p.running()
        .stores
        .ledger
        .call(move |s| {
            s.record_deliveries(&[mailbell::billing::ledger::Delivery {
                message_key: "milter:4Xyz".into(),
                account: "alice@example.org".into(),
                zone: Some(mailbell::policy::zones::Zone::Foreign),
                bytes: 10 << 20,
                at_ms: day.start_ms + 3_600_000,
            }])
        })
        .await
        .unwrap();
    cli(&config, &["billing", "run", "--date", "2026-11-02"]).await;
    let out = python(
        ARREARS_POP3,
        vec![
            p.port("pop3s").to_string(),
            "alice@example.org".into(),
            "secret".into(),
            p.ca.display().to_string(),
            CLIENT_IP.into(),
        ],
    )
    .await;
    assert!(out.ends_with("ok\n"), "{out}");
    let notice = field(&out, "msg")[0].to_owned();
    let text = String::from_utf8(
        (0..notice.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&notice[i..i + 2], 16).unwrap())
            .collect(),
    )
    .unwrap();
    assert!(
        text.contains("Account alice@example.org is in arrears: balance -2.00 yuan"),
        "{text}"
    );
    // Paid: normal at once, the real mailbox is back.
    cli(
        &config,
        &[
            "billing",
            "topup",
            "alice@example.org",
            "5.00",
            "--key",
            "k2",
        ],
    )
    .await;
    let out = python(
        POP3_SCRIPT,
        args(p.port("pop3s"), "ssl", "alice@example.org", "secret", &p.ca),
    )
    .await;
    assert!(out.ends_with("ok\n"), "{out}");
    let want: Vec<String> = messages().iter().map(|m| hex(m)).collect();
    assert_eq!(field(&out, "msg"), want);
    p.stop().await;
}
