//! Agent benchmark: latency from a notice leaving the mail host to its PDU at a zero-latency
//! simulated modem at a steady rate, and sustained SMS/s through one such modem.
//!
//! Run: `cargo run --release -p mailbell-tests --bin bench_agent`. Prints figures; exits
//! non-zero only when a notice is lost or sent twice, never because of speed.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use mailbell_gsm_agent::app;
use mailbell_gsm_agent::config::Config;
use mailbell_gsm_agent::modem::pdu::decode_submit;
use mailbell_link::{NotifId, Notification};
use mailbell_tests::feed::LinkFeed;

#[derive(Parser)]
struct Args {
    /// Notices per second in the latency phase.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Length of the latency phase, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Notices in the throughput phase.
    #[arg(long, default_value_t = 5000)]
    burst: usize,
}

fn notice(tag: &str, i: usize) -> Notification {
    Notification {
        kind: Default::default(),
        id: NotifId::random(),
        phone: "+8613800138000".into(),
        recipient: "alice@example.com".into(),
        sole_address: false,
        from_name: "张伟".into(),
        from_addr: "zhang.wei@example.cn".into(),
        subject: format!("{tag} {i}"),
        received_at_ms: 0,
        language: "en".into(),
        count: 1,
        max_parts: 0,
        text: Some(format!("{tag} #{i}")),
    }
}

/// Arrival time at the modem of each "<tag> #i".
fn arrivals(sim: &mailbell_gsm_agent::sim::SimModem, tag: &str) -> HashMap<usize, Vec<Instant>> {
    let mut m: HashMap<usize, Vec<Instant>> = HashMap::new();
    for p in sim.received() {
        let Ok(d) = decode_submit(&p.hex) else {
            continue;
        };
        if let Some(i) = d
            .text
            .strip_prefix(&format!("{tag} #"))
            .and_then(|s| s.parse().ok())
        {
            m.entry(i).or_default().push(p.at);
        }
    }
    m
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let dir = match std::env::var_os("MAILBELL_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let mut cfg = Config::from_toml("", "bench")?;
    cfg.data_dir = dir.path().to_path_buf();
    cfg.simulator.enable = cfg.modems.is_empty();
    cfg.link.listen = "127.0.0.1:0".parse()?;
    cfg.metrics_listen = None;
    if let mailbell_gsm_agent::config::LinkTls::DevPki { dir: d, .. } = &mut cfg.link.tls {
        *d = dir.path().join("pki");
    }
    let running = app::start(cfg.clone()).await?;
    let tls_files = app::client_tls(&cfg, None)?;
    let feed = LinkFeed::start(&running.link_addr.to_string(), &tls_files)?;
    let outbox = feed.outbox.clone();
    let sim = running
        .sim
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("bench needs the simulated modem"))?;
    // Warm up: the modem initialises and the link connects.
    let n = notice("warmup", 0);
    outbox.push(n.id, n.encode_payload()?);
    let t = Instant::now();
    while arrivals(sim, "warmup").is_empty() {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(30),
            "warm-up SMS never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Phase 1: steady rate, latency from push to PDU at the modem.
    let total = (args.rate * args.seconds) as usize;
    let period = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let mut pushed = Vec::with_capacity(total);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..total {
        tick.tick().await;
        let n = notice("lat", i);
        let payload = n.encode_payload()?;
        pushed.push(Instant::now());
        outbox.push(n.id, payload);
    }
    let t = Instant::now();
    while arrivals(sim, "lat").len() < total && t.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = arrivals(sim, "lat");
    let mut hist = Histogram::<u64>::new(3)?;
    let mut ok = got.len() == total;
    for (i, at) in &got {
        if at.len() != 1 {
            ok = false;
        }
        hist.record(at[0].saturating_duration_since(pushed[*i]).as_micros() as u64)?;
    }
    println!("agent latency: {total} notices at {}/s over mTLS, push -> complete PDU at a zero-latency simulated modem", args.rate);
    println!(
        "  received {} of {total}; p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (target p99 < 10 ms)",
        got.len(),
        hist.value_at_quantile(0.50) as f64 / 1000.0,
        hist.value_at_quantile(0.90) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0
    );

    // Phase 2: a burst, sustained SMS/s through one modem.
    for i in 0..args.burst {
        let n = notice("burst", i);
        outbox.push(n.id, n.encode_payload()?);
    }
    let t = Instant::now();
    while arrivals(sim, "burst").len() < args.burst && t.elapsed() < Duration::from_secs(600) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = arrivals(sim, "burst");
    let times: Vec<Instant> = got.values().flatten().copied().collect();
    if got.len() != args.burst || times.len() != args.burst {
        ok = false;
    }
    if let (Some(first), Some(last)) = (times.iter().min(), times.iter().max()) {
        let secs = last.duration_since(*first).as_secs_f64().max(1e-9);
        println!(
            "agent throughput: {} SMS through one zero-latency simulated modem",
            args.burst
        );
        println!(
            "  {} arrived; {:.0} SMS/s (first to last PDU, {:.2} s)  (target >= 100 SMS/s)",
            got.len(),
            (times.len() - 1) as f64 / secs,
            secs
        );
    }
    feed.stop().await;
    running.stop().await;
    Ok(ok)
}

fn main() -> ExitCode {
    mailbell_tests::bench_main(run(Args::parse()))
}
