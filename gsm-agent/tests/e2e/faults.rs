//! Modem failures: each error class gets its own treatment, a poison number never blocks the
//! queue, a silent or vanished modem never stops the agent, and other modems keep working.

use std::time::Duration;

use mailbell_gsm_agent::sim::{Broken, Fault, SimModem, SimOptions};
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

// ---- one broken modem among healthy ones (issue 10: blame the modem, not the message) -----

/// Starts `healthy + 1` modems (m0 breaks `how` from its 2nd submit), sends `n` notices and
/// checks that every one went out exactly once, none was dead-lettered, every healthy modem
/// took a share, and m0 was given only a handful once broken.
async fn one_broken_modem(how: Broken, healthy: usize, n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let sims: Vec<SimModem> = (0..=healthy)
        .map(|_| SimModem::spawn(SimOptions::default()).unwrap())
        .collect();
    let paths: Vec<&std::path::Path> = sims.iter().map(|s| s.device_path()).collect();
    let agent = Agent::start(dir.path(), &paths, FAST_RETRY);
    agent
        .status_when("every modem ready", 30, |s| {
            s.modems.len() == sims.len() && s.modems.iter().all(|m| m["state"] == "Ready")
        })
        .await;
    sims[0].inject(Fault::BrokenFrom { from: 2, how });
    let outbox = MemoryOutbox::new();
    for i in 0..n {
        push(&outbox, &numbered(i, "+8613800138000"));
    }
    let client = agent.client(outbox.clone());
    let all = || -> Vec<String> { sims.iter().flat_map(texts).collect() };
    wait_until(&format!("{n} notices with m0 broken ({how:?})"), 90, || {
        all().len() >= n
    })
    .await;
    let s = agent
        .status_when("every notice sent and recorded", 20, |s| {
            s.sent == n as u64 && s.queued == 0
        })
        .await;
    let mut got = all();
    got.sort();
    got.dedup();
    assert_eq!(got.len(), n, "each notice exactly once ({how:?})");
    assert_eq!(all().len(), n, "no duplicates ({how:?})");
    assert_eq!(s.dead_letters, 0, "{s:?}");
    assert_eq!(s.queued, 0, "{s:?}");
    // m0 sent its first one, then was given a handful before the pool gave up on it
    assert!(texts(&sims[0]).len() <= 1, "{how:?}");
    assert!(
        sims[0].submits() <= 6,
        "m0 was given {} submits after breaking ({how:?})",
        sims[0].submits()
    );
    // the healthy modems shared the rest: none below a quarter of an even share
    let share = n / healthy;
    for (i, sim) in sims.iter().enumerate().skip(1) {
        let k = texts(sim).len();
        assert!(k * 4 >= share, "m{i} sent {k} of {n} ({how:?})");
    }
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_modem_answering_cms_500_to_every_submit_loses_nothing() {
    one_broken_modem(Broken::Cms(500), 4, 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_modem_answering_error_to_every_submit_loses_nothing() {
    one_broken_modem(Broken::PlainError, 4, 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_modem_falling_silent_mid_submit_loses_nothing() {
    one_broken_modem(Broken::Silence, 4, 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_modem_answering_garbage_loses_nothing() {
    one_broken_modem(Broken::Garbage, 4, 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_modem_vanishing_mid_submit_loses_nothing() {
    one_broken_modem(Broken::Vanish, 4, 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_modem_raises_its_alarm_and_the_status_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let sims: Vec<SimModem> = (0..3)
        .map(|_| SimModem::spawn(SimOptions::default()).unwrap())
        .collect();
    let paths: Vec<&std::path::Path> = sims.iter().map(|s| s.device_path()).collect();
    let agent = Agent::start(dir.path(), &paths, FAST_RETRY);
    agent
        .status_when("every modem ready", 30, |s| {
            s.modems.iter().filter(|m| m["state"] == "Ready").count() == 3
        })
        .await;
    sims[0].inject(Fault::BrokenFrom {
        from: 1,
        how: Broken::Cms(500),
    });
    let outbox = MemoryOutbox::new();
    for i in 0..20 {
        push(&outbox, &numbered(i, "+8613800138000"));
    }
    let client = agent.client(outbox.clone());
    let s = agent
        .status_when("20 sent", 60, |s| s.sent == 20 && s.queued == 0)
        .await;
    let m0 = &s.modems[0];
    assert_eq!(m0["alarm"], true, "{m0}");
    assert!(m0["cooling_down_s"].as_u64() > Some(0), "{m0}");
    // 3 in a row once another modem has sent since the run began (a few more if m0 failed
    // its first ones before any other modem had finished a submit)
    let streak = m0["failure_streak"].as_u64().unwrap();
    assert!((3..=5).contains(&streak), "{m0}");
    assert_eq!(s.modems[1]["alarm"], false);
    // no notice paid for m0's failures: nothing was retried later, nothing dead
    assert_eq!((s.retried, s.dead_letters), (0, 0), "{s:?}");
    // the pool sent each through another modem at once: the dispatcher saw no failure,
    // the modem's own counter has them
    assert!(s.failed_by_class.is_empty(), "{s:?}");
    assert_eq!(m0["failed"].as_u64(), Some(streak), "{m0}");
    assert_eq!(sims[0].submits(), streak);
    let metrics = mailbell_gsm_agent::app::http_request(agent.metrics, "GET", "/metrics", None)
        .await
        .unwrap();
    assert!(
        metrics.contains("mailbell_modem_alarm{modem=\"m0\"} 1")
            && metrics.contains("mailbell_modem_alarm{modem=\"m1\"} 0"),
        "{metrics}"
    );
    let log = std::fs::read_to_string(dir.path().join("agent-1.log")).unwrap();
    assert!(
        log.contains("ERROR") && log.contains("3 submits in a row"),
        "no alarm in the log"
    );
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_failing_on_two_modems_is_charged_one_on_one_modem_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        SimModem::spawn(SimOptions::default()).unwrap(),
        SimModem::spawn(SimOptions::default()).unwrap(),
    );
    // one attempt per notice: a charged failure dead-letters it at once
    let extra = format!("{FAST_RETRY}[sms]\nmax_attempts = 1\n");
    let agent = Agent::start(dir.path(), &[a.device_path(), b.device_path()], &extra);
    agent
        .status_when("both ready", 30, |s| {
            s.modems.iter().filter(|m| m["state"] == "Ready").count() == 2
        })
        .await;
    a.inject(Fault::CmsError(41));
    b.inject(Fault::CmsError(41));
    let outbox = MemoryOutbox::new();
    push(&outbox, &numbered(0, "+8613800138000"));
    let client = agent.client(outbox.clone());
    let s = agent
        .status_when("the first notice dead", 30, |s| s.dead_letters == 1)
        .await;
    assert_eq!(s.failed_by_class.get("Transient"), Some(&2), "{s:?}");
    // now only a fails (every submit): the notices it fails go out through b, uncharged
    a.inject(Fault::BrokenFrom {
        from: 1,
        how: Broken::Cms(41),
    });
    for i in 1..=6 {
        push(&outbox, &numbered(i, "+8613800138000"));
    }
    let s = agent
        .status_when("6 sent", 30, |s| s.sent == 6 && s.queued == 0)
        .await;
    assert_eq!(s.dead_letters, 1, "{s:?}");
    assert!(a.submits() >= 2, "a was tried again");
    assert_eq!(texts(&b).len(), 6);
    let list = std::process::Command::new(BIN)
        .args(["dead-letters", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("+CMS ERROR: 41") && text.contains("after 1 attempt(s)"),
        "{text}"
    );
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_notice_beside_a_broken_modem_still_dead_letters_after_its_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let sims: Vec<SimModem> = (0..3)
        .map(|_| SimModem::spawn(SimOptions::default()).unwrap())
        .collect();
    // m0 answers CMS 500 to everything; the two others only to the poison number
    for s in &sims[1..] {
        s.set_rejected_number_with("8613900000000", 500);
    }
    let paths: Vec<&std::path::Path> = sims.iter().map(|s| s.device_path()).collect();
    let agent = Agent::start(dir.path(), &paths, FAST_RETRY);
    agent
        .status_when("every modem ready", 30, |s| {
            s.modems.iter().filter(|m| m["state"] == "Ready").count() == 3
        })
        .await;
    sims[0].inject(Fault::BrokenFrom {
        from: 1,
        how: Broken::Cms(500),
    });
    let outbox = MemoryOutbox::new();
    push(&outbox, &numbered(0, "+8613900000000"));
    for i in 1..=20 {
        push(&outbox, &numbered(i, "+8613800138000"));
    }
    let client = agent.client(outbox.clone());
    let s = agent
        .status_when("20 sent and the poison dead", 60, |s| {
            s.sent == 20 && s.dead_letters == 1 && s.queued == 0
        })
        .await;
    assert_eq!(s.queued, 0, "{s:?}");
    let all: Vec<String> = sims.iter().flat_map(texts).collect();
    assert_eq!(all.len(), 20);
    assert!(!all.contains(&"notice #0".to_string()));
    let list = std::process::Command::new(BIN)
        .args(["dead-letters", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("+CMS ERROR: 500") && text.contains("after 3 attempt(s)"),
        "{text}"
    );
    client.stop().await;
}
