//! Black-box tests of the retrieval proxy against a real private Dovecot and real clients:
//! Python's poplib and imaplib, curl and openssl (helpers in `retrieval_support`). Without
//! dovecot the tests print `SKIPPED ...`; under `CI=true` they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering::Relaxed;
use support::retrieval::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_messages_arrive_unchanged_and_dovecot_sees_the_client_address() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(d.pop3, d.imap, "").await;
    for (listener, mode) in [("pop3", "stls"), ("pop3s", "ssl")] {
        let port = p.port(listener);
        let out = python(POP3_SCRIPT, args(port, mode, "alice", "secret", &p.ca)).await;
        assert!(
            out.ends_with("ok\n"),
            "{listener}: {out}\ndovecot log:\n{}",
            d.log()
        );
        let want: Vec<String> = messages().iter().map(|m| hex(m)).collect();
        assert_eq!(field(&out, "msg"), want, "{listener}");
        // PROXY v2: Dovecot logs the client's own port and the proxy's listener as local end.
        let client_port = field(&out, "port")[0];
        let line = format!("rip={CLIENT_IP}, rport={client_port}, lip=127.0.0.1, lport={port}");
        let log = wait_log(&d, &line).await;
        assert!(log.contains(&line), "{line} not in dovecot's log:\n{log}");
    }
    // The backend decides: a wrong password is refused.
    let out = python(
        POP3_SCRIPT,
        args(p.port("pop3"), "stls", "alice", "wrong", &p.ca),
    )
    .await;
    assert!(out.contains("refused:") && out.contains("-ERR"), "{out}");
    let log = wait_log(&d, "Password mismatch").await;
    assert!(
        log.contains(&format!("passwd-file(alice,{CLIENT_IP}")),
        "{log}"
    );
    assert!(log.contains("Password mismatch"), "{log}");
    // The proxy's meter agrees with Dovecot's retr=N/bytes, to the byte (docs/retrieval.md).
    let [logins, retrieved, retrieved_bytes, _] = p.stats_after(3).await;
    assert_eq!(logins, 2);
    let log = d.log();
    assert_eq!(
        dovecot_counter(&log, "retr"),
        (retrieved, retrieved_bytes),
        "{log}"
    );
    assert_eq!(retrieved, 6);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_messages_arrive_unchanged_and_dovecot_sees_the_client_address() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(d.pop3, d.imap, "").await;
    let want: Vec<String> = messages()
        .iter()
        .map(|m| hex(&m.replace('\n', "\r\n")))
        .collect();
    for (listener, mode) in [("imap", "starttls"), ("imaps", "ssl")] {
        let port = p.port(listener);
        let out = python(IMAP_SCRIPT, args(port, mode, "alice", "secret", &p.ca)).await;
        assert!(
            out.ends_with("ok\n"),
            "{listener}: {out}\ndovecot log:\n{}",
            d.log()
        );
        assert_eq!(field(&out, "msg"), want, "{listener}");
        let client_port = field(&out, "port")[0];
        let line = format!("rip={CLIENT_IP}, rport={client_port}, lip=127.0.0.1, lport={port}");
        let log = wait_log(&d, &line).await;
        assert!(log.contains(&line), "{line} not in dovecot's log:\n{log}");
    }
    let out = python(
        IMAP_SCRIPT,
        args(p.port("imap"), "starttls", "bob", "wrong", &p.ca),
    )
    .await;
    assert!(out.contains("refused:"), "{out}");
    // The proxy's FETCH bytes agree with Dovecot's body_bytes (every fetch here is BODY[]).
    let [logins, retrieved, retrieved_bytes, _] = p.stats_after(3).await;
    assert_eq!((logins, retrieved), (2, 6));
    let log = d.log();
    assert_eq!(
        dovecot_counter(&log, "body_bytes").1,
        retrieved_bytes,
        "{log}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_retrieves_over_pop3_and_imap_with_and_without_implicit_tls() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(d.pop3, d.imap, "").await;
    let msgs = messages();
    let crlf = msgs[1].replace('\n', "\r\n");
    let cases = [
        (format!("pop3://127.0.0.1:{}/2", p.port("pop3")), true),
        (format!("pop3s://127.0.0.1:{}/2", p.port("pop3s")), false),
        (
            format!("imap://127.0.0.1:{}/INBOX;UID=2", p.port("imap")),
            true,
        ),
        (
            format!("imaps://127.0.0.1:{}/INBOX;UID=2", p.port("imaps")),
            false,
        ),
    ];
    for (url, starttls) in cases {
        let ca = p.ca.clone();
        let u = url.clone();
        let out = tokio::task::spawn_blocking(move || {
            let mut c = Command::new("curl");
            c.args(["-sS", "--max-time", "10", "--cacert"])
                .arg(&ca)
                .args(["-u", "alice:secret"]);
            if starttls {
                c.arg("--ssl-reqd");
            }
            c.arg(&u).output().unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // curl removes POP3 dot-stuffing and the final dot, so both protocols give the message.
        let got = String::from_utf8(out.stdout).unwrap();
        assert_eq!(got, crlf, "{url}");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_login_before_tls_is_refused_by_the_proxy() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(d.pop3, d.imap, "").await;
    let out = python(
        POP3_SCRIPT,
        args(p.port("pop3"), "plain", "alice", "secret", &p.ca),
    )
    .await;
    assert!(
        out.contains("refused:") && out.contains("Plaintext"),
        "{out}"
    );
    let out = python(
        IMAP_SCRIPT,
        args(p.port("imap"), "plain", "alice", "secret", &p.ca),
    )
    .await;
    assert!(out.contains("refused:"), "{out}");
    // Never asked: Dovecot saw no login attempt for alice.
    assert!(!d.log().contains("user=<alice>"), "{}", d.log());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_is_down_is_reported_at_once() {
    if !peers_present() {
        return;
    }
    let closed = free_port();
    let p = Proxy::start(closed, closed, "").await;
    for (listener, want) in [
        ("pop3", "-ERR [SYS/TEMP] backend unavailable"),
        ("imap", "* BYE [UNAVAILABLE] backend unavailable"),
    ] {
        let started = Instant::now();
        let mut s = TcpStream::connect(p.addr(listener)).await.unwrap();
        let (got, eof) = read_until(&mut s, Duration::from_secs(3), |_| false).await;
        assert!(got.starts_with(want), "{listener}: {got:?}");
        assert!(eof, "{listener}: connection left open");
        assert!(started.elapsed() < Duration::from_secs(2), "{listener}");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_at_the_prelogin_timeout_and_shutdown_says_bye() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(d.pop3, d.imap, "prelogin_timeout = \"1s\"").await;
    let started = Instant::now();
    let mut s = TcpStream::connect(p.addr("pop3")).await.unwrap();
    let (got, eof) = read_until(&mut s, Duration::from_secs(5), |_| false).await;
    assert!(got.starts_with("+OK"), "{got:?}");
    assert!(got.contains("-ERR [SYS/TEMP] no activity"), "{got:?}");
    assert!(eof);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // An IMAP session open at shutdown is told why it ends.
    let mut s = TcpStream::connect(p.addr("imap")).await.unwrap();
    let (greeting, _) = read_until(&mut s, Duration::from_secs(3), |g| g.ends_with("\r\n")).await;
    assert!(greeting.starts_with("* OK"), "{greeting:?}");
    s.write_all(b"a1 NOOP\r\n").await.unwrap();
    let (noop, _) = read_until(&mut s, Duration::from_secs(3), |g| g.contains("a1 OK")).await;
    assert!(noop.contains("a1 OK"), "{noop:?}");
    p.stop.cancel();
    let (bye, eof) = read_until(&mut s, Duration::from_secs(3), |_| false).await;
    assert!(
        bye.starts_with("* BYE [UNAVAILABLE] server shutting down"),
        "{bye:?}"
    );
    assert!(eof);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_and_logout_end_with_the_backends_reply_even_after_a_half_close() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(d.pop3, d.imap, "").await;
    for (listener, send, last) in [
        ("pop3", &b"CAPA\r\nQUIT\r\n"[..], "+OK Logging out"),
        (
            "imap",
            &b"a1 NOOP\r\na2 LOGOUT\r\n"[..],
            "a2 OK Logout completed",
        ),
    ] {
        let mut s = TcpStream::connect(p.addr(listener)).await.unwrap();
        let (greeting, _) =
            read_until(&mut s, Duration::from_secs(3), |g| g.ends_with("\r\n")).await;
        // Pipelined, then the client closes its side at once: the replies still arrive, and
        // nothing of the proxy's follows the backend's last line.
        s.write_all(send).await.unwrap();
        s.shutdown().await.unwrap();
        let (rest, eof) = read_until(&mut s, Duration::from_secs(5), |_| false).await;
        assert!(eof, "{listener}: {rest:?}");
        let all = greeting + &rest;
        // The backend's reply to QUIT/LOGOUT is the last line (Dovecot adds timing figures).
        let last_line = all.trim_end().rsplit("\r\n").next().unwrap_or("");
        assert!(last_line.starts_with(last), "{listener}: {all:?}");
        assert!(all.ends_with("\r\n"), "{listener}: {all:?}");
        if listener == "pop3" {
            assert!(all.contains("\r\nSTLS\r\n"), "CAPA answered: {all:?}");
        }
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_starttls_sessions_and_a_failed_handshake() {
    if !peers_present() {
        return;
    }
    if !have("openssl", "version") {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "openssl missing under CI"
        );
        skip("openssl not installed");
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(d.pop3, d.imap, "").await;
    // A client that speaks no TLS on the implicit TLS port is closed; nothing reaches the
    // backend and other sessions go on.
    let mut s = TcpStream::connect(p.addr("pop3s")).await.unwrap();
    s.write_all(b"USER alice\r\n").await.unwrap();
    let (got, eof) = read_until(&mut s, Duration::from_secs(3), |_| false).await;
    assert!(eof, "{got:?}");
    assert!(!got.contains("+OK"), "{got:?}");
    let out = s_client(
        "pop3",
        p.port("pop3"),
        p.ca.clone(),
        "USER alice\nPASS secret\nSTAT\nQUIT\n",
    )
    .await;
    let stat = format!("+OK {} ", messages().len());
    assert!(out.contains(&stat), "{out}");
    assert!(out.contains("+OK Logging out"), "{out}");
    let out = s_client(
        "imap",
        p.port("imap"),
        p.ca.clone(),
        "a1 LOGIN alice secret\na2 SELECT INBOX\na3 LOGOUT\n",
    )
    .await;
    assert!(out.contains("a1 OK"), "{out}");
    assert!(out.contains("* 3 EXISTS"), "{out}");
    assert!(out.contains("a3 OK"), "{out}");
    let log = d.log();
    assert!(
        log.contains("user=<alice>, method=PLAIN, rip=127.0.0.1"),
        "{log}"
    );
    p.stop().await;
}

/// A backend that greets, takes one command and closes in the middle of its reply.
async fn fake_backend(greeting: &'static [u8], partial: &'static [u8]) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                // The PROXY header (read and ignored), then the greeting.
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(greeting).await;
                answer_probe(&mut s).await;
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(partial).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_closes_mid_reply_is_reported_with_a_reason() {
    let pop3 = fake_backend(b"+OK fake\r\n", b"+OK 2 messages\r\n1 10\r\n").await;
    let imap = fake_backend(b"* OK fake\r\n", b"* CAPABILITY IMAP4rev1\r\n").await;
    // No real peer needed: `plaintext` lets the commands through without TLS.
    let p = Proxy::start(pop3, imap, "allow_plaintext_login = true").await;
    for (listener, cmd, want) in [
        // Inside a multi-line reply the proxy adds nothing: the client sees it cut short.
        ("pop3", &b"LIST\r\n"[..], "+OK 2 messages\r\n1 10\r\n"),
        (
            "imap",
            &b"a1 CAPABILITY\r\n"[..],
            "* CAPABILITY IMAP4rev1 STARTTLS\r\n* BYE [UNAVAILABLE] backend closed the connection\r\n",
        ),
    ] {
        let mut s = TcpStream::connect(p.addr(listener)).await.unwrap();
        let (greeting, _) =
            read_until(&mut s, Duration::from_secs(3), |g| g.ends_with("\r\n")).await;
        assert!(greeting.contains("fake"), "{listener}: {greeting:?}");
        s.write_all(cmd).await.unwrap();
        let (rest, eof) = read_until(&mut s, Duration::from_secs(3), |_| false).await;
        assert!(eof, "{listener}: {rest:?}");
        assert_eq!(rest, want, "{listener}");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_the_oldest_session_not_logged_in_makes_room() {
    let pop3 = ok_backend().await;
    let p = Proxy::start(pop3, pop3, "max_connections = 2").await;
    let addr = p.addr("pop3s");
    let ca = p.ca.clone();
    // Over implicit TLS so the proxy lets the login through.
    let connect = move || {
        let ca = ca.clone();
        async move {
            let mut s = tls_connect(addr, &ca).await;
            let mut greeting = [0u8; 10];
            s.read_exact(&mut greeting).await.unwrap();
            assert_eq!(&greeting, b"+OK fake\r\n");
            s
        }
    };
    let mut a = connect().await;
    a.write_all(b"USER a\r\nPASS b\r\n").await.unwrap();
    let mut replies = [0u8; 10];
    a.read_exact(&mut replies).await.unwrap();
    assert_eq!(&replies, b"+OK\r\n+OK\r\n");
    // Logged in: A holds a session slot now, and the two pending slots are free again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut b = connect().await;
    // B stays while it is alone in the pending pool (the logged-in A does not count there).
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.write_all(b"NOOP\r\n").await.unwrap();
    let mut noop = [0u8; 5];
    b.read_exact(&mut noop).await.unwrap();
    assert_eq!(&noop, b"+OK\r\n");
    let _c = connect().await;
    // C took the last pending slot, and the acceptor made room for the next one: B goes.
    let mut rest = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), b.read_to_string(&mut rest)).await;
    assert_eq!(rest, "-ERR [SYS/TEMP] too many connections\r\n");
    // A, logged in, is never evicted.
    a.write_all(b"NOOP\r\n").await.unwrap();
    let mut noop = [0u8; 5];
    a.read_exact(&mut noop).await.unwrap();
    assert_eq!(&noop, b"+OK\r\n");
    p.stop().await;
}

/// A POP3 backend that logs anyone in and answers `RETR` with an endless multi-line reply,
/// counting the bytes it managed to send.
async fn endless_backend(sent: std::sync::Arc<std::sync::atomic::AtomicU64>) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut header = [0u8; 16];
        s.read_exact(&mut header).await.unwrap();
        let mut rest = vec![0u8; usize::from(u16::from_be_bytes([header[14], header[15]]))];
        s.read_exact(&mut rest).await.unwrap();
        s.write_all(b"+OK fake\r\n").await.unwrap();
        assert!(answer_probe(&mut s).await);
        let mut got = Vec::new();
        while !got.ends_with(b"RETR 1\r\n") {
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
            if got.ends_with(b"\r\n") && !got.ends_with(b"RETR 1\r\n") {
                s.write_all(b"+OK\r\n").await.unwrap();
            }
        }
        s.write_all(b"+OK message follows\r\n").await.unwrap();
        let line = [b"x".repeat(998), b"\r\n".to_vec()].concat();
        let chunk = line.repeat(64);
        while s.write_all(&chunk).await.is_ok() {
            sent.fetch_add(chunk.len() as u64, Relaxed);
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_holds_the_backend_back_and_the_stream_resumes() {
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let pop3 = endless_backend(sent.clone()).await;
    let p = Proxy::start(pop3, ok_backend().await, "allow_plaintext_login = true").await;
    let mut s = TcpStream::connect(p.addr("pop3")).await.unwrap();
    let (greeting, _) = read_until(&mut s, Duration::from_secs(3), |g| g.ends_with("\r\n")).await;
    assert!(greeting.starts_with("+OK"), "{greeting:?}");
    s.write_all(b"USER a\r\n").await.unwrap();
    read_until(&mut s, Duration::from_secs(3), |g| g.ends_with("\r\n")).await;
    s.write_all(b"PASS b\r\n").await.unwrap();
    read_until(&mut s, Duration::from_secs(3), |g| g.ends_with("\r\n")).await;
    s.write_all(b"RETR 1\r\n").await.unwrap();
    // The client reads nothing: the backend is soon stopped by the proxy's bounded queue and
    // the kernel's socket buffers (a few MB each on loopback), far short of an endless reply.
    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = sent.load(Relaxed);
        if now == last && now > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the backend was never held back");
        last = now;
    }
    assert!(last < 64 << 20, "the proxy let {last} bytes pile up");
    // Reading again lets the backend go on.
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    while read < last + (8 << 20) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        read += n as u64;
    }
    assert!(sent.load(Relaxed) > last, "the backend did not resume");
    drop(s);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_that_hides_the_account_is_refused_unless_the_operator_passes_it_through() {
    let greeting: &[u8] = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=SCRAM-SHA-256] fake\r\n";
    for (extra, advertised, answer) in [
        ("", false, "a1 NO"),
        (
            "pass_through_opaque_sasl = true",
            true,
            "+ backend challenge",
        ),
    ] {
        let imap = fake_backend(greeting, b"+ backend challenge\r\n").await;
        let p = Proxy::start(
            ok_backend().await,
            imap,
            &format!("allow_plaintext_login = true\n{extra}"),
        )
        .await;
        let mut s = TcpStream::connect(p.addr("imap")).await.unwrap();
        let (g, _) = read_until(&mut s, Duration::from_secs(3), |g| g.ends_with("\r\n")).await;
        assert!(g.contains("AUTH=PLAIN"), "{extra}: {g:?}");
        assert_eq!(
            g.contains("AUTH=SCRAM-SHA-256"),
            advertised,
            "{extra}: {g:?}"
        );
        s.write_all(b"a1 AUTHENTICATE SCRAM-SHA-256\r\n")
            .await
            .unwrap();
        let (reply, _) = read_until(&mut s, Duration::from_secs(3), |r| r.ends_with("\r\n")).await;
        assert!(reply.starts_with(answer), "{extra}: {reply:?}");
        drop(s);
        p.stop().await;
    }
}
