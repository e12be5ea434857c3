//! Prometheus checks shared by both daemons' black-box tests (plugin/tests/http_hardening.rs
//! and gsm-agent/tests/e2e/status_http.rs include this file with `#[path]`): the metric names
//! the shipped alert rules use, and `promtool check metrics`.

use std::io::Write;
use std::process::{Command, Stdio};

/// The metric names the alert rules of `group` in config/prometheus/mailbell-alerts.yml use.
pub fn rule_metrics(group: &str) -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/prometheus/mailbell-alerts.yml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let start = text
        .find(&format!("- name: {group}\n"))
        .unwrap_or_else(|| panic!("no group {group} in {path}"));
    let rest = &text[start + 1..];
    let section = &rest[..rest.find("- name: ").unwrap_or(rest.len())];
    let mut names: Vec<String> = section
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("mailbell_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(!names.is_empty(), "no metrics in group {group}");
    names
}

/// `promtool check metrics` on `text`: panics when it fails; `false` when promtool is not
/// installed, which is a failure under `CI=true` (the caller reports the skip otherwise).
pub fn promtool_check_metrics(text: &str) -> bool {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "promtool missing under CI"
            );
            return false;
        }
        Err(e) => panic!("promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "promtool check metrics: {said}\n{text}"
    );
    true
}
