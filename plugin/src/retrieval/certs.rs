//! The retrieval listeners' certificates: one or more chains and keys from PEM files, chosen
//! per handshake by SNI, and reloaded without dropping a session.
//!
//! [`CertStore`] is the rustls certificate resolver of every retrieval listener. It holds the
//! loaded certificates behind an [`ArcSwap`]: a handshake takes the current set without a lock,
//! a reload builds a new set and swaps it in, and sessions already established keep the keys
//! their handshake used. [`watch`] reloads on a signal (SIGHUP, passed in by the daemon) and
//! when a file's content changes, polled every few seconds: reading a few KB per certificate
//! is cheap, needs no crate, and unlike inotify it follows what certbot and Kubernetes actually
//! do (swap a symlink, or a directory of symlinks, to new files) and works on any filesystem.
//!
//! A replacement that does not load (bad PEM, a key that does not belong to the certificate,
//! an unreadable file) leaves the old certificate in place: the error, naming the path and the
//! cause, is logged once per new version of the files and counted in
//! `mailbell_retrieval_cert_reload_failures_total`.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use mailbell_link::tls::{self, ServedCertificates, TlsError};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::server::RetrievalStats;

/// One certificate as configured (`[[retrieval.certificates]]`, or `cert`/`key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// The SNI names this certificate answers (exact, or `*.domain` for one label); empty:
    /// the DNS names in its subjectAltName.
    pub names: Vec<String>,
}

/// What identifies a version of a file: a hash of its bytes. Certificate files are a few KB,
/// so reading them at every poll costs little, and unlike a modification time it also sees a
/// file copied with its old time kept (`cp -p`, `rsync -t`, a restored backup) or rewritten
/// twice within the clock's resolution.
type FileStamp = u64;

/// The versions of a certificate's two files (`None` for a file that cannot be read).
type Stamp = [Option<FileStamp>; 2];

fn stamp_of(path: &Path) -> Option<FileStamp> {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

fn stamp(files: &CertFiles) -> Stamp {
    [stamp_of(&files.cert), stamp_of(&files.key)]
}

/// One certificate as served.
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// Lowercase SNI names: exact names, and `*.domain` wildcards.
    names: Vec<String>,
    not_after: i64,
    /// The file versions it was loaded from.
    stamp: Stamp,
}

/// Loads one certificate: chain and key that belong together, and its names.
fn load(files: &CertFiles) -> Result<Loaded, TlsError> {
    // Taken before reading, so a file changed while it is read is read again next time.
    let stamp = stamp(files);
    let key = tls::certified_key(&files.cert, &files.key)?;
    let leaf = key.cert.first().ok_or_else(|| TlsError::NoCertificates {
        path: files.cert.clone(),
    })?;
    let (san, not_after) = tls::leaf_facts(leaf, &files.cert)?;
    let names = if files.names.is_empty() {
        san
    } else {
        files.names.iter().map(|n| n.to_ascii_lowercase()).collect()
    };
    Ok(Loaded {
        key: Arc::new(key),
        names,
        not_after,
        stamp,
    })
}

/// Whether SNI `name` (lowercase) is answered by `pattern` (an exact name, or `*.domain` for
/// exactly one more label).
fn wildcard_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(domain) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == domain),
        None => false,
    }
}

/// The certificates of the retrieval listeners, swapped on reload; the first is the default
/// (clients without SNI or with a name no certificate has).
#[derive(Debug)]
pub struct CertStore {
    files: Vec<CertFiles>,
    served: ArcSwap<Vec<Arc<Loaded>>>,
    /// Per certificate, the file versions whose load failed last (logged once).
    failed: Mutex<Vec<Option<Stamp>>>,
    stats: Arc<RetrievalStats>,
}

/// What one reload did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Certificates replaced by a new version.
    pub replaced: usize,
    /// Certificates whose new version did not load (the old one stays).
    pub failed: usize,
}

impl CertStore {
    /// Loads every certificate; at start every one must load. `files` must not be empty.
    pub fn load(files: Vec<CertFiles>, stats: Arc<RetrievalStats>) -> Result<Self, TlsError> {
        let loaded = files
            .iter()
            .map(|f| load(f).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            failed: Mutex::new(vec![None; files.len()]),
            files,
            served: ArcSwap::from_pointee(loaded),
            stats,
        })
    }

    /// Loads again each certificate whose files changed. A certificate that does not load
    /// keeps its old version; its error is logged and counted once per version of its files,
    /// or again when `force` (SIGHUP: the operator asks, and gets the answer in the log).
    pub fn reload(&self, force: bool) -> Reloaded {
        let current = self.served.load_full();
        let mut next: Vec<Arc<Loaded>> = current.iter().cloned().collect();
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        let mut done = Reloaded::default();
        for (i, files) in self.files.iter().enumerate() {
            let now = stamp(files);
            let unchanged = next.get(i).is_some_and(|l| l.stamp == now);
            let known_bad = failed.get(i).copied().flatten() == Some(now);
            if unchanged || (known_bad && !force) {
                continue;
            }
            match load(files) {
                Ok(l) => {
                    info!(cert = %files.cert.display(), names = ?l.names, not_after = l.not_after,
                        "retrieval certificate loaded");
                    next[i] = Arc::new(l);
                    failed[i] = None;
                    done.replaced += 1;
                    self.stats.cert_reloads.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    error!(cert = %files.cert.display(), key = %files.key.display(),
                        error = %error_chain(&e), "retrieval certificate not reloaded; the old one is still served");
                    failed[i] = Some(now);
                    done.failed += 1;
                    self.stats
                        .cert_reload_failures
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if done.replaced > 0 {
            self.served.store(Arc::new(next));
        }
        done
    }

    /// The certificate for SNI `name`: an exact name first, then a wildcard, in configured
    /// order; the first certificate otherwise.
    pub fn choose(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let served = self.served.load();
        let name = name.map(str::to_ascii_lowercase);
        let pick = name.as_deref().and_then(|n| {
            let exact = served.iter().find(|l| l.names.iter().any(|p| p == n));
            exact.or_else(|| {
                served
                    .iter()
                    .find(|l| l.names.iter().any(|p| wildcard_matches(p, n)))
            })
        });
        pick.or_else(|| served.first()).map(|l| l.key.clone())
    }
}

/// `error: cause: cause` for a log line (the error's own text names the path).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(hello.server_name())
    }
}

/// The expiry metric's `file` labels: `retrieval` for the first (default) certificate,
/// `retrieval.N` for the others in configured order.
impl ServedCertificates for CertStore {
    fn expiries(&self) -> Vec<(String, i64)> {
        self.served
            .load()
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let label = if i == 0 {
                    "retrieval".to_owned()
                } else {
                    format!("retrieval.{i}")
                };
                (label, l.not_after)
            })
            .collect()
    }
}

/// Reloads `store` whenever `signal` changes (the daemon's SIGHUP) and when its files change,
/// checked every `every`, until `stop`.
pub async fn watch(
    store: Arc<CertStore>,
    every: Duration,
    mut signal: watch::Receiver<u64>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut signal_open = true;
    loop {
        let force = tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => false,
            r = signal.changed(), if signal_open => {
                signal_open = r.is_ok();
                signal_open
            }
        };
        let s = store.clone();
        // File reads and key parsing off the runtime's worker threads.
        match tokio::task::spawn_blocking(move || s.reload(force)).await {
            Ok(r) if force => info!(
                replaced = r.replaced,
                failed = r.failed,
                "retrieval certificates reloaded on signal"
            ),
            Ok(_) => {}
            Err(e) => error!(error = %e, "retrieval certificate reload failed"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A self-signed certificate for `names` (first name as CN) written to `dir/<stem>.pem`
    /// and `.key`.
    fn write_cert(dir: &Path, stem: &str, names: &[&str]) -> CertFiles {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let c = rcgen::generate_simple_self_signed(names).unwrap();
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
        CertFiles {
            cert,
            key,
            names: Vec::new(),
        }
    }

    fn leaf(k: &CertifiedKey) -> Vec<u8> {
        k.cert[0].to_vec()
    }

    fn leaf_of(files: &CertFiles) -> Vec<u8> {
        leaf(&tls::certified_key(&files.cert, &files.key).unwrap())
    }

    fn store(files: Vec<CertFiles>) -> (CertStore, Arc<RetrievalStats>) {
        let stats = Arc::new(RetrievalStats::default());
        (CertStore::load(files, stats.clone()).unwrap(), stats)
    }

    #[test]
    fn sni_picks_by_name_then_wildcard_and_falls_back_to_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_cert(dir.path(), "a", &["mail.a.test", "imap.a.test"]);
        let b = write_cert(dir.path(), "b", &["*.b.test"]);
        let mut c = write_cert(dir.path(), "c", &["ignored.test"]);
        c.names = vec!["Pop.B.Test".into()];
        let (s, _) = store(vec![a.clone(), b.clone(), c.clone()]);
        let pick = |n: Option<&str>| leaf(&s.choose(n).unwrap());
        assert_eq!(pick(Some("imap.a.test")), leaf_of(&a));
        assert_eq!(pick(Some("MAIL.A.TEST")), leaf_of(&a));
        // Configured names replace the certificate's own, and an exact name beats a wildcard.
        assert_eq!(pick(Some("pop.b.test")), leaf_of(&c));
        assert_eq!(pick(Some("ignored.test")), leaf_of(&a));
        assert_eq!(pick(Some("x.b.test")), leaf_of(&b));
        // A wildcard covers exactly one label.
        assert_eq!(pick(Some("b.test")), leaf_of(&a));
        assert_eq!(pick(Some("y.x.b.test")), leaf_of(&a));
        assert_eq!(pick(None), leaf_of(&a));
        assert_eq!(pick(Some("unknown.test")), leaf_of(&a));
    }

    #[test]
    fn wildcards_cover_one_label() {
        assert!(wildcard_matches("*.x.test", "a.x.test"));
        assert!(!wildcard_matches("*.x.test", "x.test"));
        assert!(!wildcard_matches("*.x.test", ".x.test"));
        assert!(!wildcard_matches("*.x.test", "a.b.x.test"));
        assert!(!wildcard_matches("a.x.test", "a.x.test"));
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let a = write_cert(d, "a", &["a.test"]);
        let (s, stats) = store(vec![a.clone()]);
        let first = leaf_of(&a);
        assert_eq!(s.reload(false), Reloaded::default(), "nothing changed");

        // A new certificate written over the files (rename: a new inode).
        let fresh = write_cert(d, "new", &["a.test"]);
        std::fs::rename(&fresh.cert, &a.cert).unwrap();
        std::fs::rename(&fresh.key, &a.key).unwrap();
        let second = leaf_of(&a);
        assert_ne!(first, second);
        let r = s.reload(false);
        assert_eq!((r.replaced, r.failed), (1, 0));
        assert_eq!(leaf(&s.choose(Some("a.test")).unwrap()), second);

        // Broken replacements: bad PEM, a key of another certificate, a missing file.
        let other = write_cert(d, "other", &["a.test"]);
        let good_key = std::fs::read(&a.key).unwrap();
        type Breakage<'a> = (&'a str, Box<dyn Fn() + 'a>);
        let breakages: [Breakage; 3] = [
            (
                "invalid PEM",
                Box::new(|| std::fs::write(&a.cert, "-----BEGIN CERTIFICATE-----\nxx\n").unwrap()),
            ),
            (
                "cannot use certificate",
                Box::new(|| std::fs::copy(&other.cert, &a.cert).map(drop).unwrap()),
            ),
            (
                "cannot read",
                Box::new(|| std::fs::remove_file(&a.key).unwrap()),
            ),
        ];
        let mut failures = 0;
        for (want, break_it) in breakages {
            let good_cert = std::fs::read(&a.cert).unwrap();
            break_it();
            let err = load(&a).unwrap_err();
            assert!(error_chain(&err).contains(want), "{want}: {err}");
            let r = s.reload(false);
            failures += 1;
            assert_eq!((r.replaced, r.failed), (0, 1), "{want}");
            assert_eq!(leaf(&s.choose(None).unwrap()), second, "{want}");
            // Logged and counted once per version, not at every poll.
            assert_eq!(s.reload(false), Reloaded::default(), "{want}");
            assert_eq!(stats.cert_reload_failures.load(Ordering::Relaxed), failures);
            // A signal tries again (and fails again).
            assert_eq!(s.reload(true).failed, 1);
            failures += 1;
            std::fs::write(&a.cert, good_cert).unwrap();
            std::fs::write(&a.key, &good_key).unwrap();
        }
        assert_eq!(stats.cert_reloads.load(Ordering::Relaxed), 1);
        // The repaired files are the version served: nothing to do.
        assert_eq!(s.reload(false), Reloaded::default());
        assert_eq!(leaf(&s.choose(None).unwrap()), second);
    }

    #[test]
    fn the_expiry_labels_follow_the_served_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_cert(dir.path(), "a", &["a.test"]);
        let b = write_cert(dir.path(), "b", &["b.test"]);
        let (s, _) = store(vec![a.clone(), b]);
        let e = s.expiries();
        let (_, not_after) = tls::leaf_facts(
            &tls::certified_key(&a.cert, &a.key).unwrap().cert[0],
            &a.cert,
        )
        .unwrap();
        assert_eq!(e[0], ("retrieval".to_owned(), not_after));
        assert_eq!(e[1].0, "retrieval.1");
        // A broken file does not change what is reported.
        std::fs::write(&a.cert, "garbage").unwrap();
        s.reload(true);
        assert_eq!(s.expiries(), e);
        // A renewed certificate that loads does.
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_owned()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&a.cert, params.self_signed(&key).unwrap().pem()).unwrap();
        std::fs::write(&a.key, key.serialize_pem()).unwrap();
        assert_eq!(s.reload(false).replaced, 1);
        assert_eq!(s.expiries()[0], ("retrieval".to_owned(), 1_936_742_400));
        assert_eq!(s.expiries()[1], e[1]);
    }

    #[test]
    fn a_startup_failure_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_cert(dir.path(), "a", &["a.test"]);
        let b = write_cert(dir.path(), "b", &["b.test"]);
        let mixed = CertFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
            names: Vec::new(),
        };
        let e = CertStore::load(vec![mixed], Arc::default()).unwrap_err();
        assert!(e.to_string().contains(&a.cert.display().to_string()), "{e}");
        assert!(error_chain(&e).contains("Key"), "{}", error_chain(&e));
    }
}
