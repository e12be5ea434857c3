//! What the retrieval proxy's black-box tests share: a private Dovecot (POP3 and IMAP
//! listeners with `haproxy = yes` and a pair without it, optionally implicit-TLS listeners, a
//! passwd-file with test users and their Maildirs; it can be stopped and restarted), the proxy
//! started in-process as `mailbell serve` starts it ([`mailbell::app::start`]), the Python
//! client scripts and small helpers. Without a peer the
//! tests print `SKIPPED ...`; under `CI=true` they fail.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mailbell::app::{self, Running};
use mailbell::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub use shared_dovecot::DOVECOT;

/// The test messages in alice's maildrop, in delivery order (LF line ends, as Maildir stores
/// them; one body line starts with a dot, so POP3 dot-stuffing is exercised).
pub fn messages() -> Vec<String> {
    (1..=3)
        .map(|i| {
            let body: String = (0..40 * i)
                .map(|n| format!("line {n} of message {i}: the quick brown fox\n"))
                .collect();
            format!(
                "From: sender@example.org\nTo: alice@example.org\nSubject: test {i}\n\
                 Message-ID: <m{i}@example.org>\n\n.a line with a leading dot\n{body}"
            )
        })
        .collect()
}

/// Reports a test skipped for a missing system peer (visible under plain `cargo test`).
pub fn skip(reason: &str) {
    use std::io::Write as _;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {reason}");
}

pub fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the real peers are here; under CI a missing one fails the test.
pub fn peers_present() -> bool {
    let missing: Vec<&str> = [
        (Path::new(DOVECOT).exists(), "dovecot"),
        (have("python3", "--version"), "python3"),
        (have("curl", "--version"), "curl"),
    ]
    .into_iter()
    .filter(|(ok, _)| !ok)
    .map(|(_, n)| n)
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "missing under CI: {missing:?}"
    );
    skip(&format!("not installed: {missing:?}"));
    false
}

pub fn free_port() -> u16 {
    shared_dovecot::free_port().unwrap()
}

#[path = "../../../tests/shared/dovecot.rs"]
mod shared_dovecot;

/// The private Dovecot of `tests/shared/dovecot.rs` with the test users: alice (the
/// [`messages`]) and bob (none), each also under an address (the user registry's keys), and
/// every listener kind; ports not asked for are 0.
pub struct Dovecot {
    inner: shared_dovecot::Dovecot,
    pub pop3: u16,
    pub imap: u16,
    /// The implicit-TLS listeners (`haproxy = yes`), 0 without [`Dovecot::start_tls`].
    pub pop3s: u16,
    pub imaps: u16,
    /// Plaintext listeners WITHOUT `haproxy = yes`: Dovecot greets at once and takes a PROXY
    /// header for commands.
    pub pop3_no_haproxy: u16,
    pub imap_no_haproxy: u16,
}

impl Dovecot {
    pub fn start() -> Dovecot {
        Self::start_with(None)
    }

    /// With implicit-TLS POP3 and IMAP listeners (`ssl = yes`, `haproxy = yes`) serving
    /// `cert`/`key`.
    pub fn start_tls(cert: &Path, key: &Path) -> Dovecot {
        Self::start_with(Some((cert.to_owned(), key.to_owned())))
    }

    fn start_with(tls: Option<(PathBuf, PathBuf)>) -> Dovecot {
        let user = |name: &str, password: &str, messages: Vec<Vec<u8>>| shared_dovecot::Mailbox {
            user: name.to_owned(),
            password: password.to_owned(),
            messages,
            aliases: vec![format!("{name}@example.org")],
        };
        let alice = messages().into_iter().map(String::into_bytes).collect();
        let inner = shared_dovecot::Dovecot::start(
            &[
                user("alice", "secret", alice),
                user("bob", "hunter2", Vec::new()),
            ],
            &shared_dovecot::Options {
                tls,
                tls_haproxy: true,
                without_haproxy: true,
                many_sessions: false,
            },
        )
        .unwrap();
        Dovecot {
            pop3: inner.pop3,
            imap: inner.imap,
            pop3s: inner.pop3s.unwrap_or(0),
            imaps: inner.imaps.unwrap_or(0),
            pop3_no_haproxy: inner.pop3_no_haproxy.unwrap_or(0),
            imap_no_haproxy: inner.imap_no_haproxy.unwrap_or(0),
            inner,
        }
    }

    /// Stops Dovecot as `systemctl stop` does: `signal` ("TERM", or "KILL" for a crash) to the
    /// master and every process under it; waits until they are gone.
    pub fn stop(&mut self, signal: &str) {
        self.inner.stop(signal).unwrap();
    }

    /// Starts Dovecot again after [`Dovecot::stop`] on the same ports and Maildirs.
    pub fn restart(&mut self) {
        self.inner.restart().unwrap();
    }

    pub fn log(&self) -> String {
        self.inner.log()
    }

    /// Where the configuration, the log and `home/<user>/Maildir` are.
    pub fn dir(&self) -> &Path {
        self.inner.dir()
    }
}

/// The proxy in front of `dovecot`, all four listeners on ephemeral ports.
pub struct Proxy {
    pub running: Option<Running>,
    pub stop: CancellationToken,
    pub dir: tempfile::TempDir,
    /// The test certificate's CA (the dev PKI's).
    pub ca: PathBuf,
    /// The configuration file, for `mailbell` commands run beside the proxy.
    pub config: PathBuf,
}

/// A proxy's configuration in `dir`: the dev PKI's certificate, data in `dir/data`, the
/// retrieval listeners on `listen` (`127.0.0.1:0`: ephemeral; `""`: off), the admin API on a
/// free loopback port when `admin_token` is given, `extra` appended (inside `[retrieval]`, or
/// after a section header of its own). Written to `dir/mailbell.toml`; returns the text and
/// the CA file.
pub fn proxy_config(
    dir: &Path,
    backends: (u16, u16),
    listen: [&str; 4],
    admin_token: Option<&str>,
    extra: &str,
) -> (String, PathBuf) {
    let admin = match admin_token {
        Some(t) => format!(
            "admin = \"127.0.0.1:{}\"\n[admin]\ntoken = \"{t}\"\n",
            free_port()
        ),
        None => "admin = \"\"\n".to_owned(),
    };
    let pki = mailbell_link::pki::ensure_dev_pki(
        &dir.join("pki"),
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
        "mailhost",
        false,
    )
    .unwrap();
    let [pop3, pop3s, imap, imaps] = listen;
    let (backend_pop3, backend_imap) = backends;
    let toml = format!(
        "[mailbell]\ndata_dir = {data:?}\n[link]\ndev_pki_dir = {pki:?}\n\
         [listen]\nhttp = \"\"\nmilter = \"\"\n{admin}\
         [retrieval]\npop3 = \"{pop3}\"\npop3s = \"{pop3s}\"\nimap = \"{imap}\"\nimaps = \"{imaps}\"\n\
         backend_pop3 = \"127.0.0.1:{backend_pop3}\"\nbackend_imap = \"127.0.0.1:{backend_imap}\"\n\
         cert = {cert:?}\nkey = {key:?}\n{extra}\n",
        data = dir.join("data"),
        pki = dir.join("pki"),
        cert = pki.agent_cert,
        key = pki.agent_key,
    );
    std::fs::write(dir.join("mailbell.toml"), &toml).unwrap();
    (toml, pki.ca_cert)
}

impl Proxy {
    pub async fn start(backend_pop3: u16, backend_imap: u16, extra: &str) -> Proxy {
        Proxy::start_with(backend_pop3, backend_imap, None, extra).await
    }

    /// [`Proxy::start`], with the admin API on a free loopback port when `admin_token` is given.
    pub async fn start_with(
        backend_pop3: u16,
        backend_imap: u16,
        admin_token: Option<&str>,
        extra: &str,
    ) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let (toml, ca) = proxy_config(
            dir.path(),
            (backend_pop3, backend_imap),
            ["127.0.0.1:0"; 4],
            admin_token,
            extra,
        );
        let cfg = Config::from_toml(&toml, "test").unwrap();
        let stop = CancellationToken::new();
        let running = app::start(cfg, stop.clone()).await.unwrap();
        Proxy {
            running: Some(running),
            stop,
            ca,
            config: dir.path().join("mailbell.toml"),
            dir,
        }
    }

    /// The meter store the proxy writes.
    pub fn meter(&self) -> &mailbell::meter::MeterStore {
        &self.running().stores.meter
    }

    pub fn meter_dir(&self) -> PathBuf {
        self.dir.path().join("data").join("meter")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.running().admin_addr.unwrap()
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        self.running
            .as_ref()
            .unwrap()
            .retrieval_addrs
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    pub fn port(&self, name: &str) -> u16 {
        self.addr(name).port()
    }

    /// The proxy's totals once `sessions` sessions have ended (it counts a session when its
    /// task ends, just after the client saw the last reply).
    pub async fn stats_after(&self, sessions: u64) -> [u64; 4] {
        let st = &self.running.as_ref().unwrap().retrieval_stats;
        let deadline = Instant::now() + Duration::from_secs(5);
        while st.sessions.load(Relaxed) < sessions && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(st.sessions.load(Relaxed), sessions);
        [
            st.logins.load(Relaxed),
            st.retrieved.load(Relaxed),
            st.retrieved_bytes.load(Relaxed),
            st.bytes_to_client.load(Relaxed),
        ]
    }

    /// Stops the proxy; returns its directory (config, data), deleted when dropped.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        self.dir
    }
}

/// Runs `python3 -c script args...` off the runtime; returns stdout, panics with stderr on
/// failure.
pub async fn python(script: &'static str, args: Vec<String>) -> String {
    python_outcome(script, args)
        .await
        .unwrap_or_else(|e| panic!("python failed: {e}"))
}

/// [`python`], returning stderr (and stdout) when the script failed.
pub async fn python_outcome(script: &'static str, args: Vec<String>) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(&args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{}\nstdout: {stdout}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    })
    .await
    .unwrap()
}

/// POP3 through the proxy: log in (STLS first unless `mode` is "ssl"), STAT, LIST, RETR each
/// message, QUIT. Prints the client's own port, then per message the RETR content as hex (LF
/// line ends, dot-unstuffed, as poplib returns it), then "ok"; or "refused: ..." when the
/// login fails.
pub const POP3_SCRIPT: &str = r#"
import poplib, socket, ssl, sys
port, mode, user, password, ca, src = sys.argv[1:7]
poplib.POP3._create_socket = lambda self, timeout: socket.create_connection(
    (self.host, self.port), timeout, source_address=(src, 0))
ctx = ssl.create_default_context(cafile=ca)
if mode == "ssl":
    p = poplib.POP3_SSL("127.0.0.1", int(port), context=ctx, timeout=10)
else:
    p = poplib.POP3("127.0.0.1", int(port), timeout=10)
    if mode == "stls":
        p.stls(context=ctx)
print("port", p.sock.getsockname()[1])
try:
    p.user(user)
    p.pass_(password)
except poplib.error_proto as e:
    print("refused:", e)
    sys.exit(0)
count, size = p.stat()
print("stat", count, size)
for i in range(1, count + 1):
    resp, lines, octets = p.retr(i)
    print("msg", b"".join(l + b"\n" for l in lines).hex())
p.quit()
print("ok")
"#;

/// IMAP through the proxy: STARTTLS (unless "ssl"), LOGIN, SELECT INBOX, FETCH each message's
/// BODY.PEEK[] one per command, LOGOUT. Output as [`POP3_SCRIPT`] (content with CRLF).
pub const IMAP_SCRIPT: &str = r#"
import imaplib, socket, ssl, sys
port, mode, user, password, ca, src = sys.argv[1:7]
imaplib.IMAP4._create_socket = lambda self, timeout: socket.create_connection(
    (self.host, self.port), timeout, source_address=(src, 0))
ctx = ssl.create_default_context(cafile=ca)
if mode == "ssl":
    m = imaplib.IMAP4_SSL("127.0.0.1", int(port), ssl_context=ctx, timeout=10)
else:
    m = imaplib.IMAP4("127.0.0.1", int(port), timeout=10)
    if mode == "starttls":
        m.starttls(ssl_context=ctx)
print("port", m.sock.getsockname()[1])
try:
    m.login(user, password)
except imaplib.IMAP4.error as e:
    print("refused:", e)
    sys.exit(0)
typ, data = m.select("INBOX")
count = int(data[0])
print("stat", count)
for i in range(1, count + 1):
    typ, data = m.fetch(str(i), "(BODY.PEEK[])")
    print("msg", data[0][1].hex())
m.logout()
print("ok")
"#;

/// The lines of a script's output that start with `key `.
pub fn field<'a>(out: &'a str, key: &str) -> Vec<&'a str> {
    out.lines()
        .filter_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
        .collect()
}

pub fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The sum of `key=N/BYTES` (POP3, e.g. `retr=3/10742`) or `key=BYTES` (IMAP `body_bytes=`)
/// over Dovecot's logout lines: (count, bytes).
pub fn dovecot_counter(log: &str, key: &str) -> (u64, u64) {
    let mut total = (0, 0);
    for line in log.lines().filter(|l| l.contains("Logged out")) {
        let Some(v) = line
            .split([' ', ','])
            .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        else {
            continue;
        };
        match v.split_once('/') {
            Some((n, b)) => {
                total.0 += n.parse::<u64>().unwrap();
                total.1 += b.parse::<u64>().unwrap();
            }
            None => total.1 += v.parse::<u64>().unwrap(),
        }
    }
    total
}

/// Waits until Dovecot's log holds `needle` (it writes the login line asynchronously).
pub async fn wait_log(d: &Dovecot, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = d.log();
        if log.contains(needle) || Instant::now() > deadline {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn args(port: u16, mode: &str, user: &str, password: &str, ca: &Path) -> Vec<String> {
    vec![
        port.to_string(),
        mode.into(),
        user.into(),
        password.into(),
        ca.display().to_string(),
        CLIENT_IP.into(),
    ]
}

/// The clients' source address: not the proxy's own (127.0.0.1), so an address Dovecot logs
/// can only have come from the PROXY v2 header.
pub const CLIENT_IP: &str = "127.0.0.2";

/// Reads until `pred` holds for what was read, EOF, or `limit`; returns what was read and
/// whether EOF came.
pub async fn read_until<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    limit: Duration,
    pred: impl Fn(&str) -> bool,
) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into(), false),
        }
        if pred(&String::from_utf8_lossy(&got)) {
            return (String::from_utf8_lossy(&got).into(), false);
        }
    }
}

/// `openssl s_client -starttls` with `input` on stdin (`-quiet` waits for the server to close).
pub async fn s_client(proto: &'static str, port: u16, ca: PathBuf, input: &'static str) -> String {
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut child = Command::new("timeout")
            .args([
                "10",
                "openssl",
                "s_client",
                "-quiet",
                "-crlf",
                "-starttls",
                proto,
            ])
            .arg("-connect")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-CAfile")
            .arg(&ca)
            .args(["-verify_return_error", "-servername", "localhost"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "s_client {proto}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

/// A test CA (rcgen) that issues server certificates into its directory.
pub struct TestCa {
    dir: PathBuf,
    /// The CA certificate, PEM.
    pub cert: PathBuf,
    ca: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    /// A fresh CA named `name` (its certificate `dir/<name>-ca.pem`).
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        let cert = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&cert, ca.pem()).unwrap();
        TestCa {
            dir: dir.to_owned(),
            cert,
            ca,
            key,
        }
    }

    /// A server certificate with common name `cn` and DNS names `names`, written to
    /// `<stem>.pem` and `<stem>.key` (replacing them by rename, as certbot's switch does).
    pub fn issue(&self, stem: &str, cn: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.key).unwrap();
        let (cert_path, key_path) = (
            self.dir.join(format!("{stem}.pem")),
            self.dir.join(format!("{stem}.key")),
        );
        for (path, text) in [(&cert_path, cert.pem()), (&key_path, key.serialize_pem())] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        (cert_path, key_path)
    }
}

/// The subject of the certificate an implicit-TLS listener on `port` serves for SNI `name`
/// (`openssl s_client -servername`), checked against `ca`.
pub async fn served_subject(port: u16, name: &'static str, ca: PathBuf) -> String {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("timeout")
            .args(["10", "openssl", "s_client", "-connect"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-servername", name, "-verify_return_error", "-CAfile"])
            .arg(&ca)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "s_client -servername {name}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.lines()
            .find_map(|l| l.strip_prefix("subject="))
            .unwrap_or_else(|| panic!("no subject from s_client: {text}"))
            .replace(' ', "")
    })
    .await
    .unwrap()
}

/// Retrieves alice's messages through `listener` of `p` with [`POP3_SCRIPT`] or
/// [`IMAP_SCRIPT`] (`mode`: "stls", "starttls" or "ssl"), asserts that each arrived unchanged
/// and that Dovecot logged the client's own address and port (PROXY v2); returns its log line.
pub async fn retrieve_alices_mail(p: &Proxy, d: &Dovecot, listener: &str, mode: &str) -> String {
    let port = p.port(listener);
    let client_port = retrieve_alices_mail_unlogged(p, listener, mode)
        .await
        .unwrap_or_else(|out| panic!("{listener}: {out}\ndovecot log:\n{}", d.log()));
    let line = format!("rip={CLIENT_IP}, rport={client_port}, lip=127.0.0.1, lport={port}");
    let log = wait_log(d, &line).await;
    log.lines()
        .find(|l| l.contains(&line))
        .unwrap_or_else(|| panic!("{line} not in dovecot's log:\n{log}"))
        .to_owned()
}

/// [`retrieve_alices_mail`] without looking at the backend's log (a backend that does not
/// read PROXY headers logs the proxy's address): the client's port, or the script's output
/// when it did not end well.
pub async fn retrieve_alices_mail_unlogged(
    p: &Proxy,
    listener: &str,
    mode: &str,
) -> Result<u16, String> {
    let imap = listener.starts_with("imap");
    let script = if imap { IMAP_SCRIPT } else { POP3_SCRIPT };
    let out = python(
        script,
        args(p.port(listener), mode, "alice", "secret", &p.ca),
    )
    .await;
    if !out.ends_with("ok\n") {
        return Err(out);
    }
    let want: Vec<String> = messages()
        .iter()
        .map(|m| {
            hex(&if imap {
                m.replace('\n', "\r\n")
            } else {
                m.clone()
            })
        })
        .collect();
    assert_eq!(field(&out, "msg"), want, "{listener}");
    Ok(field(&out, "port")[0].parse().unwrap())
}

/// A TLS connection to one of the proxy's implicit TLS listeners, trusting the test CA.
pub async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let files = mailbell_link::tls::ClientTlsFiles {
        ca: ca.to_owned(),
        cert: ca.with_file_name("mailhost.pem"),
        key: ca.with_file_name("mailhost.key"),
    };
    let cfg = mailbell_link::tls::client_config(&files).unwrap();
    let mut cfg = (*cfg).clone();
    cfg.alpn_protocols.clear();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Reads the PROXY v2 header a backend connection starts with (16 bytes, the last two the
/// length of the rest); false if the connection ended first.
pub async fn skip_proxy_header(s: &mut TcpStream) -> bool {
    let mut header = [0u8; 16];
    if s.read_exact(&mut header).await.is_err() {
        return false;
    }
    let mut rest = vec![0u8; usize::from(u16::from_be_bytes([header[14], header[15]]))];
    s.read_exact(&mut rest).await.is_ok()
}

/// Answers the proxy's check that a backend took the PROXY header (sent after the greeting,
/// before any client command: POP3 `CAPA`, IMAP `mailbell-probe NOOP`) with an empty CAPA list
/// or a tagged OK; false if the connection ended first.
pub async fn answer_probe(s: &mut TcpStream) -> bool {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        match s.read(&mut b).await {
            Ok(1) => line.push(b[0]),
            _ => return false,
        }
    }
    let answer: &[u8] = if line.starts_with(b"CAPA") {
        b"+OK\r\n.\r\n"
    } else {
        b"mailbell-probe OK\r\n"
    };
    s.write_all(answer).await.is_ok()
}

/// A POP3 backend that greets and answers every line `+OK` (CAPA with an empty list).
pub async fn ok_backend() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if !skip_proxy_header(&mut s).await {
                    return;
                }
                let _ = s.write_all(b"+OK fake\r\n").await;
                let mut lines = tokio::io::BufReader::new(s);
                let mut line = String::new();
                while tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line)
                    .await
                    .is_ok_and(|n| n > 0)
                {
                    let answer: &[u8] = if line.starts_with("CAPA") {
                        b"+OK\r\n.\r\n"
                    } else {
                        b"+OK\r\n"
                    };
                    let _ = lines.get_mut().write_all(answer).await;
                    line.clear();
                }
            });
        }
    });
    port
}
