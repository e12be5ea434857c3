//! `mailbell-demo`: the whole system on one machine, on embedded defaults: the mail side
//! (`mailbell serve`: Stalwart MTA hook + webhooks, milter, admin API), a GSM agent on a
//! simulated modem, the mutual-TLS link between them with a self-generated dev PKI. It
//! registers a demo user, plays a Stalwart delivery of a Chinese message through the real MTA
//! hook and a signed webhook, and prints the SMS the modem received. Then it keeps serving
//! (Ctrl-C stops it) so that a real MTA can be pointed at it; `--once` exits instead.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use mailbell::users::User;
use mailbell_tests::system::{self, ADMIN_TOKEN};

#[derive(Parser)]
struct Args {
    /// State directory (default: var/demo under the current directory).
    #[arg(long, default_value = "var/demo")]
    dir: PathBuf,
    /// Exit after the sample message instead of serving until Ctrl-C.
    #[arg(long)]
    once: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    mailbell_tests::bench_main(run(args))
}

async fn run(args: Args) -> anyhow::Result<bool> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let sys = system::start(&args.dir, |_, _| {}).await?;
    let users = sys.mail.stores.users.clone();
    let mut alice = User::new("alice@example.com");
    alice.phone = "+8613800138000".into();
    alice.language = "zh".into();
    alice.aliases = vec!["a.li@example.com".into()];
    users.upsert(alice)?;

    let m = &sys.mail;
    println!("mailbell demo (state in {})", args.dir.display());
    if let Some(a) = m.http_addr {
        println!("  Stalwart MTA hook : http://{a}/stalwart/mta-hook   webhook: http://{a}/stalwart/events");
    }
    if let Some(a) = m.milter_addr {
        println!("  milter            : inet:{a}   (Postfix: smtpd_milters = inet:{a})");
    }
    if let Some(a) = m.admin_addr {
        println!("  admin API         : http://{a}/admin/v1/users  (Bearer {ADMIN_TOKEN}); metrics: http://{a}/metrics");
    }
    println!(
        "  GSM agent link    : {} (mutual TLS, dev PKI in {})",
        sys.agent.link_addr,
        args.dir.join("pki").display()
    );
    if let Some(sim) = &sys.agent.sim {
        println!("  simulated modem   : {}", sim.device_path().display());
    }
    println!(
        "  registered user   : alice@example.com (alias a.li@example.com) -> +86138****8000, zh"
    );

    sys.wait_modems_ready(Duration::from_secs(30)).await?;
    let queue_id: u64 = 0x04bf_063f_d080_036e;
    let before = sys.pdu_count();
    let t0 = Instant::now();
    let req = system::hook_data_request(
        queue_id,
        "zhang.wei@remote.example",
        &["a.li@example.com", "nobody@example.com"],
        &[
            ("From", "=?UTF-8?B?5byg5Lyf?= <zhang.wei@remote.example>"),
            ("To", "a.li@example.com"),
            (
                "Subject",
                "=?UTF-8?B?5YWz5LqO5LiL5ZGo6aG555uu6K+E5a6h5Lya6K6u55qE5a6J5o6S?=",
            ),
            ("Message-ID", "<demo@remote.example>"),
        ],
        "您好，\r\n附件是会议议程。\r\n",
    );
    let (status, answer) = sys.hook(&req).await?;
    println!("  MTA hook (data)   : HTTP {status} {answer}");
    let (status, _) = sys.webhook(&system::ham_batch(queue_id, 2)).await?;
    println!("  webhook (ham)     : HTTP {status} (signed, delivery confirmed)");
    let pdus = sys.wait_pdus(before, Duration::from_secs(10)).await?;
    let elapsed = t0.elapsed();
    let mut ok = true;
    for p in &pdus {
        let (to, text) = system::decode(p)?;
        println!(
            "  modem received    : AT+CMGS={} to {}",
            p.tpdu_len,
            mask(&to)
        );
        println!("  PDU               : {}", p.hex);
        println!("  SMS text          : {text}");
        ok &= text.contains("关于下周项目评审会议的安排") && text.contains("张伟");
    }
    println!(
        "  hook -> modem     : {:.1} ms",
        elapsed.as_secs_f64() * 1000.0
    );
    if !args.once {
        let cli = sys.write_cli_config()?;
        println!(
            "serving; Ctrl-C stops. Try: mailbell --config {} user list, or point an MTA at the endpoints above.",
            cli.display()
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    sys.stop().await;
    Ok(ok)
}

fn mask(p: &str) -> String {
    mailbell::admin::ops::mask_phone(p)
}
