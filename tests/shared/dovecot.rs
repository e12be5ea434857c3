//! A private Dovecot for the retrieval proxy's black-box tests (plugin/tests/support/retrieval.rs
//! includes this file with `#[path]`) and its benchmark (mailbell-tests' `bench_retrieval`):
//! POP3 and IMAP listeners with `haproxy = yes` (the proxy's backend), optionally implicit-TLS
//! listeners (Dovecot's own TLS: the benchmark's direct baseline, or with `haproxy = yes` the
//! proxy's TLS backend), optionally listeners without `haproxy = yes`, a passwd-file and one
//! Maildir per user. It can be stopped as systemd stops it and started again on the same ports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where Debian's dovecot-core puts the daemon.
pub const DOVECOT: &str = "/usr/sbin/dovecot";

/// One user: password, the messages of its Maildir in delivery order, and other login names
/// for the same mailbox (the same password).
pub struct Mailbox {
    pub user: String,
    pub password: String,
    pub messages: Vec<Vec<u8>>,
    pub aliases: Vec<String>,
}

/// How to run the private Dovecot.
#[derive(Default)]
pub struct Options {
    /// Certificate chain and key (PEM): adds the `pop3s` and `imaps` listeners.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The implicit-TLS listeners take a PROXY v2 header first (the proxy's TLS backend)
    /// rather than direct clients.
    pub tls_haproxy: bool,
    /// Also plaintext listeners without `haproxy = yes` (Dovecot greets at once and takes a
    /// PROXY header for commands).
    pub without_haproxy: bool,
    /// Many concurrent sessions of one user from one address: login and mail processes that
    /// serve many clients each, no per-user connection limit.
    pub many_sessions: bool,
}

/// A private Dovecot instance, killed on drop.
pub struct Dovecot {
    child: Child,
    dir: tempfile::TempDir,
    /// Plaintext listeners, PROXY v2 required.
    pub pop3: u16,
    pub imap: u16,
    /// Implicit-TLS listeners (with [`Options::tls`]).
    pub pop3s: Option<u16>,
    pub imaps: Option<u16>,
    /// Plaintext listeners without PROXY v2 (with [`Options::without_haproxy`]).
    pub pop3_no_haproxy: Option<u16>,
    pub imap_no_haproxy: Option<u16>,
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (for a peer that cannot listen on port 0 and say which).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn id(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("id").args(args).output().context("run id")?;
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn chown_all(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))?;
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            chown_all(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// A listener block: `port = 0` turns it off.
fn listener(name: &str, port: Option<u16>, ssl: bool, haproxy: bool) -> String {
    let mut s = format!(
        "  inet_listener {name} {{\n    port = {}\n",
        port.unwrap_or(0)
    );
    if ssl {
        s.push_str("    ssl = yes\n");
    }
    if haproxy {
        s.push_str("    haproxy = yes\n");
    }
    s.push_str("  }\n");
    s
}

impl Dovecot {
    /// Writes the users' Maildirs and the configuration, starts Dovecot in the foreground and
    /// waits until every listener accepts. A port taken by someone else between choosing it and
    /// Dovecot's bind (the ports are chosen free, then let go), or the same free port handed
    /// out for two of its listeners (`duplicate listener`), is retried with new ports.
    pub fn start(mailboxes: &[Mailbox], opts: &Options) -> anyhow::Result<Dovecot> {
        let mut attempt = 1;
        loop {
            match Self::start_once(mailboxes, opts) {
                Err(e)
                    if attempt < 3
                        && ["in use", "duplicate listener"]
                            .iter()
                            .any(|clash| format!("{e:#}").contains(clash)) =>
                {
                    attempt += 1
                }
                r => return r,
            }
        }
    }

    fn start_once(mailboxes: &[Mailbox], opts: &Options) -> anyhow::Result<Dovecot> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        for sub in ["run", "state"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        let mut passwd = String::new();
        for mb in mailboxes {
            let maildir = d.join("home").join(&mb.user).join("Maildir");
            for sub in ["cur", "new", "tmp"] {
                std::fs::create_dir_all(maildir.join(sub))?;
            }
            for (i, m) in mb.messages.iter().enumerate() {
                let name = format!("{}.M{i}P1.test:2,", 1_700_000_000 + i);
                std::fs::write(maildir.join("cur").join(name), m)?;
            }
            for name in std::iter::once(&mb.user).chain(&mb.aliases) {
                if name != &mb.user {
                    std::os::unix::fs::symlink(&mb.user, d.join("home").join(name))?;
                }
                passwd.push_str(&format!("{name}:{{PLAIN}}{}::::::\n", mb.password));
            }
        }
        std::fs::write(d.join("passwd"), passwd)?;
        let (pop3, imap) = (free_port()?, free_port()?);
        let root = id(&["-u"])? == "0";
        // Dovecot refuses to give mail to uid 0: as root the mail belongs to nobody.
        let (user, group) = if root {
            let uid = id(&["-u", "nobody"])?.parse()?;
            let gid = id(&["-g", "nobody"])?.parse()?;
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
            if d.join("home").exists() {
                chown_all(&d.join("home"), uid, gid)?;
            }
            (id(&["-un", "nobody"])?, id(&["-gn", "nobody"])?)
        } else {
            (id(&["-un"])?, id(&["-gn"])?)
        };
        // As root Dovecot drops to its own users; otherwise everything runs as the caller.
        let users = if root {
            "default_internal_user = dovenull\n".to_owned()
        } else {
            format!(
                "default_internal_user = {user}\ndefault_internal_group = {group}\n\
                 default_login_user = {user}\n"
            )
        };
        let (ssl, pop3s, imaps) = match &opts.tls {
            Some((cert, key)) => (
                format!(
                    "ssl = yes\nssl_cert = <{}\nssl_key = <{}\nssl_min_protocol = TLSv1.2\n",
                    cert.display(),
                    key.display()
                ),
                Some(free_port()?),
                Some(free_port()?),
            ),
            None => ("ssl = no\n".to_owned(), None, None),
        };
        let (pop3_no_haproxy, imap_no_haproxy) = if opts.without_haproxy {
            (Some(free_port()?), Some(free_port()?))
        } else {
            (None, None)
        };
        // Login processes serving many clients each ("high-performance mode"), and room for
        // one mail process per session.
        let (many, login) = if opts.many_sessions {
            (
                "mail_max_userip_connections = 5000\ndefault_client_limit = 10000\n\
                 service imap {\n  process_limit = 2048\n}\n\
                 service pop3 {\n  process_limit = 2048\n}\n",
                "  service_count = 0\n  client_limit = 5000\n  process_min_avail = 2\n",
            )
        } else {
            ("", "")
        };
        let tls_haproxy = opts.tls_haproxy;
        let imap_listeners = listener("imap", Some(imap), false, true)
            + &listener("imap_no_haproxy", imap_no_haproxy, false, false)
            + &listener("imaps", imaps, true, tls_haproxy);
        let pop3_listeners = listener("pop3", Some(pop3), false, true)
            + &listener("pop3_no_haproxy", pop3_no_haproxy, false, false)
            + &listener("pop3s", pop3s, true, tls_haproxy);
        let conf = format!(
            "base_dir = {d}/run\nstate_dir = {d}/state\nlog_path = {d}/dovecot.log\n\
             protocols = imap pop3\nlisten = 127.0.0.1\n{ssl}\
             disable_plaintext_auth = yes\nauth_mechanisms = plain login\nauth_verbose = yes\n\
             haproxy_trusted_networks = 127.0.0.1/8\nmail_location = maildir:~/Maildir\n\
             login_log_format_elements = user=<%u> method=%m rip=%r rport=%{{rport}} lip=%l lport=%{{lport}} %c\n\
             first_valid_uid = 0\n{users}{many}\
             passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {d}/passwd\n}}\n\
             userdb {{\n  driver = static\n  args = uid={user} gid={group} home={d}/home/%u\n}}\n\
             service imap-login {{\n{login}{imap_listeners}}}\n\
             service pop3-login {{\n{login}{pop3_listeners}}}\n",
            d = d.display(),
        );
        std::fs::write(d.join("dovecot.conf"), conf)?;
        let child = spawn(d)?;
        let mut dovecot = Dovecot {
            child,
            dir,
            pop3,
            imap,
            pop3s,
            imaps,
            pop3_no_haproxy,
            imap_no_haproxy,
        };
        dovecot.wait_listening()?;
        Ok(dovecot)
    }

    fn ports(&self) -> Vec<u16> {
        [
            Some(self.pop3),
            Some(self.imap),
            self.pop3s,
            self.imaps,
            self.pop3_no_haproxy,
            self.imap_no_haproxy,
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Waits until every listener accepts; fails at once, with what Dovecot said, if it exits.
    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .ports()
            .iter()
            .any(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_err())
        {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "dovecot exited ({status}) before it listened: {}",
                    self.said()
                );
            }
            if Instant::now() > deadline {
                bail!("dovecot did not listen within 30 s: {}", self.said());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops Dovecot as `systemctl stop` does (it signals the whole control group): `signal`
    /// ("TERM", or "KILL" for a crash) to the master and every process under it (the master
    /// alone would leave the mail processes serving their sessions). Waits until they are gone
    /// and no listener accepts.
    pub fn stop(&mut self, signal: &str) -> anyhow::Result<()> {
        let mut pids = vec![self.child.id()];
        let mut at = 0;
        while at < pids.len() {
            pids.extend(children(pids[at]));
            at += 1;
        }
        Command::new("kill")
            .arg(format!("-{signal}"))
            .args(pids.iter().map(u32::to_string))
            .status()
            .context("run kill")?;
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
            || self
                .ports()
                .iter()
                .any(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
        {
            if Instant::now() > deadline {
                bail!("dovecot did not stop");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts Dovecot again after [`Dovecot::stop`]: the same configuration, ports and
    /// Maildirs.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.child = spawn(self.dir.path())?;
        self.wait_listening()
    }

    /// What Dovecot wrote to its standard error and its log.
    fn said(&self) -> String {
        let stderr = std::fs::read_to_string(self.dir.path().join(STDERR)).unwrap_or_default();
        format!("stderr: {stderr}\nlog: {}", self.log())
    }

    /// Dovecot's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }

    /// The directory holding the configuration, the log and `home/<user>/Maildir`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The master process (its children are the login and mail processes).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Where Dovecot's standard error goes (what it says before its log is open).
const STDERR: &str = "dovecot.stderr";

/// Runs Dovecot in the foreground with the configuration in `dir`.
fn spawn(dir: &Path) -> anyhow::Result<Child> {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(STDERR))
        .context("open dovecot's stderr file")?;
    Command::new(DOVECOT)
        .arg("-F")
        .arg("-c")
        .arg(dir.join("dovecot.conf"))
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("start {DOVECOT}"))
}

/// The processes whose parent is `pid` (from /proc).
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let child: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
        // pid (comm) state ppid ...: comm may hold spaces, so count from the last ')'.
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (ppid == pid).then_some(child)
    })
    .collect()
}
