//! The async client and server over real mutual TLS on loopback, with in-memory stores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailbell_link::frame::{self, Frame, DEFAULT_MAX_FRAME};
use mailbell_link::memory::{MemoryOutbox, Settled};
use mailbell_link::net::{
    self, ClientSettings, ClientStats, Endpoint, Inbox, ServerSettings, ServerStats,
};
use mailbell_link::pki::{ensure_dev_pki, DevPkiPaths};
use mailbell_link::receiver::{Outcome, ReceiverConfig};
use mailbell_link::sender::SenderConfig;
use mailbell_link::{tls, NackClass, NotifId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
struct MemInbox {
    seen: Arc<Mutex<HashSet<NotifId>>>,
    stored: Arc<Mutex<Vec<NotifId>>>,
}

impl Inbox for MemInbox {
    async fn store(&self, _peer: Arc<str>, batch: Vec<(NotifId, Vec<u8>)>) -> Vec<Outcome> {
        let mut seen = self.seen.lock().unwrap();
        batch
            .into_iter()
            .map(|(id, payload)| {
                if payload == b"bad" {
                    Outcome::Rejected {
                        class: NackClass::Permanent,
                        retry_after: Duration::ZERO,
                        reason: "invalid phone number".into(),
                    }
                } else if seen.insert(id) {
                    self.stored.lock().unwrap().push(id);
                    Outcome::Stored
                } else {
                    Outcome::Duplicate
                }
            })
            .collect()
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    pki: DevPkiPaths,
    addr: String,
    inbox: MemInbox,
    stop: CancellationToken,
    stats: Arc<ServerStats>,
}

async fn start_server() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let pki = ensure_dev_pki(
        dir.path(),
        &["localhost".into(), "127.0.0.1".into()],
        "mailhost",
        false,
    )
    .unwrap();
    let settings = Arc::new(ServerSettings {
        tls: tls::server_config(&pki.server_files(vec![])).unwrap(),
        allowed_client_names: vec![],
        receiver: ReceiverConfig::default(),
        handshake_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(5),
        max_sessions: 16,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let inbox = MemInbox::default();
    let stop = CancellationToken::new();
    let stats = Arc::new(ServerStats::default());
    tokio::spawn(net::serve(
        listener,
        settings,
        inbox.clone(),
        stop.clone(),
        stats.clone(),
    ));
    Rig {
        _dir: dir,
        pki,
        addr,
        inbox,
        stop,
        stats,
    }
}

fn client_settings(rig: &Rig, agents: Vec<Endpoint>) -> ClientSettings {
    ClientSettings {
        agents,
        tls: tls::client_config(&rig.pki.client_files()).unwrap(),
        sender: SenderConfig::default(),
        connect_timeout: Duration::from_secs(2),
        io_timeout: Duration::from_secs(5),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn client_drains_outbox_and_fails_over_from_a_dead_agent() {
    let rig = start_server().await;
    // The first agent in the list refuses connections; the client moves on to the second.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let outbox = MemoryOutbox::new();
    let mut ids = Vec::new();
    for i in 0..2000u32 {
        let id = NotifId::random();
        ids.push(id);
        let payload = if i % 500 == 7 {
            b"bad".to_vec()
        } else {
            i.to_be_bytes().to_vec()
        };
        outbox.push(id, payload);
    }
    let stop = CancellationToken::new();
    let stats = Arc::new(ClientStats::default());
    let settings = client_settings(
        &rig,
        vec![
            Endpoint {
                addr: dead_addr,
                server_name: "localhost".into(),
            },
            Endpoint {
                addr: rig.addr.clone(),
                server_name: "localhost".into(),
            },
        ],
    );
    let task = tokio::spawn(net::run_client(
        settings,
        outbox.clone(),
        stop.clone(),
        stats.clone(),
    ));
    wait_for("outbox to drain", || outbox.pending() == 0).await;
    let stored = rig.inbox.stored.lock().unwrap().clone();
    assert_eq!(stored.len(), 1996);
    let dead: Vec<_> = outbox
        .outcomes()
        .into_values()
        .filter(|o| *o != Settled::Acked)
        .collect();
    assert_eq!(dead.len(), 4);
    assert!(dead
        .iter()
        .all(|o| *o == Settled::Dead("invalid phone number".into())));
    // A notice larger than the agent's frame limit is dead-lettered here, never resent.
    let huge = NotifId::random();
    outbox.push(huge, vec![b'x'; 70_000]);
    wait_for("oversized item settled", || outbox.outcome(&huge).is_some()).await;
    assert!(matches!(
        outbox.outcome(&huge),
        Some(Settled::Dead(r)) if r.contains("exceeds the agent's maximum frame size")
    ));
    // Items added later flow without reconnecting.
    let late = NotifId::random();
    outbox.push(late, vec![1]);
    wait_for("late item", || {
        rig.inbox.seen.lock().unwrap().contains(&late)
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    rig.stop.cancel();
}

/// Opens a TLS session with the dev client certificate, ready for raw frames.
async fn raw_session(rig: &Rig) -> tokio_rustls::client::TlsStream<TcpStream> {
    let cfg = tls::client_config(&rig.pki.client_files()).unwrap();
    let tcp = TcpStream::connect(&rig.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(tls::agent_server_name("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

async fn read_frames_until_close(s: &mut tokio_rustls::client::TlsStream<TcpStream>) -> Vec<Frame> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let mut out = Vec::new();
    let mut b = &buf[..];
    while let Ok(Some((f, n))) = frame::decode(b, DEFAULT_MAX_FRAME) {
        out.push(f);
        b = &b[n..];
    }
    out
}

#[tokio::test]
async fn unknown_version_gets_a_clear_refusal() {
    let rig = start_server().await;
    let mut s = raw_session(&rig).await;
    let mut out = Vec::new();
    Frame::Hello {
        version: 99,
        window: 8,
        max_frame: DEFAULT_MAX_FRAME,
        name: "future".into(),
    }
    .encode(&mut out);
    s.write_all(&out).await.unwrap();
    let frames = read_frames_until_close(&mut s).await;
    match frames.as_slice() {
        [Frame::Refuse { code, reason }] => {
            assert_eq!(*code, frame::refuse::UNSUPPORTED_VERSION);
            assert!(
                reason.contains("unsupported protocol version 99"),
                "{reason}"
            );
        }
        other => panic!("expected one REFUSE, got {other:?}"),
    }
    assert_eq!(
        rig.stats.refused.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn garbage_and_oversized_frames_close_only_that_session() {
    let rig = start_server().await;
    // A healthy client keeps streaming throughout.
    let outbox = MemoryOutbox::new();
    let stop = CancellationToken::new();
    let settings = client_settings(
        &rig,
        vec![Endpoint {
            addr: rig.addr.clone(),
            server_name: "localhost".into(),
        }],
    );
    let task = tokio::spawn(net::run_client(
        settings,
        outbox.clone(),
        stop.clone(),
        Arc::new(ClientStats::default()),
    ));
    for bad in [
        // garbage after a valid hello
        b"\x00\x00\x00\x05\xffhello".to_vec(),
        // a length prefix far above the cap
        (DEFAULT_MAX_FRAME * 16).to_be_bytes().to_vec(),
    ] {
        let mut s = raw_session(&rig).await;
        let mut out = Vec::new();
        Frame::Hello {
            version: 1,
            window: 8,
            max_frame: DEFAULT_MAX_FRAME,
            name: "bad".into(),
        }
        .encode(&mut out);
        out.extend_from_slice(&bad);
        s.write_all(&out).await.unwrap();
        let frames = read_frames_until_close(&mut s).await;
        assert!(
            matches!(frames.first(), Some(Frame::Welcome { .. })),
            "{frames:?}"
        );
        assert!(
            matches!(frames.last(), Some(Frame::Bye { reason }) if reason.starts_with("protocol error")),
            "{frames:?}"
        );
        let id = NotifId::random();
        outbox.push(id, vec![2]);
        wait_for("healthy client's item", || {
            rig.inbox.seen.lock().unwrap().contains(&id)
        })
        .await;
    }
    // Plain TCP garbage (no TLS at all) is refused in the handshake.
    let mut tcp = TcpStream::connect(&rig.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
    assert!(
        rig.stats
            .protocol_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    assert!(
        rig.stats
            .tls_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    stop.cancel();
    task.await.unwrap();
}
