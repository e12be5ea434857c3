//! Retrieval proxy benchmark: POP3 and IMAP over TLS 1.3 from a private Dovecot, side by side
//! in one run: Dovecot direct (its own TLS), a blind TLS relay (the "nginx stream" baseline:
//! rustls accept, TCP_NODELAY, PROXY v2, `copy_bidirectional` to Dovecot's plaintext port) and
//! the mailbell proxy (`mailbell serve`, implicit-TLS listeners `pop3s`/`imaps`).
//!
//! ```text
//! cargo build --release -p mailbell --bin mailbell
//! cargo run --release -p mailbell-tests --bin bench_retrieval -- [--messages 2000]
//!     [--size 51200] [--repeat 3] [--setups 200] [--noops 500] [--idle 1000]
//!     [--mailbell target/release/mailbell] [--before OLD_MAILBELL] [--curl-messages 500]
//! ```
//!
//! The relay and every proxy run as child processes (the relay is this binary with
//! `--relay-child`), so their CPU time (utime + stime from /proc/<pid>/stat) and resident
//! memory are their own. The client is this process: one session retrieves every message,
//! POP3 `RETR n` one per command and IMAP `UID FETCH n BODY[]` one per command, each waiting
//! for its reply; targets take turns in every repetition, so a busy machine skews them alike.
//! Printed per protocol and target: MB/s (bytes the client read / time), messages/s, CPU
//! seconds per GB relayed; session setup (connect + TLS handshake + greeting) p50/p99; NOOP
//! round trip p50; memory per idle logged-in IMAP session (RSS growth over `--idle` sessions
//! that each fetched one message, / `--idle`); errors when those sessions then each fetch
//! another message and log out, all at once; and
//! curl retrieving `--curl-messages` messages over each target (a real client). Ratios are
//! proxy/direct and proxy/relay. `--before` adds a second mailbell binary (an older build) as
//! the target `before`. A failed session or a wrong message size fails the run (exit status
//! 1); speed never does. Results: docs/benchmarks.md, "Retrieval proxy".

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use mailbell::retrieval::proxy_v2::{Header, TlsInfo};
use mailbell_tests::cpu::{load_average, parse_stat};
use mailbell_tests::dovecot::{free_port, Dovecot, Mailbox, Options};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

#[derive(Parser, Debug)]
#[command(about = "POP3/IMAP over TLS: Dovecot direct, a blind TLS relay and the mailbell proxy")]
struct Args {
    /// Messages in the mailbox.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Bytes per message.
    #[arg(long, default_value_t = 51_200)]
    size: usize,
    /// Throughput runs per protocol and target (the targets take turns).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Session setups timed per target.
    #[arg(long, default_value_t = 200)]
    setups: usize,
    /// NOOP round trips timed per target.
    #[arg(long, default_value_t = 500)]
    noops: usize,
    /// Idle logged-in IMAP sessions held open at once per target (0: skip).
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Messages curl retrieves per protocol and target (0: skip).
    #[arg(long, default_value_t = 500)]
    curl_messages: usize,
    /// The mailbell binary (default: `mailbell` beside this benchmark's binary).
    #[arg(long)]
    mailbell: Option<PathBuf>,
    /// An older mailbell binary to measure beside it, as the target `before`.
    #[arg(long)]
    before: Option<PathBuf>,
    /// Keep the scratch directory (Dovecot's and the proxies' configs and logs).
    #[arg(long)]
    keep: bool,
    /// Internal: run as the blind relay: `pop3s,imaps,backend_pop3,backend_imap` ports.
    #[arg(long, hide = true, value_delimiter = ',')]
    relay_child: Vec<u16>,
    /// Internal: the relay's certificate and key.
    #[arg(long, hide = true, num_args = 2)]
    relay_tls: Vec<PathBuf>,
}

const USER: &str = "alice";
const PASSWORD: &str = "secret";

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.relay_child.is_empty() {
        return mailbell_tests::bench_main(async move { relay_child(&args).await.map(|()| true) });
    }
    mailbell_tests::bench_main(run(args))
}

// ---------------------------------------------------------------------------------------------
// The blind relay

/// TLS in, PROXY v2 and plaintext out, bytes copied both ways as they come.
async fn relay_child(args: &Args) -> anyhow::Result<()> {
    let [pop3s, imaps, back_pop3, back_imap] = args.relay_child[..] else {
        bail!("--relay-child takes four ports");
    };
    let [cert, key] = &args.relay_tls[..] else {
        bail!("--relay-tls takes a certificate and a key");
    };
    let tls = mailbell_link::tls::public_server_config(cert, key).context("relay TLS")?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut tasks = tokio::task::JoinSet::new();
    for (port, backend) in [(pop3s, back_pop3), (imaps, back_imap)] {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("relay listen on {port}"))?;
        let acceptor = acceptor.clone();
        tasks.spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = relay_session(tcp, peer, acceptor, backend).await;
                });
            }
        });
    }
    tasks.join_next().await;
    Ok(())
}

async fn relay_session(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    backend: u16,
) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let local = tcp.local_addr()?;
    let mut client = acceptor.accept(tcp).await?;
    let mut server = TcpStream::connect(("127.0.0.1", backend)).await?;
    server.set_nodelay(true)?;
    let header = Header::Proxy {
        source: peer,
        destination: local,
        tls: Some(TlsInfo {
            version: Some("TLSv1.3".into()),
            sni: None,
        }),
    }
    .to_bytes()?;
    server.write_all(&header).await?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Targets

/// A child process killed on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where a client connects, and the process whose CPU and memory count.
struct Target {
    name: &'static str,
    pop3s: u16,
    imaps: u16,
    pid: Option<u32>,
}

impl Target {
    fn port(&self, imap: bool) -> u16 {
        if imap {
            self.imaps
        } else {
            self.pop3s
        }
    }
}

/// CPU ticks (utime + stime, all threads) of `pid`.
fn cpu_ticks(pid: Option<u32>) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    parse_stat(&stat).map(|(_, t)| t)
}

/// Resident memory of `pid`, bytes.
fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The kernel's USER_HZ (sysconf(_SC_CLK_TCK)): 100 on every Linux this runs on.
const TICKS_PER_SECOND: f64 = 100.0;

fn wait_listening(ports: &[u16], what: &str, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while ports
        .iter()
        .any(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_err())
    {
        if Instant::now() > deadline {
            bail!(
                "{what} did not listen on {ports:?}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn start_relay(
    dir: &Path,
    dovecot: &Dovecot,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<(Guard, Target)> {
    let (pop3s, imaps) = (free_port()?, free_port()?);
    let log = dir.join("relay.log");
    let child = Command::new(std::env::current_exe()?)
        .arg("--relay-child")
        .arg(format!("{pop3s},{imaps},{},{}", dovecot.pop3, dovecot.imap))
        .arg("--relay-tls")
        .arg(cert)
        .arg(key)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("start the relay")?;
    let guard = Guard(child);
    wait_listening(&[pop3s, imaps], "the relay", &log)?;
    let pid = Some(guard.0.id());
    Ok((
        guard,
        Target {
            name: "relay",
            pop3s,
            imaps,
            pid,
        },
    ))
}

fn start_proxy(
    name: &'static str,
    bin: &Path,
    dir: &Path,
    dovecot: &Dovecot,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<(Guard, Target)> {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir)?;
    let (pop3s, imaps) = (free_port()?, free_port()?);
    let toml = format!(
        "[mailbell]\ndata_dir = {data:?}\n[listen]\nhttp = \"\"\nmilter = \"\"\nadmin = \"\"\n\
         [link]\ndev_pki_dir = {pki:?}\n\
         [retrieval]\npop3s = \"127.0.0.1:{pop3s}\"\nimaps = \"127.0.0.1:{imaps}\"\n\
         backend_pop3 = \"127.0.0.1:{bp}\"\nbackend_imap = \"127.0.0.1:{bi}\"\n\
         cert = {cert:?}\nkey = {key:?}\n",
        data = dir.join("data"),
        pki = dir.join("pki"),
        bp = dovecot.pop3,
        bi = dovecot.imap,
    );
    let config = dir.join("mailbell.toml");
    std::fs::write(&config, toml)?;
    let log = dir.join("mailbell.log");
    let child = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let guard = Guard(child);
    wait_listening(&[pop3s, imaps], name, &log)?;
    let pid = Some(guard.0.id());
    Ok((
        guard,
        Target {
            name,
            pop3s,
            imaps,
            pid,
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// The client

/// One logged-out or logged-in client session over TLS.
struct Session {
    s: TlsStream<TcpStream>,
    buf: Vec<u8>,
    imap: bool,
    tag: u32,
}

/// Where a complete POP3 reply ends in `b`: the first line, or with `multi` the `.` line.
fn pop3_end(b: &[u8], multi: bool) -> Option<usize> {
    if multi {
        if b.starts_with(b"-ERR") {
            return find(b, b"\r\n", 0).map(|i| i + 2);
        }
        find(b, b"\r\n.\r\n", 0).map(|i| i + 5)
    } else {
        find(b, b"\r\n", 0).map(|i| i + 2)
    }
}

/// Where the IMAP response ending with the tagged line `tag` ends in `b` (literals skipped).
fn imap_end(b: &[u8], tag: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let eol = find(b, b"\r\n", at)? + 2;
        let line = &b[at..eol];
        if line.starts_with(tag) && line.get(tag.len()) == Some(&b' ') {
            return Some(eol);
        }
        at = eol;
        if line.ends_with(b"}\r\n") {
            let open = line.iter().rposition(|&c| c == b'{')?;
            let n: usize = std::str::from_utf8(&line[open + 1..line.len() - 3])
                .ok()?
                .trim_end_matches('+')
                .parse()
                .ok()?;
            at += n;
            if at > b.len() {
                return None;
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

impl Session {
    /// Connect, TLS handshake and greeting; returns the session and how long that took.
    async fn open(
        port: u16,
        imap: bool,
        tls: &TlsConnector,
    ) -> anyhow::Result<(Session, Duration)> {
        let t0 = Instant::now();
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost")?;
        let s = tls.connect(name, tcp).await?;
        let mut sess = Session {
            s,
            buf: Vec::with_capacity(128 * 1024),
            imap,
            tag: 0,
        };
        let greeting = sess.reply(|b| pop3_end(b, false)).await?;
        ensure!(
            greeting.starts_with(b"+OK") || greeting.starts_with(b"* OK"),
            "greeting: {}",
            String::from_utf8_lossy(&greeting)
        );
        Ok((sess, t0.elapsed()))
    }

    /// Reads until `end` finds a complete reply; returns it.
    async fn reply(&mut self, end: impl Fn(&[u8]) -> Option<usize>) -> anyhow::Result<Vec<u8>> {
        loop {
            if let Some(n) = end(&self.buf) {
                return Ok(self.buf.drain(..n).collect());
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = tokio::time::timeout(Duration::from_secs(30), self.s.read(&mut chunk))
                .await
                .context("reply timed out")??;
            ensure!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a command and reads its whole reply; checks that it succeeded.
    async fn command(&mut self, cmd: &str, multi: bool) -> anyhow::Result<Vec<u8>> {
        let reply = if self.imap {
            self.tag += 1;
            let tag = format!("a{}", self.tag);
            self.s
                .write_all(format!("{tag} {cmd}\r\n").as_bytes())
                .await?;
            let reply = self.reply(|b| imap_end(b, tag.as_bytes())).await?;
            let last = reply
                .rsplit(|&c| c == b'\n')
                .nth(1)
                .unwrap_or_default()
                .to_vec();
            ensure!(
                last.starts_with(format!("{tag} OK").as_bytes()),
                "{cmd}: {}",
                String::from_utf8_lossy(&last)
            );
            reply
        } else {
            self.s.write_all(format!("{cmd}\r\n").as_bytes()).await?;
            let reply = self.reply(|b| pop3_end(b, multi)).await?;
            ensure!(
                reply.starts_with(b"+OK"),
                "{cmd}: {}",
                String::from_utf8_lossy(&reply[..reply.len().min(200)])
            );
            reply
        };
        Ok(reply)
    }

    async fn login(&mut self) -> anyhow::Result<()> {
        if self.imap {
            self.command(&format!("LOGIN {USER} {PASSWORD}"), false)
                .await?;
            self.command("SELECT INBOX", false).await?;
        } else {
            self.command(&format!("USER {USER}"), false).await?;
            self.command(&format!("PASS {PASSWORD}"), false).await?;
        }
        Ok(())
    }

    /// Retrieves message `n` (POP3 RETR, IMAP UID FETCH BODY[]); returns the reply's bytes.
    async fn retrieve(&mut self, n: usize) -> anyhow::Result<usize> {
        let cmd = if self.imap {
            format!("UID FETCH {n} BODY[]")
        } else {
            format!("RETR {n}")
        };
        Ok(self.command(&cmd, true).await?.len())
    }

    async fn noop(&mut self) -> anyhow::Result<()> {
        self.command("NOOP", false).await.map(drop)
    }

    async fn quit(mut self) -> anyhow::Result<()> {
        let cmd = if self.imap { "LOGOUT" } else { "QUIT" };
        self.command(cmd, false).await?;
        Ok(())
    }
}

fn tls_connector(ca: &Path) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// One throughput run: a session retrieves every message, one per command.
struct Run {
    secs: f64,
    bytes: u64,
    cpu_secs: Option<f64>,
}

async fn throughput(
    t: &Target,
    imap: bool,
    args: &Args,
    tls: &TlsConnector,
) -> anyhow::Result<Run> {
    let (mut s, _) = Session::open(t.port(imap), imap, tls).await?;
    s.login().await?;
    let cpu0 = cpu_ticks(t.pid);
    let t0 = Instant::now();
    let mut bytes = 0u64;
    for n in 1..=args.messages {
        let got = s.retrieve(n).await?;
        ensure!(
            got >= args.size,
            "{} message {n}: {got} bytes, want at least {}",
            t.name,
            args.size
        );
        bytes += got as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu_secs = cpu_ticks(t.pid)
        .zip(cpu0)
        .map(|(b, a)| b.saturating_sub(a) as f64 / TICKS_PER_SECOND);
    s.quit().await?;
    Ok(Run {
        secs,
        bytes,
        cpu_secs,
    })
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Opens `count` logged-in IMAP sessions (64 at a time) that each fetch message 1 and then
/// idle, measures the RSS growth of the target, then lets every session fetch message 2 and
/// log out at once; returns (bytes per session, errors).
async fn idle_sessions(
    t: &Target,
    count: usize,
    tls: &TlsConnector,
) -> anyhow::Result<(Option<f64>, usize)> {
    let before = t.pid.and_then(rss);
    let mut sessions = Vec::with_capacity(count);
    let mut errors = 0;
    let port = t.port(true);
    for batch in (0..count).collect::<Vec<_>>().chunks(64) {
        let mut set = tokio::task::JoinSet::new();
        for _ in batch {
            let tls = tls.clone();
            set.spawn(async move {
                let (mut s, _) = Session::open(port, true, &tls).await?;
                s.login().await?;
                // A client that synced a message and now idles: the relay's buffers were used.
                s.retrieve(1).await?;
                anyhow::Ok(s)
            });
        }
        while let Some(r) = set.join_next().await {
            match r? {
                Ok(s) => sessions.push(s),
                Err(e) => {
                    errors += 1;
                    tracing::warn!(target = t.name, error = %e, "idle session failed");
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = t.pid.and_then(rss);
    let per = before
        .zip(after)
        .map(|(b, a)| a.saturating_sub(b) as f64 / sessions.len().max(1) as f64);
    let mut set = tokio::task::JoinSet::new();
    for mut s in sessions {
        set.spawn(async move {
            s.retrieve(2).await?;
            s.quit().await
        });
    }
    while let Some(r) = set.join_next().await {
        if let Err(e) = r? {
            errors += 1;
            tracing::warn!(target = t.name, error = %e, "concurrent session failed");
        }
    }
    Ok((per, errors))
}

/// curl retrieves messages 1..=n in one invocation (one connection, a URL glob); seconds.
fn curl(t: &Target, imap: bool, n: usize, ca: &Path) -> anyhow::Result<f64> {
    let port = t.port(imap);
    let url = if imap {
        format!("imaps://localhost:{port}/INBOX;UID=[1-{n}]")
    } else {
        format!("pop3s://localhost:{port}/[1-{n}]")
    };
    let t0 = Instant::now();
    let status = Command::new("curl")
        .args(["-sS", "--fail", "--tlsv1.3", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["-u", &format!("{USER}:{PASSWORD}"), &url])
        .stdout(Stdio::null())
        .status()
        .context("run curl")?;
    ensure!(status.success(), "curl against {} failed: {status}", t.name);
    Ok(t0.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------------------

/// A message of exactly `size` bytes (CRLF lines of 76 characters after the header).
fn message(i: usize, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: sender@example.org\r\nTo: {USER}@example.org\r\nSubject: bench {i}\r\n\
         Message-ID: <bench{i}@example.org>\r\n\r\n"
    )
    .into_bytes();
    let line = b"the quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnopqrstu\r\n";
    while m.len() + line.len() <= size {
        m.extend_from_slice(line);
    }
    m.resize(size.saturating_sub(2).max(m.len()), b'x');
    m.extend_from_slice(b"\r\n");
    m
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let scratch = tempfile::Builder::new()
        .prefix("bench-retrieval")
        .tempdir()?;
    let dir = scratch.path().to_owned();
    let pki = mailbell_link::pki::ensure_dev_pki(
        &dir.join("pki"),
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
        "mailhost",
        false,
    )?;
    let (cert, key) = (pki.agent_cert.clone(), pki.agent_key.clone());
    let mailbell = match &args.mailbell {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("mailbell"),
    };
    ensure!(
        mailbell.exists(),
        "no mailbell binary at {} (cargo build --release -p mailbell --bin mailbell, or --mailbell)",
        mailbell.display()
    );
    println!(
        "# {} messages of {} bytes, {} runs, load average {}",
        args.messages,
        args.size,
        args.repeat,
        load_average()
    );
    let mailbox = Mailbox {
        user: USER.into(),
        password: PASSWORD.into(),
        messages: (1..=args.messages).map(|i| message(i, args.size)).collect(),
        aliases: Vec::new(),
    };
    let dovecot = Dovecot::start(
        &[mailbox],
        &Options {
            tls: Some((cert.clone(), key.clone())),
            many_sessions: true,
            ..Options::default()
        },
    )?;
    let mut targets = vec![Target {
        name: "direct",
        pop3s: dovecot.pop3s.context("dovecot pop3s")?,
        imaps: dovecot.imaps.context("dovecot imaps")?,
        pid: None,
    }];
    let mut guards = Vec::new();
    let (g, t) = start_relay(&dir, &dovecot, &cert, &key)?;
    guards.push(g);
    targets.push(t);
    let (g, t) = start_proxy("proxy", &mailbell, &dir, &dovecot, &cert, &key)?;
    guards.push(g);
    targets.push(t);
    if let Some(before) = &args.before {
        let (g, t) = start_proxy("before", before, &dir, &dovecot, &cert, &key)?;
        guards.push(g);
        targets.push(t);
    }
    let tls = tls_connector(&pki.ca_cert)?;
    let mut ok = true;

    for imap in [false, true] {
        let proto = if imap { "IMAP" } else { "POP3" };
        // Warm-up: Dovecot indexes the Maildir (IMAP: marks every message seen).
        throughput(&targets[0], imap, &args, &tls).await?;
        let mut runs: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
        for _ in 0..args.repeat {
            for t in &targets {
                match throughput(t, imap, &args, &tls).await {
                    Ok(r) => runs.entry(t.name).or_default().push(r),
                    Err(e) => {
                        ok = false;
                        println!("{proto} {}: FAILED {e:#}", t.name);
                    }
                }
            }
        }
        println!("\n## {proto}: one message per command");
        println!(
            "{:<8} {:>8} {:>8} {:>8} {:>10} {:>9} {:>9}",
            "target", "MB/s", "min", "max", "msgs/s", "CPU s/GB", "/direct"
        );
        let median = |name: &str| -> Option<f64> {
            let mut v: Vec<f64> = runs
                .get(name)?
                .iter()
                .map(|r| r.bytes as f64 / r.secs / 1e6)
                .collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied()
        };
        let direct = median("direct");
        for t in &targets {
            let Some(rs) = runs.get(t.name) else { continue };
            let rates: Vec<f64> = rs.iter().map(|r| r.bytes as f64 / r.secs / 1e6).collect();
            let med = median(t.name).unwrap_or(0.0);
            let msgs = args.messages as f64 * med * 1e6 / (rs[0].bytes as f64);
            let cpu: Vec<f64> = rs
                .iter()
                .filter_map(|r| r.cpu_secs.map(|c| c / (r.bytes as f64 / 1e9)))
                .collect();
            let cpu = if cpu.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.2}", cpu.iter().sum::<f64>() / cpu.len() as f64)
            };
            println!(
                "{:<8} {:>8.1} {:>8.1} {:>8.1} {:>10.0} {:>9} {:>8.0}%",
                t.name,
                med,
                rates.iter().copied().fold(f64::INFINITY, f64::min),
                rates.iter().copied().fold(0.0, f64::max),
                msgs,
                cpu,
                direct.map_or(0.0, |d| med / d * 100.0)
            );
        }
        if let (Some(p), Some(r)) = (median("proxy"), median("relay")) {
            println!("proxy/relay {:.0}%", p / r * 100.0);
        }

        // Session setup and NOOP, targets taking turns.
        let mut setup: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
        for _ in 0..args.setups {
            for t in &targets {
                match Session::open(t.port(imap), imap, &tls).await {
                    Ok((_, d)) => setup.entry(t.name).or_default().push(d),
                    Err(e) => {
                        ok = false;
                        println!("{proto} {} setup FAILED: {e:#}", t.name);
                    }
                }
            }
        }
        let mut sessions = Vec::new();
        for t in &targets {
            let (mut s, _) = Session::open(t.port(imap), imap, &tls).await?;
            s.login().await?;
            sessions.push(s);
        }
        let mut noop: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
        for _ in 0..args.noops {
            for (t, s) in targets.iter().zip(sessions.iter_mut()) {
                let t0 = Instant::now();
                s.noop().await?;
                noop.entry(t.name).or_default().push(t0.elapsed());
            }
        }
        for s in sessions {
            s.quit().await?;
        }
        println!(
            "{:<8} {:>10} {:>10} {:>10} {:>8}",
            "target", "setup p50", "setup p99", "NOOP p50", "/direct"
        );
        let direct_noop = noop
            .get_mut("direct")
            .map(|v| percentile(v, 0.5))
            .unwrap_or_default();
        for t in &targets {
            let s = setup.entry(t.name).or_default();
            let n = noop.entry(t.name).or_default();
            let n50 = percentile(n, 0.5);
            println!(
                "{:<8} {:>8.2}ms {:>8.2}ms {:>8.3}ms {:>7.0}%",
                t.name,
                ms(percentile(s, 0.5)),
                ms(percentile(s, 0.99)),
                ms(n50),
                ms(n50) / ms(direct_noop).max(1e-9) * 100.0
            );
        }

        if args.curl_messages > 0 {
            let n = args.curl_messages.min(args.messages);
            print!("curl, {n} messages, MB/s:");
            for t in &targets {
                match curl(t, imap, n, &pki.ca_cert) {
                    Ok(secs) => print!("  {} {:.1}", t.name, (n * args.size) as f64 / secs / 1e6),
                    Err(e) => {
                        ok = false;
                        print!("  {} FAILED ({e:#})", t.name);
                    }
                }
            }
            println!();
        }
    }

    if args.idle > 0 {
        println!(
            "\n## {} idle logged-in IMAP sessions, then each fetches a message at once",
            args.idle
        );
        for t in &targets {
            let (per, errors) = idle_sessions(t, args.idle, &tls).await?;
            if errors > 0 {
                ok = false;
                let log = dovecot.log();
                let warnings: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("Warning") || l.contains("Error") || l.contains("Fatal"))
                    .collect();
                for l in warnings.iter().rev().take(5) {
                    println!("  dovecot: {l}");
                }
            }
            let per = per.map_or("-".to_owned(), |b| format!("{:.1} KiB", b / 1024.0));
            println!("{:<8} memory/session {per:>10}   errors {errors}", t.name);
        }
    }
    println!("# load average after: {}", load_average());
    drop(guards);
    if args.keep {
        println!("# scratch kept: {}", scratch.keep().display());
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_ends_are_found_past_literals() {
        assert_eq!(pop3_end(b"+OK 1\r\nab\r\n.\r\n", true), Some(14));
        assert_eq!(pop3_end(b"+OK 1\r\nab\r\n", true), None);
        assert_eq!(pop3_end(b"-ERR no\r\n", true), Some(9));
        let r = b"* 1 FETCH (UID 1 BODY[] {12}\r\na2 OK fake\r\n)\r\na2 OK done\r\n";
        assert_eq!(imap_end(r, b"a2"), Some(r.len()));
        assert_eq!(imap_end(&r[..40], b"a2"), None);
    }

    #[test]
    fn messages_have_the_size_asked_for() {
        for size in [200, 51_200, 51_201] {
            assert_eq!(message(7, size).len(), size);
        }
    }
}
