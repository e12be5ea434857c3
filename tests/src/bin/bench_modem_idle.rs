//! Idle modem cost: how much CPU the per-modem driver threads burn while nothing is sent.
//!
//! Starts `--modems` simulated modems (`mailbell_gsm_agent::sim::SimModem`) in a child process
//! (so their own loops do not count), one driver thread per modem in this process, waits until
//! every modem is ready, lets them sit idle for `--seconds` and prints the CPU time of the
//! `modem-*` threads, of the whole process, and their wake-ups (context switches) per second.
//! The threads' time comes from `/proc/self/task/<tid>/schedstat` (nanoseconds): the 10 ms
//! ticks of `stat` round each thread down on its own, up to 64 ticks for 64 threads.
//!
//! Run: `cargo run -p mailbell-tests --bin bench_modem_idle [-- --modems 64 --seconds 30]`.
//! Prints figures; exits non-zero only when a modem never gets ready, never because of speed.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use mailbell_gsm_agent::modem::driver::{self, ModemConfig, ModemHandle, ModemState};
use mailbell_gsm_agent::sim::{SimModem, SimOptions};
use mailbell_tests::cpu::{load_average, process_cpu, thread_cpu};

/// Linux reports /proc CPU times in USER_HZ, which is 100 on every architecture it supports.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Parser)]
struct Args {
    /// Simulated modems.
    #[arg(long, default_value_t = 64)]
    modems: usize,
    /// Length of the idle measurement, seconds.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Internal: run as the simulator child, printing one device path per line.
    #[arg(long, hide = true)]
    serve_sims: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(n) = args.serve_sims {
        return match serve_sims(n) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: simulators: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    mailbell_tests::bench_main(run(args))
}

/// The child: `n` simulators until stdin closes.
fn serve_sims(n: usize) -> anyhow::Result<()> {
    let mut sims = Vec::with_capacity(n);
    for _ in 0..n {
        let sim = SimModem::spawn(SimOptions::default()).context("spawn a simulator")?;
        println!("{}", sim.device_path().display());
        sims.push(sim);
    }
    // Parent gone or done: stdin reaches EOF.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(sims);
    Ok(())
}

/// Nanoseconds on a CPU of the `modem-*` threads (schedstat), and how many there are.
fn modem_runtime_ns() -> (u64, usize) {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return (0, 0);
    };
    let (mut total, mut threads) = (0, 0);
    for e in dir.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("modem-") {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("schedstat")).unwrap_or_default();
        if let Some(ns) = stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        {
            total += ns;
            threads += 1;
        }
    }
    (total, threads)
}

/// Voluntary + involuntary context switches of the `modem-*` threads: their wake-ups.
fn modem_switches() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut total = 0;
    for e in dir.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("modem-") {
            continue;
        }
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

fn modem_ticks() -> (u64, usize) {
    let threads = thread_cpu();
    let modem: Vec<u64> = threads
        .iter()
        .filter(|((_, name), _)| name.starts_with("modem-"))
        .map(|(_, t)| *t)
        .collect();
    (modem.iter().sum(), modem.len())
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let exe = std::env::current_exe().context("find this binary")?;
    let mut child = Command::new(exe)
        .arg("--serve-sims")
        .arg(args.modems.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("start the simulator child")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut handles: Vec<ModemHandle> = Vec::with_capacity(args.modems);
    for i in 0..args.modems {
        let path = lines
            .next()
            .context("the simulator child ended early")?
            .context("read a device path")?;
        handles.push(driver::spawn(ModemConfig::new(format!("m{i:02}"), path)));
    }
    let t = Instant::now();
    let mut ok = true;
    for h in &handles {
        let left = Duration::from_secs(60).saturating_sub(t.elapsed());
        if h.wait_for_state(left, |s| *s == ModemState::Ready)
            .await
            .is_err()
        {
            eprintln!("error: modem {} not ready: {:?}", h.name(), h.status());
            ok = false;
        }
    }
    println!(
        "{} modems ready in {:.1} s; idle for {} s",
        args.modems,
        t.elapsed().as_secs_f64(),
        args.seconds
    );
    // Let the init bursts settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (m0, threads) = modem_ticks();
    let (n0, _) = modem_runtime_ns();
    let p0 = process_cpu();
    let s0 = modem_switches();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let wall = t0.elapsed().as_secs_f64();
    let (m1, _) = modem_ticks();
    let (n1, ns_threads) = modem_runtime_ns();
    let p1 = process_cpu();
    let s1 = modem_switches();
    let pct = |ticks: u64| ticks as f64 / TICKS_PER_SECOND / wall * 100.0;
    let busy_ns = n1.saturating_sub(n0);
    println!(
        "modem threads ({ns_threads}): {:.3} % of one core ({:.1} ms on a CPU in {wall:.1} s, schedstat)",
        busy_ns as f64 / 1e9 / wall * 100.0,
        busy_ns as f64 / 1e6
    );
    println!(
        "modem threads ({threads}), in ticks: {:.2} % of one core ({} ticks)",
        pct(m1.saturating_sub(m0)),
        m1.saturating_sub(m0)
    );
    println!(
        "whole process (drivers + runtime): {:.2} % of one core",
        pct(p1.saturating_sub(p0))
    );
    let wakeups = s1.saturating_sub(s0) as f64 / wall;
    println!(
        "modem thread wake-ups: {wakeups:.0}/s in total, {:.1}/s per modem",
        wakeups / args.modems.max(1) as f64
    );
    println!("load average: {}", load_average());
    for h in &handles {
        h.shutdown().await;
    }
    drop(child.stdin.take());
    let _ = child.wait();
    Ok(ok)
}
