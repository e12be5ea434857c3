//! fetchmail as a client of the retrieval proxy in front of a real private Dovecot: POP3 with
//! STLS (`--keep`) and then IMAP over implicit TLS (deleting what it fetched), each message
//! delivered by an `mda` that writes it to a file (no local MTA). fetchmail checks the proxy's
//! certificate against the test CA (`sslcertck`, `sslcertfile`). Without fetchmail (or
//! dovecot, python3, curl) the test prints `SKIPPED ...`; under `CI=true` it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Command;

use support::retrieval::*;

/// Runs fetchmail once with an rcfile polling `port` of the proxy with protocol `proto` and
/// the user options `options`; returns its output.
async fn fetchmail(
    dir: &Path,
    (port, proto): (u16, &str),
    options: &str,
    ca: &Path,
    out: &Path,
) -> String {
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(out).unwrap();
    // Each delivery gets its own shell, so `$$` names one file per message.
    let rc = format!(
        "set no syslog\nset invisible\n\
         poll localhost proto {proto} port {port}\n\
         \tuser \"alice\" there with password \"secret\" is \"tester\" here\n\
         \t{options}\n\
         \tsslcertck sslcertfile \"{ca}\"\n\
         \tfetchall no rewrite\n\
         \tmda \"/bin/sh -c 'cat > {out}/msg.$$'\"\n",
        ca = ca.display(),
        out = out.display(),
    );
    let rcfile = dir.join("fetchmailrc");
    std::fs::write(&rcfile, rc).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&rcfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    tokio::task::spawn_blocking(move || {
        let o = Command::new("timeout")
            .args(["30", "fetchmail", "--nodetach", "-v", "-f"])
            .arg(&rcfile)
            .arg("--pidfile")
            .arg(home.join("fetchmail.pid"))
            .env("HOME", &home)
            .env("FETCHMAILHOME", &home)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "fetchmail failed: {text}");
        text
    })
    .await
    .unwrap()
}

/// The messages the mda wrote, sorted by content.
fn delivered(out: &Path) -> Vec<String> {
    let mut got: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    got.sort();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetchmail_over_pop3_stls_and_imaps_delivers_every_message_intact() {
    if !peers_present() {
        return;
    }
    if !have("fetchmail", "--version") {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "fetchmail missing under CI"
        );
        skip("fetchmail not installed");
        return;
    }
    let d = Dovecot::start();
    let p = Proxy::start(d.pop3, d.imap, "").await;
    let dir = tempfile::tempdir().unwrap();
    let mut want = messages();
    want.sort();
    let sizes: u64 = messages().iter().map(|m| m.len() as u64).sum();

    // POP3, STLS required (sslproto auto), messages kept on the server.
    let pop3_out = dir.path().join("pop3");
    let log = fetchmail(
        dir.path(),
        (p.port("pop3"), "pop3"),
        "sslproto \"auto\" keep",
        &p.ca,
        &pop3_out,
    )
    .await;
    assert!(log.contains("STLS"), "{log}");
    assert_eq!(delivered(&pop3_out), want, "{log}");
    let [logins, retrieved, retrieved_bytes, _] = p.stats_after(1).await;
    assert_eq!((logins, retrieved), (1, 3), "{log}");
    // The proxy's count agrees with Dovecot's retr=N/bytes (docs/retrieval.md).
    let dlog = wait_log(&d, "retr=3/").await;
    assert_eq!(dovecot_counter(&dlog, "retr"), (3, retrieved_bytes));

    // IMAP over implicit TLS, fetched messages deleted.
    let imap_out = dir.path().join("imap");
    let log = fetchmail(
        dir.path(),
        (p.port("imaps"), "imap"),
        "ssl nokeep",
        &p.ca,
        &imap_out,
    )
    .await;
    assert_eq!(delivered(&imap_out), want, "{log}");
    let [_, _, imap_bytes, _] = p.stats_after(2).await;
    // fetchmail fetches the header and the text apart: together the whole message, in CRLF.
    let lines: u64 = messages()
        .iter()
        .map(|m| m.matches('\n').count() as u64)
        .sum();
    assert_eq!(imap_bytes - retrieved_bytes, sizes + lines, "{log}");
    // nokeep: the mailbox is empty now.
    let mailbox = d.dir().join("home/alice/Maildir");
    let left: usize = ["cur", "new"]
        .iter()
        .map(|s| std::fs::read_dir(mailbox.join(s)).unwrap().count())
        .sum();
    assert_eq!(left, 0, "{log}");
    p.stop().await;
}
