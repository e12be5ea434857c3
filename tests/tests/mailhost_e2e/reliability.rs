//! Reliability of the mail side, with indymilter-test playing the MTA:
//!
//! - kill -9 of `mailbell serve` at random points while mail flows, then a restart on the same
//!   ports and data: every message the MTA saw accepted reaches the modem exactly once; a
//!   message that got a tempfail or lost its connection may be missing, never doubled.
//! - the agent down for the whole run: the outbox holds every notice (also across a kill -9 of
//!   mailbell); once the agent is up, all are delivered, in arrival order per user.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::support::*;

/// No rate limit: one SMS per message, so every message can be traced to its own PDU.
const INTAKE: &str = "rate_limit_secs = 0";

fn user(k: usize) -> String {
    format!("u{k:02}@dest.example")
}

fn phone(k: usize) -> String {
    format!("+86138000100{k:02}")
}

/// Registers `n` users (English template, so a notice is one GSM 7-bit part) with the admin
/// CLI's CSV import.
fn register(mail: &Mailbell, dir: &std::path::Path, n: usize) {
    let mut csv = String::from("address,phone,language\n");
    for k in 0..n {
        csv.push_str(&format!("{},{},en\n", user(k), phone(k)));
    }
    let file = dir.join("users.csv");
    std::fs::write(&file, csv).unwrap();
    let out = mail.cli_ok(&["user", "import", file.to_str().unwrap()]);
    assert!(out.contains(&format!("added {n},")), "{out}");
}

fn subject(i: usize) -> String {
    format!("rel-{i:05}")
}

/// The message number in an SMS text ("... rel-00042 ...").
fn number_in(text: &str) -> Option<usize> {
    let at = text.find("rel-")?;
    text.get(at + 4..at + 9)?.parse().ok()
}

/// Sends message `i` for user `k` on `conn`.
async fn send_one(conn: &mut indymilter_test::TestConnection, i: usize, k: usize) -> Outcome {
    let to = format!("<{}>", user(k));
    let from_header = format!("Sender {k} <s{k}@remote.example>");
    let subj = subject(i);
    let rcpts = [to.as_str()];
    let headers = [
        ("From", from_header.as_str()),
        ("To", to.as_str()),
        ("Subject", subj.as_str()),
    ];
    milter_send(
        conn,
        &Msg {
            from: "<s@remote.example>",
            rcpts: &rcpts,
            headers: &headers,
            body: b"hello\r\n",
        },
    )
    .await
}

/// Per message number: how often it reached the modem, and at which phone.
fn tally(pdus: &[Sms]) -> HashMap<usize, (usize, String)> {
    let mut t: HashMap<usize, (usize, String)> = HashMap::new();
    for p in pdus {
        let i = number_in(&p.text)
            .unwrap_or_else(|| panic!("an SMS that is no test notice: {:?}", p.text));
        let e = t.entry(i).or_insert((0, p.destination.clone()));
        e.0 += 1;
    }
    t
}

/// Waits until mailbell has nothing staged or queued and the agent nothing queued.
async fn wait_drained(mail: &Mailbell, agent: &Agent, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let m = mail.status().await;
        let a = agent.status().await;
        if m["outbox_depth"] == 0 && m["staged"] == 0 && a.queued == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not drained after {secs} s: mailbell {m}, agent queued {}",
            a.queued
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mailbell_while_mail_flows_every_accepted_notice_exactly_once() {
    const USERS: usize = 20;
    const PRODUCERS: usize = 4;
    // A longer soak: MAILHOST_E2E_MESSAGES=20000 MAILHOST_E2E_KILLS=40
    let env = |k: &str, default: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let messages = env("MAILHOST_E2E_MESSAGES", 2000).max(100);
    let kills = env("MAILHOST_E2E_KILLS", 5).min(messages / 20);
    bins();
    let started = Instant::now();
    let scratch = Scratch::new("kill9");
    let dir = scratch.path().to_path_buf();
    let pki = dir.join("pki");
    let (agent, mail) = blocking(|| {
        let agent = Agent::start(&dir, free_addr(), &pki);
        let mail = Mailbell::start(&dir, agent.link, &pki, INTAKE);
        register(&mail, &dir, USERS);
        (agent, mail)
    });
    let milter: SocketAddr = mail.milter;

    // Kill points: message numbers, spread over the run, each at a random place.
    let mut rng = rand::thread_rng();
    let span = messages / (kills + 1);
    let kill_at: Vec<usize> = (1..=kills)
        .map(|n| n * span + rng.gen_range(0..span / 2))
        .collect();

    // Producers: each message number is taken once; the outcome is what the MTA saw.
    let next = Arc::new(AtomicUsize::new(0));
    let outcomes: Arc<Mutex<Vec<Option<Outcome>>>> = Arc::new(Mutex::new(vec![None; messages]));
    let mut producers = Vec::new();
    for _ in 0..PRODUCERS {
        let next = next.clone();
        let outcomes = outcomes.clone();
        producers.push(tokio::spawn(async move {
            let mut conn = None;
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= messages {
                    break;
                }
                let k = (i * 7 + i / USERS) % USERS;
                let outcome = loop {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match milter_open(milter).await {
                            Some(c) => conn.insert(c),
                            None => {
                                // mailbell is down: nothing of this message was sent yet.
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                        },
                    };
                    let o = send_one(c, i, k).await;
                    if matches!(o, Outcome::Broken(_)) {
                        conn = None;
                    }
                    break o;
                };
                outcomes.lock().unwrap()[i] = Some(outcome);
            }
        }));
    }

    // The killer: SIGKILL when the run reaches each kill point, restart soon after.
    let killer = {
        let next = next.clone();
        tokio::spawn(async move {
            let mut mail = mail;
            for at in kill_at {
                while next.load(Ordering::SeqCst) < at {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let jitter = rand::thread_rng().gen_range(0..30);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
                blocking(|| mail.daemon.kill9());
                let down = rand::thread_rng().gen_range(0..300);
                tokio::time::sleep(Duration::from_millis(down)).await;
                mail = tokio::task::spawn_blocking(move || {
                    mail.daemon.restart();
                    mail
                })
                .await
                .unwrap();
            }
            mail
        })
    };
    for p in producers {
        p.await.unwrap();
    }
    let mail = killer.await.unwrap();
    let fed = started.elapsed();
    let outcomes: Vec<Outcome> = outcomes
        .lock()
        .unwrap()
        .iter()
        .map(|o| o.clone().expect("every message was tried"))
        .collect();
    let accepted: Vec<usize> = (0..messages)
        .filter(|&i| outcomes[i] == Outcome::Accepted)
        .collect();
    let tempfailed = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Tempfail(_)))
        .count();
    let broken = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Broken(_)))
        .count();
    let other: Vec<_> = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Other(_)))
        .collect();
    assert!(other.is_empty(), "unexpected milter verdicts: {other:?}");
    assert!(
        accepted.len() >= messages * 9 / 10,
        "only {} of {messages} accepted ({tempfailed} tempfail, {broken} broken)",
        accepted.len()
    );

    wait_until("every accepted message's notice at the modem", 300, || {
        let t = tally(&agent.pdus());
        accepted.iter().all(|i| t.contains_key(i))
    })
    .await;
    // Anything still in flight (a notice of a broken message, a resend) settles first.
    wait_drained(&mail, &agent, 120).await;
    let t = tally(&agent.pdus());
    let missing: Vec<usize> = accepted
        .iter()
        .copied()
        .filter(|i| !t.contains_key(i))
        .collect();
    let doubled: BTreeMap<usize, usize> = t
        .iter()
        .filter(|(_, (n, _))| *n > 1)
        .map(|(i, (n, _))| (*i, *n))
        .collect();
    let wrong_phone: Vec<usize> = t
        .iter()
        .filter(|(i, (_, p))| *p != phone((*i * 7 + *i / USERS) % USERS))
        .map(|(i, _)| *i)
        .collect();
    let unaccepted_delivered = t
        .keys()
        .filter(|i| outcomes[**i] != Outcome::Accepted)
        .count();
    let a = agent.status().await;
    eprintln!(
        "kill -9 x{kills}: {messages} messages, {} accepted, {tempfailed} tempfail, {broken} broken \
         ({unaccepted_delivered} of those notified); fed in {:.1} s, all delivered after {:.1} s; \
         agent: received {}, duplicate ids {}, sent {}",
        accepted.len(),
        fed.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        a.received,
        a.duplicates,
        a.sent,
    );
    assert!(
        missing.is_empty(),
        "accepted but never notified: {missing:?}"
    );
    assert!(doubled.is_empty(), "notified more than once: {doubled:?}");
    assert!(
        wrong_phone.is_empty(),
        "sent to the wrong phone: {wrong_phone:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_down_outbox_holds_everything_then_delivers_in_arrival_order_per_user() {
    const USERS: usize = 5;
    const MESSAGES: usize = 300;
    bins();
    let started = Instant::now();
    let scratch = Scratch::new("agent-down");
    let dir = scratch.path().to_path_buf();
    let pki = dir.join("pki");
    // The agent's address is fixed now; nothing listens there until the end.
    let mut agent = Agent::configure(&dir, free_addr(), &pki);
    let mut mail = blocking(|| {
        let mail = Mailbell::start(&dir, agent.link, &pki, INTAKE);
        register(&mail, &dir, USERS);
        mail
    });

    // One MTA connection, so arrival order is the order sent.
    let mut rng = rand::thread_rng();
    let mut sent: Vec<Vec<usize>> = vec![Vec::new(); USERS];
    let mut conn = milter_open(mail.milter).await.expect("milter connection");
    for i in 0..MESSAGES {
        let k = rng.gen_range(0..USERS);
        let o = send_one(&mut conn, i, k).await;
        assert_eq!(o, Outcome::Accepted, "message {i}");
        sent[k].push(i);
    }
    drop(conn);

    // Everything is held in the outbox, as `mailbell queue list` shows.
    let queued_lines = |mail: &Mailbell| -> Vec<String> {
        blocking(|| mail.cli_ok(&["queue", "list", "--limit", "100000"]))
            .lines()
            .filter(|l| l.contains("rel-"))
            .map(str::to_owned)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = queued_lines(&mail);
    while lines.len() < MESSAGES {
        assert!(
            Instant::now() < deadline,
            "{} of {MESSAGES} notices queued",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        lines = queued_lines(&mail);
    }
    assert_eq!(lines.len(), MESSAGES);
    let status = mail.status().await;
    assert_eq!(status["outbox_depth"], MESSAGES, "{status}");
    assert!(!agent.pdu_log.exists());

    // A crash while the agent is away loses nothing either (and the CLI then reads the
    // store directly, as no daemon answers).
    blocking(|| mail.daemon.kill9());
    assert_eq!(queued_lines(&mail).len(), MESSAGES);
    blocking(|| mail.daemon.restart());
    assert_eq!(queued_lines(&mail).len(), MESSAGES);

    // The agent comes up: all delivered, in arrival order per user.
    blocking(|| agent.daemon.start());
    wait_until("every notice at the modem", 240, || {
        agent.pdus().len() >= MESSAGES
    })
    .await;
    wait_drained(&mail, &agent, 120).await;
    let pdus = agent.pdus();
    let mut got: Vec<Vec<usize>> = vec![Vec::new(); USERS];
    for p in &pdus {
        let k = (0..USERS)
            .find(|&k| phone(k) == p.destination)
            .unwrap_or_else(|| panic!("SMS to an unknown phone: {p:?}"));
        got[k].push(number_in(&p.text).expect("a test notice"));
    }
    eprintln!(
        "agent down: {MESSAGES} messages held, then delivered; {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(pdus.len(), MESSAGES, "duplicates or extras");
    for k in 0..USERS {
        assert_eq!(got[k], sent[k], "order of {}'s notices", user(k));
    }
}
