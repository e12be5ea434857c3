//! What the agent prints when its configuration cannot be read.

use std::process::Command;

use crate::support::BIN;

/// A missing configuration file is named with its cause, once.
#[test]
fn a_missing_config_file_names_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("gsm-agent.toml");
    let o = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&missing)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("gsm-agent.toml"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert!(!err.contains('\u{1b}'), "{err:?}");
}
