//! Intake benchmark: messages per second through the MTA endpoints, durable before the reply,
//! and the latency each message's durable work adds at the MTA.
//!
//! ```sh
//! cargo bench -p mailbell-tests --bench intake                      # hook, then milter
//! cargo bench -p mailbell-tests --bench intake -- --mode milter --seconds 20
//! cargo bench -p mailbell-tests --bench intake -- --rate 10000      # paced, for latency
//! cargo bench -p mailbell-tests --bench intake -- --size 65536      # bigger messages
//! cargo bench -p mailbell-tests --bench intake -- --help
//! ```
//!
//! One process: `mailbell serve` (`mailbell::app::start`: sled outbox, user registry, audit
//! log, intake scheduler, Stalwart endpoints, milter) with its link pointed at a closed port,
//! so the outbox only fills. A client on its own runtime (`bench-client` threads) plays the
//! MTA over loopback: `--connections` keep-alive HTTP/1.1 connections posting Stalwart
//! data-stage hook requests, or milter connections (negotiate, connect, HELO once; then MAIL,
//! RCPT x N, headers, body, end of message per message). Each message has `--rcpts` envelope
//! recipients of which `--notify` are registered users (drawn at random from `--users`), so
//! every message stages one record with `--notify` entries; with the milter they are settled
//! into notices at once (a second group commit), with the hook they wait for Stalwart's
//! delivery confirmation.
//!
//! Phases per endpoint: a *baseline* against the same daemon before any user is registered (no
//! recipient is known, nothing is written: the protocol cost alone), then the users are
//! imported, one warm-up second, and the *measured* run. Latency is taken at the client from
//! the last byte of the request (hook) or of the end-of-message packet (milter) to the reply;
//! "whole" runs from the first byte (MAIL for the milter). "Added" is measured minus baseline
//! at the same quantile. Closed loop by default (each connection sends its next message when
//! the reply comes: the throughput figure); `--rate` paces the connections instead, which is
//! how to read added latency at a given load.
//!
//! Also printed: the outbox's group commits per second and notices per commit, the audit
//! log's events, CPU per thread name from /proc (the client's own threads included: on two
//! cores the MTA competes too), the load average and a write+fsync probe of the data
//! directory's disk at the start, since other work on the machine moves every figure.
//!
//! At the end the outbox must hold exactly `notify` x accepted messages (queued notices for the
//! milter, waiting staged entries for the hook), counted again after the daemon is stopped and
//! the store reopened; otherwise the exit status is non-zero. Speed never fails the run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use mailbell::notify::outbox::{Outbox, OutboxConfig};
use mailbell_tests::cpu::{process_cpu, thread_cpu};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{
    body_text, cpu_by_name, format_cpu, header_bytes, headers, histogram, hook_request,
    json_escape, load_average, quantiles, record, thousands, user_addr, HttpConn, MilterClient,
    MilterMessage, TICKS,
};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Hook,
    Milter,
    Both,
}

#[derive(Parser, Clone, Debug)]
#[command(
    about = "Intake benchmark: messages/s and added latency through the MTA hook and the milter"
)]
struct Args {
    /// Endpoint(s) to load.
    #[arg(long, value_enum, default_value = "both")]
    mode: Mode,
    /// Concurrent MTA connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Length of the measured run, seconds (after the warm-up); default 10, or at most an
    /// hour with `--messages`.
    #[arg(long)]
    seconds: Option<f64>,
    /// Stop the measured run after this many messages instead.
    #[arg(long)]
    messages: Option<u64>,
    /// Warm-up before the measured run, seconds (not counted).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Length of the baseline run (no registered users), seconds; 0 skips it.
    #[arg(long, default_value_t = 5.0)]
    baseline_seconds: f64,
    /// Registered users the notified recipients are drawn from.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Envelope recipients per message.
    #[arg(long, default_value_t = 10)]
    rcpts: usize,
    /// Of those, registered users (distinct) that get a notice.
    #[arg(long, default_value_t = 5)]
    notify: usize,
    /// Approximate message size in bytes (header section plus body).
    #[arg(long, default_value_t = 2048)]
    size: usize,
    /// Pace all connections together at this many messages/s (open loop) instead of sending
    /// the next message as soon as the reply comes.
    #[arg(long)]
    rate: Option<f64>,
    /// Threads of the client runtime.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Capacity of the audit log's channel (daemon default 65,536); 1 drops nearly every
    /// audit event, i.e. measures the intake without the audit writer (ablation only).
    #[arg(long)]
    audit_capacity: Option<usize>,
    /// Skip the stop-and-reopen count of the outbox at the end.
    #[arg(long)]
    no_reopen: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Hook(SocketAddr),
    Milter(SocketAddr),
}

const HOOK_PATH: &str = "/stalwart/mta-hook";
const ENV_FROM: &str = "zhang.wei@remote.example";

/// What one load phase does.
struct Phase {
    endpoint: Endpoint,
    connections: usize,
    start: Instant,
    measure_from: Instant,
    end: Instant,
    messages: Option<u64>,
    rate: Option<f64>,
    users: usize,
    rcpts: usize,
    notify: usize,
    /// The body, and the same JSON-escaped.
    body: String,
    body_json: String,
    /// Queue ids of this phase start here.
    qid_base: u64,
}

/// Counters the connections share.
#[derive(Default)]
struct Counters {
    next: AtomicU64,
    measured: AtomicU64,
}

/// What one connection saw.
struct ConnResult {
    accepted: u64,
    refused: u64,
    measured: u64,
    late: u64,
    reply: Histogram<u64>,
    whole: Histogram<u64>,
    sched: Histogram<u64>,
    last_done: Option<Instant>,
    error: Option<String>,
}

/// What a load phase saw.
struct LoadResult {
    accepted: u64,
    refused: u64,
    measured: u64,
    late: u64,
    reply: Histogram<u64>,
    whole: Histogram<u64>,
    sched: Histogram<u64>,
    /// From `measure_from` to the last measured reply.
    window: Duration,
    errors: Vec<String>,
}

impl LoadResult {
    fn rate(&self) -> f64 {
        self.measured as f64 / self.window.as_secs_f64().max(1e-9)
    }
}

enum Conn {
    Http(HttpConn),
    Milter(MilterClient),
}

/// (accepted?, started, last byte sent, reply read)
type Sent = (bool, Instant, Instant, Instant);

async fn send_one(
    conn: &mut Conn,
    p: &Phase,
    id: u64,
    rng: &mut StdRng,
    rcpts: &mut Vec<String>,
) -> anyhow::Result<Sent> {
    rcpts.clear();
    let chosen = rand::seq::index::sample(rng, p.users.max(p.notify), p.notify);
    let mut chosen = chosen.iter();
    let mut left = p.notify;
    for i in 0..p.rcpts {
        // Registered users at even positions (while they last), strangers in between.
        if left > 0 && (i % 2 == 0 || left >= p.rcpts - i) {
            left -= 1;
            rcpts.push(user_addr(chosen.next().unwrap_or(0)));
        } else {
            rcpts.push(format!("guest{}@example.org", rng.gen_range(0..1_000_000)));
        }
    }
    let qid = p.qid_base + id;
    let subject = format!("Quarterly report {id}");
    let h = headers(ENV_FROM, &rcpts[0], &subject, qid);
    match conn {
        Conn::Http(c) => {
            let size = header_bytes(&h) + p.body.len();
            let req = hook_request(qid, ENV_FROM, rcpts, &h, &p.body_json, size);
            let r = c.post(HOOK_PATH, "", &req).await?;
            let ok = r.status == 200 && r.body == br#"{"action":"accept"}"#;
            Ok((ok, r.started, r.sent, r.done))
        }
        Conn::Milter(c) => {
            let qid_text = format!("{qid:X}");
            let m = MilterMessage {
                queue_id: &qid_text,
                from: ENV_FROM,
                rcpts,
                headers: &h,
                body: p.body.as_bytes(),
            };
            let r = c.send(&m).await?;
            Ok((
                matches!(r.reply, b'a' | b'c'),
                r.started,
                r.eom_sent,
                r.done,
            ))
        }
    }
}

async fn connection(c: usize, p: Arc<Phase>, counters: Arc<Counters>) -> ConnResult {
    let mut res = ConnResult {
        accepted: 0,
        refused: 0,
        measured: 0,
        late: 0,
        reply: histogram(),
        whole: histogram(),
        sched: histogram(),
        last_done: None,
        error: None,
    };
    let conn = match p.endpoint {
        Endpoint::Hook(a) => HttpConn::connect(a).await.map(Conn::Http),
        Endpoint::Milter(a) => MilterClient::connect(a).await.map(Conn::Milter),
    };
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => {
            res.error = Some(format!("connection {c}: {e:#}"));
            return res;
        }
    };
    let mut rng = StdRng::seed_from_u64(c as u64 ^ p.qid_base);
    let mut rcpts = Vec::with_capacity(p.rcpts);
    let mut k: u64 = 0;
    loop {
        let now = Instant::now();
        if now >= p.end {
            break;
        }
        if p.messages
            .is_some_and(|m| counters.measured.load(Ordering::Relaxed) >= m)
        {
            break;
        }
        let sched = match p.rate {
            Some(rate) => {
                let n = k * p.connections as u64 + c as u64;
                let t = p.start + Duration::from_secs_f64(n as f64 / rate);
                if t >= p.end {
                    break;
                }
                if t > now {
                    tokio::time::sleep_until(t.into()).await;
                } else if now - t > Duration::from_millis(1) {
                    res.late += 1;
                }
                Some(t)
            }
            None => None,
        };
        k += 1;
        let id = counters.next.fetch_add(1, Ordering::Relaxed);
        let (ok, started, sent, done) =
            match send_one(&mut conn, &p, id, &mut rng, &mut rcpts).await {
                Ok(s) => s,
                Err(e) => {
                    res.error = Some(format!("connection {c}, message {id}: {e:#}"));
                    break;
                }
            };
        if ok {
            res.accepted += 1;
        } else {
            res.refused += 1;
        }
        if started >= p.measure_from {
            res.measured += 1;
            counters.measured.fetch_add(1, Ordering::Relaxed);
            record(&mut res.reply, done - sent);
            record(&mut res.whole, done - started);
            if let Some(t) = sched {
                record(&mut res.sched, done.saturating_duration_since(t));
            }
            res.last_done = Some(done);
        }
    }
    if let Conn::Milter(m) = conn {
        m.quit().await;
    }
    res
}

/// Runs one phase on the client runtime; returns what it saw.
async fn load(rt: &tokio::runtime::Runtime, p: Phase) -> anyhow::Result<LoadResult> {
    let p = Arc::new(p);
    let counters = Arc::new(Counters::default());
    let handles: Vec<_> = (0..p.connections)
        .map(|c| rt.spawn(connection(c, p.clone(), counters.clone())))
        .collect();
    let mut out = LoadResult {
        accepted: 0,
        refused: 0,
        measured: 0,
        late: 0,
        reply: histogram(),
        whole: histogram(),
        sched: histogram(),
        window: Duration::ZERO,
        errors: Vec::new(),
    };
    let mut last = p.measure_from;
    for h in handles {
        let r = h.await.context("client task")?;
        out.accepted += r.accepted;
        out.refused += r.refused;
        out.measured += r.measured;
        out.late += r.late;
        out.reply.add(&r.reply)?;
        out.whole.add(&r.whole)?;
        out.sched.add(&r.sched)?;
        if let Some(d) = r.last_done {
            last = last.max(d);
        }
        if let Some(e) = r.error {
            out.errors.push(e);
        }
    }
    out.window = last.saturating_duration_since(p.measure_from);
    Ok(out)
}

/// Server-side counters at one moment.
struct Snapshot {
    at: Instant,
    commits: u64,
    flushes: u64,
    apply_us: u64,
    flush_us: u64,
    messages: u64,
    notices: u64,
    audit_recorded: u64,
    audit_dropped: u64,
    audit_written: u64,
    cpu: u64,
    threads: std::collections::HashMap<(u32, String), u64>,
}

impl Snapshot {
    fn take(m: &mailbell::app::Running) -> Self {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let audit = m.stores.audit.stats();
        Snapshot {
            at: Instant::now(),
            commits: r(&m.stores.outbox.stats.commits),
            flushes: r(&m.stores.outbox.stats.flushes),
            apply_us: r(&m.stores.outbox.stats.commit_apply_us),
            flush_us: r(&m.stores.outbox.stats.commit_flush_us),
            messages: r(&m.intake.stats.messages),
            notices: r(&m.intake.stats.notices_created),
            audit_recorded: r(&audit.recorded),
            audit_dropped: r(&audit.dropped),
            audit_written: r(&audit.written),
            cpu: process_cpu(),
            threads: thread_cpu(),
        }
    }
}

fn daemon_config(dir: &Path, args: &Args) -> anyhow::Result<mailbell::config::Config> {
    // The link points at a port nobody listens on: the outbox only fills.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let text = format!(
        "[mailbell]\ndata_dir = {:?}\n\
         [listen]\nhttp = \"127.0.0.1:0\"\nmilter = \"127.0.0.1:0\"\nadmin = \"\"\n\
         [stalwart]\nsignature_key = \"bench\"\n\
         [intake]\nrate_limit_secs = 0\n\
         [outbox]\nmax_depth = 1000000000\n\
         [link]\ndev_pki_dir = {:?}\nagent = [{{ addr = \"{dead}\" }}]\n",
        dir.join("mail"),
        dir.join("pki"),
    );
    let mut cfg = mailbell::config::Config::from_toml(&text, "(bench)")?;
    if let Some(c) = args.audit_capacity {
        cfg.audit.channel_capacity = c.max(1);
    }
    cfg.milter.max_connections =
        NonZeroUsize::new(args.connections + 16).unwrap_or(NonZeroUsize::MIN);
    Ok(cfg)
}

fn phase(args: &Args, endpoint: Endpoint, warmup: f64, seconds: f64, qid_base: u64) -> Phase {
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + Duration::from_secs_f64(warmup);
    let head = 330; // about what headers() makes
    let body = body_text(args.size.saturating_sub(head));
    Phase {
        endpoint,
        connections: args.connections,
        start,
        measure_from,
        end: measure_from + Duration::from_secs_f64(seconds),
        messages: None,
        rate: args.rate,
        users: args.users,
        rcpts: args.rcpts,
        notify: args.notify,
        body_json: json_escape(&body),
        body,
        qid_base,
    }
}

fn print_latency(name: &str, l: &LoadResult, reply_label: &str, paced: bool) {
    let qs = [0.5, 0.99, 0.999, 1.0];
    println!(
        "    {name:<8} {reply_label:<18} {}",
        quantiles(&l.reply, &qs)
    );
    println!(
        "    {:<8} {:<18} {}",
        "",
        "whole message",
        quantiles(&l.whole, &qs)
    );
    if paced {
        println!(
            "    {:<8} {:<18} {}   ({} sends more than 1 ms late)",
            "",
            "from schedule",
            quantiles(&l.sched, &qs),
            l.late
        );
    }
}

fn added(base: &Histogram<u64>, m: &Histogram<u64>) -> String {
    [0.5, 0.99, 0.999]
        .iter()
        .map(|q| {
            let d = m.value_at_quantile(*q) as f64 - base.value_at_quantile(*q) as f64;
            format!(
                "p{} {:+.2}",
                (q * 100.0).to_string().trim_end_matches(".0"),
                d / 1000.0
            )
        })
        .collect::<Vec<_>>()
        .join("  ")
        + " ms"
}

async fn run_mode(
    mode: Mode,
    args: &Args,
    client: &tokio::runtime::Runtime,
) -> anyhow::Result<bool> {
    let dir = support::bench_dir()?;
    let cfg = daemon_config(dir.path(), args)?;
    let running = mailbell::app::start(cfg.clone(), CancellationToken::new())
        .await
        .context("start mailbell")?;
    let (endpoint, name, reply_label) = match mode {
        Mode::Hook => (
            Endpoint::Hook(running.http_addr.context("no HTTP listener")?),
            "Stalwart MTA hook (data stage, HTTP/1.1 keep-alive)",
            "request -> answer",
        ),
        _ => (
            Endpoint::Milter(running.milter_addr.context("no milter listener")?),
            "milter (end of message)",
            "EOM -> reply",
        ),
    };
    let pacing = match args.rate {
        Some(r) => format!("paced at {} msg/s", thousands(r)),
        None => "closed loop".into(),
    };
    println!();
    println!(
        "intake via {name}: {} connections, {pacing}, {} rcpts/message of which {} registered \
         (of {} users), ~{} B/message",
        args.connections,
        args.rcpts,
        args.notify,
        thousands(args.users as f64),
        thousands(args.size as f64)
    );
    println!(
        "  machine: {} cores, load average {} at start; disk now: 4 KiB write+fsync {}; data in {}",
        support::cores(),
        load_average(),
        support::fsync_probe(dir.path()),
        dir.path().display()
    );
    if let Some(c) = args.audit_capacity {
        println!("  audit channel capacity {c} (ablation: events beyond it are dropped)");
    }

    // Baseline: the same daemon, no registered users, so nothing is written.
    let base = if args.baseline_seconds > 0.0 {
        let b = load(
            client,
            phase(args, endpoint, 0.5, args.baseline_seconds, 1 << 40),
        )
        .await?;
        for e in &b.errors {
            println!("  baseline error: {e}");
        }
        Some(b)
    } else {
        None
    };

    let users = running.stores.users.clone();
    let n = args.users;
    let t = Instant::now();
    tokio::task::spawn_blocking(move || support::register_users(&users, n)).await??;
    let import = t.elapsed();

    let seconds = args.seconds.unwrap_or(if args.messages.is_some() {
        3600.0
    } else {
        10.0
    });
    let mut p = phase(args, endpoint, args.warmup, seconds, 2 << 40);
    p.messages = args.messages;
    let measure_from = p.measure_from;
    let running = Arc::new(running);
    let r2 = running.clone();
    let snap0 = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        Snapshot::take(&r2)
    });
    let l = load(client, p).await?;
    let snap1 = Snapshot::take(&running);
    let snap0 = snap0.await?;
    let load_end = load_average();

    let secs = l.window.as_secs_f64().max(1e-9);
    let span = snap1.at.duration_since(snap0.at).as_secs_f64().max(1e-9);
    let commits = snap1.commits - snap0.commits;
    let notices = snap1.notices - snap0.notices;
    let msgs = snap1.messages - snap0.messages;
    println!(
        "  users: {} imported in {:.2} s; load average {} at the end",
        thousands(args.users as f64),
        import.as_secs_f64(),
        load_end
    );
    if let Some(b) = &base {
        println!(
            "  baseline (no registered user: nothing durable): {} msg/s over {:.1} s",
            thousands(b.rate()),
            b.window.as_secs_f64()
        );
        print_latency("", b, reply_label, args.rate.is_some());
    }
    println!(
        "  measured: {} msg/s, {} notices/s over {secs:.1} s ({} messages; {} refused)   \
         (target >= 10,000 msg/s)",
        thousands(l.rate()),
        thousands(notices as f64 / span),
        thousands(l.measured as f64),
        l.refused
    );
    print_latency("", &l, reply_label, args.rate.is_some());
    if let Some(b) = &base {
        println!(
            "  added by durable work (measured - baseline): {}   (target p99 < 2 ms)",
            added(&b.reply, &l.reply)
        );
        println!(
            "    whole message:                            {}",
            added(&b.whole, &l.whole)
        );
    }
    println!(
        "  outbox: {} group commits/s (one journal append + fdatasync each; one per \
         {:.2} ms), {:.1} notices and {:.1} messages per commit; synced writes {}",
        thousands(commits as f64 / span),
        span * 1000.0 / commits.max(1) as f64,
        notices as f64 / commits.max(1) as f64,
        msgs as f64 / commits.max(1) as f64,
        snap1.flushes - snap0.flushes
    );
    println!(
        "  commit time: journal append + fdatasync {:.3} ms, then sled apply {:.3} ms per commit \
         on average",
        (snap1.flush_us - snap0.flush_us) as f64 / 1000.0 / commits.max(1) as f64,
        (snap1.apply_us - snap0.apply_us) as f64 / 1000.0 / commits.max(1) as f64,
    );
    println!(
        "  audit: {} events/s recorded, {} written, {} dropped (channel full)",
        thousands((snap1.audit_recorded - snap0.audit_recorded) as f64 / span),
        thousands((snap1.audit_written - snap0.audit_written) as f64 / span),
        thousands((snap1.audit_dropped - snap0.audit_dropped) as f64)
    );
    let cpu = (snap1.cpu - snap0.cpu) as f64 / TICKS;
    println!(
        "  cpu: {cpu:.2} s in {span:.1} s ({:.0}% of one core, {:.1} µs/message); by thread: {}",
        cpu / span * 100.0,
        cpu / msgs.max(1) as f64 * 1e6,
        format_cpu(&cpu_by_name(&snap0.threads, &snap1.threads))
    );
    let mut ok = true;
    for e in &l.errors {
        println!("  error: {e}");
        ok = false;
    }

    // Nothing lost: every accepted message's registered recipients are in the outbox.
    let running = Arc::into_inner(running).context("daemon still shared")?;
    running.intake.tick().await.context("intake tick")?;
    let expected = l.accepted * args.notify as u64;
    let created = running.intake.stats.notices_created.load(Ordering::Relaxed);
    let depth = running.stores.outbox.depth();
    let staged = running.stores.outbox.stats.staged.load(Ordering::Relaxed);
    let (want_depth, want_staged) = match mode {
        Mode::Hook => (0, l.accepted),
        _ => (expected, 0),
    };
    let live_ok = created == expected && depth == want_depth && staged == want_staged;
    println!(
        "  check: {} accepted x {} = {} notices; intake created {}, outbox queued {}, staged \
         records {}: {}",
        l.accepted,
        args.notify,
        expected,
        created,
        depth,
        staged,
        if live_ok { "ok" } else { "MISMATCH" }
    );
    ok &= live_ok;
    running.stop().await;
    if !args.no_reopen {
        let path = cfg.outbox_path();
        let t = Instant::now();
        let (q, entries, records) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let ob = Outbox::open(
                &path,
                OutboxConfig {
                    max_depth: u64::MAX,
                    lock_wait: Duration::from_secs(10),
                    ..OutboxConfig::default()
                },
            )?;
            let staged = ob.staged()?;
            let mut entries = 0u64;
            for r in &staged {
                let v: serde_json::Value = serde_json::from_slice(&r.value)?;
                entries += v["e"].as_array().map_or(0, |a| a.len() as u64);
            }
            let q = ob.depth();
            ob.close();
            Ok((q, entries, staged.len() as u64))
        })
        .await??;
        let reopen_ok = q + entries == expected && q == want_depth && records == want_staged;
        println!(
            "  check after stop and reopen ({:.1} s): queued {q} + staged entries {entries} \
             (in {records} records) = {}: {}",
            t.elapsed().as_secs_f64(),
            q + entries,
            if reopen_ok { "ok" } else { "MISMATCH" }
        );
        ok &= reopen_ok;
    }
    Ok(ok)
}

async fn run(args: Args) -> anyhow::Result<bool> {
    anyhow::ensure!(
        args.notify <= args.rcpts,
        "--notify must not exceed --rcpts"
    );
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .thread_name("bench-client")
        .enable_all()
        .build()?;
    let modes = match args.mode {
        Mode::Both => vec![Mode::Hook, Mode::Milter],
        m => vec![m],
    };
    let mut ok = true;
    for m in modes {
        ok &= run_mode(m, &args, &client).await?;
    }
    client.shutdown_background();
    Ok(ok)
}

fn main() -> ExitCode {
    support::default_log_filter();
    mailbell_tests::bench_main(run(Args::parse()))
}
