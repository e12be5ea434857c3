//! `mailbell-gsm-agent`: arguments → config → tracing → run → exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mailbell_gsm_agent::app;
use mailbell_gsm_agent::config::{self, Config};
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
    /// Configuration file (TOML). Without it: /etc/mailbell/gsm-agent.toml when it exists,
    /// else the command stops (`demo` and `pki` need none).
    #[arg(long, short, global = true, env = config::CONFIG_ENV)]
    config: Option<PathBuf>,
    /// Where the configuration file is looked for without --config (for tests).
    #[arg(
        long,
        global = true,
        hide = true,
        env = "MAILBELL_GSM_AGENT_DEFAULT_CONFIG",
        default_value = config::DEFAULT_CONFIG
    )]
    default_config: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Serve {
        /// Send every SMS to a simulated modem on a pseudo-terminal, as `[simulator] enable =
        /// true` does (nothing reaches a phone; refused beside [[modem]] sections).
        #[arg(long)]
        simulate: bool,
    },
    /// Send one test SMS through the agent's link and pipeline.
    SendTest {
        /// Destination, E.164 (+8613800138000).
        #[arg(long)]
        to: String,
        /// Literal SMS text; refused when it needs more parts than the budget.
        #[arg(long)]
        text: String,
        /// SMS parts the text may take (default: the agent's sms.default_max_parts; capped by
        /// sms.max_parts_cap).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..))]
        max_parts: Option<u8>,
        /// Agent address (default: link.listen from the config).
        #[arg(long)]
        agent: Option<String>,
        /// Name the agent's certificate must carry.
        #[arg(long, default_value = "localhost")]
        server_name: String,
        /// CA that signed the agent's certificate; with --cert and --key, all three or none
        /// (default: the dev PKI of the config, which the agent created).
        #[arg(long, requires_all = ["cert", "key"])]
        ca: Option<PathBuf>,
        /// Client certificate (needs --ca and --key).
        #[arg(long, requires_all = ["ca", "key"])]
        cert: Option<PathBuf>,
        /// Client key (needs --ca and --cert).
        #[arg(long, requires_all = ["ca", "cert"])]
        key: Option<PathBuf>,
    },
    /// Show per-modem state, queue depths and counters of a running agent.
    Status {
        /// Status endpoint (default: metrics.listen from the config).
        #[arg(long)]
        addr: Option<SocketAddr>,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
    /// List the notices the agent gave up on, or send them again.
    DeadLetters {
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
    let load = || -> anyhow::Result<Config> {
        let path = config::resolve_path(cli.config.as_deref(), &cli.default_config)?;
        Ok(Config::load(Some(&path))?)
    };
    match cli.cmd {
        Cmd::Serve { simulate } => {
            let mut cfg = load()?;
            cfg.simulator.enable |= simulate;
            app::serve(cfg).await
        }
        Cmd::SendTest {
            to,
            text,
            max_parts,
            agent,
            server_name,
            ca,
            cert,
            key,
        } => {
            let cfg = load()?;
            let explicit = match (ca, cert, key) {
                (Some(ca), Some(cert), Some(key)) => Some(ClientTlsFiles { ca, cert, key }),
                _ => None,
            };
            let files = app::client_tls(&cfg, explicit)?;
            let agent = agent.unwrap_or_else(|| cfg.link.listen.to_string());
            let n = app::test_notification(&to, text, max_parts);
            let id = n.id;
            app::send_one(&agent, &server_name, &files, n, Duration::from_secs(20)).await?;
            println!(
                "accepted by the agent at {agent}: notice {id} is durable and queued for a modem"
            );
            Ok(())
        }
        Cmd::Status { addr, json } => {
            let cfg = load()?;
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
        Cmd::DeadLetters { addr, requeue } => {
            let cfg = load()?;
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
                        // A send-test notice is for no mailbox.
                        let mailbox = if d.recipient.is_empty() {
                            String::new()
                        } else {
                            format!("  for {}", d.recipient)
                        };
                        println!(
                            "{:>8}  {}  to {}{mailbox}  after {} attempt(s): {}",
                            d.seq, d.id, d.to, d.attempts, d.reason
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
    // Before any thread exists (glibc reads the arena limit when a thread first allocates).
    let tuned = mailbell_gsm_agent::memory::tune();
    let cli = Cli::parse();
    mailbell_link::logging::init(cli.log_json, "info");
    if !tuned {
        tracing::warn!("the allocator refused its limits; memory may grow under load");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("mailbell-gsm-agent").chain(args.iter().copied()))
    }

    #[test]
    fn send_test_client_files_are_all_three_or_none() {
        let base = ["send-test", "--to", "+8613800138000", "--text", "x"];
        let with = |extra: &[&str]| parse(&[&base[..], extra].concat());
        for partial in [
            &["--cert", "c.pem", "--key", "c.key"][..],
            &["--ca", "ca.pem"],
            &["--cert", "c.pem"],
            &["--ca", "ca.pem", "--key", "c.key"],
        ] {
            let e = with(partial)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                e.contains("required arguments were not provided"),
                "{partial:?}: {e}"
            );
        }
        assert!(with(&["--ca", "a", "--cert", "b", "--key", "c"]).is_ok());
        assert!(with(&[]).is_ok());
    }

    #[test]
    fn send_test_takes_max_parts() {
        let cli = parse(&[
            "send-test",
            "--to",
            "+8613800138000",
            "--text",
            "x",
            "--max-parts",
            "3",
        ])
        .unwrap();
        assert!(matches!(
            cli.cmd,
            Cmd::SendTest {
                max_parts: Some(3),
                ..
            }
        ));
        assert!(parse(&["send-test", "--to", "+1", "--text", "x", "--max-parts", "0"]).is_err());
    }

    #[test]
    fn config_is_global_and_the_default_path_can_be_moved() {
        let cli = parse(&["status", "--config", "/x/a.toml"]).unwrap();
        assert_eq!(
            cli.config.as_deref(),
            Some(std::path::Path::new("/x/a.toml"))
        );
        let cli = parse(&["--default-config", "/nowhere/g.toml", "serve"]).unwrap();
        assert_eq!(cli.default_config, PathBuf::from("/nowhere/g.toml"));
    }
}
