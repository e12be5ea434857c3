//! Black-box tests of the Stalwart MTA hook and webhook endpoints: the real router served on
//! 127.0.0.1:0, spoken to over TCP by a minimal HTTP/1.1 client, fed with requests captured
//! from a real Stalwart (tests/fixtures/stalwart/, see the README there).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailbell::billing::ledger::DeliveryRecord;
use mailbell::billing::Ledger;
use mailbell::mta::stalwart::{
    router_with_policy, router_with_stats, StalwartConfig, StalwartStats,
};
use mailbell::notify::arrival::{
    Accepted, Arrival, HeaderFacts, Ingest, IngestKind, Intake, IntakeError, Origin,
};
use mailbell::policy::blocklist::BlocklistConfig;
use mailbell::policy::zones::{Zone, ZonesConfig};
use mailbell::policy::Policy;
use ring::hmac;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "test-secret";
const HOOK: &str = "/stalwart/mta-hook";
const EVENTS: &str = "/stalwart/events";
const REJECT_451: &str = r#"{"action":"reject","response":{"status":451,"enhanced_status":"4.3.0","message":"mailbell: cannot record the arrival notice, try again later","disconnect":false}}"#;

// ---- fake intake -------------------------------------------------------------------------

#[derive(Default)]
struct FakeIntake {
    arrivals: Mutex<Vec<Arrival>>,
    batches: Mutex<Vec<Vec<Ingest>>>,
    fail: AtomicBool,
    hang: AtomicBool,
}

impl FakeIntake {
    fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap().clone()
    }
    fn batches(&self) -> Vec<Vec<Ingest>> {
        self.batches.lock().unwrap().clone()
    }
    async fn gate(&self) -> Result<(), IntakeError> {
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(IntakeError::Store("disk on fire".into()));
        }
        Ok(())
    }
}

impl Intake for FakeIntake {
    async fn accept(&self, arrival: Arrival) -> Result<Accepted, IntakeError> {
        self.gate().await?;
        let notices = arrival.rcpts.len();
        self.arrivals.lock().unwrap().push(arrival);
        Ok(Accepted { notices })
    }
    async fn confirm(&self, events: Vec<Ingest>) -> Result<(), IntakeError> {
        self.gate().await?;
        self.batches.lock().unwrap().push(events);
        Ok(())
    }
}

// ---- server + client ---------------------------------------------------------------------

struct Server {
    addr: SocketAddr,
    intake: Arc<FakeIntake>,
    stats: Arc<StalwartStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn cfg() -> StalwartConfig {
    StalwartConfig {
        signature_key: KEY.into(),
        ..Default::default()
    }
}

async fn start(cfg: StalwartConfig) -> Server {
    let intake = Arc::new(FakeIntake::default());
    let stats = Arc::new(StalwartStats::new());
    let app = router_with_stats(intake.clone(), cfg, stats.clone());
    serve(app, intake, stats).await
}

/// The endpoints with a blocklist, zones and a delivery meter.
async fn start_with_policy(policy: Arc<Policy>, ledger: Ledger) -> Server {
    let intake = Arc::new(FakeIntake::default());
    let stats = Arc::new(StalwartStats::new());
    let app = router_with_policy(intake.clone(), cfg(), stats.clone(), policy, Some(ledger));
    serve(app, intake, stats).await
}

async fn serve(app: axum::Router, intake: Arc<FakeIntake>, stats: Arc<StalwartStats>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    Server {
        addr,
        intake,
        stats,
        task,
    }
}

struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn request_head(path: &str, headers: &[(&str, &str)], length: Option<usize>) -> String {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
    );
    match length {
        Some(n) => head.push_str(&format!("Content-Length: {n}\r\n")),
        None => head.push_str("Transfer-Encoding: chunked\r\n"),
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    head
}

async fn read_reply(mut s: TcpStream) -> Reply {
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf))
        .await
        .expect("reply in time")
        .expect("read reply");
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a full reply");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Reply {
        status,
        body: body.to_owned(),
    }
}

/// POST with a Content-Length body.
async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request_head(path, headers, Some(body.len())).as_bytes())
        .await
        .unwrap();
    s.write_all(body).await.unwrap();
    read_reply(s).await
}

/// POST with a chunked body (no Content-Length), one HTTP chunk per piece.
async fn post_chunked(addr: SocketAddr, path: &str, pieces: &[&[u8]]) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request_head(path, &[], None).as_bytes())
        .await
        .unwrap();
    for p in pieces {
        s.write_all(format!("{:x}\r\n", p.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(p).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    read_reply(s).await
}

// ---- fixtures ----------------------------------------------------------------------------

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stalwart")
}

struct Fixture {
    name: String,
    body: String,
    signature: Option<String>,
}

fn fixture(name: &str) -> Fixture {
    let path = fixtures_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    Fixture {
        name: name.to_owned(),
        body: v["body_raw"].as_str().unwrap().to_owned(),
        signature: v["signature_header"].as_str().map(str::to_owned),
    }
}

fn fixtures(prefix: &str) -> Vec<Fixture> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(prefix) && n.ends_with(".json"))
        .map(|n| n.trim_end_matches(".json").to_owned())
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no {prefix}* fixtures");
    names.iter().map(|n| fixture(n)).collect()
}

fn sign(body: &[u8]) -> String {
    use base64::Engine as _;
    let key = hmac::Key::new(hmac::HMAC_SHA256, KEY.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(hmac::sign(&key, body).as_ref())
}

async fn post_signed(addr: SocketAddr, body: &[u8]) -> Reply {
    let sig = sign(body);
    post(addr, EVENTS, &[("X-Signature", &sig)], body).await
}

// ---- MTA hook ----------------------------------------------------------------------------

#[tokio::test]
async fn every_captured_hook_stage_is_accepted() {
    let srv = start(cfg()).await;
    let hooks = fixtures("mta-hook-");
    for f in &hooks {
        let r = post(srv.addr, HOOK, &[], f.body.as_bytes()).await;
        assert_eq!(r.status, 200, "{}: {}", f.name, r.body);
        assert_eq!(
            r.json(),
            serde_json::json!({"action": "accept"}),
            "{}",
            f.name
        );
    }
    let s = srv.stats.snapshot();
    assert_eq!(s.hook_connect, 5);
    assert_eq!(s.hook_ehlo, 5);
    assert_eq!(s.hook_mail, 5);
    assert_eq!(s.hook_rcpt, 5);
    assert_eq!(s.hook_data, 4);
    assert_eq!(srv.intake.arrivals().len(), 4);
}

fn arrival_for(srv: &Server, queue_id: u64) -> Arrival {
    srv.intake
        .arrivals()
        .into_iter()
        .find(|a| a.origin == Origin::Stalwart { queue_id })
        .unwrap_or_else(|| panic!("no arrival for queue id {queue_id}"))
}

#[tokio::test]
async fn data_fixtures_give_the_right_arrivals() {
    let srv = start(cfg()).await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for name in [
        "mta-hook-data-plain",
        "mta-hook-data-chinese",
        "mta-hook-data-utf8raw",
        "mta-hook-data-serverheaders",
    ] {
        let r = post(srv.addr, HOOK, &[], fixture(name).body.as_bytes()).await;
        assert_eq!((r.status, r.body.as_str()), (200, r#"{"action":"accept"}"#));
    }
    let local = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));

    let plain = arrival_for(&srv, 0x4bf063ec5c0016e);
    assert_eq!(0x4bf063ec5c0016e_u64, 341998963378880878);
    assert!(plain.received_at_ms >= before);
    assert_eq!(
        plain,
        Arrival {
            origin: Origin::Stalwart {
                queue_id: 341998963378880878
            },
            client_ip: local,
            helo: "client.remote.example".into(),
            env_from: "carol@remote.example".into(),
            rcpts: vec!["alice@test.local".into()],
            headers: HeaderFacts {
                from_name: "Carol Sender".into(),
                from_addr: "carol@remote.example".into(),
                subject: "Plain ASCII test message".into(),
                message_id: "plain-0001@remote.example".into(),
                date_ms: Some(1795357800000),
                auth_results: Vec::new(),
            },
            size: 334,
            received_at_ms: plain.received_at_ms,
            mta_queue_id: None,
        }
    );

    let zh = arrival_for(&srv, 341998967854203758);
    assert_eq!(zh.env_from, "zhangsan@remote.example");
    assert_eq!(zh.rcpts, ["alice@test.local", "bob@test.local"]);
    assert_eq!(zh.headers.from_name, "张三");
    assert_eq!(zh.headers.from_addr, "zhangsan@remote.example");
    assert_eq!(zh.headers.subject, "新邮件到达通知测试");
    assert_eq!(zh.headers.message_id, "chinese-0002@remote.example");
    assert_eq!(zh.headers.date_ms, Some(1795357860000));
    assert_eq!(zh.size, 368);

    let raw = arrival_for(&srv, 341998976790168942);
    assert_eq!(raw.headers.from_name, "李四");
    assert_eq!(raw.headers.from_addr, "lisi@remote.example");
    assert_eq!(raw.headers.subject, "新邮件到达通知测试 (raw UTF-8)");
    assert_eq!(raw.size, 313);

    let sh = arrival_for(&srv, 341999023682488174);
    assert_eq!(
        sh.headers.subject,
        "Plain ASCII test message with server-added headers"
    );
    assert_eq!(sh.headers.message_id, "plain-hdrs-0005@remote.example");
    assert_eq!(sh.size, 257);
    assert_eq!(sh.client_ip, local);
}

#[tokio::test]
async fn chunked_body_takes_the_streaming_path() {
    let srv = start(cfg()).await;
    let body = fixture("mta-hook-data-chinese").body.into_bytes();
    let pieces: Vec<&[u8]> = body.chunks(7).collect();
    let r = post_chunked(srv.addr, HOOK, &pieces).await;
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"action":"accept"}"#));
    let a = arrival_for(&srv, 0x4bf063fd080036e);
    assert_eq!(a.headers.subject, "新邮件到达通知测试");
}

#[tokio::test]
async fn intake_error_answers_reject_451() {
    let srv = start(cfg()).await;
    srv.intake.fail.store(true, Ordering::SeqCst);
    let r = post(
        srv.addr,
        HOOK,
        &[],
        fixture("mta-hook-data-plain").body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        serde_json::from_str::<serde_json::Value>(REJECT_451).unwrap()
    );
    assert_eq!(r.json()["response"]["enhanced_status"], "4.3.0");
    // Other stages do not reach the intake and stay accepted.
    let r = post(
        srv.addr,
        HOOK,
        &[],
        fixture("mta-hook-rcpt-plain").body.as_bytes(),
    )
    .await;
    assert_eq!(r.json()["action"], "accept");
    assert_eq!(srv.stats.snapshot().hook_intake_errors, 1);
}

#[tokio::test]
async fn slow_intake_answers_reject_451() {
    let srv = start(StalwartConfig {
        intake_timeout: Duration::from_millis(50),
        ..cfg()
    })
    .await;
    srv.intake.hang.store(true, Ordering::SeqCst);
    let r = post(
        srv.addr,
        HOOK,
        &[],
        fixture("mta-hook-data-plain").body.as_bytes(),
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, REJECT_451));
}

#[tokio::test]
async fn bad_hook_requests_are_400() {
    let srv = start(cfg()).await;
    let plain = fixture("mta-hook-data-plain").body;
    let cases = [
        ("not json".to_string(), "JSON"),
        (r#"{"envelope":{}}"#.to_string(), "context"),
        (
            plain.replace(r#""queue":{"id":"4bf063ec5c0016e"},"#, ""),
            "context.queue.id",
        ),
        (
            plain.replace("4bf063ec5c0016e", "4bf063ec5c0016g"),
            "4bf063ec5c0016g",
        ),
        (plain.replace(r#","size":334"#, ""), "message.size"),
    ];
    for (body, needle) in &cases {
        assert_ne!(body, &plain);
        let r = post(srv.addr, HOOK, &[], body.as_bytes()).await;
        assert_eq!(r.status, 400, "{needle}: {}", r.body);
        assert!(r.body.contains(needle), "{needle}: {}", r.body);
    }
    assert!(srv.intake.arrivals().is_empty());
    assert_eq!(srv.stats.snapshot().hook_bad_requests, cases.len() as u64);
}

#[tokio::test]
async fn unknown_stage_and_unknown_keys_are_accepted() {
    let srv = start(cfg()).await;
    let r = post(
        srv.addr,
        HOOK,
        &[],
        br#"{"context":{"stage":"auth","sasl":{"login":"x"}},"future":{"a":[1,2]}}"#,
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"action":"accept"}"#));
    assert_eq!(srv.stats.snapshot().hook_unknown_stage, 1);
}

#[tokio::test]
async fn hook_token_is_required_when_set() {
    let srv = start(StalwartConfig {
        hook_token: Some("hook-s3cret".into()),
        ..cfg()
    })
    .await;
    let body = fixture("mta-hook-data-plain").body;
    for auth in [None, Some("Bearer wrong"), Some("Basic aG9vay1zM2NyZXQ=")] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
        let r = post(srv.addr, HOOK, &headers, body.as_bytes()).await;
        assert_eq!(r.status, 401, "{auth:?}");
    }
    assert!(srv.intake.arrivals().is_empty());
    let r = post(
        srv.addr,
        HOOK,
        &[("Authorization", "Bearer hook-s3cret")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(srv.intake.arrivals().len(), 1);
    assert_eq!(srv.stats.snapshot().hook_unauthorized, 3);
}

#[tokio::test]
async fn hook_body_over_the_limit_is_413() {
    let srv = start(StalwartConfig {
        max_hook_body: 4096,
        ..cfg()
    })
    .await;
    // Declared too large: refused before the body is read.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(request_head(HOOK, &[], Some(1 << 20)).as_bytes())
        .await
        .unwrap();
    let r = read_reply(s).await;
    assert_eq!(r.status, 413);

    // Unsized (chunked): refused once the count passes the limit.
    let head = br#"{"context":{"stage":"data"},"message":{"contents":""#;
    let filler = vec![b'a'; 4096];
    let r = post_chunked(srv.addr, HOOK, &[head, &filler, b"\"}}"]).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(srv.stats.snapshot().hook_too_large, 2);
    assert!(srv.intake.arrivals().is_empty());
}

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A ~100 MB data-stage request, written in 64 KiB pieces, is accepted with its size while the
/// server never holds it: the body streams through a bounded channel into serde_json's reader,
/// which skips `message.contents` byte by byte (IgnoredAny -> ignore_str) without copying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabyte_data_stage_is_streamed() {
    const SIZE: u64 = 100_000_000;
    let srv = start(cfg()).await;
    let head = br#"{"context":{"stage":"data","client":{"ip":"192.0.2.7","port":1,"ptr":null,"helo":"big.example","activeConnections":1},"queue":{"id":"4bf063ec5c0016e"}},"envelope":{"from":{"address":"big@remote.example"},"to":[{"address":"alice@test.local"}]},"message":{"headers":[["Subject"," Big one\r\n"],["X-Filler"," x\r\n"]],"contents":""#;
    let tail = format!(r#"","size":{SIZE},"extra":null}}}}"#);
    // Body text with the escapes Stalwart produces (CRLF, quotes, non-ASCII).
    let line =
        "Lorem ipsum dolor sit amet, \\\"quoted\\\" caf\u{e9} \\u00e9 consectetur adipiscing\\r\\n";
    let mut piece = Vec::with_capacity(64 * 1024);
    while piece.len() + line.len() <= 64 * 1024 {
        piece.extend_from_slice(line.as_bytes());
    }
    let pieces = (SIZE as usize).div_ceil(piece.len());
    let total = head.len() + pieces * piece.len() + tail.len();

    let hwm_before = vm_hwm_kib();
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(request_head(HOOK, &[], Some(total)).as_bytes())
        .await
        .unwrap();
    s.write_all(head).await.unwrap();
    for _ in 0..pieces {
        s.write_all(&piece).await.unwrap();
    }
    s.write_all(tail.as_bytes()).await.unwrap();
    let r = read_reply(s).await;
    let hwm_after = vm_hwm_kib();

    assert_eq!((r.status, r.body.as_str()), (200, r#"{"action":"accept"}"#));
    let a = arrival_for(&srv, 341998963378880878);
    assert_eq!(a.size, SIZE);
    assert_eq!(a.headers.subject, "Big one");
    assert_eq!(a.helo, "big.example");
    assert_eq!(a.client_ip, Some("192.0.2.7".parse().unwrap()));
    assert!(total > 100_000_000);
    if let (Some(before), Some(after)) = (hwm_before, hwm_after) {
        // Buffering the body would add at least its size (> 95 MiB); the bound is generous.
        let grew_mib = after.saturating_sub(before) / 1024;
        assert!(grew_mib < 48, "peak RSS grew by {grew_mib} MiB");
    }
}

// ---- webhooks ----------------------------------------------------------------------------

#[tokio::test]
async fn captured_batches_verify_and_yield_ingests() {
    let srv = start(cfg()).await;
    let mut batches = fixtures("webhook-");
    assert!(batches.len() >= 5);
    for f in &mut batches {
        let sig = f.signature.take().unwrap();
        let r = post(
            srv.addr,
            EVENTS,
            &[("X-Signature", &sig)],
            f.body.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200, "{}: {}", f.name, r.body);
    }
    let raw = srv.intake.batches();
    let queued = raw
        .iter()
        .flatten()
        .filter(|i| i.kind == IngestKind::Queued)
        .count();
    assert!(
        queued >= 4,
        "queue.queue-message events are passed on too: {queued}"
    );
    let got: Vec<Vec<Ingest>> = raw
        .into_iter()
        .map(|b| {
            b.into_iter()
                .filter(|i| i.kind != IngestKind::Queued)
                .collect::<Vec<_>>()
        })
        .filter(|b| !b.is_empty())
        .collect();
    // Batches with message-ingest events: 06, 08, 12, 28.
    assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [1, 2, 1, 1]);
    let all: Vec<&Ingest> = got.iter().flatten().collect();
    assert!(all.iter().all(|i| i.kind == IngestKind::Ham));
    assert_eq!(all[0].queue_id, Some(341998963378880878));
    assert_eq!(all[0].message_id, "plain-0001@remote.example");
    let s = srv.stats.snapshot();
    assert_eq!(s.webhook_batches, batches.len() as u64);
    assert_eq!(s.webhook_ingest_events, 5 + queued as u64);
    assert!(s.webhook_ignored_events > 20);
    assert_eq!(s.webhook_bad_signatures, 0);
}

#[tokio::test]
async fn chinese_batch_gives_two_hams_with_exact_ids() {
    let srv = start(cfg()).await;
    let f = fixture("webhook-batch-08");
    let sig = f.signature.unwrap();
    let r = post(
        srv.addr,
        EVENTS,
        &[("X-Signature", &sig)],
        f.body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    let to = vec!["alice@test.local".to_string(), "bob@test.local".to_string()];
    let ingest = |account: u64, document: u64| Ingest {
        kind: IngestKind::Ham,
        queue_id: Some(341998967854203758),
        account_id: Some(account),
        document_id: Some(document),
        message_id: "chinese-0002@remote.example".into(),
        to: to.clone(),
    };
    let mut got = srv.intake.batches();
    for b in &mut got {
        b.retain(|i| i.kind != IngestKind::Queued);
    }
    assert_eq!(got, [vec![ingest(2, 2), ingest(3, 1)]]);
    // The MTA hook's hex queue id of the same message joins with it.
    assert_eq!(
        u64::from_str_radix("4bf063fd080036e", 16).unwrap(),
        341998967854203758
    );
}

#[tokio::test]
async fn bad_missing_or_unconfigured_signature_is_401() {
    let srv = start(cfg()).await;
    let f = fixture("webhook-batch-08");
    let other = fixture("webhook-batch-06").signature.unwrap();
    let good = f.signature.clone().unwrap();
    let body = f.body.as_bytes();
    let tampered = f.body.replace("\"accountId\":3", "\"accountId\":4");
    assert_ne!(tampered, f.body);

    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [u8]);
    let cases: [Case; 5] = [
        (&[], body),
        (&[("X-Signature", &other)], body),
        (&[("X-Signature", "not base64!")], body),
        (&[("X-Signature", "")], body),
        (&[("X-Signature", &good)], tampered.as_bytes()),
    ];
    for (headers, body) in cases {
        let r = post(srv.addr, EVENTS, headers, body).await;
        assert_eq!(r.status, 401, "{headers:?}");
    }
    assert!(srv.intake.batches().is_empty());
    assert_eq!(srv.stats.snapshot().webhook_bad_signatures, 5);

    // No key configured: even a correctly signed batch is refused.
    let open = start(StalwartConfig::default()).await;
    let r = post(open.addr, EVENTS, &[("X-Signature", &good)], body).await;
    assert_eq!(r.status, 401);
    let r = post(open.addr, EVENTS, &[], body).await;
    assert_eq!(r.status, 401);
    assert!(open.intake.batches().is_empty());
}

#[tokio::test]
async fn ingest_without_queue_id_is_skipped_and_the_rest_applied() {
    let srv = start(cfg()).await;
    let body = br#"{"events":[
        {"id":"1","createdAt":"2026-11-22T14:30:15Z","type":"message-ingest.ham","data":{"accountId":2,"documentId":9,"messageId":"lost@x"}},
        {"id":"2","createdAt":"2026-11-22T14:30:15Z","type":"message-ingest.spam","data":{"queueId":18446744073709551615,"accountId":4611686018427387905,"documentId":9007199254740993,"messageId":"s@x","to":"carol@test.local"}},
        {"id":"3","createdAt":"2026-11-22T14:30:15Z","type":"something.new","data":{"queueId":1}},
        {"id":"4","createdAt":"2026-11-22T14:30:15Z","type":"message-ingest.duplicate","data":{"queueId":341998963378880878,"accountId":2,"messageId":"plain-0001@remote.example"}}
    ]}"#;
    let r = post_signed(srv.addr, body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        srv.intake.batches(),
        [vec![
            Ingest {
                kind: IngestKind::Spam,
                queue_id: Some(u64::MAX),
                account_id: Some(4611686018427387905),
                document_id: Some(9007199254740993),
                message_id: "s@x".into(),
                to: vec!["carol@test.local".into()],
            },
            Ingest {
                kind: IngestKind::Duplicate,
                queue_id: Some(341998963378880878),
                account_id: Some(2),
                document_id: None,
                message_id: "plain-0001@remote.example".into(),
                to: vec![],
            },
        ]]
    );
    let s = srv.stats.snapshot();
    assert_eq!(s.webhook_skipped_events, 1);
    assert_eq!(s.webhook_ignored_events, 1);
    assert_eq!(s.webhook_ingest_events, 2);
}

#[tokio::test]
async fn duplicated_batches_are_passed_on() {
    let srv = start(cfg()).await;
    let f = fixture("webhook-batch-06");
    let sig = f.signature.unwrap();
    for _ in 0..2 {
        let r = post(
            srv.addr,
            EVENTS,
            &[("X-Signature", &sig)],
            f.body.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let b = srv.intake.batches();
    assert_eq!(b.len(), 2);
    assert_eq!(b[0], b[1]);
}

#[tokio::test]
async fn signed_but_not_a_batch_is_400() {
    let srv = start(cfg()).await;
    for body in [&b"not json"[..], b"{}", br#"{"events":"x"}"#] {
        let r = post_signed(srv.addr, body).await;
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(body));
    }
    assert!(srv.intake.batches().is_empty());
    assert_eq!(srv.stats.snapshot().webhook_bad_requests, 3);
}

#[tokio::test]
async fn confirm_error_is_503() {
    let srv = start(cfg()).await;
    srv.intake.fail.store(true, Ordering::SeqCst);
    let f = fixture("webhook-batch-08");
    let sig = f.signature.unwrap();
    let r = post(
        srv.addr,
        EVENTS,
        &[("X-Signature", &sig)],
        f.body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 503);
    // A batch without ingest events needs no intake and succeeds.
    let f = fixture("webhook-batch-04");
    let sig = f.signature.unwrap();
    let r = post(
        srv.addr,
        EVENTS,
        &[("X-Signature", &sig)],
        f.body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(srv.stats.snapshot().webhook_confirm_errors, 1);
}

#[tokio::test]
async fn webhook_over_the_limit_is_413() {
    let srv = start(StalwartConfig {
        max_webhook_body: 1000,
        ..cfg()
    })
    .await;
    let f = fixture("webhook-batch-08");
    let sig = f.signature.unwrap();
    let r = post(
        srv.addr,
        EVENTS,
        &[("X-Signature", &sig)],
        f.body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 413);
    assert!(srv.intake.batches().is_empty());
}

// ---- blocklist, zones, delivery meter -------------------------------------------------------

/// Writes `text` to `dir/name`, for a list file.
fn list(dir: &std::path::Path, name: &str, text: &str) -> Vec<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    vec![p]
}

async fn metered(ledger: &Ledger) -> Vec<DeliveryRecord> {
    ledger
        .call(|s| s.unconsumed_deliveries(1000))
        .await
        .unwrap()
}

/// A hook fixture's body with `edit` applied.
fn edited(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_str(&fixture(name).body).unwrap();
    edit(&mut v);
    serde_json::to_vec(&v).unwrap()
}

#[tokio::test]
async fn blocklisted_sources_get_the_operators_550_at_their_stage() {
    let dir = tempfile::tempdir().unwrap();
    let text = "refused: see https://isp.example/policy";
    let block = |networks: &str, helo: &str, senders: &str| {
        // One set of files per case.
        let d = tempfile::tempdir_in(dir.path()).unwrap().keep();
        BlocklistConfig {
            networks: list(&d, "nets", networks),
            helo: list(&d, "helo", helo),
            sender_domains: list(&d, "senders", senders),
            reply: text.into(),
        }
    };
    let ledger = Ledger::open(&dir.path().join("ledger.sqlite")).unwrap();
    let cases = [
        (
            block("127.0.0.0/8\n", "", ""),
            "mta-hook-connect-blocked",
            true,
        ),
        (
            block("", "remote.example\n", ""),
            "mta-hook-ehlo-blocked",
            true,
        ),
        (
            block("", "", "blocked.example\n"),
            "mta-hook-mail-blocked",
            false,
        ),
    ];
    for (cfg, stage, disconnect) in cases {
        let policy = Arc::new(Policy::load(ZonesConfig::default(), cfg, None).unwrap());
        let srv = start_with_policy(policy.clone(), ledger.clone()).await;
        let r = post(srv.addr, HOOK, &[], fixture(stage).body.as_bytes()).await;
        assert_eq!(r.status, 200, "{stage}: {}", r.body);
        assert_eq!(
            r.json(),
            serde_json::json!({"action": "reject", "response": {
                "status": 550, "enhanced_status": "5.7.1", "message": text, "disconnect": disconnect}}),
            "{stage}"
        );
        // The earlier stages of the same session pass.
        if stage == "mta-hook-mail-blocked" {
            for ok in [
                "mta-hook-connect-blocked",
                "mta-hook-ehlo-blocked",
                "mta-hook-mail-plain",
            ] {
                let r = post(srv.addr, HOOK, &[], fixture(ok).body.as_bytes()).await;
                assert_eq!(r.json(), serde_json::json!({"action": "accept"}), "{ok}");
            }
        }
        let s = &policy.stats;
        let refused = [&s.refused_connect, &s.refused_helo, &s.refused_mail]
            .map(|c| c.load(Ordering::Relaxed));
        assert_eq!(refused.iter().sum::<u64>(), 1, "{stage}: {refused:?}");
    }
}

#[tokio::test]
async fn deliveries_are_metered_into_their_zones_once() {
    let dir = tempfile::tempdir().unwrap();
    let zones = ZonesConfig {
        free_networks: list(
            dir.path(),
            "free-nets",
            "# research network\n192.0.2.0/24\n",
        ),
        free_domains: list(dir.path(), "free-domains", "remote.example\n"),
        authserv_id: "mx.test.local".into(),
        ..ZonesConfig::default()
    };
    let policy = Arc::new(Policy::load(zones, BlocklistConfig::default(), None).unwrap());
    let ledger = Ledger::open(&dir.path().join("ledger.sqlite")).unwrap();
    let srv = start_with_policy(policy, ledger.clone()).await;

    // Three data stages of the same captured message under three queue ids: from a free
    // network; from elsewhere with the trusted MTA's spf=pass for the sender's domain; and
    // with the same claim under another authserv-id (spoofed: foreign).
    let auth = |v: &mut serde_json::Value, qid: &str, ip: &str, id: &str| {
        v["context"]["queue"]["id"] = qid.into();
        v["context"]["client"]["ip"] = ip.into();
        let h = format!(" {id}; spf=pass smtp.mailfrom=zhangsan@remote.example\r\n");
        v["message"]["headers"]
            .as_array_mut()
            .unwrap()
            .insert(0, serde_json::json!(["Authentication-Results", h]));
    };
    let stages = [
        edited("mta-hook-data-chinese", |v| {
            auth(v, "a1", "192.0.2.7", "evil.example")
        }),
        edited("mta-hook-data-chinese", |v| {
            auth(v, "a2", "203.0.113.9", "mx.test.local")
        }),
        edited("mta-hook-data-chinese", |v| {
            auth(v, "a3", "203.0.113.9", "evil.example")
        }),
    ];
    for body in &stages {
        let r = post(srv.addr, HOOK, &[], body).await;
        assert_eq!(
            r.json(),
            serde_json::json!({"action": "accept"}),
            "{}",
            r.body
        );
    }
    // Stalwart's deliveries of each (and of a message whose data stage mailbell never saw).
    let ham = |qid: u64, account: u64, size: u64| {
        serde_json::json!({"id": "1", "createdAt": "2026-11-22T14:30:15Z", "type": "message-ingest.ham",
            "data": {"accountId": account, "documentId": 1, "queueId": qid, "size": size,
                     "messageId": "<m@remote.example>", "to": ["alice@test.local"]}})
    };
    let batch = serde_json::to_vec(&serde_json::json!({"events": [
        ham(0xa1, 2, 1000), ham(0xa1, 3, 1000), ham(0xa2, 2, 2000), ham(0xa3, 2, 3000),
        ham(0xff, 2, 4000),
    ]}))
    .unwrap();
    let r = post_signed(srv.addr, &batch).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let got: Vec<_> = metered(&ledger)
        .await
        .into_iter()
        .map(|d| (d.message_key, d.account, d.zone, d.bytes))
        .collect();
    let row =
        |q: u64, a: u64, z: Zone, b: u64| (format!("stalwart:{q}"), format!("stalwart:{a}"), z, b);
    let want = vec![
        row(0xa1, 2, Zone::Free, 1000),
        row(0xa1, 3, Zone::Free, 1000),
        row(0xa2, 2, Zone::Free, 2000),
        row(0xa3, 2, Zone::Foreign, 3000),
        row(0xff, 2, Zone::Foreign, 4000),
    ];
    assert_eq!(got, want);

    // Stalwart resends the batch (and the captured one of the real message, twice): the
    // records do not change.
    let r = post_signed(srv.addr, &batch).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let s = srv.stats.snapshot();
    assert_eq!((s.delivery_records, s.delivery_replays), (5, 5));
    let f = fixture("webhook-batch-08");
    for _ in 0..2 {
        let r = post(
            srv.addr,
            EVENTS,
            &[("X-Signature", f.signature.as_deref().unwrap())],
            f.body.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let after = metered(&ledger).await;
    assert_eq!(after.len(), 7, "{after:?}");
    assert_eq!(
        after[..5].iter().map(|d| d.bytes).collect::<Vec<_>>(),
        [1000, 1000, 2000, 3000, 4000]
    );
}

/// Runs `sql` on the ledger file beside the daemon's connection (to break or mend a table).
fn ledger_sql(path: &std::path::Path, sql: &str) {
    rusqlite::Connection::open(path)
        .unwrap()
        .execute_batch(sql)
        .unwrap();
}

#[tokio::test]
async fn a_meter_failure_is_a_tempfail_and_the_resend_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let zones = ZonesConfig {
        free_networks: list(dir.path(), "free", "127.0.0.0/8\n"),
        ..Default::default()
    };
    let policy = Arc::new(Policy::load(zones, BlocklistConfig::default(), None).unwrap());
    let path = dir.path().join("ledger.sqlite");
    let ledger = Ledger::open(&path).unwrap();
    let srv = start_with_policy(policy, ledger.clone()).await;
    let data = fixture("mta-hook-data-chinese");
    let batch = fixture("webhook-batch-08");
    let sig = batch.signature.clone().unwrap();

    // The zone cannot be remembered: the data stage is answered 451, nothing is accepted.
    ledger_sql(&path, "ALTER TABLE delivery_sources RENAME TO broken");
    let r = post(srv.addr, HOOK, &[], data.body.as_bytes()).await;
    assert_eq!(r.body, REJECT_451);
    assert!(srv.intake.arrivals().is_empty());
    ledger_sql(&path, "ALTER TABLE broken RENAME TO delivery_sources");
    let r = post(srv.addr, HOOK, &[], data.body.as_bytes()).await;
    assert_eq!(r.json(), serde_json::json!({"action": "accept"}));

    // The deliveries cannot be recorded: 503, and the intake is not told either.
    ledger_sql(&path, "ALTER TABLE deliveries RENAME TO broken");
    let r = post(
        srv.addr,
        EVENTS,
        &[("X-Signature", &sig)],
        batch.body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("not metered"), "{}", r.body);
    assert!(srv.intake.batches().is_empty());
    // Stalwart resends once the store is back: both deliveries, free, once.
    ledger_sql(&path, "ALTER TABLE broken RENAME TO deliveries");
    for _ in 0..2 {
        let r = post(
            srv.addr,
            EVENTS,
            &[("X-Signature", &sig)],
            batch.body.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let rows = metered(&ledger).await;
    let got: Vec<_> = rows.iter().map(|d| (d.account.as_str(), d.zone)).collect();
    assert_eq!(
        got,
        [("stalwart:2", Zone::Free), ("stalwart:3", Zone::Free)]
    );
    assert_eq!(srv.stats.snapshot().webhook_confirm_errors, 1);
}
