//! Billing at the scale (issue 12, "Performance"), on the disk under `--dir` (default
//! `TMPDIR`), every commit durable (`synchronous = FULL`):
//!
//! 1. meter ingest: delivery records through `LedgerStore::record_deliveries` in batches of
//!    1,000 (a Stalwart webhook batch) and 100, against the baseline of one record per call
//!    (one transaction each, a milter message with one recipient), in one fresh SQLite file;
//!    retrieval meter records through `MeterStore::append` + `flush`, against one `flush`
//!    per record;
//! 2. one accounting run over `--accounts` (200,000) and `--deliveries` (9,800,000) delivery
//!    records plus one retrieval session per account (10,000,000 meter records in all), after
//!    a previous day that left one pending transfer per account: wall time and peak RSS of
//!    the run alone (a child process: this binary again, `--phase run`, reading its own
//!    `VmHWM`); the baseline is the same run posting one request per transaction
//!    (`RunSettings::batch = 1`), at full size (`--baseline full`) or on a subset
//!    (`--baseline tenth`, the default: 1/`--fraction` of the accounts and deliveries, 10)
//!    beside the batched run of the same subset, or not at all (`--baseline none`);
//! 3. `billing verify` (`LedgerStore::verify`) over the resulting ledger, in a child too.
//!
//! Run: `cargo bench -p mailbell --bench accounting_run [-- --dir D --accounts N --deliveries N
//! --baseline tenth --fraction 10 --no-ingest]`; `--phase build --data D` builds a data set and
//! keeps it, `--phase run|verify --data D` runs on one (profiling). Prints figures; exits non-zero only when a step fails or verify finds
//! a problem, never because of speed. The data (about 2 GB at full size per copy) is deleted
//! at the end.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use mailbell::billing::ledger::sqlite::SqliteLedger;
use mailbell::billing::ledger::{
    AccountRef, Delivery, Kind, LedgerStore, Posting, Request, StandingRules, Tariff,
};
use mailbell::billing::money::Money;
use mailbell::billing::run::{
    self, ChargeAt, Expiry, Period, Progress, Quiet, RunContext, RunSettings, RunSummary,
};
use mailbell::meter::{
    Entry, Login, Message, MeterConfig, MeterStore, Protocol, Session, MAX_BACKLOG,
};
use mailbell::policy::zones::Zone;

#[path = "common/mod.rs"]
mod common;
use common::{login, peak_rss_kib, users};

type Res<T> = Result<T, String>;

/// The day before the measured one leaves one pending transfer per account.
const DAY1: (i32, u32, u32) = (2026, 11, 9);
const DAY2: (i32, u32, u32) = (2026, 11, 10);
/// Requests per transaction in the batched run (`billing.run_batch`'s default).
const RUN_BATCH: usize = 20_000;
/// Delivery records per `record_deliveries` call while the big ledger is built.
const SETUP_BATCH: usize = 10_000;
/// Messages listed in each retrieval session's meter record.
const MESSAGES_PER_SESSION: u64 = 25;

fn period(d: (i32, u32, u32)) -> Res<Period> {
    let date = NaiveDate::from_ymd_opt(d.0, d.1, d.2).ok_or("bad date")?;
    Period::day(date).map_err(|e| e.to_string())
}

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// Bytes of every file under `p`.
fn disk_bytes(p: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(p)
        .map(|rd| rd.flatten().map(|d| disk_bytes(&d.path())).sum())
        .unwrap_or(0)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn settings(batch: usize) -> RunSettings {
    RunSettings {
        charge: ChargeAt::AtRetrieval,
        pending_expiry_days: 90,
        expired_pending: Expiry::Void,
        rules: StandingRules {
            arrears_below: Money::from_minor(0),
            warn_below: vec![Money::from_minor(10_00)],
        },
        batch,
    }
}

/// A delivery of `k`-th message of the day (message keys grow with `k`, as queue ids do).
fn delivery(k: u64, account: String, zone: Option<Zone>, at_ms: i64) -> Delivery {
    Delivery {
        message_key: format!("stalwart:{k:016x}"),
        account,
        zone,
        bytes: 2_000 + (k.wrapping_mul(2_654_435_761) % 200_000),
        at_ms,
    }
}

/// A successful POP3 session of `account` at `at_ms` that retrieved `count` messages.
fn session(account: String, n: u64, at_ms: i64, count: u64) -> Entry {
    let retrieved: Vec<Message> = (1..=count)
        .map(|m| Message {
            msg: m as u32,
            uidl: Some(format!("{n:08x}{m:08x}")),
            bytes: 51_000,
            complete: true,
            ..Message::default()
        })
        .collect();
    let ip = [10, (n >> 16) as u8, (n >> 8) as u8, n as u8];
    Entry::Session(Session {
        session: mailbell::meter::new_session_id(),
        account: Some(account),
        client: (ip, 40_000 + (n % 20_000) as u16).into(),
        protocol: Protocol::Pop3,
        listener: "pop3s".into(),
        tls: true,
        start_ms: at_ms,
        end_ms: at_ms + 1_000,
        login: Login::Ok,
        bytes_to_client: 51_000 * count + 500,
        bytes_to_backend: 300,
        messages: count,
        message_bytes: 51_000 * count,
        end: "client quit".into(),
        retrieved,
    })
}

/// Appends one record, first waiting while the store's backlog is (nearly) full, its
/// back-pressure; the margin covers appenders on other threads checking at the same time.
fn append(store: &MeterStore, entry: Entry) -> Res<()> {
    while store.stats().backlog.load(Ordering::Relaxed) >= MAX_BACKLOG - 1_000 {
        std::thread::sleep(Duration::from_millis(1));
    }
    store.append(vec![entry]).map_err(e)
}

/// The accounting run of `p`, run some hours after the day ended.
fn run_day(
    l: &mut SqliteLedger,
    meter: Option<&MeterStore>,
    p: &Period,
    batch: usize,
    progress: &dyn Progress,
) -> Res<RunSummary> {
    run::run(
        &mut RunContext {
            store: l,
            meter,
            resolve: &|_| None,
            settings: &settings(batch),
            progress,
            now_ms: &|| p.end_ms + 3_600_000,
        },
        p,
    )
    .map_err(e)
}

// ---------------------------------------------------------------------------------------
// 1. Meter ingest
// ---------------------------------------------------------------------------------------

/// Where the multi-threaded meter ingest's session numbers start (after the others').
fn single_n_gap() -> u64 {
    10_000
}

fn ingest(root: &Path) -> Res<()> {
    let dir = tempfile::tempdir_in(root).map_err(e)?;
    let mut l = SqliteLedger::open(&dir.path().join("ledger.sqlite")).map_err(e)?;
    let t0 = 1_796_860_800_000;
    let mut k = 0u64;
    let mut rate = |l: &mut SqliteLedger, n: u64, per_call: usize| -> Res<f64> {
        let t = Instant::now();
        let mut left = n;
        while left > 0 {
            let m = (per_call as u64).min(left);
            // Stalwart's webhook names no zone: it is looked up (a miss: foreign).
            let batch: Vec<Delivery> = (k..k + m)
                .map(|i| delivery(i, login((i % 200_000) as usize), None, t0 + i as i64))
                .collect();
            let r = l.record_deliveries(&batch).map_err(e)?;
            if r.added != batch.len() {
                return Err(format!("{} of {} records added", r.added, batch.len()));
            }
            k += m;
            left -= m;
        }
        Ok(n as f64 / t.elapsed().as_secs_f64())
    };
    let r1000 = rate(&mut l, 500_000, 1_000)?;
    let r100 = rate(&mut l, 200_000, 100)?;
    let r1 = rate(&mut l, 5_000, 1)?;
    println!(
        "ingest deliveries, 1,000 per call (webhook batch): {r1000:>9.0} records/s durable \
         (500,000 records)"
    );
    println!(
        "ingest deliveries,   100 per call:                 {r100:>9.0} records/s durable \
         (200,000 records)"
    );
    println!(
        "ingest deliveries, baseline 1 per call (1 tx each): {r1:>8.0} records/s durable \
         (5,000 records); ratio 1,000/1 = {:.0}x, 100/1 = {:.0}x",
        r1000 / r1,
        r100 / r1
    );
    drop(l);

    // Sessions that fetched one message and sessions that fetched 25 (about 450 bytes and
    // 2 KB of JSON); the records are made before the clock starts, as the proxy has its
    // record at hand when a session ends.
    for count in [1, MESSAGES_PER_SESSION] {
        let path = dir.path().join(format!("meter-{count}"));
        let meter = MeterStore::open(&path, MeterConfig::default()).map_err(e)?;
        let make = |ids: std::ops::Range<u64>| -> Vec<Entry> {
            ids.map(|i| session(login(i as usize), i, t0, count))
                .collect()
        };
        let n = 200_000u64;
        let records = make(0..n);
        let t = Instant::now();
        for r in records {
            append(&meter, r)?;
        }
        meter.flush().map_err(e)?;
        let one_thread = n as f64 / t.elapsed().as_secs_f64();
        // As the proxy appends: each session's record from the worker thread that ran it,
        // one worker per core.
        let threads = std::thread::available_parallelism().map_or(2, |c| c.get());
        let chunks: Vec<Vec<Entry>> = (0..threads as u64)
            .map(|k| {
                make(
                    n + single_n_gap() + k * n / threads as u64
                        ..n + single_n_gap() + (k + 1) * n / threads as u64,
                )
            })
            .collect();
        let t = Instant::now();
        std::thread::scope(|s| -> Res<()> {
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|c| {
                    let meter = meter.clone();
                    s.spawn(move || -> Res<()> {
                        for r in c {
                            append(&meter, r)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| "an appending thread panicked".to_owned())??;
            }
            Ok(())
        })?;
        meter.flush().map_err(e)?;
        let bulk = n as f64 / t.elapsed().as_secs_f64();
        println!(
            "ingest retrieval meter, {count:>2} message(s) per session, one appending thread: \
             {one_thread:>7.0} records/s durable"
        );
        let single_n = 2_000u64;
        let records = make(n..n + single_n);
        let t = Instant::now();
        for r in records {
            append(&meter, r)?;
            meter.flush().map_err(e)?;
        }
        let single = single_n as f64 / t.elapsed().as_secs_f64();
        println!(
            "ingest retrieval meter, {count:>2} message(s) per session, {threads} appending \
             threads (one per core), append + one flush: {bulk:>7.0} records/s durable ({n} \
             records, ~{} bytes each); baseline flush per record: {single:.0} records/s \
             ({single_n} records); ratio {:.0}x",
            disk_bytes(&path) / (2 * n + single_n),
            bulk / single
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 2. The data set of the run
// ---------------------------------------------------------------------------------------

/// Builds the ledger (`dir/ledger.sqlite`) and the meter store (`dir/meter`): accounts,
/// tariffs, top-ups, the previous day (one pending charge per account) and the measured day
/// (`deliveries` records and one retrieval per account).
fn build(dir: &Path, accounts: usize, deliveries: u64) -> Res<()> {
    let path = dir.join("ledger.sqlite");
    let mut l = SqliteLedger::open(&path).map_err(e)?;
    let t = Instant::now();
    l.put_users(&users(accounts)).map_err(e)?;
    for (class, foreign) in [("staff", 20), ("student", 30)] {
        for (zone, price) in [("free", 0), ("foreign", foreign)] {
            l.put_tariff(&Tariff {
                class: class.into(),
                zone: zone.into(),
                price_per_mb: Money::from_minor(price),
                min_charge: Money::from_minor(0),
            })
            .map_err(e)?;
        }
    }
    // Most accounts well funded; every 7th near a warning, every 50th near arrears.
    for chunk in (0..accounts).collect::<Vec<_>>().chunks(SETUP_BATCH) {
        let reqs: Vec<Request> = chunk
            .iter()
            .map(|&i| Request {
                key: format!("topup-{i}"),
                posting: Posting::Transfer {
                    kind: Kind::Topup,
                    debit: AccountRef::Cash,
                    credit: AccountRef::User(login(i)),
                    amount: Money::from_minor(match i {
                        i if i % 50 == 0 => 1_50,
                        i if i % 7 == 0 => 11_00,
                        _ => 50_00,
                    }),
                    pending: false,
                },
                memo: String::new(),
                at_ms: 1,
            })
            .collect();
        l.post_batch(&reqs).map_err(e)?;
    }
    println!(
        "setup: {accounts} accounts, tariffs, {accounts} top-ups in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The previous day: one foreign delivery per account, no retrieval: all pending.
    let p1 = period(DAY1)?;
    let t = Instant::now();
    for chunk in (0..accounts).collect::<Vec<_>>().chunks(SETUP_BATCH) {
        let batch: Vec<Delivery> = chunk
            .iter()
            .map(|&i| {
                let at = p1.start_ms + (i as i64 * 86_000_000 / accounts as i64);
                let mut d = delivery(i as u64, login(i), Some(Zone::Foreign), at);
                d.message_key = format!("day1:{i:016x}");
                d.bytes = 3_000_000;
                d
            })
            .collect();
        l.record_deliveries(&batch).map_err(e)?;
    }
    let s = run_day(&mut l, None, &p1, RUN_BATCH, &Quiet)?;
    println!(
        "setup: previous day, {} deliveries, {} pending transfers left open, in {:.1} s",
        s.deliveries,
        s.pending,
        t.elapsed().as_secs_f64()
    );

    // The measured day: deliveries in time order, spread evenly over the accounts and the
    // day; a third free-zone.
    let p2 = period(DAY2)?;
    let day = p2.end_ms - p2.start_ms;
    let t = Instant::now();
    let mut k = 0u64;
    while k < deliveries {
        let m = (SETUP_BATCH as u64).min(deliveries - k);
        let batch: Vec<Delivery> = (k..k + m)
            .map(|i| {
                let u = (i.wrapping_mul(2_654_435_761) % accounts as u64) as usize;
                let zone = if i % 3 == 0 {
                    Zone::Free
                } else {
                    Zone::Foreign
                };
                let at =
                    p2.start_ms + (i128::from(i) * i128::from(day) / i128::from(deliveries)) as i64;
                delivery(i, login(u), Some(zone), at)
            })
            .collect();
        l.record_deliveries(&batch).map_err(e)?;
        k += m;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "setup: {deliveries} deliveries in {secs:.1} s ({:.0} records/s durable, {SETUP_BATCH} \
         per call, into a growing table)",
        deliveries as f64 / secs
    );
    drop(l);

    // One retrieval per account at a time spread over the day (written in time order, as
    // the proxy writes them when sessions end): what came after it stays pending.
    let mut rets: Vec<(i64, usize)> = (0..accounts)
        .map(|u| {
            let secs = (u as i64).wrapping_mul(48_271) % 86_390;
            (p2.start_ms + secs * 1_000 + 500, u)
        })
        .collect();
    rets.sort_unstable();
    let clock = Arc::new(AtomicI64::new(p2.start_ms));
    let c = clock.clone();
    let meter = MeterStore::open_with_clock(
        &dir.join("meter"),
        MeterConfig::default(),
        Arc::new(move || c.load(Ordering::Relaxed)),
    )
    .map_err(e)?;
    let t = Instant::now();
    for chunk in rets.chunks(1_000) {
        if let Some(last) = chunk.last() {
            clock.store(last.0 + 1_000, Ordering::Relaxed);
        }
        for &(at, u) in chunk {
            append(
                &meter,
                session(login(u), u as u64, at, MESSAGES_PER_SESSION),
            )?;
        }
    }
    meter.flush().map_err(e)?;
    println!(
        "setup: {accounts} retrieval sessions in {:.1} s; data on disk {:.0} MB",
        t.elapsed().as_secs_f64(),
        mb(disk_bytes(dir))
    );
    Ok(())
}

/// Copies a built data set (the ledger closed, so its WAL is checkpointed).
fn copy_set(from: &Path, to: &Path) -> Res<()> {
    std::fs::create_dir_all(to.join("meter")).map_err(e)?;
    for name in ["ledger.sqlite", "ledger.sqlite-wal"] {
        if from.join(name).exists() {
            std::fs::copy(from.join(name), to.join(name)).map_err(e)?;
        }
    }
    for f in std::fs::read_dir(from.join("meter")).map_err(e)?.flatten() {
        if f.path().is_file() {
            std::fs::copy(f.path(), to.join("meter").join(f.file_name())).map_err(e)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Child phases: the run and verify, each alone in its process
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default, Serialize, Deserialize)]
struct Figures {
    secs: f64,
    peak_rss_kib: u64,
    /// The run's summary, or verify's counts.
    detail: serde_json::Value,
}

/// CPU seconds the calling thread has run (`/proc/thread-self/schedstat`); the run is
/// single-threaded.
fn cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

/// CPU seconds of the whole process so far, exited threads included (`utime + stime` of
/// `/proc/self/stat`, in USER_HZ = 100 ticks a second): the run's thread and the delivery
/// scan's second one.
fn process_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces), from field 3 on.
    let Some(rest) = stat.rsplit_once(')').map(|x| x.1) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Notes when each stage of the run starts (wall and CPU seconds).
struct Stages {
    started: Instant,
    cpu0: f64,
    marks: std::cell::RefCell<Vec<(&'static str, f64, f64)>>,
}

impl Progress for Stages {
    fn stage(&self, name: &'static str, _: u64) {
        let at = self.started.elapsed().as_secs_f64();
        self.marks
            .borrow_mut()
            .push((name, at, cpu_secs() - self.cpu0));
    }
    fn advance(&self, _: u64) {}
}

impl Stages {
    fn new() -> Stages {
        Stages {
            started: Instant::now(),
            cpu0: cpu_secs(),
            marks: Default::default(),
        }
    }

    /// "start 0.4 s (CPU 0.4 s), retrievals 1.0 s (...), ...": "start" is the time before the
    /// first stage (the meter prefix, the plan); "posting" runs to the end (with the finish).
    fn text(&self) -> String {
        let end = (
            "end",
            self.started.elapsed().as_secs_f64(),
            cpu_secs() - self.cpu0,
        );
        let marks = self.marks.borrow();
        let mut out = Vec::new();
        let mut prev = ("start", 0.0, 0.0);
        for &m in marks.iter().chain([end].iter()) {
            out.push(format!(
                "{} {:.1} s (CPU {:.1} s)",
                prev.0,
                m.1 - prev.1,
                m.2 - prev.2
            ));
            prev = m;
        }
        out.join(", ")
    }
}

fn phase_run(dir: &Path, batch: usize) -> Res<Figures> {
    let p2 = period(DAY2)?;
    let mut l = SqliteLedger::open(&dir.join("ledger.sqlite")).map_err(e)?;
    let meter = MeterStore::open_read_only(&dir.join("meter"));
    let cpu0_process = process_cpu_secs();
    let stages = Stages::new();
    let s = run_day(&mut l, Some(&meter), &p2, batch, &stages)?;
    let secs = stages.started.elapsed().as_secs_f64();
    let mut detail = serde_json::to_value(&s).map_err(e)?;
    detail["stages"] = stages.text().into();
    // The stages' CPU is the run's thread; the delivery scan's second thread adds its own.
    detail["cpu_all_threads"] = format!("{:.1}", process_cpu_secs() - cpu0_process).into();
    Ok(Figures {
        secs,
        peak_rss_kib: peak_rss_kib(),
        detail,
    })
}

fn phase_verify(dir: &Path) -> Res<Figures> {
    let l = SqliteLedger::open_read_only(&dir.join("ledger.sqlite")).map_err(e)?;
    let t = Instant::now();
    let r = l.verify().map_err(e)?;
    let secs = t.elapsed().as_secs_f64();
    if let Some(p) = &r.problem {
        return Err(format!("verify found a problem: {p}"));
    }
    Ok(Figures {
        secs,
        peak_rss_kib: peak_rss_kib(),
        detail: serde_json::json!({ "entries": r.entries, "accounts": r.accounts }),
    })
}

/// Runs this binary again with `--phase`; its last stdout line is its [`Figures`].
fn child(args: &[&str]) -> Res<Figures> {
    let exe = std::env::current_exe().map_err(e)?;
    let out = Command::new(exe)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(e)?;
    if !out.status.success() {
        return Err(format!("child {args:?} failed: {}", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).map_err(|x| format!("child {args:?} printed {last:?}: {x}"))
}

fn run_child(dir: &Path, batch: usize) -> Res<Figures> {
    let d = dir.display().to_string();
    let b = batch.to_string();
    child(&["--phase", "run", "--data", &d, "--batch", &b])
}

fn print_run(what: &str, f: &Figures) {
    let d = &f.detail;
    println!(
        "{what}: {:.1} s, peak RSS {:.0} MiB; {} deliveries, {} retrievals, {} charges, {} \
         pending left, {} earlier pending posted, {} new entries, {} effects",
        f.secs,
        f.peak_rss_kib as f64 / 1024.0,
        d["deliveries"],
        d["retrievals"],
        d["charges"],
        d["pending"],
        d["pending_posted"],
        d["new_entries"],
        d["effects"]
    );
    println!(
        "  stages: {}; CPU of all threads {} s",
        d["stages"].as_str().unwrap_or_default(),
        d["cpu_all_threads"].as_str().unwrap_or("?")
    );
}

// ---------------------------------------------------------------------------------------

struct Args {
    phase: Option<String>,
    data: Option<PathBuf>,
    batch: usize,
    dir: Option<PathBuf>,
    accounts: usize,
    deliveries: u64,
    baseline: String,
    /// The subset `--baseline tenth` measures: 1/fraction of the accounts and deliveries.
    fraction: usize,
    ingest: bool,
}

fn args() -> Res<Args> {
    let mut a = Args {
        phase: None,
        data: None,
        batch: RUN_BATCH,
        dir: None,
        accounts: 200_000,
        deliveries: 9_800_000,
        baseline: "tenth".into(),
        fraction: 10,
        ingest: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--phase" => a.phase = Some(v()?),
            "--data" => a.data = Some(v()?.into()),
            "--batch" => a.batch = v()?.parse().map_err(e)?,
            "--dir" => a.dir = Some(v()?.into()),
            "--accounts" => a.accounts = v()?.parse().map_err(e)?,
            "--deliveries" => a.deliveries = v()?.parse().map_err(e)?,
            "--baseline" => a.baseline = v()?,
            "--fraction" => a.fraction = v()?.parse::<usize>().map_err(e)?.max(1),
            "--no-ingest" => a.ingest = false,
            // cargo bench passes --bench.
            _ => {}
        }
    }
    Ok(a)
}

fn orchestrate(a: &Args) -> Res<()> {
    let root = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&root).map_err(e)?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!(
        "machine: {cores} cores, load average {} at start; data under {}",
        load.join(" "),
        root.display()
    );
    if a.ingest {
        ingest(&root)?;
    }
    let tmp = tempfile::tempdir_in(&root).map_err(e)?;
    let full = tmp.path().join("full");
    build(&full, a.accounts, a.deliveries)?;
    let size = disk_bytes(&full);
    let mut base_full = None;
    if a.baseline == "full" {
        let b = tmp.path().join("baseline");
        copy_set(&full, &b)?;
        base_full = Some(b);
    }
    let f = run_child(&full, RUN_BATCH)?;
    print_run(
        &format!(
            "run: {} accounts, {} meter records, {RUN_BATCH} per transaction",
            a.accounts,
            a.deliveries + a.accounts as u64
        ),
        &f,
    );
    let v = child(&["--phase", "verify", "--data", &full.display().to_string()])?;
    println!(
        "verify: {} entries, {} accounts in {:.1} s, peak RSS {:.0} MiB",
        v.detail["entries"],
        v.detail["accounts"],
        v.secs,
        v.peak_rss_kib as f64 / 1024.0
    );
    println!(
        "data on disk: {:.0} MB before the run, {:.0} MB after (ledger file and meter store)",
        mb(size),
        mb(disk_bytes(&full))
    );
    std::fs::remove_dir_all(&full).map_err(e)?;
    match (a.baseline.as_str(), base_full) {
        ("full", Some(b)) => {
            let one = run_child(&b, 1)?;
            print_run("baseline run, 1 request per transaction, same data", &one);
            println!("ratio baseline/batched run time: {:.1}x", one.secs / f.secs);
        }
        ("tenth", _) => {
            let small = tmp.path().join("tenth");
            let (acc, del) = (a.accounts / a.fraction, a.deliveries / a.fraction as u64);
            println!(
                "baseline on a 1/{} subset: {acc} accounts, {del} deliveries",
                a.fraction
            );
            build(&small, acc, del)?;
            let b = tmp.path().join("tenth-1");
            copy_set(&small, &b)?;
            let batched = run_child(&small, RUN_BATCH)?;
            print_run(
                &format!("1/{} run, {RUN_BATCH} per transaction", a.fraction),
                &batched,
            );
            std::fs::remove_dir_all(&small).map_err(e)?;
            let one = run_child(&b, 1)?;
            print_run(
                &format!("1/{} baseline run, 1 request per transaction", a.fraction),
                &one,
            );
            println!(
                "ratio baseline/batched run time on the 1/{} subset: {:.1}x",
                a.fraction,
                one.secs / batched.secs
            );
        }
        _ => {}
    }
    Ok(())
}

fn main() -> ExitCode {
    let r = args().and_then(|a| match (a.phase.as_deref(), &a.data) {
        (Some(p), Some(d)) => {
            let f = match p {
                "run" => phase_run(d, a.batch),
                "verify" => phase_verify(d),
                "ingest" => ingest(d).map(|()| Figures::default()),
                // Builds a data set to keep (profiling: copy it, run `--phase run` on the copy).
                "build" => build(d, a.accounts, a.deliveries).map(|()| Figures::default()),
                other => Err(format!("unknown phase {other:?}")),
            }?;
            println!("{}", serde_json::to_string(&f).map_err(e)?);
            Ok(())
        }
        (Some(_), None) => Err("--phase needs --data".into()),
        _ => orchestrate(&a),
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(x) => {
            eprintln!("accounting_run: {x}");
            ExitCode::FAILURE
        }
    }
}
