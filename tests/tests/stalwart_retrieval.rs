//! The retrieval proxy in front of a real Stalwart IMAP listener (`stalwart`, e.g. crates.io
//! stalwart-lite 0.16.0) that trusts PROXY headers from 127.0.0.1 (`proxy.trusted-networks`).
//! Stalwart refuses POP3 listeners, so only IMAP: POP3 is tested against Dovecot
//! (plugin/tests/retrieval_dovecot.rs).
//!
//! Mail goes into Stalwart over SMTP; Python's imaplib (STARTTLS and implicit TLS) and curl
//! (imaps://) retrieve it through the proxy from 127.0.0.2. The proxy's metered bytes equal the
//! literal sizes the clients got, which equal Stalwart's RFC822.SIZE; Stalwart's log shows the
//! clients' address, not the proxy's (PROXY v2 works). Without a `stalwart` binary (PATH,
//! `$STALWART_BIN` or `~/.cargo/bin`), python3 or curl the test is skipped, except under
//! `CI=true`, where it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mailbell_tests::stalwart::{self, Stalwart, DOMAIN};

const ALICE: &str = "alice@test.local";
/// The clients' source address: an address Stalwart logs can only come from the PROXY header.
const CLIENT_IP: &str = "127.0.0.2";
const STEP: Duration = Duration::from_secs(30);

/// IMAP through the proxy: STARTTLS (unless "ssl"), LOGIN, SELECT, then per message
/// `FETCH n (RFC822.SIZE BODY.PEEK[])`; prints "msg SIZE LITERAL_LENGTH HEX" and "ok".
const IMAP_SCRIPT: &str = r#"
import imaplib, re, socket, ssl, sys
port, mode, ca, src = sys.argv[1:5]
imaplib.IMAP4._create_socket = lambda self, timeout: socket.create_connection(
    (self.host, self.port), timeout, source_address=(src, 0))
ctx = ssl.create_default_context(cafile=ca)
if mode == "ssl":
    m = imaplib.IMAP4_SSL("127.0.0.1", int(port), ssl_context=ctx, timeout=10)
else:
    m = imaplib.IMAP4("127.0.0.1", int(port), timeout=10)
    m.starttls(ssl_context=ctx)
m.login("alice", "alicepw")
typ, data = m.select("INBOX")
for i in range(1, int(data[0]) + 1):
    typ, data = m.fetch(str(i), "(RFC822.SIZE BODY.PEEK[])")
    size = int(re.search(rb"RFC822.SIZE (\d+)", data[0][0]).group(1))
    print("msg", size, len(data[0][1]), data[0][1].hex())
m.logout()
print("ok")
"#;

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn message(i: usize) -> String {
    let body: String = (0..50 * i)
        .map(|n| format!("line {n} of message {i}\r\n"))
        .collect();
    format!(
        "From: sender@remote.example\r\nTo: {ALICE}\r\nSubject: retrieval {i}\r\n\
         Message-ID: <r{i}@remote.example>\r\n\r\n.a line with a leading dot\r\n{body}"
    )
}

/// Runs `cmd` off the runtime; returns stdout, panics with stderr on failure.
async fn run(mut cmd: Command) -> String {
    tokio::task::spawn_blocking(move || {
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{cmd:?}: {}\nstdout: {stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    })
    .await
    .unwrap()
}

/// Stalwart's `auth.success` lines of the proxied listener, once there are `n` (or 10 s on).
async fn proxied_logins(s: &Stalwart, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&s.log).unwrap_or_default();
        let logins: Vec<String> = log
            .lines()
            .filter(|l| l.contains("(auth.success)"))
            .filter(|l| l.contains("listenerId = \"imap-proxied\""))
            .map(str::to_owned)
            .collect();
        if logins.len() >= n || Instant::now() > deadline {
            return logins;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_through_the_proxy_to_stalwart_is_metered_and_keeps_the_client_address() {
    let Some(bin) = stalwart::binary() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but no stalwart binary (PATH, $STALWART_BIN, ~/.cargo/bin): install stalwart-lite");
        }
        mailbell_tests::skip("no stalwart binary on PATH, in $STALWART_BIN or ~/.cargo/bin");
        return;
    };
    for tool in ["python3", "curl"] {
        if !have(tool) {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{tool} missing under CI"
            );
            mailbell_tests::skip(&format!("{tool} not installed"));
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut st = Stalwart::start(&bin, dir.path(), None).unwrap();
    st.wait_ready(STEP).await.unwrap();
    st.add_domain(DOMAIN).await.unwrap();
    st.add_user(ALICE).await.unwrap();
    let sent: Vec<String> = (1..=3).map(message).collect();
    for m in &sent {
        let reply = stalwart::smtp_send(st.smtp, "sender@remote.example", &[ALICE], m)
            .await
            .unwrap();
        assert!(reply.starts_with("250"), "{reply}");
    }
    let deadline = Instant::now() + STEP;
    while st.inbox_count(ALICE).await.unwrap() < 3 {
        assert!(Instant::now() < deadline, "mail not delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The proxy in this process, in front of the listener that trusts PROXY headers.
    let pki = mailbell_link::pki::ensure_dev_pki(
        &dir.path().join("pki"),
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
        "mailhost",
        false,
    )
    .unwrap();
    let toml = format!(
        "[mailbell]\ndata_dir = {data:?}\n[listen]\nhttp = \"\"\nmilter = \"\"\nadmin = \"\"\n\
         [link]\ndev_pki_dir = {pki_dir:?}\n\
         [retrieval]\nimap = \"127.0.0.1:0\"\nimaps = \"127.0.0.1:0\"\n\
         backend_imap = \"{backend}\"\nbackend_pop3 = \"127.0.0.1:9\"\n\
         cert = {cert:?}\nkey = {key:?}\n",
        data = dir.path().join("data"),
        pki_dir = dir.path().join("pki"),
        backend = st.imap_proxied,
        cert = pki.agent_cert,
        key = pki.agent_key,
    );
    let cfg = mailbell::config::Config::from_toml(&toml, "test").unwrap();
    let running = mailbell::app::start(cfg, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    let port = |name: &str| {
        running
            .retrieval_addrs
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
            .port()
    };
    let stats = running.retrieval_stats.clone();
    let ca = pki.ca_cert.display().to_string();

    let mut first = String::new();
    for (listener, mode) in [("imap", "starttls"), ("imaps", "ssl")] {
        let before = stats.retrieved_bytes.load(Relaxed);
        let mut cmd = Command::new("python3");
        cmd.args([
            "-c",
            IMAP_SCRIPT,
            &port(listener).to_string(),
            mode,
            &ca,
            CLIENT_IP,
        ]);
        let out = run(cmd).await;
        assert!(out.ends_with("ok\n"), "{listener}: {out}");
        let mut literal_bytes = 0;
        let msgs: Vec<Vec<&str>> = out
            .lines()
            .filter_map(|l| l.strip_prefix("msg "))
            .map(|l| l.split(' ').collect())
            .collect();
        assert_eq!(msgs.len(), 3, "{listener}: {out}");
        let mut found: Vec<usize> = Vec::new();
        for m in &msgs {
            // Stalwart's RFC822.SIZE is the literal the client got, which is what was sent
            // after the headers Stalwart added (Delivered-To, Received, ...).
            assert_eq!(m[0], m[1], "{listener}");
            literal_bytes += m[1].parse::<u64>().unwrap();
            let body = String::from_utf8(hex::decode(m[2]).unwrap()).unwrap();
            let which = sent.iter().position(|s| body.ends_with(s.as_str()));
            found.push(which.unwrap_or_else(|| panic!("{listener}: not sent: {body:?}")));
        }
        found.sort_unstable();
        assert_eq!(found, [0, 1, 2], "{listener}");
        first = msgs[0][2].to_owned();
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.retrieved_bytes.load(Relaxed) - before != literal_bytes {
            assert!(
                Instant::now() < deadline,
                "{listener}: metered {} of {literal_bytes}",
                stats.retrieved_bytes.load(Relaxed) - before
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let before = stats.retrieved_bytes.load(Relaxed);
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "--interface",
        CLIENT_IP,
        "--cacert",
        &ca,
    ])
    .args(["-u", "alice:alicepw"])
    .arg(format!(
        "imaps://127.0.0.1:{}/INBOX;MAILINDEX=1",
        port("imaps")
    ));
    let got = run(cmd).await;
    assert_eq!(hex::encode(&got), first);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.retrieved_bytes.load(Relaxed) - before != got.len() as u64 {
        assert!(Instant::now() < deadline, "curl session not metered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Stalwart saw the clients' address (from the PROXY v2 header), never the proxy's: one
    // login per session, two imaplib and one curl.
    let logins = proxied_logins(&st, 3).await;
    assert_eq!(logins.len(), 3, "{logins:#?}");
    for line in &logins {
        assert!(line.contains(&format!("remoteIp = {CLIENT_IP},")), "{line}");
    }
    running.stop().await;
}
