//! Runs the real `mailbell-gsm-agent` binary against simulated modems on real pseudo-terminals
//! and talks to it over the real mutual-TLS link.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailbell_gsm_agent::metrics::Status;
use mailbell_gsm_agent::modem::pdu::{decode_submit, DecodedSubmit};
use mailbell_gsm_agent::sim::SimModem;
use mailbell_link::memory::MemoryOutbox;
use mailbell_link::net::{self, ClientSettings, ClientStats, Endpoint};
use mailbell_link::pki::DevPkiPaths;
use mailbell_link::sender::SenderConfig;
use mailbell_link::tls::{self, ClientTlsFiles};
use mailbell_link::{NotifId, Notification};
use tokio_util::sync::CancellationToken;

pub const BIN: &str = env!("CARGO_BIN_EXE_mailbell-gsm-agent");
pub const ADMIN_TOKEN: &str = "e2e-admin-token";

/// A port that was free a moment ago (the agent must keep one address across restarts).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// A running agent process.
pub struct Agent {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub link: SocketAddr,
    pub metrics: SocketAddr,
    starts: u32,
}

impl Agent {
    /// Writes a config for these modem devices and starts the agent.
    pub fn start(dir: &Path, modems: &[&Path], extra: &str) -> Agent {
        let link: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut toml = format!(
            "[agent]\ndata_dir = {:?}\n[link]\nlisten = \"{link}\"\nheartbeat = \"1s\"\ndead_after = \"5s\"\n\
             [metrics]\nlisten = \"{metrics}\"\nadmin_token = \"{ADMIN_TOKEN}\"\n",
            dir.join("data")
        );
        toml.push_str(extra);
        for (i, m) in modems.iter().enumerate() {
            toml.push_str(&format!(
                "\n[[modem]]\nname = \"m{i}\"\ndevice = {:?}\nper_minute = 0\ncommand_timeout = \"1s\"\nsubmit_timeout = \"3s\"\nreopen_backoff_max = \"1s\"\n",
                m
            ));
        }
        let config = dir.join("agent.toml");
        std::fs::write(&config, toml).unwrap();
        let mut a = Agent {
            child: None,
            dir: dir.to_path_buf(),
            config,
            link,
            metrics,
            starts: 0,
        };
        a.restart();
        a
    }

    /// (Re)starts the process and waits until its status endpoint answers.
    pub fn restart(&mut self) {
        self.starts += 1;
        let log =
            std::fs::File::create(self.dir.join(format!("agent-{}.log", self.starts))).unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info,mailbell_link=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mailbell-gsm-agent");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(self.metrics).is_ok()
                && std::net::TcpStream::connect(self.link).is_ok()
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "agent exited at start with {status}; see {}",
                    self.dir.display()
                );
            }
            assert!(Instant::now() < deadline, "agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("agent did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pki(&self) -> DevPkiPaths {
        DevPkiPaths::in_dir(&self.dir.join("data").join("pki"))
    }

    pub fn client_tls(&self) -> ClientTlsFiles {
        self.pki().client_files()
    }

    pub async fn status(&self) -> Status {
        mailbell_gsm_agent::app::status(self.metrics)
            .await
            .expect("agent status")
    }

    /// Polls the status until `cond` holds; counters move after the modem answers, so a
    /// test that saw the SMS at the simulator waits here before reading them.
    pub async fn status_when(
        &self,
        what: &str,
        secs: u64,
        cond: impl Fn(&Status) -> bool,
    ) -> Status {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status().await;
            if cond(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {secs} s waiting for {what}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a link client draining `outbox` into this agent.
    pub fn client(&self, outbox: Arc<MemoryOutbox>) -> Client {
        let stop = CancellationToken::new();
        let settings = ClientSettings {
            agents: vec![Endpoint {
                addr: self.link.to_string(),
                server_name: "localhost".into(),
            }],
            tls: tls::client_config(&self.client_tls()).unwrap(),
            sender: SenderConfig {
                ack_timeout: Duration::from_secs(5),
                heartbeat: Duration::from_secs(1),
                dead_after: Duration::from_secs(5),
                name: "e2e".into(),
                ..SenderConfig::default()
            },
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(500),
        };
        let task = tokio::spawn(net::run_client(
            settings,
            outbox,
            stop.clone(),
            Arc::new(ClientStats::default()),
        ));
        Client { stop, task }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Client {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// A notice with literal text that names its index, so a PDU can be traced back to it.
pub fn numbered(i: usize, phone: &str) -> Notification {
    Notification {
        id: NotifId::random(),
        phone: phone.into(),
        recipient: "alice@example.com".into(),
        from_addr: "bob@example.org".into(),
        subject: "s".into(),
        count: 1,
        text: Some(format!("notice #{i}")),
        ..Default::default()
    }
}

pub fn push(outbox: &MemoryOutbox, n: &Notification) {
    outbox.push(n.id, n.encode_payload().unwrap());
}

/// Every PDU the modem received, decoded.
pub fn decoded(sim: &SimModem) -> Vec<DecodedSubmit> {
    sim.received()
        .iter()
        .map(|p| decode_submit(&p.hex).expect("modem received a valid PDU"))
        .collect()
}

/// Waits (polling, with a deadline) until `cond` holds.
pub async fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reports a test skipped for a missing system peer so that plain `cargo test` shows it:
/// libtest captures what `eprintln!` prints, not what is written to the stderr handle itself.
/// Under `CI=true` callers fail instead of skipping.
pub fn skip(reason: &str) {
    use std::io::Write as _;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {reason}");
}

/// Under CI a missing system tool is a failure; elsewhere the test is skipped with a note.
pub fn require_tool(name: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{name} is required under CI=true");
        }
        skip(&format!("{name} not installed"));
    }
    found
}
