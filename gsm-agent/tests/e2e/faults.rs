//! Modem failures: each error class gets its own treatment, a poison number never blocks the
//! queue, a silent or vanished modem never stops the agent, and other modems keep working.

use std::time::Duration;

use mailbell_gsm_agent::sim::{Fault, SimModem, SimOptions};
use mailbell_link::memory::MemoryOutbox;

use crate::support::*;

/// Short retry delays so the tests see several attempts.
const FAST_RETRY: &str = "
[sms.retry.unknown]
base_delay = \"200ms\"
[sms.retry.transient]
base_delay = \"200ms\"
[sms.retry.modem-fault]
base_delay = \"200ms\"
[sms.retry.network-pause]
base_delay = \"200ms\"
";

fn texts(sim: &SimModem) -> Vec<String> {
    decoded(sim).into_iter().map(|d| d.text).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cms_500_and_plain_error_are_retried_and_the_message_goes_out() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimModem::spawn(SimOptions::default()).unwrap();
    let agent = Agent::start(dir.path(), &[sim.device_path()], FAST_RETRY);
    let outbox = MemoryOutbox::new();
    let client = agent.client(outbox.clone());
    sim.inject(Fault::CmsError(500));
    push(&outbox, &numbered(1, "+8613800138000"));
    wait_until("notice 1 after a +CMS ERROR: 500", 30, || {
        texts(&sim).contains(&"notice #1".to_string())
    })
    .await;
    sim.inject(Fault::PlainError);
    push(&outbox, &numbered(2, "+8613800138000"));
    wait_until("notice 2 after ERROR", 30, || {
        texts(&sim).contains(&"notice #2".to_string())
    })
    .await;
    let s = agent.status_when("2 sent", 10, |s| s.sent == 2).await;
    assert_eq!(s.failed_by_class.get("Unknown"), Some(&1), "{s:?}");
    assert_eq!(s.failed_by_class.get("Transient"), Some(&1), "{s:?}");
    assert_eq!(s.sent, 2);
    assert_eq!(s.dead_letters, 0);
    // Each went out exactly once.
    assert_eq!(texts(&sim).len(), 2);
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_number_is_dead_lettered_and_never_blocks_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimModem::spawn(SimOptions::default()).unwrap();
    sim.set_rejected_number("8613900000000");
    let agent = Agent::start(dir.path(), &[sim.device_path()], FAST_RETRY);
    let outbox = MemoryOutbox::new();
    push(&outbox, &numbered(0, "+8613900000000"));
    for i in 1..=20 {
        push(&outbox, &numbered(i, "+8613800138000"));
    }
    let client = agent.client(outbox.clone());
    wait_until("20 good notices", 60, || texts(&sim).len() >= 20).await;
    let s = agent
        .status_when("dead letter and 20 sent", 20, |s| {
            s.dead_letters == 1 && s.sent == 20
        })
        .await;
    assert_eq!(s.failed_by_class.get("Permanent"), Some(&1), "{s:?}");
    assert_eq!(s.sent, 20);
    assert!(!texts(&sim).contains(&"notice #0".to_string()));
    // The operator sees why, fixes the cause and sends it again.
    let cli = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&agent.config)
            .output()
            .unwrap()
    };
    let list = cli(&["dead-letters"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("+CMS ERROR: 21") && text.contains("+86139****0000"),
        "{text}"
    );
    // The modem saw it once (issue 9: it used to say "after 0 attempt(s)").
    assert!(text.contains("after 1 attempt(s)"), "{text}");
    let seq = text.split_whitespace().next().unwrap().to_string();
    let anon = mailbell_gsm_agent::app::http_request(
        agent.metrics,
        "POST",
        &format!("/dead-letters/requeue?seq={seq}"),
        Some("wrong"),
    )
    .await;
    assert!(anon.unwrap_err().to_string().contains("401"));
    sim.set_rejected_number("none");
    let out = cli(&["dead-letters", "--requeue", &seq]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("the requeued notice", 30, || {
        texts(&sim).contains(&"notice #0".to_string())
    })
    .await;
    assert_eq!(agent.status().await.dead_letters, 0);
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_modem_times_out_is_reinitialised_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimModem::spawn(SimOptions::default()).unwrap();
    let agent = Agent::start(dir.path(), &[sim.device_path()], FAST_RETRY);
    let outbox = MemoryOutbox::new();
    let client = agent.client(outbox.clone());
    push(&outbox, &numbered(1, "+8613800138000"));
    wait_until("first SMS", 30, || texts(&sim).len() == 1).await;
    sim.inject(Fault::Silence);
    push(&outbox, &numbered(2, "+8613800138000"));
    // The submit times out (3 s) and the modem is taken out of service to re-initialise.
    agent
        .status_when("the modem to leave the Ready state", 30, |s| {
            s.modems
                .iter()
                .any(|m| m["state"] != "Ready" || m["failed"].as_u64() > Some(0))
        })
        .await;
    assert!(!texts(&sim).contains(&"notice #2".to_string()));
    sim.clear_faults();
    wait_until("second SMS after recovery", 60, || {
        texts(&sim).contains(&"notice #2".to_string())
    })
    .await;
    agent.status_when("2 sent", 10, |s| s.sent == 2).await;
    let twos = texts(&sim).iter().filter(|t| *t == "notice #2").count();
    assert_eq!(twos, 1, "the timed-out notice went out exactly once");
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_modem_leaves_the_other_modem_working() {
    let dir = tempfile::tempdir().unwrap();
    let a = SimModem::spawn(SimOptions::default()).unwrap();
    let b = SimModem::spawn(SimOptions::default()).unwrap();
    let agent = Agent::start(dir.path(), &[a.device_path(), b.device_path()], FAST_RETRY);
    let outbox = MemoryOutbox::new();
    let client = agent.client(outbox.clone());
    // Wait until both modems are up, then pull one out.
    agent
        .status_when("both modems ready", 30, |s| {
            s.modems.len() == 2 && s.modems.iter().all(|m| m["state"] == "Ready")
        })
        .await;
    a.inject(Fault::Hangup);
    for i in 1..=30 {
        push(&outbox, &numbered(i, "+8613800138000"));
    }
    wait_until("30 SMS through the remaining modem", 90, || {
        texts(&a).len() + texts(&b).len() >= 30
    })
    .await;
    let mut all: Vec<String> = texts(&a);
    all.extend(texts(&b));
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 30, "each notice exactly once");
    let s = agent.status().await;
    let m0 = s.modems.iter().find(|m| m["name"] == "m0").unwrap();
    assert_ne!(m0["state"], "Ready", "{m0}");
    client.stop().await;
    drop(agent);
    tokio::time::sleep(Duration::from_millis(10)).await;
}
