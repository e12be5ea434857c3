//! Interop with a real TLS peer: `openssl s_client` (OpenSSL 3) against a tokio-rustls echo
//! server built with `tls::server_config` on 127.0.0.1:0, using the dev PKI
//! (shared research test-peers.md §7).
//!
//! In TLS 1.3 the client's handshake completes before the server judges the client
//! certificate, so the rejection only arrives on the client's first read: every case sends a
//! line and keeps stdin open until s_client exits by itself (or, for the good case, until the
//! echo arrives). Every process is bounded by a timeout and killed past it.
//!
//! Without `openssl` on the PATH these tests print a skip note and pass, except under
//! `CI=true`, where they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use mailbell_link::pki::{ensure_dev_pki, DevPkiPaths};
use mailbell_link::tls::{authorize_client, server_config, ALPN};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// Upper bound for one openssl process and for one server connection.
const BOUND: Duration = Duration::from_secs(15);

/// Whether to run: true if openssl works; panics under `CI=true` if it does not.
fn openssl_available() -> bool {
    let works = std::process::Command::new("openssl")
        .arg("version")
        .stdin(Stdio::null())
        .output()
        .map(|out| out.status.success())
        .unwrap_or(false);
    if !works {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("openssl is required for the TLS interop tests (CI=true) but is missing");
        }
        skip("openssl not found; the openssl s_client interop test did not run");
    }
    works
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

fn dev_pki(dir: &Path) -> DevPkiPaths {
    let names = ["localhost".to_owned(), "127.0.0.1".to_owned()];
    ensure_dev_pki(dir, &names, "mailhost", false).unwrap()
}

/// What the server saw on one connection.
#[derive(Debug)]
enum Outcome {
    /// Handshake and authorization passed; `line` was echoed back.
    Echoed {
        client: String,
        line: String,
    },
    /// The TLS handshake failed.
    Refused(String),
    /// The handshake passed but `authorize_client` refused the client.
    NotAllowed(String),
    TimedOut,
}

/// The echo server: one connection at a time, each outcome reported on the channel.
struct Server {
    addr: SocketAddr,
    outcomes: mpsc::Receiver<Outcome>,
    _tasks: JoinSet<()>,
}

impl Server {
    async fn start(paths: &DevPkiPaths, allowed: Vec<String>) -> Server {
        let files = paths.server_files(allowed);
        let acceptor = TlsAcceptor::from(server_config(&files).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, outcomes) = mpsc::channel(8);
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let served = serve_one(&acceptor, tcp, &files.allowed_client_names);
                let outcome = tokio::time::timeout(BOUND, served)
                    .await
                    .unwrap_or(Outcome::TimedOut);
                if tx.send(outcome).await.is_err() {
                    return;
                }
            }
        });
        Server {
            addr,
            outcomes,
            _tasks: tasks,
        }
    }

    async fn outcome(&mut self) -> Outcome {
        tokio::time::timeout(BOUND, self.outcomes.recv())
            .await
            .expect("the server reported nothing")
            .expect("the server stopped")
    }
}

async fn serve_one(acceptor: &TlsAcceptor, tcp: TcpStream, allowed: &[String]) -> Outcome {
    let tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => return Outcome::Refused(e.to_string()),
    };
    let client = match authorize_client(tls.get_ref().1, allowed) {
        Ok(client) => client,
        Err(e) => return Outcome::NotAllowed(e.to_string()),
    };
    let mut reader = BufReader::new(tls);
    let mut line = String::new();
    if let Err(e) = reader.read_line(&mut line).await {
        return Outcome::Refused(e.to_string());
    }
    let tls = reader.get_mut();
    if tls.write_all(line.as_bytes()).await.is_err() || tls.flush().await.is_err() {
        return Outcome::Refused("cannot echo".to_owned());
    }
    let _ = tls.shutdown().await;
    Outcome::Echoed { client, line }
}

/// What one openssl run produced.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `openssl ARGS`, writes `input` to its stdin and keeps stdin open until a stdout line
/// contains `close_on` (if given) or the process exits; kills it after [`BOUND`].
async fn openssl(args: &[&str], input: &str, close_on: Option<&str>) -> Run {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot start openssl");
    let mut stdin = child.stdin.take();
    if let Some(pipe) = stdin.as_mut() {
        // It may already have exited (broken pipe): its output will tell.
        let _ = pipe.write_all(input.as_bytes()).await;
        let _ = pipe.flush().await;
    }
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr_task = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text).await;
        text
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stdout = String::new();
    let deadline = tokio::time::Instant::now() + BOUND;
    let code = loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    if close_on.is_some_and(|text| line.contains(text)) {
                        stdin = None;
                    }
                    stdout.push_str(&line);
                    stdout.push('\n');
                }
                // stdout closed: the process is exiting.
                _ => match tokio::time::timeout_at(deadline, child.wait()).await {
                    Ok(status) => break status.unwrap().code(),
                    Err(_) => break None,
                },
            },
            () = tokio::time::sleep_until(deadline) => break None,
        }
    };
    drop(stdin);
    if code.is_none() {
        let _ = child.kill().await;
    }
    let stderr = tokio::time::timeout(BOUND, stderr_task)
        .await
        .map(|r| r.unwrap_or_default())
        .unwrap_or_default();
    assert!(
        code.is_some(),
        "openssl {args:?} did not finish within {BOUND:?}\nstdout: {stdout}\nstderr: {stderr}"
    );
    Run {
        code,
        stdout,
        stderr,
    }
}

/// `openssl s_client` against the server, with the common arguments of test-peers.md §7.
async fn s_client(server: &Server, ca: &Path, extra: &[&str], close_on: Option<&str>) -> Run {
    let addr = server.addr.to_string();
    let ca = ca.to_str().unwrap();
    let mut args = vec![
        "s_client",
        "-connect",
        &addr,
        "-CAfile",
        ca,
        "-verify_return_error",
        "-brief",
    ];
    args.extend_from_slice(extra);
    openssl(&args, "hello\n", close_on).await
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts that the server's handshake failed with an error mentioning `text`.
async fn assert_refused(server: &mut Server, text: &str) {
    let error = match server.outcome().await {
        Outcome::Refused(e) => e,
        other => panic!("the server should have refused the handshake: {other:?}"),
    };
    assert!(
        error.contains(text),
        "server error {error:?} should mention {text:?}"
    );
}

fn assert_alert(run: &Run, number: u32, text: &str) {
    assert_ne!(run.code, Some(0), "{run:#?}");
    assert!(
        run.stderr.contains(&format!("alert number {number}")),
        "expected alert {number}: {run:#?}"
    );
    assert!(run.stderr.contains(text), "expected {text:?}: {run:#?}");
    assert!(
        !run.stdout.contains("hello"),
        "no data may be echoed: {run:#?}"
    );
}

#[tokio::test]
async fn dev_pki_verifies_with_openssl() {
    if !openssl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let paths = dev_pki(dir.path());
    let ca = path(&paths.ca_cert);
    let run = openssl(
        &[
            "verify",
            "-CAfile",
            ca,
            "-purpose",
            "sslserver",
            path(&paths.agent_cert),
        ],
        "",
        None,
    )
    .await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    let run = openssl(
        &[
            "verify",
            "-CAfile",
            ca,
            "-purpose",
            "sslclient",
            path(&paths.client_cert),
        ],
        "",
        None,
    )
    .await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    // The agent certificate is not a client certificate, and the reverse.
    let run = openssl(
        &[
            "verify",
            "-CAfile",
            ca,
            "-purpose",
            "sslclient",
            path(&paths.agent_cert),
        ],
        "",
        None,
    )
    .await;
    assert_ne!(run.code, Some(0), "{run:#?}");
}

#[tokio::test]
async fn good_client_certificate_is_echoed() {
    if !openssl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let paths = dev_pki(dir.path());
    let mut server = Server::start(&paths, vec![]).await;
    let alpn = std::str::from_utf8(ALPN).unwrap();
    let extra = [
        "-cert",
        path(&paths.client_cert),
        "-key",
        path(&paths.client_key),
        "-verify_hostname",
        "localhost",
        "-alpn",
        alpn,
    ];
    let run = s_client(&server, &paths.ca_cert, &extra, Some("hello")).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stdout.contains("hello"), "{run:#?}");
    assert!(run.stderr.contains("Verification: OK"), "{run:#?}");
    assert!(run.stderr.contains("TLSv1.3"), "{run:#?}");
    match server.outcome().await {
        Outcome::Echoed { client, line } => {
            assert_eq!(client, "mailhost");
            assert_eq!(line, "hello\n");
        }
        other => panic!("unexpected server outcome {other:?}"),
    }
}

#[tokio::test]
async fn no_client_certificate_gets_certificate_required() {
    if !openssl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let paths = dev_pki(dir.path());
    let mut server = Server::start(&paths, vec![]).await;
    let run = s_client(
        &server,
        &paths.ca_cert,
        &["-verify_hostname", "localhost"],
        None,
    )
    .await;
    assert_alert(&run, 116, "certificate required");
    assert_refused(&mut server, "no certificates").await;
}

#[tokio::test]
async fn certificate_from_another_ca_gets_unknown_ca() {
    if !openssl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rogue_dir = tempfile::tempdir().unwrap();
    let paths = dev_pki(dir.path());
    let rogue = dev_pki(rogue_dir.path());
    let mut server = Server::start(&paths, vec![]).await;
    let extra = [
        "-cert",
        path(&rogue.client_cert),
        "-key",
        path(&rogue.client_key),
        "-verify_hostname",
        "localhost",
    ];
    let run = s_client(&server, &paths.ca_cert, &extra, None).await;
    assert_alert(&run, 48, "unknown ca");
    assert_refused(&mut server, "UnknownIssuer").await;
}

#[tokio::test]
async fn tls12_gets_protocol_version() {
    if !openssl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let paths = dev_pki(dir.path());
    let mut server = Server::start(&paths, vec![]).await;
    let extra = [
        "-tls1_2",
        "-cert",
        path(&paths.client_cert),
        "-key",
        path(&paths.client_key),
        "-verify_hostname",
        "localhost",
    ];
    let run = s_client(&server, &paths.ca_cert, &extra, None).await;
    assert_alert(&run, 70, "protocol version");
    assert_refused(&mut server, "incompatible").await;
}

#[tokio::test]
async fn wrong_server_name_fails_verification() {
    if !openssl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let paths = dev_pki(dir.path());
    let mut server = Server::start(&paths, vec![]).await;
    let extra = [
        "-cert",
        path(&paths.client_cert),
        "-key",
        path(&paths.client_key),
        "-verify_hostname",
        "wrong.example",
    ];
    let run = s_client(&server, &paths.ca_cert, &extra, None).await;
    assert_ne!(run.code, Some(0), "{run:#?}");
    assert!(run.stderr.contains("hostname mismatch"), "{run:#?}");
    assert!(!run.stdout.contains("hello"), "{run:#?}");
    assert_refused(&mut server, "BadCertificate").await;
}

#[tokio::test]
async fn untrusted_agent_fails_verification() {
    if !openssl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rogue_dir = tempfile::tempdir().unwrap();
    let paths = dev_pki(dir.path());
    let rogue = dev_pki(rogue_dir.path());
    let mut server = Server::start(&paths, vec![]).await;
    let extra = [
        "-cert",
        path(&paths.client_cert),
        "-key",
        path(&paths.client_key),
        "-verify_hostname",
        "localhost",
    ];
    // The client trusts another CA only.
    let run = s_client(&server, &rogue.ca_cert, &extra, None).await;
    assert_ne!(run.code, Some(0), "{run:#?}");
    assert!(run.stderr.contains("certificate verify failed"), "{run:#?}");
    assert_refused(&mut server, "UnknownCA").await;
}

#[tokio::test]
async fn client_outside_the_allowed_list_is_not_served() {
    if !openssl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let paths = dev_pki(dir.path());
    let mut server = Server::start(&paths, vec!["relay.example".to_owned()]).await;
    let extra = [
        "-cert",
        path(&paths.client_cert),
        "-key",
        path(&paths.client_key),
        "-verify_hostname",
        "localhost",
    ];
    let run = s_client(&server, &paths.ca_cert, &extra, None).await;
    assert!(!run.stdout.contains("hello"), "{run:#?}");
    match server.outcome().await {
        Outcome::NotAllowed(e) => assert!(e.contains("mailhost"), "{e}"),
        other => panic!("unexpected server outcome {other:?}"),
    }
}
