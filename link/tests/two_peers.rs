//! The sender and receiver state machines driven against each other in memory, with no
//! sockets: frames are lost, duplicated, sessions cut mid-window and the receiver restarted.
//! Whatever happens, every item ends up stored exactly once and the outbox drains.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use mailbell_link::frame::{decode, Frame, DEFAULT_MAX_FRAME};
use mailbell_link::receiver::{accept_hello, Outcome, Receiver, ReceiverConfig};
use mailbell_link::sender::{check_welcome, hello, Sender, SenderConfig, SenderEvent};
use mailbell_link::NotifId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The durable outbox of the mail host: seq -> item, plus what was dead-lettered.
#[derive(Default)]
struct Outbox {
    items: BTreeMap<u64, (NotifId, Vec<u8>)>,
    dead: Vec<NotifId>,
}

/// The durable inbox of the agent: survives receiver restarts.
#[derive(Default)]
struct Inbox {
    seen: HashSet<NotifId>,
    stored: Vec<NotifId>,
}

#[derive(Clone, Copy)]
struct Faults {
    loss: f64,
    dup: f64,
    cut: f64,
    restart: f64,
    reject: f64,
}

const CLEAN: Faults = Faults {
    loss: 0.0,
    dup: 0.0,
    cut: 0.0,
    restart: 0.0,
    reject: 0.0,
};

struct Session {
    sender: Sender,
    receiver: Receiver,
    to_agent: Vec<u8>,
    to_host: Vec<u8>,
    /// Items the agent app holds before making them durable (group commit).
    storing: VecDeque<NotifId>,
}

fn open(now: Instant, scfg: &SenderConfig, rcfg: &ReceiverConfig) -> Session {
    let (welcome, window, _) = accept_hello(rcfg, hello(scfg)).unwrap();
    let neg = check_welcome(scfg, welcome).unwrap();
    Session {
        sender: Sender::new(scfg.clone(), neg, now),
        receiver: Receiver::new(rcfg.clone(), window, now),
        to_agent: Vec::new(),
        to_host: Vec::new(),
        storing: VecDeque::new(),
    }
}

/// Splits a byte stream into frames, applying loss and duplication.
fn transmit(buf: &mut Vec<u8>, rng: &mut StdRng, f: Faults) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut s = &buf[..];
    while let Some((frame, n)) = decode(s, DEFAULT_MAX_FRAME).unwrap() {
        s = &s[n..];
        if rng.gen_bool(f.loss) {
            continue;
        }
        if rng.gen_bool(f.dup) {
            out.push(frame.clone());
        }
        out.push(frame);
    }
    buf.clear();
    out
}

fn run(seed: u64, n: usize, faults: Faults) -> (Outbox, Inbox) {
    let mut rng = StdRng::seed_from_u64(seed);
    let scfg = SenderConfig {
        window: 16,
        ack_timeout: Duration::from_millis(200),
        max_resends: 5,
        heartbeat: Duration::from_secs(1),
        dead_after: Duration::from_secs(3),
        name: "test".into(),
    };
    let rcfg = ReceiverConfig::default();
    let mut outbox = Outbox::default();
    let ids: Vec<NotifId> = (0..n).map(|_| NotifId::random()).collect();
    for (seq, id) in ids.iter().enumerate() {
        outbox
            .items
            .insert(seq as u64, (*id, seq.to_be_bytes().to_vec()));
    }
    let rejected: HashSet<NotifId> = ids
        .iter()
        .filter(|_| rng.gen_bool(faults.reject))
        .copied()
        .collect();
    let mut inbox = Inbox::default();
    let mut now = Instant::now();
    let mut session = Some(open(now, &scfg, &rcfg));
    let calm_after = 4000;
    let mut drained = false;
    for step in 0..40_000 {
        let f = if step < calm_after { faults } else { CLEAN };
        now += Duration::from_millis(10);
        let s = session.get_or_insert_with(|| open(now, &scfg, &rcfg));
        // Sender: fill the window from the outbox, oldest first, skipping items in flight.
        let cap = s.sender.capacity();
        let ready: Vec<(NotifId, Vec<u8>)> = outbox
            .items
            .values()
            .filter(|(id, _)| !s.sender.is_in_flight(id))
            .take(cap)
            .cloned()
            .collect();
        for (id, p) in ready {
            s.sender.send(id, p, now, &mut s.to_agent);
        }
        if s.sender.poll(now, &mut s.to_agent).is_err() {
            session = None;
            continue;
        }
        // Receiver side.
        let mut dead = false;
        for frame in transmit(&mut s.to_agent, &mut rng, f) {
            match s.receiver.on_frame(frame, now, &mut s.to_host) {
                Ok(Some((id, _payload))) => {
                    assert!(
                        !s.storing.contains(&id),
                        "an item still being stored was handed out again"
                    );
                    s.storing.push_back(id);
                }
                Ok(None) => {}
                Err(_) => dead = true,
            }
        }
        // The app makes some of what it holds durable (one group commit), then acks it.
        let k = rng.gen_range(0..=s.storing.len());
        for _ in 0..k {
            let Some(id) = s.storing.pop_front() else {
                break;
            };
            let outcome = if rejected.contains(&id) {
                Outcome::Rejected {
                    class: mailbell_link::NackClass::Permanent,
                    retry_after: Duration::ZERO,
                    reason: "invalid phone".into(),
                }
            } else if inbox.seen.insert(id) {
                inbox.stored.push(id);
                Outcome::Stored
            } else {
                Outcome::Duplicate
            };
            s.receiver.complete(id, outcome, now, &mut s.to_host);
        }
        if s.receiver.poll(now, &mut s.to_host).is_err() {
            dead = true;
        }
        // Back to the sender.
        for frame in transmit(&mut s.to_host, &mut rng, f) {
            match s.sender.on_frame(frame, now, &mut s.to_agent) {
                Ok(Some(SenderEvent::Acked(id))) => {
                    outbox.items.retain(|_, (i, _)| *i != id);
                }
                Ok(Some(SenderEvent::DeadLetter { id, .. })) => {
                    outbox.items.retain(|_, (i, _)| *i != id);
                    outbox.dead.push(id);
                }
                Ok(Some(SenderEvent::RetryLater { .. })) | Ok(None) => {}
                Err(_) => dead = true,
            }
        }
        if dead || rng.gen_bool(f.cut) || rng.gen_bool(f.restart) {
            // A cut connection loses the bytes in flight; a receiver restart also loses the
            // items it held but had not made durable. The inbox (durable) stays.
            session = None;
        }
        if outbox.items.is_empty() && step > calm_after {
            drained = true;
            break;
        }
    }
    assert!(drained, "seed {seed}: outbox never drained");
    assert_eq!(
        inbox.stored.len() + outbox.dead.len(),
        n,
        "seed {seed}: every item stored or dead-lettered"
    );
    (outbox, inbox)
}

fn exactly_once(inbox: &Inbox, outbox: &Outbox) {
    let unique: HashSet<_> = inbox.stored.iter().collect();
    assert_eq!(unique.len(), inbox.stored.len(), "an item was stored twice");
    assert!(outbox.items.is_empty(), "outbox drained");
    for d in &outbox.dead {
        assert!(
            !inbox.seen.contains(d),
            "a dead-lettered item was also stored"
        );
    }
}

#[test]
fn clean_run_delivers_everything_once() {
    let (o, i) = run(1, 500, CLEAN);
    exactly_once(&i, &o);
    assert_eq!(i.stored.len(), 500);
}

#[test]
fn frame_loss_is_repaired_by_resend() {
    for seed in 0..10 {
        let (o, i) = run(
            seed,
            300,
            Faults {
                loss: 0.05,
                ..CLEAN
            },
        );
        exactly_once(&i, &o);
        assert_eq!(i.stored.len(), 300);
    }
}

#[test]
fn duplicated_frames_are_stored_once() {
    for seed in 0..10 {
        let (o, i) = run(seed, 300, Faults { dup: 0.2, ..CLEAN });
        exactly_once(&i, &o);
        assert_eq!(i.stored.len(), 300);
    }
}

#[test]
fn reconnect_mid_window_loses_and_duplicates_nothing() {
    for seed in 0..10 {
        let (o, i) = run(seed, 300, Faults { cut: 0.02, ..CLEAN });
        exactly_once(&i, &o);
        assert_eq!(i.stored.len(), 300);
    }
}

#[test]
fn receiver_restart_keeps_dedupe() {
    for seed in 0..10 {
        let (o, i) = run(
            seed,
            300,
            Faults {
                restart: 0.02,
                dup: 0.05,
                ..CLEAN
            },
        );
        exactly_once(&i, &o);
        assert_eq!(i.stored.len(), 300);
    }
}

#[test]
fn permanent_nacks_dead_letter_and_never_block() {
    for seed in 0..5 {
        let (o, i) = run(
            seed,
            300,
            Faults {
                reject: 0.1,
                loss: 0.02,
                cut: 0.01,
                ..CLEAN
            },
        );
        exactly_once(&i, &o);
        assert!(!o.dead.is_empty());
    }
}

#[test]
fn everything_at_once() {
    for seed in 100..110 {
        let (o, i) = run(
            seed,
            400,
            Faults {
                loss: 0.03,
                dup: 0.05,
                cut: 0.01,
                restart: 0.01,
                reject: 0.02,
            },
        );
        exactly_once(&i, &o);
    }
}
