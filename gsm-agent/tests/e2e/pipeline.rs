//! Notices in over the link, SMS out at the simulated modem; the CLI; bad input.

use std::process::Command;
use std::time::Duration;

use mailbell_gsm_agent::app::{sample_notification, send_one};
use mailbell_gsm_agent::modem::pdu::Alphabet;
use mailbell_gsm_agent::sim::{SimModem, SimOptions};
use mailbell_link::memory::{MemoryOutbox, Settled};
use mailbell_link::Notification;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chinese_and_english_notices_reach_the_modem_as_pdus() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimModem::spawn(SimOptions::default()).unwrap();
    let agent = Agent::start(dir.path(), &[sim.device_path()], "");
    let outbox = MemoryOutbox::new();
    let zh = sample_notification("+8613800138000");
    let en = Notification {
        language: "en".into(),
        from_name: String::new(),
        from_addr: "carol@example.org".into(),
        subject: "Invoice [May] ready {ok}".into(),
        ..sample_notification("+447700900123")
    };
    push(&outbox, &zh);
    push(&outbox, &en);
    let client = agent.client(outbox.clone());
    wait_until("two SMS at the modem", 30, || sim.received().len() >= 2).await;
    let got = decoded(&sim);
    let zh_sms = got
        .iter()
        .find(|d| d.destination == "+8613800138000")
        .unwrap();
    assert_eq!(zh_sms.alphabet, Alphabet::Ucs2);
    assert!(zh_sms.text.contains("张伟"), "{}", zh_sms.text);
    assert!(zh_sms.text.contains("关于下周"), "{}", zh_sms.text);
    assert!(
        zh_sms.text.chars().count() <= 70,
        "one UCS-2 SMS: {}",
        zh_sms.text
    );
    let en_sms = got
        .iter()
        .find(|d| d.destination == "+447700900123")
        .unwrap();
    assert_eq!(en_sms.alphabet, Alphabet::Gsm7, "{}", en_sms.text);
    assert!(en_sms.text.contains("carol@example.org"), "{}", en_sms.text);
    assert!(
        en_sms.text.contains("Invoice [May] ready {ok}"),
        "{}",
        en_sms.text
    );
    assert_eq!(outbox.outcome(&zh.id), Some(Settled::Acked));
    // `sent` counts at the modem's answer, `queued` once the inbox has committed the removal:
    // for a moment after the second SMS the status can read sent 2, queued 1.
    let s = agent
        .status_when("2 sent and none queued", 10, |s| {
            s.sent == 2 && s.queued == 0
        })
        .await;
    assert_eq!(s.received, 2);
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_status_and_sigterm_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimModem::spawn(SimOptions::default()).unwrap();
    let mut agent = Agent::start(dir.path(), &[sim.device_path()], "");
    let out = Command::new(BIN)
        .args([
            "send-test",
            "--to",
            "+8613800138000",
            "--text",
            "mailbell test €5",
            "--config",
        ])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("accepted by the agent"));
    wait_until("test SMS", 20, || !sim.received().is_empty()).await;
    let d = &decoded(&sim)[0];
    assert_eq!(d.text, "mailbell test €5");
    assert_eq!(d.alphabet, Alphabet::Gsm7);
    let status = Command::new(BIN)
        .args(["status", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(text.contains("1 sent"), "{text}");
    assert!(text.contains("\"name\":\"m0\""), "{text}");
    // An invalid number is refused with a precise reason and a failing exit code.
    let bad = Command::new(BIN)
        .args([
            "send-test",
            "--to",
            "13800138000",
            "--text",
            "x",
            "--config",
        ])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("invalid phone number"), "{err}");
    assert!(agent.stop().success(), "clean exit on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_phone_and_empty_text_are_permanent_nacks() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimModem::spawn(SimOptions::default()).unwrap();
    let agent = Agent::start(dir.path(), &[sim.device_path()], "");
    let tls = agent.client_tls();
    let link = agent.link.to_string();
    let mut bad_phone = sample_notification("+86 138 0013 8000");
    bad_phone.text = Some("x".into());
    let e = send_one(&link, "localhost", &tls, bad_phone, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("invalid phone number"), "{e}");
    let mut empty = sample_notification("+8613800138000");
    empty.text = Some("  ".into());
    let e = send_one(&link, "localhost", &tls, empty, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("empty text"), "{e}");
    // The agent keeps serving: a good notice still goes out.
    send_one(
        &link,
        "localhost",
        &tls,
        numbered(1, "+8613800138000"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    wait_until("good SMS", 20, || sim.received().len() == 1).await;
    let s = agent.status().await;
    assert_eq!(s.rejected, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_the_right_certificate_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimModem::spawn(SimOptions::default()).unwrap();
    let agent = Agent::start(dir.path(), &[sim.device_path()], "");
    // A mail host with a certificate from another CA.
    let other = tempfile::tempdir().unwrap();
    let rogue =
        mailbell_link::pki::ensure_dev_pki(other.path(), &["localhost".into()], "mailhost", false)
            .unwrap();
    let files = mailbell_link::tls::ClientTlsFiles {
        ca: agent.pki().ca_cert,
        cert: rogue.client_cert,
        key: rogue.client_key,
    };
    let e = send_one(
        &agent.link.to_string(),
        "localhost",
        &files,
        numbered(1, "+8613800138000"),
        Duration::from_secs(3),
    )
    .await
    .unwrap_err();
    // Reported at once with the agent's TLS alert (issue 9), not after the deadline.
    assert!(e.to_string().contains("cannot reach the agent"), "{e}");
    if require_tool("openssl") {
        // No client certificate at all: TLS 1.3 "certificate required" (alert 116).
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "(printf 'x'; sleep 1) | timeout 10 openssl s_client -connect {} -CAfile {} -verify_return_error -brief 2>&1",
                agent.link,
                agent.pki().ca_cert.display()
            ))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("alert number 116") || text.contains("certificate required"),
            "{text}"
        );
    }
    assert!(agent.status().await.link_tls_failures >= 1);
    assert!(sim.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_notice_goes_out_as_a_concatenated_multipart_sms() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimModem::spawn(SimOptions::default()).unwrap();
    let agent = Agent::start(dir.path(), &[sim.device_path()], "");
    let outbox = MemoryOutbox::new();
    let long = "会议纪要：".repeat(30); // 150 Chinese characters: three UCS-2 parts of 67
    let n = Notification {
        max_parts: 3,
        text: Some(long.clone()),
        ..sample_notification("+8613800138000")
    };
    push(&outbox, &n);
    let client = agent.client(outbox.clone());
    wait_until("three parts at the modem", 30, || sim.received().len() >= 3).await;
    let parts = decoded(&sim);
    assert_eq!(parts.len(), 3);
    let refs: Vec<_> = parts
        .iter()
        .map(|p| p.concat.expect("concatenation UDH"))
        .collect();
    assert!(refs
        .iter()
        .all(|(r, total, _)| *r == refs[0].0 && *total == 3));
    let mut seqs: Vec<u8> = refs.iter().map(|(_, _, s)| *s).collect();
    seqs.sort();
    assert_eq!(seqs, vec![1, 2, 3]);
    let mut ordered = parts.clone();
    ordered.sort_by_key(|p| p.concat.map(|c| c.2));
    let joined: String = ordered.iter().map(|p| p.text.as_str()).collect();
    assert_eq!(joined, long);
    client.stop().await;
}

/// Issue 8: 700 TCP connections that never send a byte, from 100 loopback addresses, with the
/// default limits. `send-test` (a fresh mail-host session) still gets in and is acknowledged,
/// a second time too, and /metrics shows the flood in the link listener's counters. Before,
/// the flood took every session slot and `send-test` failed with `tls handshake timed out`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_gets_through_a_bare_tcp_flood_on_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimModem::spawn(SimOptions::default()).unwrap();
    let agent = Agent::start(dir.path(), &[sim.device_path()], "");
    let link = agent.link.to_string();
    let tls = agent.client_tls();
    let mut flood = Vec::new();
    for i in 0..700u32 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("127.0.0.{}:0", 2 + i % 100).parse().unwrap())
            .unwrap();
        let c = tokio::time::timeout(Duration::from_secs(10), s.connect(agent.link))
            .await
            .expect("the link listener stopped accepting")
            .unwrap();
        flood.push(c);
    }
    for round in 0..2 {
        let n = sample_notification("+8613800138000");
        send_one(&link, "localhost", &tls, n, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("send-test {round} during the flood: {e:#}"));
    }
    let metrics = mailbell_gsm_agent::app::http_get(agent.metrics, "/metrics")
        .await
        .unwrap();
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}{{listener=\"link\"}} ")))
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
            .parse()
            .unwrap()
    };
    assert!(value("mailbell_listener_connections_accepted_total") >= 702);
    assert!(value("mailbell_listener_evicted_total") > 0, "{metrics}");
    assert!(value("mailbell_listener_connections_pending") <= 128);
    let s = agent.status().await;
    assert!(
        s.link_sessions_total >= 2 && s.link_sessions_total < 10,
        "{s:?}"
    );
    drop(flood);
}

/// Issue 9 §2, `send-test` as an operator meets it: no config means the default file or a
/// message naming the options; client files are all three or none; a text over the part
/// budget is refused before "accepted"; connection refused and an untrusted agent certificate
/// are reported at once; no dev CA appears as a side effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_reports_what_is_wrong_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let send_test = |extra: &[&str]| {
        let started = std::time::Instant::now();
        let out = Command::new(BIN)
            .args(["send-test", "--to", "+8613800138000"])
            .args(extra)
            .env_remove("MAILBELL_GSM_AGENT_CONFIG")
            .env(
                "MAILBELL_GSM_AGENT_DEFAULT_CONFIG",
                dir.path().join("etc/gsm-agent.toml"),
            )
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            started.elapsed(),
        )
    };
    // No --config, no env, no default file: a message naming the options, nothing created.
    let (ok, _, err, _) = send_test(&["--text", "x"]);
    assert!(!ok);
    assert!(
        err.contains("--config") && err.contains("MAILBELL_GSM_AGENT_CONFIG"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "state in the cwd"
    );

    // A config whose dev PKI was never created: send-test does not create a CA of its own.
    let unstarted = dir.path().join("unstarted.toml");
    std::fs::write(
        &unstarted,
        format!("[agent]\ndata_dir = {:?}\n", dir.path().join("unstarted")),
    )
    .unwrap();
    let (ok, _, err, _) = send_test(&["--text", "x", "--config", unstarted.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("no dev PKI"), "{err}");
    assert!(
        !dir.path().join("unstarted").exists(),
        "a dev CA was created"
    );

    // --cert and --key without --ca are refused, not replaced by the dev PKI.
    let (ok, _, err, _) = send_test(&[
        "--text",
        "x",
        "--config",
        unstarted.to_str().unwrap(),
        "--cert",
        "c.pem",
        "--key",
        "c.key",
    ]);
    assert!(!ok && err.contains("--ca"), "{err}");

    // Connection refused: at once, with the cause.
    let other = dir.path().join("other-pki");
    let pki = Command::new(BIN)
        .args(["pki", "--dir"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(pki.status.success());
    let files = |f: &str| other.join(f).to_str().unwrap().to_owned();
    let client = [
        "--ca".to_owned(),
        files("ca.pem"),
        "--cert".to_owned(),
        files("mailhost.pem"),
        "--key".to_owned(),
        files("mailhost.key"),
    ];
    let client: Vec<&str> = client.iter().map(String::as_str).collect();
    let closed = format!("127.0.0.1:{}", free_port());
    let args = [
        &[
            "--text",
            "x",
            "--config",
            unstarted.to_str().unwrap(),
            "--agent",
            &closed,
        ][..],
        &client,
    ]
    .concat();
    let (ok, _, err, took) = send_test(&args);
    assert!(!ok);
    assert!(
        err.contains("refused") && !err.contains("no answer"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}: {err}");

    // A running agent whose certificate the given CA did not sign: at once, naming the
    // certificate.
    let sim = SimModem::spawn(SimOptions::default()).unwrap();
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let mut agent = Agent::start(&agent_dir, &[sim.device_path()], "");
    let config = agent.config.to_str().unwrap().to_owned();
    let link = agent.link.to_string();
    let args = [
        &["--text", "x", "--config", &config, "--agent", &link][..],
        &client,
    ]
    .concat();
    let (ok, _, err, took) = send_test(&args);
    assert!(!ok);
    assert!(
        err.contains("certificate") && !err.contains("no answer"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}: {err}");

    // Over the part budget (one part by default): refused before "accepted"; with
    // --max-parts 2 the same text goes out.
    let long = "x".repeat(200);
    let (ok, out, err, _) = send_test(&["--text", &long, "--config", &config]);
    assert!(!ok && !out.contains("accepted"), "{out}");
    assert!(err.contains("needs 2 sms parts"), "{err}");
    let (ok, out, err, _) = send_test(&["--text", &long, "--config", &config, "--max-parts", "2"]);
    assert!(ok, "{err}");
    assert!(out.contains("accepted by the agent"), "{out}");
    wait_until("the two-part test SMS", 20, || sim.received().len() >= 2).await;
    assert!(agent.stop().success());
}
