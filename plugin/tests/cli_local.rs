//! The admin CLI against the stores directly (no daemon running): what an operator runs
//! before the first start or while mailbell is stopped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_mailbell");

fn run(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn ok(config: &Path, args: &[&str]) -> String {
    let o = run(config, args);
    assert!(
        o.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn fails(config: &Path, args: &[&str]) -> String {
    let o = run(config, args);
    assert!(!o.status.success(), "{args:?} should fail");
    String::from_utf8(o.stderr).unwrap()
}

#[test]
fn users_queue_and_log_without_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mailbell.toml");
    std::fs::write(
        &config,
        format!(
            "[mailbell]\ndata_dir = {:?}\n[listen]\nadmin = \"\"\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let out = ok(
        &config,
        &[
            "user",
            "add",
            "Alice@Example.com",
            "--phone",
            "+86 138-0013-8000",
            "--alias",
            "a.li@example.com",
            "--quiet",
            "22:00-07:00",
            "--language",
            "zh",
        ],
    );
    let u: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(u["address"], "alice@example.com");
    assert_eq!(u["phone"], "+8613800138000");
    let err = fails(
        &config,
        &[
            "user",
            "add",
            "alice@example.com",
            "--phone",
            "+8613800138000",
        ],
    );
    assert!(err.contains("alice@example.com"), "{err}");
    let err = fails(
        &config,
        &["user", "add", "bob@example.com", "--phone", "12345"],
    );
    assert!(err.to_lowercase().contains("phone"), "{err}");
    let out = ok(
        &config,
        &["user", "set", "a.li@example.com", "--notify", "off"],
    );
    assert!(out.contains("\"notify\": false"), "{out}");
    let err = fails(&config, &["user", "set", "alice@example.com"]);
    assert!(err.contains("nothing to change"), "{err}");
    let csv = dir.path().join("users.csv");
    std::fs::write(
        &csv,
        "address,phone,notify\ncarol@example.com,+8613800138001,on\nbad-address,+8613800138002,on\n",
    )
    .unwrap();
    let o = run(&config, &["user", "import", csv.to_str().unwrap()]);
    assert!(!o.status.success(), "a bad line fails the command");
    assert!(String::from_utf8_lossy(&o.stdout).contains("added 1"));
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 3"));
    let list = ok(&config, &["user", "list"]);
    assert!(
        list.contains("carol@example.com") && list.contains("alice@example.com"),
        "{list}"
    );
    ok(&config, &["user", "remove", "carol@example.com"]);
    let err = fails(&config, &["user", "show", "carol@example.com"]);
    assert!(err.contains("no such user"), "{err}");
    assert_eq!(ok(&config, &["queue", "list"]).trim(), "(empty)");
    assert!(ok(&config, &["queue", "retry", "all"]).contains("0 dead letter"));
    let err = fails(&config, &["queue", "retry", "not-an-id"]);
    assert!(err.contains("notice id"), "{err}");
    ok(
        &config,
        &["log", "--user", "alice@example.com", "--since", "1d"],
    );
    let err = fails(&config, &["log", "--since", "yesterday-ish"]);
    assert!(!err.is_empty());
    let err = fails(&config, &["status"]);
    assert!(err.contains("not running"), "{err}");
}

/// A configuration error names its cause once (the cause is the error's `source()`, not also
/// part of its message).
#[test]
fn a_missing_config_file_names_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("mailbell.toml");
    for cmd in [&["serve"][..], &["status"], &["user", "list"]] {
        let err = fails(&missing, cmd);
        assert!(err.contains("mailbell.toml"), "{cmd:?}: {err}");
        assert_eq!(
            err.matches("No such file or directory").count(),
            1,
            "{cmd:?}: {err}"
        );
    }
}

/// `mailbell --log-json serve` logs one JSON object per line; without it, and off a terminal
/// or with `NO_COLOR`, plain text with no escape codes. Once serving it sends `READY=1` to
/// `$NOTIFY_SOCKET` (systemd `Type=notify`).
#[test]
fn log_json_and_no_color() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mailbell.toml");
    std::fs::write(
        &config,
        format!(
            "[mailbell]\ndata_dir = {:?}\n[listen]\nhttp = \"127.0.0.1:0\"\n\
             milter = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[link]\ndev_pki_dir = {:?}\n\
             [[link.agent]]\naddr = \"127.0.0.1:9\"\n",
            dir.path().join("data"),
            dir.path().join("pki"),
        ),
    )
    .unwrap();
    let notify_path = dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    for json in [true, false] {
        let mut cmd = Command::new(BIN);
        if json {
            cmd.arg("--log-json");
        }
        let mut child = cmd
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        let serving = loop {
            let Some(Ok(l)) = lines.next() else {
                panic!("no \"mailbell serving\" line; got:\n{}", seen.join("\n"));
            };
            assert!(!l.contains('\u{1b}'), "colour codes: {l:?}");
            if json {
                let v: serde_json::Value = serde_json::from_str(&l)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
                assert!(v.get("level").is_some() && v.get("fields").is_some(), "{l}");
            } else {
                assert!(!l.starts_with('{'), "{l}");
            }
            seen.push(l.clone());
            if l.contains("mailbell serving") {
                break l;
            }
        };
        assert!(!serving.is_empty());
        // Type=notify: once listening, the daemon tells systemd it is ready.
        let mut buf = [0u8; 64];
        let n = notify.recv(&mut buf).expect("READY=1 on $NOTIFY_SOCKET");
        assert_eq!(&buf[..n], b"READY=1");
        let _ = child.kill();
        let _ = child.wait();
    }
}
