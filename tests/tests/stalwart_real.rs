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

use std::io::{BufRead, BufReader as StdBufReader};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use base64::Engine;
use mailbell::users::User;
use mailbell_tests::system::{self, System};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The stanza operators are told to add to Stalwart's config.toml.
const SHIPPED_STANZA: &str = include_str!("../../config/stalwart/mailbell-0.15.toml");
const ADMIN: (&str, &str) = ("admin", "adminpass");
const HOOK_TOKEN: &str = "stalwart-real-hook-token";
const DOMAIN: &str = "test.local";

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
    let Some(bin) = stalwart_binary() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but no stalwart binary (PATH, $STALWART_BIN, ~/.cargo/bin): install stalwart-lite");
        }
        eprintln!(
            "skipping stalwart_real: no stalwart binary on PATH, in $STALWART_BIN or ~/.cargo/bin"
        );
        return;
    };
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();

    // Stalwart first, so that its principals exist when mailbell loads the account map.
    let mailbell_http = Reserved::new();
    let mut stalwart = Stalwart::start(&bin, dir.path(), mailbell_http.addr).unwrap();
    stalwart.wait_ready(STEP).await.unwrap();
    stalwart.setup_principals().await.unwrap();

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
    let reply = smtp_send(stalwart.smtp, SENDER, &[CAROL], &message(CAROL, "carol-1")).await?;
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
    let reply = smtp_send(stalwart.smtp, SENDER, &[ALICE], &message(ALICE, "alice-1")).await?;
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
    ensure!(text.contains(ALICE), "recipient missing from {text:?}");
    ensure!(
        stat(&intake.confirm_timeouts) == 0,
        "released by the confirmation timeout, not by the webhook"
    );
    ensure!(stat(&intake.confirmations) >= 2);
    eprintln!("stalwart_real: SMTP 250 -> SMS in {waited:?}: {text}");

    // 3. Account map: bob's copy is refused by Stalwart at delivery, so only alice's ham comes;
    //    it must release alice's notice only (without the map it would release bob's too).
    let reply = smtp_send(
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

/// The `stalwart` binary: `$STALWART_BIN`, then PATH, then `~/.cargo/bin`.
fn stalwart_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("STALWART_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(home)
        .map(|d| d.join("stalwart"))
        .find(|p| p.is_file())
}

/// A loopback port held open until [`Reserved::release`], so that nothing else takes it while
/// Stalwart is configured to call it.
struct Reserved {
    listener: StdTcpListener,
    addr: SocketAddr,
}

impl Reserved {
    fn new() -> Self {
        let listener = StdTcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        Self { listener, addr }
    }

    fn release(self) -> SocketAddr {
        drop(self.listener);
        self.addr
    }
}

/// A running Stalwart; killed (and its log shown, if the test failed) on drop.
struct Stalwart {
    child: Child,
    log: PathBuf,
    smtp: SocketAddr,
    http: SocketAddr,
}

impl Stalwart {
    /// Writes the base configuration plus the shipped stanza (pointing at `mailbell`) into
    /// `dir` and starts the binary.
    fn start(bin: &Path, dir: &Path, mailbell: SocketAddr) -> anyhow::Result<Self> {
        let root = dir.join("stalwart");
        std::fs::create_dir_all(root.join("data"))?;
        // Free ports, released just before Stalwart binds them.
        let (smtp, http) = (Reserved::new().release(), Reserved::new().release());
        let config = root.join("config.toml");
        let text = format!(
            "{}\n{}",
            base_config(&root, smtp, http),
            shipped_stanza(mailbell)?
        );
        std::fs::write(&config, text)?;
        let log = root.join("stalwart.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(Self {
            child,
            log,
            smtp,
            http,
        })
    }

    fn auth() -> String {
        let b64 = base64::engine::general_purpose::STANDARD;
        format!("Basic {}", b64.encode(format!("{}:{}", ADMIN.0, ADMIN.1)))
    }

    /// One management API call; fails unless HTTP 200 without an `error` member.
    async fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let data = body.map(|b| b.to_string());
        let r = mailbell_link::http::request(
            self.http,
            method,
            path,
            Some(&Self::auth()),
            data.as_deref().map(|d| ("application/json", d.as_bytes())),
            Duration::from_secs(10),
        )
        .await?;
        let v: serde_json::Value = serde_json::from_str(&r.body)
            .with_context(|| format!("{method} {path}: HTTP {} {:?}", r.status, r.body))?;
        ensure!(
            r.status == 200 && v.get("error").is_none(),
            "{method} {path}: HTTP {} {}",
            r.status,
            r.body
        );
        Ok(v)
    }

    /// Waits until the management API answers (or the process exits).
    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("stalwart exited at startup ({status}); see its log below");
            }
            if self
                .api("GET", "/api/principal?types=domain", None)
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("stalwart's API not up within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The local domain, alice, bob (who may not receive mail) and carol.
    async fn setup_principals(&self) -> anyhow::Result<()> {
        use serde_json::json;
        self.api(
            "POST",
            "/api/principal",
            Some(json!({"type": "domain", "name": DOMAIN})),
        )
        .await?;
        for addr in [ALICE, BOB, CAROL] {
            let name = addr.split('@').next().unwrap_or(addr);
            self.api(
                "POST",
                "/api/principal",
                Some(json!({
                    "type": "individual", "name": name, "secrets": [format!("{name}pw")],
                    "emails": [addr], "roles": ["user"]
                })),
            )
            .await?;
        }
        self.api(
            "PATCH",
            "/api/principal/bob",
            Some(json!([{"action": "addItem", "field": "disabledPermissions", "value": "email-receive"}])),
        )
        .await?;
        Ok(())
    }
}

impl Drop for Stalwart {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            if let Ok(f) = std::fs::File::open(&self.log) {
                let lines: Vec<String> =
                    StdBufReader::new(f).lines().map_while(Result::ok).collect();
                eprintln!("---- last lines of {} ----", self.log.display());
                for l in &lines[lines.len().saturating_sub(60)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Research §8's offline configuration: SMTP and HTTP on loopback, SQLite, no TLS, no spam
/// filter downloads, unauthenticated SMTP on a port other than 25.
fn base_config(root: &Path, smtp: SocketAddr, http: SocketAddr) -> String {
    format!(
        r#"[server]
hostname = "mail.{DOMAIN}"

[server.listener.smtp]
bind = ["{smtp}"]
protocol = "smtp"
tls.enable = false

[server.listener.http]
bind = ["{http}"]
protocol = "http"
tls.enable = false

[storage]
data = "db"
blob = "db"
fts = "db"
lookup = "db"
directory = "internal"

[store.db]
type = "sqlite"
path = "{db}"

[directory.internal]
type = "internal"
store = "db"

[tracer.stdout]
type = "stdout"
level = "info"
ansi = false
enable = true

[authentication.fallback-admin]
user = "{user}"
secret = "{secret}"

[session.auth]
require = false

[spam-filter]
enable = false
resource = "file:///dev/null"
pyzor.enable = false
"#,
        db = root.join("data/stalwart.sqlite3").display(),
        user = ADMIN.0,
        secret = ADMIN.1,
    )
}

/// The shipped stanza with its ADAPT values set for this run (each must be present).
fn shipped_stanza(mailbell: SocketAddr) -> anyhow::Result<String> {
    let mut text = SHIPPED_STANZA.to_owned();
    for (from, to) in [
        ("http://127.0.0.1:8025/", format!("http://{mailbell}/")),
        ("change-me-hook-token", HOOK_TOKEN.to_owned()),
        ("change-me-webhook-secret", system::WEBHOOK_KEY.to_owned()),
    ] {
        ensure!(
            text.contains(from),
            "the shipped stanza no longer contains {from:?}"
        );
        text = text.replace(from, &to);
    }
    Ok(text)
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

/// Sends one message over plain SMTP; returns the reply to the end of data.
async fn smtp_send(
    addr: SocketAddr,
    from: &str,
    rcpts: &[&str],
    msg: &str,
) -> anyhow::Result<String> {
    let stream = TcpStream::connect(addr).await?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    expect(&mut rd, "220", "greeting").await?;
    send(&mut wr, "EHLO client.remote.example\r\n".into()).await?;
    expect(&mut rd, "250", "EHLO").await?;
    send(&mut wr, format!("MAIL FROM:<{from}> BODY=8BITMIME\r\n")).await?;
    expect(&mut rd, "250", "MAIL").await?;
    for r in rcpts {
        send(&mut wr, format!("RCPT TO:<{r}>\r\n")).await?;
        expect(&mut rd, "250", "RCPT").await?;
    }
    send(&mut wr, "DATA\r\n".into()).await?;
    expect(&mut rd, "354", "DATA").await?;
    let mut data = String::new();
    for line in msg.split_inclusive("\r\n") {
        if line.starts_with('.') {
            data.push('.');
        }
        data.push_str(line);
    }
    data.push_str(".\r\n");
    send(&mut wr, data).await?;
    let reply = read_reply(&mut rd).await?;
    send(&mut wr, "QUIT\r\n".into()).await?;
    Ok(reply)
}

async fn send(wr: &mut tokio::net::tcp::OwnedWriteHalf, line: String) -> anyhow::Result<()> {
    tokio::time::timeout(STEP, wr.write_all(line.as_bytes()))
        .await
        .context("SMTP write timed out")?
        .context("SMTP write")
}

async fn expect(
    rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    code: &str,
    what: &str,
) -> anyhow::Result<()> {
    let r = read_reply(rd).await?;
    ensure!(r.starts_with(code), "SMTP {what}: {r}");
    Ok(())
}

/// Reads one (possibly multi-line) SMTP reply.
async fn read_reply(rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> anyhow::Result<String> {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(STEP, rd.read_line(&mut line))
            .await
            .context("SMTP reply timed out")??;
        ensure!(n > 0, "SMTP connection closed after {all:?}");
        all.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return Ok(all.trim_end().to_owned());
        }
    }
}
