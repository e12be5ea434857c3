//! Black-box tests of the retrieval proxy's TLS: the listeners' certificates chosen by SNI and
//! reloaded (on SIGHUP to the real `mailbell serve` process, and when the files change) while
//! open sessions go on, a broken replacement that keeps the old certificate; and TLS from the
//! proxy to a real Dovecot's implicit-TLS listeners after the PROXY v2 header. Clients:
//! `openssl s_client -servername`, a rustls client, Python's poplib and imaplib. Without
//! dovecot, python3 or openssl the tests print `SKIPPED ...`; under `CI=true` they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tests/shared/prometheus.rs"]
mod prometheus;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::retrieval::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_mailbell");

/// Whether openssl is here too; under CI a missing one fails the test.
fn openssl_present() -> bool {
    if have("openssl", "version") {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "openssl missing under CI"
    );
    skip("openssl not installed");
    false
}

/// `mailbell serve` as its own process (so it can get SIGHUP), killed on drop; its log (stderr)
/// goes to a file.
struct Daemon {
    child: Child,
    log: PathBuf,
    imaps: u16,
    admin: u16,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Serves IMAPS in front of `d` with the certificates `certs` (cert, key), checked for new
    /// files every `check`.
    fn start(dir: &Path, d: &Dovecot, certs: &[(PathBuf, PathBuf)], check: &str) -> Daemon {
        let (imaps, admin) = (free_port(), free_port());
        let mut toml = format!(
            "[mailbell]\ndata_dir = {data:?}\n\
             [listen]\nhttp = \"\"\nmilter = \"\"\nadmin = \"127.0.0.1:{admin}\"\n\
             [link]\ndev_pki_dir = {pki:?}\n\
             [retrieval]\nimaps = \"127.0.0.1:{imaps}\"\n\
             backend_pop3 = \"127.0.0.1:{pop3}\"\nbackend_imap = \"127.0.0.1:{imap}\"\n\
             cert_check_interval = \"{check}\"\n",
            data = dir.join("data"),
            pki = dir.join("pki"),
            pop3 = d.pop3,
            imap = d.imap,
        );
        for (cert, key) in certs {
            toml += &format!("[[retrieval.certificates]]\ncert = {cert:?}\nkey = {key:?}\n");
        }
        let config = dir.join("mailbell.toml");
        std::fs::write(&config, toml).unwrap();
        let log = dir.join("daemon.log");
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let daemon = Daemon {
            child,
            log,
            imaps,
            admin,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", imaps)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mailbell did not listen: {}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn hangup(&mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success());
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The admin listener's `/metrics` text.
    async fn metrics(&self) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.admin)).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        out
    }

    /// Waits until the log holds `needle`.
    async fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < deadline, "no {needle:?} in: {log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Asks for the certificate of `name` until its subject is `want` (within 10 s).
async fn wait_subject(port: u16, name: &'static str, ca: &Path, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = served_subject(port, name, ca.to_owned()).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name}: {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An IMAP session over implicit TLS (SNI `name`, only `ca` trusted), logged in as alice.
struct Session {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
}

impl Session {
    async fn open(port: u16, name: &'static str, ca: &Path) -> Session {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(ca).unwrap();
        for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(name).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let mut s = Session { tls };
        s.until("* OK").await;
        s.command("a1 LOGIN alice secret\r\n", "a1 OK").await;
        s
    }

    async fn until(&mut self, want: &str) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains(want) {
            let n = tokio::time::timeout(Duration::from_secs(5), self.tls.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(
                n > 0,
                "closed before {want:?}: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    async fn command(&mut self, line: &str, want: &str) -> String {
        self.tls.write_all(line.as_bytes()).await.unwrap();
        self.until(want).await
    }

    /// The leaf certificate this session's handshake got.
    fn leaf(&self) -> Vec<u8> {
        self.tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }
}

fn leaf_of(cert: &Path) -> Vec<u8> {
    let pem = std::fs::read(cert).unwrap();
    let first = rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
        .next()
        .unwrap();
    let c: rustls::pki_types::CertificateDer = first.unwrap();
    c.to_vec()
}

/// The session opened before a reload goes on with the keys of its own handshake.
async fn still_works(s: &mut Session, old_leaf: &[u8]) {
    let out = s.command("a2 SELECT INBOX\r\n", "a2 OK").await;
    assert!(out.contains("* 3 EXISTS"), "{out}");
    assert_eq!(s.leaf(), old_leaf);
    s.command("a3 LOGOUT\r\n", "a3 OK").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_certificates_by_sni_while_open_sessions_go_on() {
    if !peers_present() || !openssl_present() {
        return;
    }
    let d = Dovecot::start();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "proxy");
    let a = ca.issue("a", "a v1", &["a.test"]);
    let b = ca.issue("b", "b v1", &["b.test", "*.b.test"]);
    // Files are checked hourly: only the signal can make the change show.
    let mut m = Daemon::start(dir.path(), &d, &[a.clone(), b], "1h");
    let port = m.imaps;
    for (name, want) in [
        ("a.test", "CN=av1"),
        ("b.test", "CN=bv1"),
        ("x.b.test", "CN=bv1"),
        // An unknown name gets the first certificate.
        ("unknown.test", "CN=av1"),
    ] {
        assert_eq!(served_subject(port, name, ca.cert.clone()).await, want);
    }
    let old_leaf = leaf_of(&a.0);
    let mut open = Session::open(port, "a.test", &ca.cert).await;

    ca.issue("a", "a v2", &["a.test"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        served_subject(port, "a.test", ca.cert.clone()).await,
        "CN=av1"
    );
    m.hangup();
    wait_subject(port, "a.test", &ca.cert, "CN=av2").await;
    assert_eq!(
        served_subject(port, "b.test", ca.cert.clone()).await,
        "CN=bv1"
    );
    still_works(&mut open, &old_leaf).await;

    // A broken replacement: the old certificate stays, the error names the file and is
    // counted, and the expiry metric is still the served certificate's.
    let served_v2 = leaf_of(&a.0);
    std::fs::write(&a.0, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    m.hangup();
    let log = m
        .wait_log(&format!("invalid PEM in {}", a.0.display()))
        .await;
    assert!(log.contains("the old one is still served"), "{log}");
    let mut s = Session::open(port, "a.test", &ca.cert).await;
    still_works(&mut s, &served_v2).await;
    let metrics = m.metrics().await;
    assert!(
        metrics.contains("mailbell_retrieval_cert_reload_failures_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mailbell_retrieval_cert_reloads_total 1\n"),
        "{metrics}"
    );
    for label in ["retrieval", "retrieval.1"] {
        let series = format!("mailbell_tls_cert_expiry_timestamp_seconds{{file=\"{label}\"}} ");
        assert!(metrics.contains(&series), "{metrics}");
    }
    // A daemon with the proxy on exposes what the retrieval alert rules use, and promtool
    // accepts its /metrics.
    for name in prometheus::rule_metrics("mailbell-retrieval") {
        assert!(
            metrics.contains(&format!("\n{name}")),
            "alert rules use {name}, which /metrics does not have:\n{metrics}"
        );
    }
    let body = metrics.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    if !prometheus::promtool_check_metrics(body) {
        skip("promtool not installed; /metrics not checked by it");
    }
    assert!(m.alive(), "SIGHUP must not end the daemon: {}", m.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_is_served_without_a_signal_and_a_broken_one_is_logged_once() {
    if !peers_present() || !openssl_present() {
        return;
    }
    let d = Dovecot::start();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "proxy");
    let a = ca.issue("a", "a v1", &["a.test"]);
    let b = ca.issue("b", "b v1", &["b.test"]);
    let m = Daemon::start(dir.path(), &d, &[a.clone(), b.clone()], "200ms");
    let port = m.imaps;
    let old_leaf = leaf_of(&a.0);
    let mut open = Session::open(port, "a.test", &ca.cert).await;
    ca.issue("a", "a v2", &["a.test"]);
    wait_subject(port, "a.test", &ca.cert, "CN=av2").await;
    still_works(&mut open, &old_leaf).await;

    // A key that does not belong to the certificate: kept, logged once over many polls.
    let (_, other_key) = ca.issue("other", "other", &["b.test"]);
    std::fs::copy(&other_key, &b.1).unwrap();
    let needle = format!("cannot use certificate {}", b.0.display());
    m.wait_log(&needle).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(m.log().matches(&needle).count(), 1, "{}", m.log());
    assert_eq!(
        served_subject(port, "b.test", ca.cert.clone()).await,
        "CN=bv1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_backend_starts_after_the_proxy_header() {
    if !peers_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backend_ca = TestCa::new(dir.path(), "backend");
    let (cert, key) = backend_ca.issue("dovecot", "dovecot", &["dovecot.test"]);
    let d = Dovecot::start_tls(&cert, &key);
    let extra = format!(
        "backend_tls = true\nbackend_ca = {:?}\nbackend_server_name = \"dovecot.test\"",
        backend_ca.cert
    );
    let p = Proxy::start(d.pop3s, d.imaps, &extra).await;
    for (listener, mode) in [("pop3", "stls"), ("imaps", "ssl")] {
        let line = retrieve_alices_mail(&p, &d, listener, mode).await;
        // Dovecot's own TLS carried the session (its login line says so).
        assert!(line.contains("TLS"), "{listener}: {line}");
    }
    let [logins, retrieved, ..] = p.stats_after(2).await;
    assert_eq!((logins, retrieved), (2, 6));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_certificate_that_does_not_verify_is_refused_with_a_reason_at_once() {
    if !peers_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backend_ca = TestCa::new(dir.path(), "backend");
    let stranger = TestCa::new(dir.path(), "stranger");
    let (cert, key) = backend_ca.issue("dovecot", "dovecot", &["dovecot.test"]);
    let d = Dovecot::start_tls(&cert, &key);
    for (ca, name, why) in [
        (&stranger.cert, "dovecot.test", "UnknownIssuer"),
        (
            &backend_ca.cert,
            "other.test",
            "not valid for name \"other.test\"",
        ),
    ] {
        let extra =
            format!("backend_tls = true\nbackend_ca = {ca:?}\nbackend_server_name = \"{name}\"");
        let p = Proxy::start(d.pop3s, d.imaps, &extra).await;
        for (listener, want) in [
            (
                "pop3",
                "-ERR [SYS/TEMP] backend unavailable: TLS handshake: ",
            ),
            (
                "imap",
                "* BYE [UNAVAILABLE] backend unavailable: TLS handshake: ",
            ),
        ] {
            let started = Instant::now();
            let mut s = TcpStream::connect(p.addr(listener)).await.unwrap();
            let (got, eof) = read_until(&mut s, Duration::from_secs(5), |_| false).await;
            assert!(eof, "{listener}: {got:?}");
            assert!(
                got.starts_with(want) && got.contains(why),
                "{listener}: {got:?}"
            );
            assert!(started.elapsed() < Duration::from_secs(2), "{listener}");
        }
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_answers_the_tls_handshake_is_given_up_at_connect_timeout() {
    // A backend that takes the connection and the PROXY header, then says nothing.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "backend");
    let extra = format!(
        "backend_tls = true\nbackend_ca = {:?}\nbackend_server_name = \"backend.test\"\n\
         connect_timeout = \"1s\"",
        ca.cert
    );
    let p = Proxy::start(port, port, &extra).await;
    let started = Instant::now();
    let mut s = TcpStream::connect(p.addr("imap")).await.unwrap();
    let (got, eof) = read_until(&mut s, Duration::from_secs(5), |_| false).await;
    assert!(eof, "{got:?}");
    assert_eq!(
        got,
        "* BYE [UNAVAILABLE] backend unavailable: TLS handshake timed out\r\n"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    p.stop().await;
}
