//! The admin CLI against the stores directly (no daemon running): what an operator runs
//! before the first start or while mailbell is stopped; and the same commands through a
//! running daemon's admin API, which must read exactly the same.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

mod support;

use support::cli::{fails, ok, run, run_all, serve_admin, BIN};

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

/// Every `user` command, successes and failures alike.
fn user_commands(dir: &Path) -> Vec<Vec<String>> {
    let csv = dir.join("users.csv");
    std::fs::write(
        &csv,
        "address,phone,notify\ncarol@example.com,+8613800138001,on\nbad-address,+8613800138002,on\n",
    )
    .unwrap();
    let csv = csv.to_str().unwrap().to_owned();
    let change = dir.join("change.csv");
    std::fs::write(
        &change,
        "address,phone,quiet\nalice@example.com,+8613800138009,-\nzed@example.com,+8613800138005,\n",
    )
    .unwrap();
    let change = change.to_str().unwrap().to_owned();
    let twice = dir.join("twice.csv");
    std::fs::write(
        &twice,
        "address,phone\nzed@example.com,+8613800138005\nZed@example.com,+8613800138006\n",
    )
    .unwrap();
    let twice = twice.to_str().unwrap().to_owned();
    let missing = dir.join("missing.csv").to_str().unwrap().to_owned();
    let lines = [
        "user add Alice@Example.com --phone +8613800138000 --alias a.li@example.com --quiet 22:00-07:00",
        "user add alice@example.com --phone +8613800138000",
        "user add a.li@example.com --phone +8613800138000",
        "user add bob@example.com --phone 12345",
        "user set a.li@example.com --notify off --add-alias al@example.com",
        "user set nobody@example.com --notify off",
        "user set alice@example.com",
        "user show AL@example.com",
        "user show nobody@example.com",
        "user list",
        "user list --limit 1",
        "user list --limit 1 --after alice@example.com",
        "user list --limit 0",
        "user import CSV",
        "user import CSV --mode add",
        "user import MISSING",
        "user remove a.li@example.com",
        "user remove Carol@example.com",
        "user remove carol@example.com",
        "user show carol@example.com",
        "user list",
        "user import CHANGE --dry-run",
        "user show alice@example.com",
        "user import TWICE",
        "user list",
        "user export",
        "user export --format json",
        "user export --format xml",
        "user set alice@example.com --state arrears --networks 10.1.2.0/16,2001:db8::/32",
        "user set alice@example.com --state banned",
        "user set alice@example.com --networks 10.0.0.0/33",
        "user show alice@example.com",
    ];
    lines
        .iter()
        .map(|l| {
            l.split(' ')
                .map(|w| match w {
                    "CSV" => csv.clone(),
                    "MISSING" => missing.clone(),
                    "CHANGE" => change.clone(),
                    "TWICE" => twice.clone(),
                    w => w.to_owned(),
                })
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_commands_read_the_same_through_the_daemon_and_without_it() {
    const TOKEN: &str = "cli-test-token-0123456789";
    // Without the daemon: its own data directory, no admin API configured.
    let local = tempfile::tempdir().unwrap();
    let local_config = local.path().join("mailbell.toml");
    std::fs::write(
        &local_config,
        format!(
            "[mailbell]\ndata_dir = {:?}\n[listen]\nadmin = \"\"\n",
            local.path().join("data")
        ),
    )
    .unwrap();
    // Through the daemon: a real one on loopback port 0, then a config naming its address.
    let served = tempfile::tempdir().unwrap();
    let (running, served_config) = serve_admin(served.path(), TOKEN).await;

    // One set of input files, so that the two transcripts name the same paths.
    let files = tempfile::tempdir().unwrap();
    let commands = user_commands(files.path());
    let c = commands.clone();
    let (without, through) = tokio::task::spawn_blocking(move || {
        let without = run_all(&local_config, &c);
        let through = run_all(&served_config, &c);
        (without, through)
    })
    .await
    .unwrap();
    // The daemon's registry holds what the commands left (alice; carol removed).
    assert_eq!(running.stores.users.len(), 1);
    assert!(running.stores.users.lookup("al@example.com").is_some());
    running.stop().await;

    for ((c, w), t) in commands.iter().zip(&without).zip(&through) {
        assert_eq!(
            w,
            t,
            "`mailbell {}` differs (left: without the daemon)",
            c.join(" ")
        );
    }
    // A few answers pinned down, so "the same" is also right.
    let at = |i: usize| &without[i];
    assert!(
        at(0).0 && at(0).1.contains("\"a.li@example.com\""),
        "{:?}",
        at(0)
    );
    assert!(
        !at(1).0 && at(1).2.contains("already exists"),
        "{:?}",
        at(1)
    );
    assert!(!at(3).0 && at(3).2.contains("phone"), "{:?}", at(3));
    assert!(
        !at(5).0 && at(5).2.contains("no such user nobody@example.com"),
        "{:?}",
        at(5)
    );
    assert!(
        !at(6).0 && at(6).2.contains("nothing to change"),
        "{:?}",
        at(6)
    );
    assert!(
        at(10).1.contains("more: --after alice@example.com"),
        "{:?}",
        at(10)
    );
    assert!(!at(12).0, "{:?}", at(12));
    assert!(!at(13).0 && at(13).1.contains("added 1") && at(13).2.contains("line 3"));
    assert!(at(14).1.contains("skipped 1"), "{:?}", at(14));
    assert!(
        !at(16).0 && at(16).2.contains("alias of alice@example.com"),
        "{:?}",
        at(16)
    );
    assert_eq!(
        at(17),
        &(true, "removed carol@example.com\n".into(), String::new())
    );
    assert!(!at(18).0 && at(18).2.contains("no such user carol@example.com"));
    assert_eq!(
        at(21),
        &(
            true,
            "line 2: would update alice@example.com: phone, quiet\n\
             line 3: would add zed@example.com\n\
             dry run, nothing written: would have added 1, updated 1, skipped 0, failed 0, unchanged 0\n"
                .into(),
            String::new()
        )
    );
    assert_eq!(at(22), at(7), "the dry run wrote nothing");
    assert!(
        !at(23).0
            && at(23)
                .2
                .contains("line 3: zed@example.com appears on more than one line (2, 3)"),
        "{:?}",
        at(23)
    );
    assert_eq!(at(24), at(20));
    let csv = &at(25).1;
    assert_eq!(
        at(25),
        &(
            true,
            "address,phone,notify,licence_until,quiet,rate_limit_secs,language,aliases,\
             allow_senders,deny_senders,max_parts,state,networks,staff_no,real_name,class,note\n\
             alice@example.com,+8613800138000,no,-,22:00-07:00,-,-,\
             a.li@example.com;al@example.com,-,-,0,normal,-,,,,\n"
                .into(),
            String::new()
        )
    );
    let json: Vec<mailbell::users::User> = serde_json::from_str(&at(26).1).unwrap();
    assert_eq!(json.len(), 1);
    assert_eq!(json[0].aliases, ["a.li@example.com", "al@example.com"]);
    assert!(
        !at(27).0 && at(27).2.contains("expected csv or json"),
        "{:?}",
        at(27)
    );
    // Account state and networks: set, shown, and bad values named.
    assert!(
        at(28).0 && at(28).1.contains("\"state\": \"arrears\""),
        "{:?}",
        at(28)
    );
    for (i, want) in [
        (29, "invalid state \"banned\""),
        (30, "invalid networks \"10.0.0.0/33\""),
    ] {
        assert!(!at(i).0 && at(i).2.contains(want), "{:?}", at(i));
    }
    assert!(
        at(31)
            .1
            .contains("state          arrears\nnetworks       10.1.0.0/16, 2001:db8::/32"),
        "{:?}",
        at(31)
    );

    // The export restores: imported into an empty registry, it exports the same again.
    let fresh = tempfile::tempdir().unwrap();
    let fresh_config = fresh.path().join("mailbell.toml");
    std::fs::write(
        &fresh_config,
        format!(
            "[mailbell]\ndata_dir = {:?}\n[listen]\nadmin = \"\"\n",
            fresh.path().join("data")
        ),
    )
    .unwrap();
    let backup = fresh.path().join("users.csv");
    std::fs::write(&backup, csv).unwrap();
    let out = ok(&fresh_config, &["user", "import", backup.to_str().unwrap()]);
    assert!(out.contains("added 1,"), "{out}");
    assert_eq!(&ok(&fresh_config, &["user", "export"]), csv);
    assert_eq!(
        ok(&fresh_config, &["user", "export", "--format", "json"]),
        at(26).1
    );
}

#[test]
fn without_a_config_file_nothing_is_created_in_the_current_directory() {
    let cwd = tempfile::tempdir().unwrap();
    let default = cwd.path().join("etc-mailbell.toml");
    let bare = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .current_dir(cwd.path())
            .env_remove("MAILBELL_CONFIG")
            .env("MAILBELL_DEFAULT_CONFIG", &default)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    for args in [
        &["user", "list"][..],
        &["serve"],
        &["status"],
        &["queue", "list"],
    ] {
        let o = bare(args);
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("--config") && err.contains("MAILBELL_CONFIG"),
            "{args:?}: {err}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(cwd.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");

    // The default file, once it exists, is used; status names it and the data directory.
    let data = cwd.path().join("state");
    std::fs::write(
        &default,
        format!("[mailbell]\ndata_dir = {data:?}\n[listen]\nadmin = \"\"\n"),
    )
    .unwrap();
    let o = bare(&["user", "list"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(data.join("users").exists());
    let o = bare(&["status"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("config: {}", default.display()))
            && out.contains(&format!("data_dir: {}", data.display())),
        "{out}"
    );
    assert!(!o.status.success(), "not running");
}

#[test]
fn state_is_created_0750_and_0640() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mailbell.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &config,
        format!("[mailbell]\ndata_dir = {data:?}\n[listen]\nadmin = \"\"\n"),
    )
    .unwrap();
    ok(
        &config,
        &[
            "user",
            "add",
            "alice@example.com",
            "--phone",
            "+8613800138000",
        ],
    );
    ok(&config, &["queue", "list"]);
    ok(&config, &["log"]);
    fn walk(p: &Path, seen: &mut Vec<(std::path::PathBuf, u32, bool)>) {
        let m = std::fs::metadata(p).unwrap();
        seen.push((p.to_owned(), m.permissions().mode() & 0o7777, m.is_dir()));
        if m.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                walk(&e.unwrap().path(), seen);
            }
        }
    }
    let mut seen = Vec::new();
    walk(&data, &mut seen);
    assert!(seen.len() > 5, "{seen:?}");
    for (p, mode, is_dir) in seen {
        if is_dir {
            assert_eq!(mode, 0o750, "{}", p.display());
        } else {
            assert_eq!(mode & 0o027, 0, "{} is {mode:o}", p.display());
        }
    }
}

/// Root against a data directory of the daemon's user: refused, nothing created. Runs when
/// the tests run as root (as in CI); the decision itself is unit-tested in
/// `admin::ownership`.
#[test]
fn root_refuses_to_touch_the_daemon_users_data_directory() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    if std::fs::metadata(dir.path()).unwrap().uid() != 0 {
        eprintln!("skipping root_refuses_to_touch_the_daemon_users_data_directory: not root");
        return;
    }
    let config = dir.path().join("mailbell.toml");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
    std::fs::write(
        &config,
        format!("[mailbell]\ndata_dir = {data:?}\n[listen]\nadmin = \"\"\n"),
    )
    .unwrap();
    for args in [
        &[
            "user",
            "add",
            "alice@example.com",
            "--phone",
            "+8613800138000",
        ][..],
        &["user", "list"],
        &["queue", "list"],
        &["log"],
    ] {
        let err = fails(&config, args);
        assert!(
            err.contains("uid 65534") && err.contains("sudo -u"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0);
    // status opens nothing, so it only says the daemon is not running.
    let err = fails(&config, &["status"]);
    assert!(err.contains("not running"), "{err}");
    // Its owner (or root on root's own directory) goes ahead.
    std::os::unix::fs::chown(&data, Some(0), Some(0)).unwrap();
    ok(&config, &["user", "list"]);
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

/// More users than a page of `user list`: the export through the daemon pages through them
/// all, reads the same as the export without the daemon and as the export route's answer,
/// and its JSON form restores the registry, through the daemon and into an empty one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_pages_through_every_user() {
    const TOKEN: &str = "cli-test-token-0123456789";
    let served = tempfile::tempdir().unwrap();
    let (running, config) = serve_admin(served.path(), TOKEN).await;
    let admin = running.admin_addr.unwrap();
    let n = 2_345;
    let mut csv = String::from("address,phone,quiet\n");
    for i in 0..n {
        csv.push_str(&format!("user{i}@example.com,+4477009{i:05},22:00-07:00\n"));
    }
    let file = served.path().join("many.csv");
    std::fs::write(&file, csv).unwrap();
    let c = config.clone();
    let json_file = served.path().join("backup.json");
    let j = json_file.clone();
    let through = tokio::task::spawn_blocking(move || {
        ok(&c, &["user", "import", file.to_str().unwrap()]);
        let csv = ok(&c, &["user", "export"]);
        // A JSON backup restores what changed since, through the daemon.
        std::fs::write(&j, ok(&c, &["user", "export", "--format", "json"])).unwrap();
        ok(
            &c,
            &[
                "user",
                "set",
                "user7@example.com",
                "--phone",
                "+447700900999",
                "--quiet",
                "none",
            ],
        );
        assert_ne!(ok(&c, &["user", "export"]), csv);
        let restored = ok(&c, &["user", "import", j.to_str().unwrap()]);
        assert!(restored.contains("updated 1,"), "{restored}");
        assert_eq!(ok(&c, &["user", "export"]), csv);
        csv
    })
    .await
    .unwrap();
    assert_eq!(through.lines().count(), n + 1);
    let route = mailbell_link::http::request(
        admin,
        "GET",
        "/admin/v1/users/export?format=csv",
        Some(&format!("Bearer {TOKEN}")),
        None,
        std::time::Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(route.status, 200);
    assert_eq!(route.body, through);
    running.stop().await;
    let without = tokio::task::spawn_blocking(move || ok(&config, &["user", "export"]))
        .await
        .unwrap();
    assert_eq!(without, through);
    // The JSON backup into an empty registry, without a daemon: the same users.
    let fresh = served.path().join("fresh.toml");
    let fresh_data = served.path().join("fresh-data");
    std::fs::write(&fresh, format!("[mailbell]\ndata_dir = {fresh_data:?}\n")).unwrap();
    let restored = tokio::task::spawn_blocking(move || {
        ok(&fresh, &["user", "import", json_file.to_str().unwrap()]);
        ok(&fresh, &["user", "export"])
    })
    .await
    .unwrap();
    assert_eq!(restored, through);
}

/// A relative `data_dir` means relative to the config file's directory, whatever the current
/// directory of the command.
#[test]
fn relative_paths_resolve_against_the_config_files_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let etc = tmp.path().join("etc");
    let cwd = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&cwd).unwrap();
    let config = etc.join("mailbell.toml");
    std::fs::write(&config, "[mailbell]\ndata_dir = \"state\"\n").unwrap();
    let o = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["user", "add", "bob@example.com", "--phone", "+447700900123"])
        .current_dir(&cwd)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(etc.join("state/users").is_dir());
    assert!(!cwd.join("state").exists());
}

/// A certificate that is not there stops `serve` before any store is created: the error
/// names the key and the resolved path once, and no data directory is left behind.
#[test]
fn a_missing_certificate_fails_the_start_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let etc = tmp.path().join("etc");
    let cwd = tmp.path().join("elsewhere");
    std::fs::create_dir_all(etc.join("pki")).unwrap();
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::write(etc.join("pki/ca.pem"), "").unwrap();
    let config = etc.join("mailbell.toml");
    std::fs::write(
        &config,
        "[mailbell]\ndata_dir = \"state\"\n[link]\ndev_pki = false\nca = \"pki/ca.pem\"\n\
         cert = \"pki/client.pem\"\nkey = \"pki/client.key\"\n",
    )
    .unwrap();
    let o = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .current_dir(&cwd)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let path = etc.join("pki/client.pem").display().to_string();
    assert!(err.contains(&format!("link.cert {path}")), "{err}");
    assert_eq!(err.matches(&path).count(), 1, "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert!(!etc.join("state").exists(), "{err}");
    assert!(!cwd.join("state").exists(), "{err}");
}
