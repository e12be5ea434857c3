//! The `mailbell` binary as an operator runs it: with a config file, without a daemon or
//! through a daemon started in-process with only its admin API on.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_mailbell");

pub fn run(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

pub fn ok(config: &Path, args: &[&str]) -> String {
    let o = run(config, args);
    assert!(
        o.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

pub fn fails(config: &Path, args: &[&str]) -> String {
    let o = run(config, args);
    assert!(!o.status.success(), "{args:?} should fail");
    String::from_utf8(o.stderr).unwrap()
}

/// (succeeded, stdout, stderr) of each command.
pub type Transcript = Vec<(bool, String, String)>;

pub fn run_all(config: &Path, commands: &[Vec<String>]) -> Transcript {
    commands
        .iter()
        .map(|c| {
            let args: Vec<&str> = c.iter().map(String::as_str).collect();
            let o = run(config, &args);
            (
                o.status.success(),
                String::from_utf8(o.stdout).unwrap(),
                String::from_utf8(o.stderr).unwrap(),
            )
        })
        .collect()
}

/// A daemon with only its admin API on (loopback port 0) and its data in `<dir>/data`, and
/// `<dir>/mailbell.toml`: a config naming that address and `token`, for the CLI to go through.
pub async fn serve_admin(dir: &Path, token: &str) -> (mailbell::app::Running, PathBuf) {
    let data = dir.join("data");
    let daemon = mailbell::config::Config::from_toml(
        &format!(
            "[mailbell]\ndata_dir = {data:?}\n[listen]\nhttp = \"\"\nmilter = \"\"\n\
             admin = \"127.0.0.1:0\"\n[admin]\ntoken = \"{token}\"\n\
             [[link.agent]]\naddr = \"127.0.0.1:9\"\n"
        ),
        "test",
    )
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = mailbell::app::start(daemon, shutdown).await.unwrap();
    let admin = running.admin_addr.unwrap();
    let config = dir.join("mailbell.toml");
    std::fs::write(
        &config,
        format!(
            "[mailbell]\ndata_dir = {data:?}\n[listen]\nadmin = \"{admin}\"\n[admin]\ntoken = \"{token}\"\n"
        ),
    )
    .unwrap();
    (running, config)
}
