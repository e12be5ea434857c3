//! `mailbell`: the mail-host daemon (`serve`) and its admin commands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mailbell::admin::cli::{self, LogArgs, QueueCmd, UserCmd};

#[derive(Parser)]
#[command(
    name = "mailbell",
    version,
    about = "SMS arrival notices for Stalwart and milter MTAs"
)]
struct Cli {
    /// Log as JSON lines (default: human-readable). Filter with RUST_LOG; NO_COLOR turns colour off.
    #[arg(long, global = true)]
    log_json: bool,
    /// Configuration file (TOML) [default: /etc/mailbell/mailbell.toml when it exists]
    #[arg(long, short, global = true, env = "MAILBELL_CONFIG")]
    config: Option<PathBuf>,
    /// Where to look without --config (tests point it elsewhere).
    #[arg(
        long = "default-config",
        global = true,
        hide = true,
        env = "MAILBELL_DEFAULT_CONFIG",
        hide_env = true,
        default_value = mailbell::config::DEFAULT_PATH
    )]
    default_config: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: Stalwart MTA hook + webhooks, milter, admin API, link to the agents.
    Serve,
    /// Manage registered users.
    #[command(subcommand)]
    User(Box<UserCmd>),
    /// Inspect and repair the outbox.
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Query the audit log.
    Log(LogArgs),
    /// What the retrieval proxy's sessions retrieved (the meter store).
    #[command(subcommand)]
    Meter(mailbell::admin::meter::MeterCmd),
    /// The ledger of record: top-ups, adjustments, balances, tariffs, verify.
    #[command(subcommand)]
    Billing(Box<mailbell::admin::billing::BillingCmd>),
    /// Counters of the running daemon.
    Status,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Directories 0750, files 0640: phone numbers are personal data.
    mailbell::admin::ownership::restrict_umask();
    let serving = matches!(cli.cmd, Cmd::Serve);
    mailbell_link::logging::init(cli.log_json, if serving { "info" } else { "warn" });
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mailbell: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = match mailbell::config::locate(cli.config.as_deref(), &cli.default_config) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("mailbell: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = Some(config.as_path());
    let r = rt.block_on(async {
        match cli.cmd {
            Cmd::Serve => mailbell::app::serve(config).await,
            Cmd::User(c) => cli::user(config, *c).await,
            Cmd::Queue(c) => cli::queue(config, c).await,
            Cmd::Log(a) => cli::log(config, a).await,
            Cmd::Meter(c) => mailbell::admin::meter::meter(config, c).await,
            Cmd::Billing(c) => mailbell::admin::billing::billing(config, *c).await,
            Cmd::Status => cli::status(config).await,
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailbell: {e:#}");
            ExitCode::FAILURE
        }
    }
}
