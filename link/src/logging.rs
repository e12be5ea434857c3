//! How both daemons log: the `tracing` subscriber their `main` installs.
//!
//! Human-readable lines by default, JSON lines with `--log-json` (one object per event, for
//! journald's `MESSAGE` or a log shipper). `RUST_LOG` filters (default `info` for a daemon,
//! `warn` for an admin command). Colour only when stderr is a terminal and `NO_COLOR` is unset
//! or empty (<https://no-color.org>), so journald and log files never get escape codes.

use std::ffi::OsStr;

/// Whether log lines get ANSI colour: only on a terminal, and never when `NO_COLOR` holds a
/// non-empty value.
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// Installs the global subscriber writing to stderr: JSON lines when `json`, filtered by
/// `RUST_LOG` or else by `default_filter` (e.g. `"info"`).
pub fn init(json: bool, default_filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let colour = use_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
        assert!(!use_colour(false, Some(OsStr::new("1"))));
    }
}
