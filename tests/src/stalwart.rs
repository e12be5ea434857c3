//! A real Stalwart (`stalwart`, e.g. crates.io stalwart-lite 0.16.0 = the 0.15 code base) as a
//! child process in a fresh directory, booted for an offline host (spam filter and pyzor off,
//! default inbound limiters off, no TLS, `session.auth.require = false`, SQLite, free loopback
//! ports for SMTP, HTTP and IMAP), plus, when a mailbell address is given, the shipped stanza
//! `config/stalwart/mailbell-0.15.toml` pointing at it. Killed (and its log shown, if the
//! thread is panicking) when dropped.
//!
//! Used by the stalwart_real interop test and the `bench_mta` benchmark.

use std::io::{BufRead, BufReader as StdBufReader};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::system;

/// The stanza operators are told to add to Stalwart's config.toml.
pub const SHIPPED_STANZA: &str = include_str!("../../config/stalwart/mailbell-0.15.toml");
/// The fallback administrator (user, secret).
pub const ADMIN: (&str, &str) = ("admin", "adminpass");
/// The bearer token the stanza is configured with (mailbell's `[stalwart] hook_token`).
pub const HOOK_TOKEN: &str = "stalwart-real-hook-token";
/// The local domain [`Stalwart::add_domain`] is usually called with.
pub const DOMAIN: &str = "test.local";

/// The `stalwart` binary: `$STALWART_BIN`, then PATH, then `~/.cargo/bin`.
pub fn binary() -> Option<PathBuf> {
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
pub struct Reserved {
    listener: StdTcpListener,
    pub addr: SocketAddr,
}

impl Reserved {
    pub fn new() -> anyhow::Result<Self> {
        let listener = StdTcpListener::bind("127.0.0.1:0").context("bind a loopback port")?;
        let addr = listener.local_addr()?;
        Ok(Self { listener, addr })
    }

    pub fn release(self) -> SocketAddr {
        drop(self.listener);
        self.addr
    }
}

/// A running Stalwart; killed (and its log shown, if the thread is panicking) on drop.
pub struct Stalwart {
    child: Child,
    pub log: PathBuf,
    pub smtp: SocketAddr,
    pub http: SocketAddr,
    pub imap: SocketAddr,
    /// An IMAP listener that requires a PROXY header from 127.0.0.1
    /// (`proxy.trusted-networks`): the retrieval proxy's backend.
    pub imap_proxied: SocketAddr,
}

impl Stalwart {
    /// Writes the base configuration, plus the shipped stanza pointing at `mailbell` when
    /// given, into `dir/stalwart` and starts `bin`.
    pub fn start(bin: &Path, dir: &Path, mailbell: Option<SocketAddr>) -> anyhow::Result<Self> {
        let root = dir.join("stalwart");
        std::fs::create_dir_all(root.join("data"))?;
        // Free ports, released just before Stalwart binds them.
        let (smtp, http, imap, imap_proxied) = (
            Reserved::new()?.release(),
            Reserved::new()?.release(),
            Reserved::new()?.release(),
            Reserved::new()?.release(),
        );
        let config = root.join("config.toml");
        let mut text = base_config(&root, smtp, http, [imap, imap_proxied]);
        if let Some(m) = mailbell {
            text.push('\n');
            text.push_str(&shipped_stanza(m)?);
        }
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
            imap,
            imap_proxied,
        })
    }

    fn auth() -> String {
        let b64 = base64::engine::general_purpose::STANDARD;
        format!("Basic {}", b64.encode(format!("{}:{}", ADMIN.0, ADMIN.1)))
    }

    /// One management API call; fails unless HTTP 200 without an `error` member.
    pub async fn api(
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
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "stalwart exited at startup ({status}); its log is {}",
                    self.log.display()
                );
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

    /// Creates a local domain.
    pub async fn add_domain(&self, name: &str) -> anyhow::Result<()> {
        self.api(
            "POST",
            "/api/principal",
            Some(serde_json::json!({"type": "domain", "name": name})),
        )
        .await
        .map(drop)
    }

    /// Creates an individual account for `addr`, named after its local part, password
    /// `<name>pw` (see [`Stalwart::inbox_count`]).
    pub async fn add_user(&self, addr: &str) -> anyhow::Result<()> {
        let name = addr.split('@').next().unwrap_or(addr);
        self.api(
            "POST",
            "/api/principal",
            Some(serde_json::json!({
                "type": "individual", "name": name, "secrets": [format!("{name}pw")],
                "emails": [addr], "roles": ["user"]
            })),
        )
        .await
        .map(drop)
    }

    /// Messages in the INBOX of the account [`Stalwart::add_user`] made for `addr`, read over
    /// IMAP (LOGIN, STATUS).
    pub async fn inbox_count(&self, addr: &str) -> anyhow::Result<u64> {
        let name = addr.split('@').next().unwrap_or(addr);
        let step = Duration::from_secs(10);
        let stream = tokio::time::timeout(step, tokio::net::TcpStream::connect(self.imap))
            .await
            .context("IMAP connect timed out")??;
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        let mut line = String::new();
        read_line(&mut rd, &mut line, step).await?;
        ensure!(line.starts_with("* OK"), "IMAP greeting: {line}");
        // STATUS waits for LOGIN's tagged answer: a command that depends on the state LOGIN
        // changes must not be pipelined behind it (RFC 9051 §5.5; Stalwart answers such a
        // STATUS "NO Not authenticated").
        wr.write_all(format!("a LOGIN {name} {name}pw\r\n").as_bytes())
            .await?;
        loop {
            read_line(&mut rd, &mut line, step).await?;
            if let Some(answer) = line.strip_prefix("a ") {
                ensure!(answer.starts_with("OK"), "IMAP: {line}");
                break;
            }
        }
        wr.write_all(b"b STATUS INBOX (MESSAGES)\r\nc LOGOUT\r\n")
            .await?;
        let mut count = None;
        loop {
            read_line(&mut rd, &mut line, step).await?;
            if line.starts_with("a ") || line.starts_with("b ") {
                ensure!(line[2..].starts_with("OK"), "IMAP: {line}");
            }
            if let Some(rest) = line.strip_prefix("* STATUS ") {
                count = rest
                    .rsplit_once("MESSAGES ")
                    .and_then(|(_, n)| n.trim_end().trim_end_matches(')').parse().ok());
            }
            if line.starts_with("b ") {
                break;
            }
        }
        count.with_context(|| format!("no STATUS answer for {addr}"))
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

/// Longest wait for one SMTP reply or write.
const SMTP_STEP: Duration = Duration::from_secs(30);

/// Sends one message over plain SMTP; returns the reply to the end of data.
pub async fn smtp_send(
    addr: SocketAddr,
    from: &str,
    rcpts: &[&str],
    msg: &str,
) -> anyhow::Result<String> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
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
    tokio::time::timeout(SMTP_STEP, wr.write_all(line.as_bytes()))
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
        let n = tokio::time::timeout(SMTP_STEP, rd.read_line(&mut line))
            .await
            .context("SMTP reply timed out")??;
        ensure!(n > 0, "SMTP connection closed after {all:?}");
        all.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return Ok(all.trim_end().to_owned());
        }
    }
}

/// Reads one line of an IMAP answer into `line`.
async fn read_line(
    rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    line: &mut String,
    step: Duration,
) -> anyhow::Result<()> {
    line.clear();
    let n = tokio::time::timeout(step, rd.read_line(line))
        .await
        .context("IMAP read timed out")??;
    ensure!(n > 0, "IMAP connection closed");
    Ok(())
}

/// The offline configuration: SMTP, HTTP and IMAP (plain, and behind a PROXY v2 sender) on loopback, SQLite, no TLS, no
/// spam filter downloads, unauthenticated SMTP on a port other than 25, plaintext IMAP LOGIN.
fn base_config(root: &Path, smtp: SocketAddr, http: SocketAddr, imap: [SocketAddr; 2]) -> String {
    let [imap, imap_proxied] = imap;
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

[server.listener.imap]
bind = ["{imap}"]
protocol = "imap"
tls.enable = false

[server.listener.imap-proxied]
bind = ["{imap_proxied}"]
protocol = "imap"
tls.enable = false
proxy.trusted-networks = ["127.0.0.1/32"]

[imap.auth]
allow-plain-text = true

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

# Stalwart's default inbound limiters (5 sessions/s per IP, 25 messages/h per sender and
# recipient) would defer a benchmark's or a test's burst from loopback with 452. When its
# spam-rule download fails, Stalwart writes its defaults (enable = true) over these keys at
# boot, so `match = "false"` is what keeps them off; `enable` says the intent.
[queue.limiter.inbound.ip]
enable = false
match = "false"

[queue.limiter.inbound.sender]
enable = false
match = "false"
"#,
        db = root.join("data/stalwart.sqlite3").display(),
        user = ADMIN.0,
        secret = ADMIN.1,
    )
}

/// The shipped stanza with its ADAPT values set for `mailbell` (each must be present).
pub fn shipped_stanza(mailbell: SocketAddr) -> anyhow::Result<String> {
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
