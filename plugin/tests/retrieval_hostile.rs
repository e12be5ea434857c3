//! Hostile input and backend faults through the real retrieval proxy (issue 11, "Bad input" and
//! "Reliability"), black-box against the private Dovecot of `support/retrieval.rs`: each case
//! runs while a well-behaved poplib or imaplib session retrieves alice's mail through the same
//! proxy, and checks that this session still works and that its record is in the meter store.
//! Without dovecot the tests print `SKIPPED ...`; under `CI=true` they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::future::Future;
use std::time::{Duration, Instant};

use mailbell::meter::{Entry, Login, MeterQuery, Session, MAX_QUERY_LIMIT};
use support::retrieval::*;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The client mode a listener's well-behaved session uses.
fn mode(listener: &str) -> &'static str {
    match listener {
        "pop3" => "stls",
        "imap" => "starttls",
        _ => "ssl",
    }
}

/// Runs `hostile` while alice retrieves her mail through `listener` of `p` (poplib or
/// imaplib); asserts that her session got every message and that its record is in the meter
/// store. Returns what `hostile` returned.
async fn alongside<F: Future>(p: &Proxy, listener: &str, hostile: F) -> F::Output {
    let (good, out) = tokio::join!(
        retrieve_alices_mail_unlogged(p, listener, mode(listener)),
        hostile
    );
    let port = good.unwrap_or_else(|out| panic!("the well-behaved session failed: {out}"));
    let s = record(p, port).await;
    assert_eq!(s.login, Login::Ok, "{s:?}");
    assert_eq!(s.messages, 3, "{s:?}");
    assert_eq!(s.account.as_deref(), Some("alice"), "{s:?}");
    out
}

/// The session record of the client on `port`, once it is in the store (at most 5 s).
async fn record(p: &Proxy, port: u16) -> Session {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let store = p.meter().clone();
        let found = tokio::task::spawn_blocking(move || {
            store.flush().unwrap();
            let q = MeterQuery {
                limit: MAX_QUERY_LIMIT,
                ..MeterQuery::default()
            };
            store
                .query(&q)
                .unwrap()
                .records
                .into_iter()
                .find_map(|r| match r.entry {
                    Entry::Session(s) if s.client.port() == port => Some(s),
                    _ => None,
                })
        })
        .await
        .unwrap();
        if let Some(s) = found {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no meter record for the client on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads everything until the proxy closes (at most `limit`); panics if it does not close.
async fn until_closed<S: AsyncRead + Unpin>(s: &mut S, limit: Duration, what: &str) -> String {
    let (got, eof) = read_until(s, limit, |_| false).await;
    assert!(eof, "{what}: the proxy did not close; it sent {got:?}");
    got
}

/// Reads one line (the greeting, a reply).
async fn line<S: AsyncRead + Unpin>(s: &mut S) -> String {
    read_until(s, Duration::from_secs(5), |g| g.ends_with("\r\n"))
        .await
        .0
}

async fn plain(p: &Proxy, listener: &str) -> (TcpStream, u16) {
    let s = TcpStream::connect(p.addr(listener)).await.unwrap();
    let port = s.local_addr().unwrap().port();
    (s, port)
}

/// Sends `input`, expects `reply` and the end of the connection; returns the session's record.
async fn answered_and_closed<S: AsyncRead + AsyncWrite + Unpin>(
    p: &Proxy,
    s: &mut S,
    port: u16,
    input: &[u8],
    reply: &str,
) -> Session {
    s.write_all(input).await.unwrap();
    let got = until_closed(s, Duration::from_secs(5), reply).await;
    assert!(got.ends_with(reply), "want {reply:?}, got {got:?}");
    record(p, port).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_over_8k_before_login_is_answered_and_closed() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(d.pop3, d.imap, "").await;
    let long = vec![b'A'; 8 * 1024 + 1];
    alongside(&p, "pop3s", async {
        for (listener, reply, cause) in [
            (
                "pop3",
                "-ERR Line too long\r\n",
                "client line longer than 8192",
            ),
            ("imap", "* BYE Line too long\r\n", "longer than 8192"),
        ] {
            let (mut s, port) = plain(&p, listener).await;
            let greeting = line(&mut s).await;
            let rec = answered_and_closed(&p, &mut s, port, &long, reply).await;
            eprintln!(
                "{listener}: {greeting:?} then {reply:?}; record end {:?}",
                rec.end
            );
            assert!(rec.end.contains(cause), "{listener}: {rec:?}");
            assert_eq!(rec.login, Login::None, "{listener}");
        }
    })
    .await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2gb_literal_before_login_is_refused_before_any_byte_is_read() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(d.pop3, d.imap, "").await;
    alongside(&p, "imaps", async {
        for listener in ["imap", "imaps"] {
            for announce in ["{2147483648}", "{2147483648+}"] {
                let cmd = format!("a1 LOGIN {announce}\r\n");
                let (rec, port) = if listener == "imap" {
                    let (mut s, port) = plain(&p, listener).await;
                    line(&mut s).await;
                    let reply = "* BYE Literal too large\r\n";
                    (
                        answered_and_closed(&p, &mut s, port, cmd.as_bytes(), reply).await,
                        port,
                    )
                } else {
                    let mut s = tls_connect(p.addr(listener), &p.ca).await;
                    let port = s.get_ref().0.local_addr().unwrap().port();
                    line(&mut s).await;
                    let reply = "* BYE Literal too large\r\n";
                    (
                        answered_and_closed(&p, &mut s, port, cmd.as_bytes(), reply).await,
                        port,
                    )
                };
                eprintln!("{listener} {announce}: record end {:?}", rec.end);
                assert!(rec.end.contains("2147483648"), "{rec:?}");
                // Not a byte of the literal was read, let alone forwarded.
                assert_eq!(rec.bytes_to_backend, 0, "{listener} {announce} {port}");
            }
        }
    })
    .await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pipelined_before_the_greeting_are_answered_in_order() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(d.pop3, d.imap, "").await;
    alongside(&p, "imaps", async {
        // Written before the greeting came (the proxy greets once the backend did).
        let mut s = tls_connect(p.addr("pop3s"), &p.ca).await;
        let port = s.get_ref().0.local_addr().unwrap().port();
        s.write_all(b"CAPA\r\nUSER alice\r\nPASS secret\r\nSTAT\r\nRETR 1\r\nQUIT\r\n")
            .await
            .unwrap();
        let got = until_closed(&mut s, Duration::from_secs(5), "pop3s").await;
        let statuses: Vec<&str> = got
            .lines()
            .filter(|l| l.starts_with("+OK") || l.starts_with("-ERR"))
            .collect();
        assert_eq!(statuses.len(), 7, "greeting + 6 replies: {got:?}");
        assert!(statuses.iter().all(|l| l.starts_with("+OK")), "{got:?}");
        assert!(statuses[4].starts_with("+OK 3 "), "STAT: {got:?}");
        assert!(got.contains("Subject: test 1\r\n"), "{got:?}");
        let rec = record(&p, port).await;
        assert_eq!((rec.login, rec.messages), (Login::Ok, 1), "{rec:?}");

        let mut s = tls_connect(p.addr("imaps"), &p.ca).await;
        let port = s.get_ref().0.local_addr().unwrap().port();
        s.write_all(
            b"a1 LOGIN alice secret\r\na2 SELECT INBOX\r\na3 FETCH 2 BODY.PEEK[]\r\na4 LOGOUT\r\n",
        )
        .await
        .unwrap();
        let got = until_closed(&mut s, Duration::from_secs(5), "imaps").await;
        for tag in ["a1 OK", "a2 OK", "a3 OK", "a4 OK"] {
            assert!(got.contains(tag), "{tag}: {got:?}");
        }
        assert!(got.contains("Subject: test 2\r\n"), "{got:?}");
        let rec = record(&p, port).await;
        assert_eq!((rec.login, rec.messages), (Login::Ok, 1), "{rec:?}");
    })
    .await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cut_off_inside_a_login_literal_leaves_a_record_and_no_login() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(d.pop3, d.imap, "").await;
    alongside(&p, "pop3s", async {
        for announce in ["{5}", "{5+}"] {
            let mut s = tls_connect(p.addr("imaps"), &p.ca).await;
            let port = s.get_ref().0.local_addr().unwrap().port();
            line(&mut s).await;
            s.write_all(format!("a1 LOGIN {announce}\r\n").as_bytes())
                .await
                .unwrap();
            if announce == "{5}" {
                let go = line(&mut s).await;
                assert!(go.starts_with('+'), "{go:?}");
            }
            // Half of "alice", then the connection is gone (no TLS close_notify either).
            s.write_all(b"al").await.unwrap();
            s.flush().await.unwrap();
            drop(s);
            let rec = record(&p, port).await;
            eprintln!("imaps LOGIN {announce} cut: record end {:?}", rec.end);
            assert_eq!(rec.login, Login::None, "{rec:?}");
            assert!(rec.end.contains("closed"), "{rec:?}");
        }
    })
    .await;
    // The backend never saw a login of the cut-off sessions.
    assert!(!d.log().contains("auth failed"), "{}", d.log());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_a_client_hello_ends_the_connection_at_once() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(d.pop3, d.imap, "").await;
    alongside(&p, "imaps", async {
        for listener in ["pop3s", "imaps"] {
            let started = Instant::now();
            let (mut s, _) = plain(&p, listener).await;
            s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let got = until_closed(&mut s, Duration::from_secs(5), listener).await;
            eprintln!("{listener}: garbage answered with {:?}", got.as_bytes());
            // A TLS alert record (content type 21) or nothing, then the close.
            assert!(got.is_empty() || got.as_bytes()[0] == 21, "{got:?}");
            assert!(started.elapsed() < Duration::from_secs(2), "{listener}");
        }
    })
    .await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_sends_is_closed_at_the_prelogin_timeout() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(d.pop3, d.imap, "prelogin_timeout = \"1s\"").await;
    alongside(&p, "pop3s", async {
        for (listener, bye) in [
            ("pop3", "-ERR [SYS/TEMP] no activity for 1s, closing\r\n"),
            (
                "imap",
                "* BYE [UNAVAILABLE] no activity for 1s, closing\r\n",
            ),
        ] {
            let started = Instant::now();
            let (mut s, port) = plain(&p, listener).await;
            let got = until_closed(&mut s, Duration::from_secs(5), listener).await;
            assert!(got.ends_with(bye), "{listener}: {got:?}");
            assert!(started.elapsed() < Duration::from_secs(3), "{listener}");
            let rec = record(&p, port).await;
            assert!(rec.end.contains("no activity"), "{rec:?}");
        }
        // A TLS listener: a client that connects and never starts the handshake.
        let (mut s, _) = plain(&p, "imaps").await;
        until_closed(&mut s, Duration::from_secs(5), "imaps").await;
    })
    .await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_is_down_is_reported_at_once_beside_a_working_one() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(free_port(), d.imap, "").await;
    alongside(&p, "imaps", async {
        let started = Instant::now();
        let (mut s, port) = plain(&p, "pop3").await;
        let got = until_closed(&mut s, Duration::from_secs(5), "pop3").await;
        eprintln!("pop3 with its backend down: {got:?}");
        assert!(
            got.starts_with("-ERR [SYS/TEMP] backend unavailable: "),
            "{got:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        let rec = record(&p, port).await;
        assert!(rec.end.starts_with("backend unavailable"), "{rec:?}");
    })
    .await;
    p.stop().await;
}

/// What a client sees of a backend listener that reads the PROXY header as commands
/// (Dovecot without `haproxy = yes`): one line naming the cause, then the close.
const NOT_ACCEPTED: &str = "backend did not accept the PROXY header \
                            (check haproxy_trusted_networks / proxy.trusted-networks)\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_does_not_read_proxy_headers_is_named_as_the_cause() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    // POP3 to a listener without `haproxy = yes`, IMAP as it should be; then the other way.
    let p = Proxy::start(d.pop3_no_haproxy, d.imap, "").await;
    alongside(&p, "imaps", async {
        // poplib takes the line for the greeting and fails there.
        let err = python_outcome(
            POP3_SCRIPT,
            args(p.port("pop3s"), "ssl", "alice", "secret", &p.ca),
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("error_proto: b'-ERR [SYS/TEMP] backend did not accept the PROXY header"),
            "{err}"
        );
        // Commands sent at once get no answer meant for the header.
        let mut s = tls_connect(p.addr("pop3s"), &p.ca).await;
        let port = s.get_ref().0.local_addr().unwrap().port();
        let rec = answered_and_closed(
            &p,
            &mut s,
            port,
            b"CAPA\r\nUSER alice\r\n",
            &format!("-ERR [SYS/TEMP] {NOT_ACCEPTED}"),
        )
        .await;
        assert!(rec.end.starts_with("backend did not accept"), "{rec:?}");
        assert_eq!(rec.bytes_to_backend, 0, "{rec:?}");
    })
    .await;
    p.stop().await;
    let p = Proxy::start(d.pop3, d.imap_no_haproxy, "").await;
    alongside(&p, "pop3s", async {
        let mut s = tls_connect(p.addr("imaps"), &p.ca).await;
        let port = s.get_ref().0.local_addr().unwrap().port();
        let err = python_outcome(
            IMAP_SCRIPT,
            args(p.port("imaps"), "ssl", "alice", "secret", &p.ca),
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("error: b'* BYE [UNAVAILABLE] backend did not accept the PROXY header"),
            "{err}"
        );
        let rec = answered_and_closed(
            &p,
            &mut s,
            port,
            b"a1 CAPABILITY\r\na2 LOGIN alice secret\r\n",
            &format!("* BYE [UNAVAILABLE] {NOT_ACCEPTED}"),
        )
        .await;
        assert!(rec.end.starts_with("backend did not accept"), "{rec:?}");
    })
    .await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_proxy_protocol_a_backend_waiting_for_the_header_is_named_as_the_cause() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    // IMAP to a listener without `haproxy = yes` (the well-behaved session), POP3 to one that
    // waits for a header that never comes.
    let p = Proxy::start(
        d.pop3,
        d.imap_no_haproxy,
        "proxy_protocol = false\nconnect_timeout = \"1s\"",
    )
    .await;
    alongside(&p, "imaps", async {
        let started = Instant::now();
        let mut s = tls_connect(p.addr("pop3s"), &p.ca).await;
        let port = s.get_ref().0.local_addr().unwrap().port();
        let got = until_closed(&mut s, Duration::from_secs(8), "pop3s").await;
        let took = started.elapsed();
        eprintln!("pop3s to a haproxy listener without a header: {got:?} after {took:?}");
        assert_eq!(
            got,
            "-ERR [SYS/TEMP] backend sent no greeting within 1s \
             (proxy_protocol = false: does the backend expect a PROXY header?)\r\n"
        );
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "{took:?}"
        );
        let rec = record(&p, port).await;
        assert!(rec.end.starts_with("backend sent no greeting"), "{rec:?}");
    })
    .await;
    p.stop().await;
}

/// A POP3 backend serving alice's first message, slowly: each connection takes the next
/// (greeting delay, pause in the middle of the RETR reply) from `plans`.
async fn slow_backend(plans: Vec<(Duration, Duration)>) -> u16 {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let body: String = messages()[0]
        .lines()
        .map(|l| format!("{}{l}\r\n", if l.starts_with('.') { "." } else { "" }))
        .collect();
    tokio::spawn(async move {
        for (greet_after, retr_pause) in plans {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                assert!(skip_proxy_header(&mut s).await);
                tokio::time::sleep(greet_after).await;
                s.write_all(b"+OK slow\r\n").await.unwrap();
                if !answer_probe(&mut s).await {
                    return;
                }
                let mut lines = BufReader::new(s);
                let mut line = String::new();
                while lines.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                    let s = lines.get_mut();
                    let verb = line.split_whitespace().next().unwrap_or("").to_uppercase();
                    let r = match verb.as_str() {
                        "STAT" => {
                            s.write_all(format!("+OK 1 {}\r\n", body.len()).as_bytes())
                                .await
                        }
                        "RETR" => {
                            let (a, b) = body.split_at(body.len() / 2);
                            s.write_all(format!("+OK\r\n{a}").as_bytes()).await.unwrap();
                            tokio::time::sleep(retr_pause).await;
                            s.write_all(format!("{b}.\r\n").as_bytes()).await
                        }
                        "QUIT" => {
                            let _ = s.write_all(b"+OK bye\r\n").await;
                            return;
                        }
                        _ => s.write_all(b"+OK\r\n").await,
                    };
                    if r.is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_is_waited_for_up_to_the_configured_timeouts() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let secs = Duration::from_secs;
    let backend = slow_backend(vec![
        // Slow, within the timeouts: the client waits.
        (Duration::from_millis(1500), Duration::from_millis(1500)),
        // A greeting later than connect_timeout.
        (secs(4), Duration::ZERO),
        // A RETR reply that stalls longer than the idle timeout.
        (Duration::ZERO, secs(4)),
    ])
    .await;
    let p = Proxy::start(
        backend,
        d.imap,
        "connect_timeout = \"2s\"\nprelogin_timeout = \"2s\"\npop3_idle_timeout = \"2s\"",
    )
    .await;
    alongside(&p, "imaps", async {
        let pop3 = |ca: &std::path::Path| args(p.port("pop3s"), "ssl", "alice", "secret", ca);
        let started = Instant::now();
        let out = python(POP3_SCRIPT, pop3(&p.ca)).await;
        assert!(out.ends_with("ok\n"), "{out}");
        assert_eq!(field(&out, "msg"), [hex(&messages()[0])]);
        assert!(started.elapsed() >= secs(3), "{:?}", started.elapsed());

        let started = Instant::now();
        let err = python_outcome(POP3_SCRIPT, pop3(&p.ca)).await.unwrap_err();
        eprintln!("greeting after 4 s, connect_timeout 2 s: {err}");
        assert!(
            err.contains("-ERR [SYS/TEMP] backend sent no greeting within 2s"),
            "{err}"
        );
        assert!(started.elapsed() < secs(3), "{:?}", started.elapsed());

        let started = Instant::now();
        let outcome = python_outcome(POP3_SCRIPT, pop3(&p.ca)).await;
        eprintln!(
            "RETR stalled 4 s, pop3_idle_timeout 2 s, after {:?}: {outcome:?}",
            started.elapsed()
        );
        let err = outcome.unwrap_err();
        let port: u16 = field(err.split("stdout: ").nth(1).unwrap(), "port")[0]
            .parse()
            .unwrap();
        let rec = record(&p, port).await;
        eprintln!("its record: {rec:?}");
        assert!(rec.end.contains("no activity for 2s"), "{rec:?}");
        assert_eq!(rec.retrieved.len(), 1, "{rec:?}");
        assert!(!rec.retrieved[0].complete, "{rec:?}");
    })
    .await;
    p.stop().await;
}

/// Logs in on `listener` (implicit TLS) as `user`; IMAP selects INBOX. Returns the stream and
/// the client's port.
async fn logged_in(
    p: &Proxy,
    listener: &str,
    user: &str,
    password: &str,
) -> (tokio_rustls::client::TlsStream<TcpStream>, u16) {
    let mut s = tls_connect(p.addr(listener), &p.ca).await;
    let port = s.get_ref().0.local_addr().unwrap().port();
    line(&mut s).await;
    let (cmds, done) = if listener == "imaps" {
        (
            format!("a1 LOGIN {user} {password}\r\na2 SELECT INBOX\r\n"),
            "a2 OK",
        )
    } else {
        (format!("USER {user}\r\nPASS {password}\r\n"), "Logged in")
    };
    s.write_all(cmds.as_bytes()).await.unwrap();
    let (got, _) = read_until(&mut s, Duration::from_secs(5), |g| g.contains(done)).await;
    assert!(got.contains(done), "{listener} {user}: {got:?}");
    (s, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_restart_ends_live_sessions_with_a_reason_and_new_ones_succeed() {
    if !peers_present() {
        return;
    }
    let mut d = Dovecot::start();
    // bob's one message is big enough to be in the middle of its RETR when Dovecot dies.
    let maildir = d.dir().join("home/bob/Maildir");
    let big = maildir.join("cur/1700000100.M9P1.test:2,");
    let body = "x".repeat(76) + "\n";
    std::fs::write(&big, format!("Subject: big\n\n{}", body.repeat(640 * 1024))).unwrap();
    use std::os::unix::fs::MetadataExt as _;
    let owner = std::fs::metadata(&maildir).unwrap();
    std::os::unix::fs::chown(&big, Some(owner.uid()), Some(owner.gid())).unwrap();
    let p = Proxy::start(d.pop3, d.imap, "").await;
    // A crash of every Dovecot process, then an orderly stop (Dovecot says goodbye itself).
    for signal in ["KILL", "TERM"] {
        backend_stops(&p, &mut d, signal).await;
        d.restart();
        alongside(&p, "imaps", retrieve_alices_mail(&p, &d, "pop3s", "ssl")).await;
    }
    p.stop().await;
}

/// Five sessions logged in through `p`, one of them in the middle of a 48 MB RETR, when `d`
/// stops with `signal`: each ends with a reason, and its record is stored with it.
async fn backend_stops(p: &Proxy, d: &mut Dovecot, signal: &str) {
    let mut live = Vec::new();
    for listener in ["pop3s", "pop3s", "imaps", "imaps"] {
        live.push((listener, logged_in(p, listener, "alice", "secret").await));
    }
    let (mut retr, retr_port) = logged_in(p, "pop3s", "bob", "hunter2").await;
    retr.write_all(b"RETR 1\r\n").await.unwrap();
    let (head, _) = read_until(&mut retr, Duration::from_secs(5), |g| g.len() > 64 * 1024).await;
    assert!(head.starts_with("+OK"), "{:?}", &head[..80.min(head.len())]);
    // The client stops reading: Dovecot is held in the middle of the reply.

    d.stop(signal);
    for (listener, (mut s, port)) in live {
        let got = until_closed(&mut s, Duration::from_secs(5), listener).await;
        eprintln!("{listener} when Dovecot stopped ({signal}): {got:?}");
        let want = if listener == "imaps" {
            "* BYE [UNAVAILABLE] backend closed the connection\r\n"
        } else {
            "-ERR [SYS/TEMP] backend closed the connection\r\n"
        };
        assert!(got.ends_with(want), "{listener}: {got:?}");
        let rec = record(p, port).await;
        assert_eq!(rec.login, Login::Ok, "{rec:?}");
        assert_eq!(rec.end, "backend closed the connection", "{rec:?}");
    }
    let rest = until_closed(&mut retr, Duration::from_secs(10), "RETR").await;
    let size = head.len() + rest.len();
    eprintln!(
        "RETR of 48 MB when Dovecot stopped ({signal}): the client got {size} bytes, ending {:?}",
        &rest[rest.len().saturating_sub(60)..]
    );
    let rec = record(p, retr_port).await;
    eprintln!(
        "its record: end {:?}, retrieved {:?}",
        rec.end, rec.retrieved
    );
    assert_eq!(rec.retrieved.len(), 1, "{rec:?}");
    // Cut in the middle (TERM too: Dovecot does not finish a reply the client is not
    // reading): metered as far as it came, no words inside the message.
    assert!(!rec.retrieved[0].complete, "{rec:?}");
    assert!(!rest.ends_with("\r\n.\r\n") && !rest.contains("[SYS/TEMP]"));
    assert_eq!(
        rec.end, "backend closed the connection in the middle of a reply",
        "{rec:?}"
    );
}
