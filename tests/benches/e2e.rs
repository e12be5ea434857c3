//! End-to-end benchmark: from the MTA getting mailbell's "accept" to the SMS PDU at a
//! zero-latency simulated modem, under a steady open-loop load.
//!
//! ```sh
//! cargo bench -p mailbell-tests --bench e2e                          # milter, then hook
//! cargo bench -p mailbell-tests --bench e2e -- --via milter --rate 200 --seconds 20
//! cargo bench -p mailbell-tests --bench e2e -- --help
//! ```
//!
//! The whole system in one process (`mailbell_tests::system`): `mailbell serve` and a GSM
//! agent on a simulated modem (no submit delay, no per-minute or per-day pacing) over the
//! real mutual-TLS link, every store durable. Messages are sent at fixed times (`--rate` per
//! second for `--seconds`, open loop: a slow reply does not delay the next message, which
//! takes another of `--connections` MTA connections), each to one registered user (cycling
//! through `--users`, no rate limit, so no coalescing).
//!
//! - `--via milter`: a milter transaction per message; "accept" is the end-of-message reply.
//!   The notice is released at once (no confirmation wait): the clean accept -> PDU figure.
//! - `--via hook`: a Stalwart data-stage hook request, and right after its answer a signed
//!   `message-ingest.ham` webhook for the same queue id on the same connection; "accept" is
//!   the hook's answer, "confirmed" the webhook's.
//!
//! Latency ends when the simulated modem holds the complete PDU (`ReceivedPdu::at`), which
//! includes the intake's settle commit, the link round trip, the agent's durable inbox, its
//! dispatcher and the AT+CMGS dialogue. PDUs are matched to messages by the subject in the
//! SMS text. A notice missing (or sent twice) at the end fails the run; speed never does.
//!
//! A thread samples the counters of every stage each millisecond, and each run ends with
//! "where notices waited": the most notices waiting between intake and queue, on the link and
//! in the agent (stored but not yet sent), and for how long five or more did, so a tail can be
//! traced to its stage (`--stages` writes the samples, `--timeline` each message's figures).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use mailbell_tests::system::{self, System, WEBHOOK_KEY};
use support::{
    body_text, header_bytes, headers, histogram, hook_request, json_escape, load_average,
    quantiles, record, thousands, user_addr, HttpConn, MilterClient, MilterMessage,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Via {
    Milter,
    Hook,
    Both,
}

#[derive(Parser, Clone, Debug)]
#[command(about = "End-to-end benchmark: MTA accept -> PDU at a zero-latency simulated modem")]
struct Args {
    /// Path(s) the messages take.
    #[arg(long, value_enum, default_value = "both")]
    via: Via,
    /// Messages per second (open loop).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Length of each run, seconds.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Registered users the messages cycle through (one recipient per message).
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// MTA connections available to the load (a message waits for a free one).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Body size of each message, bytes.
    #[arg(long, default_value_t = 1024)]
    body: usize,
    /// How long to wait for the last PDUs after the last message, seconds.
    #[arg(long, default_value_t = 60.0)]
    drain: f64,
    /// Write one CSV line per message to this file (`<via>` is replaced by milter or hook):
    /// index, scheduled send (ms from the start), MTA wait, accept -> PDU (ms; empty if none).
    #[arg(long)]
    timeline: Option<String>,
    /// Write the stage counters behind the "where notices waited" lines, sampled each
    /// millisecond by a thread of its own, to this CSV file (time ms, runtime heartbeat lag ms,
    /// then cumulative counts: messages accepted by the intake, notices queued, outbox commits,
    /// link sent, link acked, agent received, agent stored, inbox commits, SMS sent). Times
    /// share their origin with `--timeline`. Shows which stage stops during a latency spike.
    #[arg(long)]
    stages: Option<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const ENV_FROM: &str = "zhang.wei@remote.example";

enum Conn {
    Milter(MilterClient),
    Http(HttpConn),
}

/// What the MTA side saw of one message.
struct Sent {
    i: usize,
    sched: Instant,
    started: Instant,
    accepted: Instant,
    /// The webhook's answer (hook path).
    confirmed: Option<Instant>,
}

/// The subject that identifies message `i` of a run tagged `tag` in the SMS text.
fn subject(tag: char, i: usize) -> String {
    format!("bench {tag}{i:06}")
}

/// Message index of a PDU of run `tag`, from its decoded text.
fn index_of(text: &str, tag: char) -> Option<usize> {
    let marker = format!("bench {tag}");
    let at = text.find(&marker)? + marker.len();
    text.get(at..at + 6)?.parse().ok()
}

/// Arrival times at the modem of the PDUs of run `tag`, by message index.
fn arrivals(sys: &System, tag: char) -> HashMap<usize, Vec<Instant>> {
    let mut m: HashMap<usize, Vec<Instant>> = HashMap::new();
    for p in sys.pdus() {
        let Ok((_, text)) = system::decode(&p) else {
            continue;
        };
        if let Some(i) = index_of(&text, tag) {
            m.entry(i).or_default().push(p.at);
        }
    }
    m
}

struct Run {
    tag: char,
    body: String,
    body_json: String,
    users: usize,
    hook_path: String,
    webhook_path: String,
    qid_base: u64,
}

async fn send(
    conn: &mut Conn,
    r: &Run,
    i: usize,
) -> anyhow::Result<(Instant, Instant, Option<Instant>)> {
    let rcpts = [user_addr(i % r.users)];
    let subj = subject(r.tag, i);
    let qid = r.qid_base + i as u64;
    let h = headers(ENV_FROM, &rcpts[0], &subj, qid);
    match conn {
        Conn::Milter(c) => {
            let q = format!("{qid:X}");
            let o = c
                .send(&MilterMessage {
                    queue_id: &q,
                    from: ENV_FROM,
                    rcpts: &rcpts,
                    headers: &h,
                    body: r.body.as_bytes(),
                })
                .await?;
            anyhow::ensure!(o.reply == b'a', "milter answered {:?}", char::from(o.reply));
            Ok((o.started, o.done, None))
        }
        Conn::Http(c) => {
            let size = header_bytes(&h) + r.body.len();
            let req = hook_request(qid, ENV_FROM, &rcpts, &h, &r.body_json, size);
            let a = c.post(&r.hook_path, "", &req).await?;
            anyhow::ensure!(
                a.status == 200 && a.body == br#"{"action":"accept"}"#,
                "hook answered {} {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            );
            let batch = system::ham_batch(qid, 1);
            let sig = system::sign(WEBHOOK_KEY, batch.as_bytes());
            let w = c
                .post(
                    &r.webhook_path,
                    &format!("X-Signature: {sig}\r\n"),
                    batch.as_bytes(),
                )
                .await?;
            anyhow::ensure!(w.status == 200, "webhook answered {}", w.status);
            Ok((a.started, a.done, Some(w.done)))
        }
    }
}

fn ms_between(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64() * 1000.0
}

fn print_hist(label: &str, h: &Histogram<u64>) {
    println!(
        "    {label:<28} {}",
        quantiles(h, &[0.5, 0.9, 0.99, 0.999, 1.0])
    );
}

async fn run_via(
    sys: &System,
    args: &Args,
    via: Via,
    tag: char,
    qid_base: u64,
    origin: Instant,
    sampler: &Sampler,
) -> anyhow::Result<bool> {
    let total = (args.rate * args.seconds).round() as usize;
    let body = body_text(args.body);
    let run = Arc::new(Run {
        tag,
        body_json: json_escape(&body),
        body,
        users: args.users.max(1),
        hook_path: sys.mail_config.stalwart.hook_path.clone(),
        webhook_path: sys.mail_config.stalwart.webhook_path.clone(),
        qid_base,
    });
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections.max(1) {
        conns.push(match via {
            Via::Milter => Conn::Milter(
                MilterClient::connect(sys.mail.milter_addr.context("no milter")?).await?,
            ),
            _ => Conn::Http(
                HttpConn::connect(sys.mail.http_addr.context("no HTTP endpoint")?).await?,
            ),
        });
    }
    let pool = Arc::new(Mutex::new(conns));
    let free = Arc::new(Semaphore::new(args.connections.max(1)));
    let load0 = load_average();
    let t0 = Instant::now() + Duration::from_millis(100);
    let period = 1.0 / args.rate;
    let mut set: JoinSet<anyhow::Result<Sent>> = JoinSet::new();
    for i in 0..total {
        let sched = t0 + Duration::from_secs_f64(i as f64 * period);
        tokio::time::sleep_until(sched.into()).await;
        let (run, pool, free) = (run.clone(), pool.clone(), free.clone());
        set.spawn(async move {
            let _permit = free.acquire().await?;
            let mut conn = pool.lock().unwrap().pop().context("no free connection")?;
            let r = send(&mut conn, &run, i).await;
            pool.lock().unwrap().push(conn);
            let (started, accepted, confirmed) = r.with_context(|| format!("message {i}"))?;
            Ok(Sent {
                i,
                sched,
                started,
                accepted,
                confirmed,
            })
        });
    }
    let mut sent = Vec::with_capacity(total);
    let mut errors = Vec::new();
    while let Some(r) = set.join_next().await {
        match r? {
            Ok(s) => sent.push(s),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let last_sent = Instant::now();
    // Wait for every accepted message's PDU.
    let deadline = last_sent + Duration::from_secs_f64(args.drain);
    let mut got = arrivals(sys, tag);
    while got.len() < sent.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        got = arrivals(sys, tag);
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // late duplicates
    got = arrivals(sys, tag);

    let (mut accept_pdu, mut sched_pdu, mut mta, mut confirm_pdu, mut late) = (
        histogram(),
        histogram(),
        histogram(),
        histogram(),
        histogram(),
    );
    let (mut missing, mut dups, mut before) = (0usize, 0usize, 0usize);
    let mut csv = String::from("i,sched_ms,mta_wait_ms,accept_to_pdu_ms\n");
    sent.sort_by_key(|s| s.i);
    for s in &sent {
        let pdu_ms = got.get(&s.i).map_or(String::new(), |at| {
            format!("{:.3}", ms_between(s.accepted, at[0]))
        });
        csv.push_str(&format!(
            "{},{:.3},{:.3},{pdu_ms}\n",
            s.i,
            ms_between(origin, s.sched),
            ms_between(s.started, s.accepted)
        ));
        record(&mut mta, s.accepted - s.started);
        record(&mut late, s.started.saturating_duration_since(s.sched));
        let Some(at) = got.get(&s.i) else {
            missing += 1;
            continue;
        };
        if at.len() > 1 {
            dups += 1;
        }
        let pdu = at[0];
        if pdu < s.accepted {
            before += 1;
        }
        record(&mut accept_pdu, pdu.saturating_duration_since(s.accepted));
        record(&mut sched_pdu, pdu.saturating_duration_since(s.sched));
        if let Some(c) = s.confirmed {
            record(&mut confirm_pdu, pdu.saturating_duration_since(c));
        }
    }
    if let Some(path) = &args.timeline {
        let path = path.replace("<via>", if via == Via::Milter { "milter" } else { "hook" });
        std::fs::write(&path, csv).with_context(|| format!("write {path}"))?;
    }
    let name = match via {
        Via::Milter => "milter (end of message accepted -> PDU; no confirmation wait)",
        _ => "Stalwart hook + immediate signed ham webhook (hook accepted -> PDU)",
    };
    println!();
    println!(
        "e2e via {name}: {} messages at {}/s over {:.0} s, {} connections",
        thousands(total as f64),
        args.rate,
        args.seconds,
        args.connections
    );
    println!(
        "  load average {load0} at start, {} at the end; PDUs matched {} of {} accepted \
         ({} missing, {} duplicated, {} errors)",
        load_average(),
        sent.len() - missing,
        sent.len(),
        missing,
        dups,
        errors.len()
    );
    print_hist("accept -> PDU", &accept_pdu);
    if via == Via::Hook {
        print_hist("webhook answered -> PDU", &confirm_pdu);
    }
    print_hist("scheduled send -> PDU", &sched_pdu);
    print_hist("MTA wait (first byte->reply)", &mta);
    print_hist("send lateness", &late);
    println!(
        "    target: accept -> PDU p99 < 50 ms: {}",
        if !accept_pdu.is_empty() && accept_pdu.value_at_quantile(0.99) < 50_000 {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "{}",
        sampler.summary(
            u64::try_from(t0.saturating_duration_since(origin).as_micros()).unwrap_or(0),
            micros_since(origin),
            via
        )
    );
    if before > 0 {
        println!("    note: {before} PDUs arrived before the client had read the reply");
    }
    for e in errors.iter().take(5) {
        println!("  error: {e}");
    }
    let conns = std::mem::take(&mut *pool.lock().unwrap());
    for c in conns {
        if let Conn::Milter(m) = c {
            m.quit().await;
        }
    }
    Ok(missing == 0 && dups == 0 && errors.is_empty() && sent.len() == total)
}

async fn run(args: Args) -> anyhow::Result<bool> {
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    let dir = support::bench_dir()?;
    let conns = args.connections;
    let sys = system::start(dir.path(), |m, a| {
        m.intake.rate_limit_secs = 0;
        m.outbox_max_depth = 100_000_000;
        m.milter.max_connections =
            std::num::NonZeroUsize::new(conns + 16).unwrap_or(std::num::NonZeroUsize::MIN);
        a.simulator.submit_delay = Duration::ZERO;
        a.simulator.per_minute = 0;
        a.simulator.per_day = 0;
    })
    .await?;
    let users = sys.mail.stores.users.clone();
    let n = args.users.max(1);
    tokio::task::spawn_blocking(move || support::register_users(&users, n)).await??;
    sys.wait_modems_ready(Duration::from_secs(30)).await?;
    println!(
        "e2e bench: whole system in one process (mailbell + GSM agent on a zero-latency \
         simulated modem, mTLS link, durable stores); {} cores; disk now: 4 KiB write+fsync {}; \
         data in {}",
        support::cores(),
        support::fsync_probe(dir.path()),
        dir.path().display()
    );

    // Warm-up: the link connects and the modem answers.
    let t = Instant::now();
    let c = MilterClient::connect(sys.mail.milter_addr.context("no milter")?).await?;
    let warm = Run {
        tag: 'W',
        body: body_text(200),
        body_json: String::new(),
        users: n,
        hook_path: String::new(),
        webhook_path: String::new(),
        qid_base: 1 << 40,
    };
    let mut conn = Conn::Milter(c);
    for i in 0..5 {
        send(&mut conn, &warm, i).await?;
    }
    while arrivals(&sys, 'W').len() < 5 {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(30),
            "warm-up SMS never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Conn::Milter(m) = conn {
        m.quit().await;
    }

    let vias = match args.via {
        Via::Both => vec![(Via::Milter, 'M'), (Via::Hook, 'H')],
        v => vec![(v, if v == Via::Milter { 'M' } else { 'H' })],
    };
    let origin = Instant::now();
    let sampler = Sampler::start(&sys, origin);
    let mut ok = true;
    for (k, (via, tag)) in vias.into_iter().enumerate() {
        ok &= run_via(
            &sys,
            &args,
            via,
            tag,
            (k as u64 + 2) << 40,
            origin,
            &sampler,
        )
        .await?;
    }
    let csv = sampler.finish();
    if let Some(path) = &args.stages {
        std::fs::write(path, csv).with_context(|| format!("write {path}"))?;
    }
    sys.stop().await;
    Ok(ok)
}

/// One sample: time and heartbeat lag (µs since the origin), then the counters of
/// [`STAGE_COLUMNS`].
type Sample = (u64, u64, [u64; 9]);

const STAGE_COLUMNS: &str = "messages,queued,outbox_commits,link_sent,link_acked,\
                             agent_received,agent_stored,inbox_commits,dispatched";

/// Samples the stage counters every millisecond on a thread of its own, plus the lag of a
/// heartbeat task on the runtime (a stalled runtime shows as a growing lag).
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    beat: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(sys: &System, origin: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let heartbeat = Arc::new(AtomicU64::new(0));
        let hb = heartbeat.clone();
        let beat = tokio::spawn(async move {
            loop {
                hb.store(micros_since(origin), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let intake = sys.mail.intake.stats.clone();
        let outbox = sys.mail.stores.outbox.stats.clone();
        let link = sys.mail.link_stats.clone();
        let server = sys.agent.link_stats.clone();
        let inbox = sys.agent.inbox.stats.clone();
        let dispatch = sys.agent.dispatch_stats.clone();
        let samples = Arc::new(Mutex::new(Vec::with_capacity(120_000)));
        let (st, out) = (stop.clone(), samples.clone());
        let thread = std::thread::Builder::new()
            .name("bench-sampler".into())
            .spawn(move || {
                let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
                while !st.load(Ordering::Relaxed) {
                    let now = micros_since(origin);
                    let lag = now.saturating_sub(r(&heartbeat));
                    let row = [
                        r(&intake.messages),
                        r(&intake.queued),
                        r(&outbox.commits),
                        r(&link.sent),
                        r(&link.acked),
                        r(&server.received),
                        r(&server.stored),
                        r(&inbox.commits),
                        r(&dispatch.sent),
                    ];
                    out.lock().unwrap().push((now, lag, row));
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
            .ok();
        Sampler {
            stop,
            samples,
            thread,
            beat,
        }
    }

    /// Where notices waited between `from` and `to` (µs since the origin): the largest number
    /// waiting at each stage, how long five or more waited there, and the runtime's largest
    /// heartbeat lag.
    fn summary(&self, from: u64, to: u64, via: Via) -> String {
        let samples = self.samples.lock().unwrap();
        let (mut max, mut long, mut lag) = ([0u64; 3], [0u64; 3], 0u64);
        let mut prev_t = None;
        for (t, l, c) in samples.iter().filter(|s| s.0 >= from && s.0 <= to) {
            let dt = prev_t.map_or(0, |p| t - p);
            prev_t = Some(*t);
            lag = lag.max(*l);
            let waiting = [
                c[0].saturating_sub(c[1]),
                c[1].saturating_sub(c[6]),
                c[6].saturating_sub(c[8]),
            ];
            for i in 0..3 {
                max[i] = max[i].max(waiting[i]);
                if waiting[i] >= 5 {
                    long[i] += dt;
                }
            }
        }
        let first = if via == Via::Hook {
            "intake (accepted -> queued, incl. the webhook)"
        } else {
            "intake (accepted -> queued)"
        };
        let names = [
            first,
            "link (queued -> agent stored)",
            "agent (stored -> SMS sent)",
        ];
        let mut out = format!(
            "    where notices waited (sampled every ms; runtime heartbeat lag max {:.1} ms):",
            lag as f64 / 1000.0
        );
        for i in 0..3 {
            out.push_str(&format!(
                "\n      {:<48} max {:>4} waiting, {:>6.0} ms with >= 5",
                names[i],
                max[i],
                long[i] as f64 / 1000.0
            ));
        }
        out
    }

    /// Stops sampling; the samples as CSV.
    fn finish(mut self) -> String {
        self.stop.store(true, Ordering::Relaxed);
        self.beat.abort();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut csv = format!("t_ms,runtime_lag_ms,{STAGE_COLUMNS}\n");
        for (t, l, c) in self.samples.lock().unwrap().iter() {
            csv.push_str(&format!(
                "{:.3},{:.3}",
                *t as f64 / 1000.0,
                *l as f64 / 1000.0
            ));
            for v in c {
                csv.push_str(&format!(",{v}"));
            }
            csv.push('\n');
        }
        csv
    }
}

fn micros_since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn main() -> ExitCode {
    support::default_log_filter();
    mailbell_tests::bench_main(run(Args::parse()))
}
