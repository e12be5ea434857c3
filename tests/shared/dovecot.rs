//! A private Dovecot for the retrieval proxy's black-box tests (plugin/tests/retrieval_dovecot.rs
//! includes this file with `#[path]`) and its benchmark (mailbell-tests' `bench_retrieval`):
//! POP3 and IMAP listeners with `haproxy = yes` (the proxy's backend), optionally Dovecot's own
//! implicit-TLS listeners (the direct baseline), a passwd-file and one Maildir per user.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where Debian's dovecot-core puts the daemon.
pub const DOVECOT: &str = "/usr/sbin/dovecot";

/// One user: password and the messages of its Maildir, in delivery order.
pub struct Mailbox {
    pub user: String,
    pub password: String,
    pub messages: Vec<Vec<u8>>,
}

/// How to run the private Dovecot.
#[derive(Default)]
pub struct Options {
    /// Certificate chain and key (PEM): adds the `pop3s` and `imaps` listeners.
    pub tls: Option<(PathBuf, PathBuf)>,
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
    /// Implicit-TLS listeners without PROXY v2 (with [`Options::tls`]).
    pub pop3s: Option<u16>,
    pub imaps: Option<u16>,
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

impl Dovecot {
    /// Writes the users' Maildirs and the configuration, starts Dovecot in the foreground and
    /// waits until every listener accepts.
    pub fn start(mailboxes: &[Mailbox], opts: &Options) -> anyhow::Result<Dovecot> {
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
            passwd.push_str(&format!("{}:{{PLAIN}}{}::::::\n", mb.user, mb.password));
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
        let conf = format!(
            "base_dir = {d}/run\nstate_dir = {d}/state\nlog_path = {d}/dovecot.log\n\
             protocols = imap pop3\nlisten = 127.0.0.1\n{ssl}\
             disable_plaintext_auth = yes\nauth_mechanisms = plain login\nauth_verbose = yes\n\
             haproxy_trusted_networks = 127.0.0.1/8\nmail_location = maildir:~/Maildir\n\
             login_log_format_elements = user=<%u> method=%m rip=%r rport=%{{rport}} lip=%l lport=%{{lport}} %c\n\
             first_valid_uid = 0\n{users}{many}\
             passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {d}/passwd\n}}\n\
             userdb {{\n  driver = static\n  args = uid={user} gid={group} home={d}/home/%u\n}}\n\
             service imap-login {{\n{login}  inet_listener imap {{\n    port = {imap}\n    haproxy = yes\n  }}\n\
               inet_listener imaps {{\n    port = {imaps}\n  }}\n}}\n\
             service pop3-login {{\n{login}  inet_listener pop3 {{\n    port = {pop3}\n    haproxy = yes\n  }}\n\
               inet_listener pop3s {{\n    port = {pop3s}\n  }}\n}}\n",
            d = d.display(),
            imaps = imaps.unwrap_or(0),
            pop3s = pop3s.unwrap_or(0),
        );
        std::fs::write(d.join("dovecot.conf"), conf)?;
        let child = Command::new(DOVECOT)
            .arg("-F")
            .arg("-c")
            .arg(d.join("dovecot.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {DOVECOT}"))?;
        let dovecot = Dovecot {
            child,
            dir,
            pop3,
            imap,
            pop3s,
            imaps,
        };
        let ports: Vec<u16> = [Some(pop3), Some(imap), pop3s, imaps]
            .into_iter()
            .flatten()
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ports
            .iter()
            .any(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_err())
        {
            if Instant::now() > deadline {
                bail!("dovecot did not listen: {}", dovecot.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(dovecot)
    }

    /// Dovecot's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }

    /// The master process (its children are the login and mail processes).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}
