//! Black-box tests of the daemon's HTTP listeners under hostile clients: the real `mailbell`
//! (in-process through `app::start`, or the binary in a child process with a low
//! RLIMIT_NOFILE), spoken to over TCP on 127.0.0.1 with short configured timeouts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[path = "../../tests/shared/prometheus.rs"]
mod prometheus;

const HOOK: &str = "/stalwart/mta-hook";

fn config_text(dir: &std::path::Path, extra: &str) -> String {
    format!(
        "[mailbell]\ndata_dir = {:?}\n[listen]\nhttp = \"127.0.0.1:0\"\nmilter = \"127.0.0.1:0\"\n\
         admin = \"127.0.0.1:0\"\n[link]\ndev_pki_dir = {:?}\n\
         [[link.agent]]\naddr = \"127.0.0.1:9\"\n{extra}",
        dir.join("data"),
        dir.join("pki"),
    )
}

const QUICK: &str = "[http.stalwart]\nheader_timeout = \"1s\"\nidle_timeout = \"1s\"\nbody_timeout = \"2s\"\n\
                     [http.admin]\nheader_timeout = \"1s\"\nidle_timeout = \"1s\"\nbody_timeout = \"1s\"\n\
                     [stalwart]\nbody_timeout = \"1s\"\n";

async fn start(extra: &str) -> (mailbell::app::Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = mailbell::config::Config::from_toml(&config_text(dir.path(), extra), "test").unwrap();
    let running = mailbell::app::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    (running, dir)
}

/// Waits until the server closes `s` (EOF or reset); panics after `within`. Returns the time
/// it took.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Duration {
    let from = Instant::now();
    let r = tokio::time::timeout(within, async {
        let mut b = [0u8; 4096];
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(r.is_ok(), "connection still open after {within:?}");
    from.elapsed()
}

/// Writes `bytes` one at a time, 200 ms apart, until the server closes the connection;
/// returns how many were written.
async fn dribble(s: &mut TcpStream, bytes: &[u8]) -> usize {
    let mut sent = 0;
    for b in bytes {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        sent += 1;
        // Pacing of the attack, not synchronisation: the close is awaited below.
        let mut probe = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut probe)).await {
            Err(_) => {}
            Ok(_) => break,
        }
    }
    sent
}

/// Reads one response on a kept-alive connection.
async fn response(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("response in time")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&b[..n]);
        let text = String::from_utf8_lossy(&out).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
    }
}

fn hook_post(body: &str) -> String {
    format!(
        "POST {HOOK} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

const CONNECT: &str = r#"{"context":{"stage":"connect","client":{"ip":"127.0.0.1"}}}"#;

/// Slowloris, idle keep-alive and body dribble on both HTTP ports of the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_port_closes_slow_and_idle_clients() {
    let (running, _dir) = start(QUICK).await;
    let ports = [
        ("stalwart", running.http_addr.unwrap(), hook_post(CONNECT)),
        (
            "admin",
            running.admin_addr.unwrap(),
            "GET /status HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        ),
    ];
    for (name, addr, request) in &ports {
        // A header dribbled a byte per 200 ms: closed at the 1 s header timeout, long before
        // the request is complete.
        let mut s = TcpStream::connect(addr).await.unwrap();
        let sent = dribble(&mut s, request.as_bytes()).await;
        assert!(sent < 15, "{name}: {sent} bytes dribbled before the close");
        closed_within(&mut s, Duration::from_secs(3)).await;

        // A kept-alive connection is served, then closed after the 1 s idle timeout.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let r = response(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{name}: {r}");
        let took = closed_within(&mut s, Duration::from_secs(5)).await;
        assert!(took >= Duration::from_millis(900), "{name}: {took:?}");

        // A body dribbled a byte per 200 ms: closed (or answered 408) at the body timeout.
        let mut s = TcpStream::connect(addr).await.unwrap();
        let path = if *name == "stalwart" {
            HOOK
        } else {
            "/admin/v1/users"
        };
        s.write_all(
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let sent = dribble(&mut s, &[b' '; 1000]).await;
        assert!(
            sent < 30,
            "{name}: {sent} body bytes dribbled before the close"
        );
        closed_within(&mut s, Duration::from_secs(5)).await;
    }
    running.stop().await;
}

/// A flood of idle connections at the cap: a real hook call is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_call_gets_through_a_flood_of_idle_connections() {
    let (running, _dir) = start("[http.stalwart]\nmax_connections = 16\n").await;
    let addr = running.http_addr.unwrap();
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(hook_post(CONNECT).as_bytes()).await.unwrap();
    let r = response(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains(r#"{"action":"accept"}"#), "{r}");
    drop(idle);
    running.stop().await;
}

async fn hook_status(addr: SocketAddr, body: String) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {HOOK} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // The server may answer and close before it has read everything.
    let _ = s.write_all(body.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Oversized fields are refused with 413 (they were accepted, or held whole, before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_hook_fields_get_413() {
    let (running, _dir) = start("").await;
    let addr = running.http_addr.unwrap();
    let big = "a".repeat(2 << 20);
    let data = |rcpt: &str, subject: &str| {
        format!(
            r#"{{"context":{{"stage":"data","client":{{"ip":"127.0.0.1","helo":"h"}},"queue":{{"id":"1f"}}}},"envelope":{{"from":{{"address":"a@b"}},"to":[{{"address":"{rcpt}"}}]}},"message":{{"headers":[["Subject","{subject}"]],"contents":"hi","size":2}}}}"#
        )
    };
    let cases = [
        ("recipient", data(&big, "s")),
        ("subject", data("r@x", &big)),
        (
            "helo",
            format!(
                r#"{{"context":{{"stage":"ehlo","client":{{"ip":"127.0.0.1","helo":"{big}"}}}}}}"#
            ),
        ),
        ("stage", format!(r#"{{"context":{{"stage":"{big}"}}}}"#)),
        // Small bodies are parsed in place, with the same caps.
        (
            "small helo",
            format!(
                r#"{{"context":{{"stage":"ehlo","client":{{"helo":"{}"}}}}}}"#,
                "h".repeat(4000)
            ),
        ),
    ];
    for (what, body) in cases {
        let (status, text) = hook_status(addr, body).await;
        assert_eq!(status, 413, "{what}: {}", &text[..text.len().min(300)]);
    }
    // An ordinary data stage still goes through.
    let (status, text) = hook_status(addr, data("r@x", "s")).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(running.stalwart_stats.snapshot().hook_too_large, 5);
    running.stop().await;
}

/// /metrics carries every HTTP listener's counters, and is valid Prometheus text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_name_each_listener() {
    let (running, _dir) = start(QUICK).await;
    let mut s = TcpStream::connect(running.http_addr.unwrap())
        .await
        .unwrap();
    closed_within(&mut s, Duration::from_secs(5)).await;
    let mut s = TcpStream::connect(running.admin_addr.unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let r = response(&mut s).await;
    let text = r.split_once("\r\n\r\n").unwrap().1;
    for line in [
        "mailbell_listener_connections_accepted_total{listener=\"stalwart\"} 1",
        "mailbell_listener_timed_out_total{listener=\"stalwart\"} 1",
        "mailbell_listener_connections_open{listener=\"admin\"} 1",
        "mailbell_http_timeouts_total{listener=\"stalwart\",phase=\"header\"} 1",
        "mailbell_http_requests_total{listener=\"admin\"} 1",
        // No agent listens at 127.0.0.1:9: the link is down.
        "mailbell_link_up{agent=\"127.0.0.1:9\"} 0",
        "mailbell_milter_sessions_total 0",
        "mailbell_milter_eom_duration_seconds_bucket{le=\"+Inf\"} 0",
        "mailbell_tls_cert_expiry_timestamp_seconds{file=\"cert\"} ",
        "mailbell_tls_cert_expiry_timestamp_seconds{file=\"ca\"} ",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    promtool_check(text);
    // /status names its figures for what they are: running totals end in _total, and the link
    // state is the agent a session is up with now.
    let mut s = TcpStream::connect(running.admin_addr.unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let r = response(&mut s).await;
    let status: serde_json::Value =
        serde_json::from_str(r.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(status["link_up_agent"], serde_json::Value::Null, "{status}");
    assert_eq!(status["link_sessions_established_total"], 0, "{status}");
    assert!(status.get("link_connected_sessions").is_none(), "{status}");
    // Every metric the shipped alert rules use for the mail side is on its /metrics.
    for name in prometheus::rule_metrics("mailbell-mail") {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "alert rules use {name}, which /metrics does not have:\n{text}"
        );
    }
    running.stop().await;
}

/// The shipped alert rules pass `promtool check rules` (a visible skip outside CI when
/// promtool is missing).
#[test]
fn alert_rules_pass_promtool() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/prometheus/mailbell-alerts.yml"
    );
    match Command::new("promtool")
        .args(["check", "rules", path])
        .output()
    {
        Ok(o) => {
            let said = String::from_utf8_lossy(&o.stderr).to_string()
                + &String::from_utf8_lossy(&o.stdout);
            assert!(o.status.success(), "promtool check rules: {said}");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "promtool missing under CI"
            );
            skip("promtool not installed; the alert rules not checked by it");
        }
        Err(e) => panic!("promtool: {e}"),
    }
}

/// Reports a test skipped for a missing system peer so that plain `cargo test` shows it:
/// libtest captures what `eprintln!` prints, not what is written to the stderr handle itself.
/// Under `CI=true` callers fail instead of skipping.
fn skip(reason: &str) {
    use std::io::Write as _;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {reason}");
}

/// `promtool check metrics` on `text`, when promtool is installed (it must be under CI).
fn promtool_check(text: &str) {
    if !prometheus::promtool_check_metrics(text) {
        skip("promtool not installed; /metrics not checked by it");
    }
}

// ---- descriptor exhaustion in a child process --------------------------------------------

/// The `mailbell serve` binary under `prlimit --nofile=N:N`, its stderr read line by line.
struct Child_ {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Child_ {
    fn spawn(config: &std::path::Path, nofile: u32) -> Self {
        let mut child = Command::new("prlimit")
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg(env!("CARGO_BIN_EXE_mailbell"))
            .arg("--config")
            .arg(config)
            .arg("serve")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("prlimit (util-linux) runs");
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a log line containing `what`.
    fn wait_for(&mut self, what: &str, within: Duration) -> String {
        self.wait_for_any(&[what], within)
    }

    /// Waits for a log line containing any of `what` (and checks it has no colour codes).
    fn wait_for_any(&mut self, what: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let l = plain(&l);
                    self.seen.push(l.clone());
                    if what.iter().any(|w| l.contains(w)) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no log line with {what:?} within {within:?}; got:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Child_ {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The daemon's log off a terminal is plain text: no colour codes for journald or a file.
fn plain(s: &str) -> String {
    assert!(
        !s.contains('\u{1b}'),
        "colour codes in a log written to a pipe: {s:?}"
    );
    s.to_owned()
}

/// `name=Some(127.0.0.1:port)` from the "mailbell serving" line.
fn addr_in(line: &str, name: &str) -> SocketAddr {
    let line = plain(line);
    let key = format!("{name}=Some(");
    let from = line
        .find(&key)
        .unwrap_or_else(|| panic!("{name} in {line}"))
        + key.len();
    line[from..].split(')').next().unwrap().parse().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Runs out of descriptors with connections to the hook and milter ports; returns the
/// connections (still open) once the daemon has logged the backoff.
async fn exhaust(child: &mut Child_, hook: SocketAddr, milter: SocketAddr) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    for i in 0..400 {
        let to = if i % 2 == 0 { hook } else { milter };
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(to)).await {
            Ok(Ok(s)) => conns.push(s),
            _ => break,
        }
    }
    child.wait_for(
        "out of resources, pausing accept() and retrying",
        Duration::from_secs(20),
    );
    conns
}

async fn hook_works(addr: SocketAddr) {
    let (status, text) = hook_status(addr, CONNECT.to_string()).await;
    assert_eq!(status, 200, "{text}");
}

fn child_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("mailbell.toml");
    // Header timeout long enough that the flood is still there when the backoff is logged.
    std::fs::write(
        &path,
        config_text(
            dir,
            "[http.stalwart]\nheader_timeout = \"60s\"\n[milter]\ntimeout = \"60s\"\n",
        ),
    )
    .unwrap();
    path
}

/// Out of descriptors (EMFILE), the hook listener backs off and keeps the process up; once the
/// connections go, it serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hook_serves_again_after_descriptor_exhaustion() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Child_::spawn(&child_config(dir.path()), 128);
    let serving = child.wait_for("mailbell serving", Duration::from_secs(30));
    let (hook, milter) = (addr_in(&serving, "http"), addr_in(&serving, "milter"));
    hook_works(hook).await;
    let pid = child.child.id();
    let conns = exhaust(&mut child, hook, milter).await;
    assert!(
        open_fds(pid) >= 120,
        "descriptors in use: {}",
        open_fds(pid)
    );
    assert!(
        child.running(),
        "the daemon stays up while out of descriptors"
    );
    drop(conns);
    // Once the flood is gone the hook answers again (the accept loop retries on its own).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = hook_status(hook, CONNECT.to_string()).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "hook never served again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(child.running());
}

/// The same for the milter: a real milter session after the flood (the milter's accept loop
/// before issue 8 gave up for good after 20 EMFILE in a row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_milter_serves_again_after_descriptor_exhaustion() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Child_::spawn(&child_config(dir.path()), 128);
    let serving = child.wait_for("mailbell serving", Duration::from_secs(30));
    let (hook, milter) = (addr_in(&serving, "http"), addr_in(&serving, "milter"));
    // Descriptors run out on the hook port first; then milter connections arrive while the
    // milter still has free session slots, so its accept() itself meets EMFILE.
    let mut conns = Vec::new();
    for _ in 0..300 {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(hook)).await {
            Ok(Ok(s)) => conns.push(s),
            _ => break,
        }
    }
    for _ in 0..10 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(milter)).await
        {
            conns.push(s);
        }
    }
    let line = child.wait_for_any(
        &["listener=\"milter\"", "milter listener broken"],
        Duration::from_secs(30),
    );
    assert!(
        !line.contains("broken"),
        "the milter listener stopped: {line}"
    );
    // Out of descriptors for a while (the old loop gave up after 20 failed accepts).
    let hold = Instant::now() + Duration::from_secs(3);
    while Instant::now() < hold {
        assert!(child.running());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if milter_session(milter).await {
            break;
        }
        assert!(child.running(), "the daemon exited");
        assert!(Instant::now() < deadline, "the milter never served again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    hook_works(hook).await;
}

/// One whole milter session (connect, helo, mail, rcpt, header, body, eom) answered with a
/// status that lets the mail through.
async fn milter_session(addr: SocketAddr) -> bool {
    use indymilter_test::{ProtoOpts, Status, TestConnection};
    let Ok(mut conn) = TestConnection::configure()
        .read_timeout(Duration::from_secs(5))
        .open_tcp(addr)
        .await
    else {
        return false;
    };
    let ok = |s: Status| matches!(s, Status::Continue | Status::Noreply | Status::Accept);
    let opts = conn.negotiated_opts();
    let steps = async {
        if !ok(conn
            .connect("client.example", ([127, 0, 0, 1], 40000))
            .await
            .ok()?)
            || !ok(conn.helo("client.example").await.ok()?)
            || !ok(conn.mail(["<carol@remote.example>"]).await.ok()?)
            || !ok(conn.rcpt(["<alice@test.local>"]).await.ok()?)
        {
            return None;
        }
        if !opts.contains(ProtoOpts::NO_DATA) && !ok(conn.data().await.ok()?) {
            return None;
        }
        if !ok(conn.header("Subject", " hello").await.ok()?) {
            return None;
        }
        if !opts.contains(ProtoOpts::NO_EOH) && !ok(conn.eoh().await.ok()?) {
            return None;
        }
        if !ok(conn.body(b"hi\r\n".to_vec()).await.ok()?) {
            return None;
        }
        let (_, s) = conn.eom().await.ok()?;
        Some(ok(s))
    };
    steps.await.unwrap_or(false)
}
