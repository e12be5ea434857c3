//! The agent inbox's memory for a full dedupe history: fills a fresh inbox with `--ids`
//! notices (default 700,000: a week at 100,000 SMS a day) through its public API, as the link
//! and the dispatcher do (`store` in link-sized batches, then `Sent` for each, which leaves the
//! id as a tombstone in the dedupe history), then reopens the inbox in a fresh process (an
//! agent restarting on that data) and reports the resident memory of both.
//!
//! ```text
//! cargo run --release -p mailbell-tests --bin bench_dedupe -- [--ids 700000] [--cache-mb 16]
//!     [--dir DIR] [--keep]
//! ```
//!
//! Printed: VmRSS / VmHWM (from /proc/self/status) of the filling process after the fill, and
//! of the reopened inbox after `open` (its start-up scan rebuilds the dedupe set), the dedupe
//! set's own heap bytes and bytes per id, the store's size on disk, and whether the reopened
//! inbox stays within `--limit-mb` (default 64). Exit status 1 if a stored id is not answered
//! as a duplicate after the reopen; the memory figure never fails the run.
//! Results: docs/benchmarks.md, "Agent memory".

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Parser;
use mailbell_gsm_agent::inbox::{Change, Inbox, InboxConfig, Validator};
use mailbell_link::net::Inbox as _;
use mailbell_link::receiver::Outcome;
use mailbell_link::{NotifId, Notification};

#[derive(Parser, Debug)]
#[command(about = "Fill the agent inbox's dedupe history and measure its memory")]
struct Args {
    /// Ids to fill the dedupe history with.
    #[arg(long, default_value_t = 700_000)]
    ids: usize,
    /// sled page cache (`[inbox] cache_mb`).
    #[arg(long, default_value_t = 4)]
    cache_mb: u64,
    /// The RSS target for the reopened inbox, MB.
    #[arg(long, default_value_t = 64.0)]
    limit_mb: f64,
    /// Where to create the scratch inbox (default: MAILBELL_BENCH_DIR or the temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the scratch directory and print its path.
    #[arg(long)]
    keep: bool,
    /// Internal: open the inbox at this path, check the ids in `<path>.ids`, print RSS.
    #[arg(long, hide = true)]
    reopen: Option<PathBuf>,
}

/// Notices per `store` call (the agent's link hands over up to its window at once).
const BATCH: usize = 512;

fn main() -> ExitCode {
    // The agent's allocator limits (its `main` does the same), so the figures are the agent's.
    mailbell_gsm_agent::memory::tune();
    let args = Args::parse();
    mailbell_tests::bench_main(async move {
        match &args.reopen {
            Some(path) => reopen(path, &args).await,
            None => fill(&args).await,
        }
    })
}

fn config(args: &Args) -> InboxConfig {
    InboxConfig {
        cache_bytes: args.cache_mb * 1024 * 1024,
        ..Default::default()
    }
}

fn validator() -> Validator {
    Arc::new(|_: &Notification| Ok(()))
}

/// (VmRSS, VmHWM) of this process in MB.
fn rss() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn du(path: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(path) else {
        return std::fs::metadata(path).map_or(0, |m| m.len());
    };
    rd.flatten().map(|e| du(&e.path())).sum()
}

fn notice(i: usize) -> (NotifId, Vec<u8>) {
    let n = Notification {
        id: NotifId::random(),
        phone: format!("+86139{:08}", i % 100_000_000),
        recipient: format!("u{:05}@example.com", i % 1000),
        from_addr: "sender@remote.example".into(),
        subject: format!("message {i}"),
        count: 1,
        ..Default::default()
    };
    let payload = n.encode_payload().unwrap_or_default();
    (n.id, payload)
}

async fn fill(args: &Args) -> anyhow::Result<bool> {
    ensure!(args.ids > 0, "--ids must be at least 1");
    let scratch = match &args.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => match std::env::var_os("MAILBELL_BENCH_DIR") {
            Some(d) => tempfile::tempdir_in(d)?,
            None => tempfile::tempdir()?,
        },
    };
    let path = scratch.path().join("inbox");
    let (rss0, _) = rss();
    println!(
        "bench_dedupe: {} ids through Inbox::store + Change::Sent, sled cache_mb = {}, {} cores",
        args.ids,
        args.cache_mb,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let inbox = {
        let (p, cfg) = (path.clone(), config(args));
        tokio::task::spawn_blocking(move || Inbox::open(&p, cfg, validator())).await??
    };
    let started = Instant::now();
    // Every 64th id is checked after the reopen.
    let mut sample: Vec<NotifId> = Vec::new();
    let mut done = 0usize;
    let mut next_report = 100_000usize;
    while done < args.ids {
        let n = BATCH.min(args.ids - done);
        let batch: Vec<(NotifId, Vec<u8>)> = (done..done + n).map(notice).collect();
        sample.extend(batch.iter().step_by(64).map(|(id, _)| *id));
        let out = inbox.store("bench".into(), batch).await;
        ensure!(
            out.iter().all(|o| *o == Outcome::Stored),
            "store refused: {:?}",
            out.iter().find(|o| **o != Outcome::Stored)
        );
        let (ready, _) = inbox.ready_records(i64::MAX, n, &HashSet::new())?;
        let mut tasks = tokio::task::JoinSet::new();
        for r in ready {
            let inbox = inbox.clone();
            tasks.spawn(async move { inbox.change(Change::Sent(r.seq)).await });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        done += n;
        if done >= next_report {
            let (rss, hwm) = rss();
            println!(
                "  {done:>8} ids  {:>6.1} s  VmRSS {rss:6.1} MB  VmHWM {hwm:6.1} MB",
                started.elapsed().as_secs_f64()
            );
            next_report += 100_000;
        }
    }
    let (ids, heap) = inbox.dedupe_footprint();
    let (rss_fill, hwm_fill) = rss();
    println!(
        "filled {ids} ids in {:.1} s ({:.0} ids/s); process before open {rss0:.1} MB",
        started.elapsed().as_secs_f64(),
        ids as f64 / started.elapsed().as_secs_f64()
    );
    println!(
        "  running inbox : VmRSS {rss_fill:.1} MB  VmHWM {hwm_fill:.1} MB; dedupe set {:.1} MB \
         ({:.1} bytes per id)",
        heap as f64 / 1048576.0,
        heap as f64 / ids.max(1) as f64
    );
    inbox.close();
    drop(inbox);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // sled's directory and the archived history beside it.
    let disk = du(&path) + du(&path.with_file_name("inbox.dedupe"));
    println!(
        "  on disk       : {:.1} MB ({:.0} bytes per id)",
        disk as f64 / 1048576.0,
        disk as f64 / ids.max(1) as f64
    );
    let ids_file = path.with_extension("ids");
    let mut text = String::with_capacity(sample.len() * 33);
    for id in &sample {
        text.push_str(&hex::encode(id.as_bytes()));
        text.push('\n');
    }
    std::fs::write(&ids_file, text)?;
    // The reopen runs in a fresh process: an agent restarting on this data.
    let exe = std::env::current_exe().context("own path")?;
    let out = tokio::process::Command::new(exe)
        .arg("--reopen")
        .arg(&path)
        .args(["--cache-mb", &args.cache_mb.to_string()])
        .args(["--limit-mb", &args.limit_mb.to_string()])
        .output()
        .await?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if args.keep {
        println!("scratch kept in {}", scratch.keep().display());
    }
    Ok(out.status.success())
}

async fn reopen(path: &Path, args: &Args) -> anyhow::Result<bool> {
    let started = Instant::now();
    let inbox = {
        let (p, cfg) = (path.to_path_buf(), config(args));
        tokio::task::spawn_blocking(move || Inbox::open(&p, cfg, validator())).await??
    };
    let opened = started.elapsed();
    let (ids, heap) = inbox.dedupe_footprint();
    let (rss_open, hwm_open) = rss();
    let text = std::fs::read_to_string(path.with_extension("ids"))?;
    let mut sample = Vec::new();
    for line in text.lines() {
        let b: [u8; 16] = hex::decode(line)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("bad id line"))?;
        sample.push(NotifId(b));
    }
    // A resend of a remembered id must be a duplicate; this also pages sled in, as lookups of
    // a running agent would (they never touch sled: the dedupe set is in memory).
    let mut missing = 0;
    for chunk in sample.chunks(BATCH) {
        let batch: Vec<_> = chunk.iter().map(|id| (*id, vec![])).collect();
        let out = inbox.store("bench".into(), batch).await;
        missing += out.iter().filter(|o| **o != Outcome::Duplicate).count();
    }
    let (rss_after, hwm_after) = rss();
    println!(
        "  reopened      : {ids} ids in {:.1} s; VmRSS {rss_open:.1} MB  VmHWM {hwm_open:.1} MB \
         after open; VmRSS {rss_after:.1} MB  VmHWM {hwm_after:.1} MB after {} resends; dedupe \
         set {:.1} MB",
        opened.as_secs_f64(),
        sample.len(),
        heap as f64 / 1048576.0,
    );
    let within = hwm_after <= args.limit_mb;
    println!(
        "  target        : reopened inbox VmHWM {hwm_after:.1} MB {} {:.0} MB",
        if within { "<=" } else { ">" },
        args.limit_mb
    );
    inbox.close();
    if missing > 0 {
        println!(
            "FAILED: {missing} of {} remembered ids were not duplicates",
            sample.len()
        );
        return Ok(false);
    }
    Ok(true)
}
