//! Test support and benchmarks for mailbell (see tests/ and src/bin/).

pub mod cpu;
pub mod disk;
pub mod dns;
#[path = "../shared/dovecot.rs"]
pub mod dovecot;
pub mod feed;
pub mod null_milter;
pub mod postfix;
pub mod stalwart;
pub mod system;

use std::future::Future;
use std::process::ExitCode;

/// Reports a test skipped for a missing system peer so that plain `cargo test` shows it:
/// libtest captures what `eprintln!` prints, not what is written to the stderr handle itself.
/// Under `CI=true` callers fail instead of skipping.
pub fn skip(reason: &str) {
    use std::io::Write as _;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {reason}");
}

/// The shared `main` of the benchmark binaries: logging to stderr (RUST_LOG, default warn),
/// a multi-threaded runtime, and an exit status that fails only on a functional failure
/// (`Ok(false)`) or an error, never because of speed.
pub fn bench_main<F: Future<Output = anyhow::Result<bool>>>(run: F) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: a functional check failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
