//! Real-MTA benchmark: how fast a real Postfix (milter) and a real Stalwart (MTA hook +
//! webhook, the shipped stanza) accept mail with mailbell in the loop, beside the same MTA
//! alone, fed by Postfix's `smtp-source`.
//!
//! ```text
//! cargo run --release -p mailbell-tests --bin bench_mta -- [--mta postfix|stalwart|all]
//!     [--messages 1000] [--sessions 1,20] [--size 4096] [--timeout 300]
//!     [--agent during|after] [--unregistered] [--null-milter] [--repeat N]
//! ```
//!
//! One process holds the whole mail side (`mailbell_tests::system`: `mailbell serve` and a GSM
//! agent on a zero-delay simulated modem over the real mutual-TLS link, every store durable)
//! with five registered users, `bench@<domain>` and `2bench@` .. `5bench@<domain>` (the
//! recipients smtp-source `-t bench@<domain> -r 5` sends to), no rate limit. For each MTA two instances run on loopback:
//! one alone, one with mailbell (Postfix: `smtpd_milters`, `milter_default_action = tempfail`;
//! Stalwart: the shipped `config/stalwart/mailbell-0.15.toml` stanza). For each `--sessions`
//! count, `smtp-source -s S -m N -l SIZE -r 5` runs against the instance alone, then against
//! the one with mailbell (a new SMTP session per message, as smtp-source does without `-d`).
//!
//! With `--agent after` the mail side's link goes through a relay that is held shut while
//! smtp-source runs: the notices wait in mailbell's durable outbox and the agent takes them
//! afterwards, as an agent on its own modem host would not compete for the mail host's cores.
//!
//! Printed per session count: messages per second accepted alone and with mailbell (messages /
//! smtp-source's wall time), their ratio, and the milliseconds mailbell adds per message
//! (1000/rate_with − 1000/rate_alone; meaningful at 1 session, where messages do not overlap),
//! and the CPU time this process (mailbell, the agent and its simulated modem: everything a
//! notice costs on this machine, down to its SMS) spent per message.
//! After each run the benchmark waits until every copy is in its mailbox (Postfix: the virtual
//! Maildir; Stalwart: IMAP STATUS of each account) and, with mailbell, until every recipient's
//! notice was created and its SMS reached the simulated modem. A lost or extra message, notice
//! or SMS fails the run (exit status 1); speed never does.
//!
//! Postfix needs root, `postfix`, `smtp-source`, `script` and `chown`; Stalwart needs a
//! `stalwart` binary (`$STALWART_BIN`, PATH or `~/.cargo/bin`): a missing one is reported and
//! skipped. Everything listens on 127.0.0.1; every child process is killed when the benchmark
//! ends, fails, panics or gets Ctrl-C. `--keep` keeps the scratch directory (logs, config).
//! Results: docs/benchmarks.md, "Real MTAs".

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::{Parser, ValueEnum};
use mailbell::config::MilterListen;
use mailbell::users::User;
use mailbell_tests::cpu::{load_average, process_cpu, sched_delta, thread_sched, Sched};
use mailbell_tests::null_milter::NullMilter;
use mailbell_tests::postfix::{self, Postfix};
use mailbell_tests::stalwart::{self, Stalwart, HOOK_TOKEN};
use mailbell_tests::system::{self, System};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mta {
    Postfix,
    Stalwart,
    All,
}

/// When the GSM agent takes the notices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum AgentMode {
    /// While the MTA takes the mail: the agent, its inbox and the simulated modem compete
    /// with the MTA and mailbell for this machine's cores.
    During,
    /// After each timed run: the link is held shut while smtp-source runs (the mail side keeps
    /// the notices in its durable outbox), then opened, and the run waits for every SMS. The
    /// rates then show what mailbell costs the MTA on its own host, as with the agent on the
    /// modem host the design puts it on.
    After,
}

#[derive(Parser, Debug)]
#[command(about = "Real Postfix / Stalwart fed by smtp-source, alone and with mailbell")]
struct Args {
    /// Which MTA to run.
    #[arg(long, value_enum, default_value = "all")]
    mta: Mta,
    /// Messages per run (each to the five registered users).
    #[arg(long, default_value_t = 1000)]
    messages: usize,
    /// Parallel SMTP sessions, one run each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,20")]
    sessions: Vec<usize>,
    /// Payload bytes of each message (smtp-source -l; headers not included).
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Longest run (smtp-source, then the wait for mailboxes and SMS), seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Keep the scratch directory (configs and logs of every peer) and print its path.
    #[arg(long)]
    keep: bool,
    /// Runs of each session count, alone and with mailbell taking turns; with more than one,
    /// the medians are printed too.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Send to recipients nobody registered (`nobody@`, `2nobody@` ..): mailbell's milter or
    /// hook still sees every message but creates no notice and writes nothing, so the "with
    /// mailbell" rate is the MTA's own cost of calling out, the floor under mailbell's.
    #[arg(long)]
    unregistered: bool,
    /// Postfix only: a third instance calls a milter that does nothing
    /// (`mailbell_tests::null_milter`: mailbell's negotiation, accept at end of message, a
    /// thread per connection), taking turns with the other two: the most of Postfix's rate
    /// any milter can keep on this machine, and mailbell's rate against it.
    #[arg(long)]
    null_milter: bool,
    /// When the agent takes the notices of a timed run with mailbell.
    #[arg(long, value_enum, default_value = "during")]
    agent: AgentMode,
    /// Put the mail side's state (outbox, journal, audit, users) in a fresh directory under
    /// this one instead of beside the MTAs' queues: a separate disk, or tmpfs to see what the
    /// shared disk's fsyncs cost.
    #[arg(long)]
    mailbell_dir: Option<std::path::PathBuf>,
    /// How Postfix reaches mailbell's milter: a Unix-domain socket (`unix:`, the set-up
    /// docs/operations.md recommends for a milter on the MTA's host) or loopback TCP (`inet:`).
    #[arg(long, value_enum, default_value = "unix")]
    milter_socket: MilterSocket,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum MilterSocket {
    Unix,
    Inet,
}

/// Registered users, and smtp-source's recipients per message (`-r`).
const USERS: usize = 5;
/// The sender of every message.
const SENDER: &str = "sender@remote.example";
/// Pause after `sync` before each timed run.
const SETTLE: Duration = Duration::from_secs(1);

/// Messages each instance takes before the timed runs (processes forked, caches warm).
const WARMUP: usize = 400;

fn main() -> ExitCode {
    let args = Args::parse();
    mailbell_tests::bench_main(async move {
        tokio::select! {
            r = run(args) => r,
            r = interrupted() => {
                r?;
                bail!("interrupted; every peer stopped")
            }
        }
    })
}

/// Ctrl-C or SIGTERM (`timeout`, a CI job's cancel): the run is dropped, so are its guards.
async fn interrupted() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C"),
        _ = term.recv() => Ok(()),
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    ensure!(args.messages > 0, "--messages must be at least 1");
    ensure!(args.repeat > 0, "--repeat must be at least 1");
    ensure!(
        !args.sessions.is_empty() && args.sessions.iter().all(|s| *s > 0),
        "--sessions must list positive counts"
    );
    let scratch = tempfile::Builder::new()
        .prefix("bench-mta-")
        .tempdir()
        .context("scratch directory")?;
    let dir = scratch.path();
    // Postfix's daemons run as postfix/nobody and must reach their directories below this one.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let mail_scratch = match &args.mailbell_dir {
        Some(parent) => Some(
            tempfile::Builder::new()
                .prefix("bench-mta-mailbell-")
                .tempdir_in(parent)
                .with_context(|| format!("--mailbell-dir {}", parent.display()))?,
        ),
        None => None,
    };
    let mail_dir = mail_scratch.as_ref().map_or(dir, |d| d.path());
    let r = run_in(&args, dir, mail_dir).await;
    if args.keep {
        eprintln!("scratch kept in {}", scratch.keep().display());
    }
    r
}

async fn run_in(args: &Args, dir: &Path, mail_dir: &Path) -> anyhow::Result<bool> {
    let max_sessions = args.sessions.iter().copied().max().unwrap_or(1);
    let gate = LinkGate::bind().await?;
    let milter_socket = dir.join("milter.sock");
    let sys = system::start_via(
        mail_dir,
        |m, a| {
            if args.milter_socket == MilterSocket::Unix {
                m.milter_listen = Some(MilterListen::Unix(milter_socket));
                // Postfix's smtpd and cleanup run as the user postfix.
                m.milter.socket_group = Some("postfix".into());
            }
            // Reconnect at once when the gate opens.
            m.link.backoff_min = Duration::from_millis(50);
            m.link.backoff_max = Duration::from_millis(200);
            m.intake.rate_limit_secs = 0;
            m.intake.confirm_timeout_secs = 600;
            m.stalwart.hook_token = Some(HOOK_TOKEN.into());
            m.milter.max_connections = std::num::NonZeroUsize::new(max_sessions + 16)
                .unwrap_or(std::num::NonZeroUsize::MIN);
            a.simulator.submit_delay = Duration::ZERO;
            a.simulator.per_minute = 0;
            a.simulator.per_day = 0;
        },
        |agent| match args.agent {
            // Only this mode needs the gate; the other links the mail side straight to it.
            AgentMode::After => gate.forward_to(agent),
            AgentMode::During => agent,
        },
    )
    .await?;
    let r = async {
        sys.wait_modems_ready(Duration::from_secs(30)).await?;
        println!(
            "bench_mta: {} messages of {} B payload per run, each to {USERS} {} users; \
             mailbell + agent on a zero-delay simulated modem in this process, the agent \
             taking the notices {}; {} cores, \
             load average {}; disk: 4 KiB write+fsync {} (mailbell commits each message's \
             notices before it answers the MTA)",
            args.messages,
            args.size,
            if args.unregistered {
                "unregistered"
            } else {
                "registered"
            },
            match args.agent {
                AgentMode::During => "during each run",
                AgentMode::After => "after each run (link held shut while smtp-source runs)",
            },
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            load_average(),
            fsync_probe(mail_dir),
        );
        let mut ok = true;
        if matches!(args.mta, Mta::Postfix | Mta::All) {
            ok &= bench_postfix(args, dir, &sys, &gate).await?;
        }
        if matches!(args.mta, Mta::Stalwart | Mta::All) {
            ok &= bench_stalwart(args, dir, &sys, &gate).await?;
        }
        Ok(ok)
    }
    .await;
    sys.stop().await;
    r
}

/// The five registered users' addresses at `domain`, as smtp-source `-t bench@domain -r 5`
/// names its recipients: the address itself, then `2bench@` .. `5bench@`.
fn users(domain: &str) -> Vec<String> {
    mailboxes("bench", domain)
}

/// smtp-source's recipients for `-t LOCAL@domain -r 5`: `LOCAL@`, then `2LOCAL@` .. `5LOCAL@`.
fn mailboxes(local: &str, domain: &str) -> Vec<String> {
    (1..=USERS)
        .map(|i| match i {
            1 => format!("{local}@{domain}"),
            _ => format!("{i}{local}@{domain}"),
        })
        .collect()
}

/// The local part smtp-source sends to: registered users, or with `--unregistered` mailboxes
/// nobody registered with mailbell.
fn rcpt_local(args: &Args) -> &'static str {
    if args.unregistered {
        "nobody"
    } else {
        "bench"
    }
}

fn register(sys: &System, domain: &str) -> anyhow::Result<()> {
    for (i, addr) in users(domain).into_iter().enumerate() {
        let mut u = User::new(&addr);
        u.phone = format!("+861380013800{i}");
        u.language = "en".into();
        sys.mail.stores.users.upsert(u)?;
    }
    Ok(())
}

// ---- the MTAs -------------------------------------------------------------------------------

/// One MTA instance under test.
enum Peer {
    Postfix(Postfix),
    Stalwart(Stalwart),
}

impl Peer {
    fn smtp(&self) -> SocketAddr {
        match self {
            Peer::Postfix(p) => p.smtp,
            Peer::Stalwart(s) => s.smtp,
        }
    }

    /// Copies delivered to the recipients' mailboxes so far.
    async fn delivered(&self, local: &str, domain: &str) -> anyhow::Result<u64> {
        match self {
            Peer::Postfix(p) => Ok(p.delivered() as u64),
            Peer::Stalwart(s) => {
                let mut n = 0;
                for u in mailboxes(local, domain) {
                    n += s.inbox_count(&u).await?;
                }
                Ok(n)
            }
        }
    }
}

/// Is a program on PATH?
fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(tool).is_file())
}

async fn bench_postfix(
    args: &Args,
    dir: &Path,
    sys: &System,
    gate: &LinkGate,
) -> anyhow::Result<bool> {
    const TOOLS: [&str; 4] = ["postfix", "smtp-source", "script", "chown"];
    let missing: Vec<&str> = TOOLS.into_iter().filter(|t| !on_path(t)).collect();
    if !missing.is_empty() || !postfix::is_root() {
        println!(
            "\npostfix: SKIPPED (needs root and {}; missing: {})",
            TOOLS.join(", "),
            if missing.is_empty() {
                "root".to_owned()
            } else {
                missing.join(", ")
            }
        );
        return Ok(true);
    }
    let domain = postfix::DOMAIN;
    register(sys, domain)?;
    let milter = match (&sys.mail.milter_path, sys.mail.milter_addr) {
        (Some(path), _) => format!("unix:{}", path.display()),
        (None, Some(addr)) => format!("inet:{addr}"),
        (None, None) => bail!("mailbell has no milter"),
    };
    let null_milter = if args.null_milter {
        let path = dir.join("null-milter.sock");
        let m = NullMilter::start(&path).context("start the null milter")?;
        Some((m, format!("unix:{}", path.display())))
    } else {
        None
    };
    let (alone, with, null) = tokio::task::block_in_place(|| {
        anyhow::Ok((
            Postfix::start(&dir.join("postfix-alone"), None)?,
            Postfix::start(&dir.join("postfix-milter"), Some(&milter))?,
            match &null_milter {
                Some((_, spec)) => Some(Peer::Postfix(Postfix::start(
                    &dir.join("postfix-null-milter"),
                    Some(spec),
                )?)),
                None => None,
            },
        ))
    })?;
    println!(
        "\nPostfix {} (private instances on loopback; with mailbell = smtpd_milters = {}, milter_protocol 6)",
        postfix_version(),
        if milter.starts_with("unix:") {
            "unix:<socket>"
        } else {
            "inet:<loopback>"
        },
    );
    let ok = bench_pair(
        args,
        sys,
        gate,
        domain,
        &Peer::Postfix(alone),
        &Peer::Postfix(with),
        null.as_ref(),
    )
    .await?;
    Ok(ok)
}

fn postfix_version() -> String {
    std::process::Command::new("postconf")
        .args(["-h", "mail_version"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

async fn bench_stalwart(
    args: &Args,
    dir: &Path,
    sys: &System,
    gate: &LinkGate,
) -> anyhow::Result<bool> {
    let Some(bin) = stalwart::binary() else {
        println!(
            "\nstalwart: SKIPPED (no stalwart binary on PATH, in $STALWART_BIN or ~/.cargo/bin)"
        );
        return Ok(true);
    };
    if !on_path("smtp-source") {
        println!("\nstalwart: SKIPPED (smtp-source, from the postfix package, is missing)");
        return Ok(true);
    }
    let domain = stalwart::DOMAIN;
    register(sys, domain)?;
    let http = sys
        .mail
        .http_addr
        .context("mailbell has no HTTP listener")?;
    let mut alone = Stalwart::start(&bin, &dir.join("stalwart-alone"), None)?;
    let mut with = Stalwart::start(&bin, &dir.join("stalwart-mailbell"), Some(http))?;
    for s in [&mut alone, &mut with] {
        s.wait_ready(Duration::from_secs(60)).await?;
        s.add_domain(domain).await?;
        // Warm-up and timed runs go to the same recipients: registered users, or with
        // --unregistered Stalwart accounts mailbell does not know.
        for u in mailboxes(rcpt_local(args), domain) {
            s.add_user(&u).await?;
        }
    }
    println!(
        "\nStalwart {} (SQLite; with mailbell = the shipped stanza: MTA hook at data + webhook)",
        std::process::Command::new(&bin)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    );
    bench_pair(
        args,
        sys,
        gate,
        domain,
        &Peer::Stalwart(alone),
        &Peer::Stalwart(with),
        None,
    )
    .await
}

// ---- runs -----------------------------------------------------------------------------------

/// What one smtp-source run gave.
struct Run {
    rate: f64,
    /// Messages per second from the first message until every copy was in its mailbox (the
    /// MTA's end-to-end rate; Postfix's in-flow control slows acceptance to delivery anyway).
    delivered_rate: f64,
    /// CPU time of this process (mailbell, agent, simulated modem) per message, from the first
    /// message until every SMS was at the modem.
    cpu_ms: f64,
    /// The same while smtp-source ran (with `--agent after`: the mail side alone).
    cpu_during_ms: f64,
    /// Outbox group commits while smtp-source ran, and their mean journal append + fdatasync.
    commits: u64,
    commit_ms: f64,
    /// This process's threads while smtp-source ran, by name, busiest first.
    threads: Vec<(String, Sched)>,
    ok: bool,
}

/// Warms the instances up, then runs every session count alone and with mailbell (and with
/// the null milter, if given); prints a table. Returns whether every message, notice and SMS
/// arrived.
async fn bench_pair(
    args: &Args,
    sys: &System,
    gate: &LinkGate,
    domain: &str,
    alone: &Peer,
    with: &Peer,
    null: Option<&Peer>,
) -> anyhow::Result<bool> {
    let max_sessions = args.sessions.iter().copied().max().unwrap_or(1);
    let mut ok = true;
    let mut instances = vec![(alone, false), (with, true)];
    instances.extend(null.map(|n| (n, false)));
    for &(peer, mailbell) in &instances {
        ok &= one_run(
            args,
            (sys, gate),
            domain,
            peer,
            mailbell,
            max_sessions,
            WARMUP,
        )
        .await?
        .ok;
    }
    println!(
        "  {:>8}  {:>11}  {:>13}  {:>6}  {:>13}  {:>19}  {:>17}  {:>28}",
        "sessions",
        "alone msg/s",
        "mailbell msg/s",
        "ratio",
        "added ms/msg",
        "mailbell CPU ms/msg",
        "of it during run",
        "delivered msg/s alone/with"
    );
    for &s in &args.sessions {
        // The instances take turns, each turn starting one further along, so drift of the
        // machine hits them alike.
        let mut pairs = Vec::with_capacity(args.repeat);
        let mut nulls = Vec::new();
        for turn in 0..args.repeat {
            let mut runs: Vec<Option<Run>> = (0..instances.len()).map(|_| None).collect();
            for k in 0..instances.len() {
                let i = (turn + k) % instances.len();
                let (peer, mailbell) = instances[i];
                let r =
                    one_run(args, (sys, gate), domain, peer, mailbell, s, args.messages).await?;
                ok &= r.ok;
                runs[i] = Some(r);
            }
            let mut runs = runs.into_iter().flatten();
            let (Some(a), Some(w)) = (runs.next(), runs.next()) else {
                bail!("a run is missing");
            };
            println!(
                "  {:>8}  {:>11.1}  {:>13.1}  {:>6.2}  {:>13}  {:>19.2}  {:>17.2}  {:>28}",
                s,
                a.rate,
                w.rate,
                w.rate / a.rate,
                added_ms(s, a.rate, w.rate),
                w.cpu_ms,
                w.cpu_during_ms,
                format!(
                    "{:.1} / {:.1} = {:.2}",
                    a.delivered_rate,
                    w.delivered_rate,
                    w.delivered_rate / a.delivered_rate
                )
            );
            println!(
                "            with mailbell: {} durable commits while smtp-source ran ({:.2} messages each), \
                 journal append + fdatasync {:.2} ms on average",
                w.commits,
                args.messages as f64 / w.commits.max(1) as f64,
                w.commit_ms
            );
            println!(
                "            with mailbell, per thread while smtp-source ran (µs of CPU / time slices per message): {}",
                per_thread(&w.threads, args.messages)
            );
            if let Some(n) = runs.next() {
                println!(
                    "            null milter: {:.1} msg/s, {:.2} of alone; mailbell / null milter {:.2}; \
                     this process's CPU {:.2} ms/msg during the run",
                    n.rate,
                    n.rate / a.rate,
                    w.rate / n.rate,
                    n.cpu_during_ms
                );
                nulls.push(n.rate);
            }
            pairs.push((a.rate, w.rate, a.delivered_rate, w.delivered_rate));
        }
        if pairs.len() > 1 {
            let alone_rate = median(pairs.iter().map(|p| p.0));
            let with_rate = median(pairs.iter().map(|p| p.1));
            let (alone_delivered, with_delivered) = (
                median(pairs.iter().map(|p| p.2)),
                median(pairs.iter().map(|p| p.3)),
            );
            println!(
                "  {:>8}  {:>11.1}  {:>13.1}  {:>6.2}  {:>13}  (median of {} alternating pairs; ratio of medians; \
                 delivered {:.1} / {:.1} = {:.2})",
                s,
                alone_rate,
                with_rate,
                with_rate / alone_rate,
                added_ms(s, alone_rate, with_rate),
                pairs.len(),
                alone_delivered,
                with_delivered,
                with_delivered / alone_delivered
            );
            if !nulls.is_empty() {
                let null_rate = median(nulls.iter().copied());
                println!(
                    "            null milter, median: {null_rate:.1} msg/s, {:.2} of alone; mailbell / null milter {:.2}",
                    null_rate / alone_rate,
                    with_rate / null_rate
                );
            }
        }
    }
    Ok(ok)
}

/// The threads that took at least 2 % of the process's CPU, as `name µs/slices` per message:
/// the CPU and the wake-ups each part of the mail side costs.
fn per_thread(threads: &[(String, Sched)], messages: usize) -> String {
    let total: u64 = threads.iter().map(|(_, s)| s.run_ns).sum();
    let per = |v: u64| v as f64 / messages.max(1) as f64;
    threads
        .iter()
        .filter(|(_, s)| s.run_ns * 50 >= total.max(1))
        .map(|(n, s)| format!("{n} {:.0}/{:.1}", per(s.run_ns) / 1000.0, per(s.slices)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What mailbell adds per message at 1 session (messages do not overlap there).
fn added_ms(sessions: usize, alone: f64, with: f64) -> String {
    if sessions == 1 {
        format!("{:+.2}", 1000.0 / with - 1000.0 / alone)
    } else {
        "(overlaps)".into()
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One smtp-source run of `messages` over `sessions` against `peer`; then waits until every
/// copy is delivered and, with mailbell, every notice created and every SMS at the modem.
async fn one_run(
    args: &Args,
    (sys, gate): (&System, &LinkGate),
    domain: &str,
    peer: &Peer,
    mailbell: bool,
    sessions: usize,
    messages: usize,
) -> anyhow::Result<Run> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let stats = sys.mail.intake_stats();
    let notices0 = stats.notices_created.load(Ordering::Relaxed);
    let pdus0 = sys.pdu_count();
    let local = rcpt_local(args);
    let delivered0 = peer.delivered(local, domain).await?;
    let copies = (messages * USERS) as u64;

    let timed = messages == args.messages;
    let hold = mailbell && args.agent == AgentMode::After && timed;
    if hold {
        gate.set_open(false);
    }
    let ostats = &sys.mail.stores.outbox.stats;
    let (commits0, flush0) = (
        ostats.commits.load(Ordering::Relaxed),
        ostats.commit_flush_us.load(Ordering::Relaxed),
    );
    // Each timed run starts on a quiet disk: the kernel writes back a run's mailboxes (and the
    // agent's stores after a run with mailbell) for up to 30 s, and that would land in the
    // next run, whichever it is.
    if timed {
        tokio::task::spawn_blocking(nix::unistd::sync).await?;
        tokio::time::sleep(SETTLE).await;
    }
    let cpu0 = process_cpu();
    let sched0 = thread_sched();
    let started = Instant::now();
    let sent = smtp_source(
        peer.smtp(),
        (sessions, messages, args.size),
        local,
        domain,
        deadline,
    )
    .await;
    let elapsed = started.elapsed();
    let cpu_during = process_cpu().saturating_sub(cpu0);
    let threads = sched_delta(&sched0, &thread_sched());
    let commits = ostats.commits.load(Ordering::Relaxed) - commits0;
    let flush_us = ostats.commit_flush_us.load(Ordering::Relaxed) - flush0;
    gate.set_open(true);
    sent?;

    let mut ok = true;
    let mut delivered;
    let mut all_delivered = None;
    loop {
        delivered = peer.delivered(local, domain).await? - delivered0;
        if delivered >= copies && all_delivered.is_none() {
            all_delivered = Some(started.elapsed());
        }
        let notices = stats.notices_created.load(Ordering::Relaxed) - notices0;
        let pdus = (sys.pdu_count() - pdus0) as u64;
        let notifies = mailbell && !args.unregistered;
        let done = if notifies {
            delivered >= copies && notices >= copies && pdus >= copies
        } else {
            delivered >= copies
        };
        if done || Instant::now() > deadline {
            let want_notices = if notifies { copies } else { 0 };
            if delivered != copies || notices != want_notices || pdus != want_notices {
                eprintln!(
                    "FAILED: {} at {sessions} sessions: {messages} messages x {USERS} recipients: \
                     {delivered} of {copies} copies delivered, {notices} of {want_notices} \
                     notices, {pdus} of {want_notices} SMS",
                    if mailbell { "with mailbell" } else { "alone" }
                );
                ok = false;
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // /proc counts in USER_HZ ticks, 100 per second on Linux.
    let cpu_ms = process_cpu().saturating_sub(cpu0) as f64 * 10.0 / messages as f64;
    Ok(Run {
        rate: messages as f64 / elapsed.as_secs_f64(),
        delivered_rate: messages as f64
            / all_delivered
                .unwrap_or_else(|| started.elapsed())
                .as_secs_f64(),
        cpu_ms,
        cpu_during_ms: cpu_during as f64 * 10.0 / messages as f64,
        commits,
        commit_ms: flush_us as f64 / 1000.0 / commits.max(1) as f64,
        threads,
        ok,
    })
}

/// `smtp-source -s S -m N -l SIZE -r 5 -f SENDER -t LOCAL@DOMAIN ADDR`; killed at `deadline`.
async fn smtp_source(
    addr: SocketAddr,
    (sessions, messages, size): (usize, usize, usize),
    local: &str,
    domain: &str,
    deadline: Instant,
) -> anyhow::Result<()> {
    let child = tokio::process::Command::new("smtp-source")
        .args(["-s", &sessions.to_string()])
        .args(["-m", &messages.to_string()])
        .args(["-l", &size.to_string()])
        .args(["-r", &USERS.to_string()])
        .args(["-f", SENDER])
        .args(["-t", &format!("{local}@{domain}")])
        .args(["-M", "client.remote.example"])
        .arg(addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start smtp-source")?;
    let left = deadline.saturating_duration_since(Instant::now());
    let out = tokio::time::timeout(left, child.wait_with_output())
        .await
        .context("smtp-source did not finish within --timeout (killed)")?
        .context("smtp-source")?;
    ensure!(
        out.status.success() && out.stderr.is_empty(),
        "smtp-source against {addr} ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Median and worst of 50 4 KiB write+fsync pairs in `dir`.
fn fsync_probe(dir: &Path) -> String {
    let Some(mut times) = mailbell_tests::disk::fsync_samples(dir, 50) else {
        return "unknown".into();
    };
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "p50 {:.2} ms, max {:.2} ms",
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1])
    )
}

// ---- the link gate ----------------------------------------------------------------------------

/// A relay between the mail side's link client and the agent that can be held shut: while
/// shut it closes every connection at once (the client backs off and keeps its notices).
struct LinkGate {
    addr: SocketAddr,
    listener: std::sync::Mutex<Option<tokio::net::TcpListener>>,
    open: tokio::sync::watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl LinkGate {
    async fn bind() -> anyhow::Result<Self> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the link gate")?;
        Ok(Self {
            addr: l.local_addr()?,
            listener: std::sync::Mutex::new(Some(l)),
            open: tokio::sync::watch::channel(true).0,
            task: std::sync::Mutex::new(None),
        })
    }

    /// Starts relaying to `agent`; returns the address the mail side connects to.
    fn forward_to(&self, agent: SocketAddr) -> SocketAddr {
        let listener = self.listener.lock().ok().and_then(|mut l| l.take());
        if let Some(l) = listener {
            let open = self.open.subscribe();
            let task = tokio::spawn(async move {
                let mut conns = tokio::task::JoinSet::new();
                while let Ok((mut inbound, _)) = l.accept().await {
                    if !*open.borrow() {
                        continue; // dropped: closed at once
                    }
                    let mut shut = open.clone();
                    conns.spawn(async move {
                        let Ok(mut out) = tokio::net::TcpStream::connect(agent).await else {
                            return;
                        };
                        let _ = inbound.set_nodelay(true);
                        let _ = out.set_nodelay(true);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                            _ = shut.wait_for(|o| !*o) => {}
                        }
                    });
                }
            });
            if let Ok(mut t) = self.task.lock() {
                *t = Some(task);
            }
        }
        self.addr
    }

    /// Opens or shuts the gate; shutting it also cuts the sessions going through it.
    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

impl Drop for LinkGate {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().ok().and_then(|mut t| t.take()) {
            t.abort();
        }
    }
}
