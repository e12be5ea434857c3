//! Black-box tests of the retrieval proxy's meter store against the private Dovecot of
//! `retrieval_dovecot.rs` (peers in `support/retrieval.rs`) and real clients (poplib, imaplib):
//! the records agree with Dovecot's own counters, `mailbell meter list` and the admin API show
//! them, per-session sync makes a record durable before the client has its QUIT/LOGOUT reply,
//! a store that cannot write refuses logins, and a `mailbell serve` killed with SIGKILL under
//! 50 retrieving sessions reopens with every completed session and no duplicate id. Without
//! dovecot the tests print `SKIPPED ...`; under `CI=true` they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mailbell::meter::{
    Entry, Login, MeterPage, MeterQuery, MeterRecord, MeterStore, Protocol, Session, CSV_HEADER,
    MAX_QUERY_LIMIT,
};
use support::retrieval::*;

/// The admin API's bearer token of the proxies that serve it here.
const ADMIN_TOKEN: &str = "meter-test-token-0123456789";

fn all() -> MeterQuery {
    MeterQuery {
        limit: MAX_QUERY_LIMIT,
        ..MeterQuery::default()
    }
}

/// Everything in the proxy's store once what was appended so far is durable.
async fn stored(p: &Proxy) -> Vec<MeterRecord> {
    let store = p.meter().clone();
    tokio::task::spawn_blocking(move || {
        store.flush().unwrap();
        store.query(&all()).unwrap().records
    })
    .await
    .unwrap()
}

fn sessions(records: &[MeterRecord]) -> Vec<&Session> {
    records
        .iter()
        .filter_map(|r| match &r.entry {
            Entry::Session(s) => Some(s),
            Entry::Messages(_) => None,
        })
        .collect()
}

fn assert_ids_increase(records: &[MeterRecord]) {
    for w in records.windows(2) {
        assert!(w[0].id < w[1].id, "ids {} then {}", w[0].id, w[1].id);
    }
}

/// Runs `mailbell --config <config> <args>`; returns stdout, panics with stderr on failure.
async fn mailbell(config: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailbell"));
    cmd.arg("--config").arg(config).args(args);
    tokio::task::spawn_blocking(move || {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "mailbell failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_agree_with_dovecot_and_meter_list_shows_them() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start_with(d.pop3, d.imap, Some(ADMIN_TOKEN), "").await;
    let pop = python(
        POP3_SCRIPT,
        args(p.port("pop3s"), "ssl", "alice", "secret", &p.ca),
    )
    .await;
    let imap = python(
        IMAP_SCRIPT,
        args(p.port("imap"), "starttls", "alice", "secret", &p.ca),
    )
    .await;
    let bad = python(
        POP3_SCRIPT,
        args(p.port("pop3"), "stls", "bob", "wrong", &p.ca),
    )
    .await;
    assert!(
        pop.ends_with("ok\n") && imap.ends_with("ok\n"),
        "{pop}{imap}"
    );
    assert!(bad.contains("refused:"), "{bad}");
    p.stats_after(3).await;
    let records = stored(&p).await;
    assert_ids_increase(&records);
    let s = sessions(&records);
    assert_eq!(s.len(), 3, "{records:?}");
    let by = |l: &str| *s.iter().find(|s| s.listener == l).unwrap();
    let (pop_s, imap_s, bad_s) = (by("pop3s"), by("imap"), by("pop3"));

    // Who, from where, how.
    for (rec, out, proto) in [
        (pop_s, &pop, Protocol::Pop3),
        (imap_s, &imap, Protocol::Imap),
    ] {
        assert_eq!(rec.account.as_deref(), Some("alice"));
        assert_eq!(rec.protocol, proto);
        assert!(rec.tls);
        assert_eq!(rec.login, Login::Ok);
        let port = field(out, "port")[0];
        assert_eq!(rec.client.to_string(), format!("{CLIENT_IP}:{port}"));
        assert!(rec.start_ms <= rec.end_ms);
        assert_eq!(rec.messages, 3);
        assert_eq!(
            rec.retrieved.iter().map(|m| m.bytes).sum::<u64>(),
            rec.message_bytes
        );
        let numbers: Vec<u32> = rec.retrieved.iter().map(|m| m.msg).collect();
        assert_eq!(numbers, [1, 2, 3]);
        assert!(rec.retrieved.iter().all(|m| m.complete));
        assert!(rec.bytes_to_client > rec.message_bytes);
    }
    // imaplib's FETCH asks no UID, and Dovecot sends none.
    assert!(
        imap_s.retrieved.iter().all(
            |m| m.mailbox.as_deref() == Some("INBOX") && m.section.as_deref() == Some("BODY[]")
        ),
        "{imap_s:?}"
    );
    assert_eq!(bad_s.account.as_deref(), Some("bob"));
    assert_eq!(bad_s.login, Login::Refused);
    assert_eq!(bad_s.messages, 0);

    // The bytes are Dovecot's own: retr=N/bytes for POP3, body_bytes for IMAP.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut log = d.log();
    while log.matches("Logged out").count() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        log = d.log();
    }
    assert_eq!(
        dovecot_counter(&log, "retr"),
        (pop_s.messages, pop_s.message_bytes),
        "{log}"
    );
    assert_eq!(
        dovecot_counter(&log, "body_bytes").1,
        imap_s.message_bytes,
        "{log}"
    );

    // mailbell meter list, through the running daemon's admin API.
    let alice: Vec<&MeterRecord> = records
        .iter()
        .filter(|r| r.entry.account() == Some("alice"))
        .collect();
    let json = mailbell(
        &p.config,
        &[
            "meter", "list", "--user", "Alice", "--since", "1h", "--json",
        ],
    )
    .await;
    let listed: Vec<MeterRecord> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.iter().collect::<Vec<_>>(), alice);
    let csv = mailbell(&p.config, &["meter", "list", "--user", "alice", "--csv"]).await;
    let mut rows = csv.lines();
    assert_eq!(rows.next(), Some(CSV_HEADER.join(",").as_str()));
    let kinds: Vec<&str> = rows.map(|r| r.split(',').nth(2).unwrap()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "session").count(),
        2,
        "{csv}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "message").count(),
        6,
        "{csv}"
    );
    let text = mailbell(&p.config, &["meter", "list", "--user", "alice"]).await;
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.lines()
            .all(|l| l.contains("account=alice") && l.contains("messages=3/")),
        "{text}"
    );

    // The admin API: bearer token, JSON pages by id, CSV.
    let get = |path: String, auth: Option<String>| {
        let addr = p.admin_addr();
        async move {
            mailbell_link::http::request(
                addr,
                "GET",
                &path,
                auth.as_deref(),
                None,
                Duration::from_secs(10),
            )
            .await
            .unwrap()
        }
    };
    let auth = Some(format!("Bearer {ADMIN_TOKEN}"));
    assert_eq!(get("/admin/v1/meter".into(), None).await.status, 401);
    let r = get("/admin/v1/meter?user=alice&limit=1".into(), auth.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let page: MeterPage = serde_json::from_str(&r.body).unwrap();
    assert_eq!(page.records, [alice[0].clone()]);
    assert_eq!(page.next_after, Some(alice[0].id));
    let r = get(
        format!("/admin/v1/meter?user=alice&after={}", alice[0].id),
        auth.clone(),
    )
    .await;
    let page: MeterPage = serde_json::from_str(&r.body).unwrap();
    assert_eq!(page.records, [alice[1].clone()]);
    assert_eq!(page.next_after, None);
    let r = get("/admin/v1/meter?format=csv&since=1h".into(), auth.clone()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.lines().count(), 1 + 3 + 6, "{}", r.body);
    let r = get("/admin/v1/meter?since=yesterday".into(), auth).await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("since"), "{}", r.body);

    // With the daemon stopped the command reads the files itself: the same records.
    let config = p.config.clone();
    let dir = p.stop().await;
    let local = mailbell(
        &config,
        &[
            "meter", "list", "--user", "Alice", "--since", "1h", "--json",
        ],
    )
    .await;
    assert_eq!(local, json);
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_per_session_sync_the_record_is_durable_before_the_client_has_the_quit_reply() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    // A flush interval of a minute: only the per-session commit can put the records on disk.
    for (sync, want) in [("per-session", 2), ("interval", 0)] {
        let p = Proxy::start(
            d.pop3,
            d.imap,
            &format!("[meter]\nsync = \"{sync}\"\nflush_interval = \"60s\""),
        )
        .await;
        let pop = python(
            POP3_SCRIPT,
            args(p.port("pop3s"), "ssl", "alice", "secret", &p.ca),
        )
        .await;
        let imap = python(
            IMAP_SCRIPT,
            args(p.port("imaps"), "ssl", "alice", "secret", &p.ca),
        )
        .await;
        assert!(
            pop.ends_with("ok\n") && imap.ends_with("ok\n"),
            "{pop}{imap}"
        );
        // The clients have had their QUIT and LOGOUT replies: a reader of the files now.
        let on_disk = MeterStore::open_read_only(&p.meter_dir())
            .query(&all())
            .unwrap();
        assert_eq!(on_disk.records.len(), want, "sync = {sync}: {on_disk:?}");
        if want > 0 {
            let s = sessions(&on_disk.records);
            let ends: HashSet<&str> = s.iter().map(|s| s.end.as_str()).collect();
            assert_eq!(ends, HashSet::from(["quit", "logout"]));
            assert!(s.iter().all(|s| s.messages == 3 && s.login == Login::Ok));
        }
        p.stop().await;
    }
}

/// Reads from `s` until the text read ends with CRLF; returns it.
async fn line(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut b = [0u8; 512];
    while !got.ends_with(b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&b[..n]);
    }
    String::from_utf8(got).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quit_reply_waits_for_the_record_while_the_session_is_still_open() {
    use tokio::io::AsyncWriteExt;
    // A backend that answers every line +OK and never closes first, and a client that holds
    // its connection after the QUIT reply: the session has not ended, so only the QUIT hook
    // can have written the record. With a minute's flush interval only a per-session commit
    // puts it on disk.
    let backend = ok_backend().await;
    for (sync, want) in [("per-session", 1), ("interval", 0)] {
        let p = Proxy::start(
            backend,
            backend,
            &format!(
                "allow_plaintext_login = true\n[meter]\nsync = \"{sync}\"\nflush_interval = \"60s\""
            ),
        )
        .await;
        let mut s = tokio::net::TcpStream::connect(p.addr("pop3"))
            .await
            .unwrap();
        assert!(line(&mut s).await.starts_with("+OK"));
        for cmd in ["USER carol\r\n", "PASS x\r\n", "QUIT\r\n"] {
            s.write_all(cmd.as_bytes()).await.unwrap();
            assert_eq!(line(&mut s).await, "+OK\r\n", "{cmd}");
        }
        let on_disk = MeterStore::open_read_only(&p.meter_dir())
            .query(&all())
            .unwrap();
        assert_eq!(on_disk.records.len(), want, "sync = {sync}: {on_disk:?}");
        if want > 0 {
            let rec = sessions(&on_disk.records)[0].clone();
            assert_eq!(rec.account.as_deref(), Some("carol"));
            assert_eq!((rec.login, rec.end.as_str()), (Login::Ok, "quit"));
            // Everything the client has had so far, the QUIT reply included.
            assert_eq!(
                rec.bytes_to_client,
                "+OK fake\r\n+OK\r\n+OK\r\n+OK\r\n".len() as u64
            );
            assert_eq!(
                rec.bytes_to_backend,
                "USER carol\r\nPASS x\r\nQUIT\r\n".len() as u64
            );
        }
        drop(s);
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_write_refuses_logins_and_keeps_the_records() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(d.pop3, d.imap, "").await;
    p.meter()
        .inject_failure(Some(std::io::ErrorKind::StorageFull));
    let store = p.meter().clone();
    let e = tokio::task::spawn_blocking(move || store.flush())
        .await
        .unwrap();
    assert!(e.is_err());
    let pop = python(
        POP3_SCRIPT,
        args(p.port("pop3s"), "ssl", "alice", "secret", &p.ca),
    )
    .await;
    assert!(
        pop.contains("refused:") && pop.contains("-ERR [SYS/TEMP] metering unavailable: "),
        "{pop}"
    );
    let imap = python(
        IMAP_SCRIPT,
        args(p.port("imaps"), "ssl", "alice", "secret", &p.ca),
    )
    .await;
    assert!(
        imap.contains("refused:") && imap.contains("[UNAVAILABLE] metering unavailable: "),
        "{imap}"
    );
    assert!(
        !d.log().contains("user=<alice>"),
        "the backend was never asked:\n{}",
        d.log()
    );
    // The disk takes writes again: the refused sessions' records land, logins work.
    p.meter().inject_failure(None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.meter().health().is_err() {
        assert!(Instant::now() < deadline, "{:?}", p.meter().health());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pop = python(
        POP3_SCRIPT,
        args(p.port("pop3s"), "ssl", "alice", "secret", &p.ca),
    )
    .await;
    assert!(pop.ends_with("ok\n"), "{pop}");
    p.stats_after(3).await;
    let records = stored(&p).await;
    let s = sessions(&records);
    assert_eq!(s.len(), 3, "{records:?}");
    assert!(s[..2].iter().all(|s| s.login == Login::Refused
        && s.end.starts_with("metering unavailable: ")
        && s.account.as_deref() == Some("alice")));
    assert_eq!(s[2].login, Login::Ok);
    p.stop().await;
}

/// 50 threads, half POP3 and half IMAP over implicit TLS, each retrieving alice's messages
/// session after session until the proxy goes away. Prints `done <listener> <client port>`
/// after each QUIT/LOGOUT reply, and `closed <error>` when a thread's connection fails.
const LOAD_SCRIPT: &str = r#"
import imaplib, poplib, ssl, sys, threading, time
pop3s, imaps, ca = sys.argv[1:4]
ctx = ssl.create_default_context(cafile=ca)
lock = threading.Lock()
def say(s):
    with lock:
        print(s, flush=True)
def run(k):
    end = time.time() + 60
    while time.time() < end:
        try:
            if k % 2:
                p = poplib.POP3_SSL("127.0.0.1", int(pop3s), context=ctx, timeout=10)
                port = p.sock.getsockname()[1]
                p.user("alice"); p.pass_("secret")
                for i in range(1, p.stat()[0] + 1):
                    p.retr(i)
                p.quit()
                say(f"done pop3s {port}")
            else:
                m = imaplib.IMAP4_SSL("127.0.0.1", int(imaps), ssl_context=ctx, timeout=10)
                port = m.sock.getsockname()[1]
                m.login("alice", "secret")
                n = int(m.select("INBOX")[1][0])
                for i in range(1, n + 1):
                    m.fetch(str(i), "(BODY.PEEK[])")
                m.logout()
                say(f"done imaps {port}")
        except Exception as e:
            say(f"closed {type(e).__name__}")
            return
ts = [threading.Thread(target=run, args=(k,)) for k in range(50)]
for t in ts: t.start()
for t in ts: t.join()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_50_sessions_loses_no_completed_session_and_duplicates_no_id() {
    if !peers_present() {
        return;
    }
    let d = Dovecot::start();
    let dir = tempfile::tempdir().unwrap();
    let (pop3s, imaps) = (free_port(), free_port());
    let (_, ca) = proxy_config(
        dir.path(),
        (d.pop3, d.imap),
        [
            "",
            &format!("127.0.0.1:{pop3s}"),
            "",
            &format!("127.0.0.1:{imaps}"),
        ],
        None,
        "[meter]\nsync = \"per-session\"",
    );
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_mailbell"))
        .arg("--config")
        .arg(dir.path().join("mailbell.toml"))
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", imaps)).is_err() {
        assert!(Instant::now() < deadline, "mailbell serve did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut load = Command::new("python3")
        .arg("-c")
        .arg(LOAD_SCRIPT)
        .args([
            pop3s.to_string(),
            imaps.to_string(),
            ca.display().to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = load.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap());
        }
    });
    // Kill once 100 sessions completed, while the others are mid-retrieval.
    let mut before = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while before
        .iter()
        .filter(|l: &&String| l.starts_with("done"))
        .count()
        < 100
    {
        assert!(
            Instant::now() < deadline,
            "sessions did not complete: {before:?}"
        );
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => before.push(line),
            Err(_) => continue,
        }
    }
    serve.kill().unwrap(); // SIGKILL
    serve.wait().unwrap();
    before.extend(rx.try_iter());
    let done_before: HashSet<String> = before
        .iter()
        .filter_map(|l| l.strip_prefix("done "))
        .map(str::to_owned)
        .collect();
    tokio::task::spawn_blocking(move || load.wait().unwrap())
        .await
        .unwrap();
    reader.join().unwrap();
    let after: Vec<String> = rx.try_iter().collect();
    // Every client saw its connection close (or refused) rather than hang.
    let closed = before
        .iter()
        .chain(&after)
        .filter(|l| l.starts_with("closed"))
        .count();
    assert_eq!(closed, 50, "{after:?}");

    // The store reopens cleanly (cutting a torn tail if the kill left one).
    let meter_dir = dir.path().join("data/meter");
    tokio::task::spawn_blocking(move || reopened(&meter_dir, &done_before))
        .await
        .unwrap();
}

/// Checks the store a killed proxy left: ids unique and increasing, every completed session
/// there, new records after the largest id.
fn reopened(meter_dir: &Path, done_before: &HashSet<String>) {
    let store = MeterStore::open(meter_dir, Default::default()).unwrap();
    let records = store.query(&all()).unwrap().records;
    assert_ids_increase(&records);
    let ids: HashSet<u64> = records.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), records.len());
    let stored: HashSet<String> = sessions(&records)
        .iter()
        .filter(|s| s.login == Login::Ok && s.messages == 3)
        .map(|s| format!("{} {}", s.listener, s.client.port()))
        .collect();
    let missing: Vec<&String> = done_before.difference(&stored).collect();
    assert!(missing.is_empty(), "completed but not stored: {missing:?}");
    // And it takes new records after the largest id.
    let last = records.last().map_or(0, |r| r.id);
    let rec = records.last().unwrap().entry.clone();
    store.append(vec![rec]).unwrap();
    store.flush().unwrap();
    let next = store
        .query(&MeterQuery {
            after: Some(last),
            ..all()
        })
        .unwrap()
        .records;
    assert_eq!(next.iter().map(|r| r.id).collect::<Vec<_>>(), [last + 1]);
}
