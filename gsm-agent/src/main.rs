//! `mailbell-gsm-agent`: arguments → config → tracing → run → exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mailbell_gsm_agent::{app, config::Config};
use mailbell_link::tls::ClientTlsFiles;

#[derive(Parser)]
#[command(
    name = "mailbell-gsm-agent",
    version,
    about = "mailbell GSM agent: arrival notices in, SMS out"
)]
struct Cli {
    /// Log as JSON lines (default: human-readable). Filter with RUST_LOG; NO_COLOR turns colour off.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Serve {
        /// Configuration file (TOML); defaults apply without one.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Send one test SMS through the agent's link and pipeline.
    SendTest {
        /// Destination, E.164 (+8613800138000).
        #[arg(long)]
        to: String,
        /// Literal SMS text.
        #[arg(long)]
        text: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Agent address (default: link.listen from the config).
        #[arg(long)]
        agent: Option<String>,
        /// Name the agent's certificate must carry.
        #[arg(long, default_value = "localhost")]
        server_name: String,
        /// CA, client certificate and key (default: the dev PKI from the config).
        #[arg(long, requires_all = ["cert", "key"])]
        ca: Option<PathBuf>,
        #[arg(long)]
        cert: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Show per-modem state, queue depths and counters of a running agent.
    Status {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Status endpoint (default: metrics.listen from the config).
        #[arg(long)]
        addr: Option<SocketAddr>,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
    /// List the notices the agent gave up on, or send them again.
    DeadLetters {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Agent endpoint (default: metrics.listen from the config).
        #[arg(long)]
        addr: Option<SocketAddr>,
        /// Requeue one dead letter by its seq, or "all" (needs metrics.admin_token).
        #[arg(long)]
        requeue: Option<String>,
    },
    /// Start an agent on a simulated modem, send a sample notice through the real link and
    /// print the SMS the modem received.
    Demo {
        #[arg(long, default_value = "var/demo")]
        dir: PathBuf,
    },
    /// Create a development PKI (CA, agent server certificate, mail-host client certificate).
    Pki {
        #[arg(long, default_value = "var/gsm-agent/pki")]
        dir: PathBuf,
        /// Names (DNS or IP) of the agent certificate.
        #[arg(long = "agent-name", default_values = ["localhost", "127.0.0.1"])]
        agent_names: Vec<String>,
        #[arg(long, default_value = "mailhost")]
        client_name: String,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve { config } => app::serve(Config::load(config.as_deref())?).await,
        Cmd::SendTest {
            to,
            text,
            config,
            agent,
            server_name,
            ca,
            cert,
            key,
        } => {
            let cfg = Config::load(config.as_deref())?;
            let explicit = match (ca, cert, key) {
                (Some(ca), Some(cert), Some(key)) => Some(ClientTlsFiles { ca, cert, key }),
                _ => None,
            };
            let files = app::client_tls(&cfg, explicit)?;
            let agent = agent.unwrap_or_else(|| cfg.link.listen.to_string());
            let mut n = app::sample_notification(&to);
            n.text = Some(text);
            let id = n.id;
            app::send_one(&agent, &server_name, &files, n, Duration::from_secs(20)).await?;
            println!(
                "accepted by the agent at {agent}: notice {id} is durable and queued for a modem"
            );
            Ok(())
        }
        Cmd::Status { config, addr, json } => {
            let cfg = Config::load(config.as_deref())?;
            let addr = addr.or(cfg.metrics_listen).ok_or_else(|| {
                anyhow::anyhow!("no status endpoint: metrics.listen is off; pass --addr")
            })?;
            let s = app::status(addr).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "queue: {} queued, {} dead letters, {} uncertain submits",
                    s.queued, s.dead_letters, s.uncertain
                );
                println!(
                    "notices: {} received, {} duplicates, {} rejected",
                    s.received, s.duplicates, s.rejected
                );
                println!(
                    "sms: {} sent, {} retried, failed by class {:?}",
                    s.sent, s.retried, s.failed_by_class
                );
                println!(
                    "link: {} sessions open, {} total, {} tls failures, {} protocol errors",
                    s.link_sessions_active,
                    s.link_sessions_total,
                    s.link_tls_failures,
                    s.link_protocol_errors
                );
                for m in &s.modems {
                    println!("modem: {m}");
                }
            }
            Ok(())
        }
        Cmd::DeadLetters {
            config,
            addr,
            requeue,
        } => {
            let cfg = Config::load(config.as_deref())?;
            let addr = addr.or(cfg.metrics_listen).ok_or_else(|| {
                anyhow::anyhow!("no agent endpoint: metrics.listen is off; pass --addr")
            })?;
            match requeue {
                Some(which) => {
                    let path = format!("/dead-letters/requeue?seq={which}");
                    let out =
                        app::http_request(addr, "POST", &path, cfg.admin_token.as_deref()).await?;
                    print!("{out}");
                }
                None => {
                    let body = app::http_get(addr, "/dead-letters").await?;
                    let list: Vec<mailbell_gsm_agent::metrics::DeadLetter> =
                        serde_json::from_str(&body)?;
                    if list.is_empty() {
                        println!("no dead letters");
                    }
                    for d in list {
                        println!(
                            "{:>8}  {}  to {}  for {}  after {} attempt(s): {}",
                            d.seq, d.id, d.to, d.recipient, d.attempts, d.reason
                        );
                    }
                }
            }
            Ok(())
        }
        Cmd::Demo { dir } => app::demo(&dir).await,
        Cmd::Pki {
            dir,
            agent_names,
            client_name,
            force,
        } => {
            let p = app::pki(&dir, &agent_names, &client_name, force)?;
            println!("CA          {}", p.ca_cert.display());
            println!(
                "agent       {} / {}",
                p.agent_cert.display(),
                p.agent_key.display()
            );
            println!(
                "mail host   {} / {}",
                p.client_cert.display(),
                p.client_key.display()
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    mailbell_link::logging::init(cli.log_json, "info");
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
