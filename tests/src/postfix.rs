//! A private Postfix instance (Debian's postfix package, /etc/postfix untouched): its own
//! main.cf/master.cf under a scratch directory, one SMTP listener on loopback, every domain
//! `dest.example` address delivered to one virtual Maildir, and optionally a milter. Started in
//! the foreground under `script(1)` (Postfix reports fatal errors only to syslog or a terminal,
//! and there is no syslog here); stopped by its master PID when dropped.
//!
//! Used by the mailhost_e2e interop test and the `bench_mta` benchmark. Postfix needs root.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

/// The domain whose mail Postfix delivers (to `mail/inbox/` under its directory).
pub const DOMAIN: &str = "dest.example";

/// A loopback address whose port was free a moment ago (for a daemon that must keep its
/// address across restarts, or is configured before it binds).
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("bind an ephemeral port")?
        .port();
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Whether this process runs as root, as `postfix` requires (`/proc/self` belongs to the
/// effective user).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A running private Postfix, stopped (master SIGTERM, then SIGKILL) when dropped.
pub struct Postfix {
    /// Its directory: `etc/` (config), `spool/`, `data/`, `mail/`, `postfix.log`.
    pub dir: PathBuf,
    /// The SMTP listener.
    pub smtp: SocketAddr,
    /// `script -qec "postfix -c DIR start-fg"`.
    wrapper: Option<Child>,
}

impl Postfix {
    /// Configures an instance in `dir` with `milter` as its smtpd and non-smtpd milter (none
    /// when `None`; `milter_default_action = tempfail`), starts it and waits until it accepts
    /// SMTP connections. `milter` is as `smtpd_milters` has it: `inet:host:port` or
    /// `unix:/path`. `dir`'s parents must be reachable by the users `postfix` and `nobody`.
    pub fn start(dir: &Path, milter: Option<&str>) -> anyhow::Result<Postfix> {
        let smtp = free_addr()?;
        let etc = dir.join("etc");
        for d in ["etc", "spool", "data", "mail"] {
            std::fs::create_dir_all(dir.join(d)).context("postfix directories")?;
        }
        let d = dir.display();
        let milters = match milter {
            Some(m) => format!(
                "smtpd_milters = {m}\n\
                 non_smtpd_milters = {m}\n\
                 milter_default_action = tempfail\n\
                 milter_protocol = 6\n"
            ),
            None => String::new(),
        };
        // main.cf allows no comments at the end of a line.
        let main_cf = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {d}/spool\n\
             data_directory = {d}/data\n\
             maillog_file = {d}/postfix.log\n\
             maillog_file_prefixes = {d}\n\
             myhostname = mta.test.invalid\n\
             mydestination =\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             mynetworks = 127.0.0.0/8\n\
             smtpd_relay_restrictions = permit_mynetworks, reject\n\
             virtual_mailbox_domains = {DOMAIN}\n\
             virtual_mailbox_base = {d}/mail\n\
             virtual_mailbox_maps = static:inbox/\n\
             virtual_uid_maps = static:65534\n\
             virtual_gid_maps = static:65534\n\
             default_transport = error:no outbound mail in tests\n\
             {milters}"
        );
        let master_cf = format!(
            "{smtp} inet n - n - - smtpd\n\
             pickup unix n - n 60 1 pickup\n\
             cleanup unix n - n - 0 cleanup\n\
             qmgr unix n - n 300 1 qmgr\n\
             rewrite unix - - n - - trivial-rewrite\n\
             bounce unix - - n - 0 bounce\n\
             defer unix - - n - 0 bounce\n\
             trace unix - - n - 0 bounce\n\
             verify unix - - n - 1 verify\n\
             flush unix n - n 1000? 0 flush\n\
             proxymap unix - - n - - proxymap\n\
             showq unix n - n - - showq\n\
             error unix - - n - - error\n\
             retry unix - - n - - error\n\
             discard unix - - n - - discard\n\
             virtual unix - n n - - virtual\n\
             anvil unix - - n - 1 anvil\n\
             scache unix - - n - 1 scache\n\
             postlog unix-dgram n - n - 1 postlogd\n"
        );
        std::fs::write(etc.join("main.cf"), main_cf).context("write main.cf")?;
        std::fs::write(etc.join("master.cf"), master_cf).context("write master.cf")?;
        run_ok(Command::new("chown").arg("postfix").arg(dir.join("data")))?;
        run_ok(
            Command::new("chown")
                .arg("nobody:nogroup")
                .arg(dir.join("mail")),
        )?;
        let etc_s = etc.display().to_string();
        let check = Command::new("script")
            .args(["-qec", &format!("postfix -c {etc_s} check"), "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .context("run postfix check")?;
        ensure!(
            check.status.success(),
            "postfix check failed: {}",
            String::from_utf8_lossy(&check.stdout)
        );
        let out = std::fs::File::create(dir.join("postfix-start-fg.out")).context("log file")?;
        let wrapper = Command::new("script")
            .args(["-qec", &format!("postfix -c {etc_s} start-fg"), "/dev/null"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .context("start postfix")?;
        // From here on, dropping `pf` stops whatever started.
        let mut pf = Postfix {
            dir: dir.to_path_buf(),
            smtp,
            wrapper: Some(wrapper),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect_timeout(&smtp, Duration::from_millis(500)).is_err() {
            if let Some(Ok(Some(s))) = pf.wrapper.as_mut().map(|w| w.try_wait()) {
                bail!(
                    "postfix exited at start ({s}):\n{}\n{}",
                    std::fs::read_to_string(dir.join("postfix-start-fg.out")).unwrap_or_default(),
                    pf.log()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "postfix did not listen on {smtp}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(pf)
    }

    /// The master process's PID, once it has written it.
    pub fn master_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("spool/pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// swaks against this instance; the exit code tells the SMTP outcome (test-peers.md §3).
    pub fn swaks(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new("swaks")
            .arg("--server")
            .arg(self.smtp.to_string())
            .args(["--helo", "client.remote.example", "--timeout", "60"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run swaks")
    }

    /// Messages delivered to the virtual Maildir (one file per recipient).
    pub fn delivered(&self) -> usize {
        std::fs::read_dir(self.dir.join("mail/inbox/new"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Postfix's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postfix.log")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let pid = self.master_pid().map(nix::unistd::Pid::from_raw);
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        if let Some(mut w) = self.wrapper.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = w.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    if let Some(pid) = pid {
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    }
                    let _ = w.kill();
                    let _ = w.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Runs a setup command; its standard error becomes the error on a non-zero exit.
fn run_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
