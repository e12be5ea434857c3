//! How fast the meter store makes records durable: the ingest rate billing will need
//! (≥ 100,000 records/s), on the disk under the temp directory (`TMPDIR`).
//!
//! - interval: one producer appends 300,000 session records (each with one message, about
//!   450 bytes) as fast as it can, then waits for the last commit; the writer groups them
//!   (one write + one fdatasync per group). Records/s durable, MB/s, commits.
//! - per-session: 64 tasks each append a record and wait until it is durable (`sync =
//!   "per-session"`), 20,000 records in all; records/s and the p50/p99 wait per record.
//!
//! Run: `cargo bench -p mailbell --bench meter_append`. Prints figures; exits non-zero only
//! when a record is missing or duplicated, never because of speed.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mailbell::meter::{
    Entry, Login, Message, MeterConfig, MeterQuery, MeterStore, Protocol, Session, Sync,
};

fn record(n: u64) -> Entry {
    Entry::Session(Session {
        session: mailbell::meter::new_session_id(),
        account: Some(format!("user{}", n % 1000)),
        client: "192.0.2.10:50123"
            .parse()
            .unwrap_or(([127, 0, 0, 1], 1).into()),
        protocol: Protocol::Pop3,
        listener: "pop3s".into(),
        tls: true,
        start_ms: 1_796_000_000_000,
        end_ms: 1_796_000_001_000,
        login: Login::Ok,
        bytes_to_client: 52_000,
        bytes_to_backend: 60,
        messages: 1,
        message_bytes: 51_000,
        end: "backend closed the connection".into(),
        retrieved: vec![Message {
            msg: 1,
            uidl: Some(format!("{n:016x}")),
            bytes: 51_000,
            complete: true,
            ..Message::default()
        }],
    })
}

/// Reads every record back; true when the ids are 1..=n in order.
fn check(store: &MeterStore, n: u64) -> bool {
    let mut after = None;
    let mut want = 1;
    loop {
        let page = match store.query(&MeterQuery {
            after,
            limit: mailbell::meter::MAX_QUERY_LIMIT,
            ..MeterQuery::default()
        }) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("query failed: {e}");
                return false;
            }
        };
        for r in &page.records {
            if r.id != want {
                eprintln!("id {} where {want} was expected", r.id);
                return false;
            }
            want += 1;
        }
        match page.next_after {
            Some(a) => after = Some(a),
            None => return want == n + 1,
        }
    }
}

fn interval(n: u64) -> Result<bool, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = MeterStore::open(dir.path(), MeterConfig::default())?;
    let t = Instant::now();
    let mut k = 0;
    while k < n {
        // The backlog cap is the producer's back-pressure here.
        match store.append(vec![record(k)]) {
            Ok(()) => k += 1,
            Err(_) => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    store.flush()?;
    let secs = t.elapsed().as_secs_f64();
    let st = store.stats();
    let bytes = st.bytes.load(Ordering::Relaxed);
    println!(
        "interval:    {n} records durable in {secs:.2} s = {:.0} records/s, {:.1} MB/s, {} commits",
        n as f64 / secs,
        bytes as f64 / secs / 1e6,
        st.commits.load(Ordering::Relaxed)
    );
    Ok(check(&store, n))
}

fn per_session(n: u64, tasks: u64) -> Result<bool, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let cfg = MeterConfig {
        sync: Sync::PerSession,
        ..MeterConfig::default()
    };
    let store = MeterStore::open(dir.path(), cfg)?;
    let rt = tokio::runtime::Runtime::new()?;
    let t = Instant::now();
    let mut waits: Vec<Duration> = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for k in 0..tasks {
            let store = store.clone();
            set.spawn(async move {
                let mut waits = Vec::new();
                for i in 0..n / tasks {
                    let t = Instant::now();
                    if store.append_durable(vec![record(k * n + i)]).await.is_err() {
                        break;
                    }
                    waits.push(t.elapsed());
                }
                waits
            });
        }
        let mut all = Vec::new();
        while let Some(w) = set.join_next().await {
            all.extend(w.unwrap_or_default());
        }
        all
    });
    let secs = t.elapsed().as_secs_f64();
    waits.sort();
    let pct = |p: f64| {
        waits
            .get((waits.len() as f64 * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    let done = waits.len() as u64;
    println!(
        "per-session: {done} records, {tasks} waiting at once, in {secs:.2} s = {:.0} records/s, \
         {} commits, wait p50 {:.2} ms p99 {:.2} ms",
        done as f64 / secs,
        store.stats().commits.load(Ordering::Relaxed),
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
    );
    Ok(done == n / tasks * tasks && check(&store, done))
}

fn main() -> ExitCode {
    let runs = [interval(300_000), per_session(20_000, 64)];
    let mut ok = true;
    for r in runs {
        match r {
            Ok(true) => {}
            Ok(false) => ok = false,
            Err(e) => {
                eprintln!("meter_append: {e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
