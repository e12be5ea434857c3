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
