//! The agent's status/metrics port under slow and idle clients: the real agent (in process),
//! short configured timeouts, a raw TCP client.

use std::time::{Duration, Instant};

use mailbell_gsm_agent::config::{Config, LinkTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn closed_within(s: &mut TcpStream, within: Duration) -> Duration {
    let from = Instant::now();
    let r = tokio::time::timeout(within, async {
        let mut b = [0u8; 4096];
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(r.is_ok(), "connection still open after {within:?}");
    from.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_port_closes_slow_and_idle_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::from_toml(
        "[metrics.http]\nheader_timeout = \"1s\"\nidle_timeout = \"1s\"\nbody_timeout = \"1s\"\n",
        "test",
    )
    .unwrap();
    cfg.simulator.enable = true;
    cfg.data_dir = dir.path().to_path_buf();
    cfg.link.listen = "127.0.0.1:0".parse().unwrap();
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    if let LinkTls::DevPki { dir: d, .. } = &mut cfg.link.tls {
        *d = dir.path().join("pki");
    }
    let agent = mailbell_gsm_agent::app::start(cfg).await.unwrap();
    let addr = agent.metrics_addr.unwrap();

    // A header dribbled a byte per 200 ms is closed at the 1 s header timeout.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut sent = 0;
    for b in b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n" {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        sent += 1;
        let mut probe = [0u8; 1];
        if tokio::time::timeout(Duration::from_millis(200), s.read(&mut probe))
            .await
            .is_ok()
        {
            break;
        }
    }
    assert!(sent < 15, "{sent} bytes dribbled before the close");
    closed_within(&mut s, Duration::from_secs(3)).await;

    // A kept-alive connection is served, then closed at the 1 s idle timeout.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 8192];
    while !String::from_utf8_lossy(&got)
        .contains("mailbell_http_timeouts_total{listener=\"status\",phase=\"write\"}")
    {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("mailbell_http_timeouts_total{listener=\"status\",phase=\"header\"} 1"),
        "{text}"
    );
    assert!(text.contains("mailbell_listener_connections_accepted_total{listener=\"status\"} 2"));
    let took = closed_within(&mut s, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(800), "{took:?}");

    // A dribbled body is closed at the body timeout.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /dead-letters/requeue?seq=all HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n",
    )
    .await
    .unwrap();
    let mut sent = 0;
    for _ in 0..500 {
        if s.write_all(b" ").await.is_err() {
            break;
        }
        sent += 1;
        let mut probe = [0u8; 1];
        if tokio::time::timeout(Duration::from_millis(200), s.read(&mut probe))
            .await
            .is_ok()
        {
            break;
        }
    }
    assert!(sent < 30, "{sent} body bytes dribbled before the close");
    closed_within(&mut s, Duration::from_secs(5)).await;

    // What Prometheus scrapes passes promtool (listener and HTTP families included).
    let r =
        mailbell_link::http::request(addr, "GET", "/metrics", None, None, Duration::from_secs(5))
            .await
            .unwrap();
    assert_eq!(r.status, 200);
    promtool_check(&r.body);
    // Every metric the shipped alert rules use for the agent is on its /metrics.
    for name in crate::prometheus::rule_metrics("mailbell-agent") {
        assert!(
            r.body.contains(&format!("# TYPE {name} ")),
            "alert rules use {name}, which the agent's /metrics does not have:\n{}",
            r.body
        );
    }
    // The simulated modem has no submit history yet: its AT+CMGS deadline is the configured
    // ceiling (30 s for the simulator), in /metrics and in /status.
    // (prometheus-client writes a float gauge with its fraction: 30.0.)
    assert!(
        r.body
            .contains("mailbell_modem_submit_timeout_seconds{modem=\"sim0\"} 30.0\n"),
        "{}",
        r.body
    );
    let status =
        mailbell_link::http::request(addr, "GET", "/status", None, None, Duration::from_secs(5))
            .await
            .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(status["modems"][0]["submit_timeout_ms"], 30_000, "{status}");
    assert!(status["modems"][0]["submit_p99_ms"].is_null(), "{status}");
    agent.stop().await;
}

/// `promtool check metrics` on `text` (a visible skip outside CI when promtool is missing).
fn promtool_check(text: &str) {
    if !crate::prometheus::promtool_check_metrics(text) {
        crate::support::skip("promtool not installed; the agent's /metrics not checked by it");
    }
}
