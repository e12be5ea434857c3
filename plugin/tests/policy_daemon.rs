//! The blocklist, zones and delivery meter wired into a daemon (`app::start`): list files
//! reloaded as SIGHUP does, a bad file refusing the start or the reload, and a message through
//! the milter metered into the daemon's ledger.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indymilter_test::{MacroStage, ProtoOpts, Status, TestConnection};
use mailbell::app::Running;
use mailbell::policy::zones::Zone;
use tokio_util::sync::CancellationToken;

fn config(dir: &Path, networks: &Path, free: &Path) -> mailbell::config::Config {
    let data = dir.join("data");
    mailbell::config::Config::from_toml(
        &format!(
            "[mailbell]\ndata_dir = {data:?}\n[listen]\nhttp = \"\"\nadmin = \"\"\n\
             milter = \"127.0.0.1:0\"\n[[link.agent]]\naddr = \"127.0.0.1:9\"\n\
             [billing]\nmeter_deliveries = true\n\
             [zones]\nfree_networks = [{free:?}]\n\
             [blocklist]\nnetworks = [{networks:?}]\nreply = \"go away\"\n"
        ),
        "test",
    )
    .unwrap()
}

async fn until(counter: &AtomicU64, n: u64) {
    for _ in 0..500 {
        if counter.load(Ordering::Relaxed) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("counter stayed below {n}");
}

async fn open(r: &Running) -> TestConnection {
    TestConnection::configure()
        .read_timeout(Duration::from_secs(20))
        .open_tcp(r.milter_addr.unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn reload_applies_good_lists_and_refuses_a_bad_one_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (nets, free) = (dir.path().join("block.txt"), dir.path().join("free.txt"));
    std::fs::write(&nets, "# nothing blocked yet\n").unwrap();
    std::fs::write(&free, "127.0.0.0/8\n").unwrap();
    let running = mailbell::app::start(config(dir.path(), &nets, &free), CancellationToken::new())
        .await
        .unwrap();

    // Nothing blocked: no reply asked for at connect; a message is accepted and metered free.
    let mut conn = open(&running).await;
    assert!(conn.negotiated_opts().contains(ProtoOpts::NOREPLY_CONNECT));
    let s = conn.connect("x", ([127, 0, 0, 1], 40000)).await.unwrap();
    assert!(matches!(s, Status::Noreply | Status::Continue), "{s:?}");
    conn.mail(["<a@sender.example>"]).await.unwrap();
    conn.rcpt(["<Bob@Example.com>"]).await.unwrap();
    conn.header("Subject", "hi").await.unwrap();
    conn.body(b"x\r\n".to_vec()).await.unwrap();
    conn.macros(MacroStage::Eom, [("i", "Q42")]).await.unwrap();
    assert_eq!(conn.eom().await.unwrap().1, Status::Accept);
    conn.close().await.unwrap();
    let metered = running
        .stores
        .ledger
        .call(|s| s.unconsumed_deliveries(10))
        .await
        .unwrap();
    assert_eq!(metered.len(), 1);
    assert_eq!(
        (
            metered[0].message_key.as_str(),
            metered[0].account.as_str(),
            metered[0].zone
        ),
        ("milter:Q42", "bob@example.com", Zone::Free)
    );

    // The list is filled in and reloaded (SIGHUP): a new connection is refused at connect.
    std::fs::write(&nets, "127.0.0.0/8\n").unwrap();
    running.reload();
    until(&running.policy.stats.reloads, 1).await;
    let mut conn = open(&running).await;
    assert!(!conn.negotiated_opts().contains(ProtoOpts::NOREPLY_CONNECT));
    match conn.connect("x", ([127, 0, 0, 1], 40000)).await.unwrap() {
        Status::Reject { message: Some(m) } => assert_eq!(m.to_str().unwrap(), "550 5.7.1 go away"),
        other => panic!("{other:?}"),
    }

    // A bad line in either file: the reload is refused whole, the rules in force stay.
    std::fs::write(&nets, "# emptied\n").unwrap();
    std::fs::write(&free, "127.0.0.0/8\n10.0.0.0/99\n").unwrap();
    running.reload();
    until(&running.policy.stats.reload_failures, 1).await;
    assert_eq!(running.policy.stats.reloads.load(Ordering::Relaxed), 1);
    let mut conn = open(&running).await;
    assert!(matches!(
        conn.connect("x", ([127, 0, 0, 1], 40000)).await.unwrap(),
        Status::Reject { .. }
    ));
    assert_eq!(
        running.policy.stats.refused_connect.load(Ordering::Relaxed),
        2
    );
    // Each refusal is in the audit log.
    let audit = running.stores.audit.clone();
    let refused = tokio::task::spawn_blocking(move || {
        audit.flush().unwrap();
        audit
            .query(&mailbell::audit::AuditQuery {
                limit: 100,
                ..Default::default()
            })
            .unwrap()
    })
    .await
    .unwrap()
    .into_iter()
    .filter(|r| r.event.name() == "refused")
    .map(|r| r.event)
    .collect::<Vec<_>>();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert_eq!(
        refused[0],
        mailbell::audit::AuditEvent::Refused {
            mta: "milter".into(),
            stage: "connect".into(),
            client_ip: "127.0.0.1".into(),
            matched: "127.0.0.1".into(),
        }
    );
    running.stop().await;
}

#[tokio::test]
async fn a_bad_list_file_stops_the_start_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let (nets, free) = (dir.path().join("block.txt"), dir.path().join("free.txt"));
    std::fs::write(&nets, "192.0.2.0/24\n\n2001:db8::/129\n").unwrap();
    std::fs::write(&free, "").unwrap();
    let e = mailbell::app::start(config(dir.path(), &nets, &free), CancellationToken::new())
        .await
        .err()
        .unwrap();
    let e = format!("{e:#}");
    assert!(e.contains(&format!("{}:3:", nets.display())), "{e}");
    assert!(e.contains("2001:db8::/129"), "{e}");
}
