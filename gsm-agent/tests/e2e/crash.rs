//! Reliability: kill -9 of the agent while notices stream in, and connections cut at random
//! points. Nothing acknowledged is lost; nothing is sent twice, except at most one submit per
//! crash that was at the modem when the agent died (recorded as uncertain).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mailbell_gsm_agent::sim::{SimModem, SimOptions};
use mailbell_link::memory::MemoryOutbox;
use mailbell_link::net::{self, ClientSettings, ClientStats, Endpoint};
use mailbell_link::sender::SenderConfig;
use mailbell_link::tls;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// Counts how often each "notice #i" reached the modem.
fn tally(sim: &SimModem) -> HashMap<usize, usize> {
    let mut m = HashMap::new();
    for d in decoded(sim) {
        if let Some(i) = d.text.strip_prefix("notice #").and_then(|s| s.parse().ok()) {
            *m.entry(i).or_insert(0) += 1;
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_streaming_loses_nothing_and_duplicates_at_most_one_per_crash() {
    const N: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let sim = SimModem::spawn(SimOptions::default()).unwrap();
    let mut agent = Agent::start(dir.path(), &[sim.device_path()], "");
    let outbox = MemoryOutbox::new();
    let notices: Vec<_> = (0..N).map(|i| numbered(i, "+8613800138000")).collect();
    let client = agent.client(outbox.clone());
    // Stream in: a producer adds notices in bursts while the agent is being killed.
    let producer = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            for chunk in notices.chunks(250) {
                for n in chunk {
                    push(&outbox, n);
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    let mut kills = 0;
    let mut rng = rand::thread_rng();
    while kills < 6 {
        let pause = rng.gen_range(150..1200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        agent.kill9();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
        agent.restart();
    }
    producer.await.unwrap();
    wait_until("the outbox to drain", 300, || outbox.pending() == 0).await;
    wait_until("every notice at the modem", 300, || tally(&sim).len() == N).await;
    // Let the agent finish anything still queued, then compare.
    agent
        .status_when("agent queue empty", 120, |s| s.queued == 0)
        .await;
    let t = tally(&sim);
    let lost: Vec<_> = (0..N).filter(|i| !t.contains_key(i)).collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    let dups: usize = t.values().map(|c| c - 1).sum();
    let status = agent.status().await;
    eprintln!(
        "kills {kills}, duplicates {dups}, uncertain submits recorded {}",
        status.uncertain
    );
    assert!(dups <= kills, "{dups} duplicates after {kills} crashes");
    assert!(
        dups as u64 <= status.uncertain,
        "every duplicate is a recorded uncertain submit ({dups} > {})",
        status.uncertain
    );
    assert!(outbox
        .outcomes()
        .values()
        .all(|o| *o == mailbell_link::memory::Settled::Acked));
    client.stop().await;
}

/// A TCP relay that cuts each connection after a random number of bytes.
async fn cutting_proxy(
    upstream: std::net::SocketAddr,
    stop: CancellationToken,
) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut down, _) = tokio::select! {
                _ = stop.cancelled() => return,
                r = l.accept() => match r { Ok(x) => x, Err(_) => continue },
            };
            // Cut after a random amount of notices towards the agent, or of ACKs back from it.
            let budget: usize = rand::thread_rng().gen_range(500..60_000);
            let ack_budget: usize = rand::thread_rng().gen_range(200..20_000);
            tokio::spawn(async move {
                let Ok(mut up) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut dr, mut dw) = down.split();
                let (mut ur, mut uw) = up.split();
                let to_agent = async {
                    let mut left = budget;
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = match dr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let n = n.min(left);
                        if uw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        left -= n;
                        if left == 0 {
                            break;
                        }
                    }
                };
                let to_host = async {
                    let mut left = ack_budget;
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = match ur.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let n = n.min(left);
                        if dw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        left -= n;
                        if left == 0 {
                            break;
                        }
                    }
                };
                tokio::select! { _ = to_agent => {}, _ = to_host => {} }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_at_random_points_lose_and_duplicate_nothing() {
    const N: usize = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let sim = SimModem::spawn(SimOptions::default()).unwrap();
    let agent = Agent::start(dir.path(), &[sim.device_path()], "");
    let stop = CancellationToken::new();
    let proxy = cutting_proxy(agent.link, stop.clone()).await;
    let outbox = MemoryOutbox::new();
    for i in 0..N {
        push(&outbox, &numbered(i, "+8613800138000"));
    }
    let stats = Arc::new(ClientStats::default());
    let settings = ClientSettings {
        agents: vec![Endpoint {
            addr: proxy.to_string(),
            server_name: "localhost".into(),
        }],
        tls: tls::client_config(&agent.client_tls()).unwrap(),
        sender: SenderConfig {
            ack_timeout: Duration::from_secs(2),
            heartbeat: Duration::from_secs(1),
            dead_after: Duration::from_secs(3),
            ..SenderConfig::default()
        },
        connect_timeout: Duration::from_secs(2),
        io_timeout: Duration::from_secs(3),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
    };
    let task = tokio::spawn(net::run_client(
        settings,
        outbox.clone(),
        stop.clone(),
        stats.clone(),
    ));
    wait_until("the outbox to drain through the cutting proxy", 300, || {
        outbox.pending() == 0
    })
    .await;
    wait_until("every notice at the modem", 300, || tally(&sim).len() == N).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = tally(&sim);
    assert_eq!(t.len(), N, "0 lost");
    assert!(t.values().all(|c| *c == 1), "0 duplicated");
    let sessions = stats.sessions.load(Ordering::Relaxed);
    assert!(
        sessions > 3,
        "the proxy cut connections ({sessions} sessions)"
    );
    let s = agent.status().await;
    eprintln!(
        "sessions {sessions}, agent duplicates absorbed {}",
        s.duplicates
    );
    stop.cancel();
    task.await.unwrap();
}
