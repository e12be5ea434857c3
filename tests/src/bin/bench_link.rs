//! Link benchmark: notifications per second from the mail host's sled outbox to the GSM
//! agent's sled inbox over mutual TLS on loopback, both ends durable (group-committed), plus
//! the ACK latency (from the moment the outbox hands an item to the link client until the
//! client reports it acknowledged).
//!
//! ```text
//! cargo run --release -p mailbell-tests --bin bench_link -- [--count N] [--window W]
//!     [--payload-bytes B] [--mode prefilled|streaming] [--batch 64] [--producers 4]
//! ```
//! Without `--mode` both modes run. `MAILBELL_BENCH_DIR` puts the stores somewhere other than
//! a fresh temporary directory (its `prefilled/` and `streaming/` subdirectories are deleted
//! and recreated; the dev PKI in `pki/` is kept). `--outbox memory` / `--inbox memory` swap a
//! sled store for an in-memory stand-in, to see what each side costs (profiling only).
//!
//! The exit status reports functional failures only (an item not acknowledged, or the inbox
//! holding a different count than was sent), never speed. Results: docs/benchmarks.md.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use mailbell::notify::outbox::{Outbox, OutboxConfig};
use mailbell_gsm_agent::inbox::{Inbox, InboxConfig};
use mailbell_link::memory::MemoryOutbox;
use mailbell_link::net::{
    self, ClientSettings, ClientStats, Endpoint, Inbox as LinkInbox, OutItem, Outbox as LinkOutbox,
    ServerSettings, ServerStats, StoreError,
};
use mailbell_link::pki::{ensure_dev_pki, DevPkiPaths};
use mailbell_link::receiver::{Outcome, ReceiverConfig};
use mailbell_link::sender::SenderConfig;
use mailbell_link::{tls, NotifId, Notification};
use mailbell_tests::cpu::{process_cpu, thread_cpu};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(about = "Link throughput and ACK latency, outbox to inbox over mTLS on loopback")]
struct Args {
    /// Notifications per run.
    #[arg(long, default_value_t = 200_000)]
    count: usize,
    /// Sender window (unacknowledged notifications in flight).
    #[arg(long, default_value_t = 128)]
    window: u16,
    /// Payload size; default: a realistic ~200-byte notice with a Chinese subject.
    #[arg(long)]
    payload_bytes: Option<usize>,
    /// Run one mode only (default: both).
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Streaming: notifications per `Outbox::enqueue` call.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Streaming: concurrent producer tasks (MTA connections).
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Sender store; `memory` removes the sled outbox from the measurement (profiling aid).
    #[arg(long, value_enum, default_value_t = StoreKind::Sled)]
    outbox: StoreKind,
    /// Agent store; `memory` removes the sled inbox from the measurement (profiling aid).
    #[arg(long, value_enum, default_value_t = StoreKind::Sled)]
    inbox: StoreKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum StoreKind {
    /// The real durable sled store.
    Sled,
    /// An in-memory stand-in (not durable).
    Memory,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Fill the outbox first, then measure the drain.
    Prefilled,
    /// Producers enqueue at full speed while the client drains.
    Streaming,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Prefilled => "prefilled",
            Mode::Streaming => "streaming",
        })
    }
}

fn main() -> ExitCode {
    mailbell_tests::bench_main(run(Args::parse()))
}

/// Runs the requested modes; `Ok(false)` on a functional failure.
async fn run(args: Args) -> anyhow::Result<bool> {
    let _tmp;
    let base: PathBuf = match std::env::var_os("MAILBELL_BENCH_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let t = tempfile::tempdir().context("create a temporary directory")?;
            let p = t.path().to_owned();
            _tmp = t;
            p
        }
    };
    std::fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
    let pki = ensure_dev_pki(&base.join("pki"), &["localhost".into()], "mailhost", false)
        .context("dev pki")?;
    let template = notice(args.payload_bytes);
    let payload_len = template.encode_payload().context("encode")?.len();
    println!(
        "bench_link: {} cores, stores under {}, payload {} bytes, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        base.display(),
        payload_len,
        load_average()
    );
    let modes = match args.mode {
        Some(m) => vec![m],
        None => vec![Mode::Prefilled, Mode::Streaming],
    };
    let mut ok = true;
    for mode in modes {
        let r = run_mode(mode, &args, &pki, &base, &template).await?;
        r.print(&args);
        ok &= r.failures.is_empty();
    }
    Ok(ok)
}

/// The 1-minute load average: other work on the machine skews the figures.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// A realistic arrival notice; `bytes` pads the subject to reach that payload size.
fn notice(bytes: Option<usize>) -> Notification {
    let mut n = Notification {
        kind: Default::default(),
        id: NotifId::random(),
        phone: "+8613800138000".into(),
        recipient: "zhang.wei@corp.example.com.cn".into(),
        sole_address: false,
        from_name: "李娜（财务部）".into(),
        from_addr: "li.na@finance.example.com.cn".into(),
        subject: "关于第三季度预算调整的通知及相关附件，请于周五前确认".into(),
        received_at_ms: 1_726_000_000_000,
        language: "zh".into(),
        count: 1,
        max_parts: 0,
        text: None,
    };
    if let Some(want) = bytes {
        n.subject.clear();
        let base = n.encode_payload().map_or(0, |p| p.len());
        let room = want.saturating_sub(base).min(65_535);
        n.subject = "邮".repeat(room / 3) + &"x".repeat(room % 3);
    }
    n
}

/// The outbox as the link client sees it, timing each id from hand-out to acknowledgement.
struct TimedOutbox {
    inner: Arc<dyn LinkOutbox>,
    handed: Mutex<HashMap<NotifId, Instant>>,
    /// Streaming: when each id's enqueue started, for the end-to-end figure.
    enqueued: Mutex<HashMap<NotifId, Instant>>,
    ack_us: Mutex<Histogram<u64>>,
    e2e_us: Mutex<Histogram<u64>>,
    acked: AtomicU64,
    target: u64,
    done: Notify,
    ready_ns: AtomicU64,
    ready_calls: AtomicU64,
    acked_ns: AtomicU64,
    acked_calls: AtomicU64,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).context("histogram")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl LinkOutbox for TimedOutbox {
    fn ready(&self, after: Option<u64>, max: usize) -> Result<Vec<OutItem>, StoreError> {
        let t0 = Instant::now();
        let items = self.inner.ready(after, max)?;
        let t1 = Instant::now();
        self.ready_ns.fetch_add(nanos(t1 - t0), Ordering::Relaxed);
        self.ready_calls.fetch_add(1, Ordering::Relaxed);
        if !items.is_empty() {
            let mut handed = lock(&self.handed);
            for it in &items {
                handed.insert(it.id, t1);
            }
        }
        Ok(items)
    }

    fn acked(&self, ids: &[NotifId]) -> Result<(), StoreError> {
        let t0 = Instant::now();
        self.inner.acked(ids)?;
        self.acked_ns
            .fetch_add(nanos(t0.elapsed()), Ordering::Relaxed);
        self.acked_calls.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut n = 0;
        {
            let mut handed = lock(&self.handed);
            let mut hist = lock(&self.ack_us);
            for id in ids {
                if let Some(t) = handed.remove(id) {
                    hist.saturating_record(micros(now - t));
                    n += 1;
                }
            }
        }
        {
            let mut enq = lock(&self.enqueued);
            if !enq.is_empty() {
                let mut hist = lock(&self.e2e_us);
                for id in ids {
                    if let Some(t) = enq.remove(id) {
                        hist.saturating_record(micros(now - t));
                    }
                }
            }
        }
        if self.acked.fetch_add(n, Ordering::AcqRel) + n >= self.target {
            self.done.notify_one();
        }
        Ok(())
    }

    fn dead_letter(&self, id: NotifId, reason: &str) -> Result<(), StoreError> {
        self.inner.dead_letter(id, reason)
    }

    fn retry_later(&self, id: NotifId, after: Duration, reason: &str) -> Result<(), StoreError> {
        self.inner.retry_later(id, after, reason)
    }

    fn notifier(&self) -> Arc<Notify> {
        self.inner.notifier()
    }
}

/// The sender's store under test.
#[derive(Clone)]
enum SenderStore {
    Sled(Outbox),
    Memory(Arc<MemoryOutbox>),
}

impl SenderStore {
    async fn enqueue(&self, batch: &[Notification]) -> anyhow::Result<()> {
        match self {
            SenderStore::Sled(o) => {
                o.enqueue(batch.to_vec()).await?;
            }
            SenderStore::Memory(m) => {
                for n in batch {
                    m.push(n.id, n.encode_payload()?);
                }
            }
        }
        Ok(())
    }

    fn as_link(&self) -> Arc<dyn LinkOutbox> {
        match self {
            SenderStore::Sled(o) => Arc::new(o.clone()),
            SenderStore::Memory(m) => m.clone(),
        }
    }

    fn depth(&self) -> u64 {
        match self {
            SenderStore::Sled(o) => o.depth(),
            SenderStore::Memory(m) => m.pending() as u64,
        }
    }
}

/// The agent's store under test.
#[derive(Clone)]
enum AgentStore {
    Sled(Inbox),
    /// Acknowledges everything at once (de-duplicating), durable nowhere.
    Memory(Arc<Mutex<std::collections::HashSet<NotifId>>>),
}

/// The agent's inbox, timing each stored batch (queueing + group commit + fsync).
#[derive(Clone)]
struct TimedInbox {
    inner: AgentStore,
    store_ns: Arc<AtomicU64>,
    store_calls: Arc<AtomicU64>,
}

impl LinkInbox for TimedInbox {
    /// Hands the batch to the store at once (the inbox queues it for its committer before
    /// the future is first polled), so the wrapper does not serialise the group commit.
    fn store(
        &self,
        peer: Arc<str>,
        batch: Vec<(NotifId, Vec<u8>)>,
    ) -> impl std::future::Future<Output = Vec<Outcome>> + Send {
        let t0 = Instant::now();
        let sled = match &self.inner {
            AgentStore::Sled(inbox) => Some(inbox.store(peer, batch.clone())),
            AgentStore::Memory(_) => None,
        };
        async move {
            let out = match (sled, &self.inner) {
                (Some(f), _) => f.await,
                (None, AgentStore::Memory(seen)) => {
                    let mut seen = lock(seen);
                    batch
                        .into_iter()
                        .map(|(id, _)| {
                            if seen.insert(id) {
                                Outcome::Stored
                            } else {
                                Outcome::Duplicate
                            }
                        })
                        .collect()
                }
                (None, AgentStore::Sled(_)) => Vec::new(),
            };
            self.store_ns
                .fetch_add(nanos(t0.elapsed()), Ordering::Relaxed);
            self.store_calls.fetch_add(1, Ordering::Relaxed);
            out
        }
    }
}

struct Report {
    mode: Mode,
    stores: (StoreKind, StoreKind),
    count: usize,
    window: u16,
    elapsed: Duration,
    prefill: Option<Duration>,
    /// Streaming: when the producers had enqueued everything.
    produced: Option<Duration>,
    ack: Histogram<u64>,
    e2e: Option<Histogram<u64>>,
    agent_commits: u64,
    agent_stored: u64,
    agent_store_calls: u64,
    agent_store_ns: u64,
    outbox_commits: u64,
    outbox_flushes: u64,
    ready_calls: u64,
    ready_ns: u64,
    acked_calls: u64,
    acked_ns: u64,
    sessions: u64,
    cpu_ticks: u64,
    threads: Vec<(String, u64)>,
    failures: Vec<String>,
}

const TICKS_PER_SEC: f64 = 100.0;

impl Report {
    fn print(&self, args: &Args) {
        let secs = self.elapsed.as_secs_f64();
        let rate = self.count as f64 / secs;
        let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p);
        println!();
        println!("== link {} ==", self.mode);
        if self.stores != (StoreKind::Sled, StoreKind::Sled) {
            println!(
                "stores             outbox {:?}, inbox {:?} (profiling run, not durable)",
                self.stores.0, self.stores.1
            );
        }
        println!("count              {}", self.count);
        println!("window             {}", self.window);
        if self.mode == Mode::Streaming {
            println!(
                "producers          {} x enqueue({})",
                args.producers, args.batch
            );
        }
        if let Some(p) = self.prefill {
            println!(
                "prefill            {:.3} s ({:.0}/s into the outbox)",
                p.as_secs_f64(),
                self.count as f64 / p.as_secs_f64()
            );
        }
        if let Some(p) = self.produced {
            println!(
                "enqueued           all after {:.3} s ({:.0}/s into the outbox while draining)",
                p.as_secs_f64(),
                self.count as f64 / p.as_secs_f64()
            );
        }
        println!("elapsed            {secs:.3} s");
        println!("notifications/s    {rate:.0}");
        println!(
            "ack latency µs     p50 {}  p90 {}  p99 {}  max {}  (ready -> acked)",
            q(&self.ack, 0.5),
            q(&self.ack, 0.9),
            q(&self.ack, 0.99),
            self.ack.max()
        );
        if let Some(h) = &self.e2e {
            println!(
                "end-to-end µs      p50 {}  p90 {}  p99 {}  max {}  (enqueue call -> acked)",
                q(h, 0.5),
                q(h, 0.9),
                q(h, 0.99),
                h.max()
            );
        }
        let per = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
        println!(
            "agent commits      {}  ({:.1} items/commit), store() mean {:.0} µs over {} batches",
            self.agent_commits,
            per(self.agent_stored, self.agent_commits),
            per(self.agent_store_ns, self.agent_store_calls) / 1e3,
            self.agent_store_calls
        );
        println!(
            "outbox flushes     {} ({} group commits)",
            self.outbox_flushes, self.outbox_commits
        );
        println!(
            "outbox ready()     {} calls, mean {:.1} µs, total {:.3} s",
            self.ready_calls,
            per(self.ready_ns, self.ready_calls) / 1e3,
            self.ready_ns as f64 / 1e9
        );
        println!(
            "outbox acked()     {} calls, mean {:.1} µs, total {:.3} s",
            self.acked_calls,
            per(self.acked_ns, self.acked_calls) / 1e3,
            self.acked_ns as f64 / 1e9
        );
        println!("link sessions      {}", self.sessions);
        let cpu = self.cpu_ticks as f64 / TICKS_PER_SEC;
        println!(
            "process cpu        {cpu:.2} s ({:.0}% of one core, {:.1} µs/notification)",
            100.0 * cpu / secs,
            cpu * 1e6 / self.count as f64
        );
        let shown: Vec<String> = self
            .threads
            .iter()
            .filter(|(_, t)| *t > 0)
            .map(|(n, t)| format!("{n} {:.2}s", *t as f64 / TICKS_PER_SEC))
            .collect();
        println!("cpu by thread      {}", shown.join(", "));
        if self.failures.is_empty() {
            println!("result             ok");
        } else {
            for f in &self.failures {
                println!("FAILED             {f}");
            }
        }
    }
}

fn fresh_dir(base: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let d = base.join(name);
    if d.exists() {
        std::fs::remove_dir_all(&d).with_context(|| format!("remove {}", d.display()))?;
    }
    std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
    Ok(d)
}

async fn run_mode(
    mode: Mode,
    args: &Args,
    pki: &DevPkiPaths,
    base: &Path,
    template: &Notification,
) -> anyhow::Result<Report> {
    let dir = fresh_dir(base, &mode.to_string())?;
    let count = args.count;

    // Agent: durable sled inbox behind the mTLS listener.
    let agent = match args.inbox {
        StoreKind::Sled => AgentStore::Sled(
            Inbox::open(
                &dir.join("agent-inbox"),
                InboxConfig {
                    max_queued: u64::MAX,
                    ..Default::default()
                },
                Arc::new(|_: &Notification| Ok(())),
            )
            .context("open the agent inbox")?,
        ),
        StoreKind::Memory => AgentStore::Memory(Arc::default()),
    };
    let timed_inbox = TimedInbox {
        inner: agent.clone(),
        store_ns: Arc::default(),
        store_calls: Arc::default(),
    };
    let server = Arc::new(ServerSettings {
        tls: tls::server_config(&pki.server_files(vec![])).context("server tls")?,
        allowed_client_names: vec![],
        receiver: ReceiverConfig::default(),
        handshake_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(10),
        max_sessions: 4,
        unproven: net::UnprovenLimits::default(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.context("bind")?;
    let addr = listener.local_addr().context("local addr")?.to_string();
    let stop_server = CancellationToken::new();
    let server_task = tokio::spawn(net::serve(
        listener,
        server,
        timed_inbox.clone(),
        stop_server.clone(),
        Arc::new(ServerStats::default()),
    ));

    // Mail host: durable sled outbox.
    let sender = match args.outbox {
        StoreKind::Sled => SenderStore::Sled(
            Outbox::open(
                &dir.join("outbox"),
                OutboxConfig {
                    max_depth: u64::MAX,
                    ..Default::default()
                },
            )
            .context("open the outbox")?,
        ),
        StoreKind::Memory => SenderStore::Memory(Arc::default()),
    };
    let notices: Vec<Notification> = (0..count)
        .map(|_| Notification {
            id: NotifId::random(),
            ..template.clone()
        })
        .collect();
    let timed = Arc::new(TimedOutbox {
        inner: sender.as_link(),
        handed: Mutex::new(HashMap::with_capacity(1024)),
        enqueued: Mutex::new(HashMap::new()),
        ack_us: Mutex::new(histogram()?),
        e2e_us: Mutex::new(histogram()?),
        acked: AtomicU64::new(0),
        target: count as u64,
        done: Notify::new(),
        ready_ns: AtomicU64::new(0),
        ready_calls: AtomicU64::new(0),
        acked_ns: AtomicU64::new(0),
        acked_calls: AtomicU64::new(0),
    });

    let mut prefill = None;
    if mode == Mode::Prefilled {
        let t = Instant::now();
        for chunk in notices.chunks(1024) {
            sender.enqueue(chunk).await.context("prefill")?;
        }
        prefill = Some(t.elapsed());
    }

    let client = ClientSettings {
        agents: vec![Endpoint {
            addr,
            server_name: "localhost".into(),
        }],
        tls: tls::client_config(&pki.client_files()).context("client tls")?,
        sender: SenderConfig {
            window: args.window,
            ..Default::default()
        },
        connect_timeout: Duration::from_secs(2),
        io_timeout: Duration::from_secs(10),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_secs(1),
    };
    let stop_client = CancellationToken::new();
    let client_stats = Arc::new(ClientStats::default());
    let cpu0 = process_cpu();
    let threads0 = thread_cpu();
    let started = Instant::now();
    let client_task = tokio::spawn(net::run_client(
        client,
        timed.clone(),
        stop_client.clone(),
        client_stats.clone(),
    ));

    let mut producers = Vec::new();
    if mode == Mode::Streaming {
        let per = count.div_ceil(args.producers.max(1));
        for share in notices.chunks(per.max(1)) {
            let share = share.to_vec();
            let sender = sender.clone();
            let timed = timed.clone();
            let batch = args.batch.max(1);
            producers.push(tokio::spawn(async move {
                for chunk in share.chunks(batch) {
                    {
                        let now = Instant::now();
                        let mut enq = lock(&timed.enqueued);
                        for n in chunk {
                            enq.insert(n.id, now);
                        }
                    }
                    sender.enqueue(chunk).await?;
                }
                anyhow::Ok(())
            }));
        }
    }

    let mut failures = Vec::new();
    for p in producers {
        match p.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("enqueue failed: {e:#}")),
            Err(e) => failures.push(format!("producer task failed: {e}")),
        }
    }
    let produced = (mode == Mode::Streaming).then(|| started.elapsed());
    let deadline = Duration::from_secs(60) + Duration::from_millis(count as u64 / 2);
    let finished = tokio::time::timeout(deadline, async {
        while timed.acked.load(Ordering::Acquire) < count as u64 {
            let notified = timed.done.notified();
            if timed.acked.load(Ordering::Acquire) >= count as u64 {
                break;
            }
            // Wakes on completion; the periodic check covers a notification lost to a race.
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    })
    .await;
    let elapsed = started.elapsed();
    let cpu_ticks = process_cpu().saturating_sub(cpu0);
    let threads1 = thread_cpu();
    if finished.is_err() {
        failures.push(format!(
            "only {} of {count} acknowledged after {deadline:?}",
            timed.acked.load(Ordering::Acquire)
        ));
    }

    stop_client.cancel();
    let _ = client_task.await;
    stop_server.cancel();
    match server_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => failures.push(format!("server failed: {e}")),
        Err(e) => failures.push(format!("server task failed: {e}")),
    }
    let (agent_stored, agent_held, agent_commits) = match &agent {
        AgentStore::Sled(inbox) => {
            inbox.close();
            (
                inbox.stats.stored.load(Ordering::Relaxed),
                inbox.stats.queued.load(Ordering::Relaxed),
                inbox.stats.commits.load(Ordering::Relaxed),
            )
        }
        AgentStore::Memory(seen) => {
            let n = lock(seen).len() as u64;
            (n, n, 0)
        }
    };
    let (outbox_commits, outbox_flushes) = match &sender {
        SenderStore::Sled(o) => {
            o.close();
            (
                o.stats.commits.load(Ordering::Relaxed),
                o.stats.flushes.load(Ordering::Relaxed),
            )
        }
        SenderStore::Memory(_) => (0, 0),
    };

    if agent_stored != count as u64 || agent_held != count as u64 {
        failures.push(format!(
            "agent inbox stored {agent_stored} and holds {agent_held}, expected {count}"
        ));
    }
    if sender.depth() != 0 {
        failures.push(format!("outbox still holds {}", sender.depth()));
    }

    let mut by_name: HashMap<String, u64> = HashMap::new();
    for ((tid, name), t1) in &threads1 {
        let t0 = threads0.get(&(*tid, name.clone())).copied().unwrap_or(0);
        *by_name.entry(name.clone()).or_default() += t1.saturating_sub(t0);
    }
    let named: u64 = by_name.values().sum();
    by_name.insert("(exited)".into(), cpu_ticks.saturating_sub(named));
    let mut threads: Vec<(String, u64)> = by_name.into_iter().collect();
    threads.sort_by_key(|t| std::cmp::Reverse(t.1));

    let e2e = (mode == Mode::Streaming).then(|| lock(&timed.e2e_us).clone());
    let report = Report {
        mode,
        stores: (args.outbox, args.inbox),
        count,
        window: args.window,
        elapsed,
        prefill,
        produced,
        ack: lock(&timed.ack_us).clone(),
        e2e,
        agent_commits,
        agent_stored,
        agent_store_calls: timed_inbox.store_calls.load(Ordering::Relaxed),
        agent_store_ns: timed_inbox.store_ns.load(Ordering::Relaxed),
        outbox_commits,
        outbox_flushes,
        ready_calls: timed.ready_calls.load(Ordering::Relaxed),
        ready_ns: timed.ready_ns.load(Ordering::Relaxed),
        acked_calls: timed.acked_calls.load(Ordering::Relaxed),
        acked_ns: timed.acked_ns.load(Ordering::Relaxed),
        sessions: client_stats.sessions.load(Ordering::Relaxed),
        cpu_ticks,
        threads,
        failures,
    };
    if report.ack.is_empty() && count > 0 {
        bail!("no acknowledgement was timed");
    }
    Ok(report)
}
