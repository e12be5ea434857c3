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

/// An agent with no `[[modem]]` does not fall back to the simulated modem: it stops and says
/// how to configure a modem or ask for the simulator. Asked for, the simulator does not run
/// beside real modems either.
#[test]
fn no_modem_is_an_error_not_a_simulated_modem() {
    let dir = tempfile::tempdir().unwrap();
    let run = |text: String| {
        let config = dir.path().join("gsm-agent.toml");
        std::fs::write(&config, text).unwrap();
        let o = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let base = format!(
        "[agent]\ndata_dir = {:?}\n[link]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        dir.path().join("data")
    );
    let (ok, err) = run(base.clone());
    assert!(!ok, "an agent without a modem must not start: {err}");
    assert!(err.contains("no modem configured"), "{err}");
    assert!(err.contains("[[modem]]"), "{err}");
    assert!(err.contains("[simulator] enable = true"), "{err}");
    assert!(!err.contains("simulated modem, not to phones"), "{err}");

    let (ok, err) = run(format!(
        "{base}[simulator]\nenable = true\n[[modem]]\nname = \"m0\"\ndevice = \"/dev/null\"\n"
    ));
    assert!(!ok, "{err}");
    assert!(err.contains("does not run beside real ones"), "{err}");
}

/// Certificate paths resolve against the config file's directory, not the current directory;
/// a missing one stops the start before anything is created, naming the key and the resolved
/// path once.
#[test]
fn a_missing_certificate_fails_the_start_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let etc = tmp.path().join("etc");
    let cwd = tmp.path().join("elsewhere");
    std::fs::create_dir_all(etc.join("pki")).unwrap();
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::write(etc.join("pki/ca.pem"), "").unwrap();
    let config = etc.join("gsm-agent.toml");
    std::fs::write(
        &config,
        "[agent]\ndata_dir = \"state\"\n[link]\nlisten = \"127.0.0.1:0\"\ndev_pki = false\n\
         ca = \"pki/ca.pem\"\ncert = \"pki/agent.pem\"\nkey = \"pki/agent.key\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n[simulator]\nenable = true\n",
    )
    .unwrap();
    let o = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .current_dir(&cwd)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let path = etc.join("pki/agent.pem").display().to_string();
    assert!(err.contains(&format!("link.cert {path}")), "{err}");
    assert_eq!(err.matches(&path).count(), 1, "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert!(!etc.join("state").exists(), "{err}");
    assert!(!cwd.join("state").exists(), "{err}");
}

/// An agent that stops for want of a modem leaves no data directory behind either.
#[test]
fn a_failed_start_creates_no_data_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("gsm-agent.toml");
    std::fs::write(
        &config,
        "[agent]\ndata_dir = \"state\"\n[link]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let o = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .current_dir(tmp.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(!tmp.path().join("state").exists());
}

/// `serve --simulate` asks for the simulated modem as `[simulator] enable = true` does: the
/// same configuration that stops for want of a modem starts, and says SMS go nowhere.
#[test]
fn serve_simulate_runs_on_a_simulated_modem_and_says_so() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("gsm-agent.toml");
    std::fs::write(
        &config,
        "[agent]\ndata_dir = \"state\"\n[link]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let without = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!without.status.success());
    assert!(String::from_utf8_lossy(&without.stderr).contains("serve --simulate"));
    let mut child = Command::new(BIN)
        .args(["serve", "--simulate", "--config"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut seen = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("simulated modem, not to phones") => break true,
            Ok(l) => seen.push(l),
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(found, "no simulated-modem warning in:\n{}", seen.join("\n"));
}
