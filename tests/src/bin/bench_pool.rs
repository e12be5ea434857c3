//! Modem pool benchmark: K simulated modems on real ptys, each taking 3 s per submit like a
//! real one, fed through the real mutual-TLS link into an in-process agent, with and without
//! one broken modem (issue 10).
//!
//! Run: `cargo run --release -p mailbell-tests --bin bench_pool` (`--modems 16,64`,
//! `--seconds 60`, `--submit-delay-ms 3000`, `--broken-from 4`, `--idle-seconds 20`).
//!
//! For each K and each of "healthy" and "m00 broken" (`+CMS ERROR: 500` to every submit from
//! its `--broken-from`-th on; `--broken-how error|silence|garbage|vanish` for the other ways a
//! modem breaks) it prints:
//! - the idle CPU of the agent with K ready modems (before any notice);
//! - the achieved rate (from the first notice pushed to the last SMS accepted by its modem)
//!   against the ideal (K / submit delay; K − 1 healthy modems when one is broken), and each
//!   healthy modem's pace (its submits against one per submit delay, over the time from the
//!   start to its own last PDU): minimum
//!   and median;
//! - the per-modem counts;
//! - the agent's CPU while sending and its RSS.
//!
//! The agent runs in this process: its CPU is the sum over every thread except the simulated
//! modems' (`sim-modem`), and includes the link client that feeds it; RSS is the whole
//! process's, the simulators included. Exits non-zero only when a notice is lost, sent twice
//! or dead-lettered, never because of speed.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use mailbell_gsm_agent::app;
use mailbell_gsm_agent::config::Config;
use mailbell_gsm_agent::modem::pdu::decode_submit;
use mailbell_gsm_agent::sim::{Broken, Fault, SimModem, SimOptions};
use mailbell_link::{NotifId, Notification};
use mailbell_tests::cpu::{load_average, thread_cpu};
use mailbell_tests::feed::LinkFeed;

/// /proc counts in USER_HZ ticks, 100 per second on Linux.
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Parser)]
struct Args {
    /// Pool sizes to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    modems: Vec<usize>,
    /// Seconds of work per run at the ideal rate (notices = K × seconds / submit delay).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// How long each simulated SMSC takes to accept a PDU.
    #[arg(long, default_value_t = 3000)]
    submit_delay_ms: u64,
    /// The broken modem fails from this submit on.
    #[arg(long, default_value_t = 4)]
    broken_from: u64,
    /// How it fails: cms500, error, silence, garbage or vanish.
    #[arg(long, default_value = "cms500")]
    broken_how: String,
    /// Seconds of idle CPU measurement with every modem ready.
    #[arg(long, default_value_t = 20)]
    idle_seconds: u64,
    /// Run only the healthy pools, or only the ones with a broken modem.
    #[arg(long)]
    only: Option<String>,
}

fn notice(tag: &str, i: usize) -> Notification {
    Notification {
        id: NotifId::random(),
        // numbers spread over many destinations, as in a real bank
        phone: format!("+86138{:08}", i % 100_000_000),
        recipient: "alice@example.com".into(),
        from_addr: "bob@example.org".into(),
        subject: format!("{tag} {i}"),
        count: 1,
        text: Some(format!("{tag} #{i}")),
        ..Default::default()
    }
}

/// CPU ticks of every thread but the simulated modems', and of the modem driver threads.
fn agent_ticks() -> (u64, u64) {
    let mut all = 0;
    let mut drivers = 0;
    for ((_, name), t) in thread_cpu() {
        if name == "sim-modem" {
            continue;
        }
        all += t;
        if name.starts_with("modem-") {
            drivers += t;
        }
    }
    (all, drivers)
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Notice index → how many times it reached a modem, over all modems.
fn arrivals(sims: &[SimModem], tag: &str) -> HashMap<usize, usize> {
    let prefix = format!("{tag} #");
    let mut m: HashMap<usize, usize> = HashMap::new();
    for sim in sims {
        for p in sim.received() {
            let Ok(d) = decode_submit(&p.hex) else {
                continue;
            };
            if let Some(i) = d.text.strip_prefix(&prefix).and_then(|s| s.parse().ok()) {
                *m.entry(i).or_default() += 1;
            }
        }
    }
    m
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn one_run(args: &Args, k: usize, broken: bool) -> anyhow::Result<bool> {
    let delay = Duration::from_millis(args.submit_delay_ms);
    let dir = match std::env::var_os("MAILBELL_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let sims: Vec<SimModem> = (0..k)
        .map(|_| {
            SimModem::spawn(SimOptions {
                submit_delay: delay,
                ..SimOptions::default()
            })
        })
        .collect::<Result<_, _>>()?;
    let mut toml = String::new();
    for (i, s) in sims.iter().enumerate() {
        toml.push_str(&format!(
            "[[modem]]\nname = \"m{i:02}\"\ndevice = {:?}\nper_minute = 0\n",
            s.device_path()
        ));
    }
    let mut cfg = Config::from_toml(&toml, "bench")?;
    cfg.data_dir = dir.path().to_path_buf();
    cfg.link.listen = "127.0.0.1:0".parse()?;
    cfg.metrics_listen = Some("127.0.0.1:0".parse()?);
    if let mailbell_gsm_agent::config::LinkTls::DevPki { dir: d, .. } = &mut cfg.link.tls {
        *d = dir.path().join("pki");
    }
    let running = app::start(cfg.clone()).await?;
    let metrics = running
        .metrics_addr
        .ok_or_else(|| anyhow::anyhow!("no status endpoint"))?;
    let t = Instant::now();
    loop {
        let s = app::status(metrics).await?;
        if s.modems.len() == k && s.modems.iter().all(|m| m["state"] == "Ready") {
            break;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(120), "modems not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tls_files = app::client_tls(&cfg, None)?;
    let feed = LinkFeed::start(&running.link_addr.to_string(), &tls_files)?;
    let outbox = feed.outbox.clone();

    // Idle: every modem ready, the link up, nothing to send.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle0, idle_drv0) = agent_ticks();
    let t_idle = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let (idle1, idle_drv1) = agent_ticks();
    let idle_secs = t_idle.elapsed().as_secs_f64();
    let idle_pct = 100.0 * (idle1 - idle0) as f64 / TICKS_PER_SEC / idle_secs;
    let idle_drv_pct = 100.0 * (idle_drv1 - idle_drv0) as f64 / TICKS_PER_SEC / idle_secs;

    // Load: a backlog of K × seconds / delay notices.
    let how = match args.broken_how.as_str() {
        "cms500" => Broken::Cms(500),
        "error" => Broken::PlainError,
        "silence" => Broken::Silence,
        "garbage" => Broken::Garbage,
        "vanish" => Broken::Vanish,
        other => anyhow::bail!("--broken-how {other}: cms500, error, silence, garbage or vanish"),
    };
    if broken {
        sims[0].inject(Fault::BrokenFrom {
            from: args.broken_from,
            how,
        });
    }
    let per_modem = (args.seconds as f64 / delay.as_secs_f64()).round() as usize;
    let total = k * per_modem.max(1);
    let tag = "bench";
    let rss0 = rss_mb();
    let (cpu0, _) = agent_ticks();
    let t0 = Instant::now();
    for i in 0..total {
        let n = notice(tag, i);
        outbox.push(n.id, n.encode_payload()?);
    }
    let limit = Duration::from_secs(args.seconds * 4 + 60);
    let mut rss_max = rss0;
    // until the last PDU is accepted (its modem answered), not merely written
    while t0.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss_max = rss_max.max(rss_mb());
        if app::status(metrics).await?.sent >= total as u64 {
            break;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpu1, _) = agent_ticks();
    let got = arrivals(&sims, tag);
    let status = app::status(metrics).await?;
    let received: Vec<_> = sims.iter().map(|s| s.received()).collect();
    let counts: Vec<usize> = received.iter().map(Vec::len).collect();
    let submits0 = sims[0].submits();

    let healthy = if broken { k - 1 } else { k };
    let ideal = healthy as f64 / delay.as_secs_f64();
    let rate = got.len() as f64 / elapsed;
    // A modem's pace: its submits against one per submit delay over the time it was sending,
    // from the start to the answer to its own last PDU. A notice that waits out a broken modem's timeout
    // stretches the run, not the healthy modems' pace; a modem left idle while work waited
    // still counts against it, since the backlog was there from the start.
    let paces: Vec<f64> = received
        .iter()
        .enumerate()
        .filter(|(i, _)| !(broken && *i == 0))
        .map(|(_, r)| {
            // A PDU's time is when it reached the modem; the modem answers a submit delay
            // later, so its last one ends then.
            let busy = r
                .iter()
                .map(|p| p.at.saturating_duration_since(t0))
                .max()
                .unwrap_or_default()
                .as_secs_f64()
                + delay.as_secs_f64();
            100.0 * r.len() as f64 * delay.as_secs_f64() / busy
        })
        .collect();
    let dup = got.values().filter(|&&c| c > 1).count();
    let ok = got.len() == total && dup == 0 && status.dead_letters == 0;
    let what = if broken {
        format!("m00 broken ({how:?} from submit {})", args.broken_from)
    } else {
        "all healthy".to_string()
    };
    println!(
        "K = {k}, {what}: {total} notices, {} ms per submit",
        delay.as_millis()
    );
    println!(
        "  idle ({:.0} s, {k} modems ready): agent {idle_pct:.2} % of one core (modem threads {idle_drv_pct:.2} %)",
        idle_secs
    );
    println!(
        "  sent {} of {total} in {elapsed:.1} s: {rate:.2} SMS/s = {:.1} % of the ideal {ideal:.2} SMS/s ({healthy} modems){}",
        got.len(),
        100.0 * rate / ideal,
        if broken {
            format!(
                "; {:.1} % of the ideal with all {k}",
                100.0 * rate / (k as f64 / delay.as_secs_f64())
            )
        } else {
            String::new()
        }
    );
    println!(
        "  healthy modems' pace: min {:.1} %  median {:.1} %  (one submit per {} ms = 100 %)",
        paces.iter().copied().fold(f64::INFINITY, f64::min),
        median(paces.clone()),
        delay.as_millis()
    );
    println!(
        "  per modem: {}",
        counts
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    if broken {
        let m0 = &status.modems[0];
        println!(
            "  m00: given {submits0} submits (sent {}), failure streak {}, alarm {}, cooling {} s",
            counts[0], m0["failure_streak"], m0["alarm"], m0["cooling_down_s"]
        );
    }
    println!(
        "  agent while sending: {:.1} % of one core; RSS {rss0:.1} MB before, {rss_max:.1} MB max (process, {k} simulators included)",
        100.0 * (cpu1 - cpu0) as f64 / TICKS_PER_SEC / elapsed
    );
    println!(
        "  dead {}  duplicates {dup}  retried {}  failed by class {:?}  [load {}]",
        status.dead_letters,
        status.retried,
        status.failed_by_class,
        load_average()
    );
    feed.stop().await;
    running.stop().await;
    drop(sims);
    Ok(ok)
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let mut ok = true;
    for &k in &args.modems {
        anyhow::ensure!(k >= 2, "a pool needs at least 2 modems here");
        for broken in [false, true] {
            match args.only.as_deref() {
                Some("healthy") if broken => continue,
                Some("broken") if !broken => continue,
                _ => {}
            }
            ok &= one_run(&args, k, broken).await?;
        }
    }
    Ok(ok)
}

fn main() -> ExitCode {
    mailbell_tests::bench_main(run(Args::parse()))
}
