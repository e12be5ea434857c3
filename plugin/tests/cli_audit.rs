//! `mailbell log` and `mailbell queue list --held`, through a running daemon's admin API and
//! on the stores directly: a long history prints its newest records and says on stderr what
//! it left out; notices held back or awaiting confirmation are listed with why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use mailbell::audit::{AuditConfig, AuditEvent, AuditLog};
use mailbell::notify::arrival::{Arrival, HeaderFacts, Intake, Origin};
use mailbell::notify::intake::{IntakeConfig, MailIntake};
use mailbell::notify::outbox::Outbox;
use mailbell::users::{QuietHours, User, UserStore};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_mailbell");
const TOKEN: &str = "cli-audit-token";

fn run(config: &Path, args: &[&str]) -> Output {
    let o = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A data directory holding 1,295 operator records (a second apart, the newest a minute
/// ago), then the intake's three (created, held; created) of two notices not queued yet:
/// alice's, held by quiet hours, and bob's, awaiting Stalwart's delivery confirmation.
fn seeded() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    // The intake's clock: noon UTC today, inside alice's quiet hours.
    let noon = now - now.rem_euclid(86_400_000) + 43_200_000;
    let audit = AuditLog::open(&data.join("audit"), AuditConfig::default()).unwrap();
    for i in 0..1295_i64 {
        audit.record_at(
            now - 60_000 - (1294 - i) * 1000,
            AuditEvent::Admin {
                actor: "seed".into(),
                action: format!("a{i}"),
                target: "t".into(),
            },
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let outbox = Outbox::open(&data.join("outbox"), Default::default()).unwrap();
        let users = UserStore::open(&data.join("users")).unwrap();
        let mut alice = User::new("alice@example.com");
        alice.phone = "+8613800138000".into();
        alice.quiet = Some(QuietHours::parse("11:00-13:00").unwrap());
        users.insert(alice).unwrap();
        let mut bob = User::new("bob@example.com");
        bob.phone = "+8613800138001".into();
        users.insert(bob).unwrap();
        let stop = CancellationToken::new();
        let (intake, task) = MailIntake::start(
            IntakeConfig::default(),
            outbox.clone(),
            users.clone(),
            audit.clone(),
            None,
            Arc::new(move || noon),
            stop.clone(),
        )
        .unwrap();
        for (origin, rcpt) in [
            (Origin::Milter, "alice@example.com"),
            (Origin::Stalwart { queue_id: 9 }, "bob@example.com"),
        ] {
            let a = Arrival {
                origin,
                client_ip: None,
                helo: "mx.example.net".into(),
                env_from: "carol@example.net".into(),
                rcpts: vec![rcpt.into()],
                headers: HeaderFacts {
                    from_addr: "carol@example.net".into(),
                    subject: format!("for {rcpt}"),
                    ..Default::default()
                },
                size: 10,
                received_at_ms: noon,
                mta_queue_id: None,
            };
            assert_eq!(intake.accept(a).await.unwrap().notices, 1);
        }
        stop.cancel();
        drop(intake);
        task.await.unwrap();
        outbox.close();
        users.flush().unwrap();
    });
    audit.flush().unwrap();
    audit.close();
    (dir, data)
}

fn config(dir: &Path, data: &Path, admin: &str) -> PathBuf {
    let config = dir.join("mailbell.toml");
    std::fs::write(
        &config,
        format!(
            "[mailbell]\ndata_dir = {data:?}\n[listen]\nadmin = {admin:?}\n[admin]\ntoken = {TOKEN:?}\n"
        ),
    )
    .unwrap();
    config
}

fn check_log(config: &Path) {
    let o = run(config, &["log"]);
    let out = String::from_utf8(o.stdout).unwrap();
    let err = String::from_utf8(o.stderr).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1000, "{err}");
    assert!(lines[0].contains("action=a298"), "{}", lines[0]);
    assert!(lines[996].contains("action=a1294"), "{}", lines[996]);
    assert!(lines[999].contains(" created "), "{}", lines[999]);
    assert!(
        err.contains("newest 1000") && err.contains("298 older one(s) left out"),
        "{err}"
    );
    assert!(err.contains("--until "), "{err}");
    // Nothing left out: nothing said.
    let o = run(config, &["log", "--limit", "2000", "--json"]);
    assert_eq!(
        String::from_utf8(o.stdout).unwrap().lines().count(),
        1295 + 3
    );
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn check_held(config: &Path) {
    let out = String::from_utf8(run(config, &["queue", "list", "--held"]).stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains("user=alice@example.com")
            && lines[0].contains("[quiet hours until ")
            && lines[0].contains("T13:00:00Z]"),
        "{out}"
    );
    assert!(
        lines[1].contains("user=bob@example.com")
            && lines[1].contains("[awaiting delivery confirmation]"),
        "{out}"
    );
    let queued = String::from_utf8(run(config, &["queue", "list"]).stdout).unwrap();
    assert_eq!(queued.trim(), "(empty)");
}

#[test]
fn log_and_held_notices_on_the_stores() {
    let (dir, data) = seeded();
    let config = config(dir.path(), &data, "");
    check_log(&config);
    check_held(&config);
}

#[test]
fn log_and_held_notices_through_the_daemon() {
    let (dir, data) = seeded();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (addr, _stores) = rt.block_on(async {
        let outbox = Outbox::open(&data.join("outbox"), Default::default()).unwrap();
        let audit = AuditLog::open(&data.join("audit"), AuditConfig::default()).unwrap();
        let app = mailbell::admin::api::protect(
            mailbell::admin::ops::routes(outbox.clone(), audit.clone()),
            Arc::from(TOKEN),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, (outbox, audit))
    });
    let config = config(dir.path(), &data, &addr.to_string());
    check_log(&config);
    check_held(&config);
}
