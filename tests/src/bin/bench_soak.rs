//! Soak: both daemons as their own processes on the real path for `--minutes` at `--rate`
//! notices per second, sampling each daemon's resident memory, to show whether it levels off.
//!
//! ```text
//! cargo build --release -p mailbell -p mailbell-gsm-agent -p mailbell-tests --bins
//! target/release/bench_soak [--minutes 30] [--rate 50] [--sample-secs 30] [--users 1000]
//!     [--modems 2] [--cache-mb 4] [--keep]
//! ```
//!
//! `mailbell serve` (milter, durable outbox, mutual-TLS link; dev PKI) and
//! `mailbell-gsm-agent serve` (inbox, dispatcher, modem driver) run as child processes, found
//! beside this binary (`--mailbell-bin`, `--agent-bin` to override). The agent's modems are
//! simulated modems on real ptys that live in this process, zero submit delay, no pacing, so
//! the simulator's own record of every PDU does not count against the agent. `--users`
//! registered users (admin CLI CSV import, no rate limit: one notice, one SMS per message)
//! get messages in turn through the milter (this process plays the MTA, several connections),
//! paced to `--rate` messages per second.
//!
//! Every `--sample-secs` it prints both daemons' VmRSS (from /proc/<pid>/status), messages
//! accepted and SMS sent so far. At the end: the least-squares RSS slope (MB/min) of each
//! daemon over the whole run and over its last half, the last half's spread
//! ((max - min) / min) and whether that is within 10 % ("flat"). The run then waits for every
//! accepted message's SMS; a missing or extra SMS fails it (exit status 1); memory never does.
//! Every child process is killed when the benchmark ends, fails or gets Ctrl-C.
//! Results: docs/benchmarks.md, "Soak".

// The benches' MTA side of the milter protocol and helpers (its one `expect` is on constant
// histogram bounds).
#[allow(clippy::expect_used)]
#[path = "../../benches/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use mailbell_gsm_agent::sim::{SimModem, SimOptions};
use mailbell_tests::postfix::free_addr;
use support::{headers, user_addr, MilterClient, MilterMessage};

#[derive(Parser, Debug)]
#[command(about = "Both daemons as processes under a steady load; RSS slope of each")]
struct Args {
    /// Length of the loaded run.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Messages (one notice and one SMS each) per second.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Seconds between RSS samples.
    #[arg(long, default_value_t = 30)]
    sample_secs: u64,
    /// Registered users the messages cycle through.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Simulated modems the agent drives.
    #[arg(long, default_value_t = 2)]
    modems: usize,
    /// Milter connections the load is spread over.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// The agent's `[inbox] cache_mb`.
    #[arg(long, default_value_t = 4)]
    cache_mb: u64,
    /// `mailbell` binary (default: beside this one).
    #[arg(long)]
    mailbell_bin: Option<PathBuf>,
    /// `mailbell-gsm-agent` binary (default: beside this one).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Keep the scratch directory (configs, logs, data) and print its path.
    #[arg(long)]
    keep: bool,
}

const ADMIN_TOKEN: &str = "soak-admin-token";
const FROM: &str = "sender@remote.example";

fn main() -> ExitCode {
    let args = Args::parse();
    mailbell_tests::bench_main(async move {
        tokio::select! {
            r = run(args) => r,
            r = tokio::signal::ctrl_c() => {
                r?;
                bail!("interrupted; every child stopped")
            }
        }
    })
}

/// A child process killed when dropped.
struct Daemon {
    name: &'static str,
    child: Child,
}

impl Daemon {
    fn start(name: &'static str, bin: &Path, config: &Path, log: &Path) -> anyhow::Result<Self> {
        let log = std::fs::File::create(log)?;
        let child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(Daemon { name, child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// VmRSS in MB.
    fn rss_mb(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .with_context(|| format!("{} is gone", self.name))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .context("no VmRSS")
    }

    fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(s) = self.child.try_wait()? {
            bail!("{} exited with {s}", self.name);
        }
        Ok(())
    }

    /// SIGTERM and a wait of up to 30 s, then SIGKILL.
    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn beside_me(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    ensure!(
        p.is_file(),
        "{} not found; build it first (cargo build --release -p mailbell -p mailbell-gsm-agent) \
         or pass its path",
        p.display()
    );
    Ok(p)
}

async fn wait_listening(addrs: &[SocketAddr], d: &mut Daemon) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut up = true;
        for a in addrs {
            up &= tokio::net::TcpStream::connect(a).await.is_ok();
        }
        if up {
            return Ok(());
        }
        d.alive()?;
        ensure!(Instant::now() < deadline, "{} did not start", d.name);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Least-squares slope of (minutes, MB) in MB/min.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

/// Whole-run slope, last-half slope, last-half spread.
fn summary(points: &[(f64, f64)], half_from: f64) -> (f64, f64, f64) {
    let last: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|p| p.0 >= half_from)
        .collect();
    let min = last.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let max = last.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    (slope(points), slope(&last), (max - min) / min)
}

async fn run(args: Args) -> anyhow::Result<bool> {
    ensure!(
        args.rate > 0.0 && args.minutes > 0.0,
        "--rate and --minutes must be above 0"
    );
    ensure!(
        args.users > 0 && args.modems > 0 && args.connections > 0,
        "counts must be above 0"
    );
    let mailbell_bin = match &args.mailbell_bin {
        Some(p) => p.clone(),
        None => beside_me("mailbell")?,
    };
    let agent_bin = match &args.agent_bin {
        Some(p) => p.clone(),
        None => beside_me("mailbell-gsm-agent")?,
    };
    let scratch = support::bench_dir()?;
    let dir = scratch.path().to_path_buf();
    let r = run_in(&args, &dir, &mailbell_bin, &agent_bin).await;
    if args.keep {
        eprintln!("scratch kept in {}", scratch.keep().display());
    }
    r
}

async fn run_in(
    args: &Args,
    dir: &Path,
    mailbell_bin: &Path,
    agent_bin: &Path,
) -> anyhow::Result<bool> {
    let pki = dir.join("pki");
    // The modems: simulated, in this process.
    let mut sims = Vec::new();
    let mut modems = String::new();
    for i in 0..args.modems {
        let sim = SimModem::spawn(SimOptions::default()).context("simulated modem")?;
        modems.push_str(&format!(
            "[[modem]]\nname = \"sim{i}\"\ndevice = {:?}\nper_minute = 0\nper_day = 0\n",
            sim.device_path()
        ));
        sims.push(sim);
    }
    let (link, metrics) = (free_addr()?, free_addr()?);
    let agent_cfg = dir.join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "[agent]\ndata_dir = {data:?}\n\
             [link]\nlisten = \"{link}\"\ndev_pki_dir = {pki:?}\n\
             [metrics]\nlisten = \"{metrics}\"\n\
             [inbox]\ncache_mb = {cache}\n{modems}",
            data = dir.join("agent-data"),
            cache = args.cache_mb,
        ),
    )?;
    let mut agent = Daemon::start("agent", agent_bin, &agent_cfg, &dir.join("agent.log"))?;
    wait_listening(&[link, metrics], &mut agent).await?;
    let (milter, admin) = (free_addr()?, free_addr()?);
    let mail_cfg = dir.join("mailbell.toml");
    std::fs::write(
        &mail_cfg,
        format!(
            "[mailbell]\ndata_dir = {data:?}\n\
             [listen]\nhttp = \"\"\nmilter = \"{milter}\"\nadmin = \"{admin}\"\n\
             [admin]\ntoken = \"{ADMIN_TOKEN}\"\n\
             [milter]\nmax_connections = {conns}\n\
             [intake]\nrate_limit_secs = 0\n\
             [link]\ndev_pki_dir = {pki:?}\n\
             [[link.agent]]\naddr = \"{link}\"\nserver_name = \"localhost\"\n",
            data = dir.join("mail-data"),
            conns = args.connections + 8,
        ),
    )?;
    let mut mail = Daemon::start(
        "mailbell",
        mailbell_bin,
        &mail_cfg,
        &dir.join("mailbell.log"),
    )?;
    wait_listening(&[milter, admin], &mut mail).await?;
    // Users, through the admin CLI (the running daemon's admin API).
    let mut csv = String::from("address,phone,language\n");
    for i in 0..args.users {
        csv.push_str(&format!("{},+86139{i:08},en\n", user_addr(i)));
    }
    let csv_path = dir.join("users.csv");
    std::fs::write(&csv_path, csv)?;
    let out = Command::new(mailbell_bin)
        .arg("--config")
        .arg(&mail_cfg)
        .args(["user", "import"])
        .arg(&csv_path)
        .output()?;
    ensure!(
        out.status.success(),
        "user import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Wait for the modems (mailbell_modem_up 1 for each).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = mailbell_gsm_agent::app::http_get(metrics, "/metrics").await?;
        let up = m
            .lines()
            .filter(|l| l.starts_with("mailbell_modem_up{") && l.ends_with(" 1"))
            .count();
        if up >= args.modems {
            break;
        }
        agent.alive()?;
        ensure!(Instant::now() < deadline, "modems not ready within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "bench_soak: {:.1} min at {} messages/s through the milter ({} connections, {} users, \
         one notice and one SMS each); mailbell pid {}, agent pid {} ({} simulated modems in the \
         bench process, agent cache_mb = {}); {} cores, load average {}",
        args.minutes,
        args.rate,
        args.connections,
        args.users,
        mail.pid(),
        agent.pid(),
        args.modems,
        args.cache_mb,
        support::cores(),
        support::load_average(),
    );
    // The load: each connection sends every `connections`-th message on its own clock.
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = tokio::task::JoinSet::new();
    let period = Duration::from_secs_f64(args.connections as f64 / args.rate);
    let body = support::body_text(2048);
    for c in 0..args.connections {
        let (accepted, refused, stop) = (accepted.clone(), refused.clone(), stop.clone());
        let (users, conns, body) = (args.users, args.connections, body.clone());
        load.spawn(async move {
            let mut client = MilterClient::connect(milter).await?;
            tokio::time::sleep(period.mul_f64(c as f64 / conns as f64)).await;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut i = c;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let to = user_addr(i % users);
                let qid = format!("{:X}", 0x10_0000 + i);
                let h = headers(FROM, &to, &format!("soak {i}"), i as u64);
                let o = client
                    .send(&MilterMessage {
                        queue_id: &qid,
                        from: FROM,
                        rcpts: std::slice::from_ref(&to),
                        headers: &h,
                        body: body.as_bytes(),
                    })
                    .await?;
                if o.reply == b'a' || o.reply == b'c' {
                    accepted.fetch_add(1, Ordering::Relaxed);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                i += conns;
            }
            client.quit().await;
            anyhow::Ok(())
        });
    }
    let started = Instant::now();
    let run_for = Duration::from_secs_f64(args.minutes * 60.0);
    let mut agent_pts = Vec::new();
    let mut mail_pts = Vec::new();
    println!(
        "{:>7} {:>11} {:>12} {:>10} {:>10} {:>8}",
        "t (min)", "agent (MB)", "mailbell (MB)", "accepted", "SMS sent", "refused"
    );
    let mut sample = |agent: &mut Daemon, mail: &mut Daemon, sent: u64| -> anyhow::Result<()> {
        agent.alive()?;
        mail.alive()?;
        let t = started.elapsed().as_secs_f64() / 60.0;
        let (a, m) = (agent.rss_mb()?, mail.rss_mb()?);
        agent_pts.push((t, a));
        mail_pts.push((t, m));
        println!(
            "{t:7.2} {a:11.1} {m:12.1} {:>10} {sent:>10} {:>8}",
            accepted.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed)
        );
        Ok(())
    };
    sample(&mut agent, &mut mail, 0)?;
    let mut next = Duration::from_secs(args.sample_secs);
    while started.elapsed() < run_for {
        let wait = next.min(run_for).saturating_sub(started.elapsed());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            Some(r) = load.join_next() => {
                r??;
                bail!("a milter connection ended early");
            }
        }
        if started.elapsed() >= next || started.elapsed() >= run_for {
            let sent = mailbell_gsm_agent::app::status(metrics).await?.sent;
            sample(&mut agent, &mut mail, sent)?;
            next += Duration::from_secs(args.sample_secs);
        }
    }
    stop.cancel();
    while let Some(r) = load.join_next().await {
        r??;
    }
    let total = accepted.load(Ordering::Relaxed);
    // Every accepted message's SMS.
    let deadline = Instant::now() + Duration::from_secs(120);
    let sent = loop {
        let s = mailbell_gsm_agent::app::status(metrics).await?;
        if s.sent >= total || Instant::now() > deadline {
            break s.sent;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let half = args.minutes / 2.0;
    println!(
        "\n{total} messages accepted ({:.1}/s), {} refused, {sent} SMS sent",
        total as f64 / started.elapsed().as_secs_f64(),
        refused.load(Ordering::Relaxed)
    );
    for (name, pts) in [("agent", &agent_pts), ("mailbell", &mail_pts)] {
        let (all, last, spread) = summary(pts, half);
        let first = pts.first().map_or(0.0, |p| p.1);
        let end = pts.last().map_or(0.0, |p| p.1);
        println!(
            "{name:<9} RSS {first:.1} -> {end:.1} MB; slope {all:+.3} MB/min over the run, \
             {last:+.3} MB/min over the last half; last half spread {:.1} % ({})",
            spread * 100.0,
            if spread <= 0.10 {
                "flat within 10 %"
            } else {
                "NOT flat within 10 %"
            }
        );
    }
    mail.stop();
    agent.stop();
    drop(sims);
    if sent != total {
        println!("FAILED: {total} messages accepted but {sent} SMS sent");
        return Ok(false);
    }
    Ok(true)
}
