//! Runs the real `mailbell` and `mailbell-gsm-agent` binaries as separate processes (so they can
//! be killed with SIGKILL), on ephemeral loopback ports, with one dev PKI shared by both, and
//! reads what the agent's simulated modem received from its PDU log.
//!
//! # Where the binaries come from
//!
//! `CARGO_BIN_EXE_*` only exists for binaries of the package under test, and these two belong to
//! other packages. So [`bins`] runs `cargo build --bins -p mailbell -p mailbell-gsm-agent
//! -p mailbell-tests` once per test process, with the same profile and target directory as this
//! test binary, and returns the paths cargo writes them to. `-p mailbell-tests` (whose binaries
//! `cargo test` builds anyway) makes the feature set the same as this test's and as
//! `cargo test --workspace`'s (its tempfile turns on bitflags/std), so the daemons are not
//! compiled a second time with other features. Both are derived from `std::env::current_exe()`: a
//! test binary lives in `<target-dir>/[<triple>/]<profile-dir>/deps/`, which follows
//! `CARGO_TARGET_DIR`, `--target-dir`, `--release`, `--profile` and `--target` without
//! re-implementing cargo's rules. The build is a no-op when the binaries are fresh (cargo's
//! fingerprints decide) and makes sure they are never stale against the sources this test was
//! built from. The variables cargo sets for a running test (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`)
//! are not passed on: build scripts that watch them (ring's) would otherwise rebuild, twice per
//! run. `MAILBELL_E2E_BIN_DIR=<dir>` skips the build and takes the binaries from `<dir>`
//! (prebuilt, e.g. an installed release).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use indymilter_test::{ProtoOpts, Status, TestConnection};
use mailbell_gsm_agent::modem::pdu::decode_submit;

/// Admin token of every mailbell instance started here.
pub const ADMIN_TOKEN: &str = "mailhost-e2e-token";

/// Paths of the two daemons' binaries.
pub struct Bins {
    pub mailbell: PathBuf,
    pub agent: PathBuf,
}

/// The binaries, built once per test process (see the module docs).
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(build_bins)
}

fn build_bins() -> Bins {
    let names = |dir: &Path| Bins {
        mailbell: dir.join("mailbell"),
        agent: dir.join("mailbell-gsm-agent"),
    };
    if let Some(dir) = std::env::var_os("MAILBELL_E2E_BIN_DIR") {
        return names(Path::new(&dir));
    }
    let exe = std::env::current_exe().expect("path of the test binary");
    // <target-dir>/[<triple>/]<profile-dir>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary inside <profile-dir>/deps")
        .to_path_buf();
    let above = profile_dir.parent().expect("target directory");
    // cargo marks the root of a target directory with CACHEDIR.TAG; without it, `above` is
    // the <triple> directory of a `--target` build.
    let (target_dir, triple) = if above.join("CACHEDIR.TAG").exists() {
        (above.to_path_buf(), None)
    } else {
        (
            above.parent().expect("target directory").to_path_buf(),
            above.file_name().map(|t| t.to_string_lossy().into_owned()),
        )
    };
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_owned(),
        Some(other) => other.to_owned(),
        None => panic!("no profile directory in {}", exe.display()),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // cargo runs this test with the package's own variables set (CARGO_MANIFEST_DIR,
    // CARGO_PKG_NAME, ...). Build scripts such as ring's and cc's rerun when those change, so
    // passing them on would rebuild ring and everything above it here, and again in the next
    // plain `cargo build`.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || k.starts_with("CARGO_BIN_")
            || matches!(
                &*k,
                "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            )
        {
            cmd.env_remove(&*k);
        }
    }
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "--bins",
            "-p",
            "mailbell",
            "-p",
            "mailbell-gsm-agent",
            "-p",
            "mailbell-tests",
        ])
        .args(["--profile", &profile])
        .arg("--target-dir")
        .arg(&target_dir);
    if let Some(t) = &triple {
        cmd.args(["--target", t]);
    }
    let started = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run cargo build for the daemons");
    if !out.status.success() {
        // CI shows the head of a long failure message; the `Compiling` lines would fill it
        // and hide the error, which comes last.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.trim_start().starts_with("Compiling "))
            .collect();
        let tail = &lines[lines.len().saturating_sub(80)..];
        panic!(
            "cargo build of the daemons failed ({}); its last lines:\n{}",
            out.status,
            tail.join("\n")
        );
    }
    eprintln!(
        "daemons built (profile {profile}) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    names(&profile_dir)
}

/// A port that was free a moment ago (a daemon must keep its address across restarts, so
/// `127.0.0.1:0` cannot be used directly).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A scratch directory that is kept (and its path printed) when the test fails or
/// `MAILHOST_E2E_KEEP` is set, so the daemons' logs can be read.
pub struct Scratch(Option<tempfile::TempDir>);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let d = tempfile::Builder::new()
            .prefix(&format!("mailhost-e2e-{name}-"))
            .tempdir()
            .expect("scratch directory");
        Scratch(Some(d))
    }

    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("scratch directory").path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("MAILHOST_E2E_KEEP").is_some() {
            if let Some(d) = self.0.take() {
                eprintln!("logs and state kept in {}", d.keep().display());
            }
        }
    }
}

/// One daemon process, restartable on the same config (same ports, same data).
pub struct Daemon {
    what: &'static str,
    bin: PathBuf,
    pub config: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// Addresses that accept connections once the daemon is up.
    ready: Vec<SocketAddr>,
}

impl Daemon {
    fn new(
        what: &'static str,
        bin: &Path,
        dir: &Path,
        toml: &str,
        ready: Vec<SocketAddr>,
    ) -> Daemon {
        let config = dir.join(format!("{what}.toml"));
        std::fs::write(&config, toml).expect("write config");
        Daemon {
            what,
            bin: bin.to_path_buf(),
            config,
            dir: dir.to_path_buf(),
            child: None,
            starts: 0,
            ready,
        }
    }

    /// Starts the process and waits until every listener answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.what);
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts)).expect("log file");
        let child = Command::new(&self.bin)
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = self
                .ready
                .iter()
                .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(500)).is_ok());
            if up {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "{} exited at start with {status}:\n{}",
                    self.what,
                    self.log_tail(self.starts)
                );
            }
            assert!(Instant::now() < deadline, "{} did not start", self.what);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then a clean exit within 30 s.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                assert!(s.success(), "{} exited with {s} on SIGTERM", self.what);
                return;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("{} did not stop on SIGTERM", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(&mut self) {
        self.start();
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.join(format!("{}-{n}.log", self.what))
    }

    /// The end of a run's log (for failure messages).
    pub fn log_tail(&self, n: u32) -> String {
        let text = std::fs::read_to_string(self.log_path(n)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `mailbell-gsm-agent serve` on a simulated modem that logs every PDU it accepts.
pub struct Agent {
    pub daemon: Daemon,
    pub link: SocketAddr,
    pub metrics: SocketAddr,
    pub pdu_log: PathBuf,
}

impl Agent {
    /// Writes the agent's config in `dir` (not started). The PKI directory is shared with
    /// mailbell; whichever starts first creates it.
    pub fn configure(dir: &Path, link: SocketAddr, pki: &Path) -> Agent {
        let metrics = free_addr();
        let pdu_log = dir.join("sim-pdus.jsonl");
        let toml = format!(
            "[agent]\ndata_dir = {data:?}\n\
             [link]\nlisten = \"{link}\"\ndev_pki_dir = {pki:?}\nheartbeat = \"1s\"\ndead_after = \"5s\"\n\
             [metrics]\nlisten = \"{metrics}\"\n\
             [simulator]\nenable = true\npdu_log = {pdu_log:?}\n",
            data = dir.join("agent-data"),
        );
        Agent {
            daemon: Daemon::new("agent", &bins().agent, dir, &toml, vec![link, metrics]),
            link,
            metrics,
            pdu_log,
        }
    }

    pub fn start(dir: &Path, link: SocketAddr, pki: &Path) -> Agent {
        let mut a = Agent::configure(dir, link, pki);
        a.daemon.start();
        a
    }

    pub async fn status(&self) -> mailbell_gsm_agent::metrics::Status {
        mailbell_gsm_agent::app::status(self.metrics)
            .await
            .expect("agent status")
    }

    /// Every PDU logged so far, decoded, in the order the modem accepted them.
    pub fn pdus(&self) -> Vec<Sms> {
        read_pdu_log(&self.pdu_log)
    }
}

/// One SMS part as the modem received it.
#[derive(Clone, Debug)]
pub struct Sms {
    pub destination: String,
    pub text: String,
}

/// Parses the simulator's JSON-lines log (`{"t_ms":..,"tpdu_len":..,"hex":"..","mr":..}`); a
/// last line still being written is skipped.
pub fn read_pdu_log(path: &Path) -> Vec<Sms> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(line).expect("PDU log line is JSON");
        let hex = v["hex"].as_str().expect("PDU log line has hex");
        let d =
            decode_submit(hex).unwrap_or_else(|e| panic!("modem got an invalid PDU {hex}: {e}"));
        out.push(Sms {
            destination: d.destination,
            text: d.text,
        });
    }
    out
}

/// `mailbell serve` with the milter and admin API on loopback, linked to one agent.
pub struct Mailbell {
    pub daemon: Daemon,
    /// The milter's TCP address (unused when it listens on `milter_socket`).
    pub milter: SocketAddr,
    /// The milter's Unix-domain socket, when it listens on one.
    pub milter_socket: Option<PathBuf>,
    pub admin: SocketAddr,
}

impl Mailbell {
    /// Writes the config in `dir` (not started). `intake` is extra `[intake]` keys.
    pub fn configure(dir: &Path, agent_link: SocketAddr, pki: &Path, intake: &str) -> Mailbell {
        Mailbell::configure_with(dir, agent_link, pki, intake, "")
    }

    /// [`Mailbell::configure`] with `sections` (whole TOML sections) appended to the config.
    pub fn configure_with(
        dir: &Path,
        agent_link: SocketAddr,
        pki: &Path,
        intake: &str,
        sections: &str,
    ) -> Mailbell {
        Mailbell::configure_at(dir, agent_link, pki, intake, sections, None)
    }

    /// [`Mailbell::configure_with`]; with `socket`, the milter listens on that Unix-domain
    /// socket, given to the group `postfix`.
    pub fn configure_at(
        dir: &Path,
        agent_link: SocketAddr,
        pki: &Path,
        intake: &str,
        sections: &str,
        socket: Option<&Path>,
    ) -> Mailbell {
        let milter = free_addr();
        let admin = free_addr();
        let (listen, group) = match socket {
            Some(p) => (
                format!("unix:{}", p.display()),
                "socket_group = \"postfix\"\n",
            ),
            None => (milter.to_string(), ""),
        };
        let toml = format!(
            "[mailbell]\ndata_dir = {data:?}\n\
             [listen]\nhttp = \"\"\nmilter = \"{listen}\"\nadmin = \"{admin}\"\n\
             [admin]\ntoken = \"{ADMIN_TOKEN}\"\n\
             [milter]\ntimeout = \"60s\"\n{group}\
             [intake]\n{intake}\n\
             [link]\ndev_pki_dir = {pki:?}\nack_timeout = \"5s\"\nheartbeat = \"1s\"\ndead_after = \"5s\"\n\
             connect_timeout = \"2s\"\nio_timeout = \"5s\"\nbackoff_min = \"50ms\"\nbackoff_max = \"500ms\"\n\
             [[link.agent]]\naddr = \"{agent_link}\"\nserver_name = \"localhost\"\n\
             {sections}\n",
            data = dir.join("mail-data"),
        );
        Mailbell {
            daemon: Daemon::new(
                "mailbell",
                &bins().mailbell,
                dir,
                &toml,
                if socket.is_some() {
                    vec![admin]
                } else {
                    vec![milter, admin]
                },
            ),
            milter,
            milter_socket: socket.map(Path::to_path_buf),
            admin,
        }
    }

    /// Where an MTA reaches the milter, as Postfix's `smtpd_milters` names it.
    pub fn milter_spec(&self) -> String {
        match &self.milter_socket {
            Some(p) => format!("unix:{}", p.display()),
            None => format!("inet:{}", self.milter),
        }
    }

    pub fn start(dir: &Path, agent_link: SocketAddr, pki: &Path, intake: &str) -> Mailbell {
        let mut m = Mailbell::configure(dir, agent_link, pki, intake);
        m.daemon.start();
        m
    }

    /// [`Mailbell::start`] with `sections` appended to the config.
    pub fn start_with(dir: &Path, agent_link: SocketAddr, pki: &Path, sections: &str) -> Mailbell {
        let mut m = Mailbell::configure_with(dir, agent_link, pki, "", sections);
        m.daemon.start();
        m
    }

    /// Runs the admin CLI (`mailbell --config <this config> ARGS...`).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&bins().mailbell)
            .arg("--config")
            .arg(&self.daemon.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run the mailbell CLI")
    }

    /// Runs the admin CLI and returns its standard output; fails the test on a non-zero exit.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "mailbell {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The running daemon's `/status` document.
    pub async fn status(&self) -> serde_json::Value {
        let r = mailbell_link::http::request(
            self.admin,
            "GET",
            "/status",
            None,
            None,
            Duration::from_secs(30),
        )
        .await
        .expect("mailbell /status");
        serde_json::from_str(&r.body).expect("mailbell /status is JSON")
    }
}

/// Under `CI=true` a missing system peer is a failure; elsewhere the test is skipped with a
/// note. Returns whether everything is there.
pub fn require(tools: &[&str], need_root: bool) -> bool {
    let mut missing: Vec<String> = tools
        .iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        })
        .map(|t| t.to_string())
        .collect();
    if need_root && !mailbell_tests::postfix::is_root() {
        missing.push("root (postfix refuses other users)".into());
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("required under CI=true: {}", missing.join(", "));
    }
    mailbell_tests::skip(&format!("missing {}", missing.join(", ")));
    false
}

/// Polls `cond` until it holds; fails the test after `secs`. For tests without a runtime.
pub fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs blocking work (starting or killing a process, the CLI) from a multi-threaded tokio test
/// without stalling the tasks on this worker.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Polls `cond` until it holds; fails the test after `secs`.
pub async fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The MTA side of the milter protocol (indymilter-test), as Postfix drives it.

/// What the MTA got for one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Accept (or continue) at end of message: the MTA takes the mail.
    Accepted,
    /// A 4xx at end of message: the MTA keeps the mail and retries.
    Tempfail(String),
    /// Any other verdict.
    Other(String),
    /// The milter went away mid-message: the MTA applies milter_default_action.
    Broken(String),
}

/// A message as the MTA hands it to the milter.
pub struct Msg<'a> {
    pub from: &'a str,
    pub rcpts: &'a [&'a str],
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// Opens a milter connection and sends connect/helo; `None` if mailbell does not answer.
pub async fn milter_open(addr: SocketAddr) -> Option<TestConnection> {
    let mut conn = TestConnection::configure()
        .read_timeout(Duration::from_secs(60))
        .write_timeout(Duration::from_secs(60))
        .open_tcp(addr)
        .await
        .ok()?;
    let opts = conn.negotiated_opts();
    if !opts.contains(ProtoOpts::NO_CONNECT) {
        conn.connect("client.remote.example", ([192, 0, 2, 25], 40000))
            .await
            .ok()?;
    }
    if !opts.contains(ProtoOpts::NO_HELO) {
        conn.helo("client.remote.example").await.ok()?;
    }
    Some(conn)
}

/// Sends one message on an open connection, following the negotiated options.
pub async fn milter_send(conn: &mut TestConnection, m: &Msg<'_>) -> Outcome {
    match milter_send_inner(conn, m).await {
        Ok(o) => o,
        Err(e) => Outcome::Broken(e.to_string()),
    }
}

async fn milter_send_inner(
    conn: &mut TestConnection,
    m: &Msg<'_>,
) -> indymilter_test::TestResult<Outcome> {
    let opts = conn.negotiated_opts();
    conn.mail([m.from]).await?;
    for r in m.rcpts {
        conn.rcpt([*r]).await?;
    }
    if !opts.contains(ProtoOpts::NO_DATA) {
        conn.data().await?;
    }
    if !opts.contains(ProtoOpts::NO_HEADER) {
        for (n, v) in m.headers {
            conn.header(*n, *v).await?;
        }
    }
    if !opts.contains(ProtoOpts::NO_EOH) {
        conn.eoh().await?;
    }
    if !opts.contains(ProtoOpts::NO_BODY) && !m.body.is_empty() {
        conn.body(m.body.to_vec()).await?;
    }
    let (_actions, status) = conn.eom().await?;
    Ok(match status {
        Status::Accept | Status::Continue => Outcome::Accepted,
        Status::Tempfail { message } => Outcome::Tempfail(format!("{message:?}")),
        other => Outcome::Other(format!("{other:?}")),
    })
}
