//! Moves notices from the durable inbox to the modems and applies the retry policy of each
//! error class. A failing notice never blocks the ones behind it: it is rescheduled or
//! dead-lettered while the queue moves on.
//!
//! Per notice: decode → render (template or literal text) → validate the number → encode the
//! PDUs → mark in flight (durable) → submit → mark sent, rescheduled or dead (durable).
//!
//! Blame the modem, not the message. The pool already sends a message through another modem
//! when one fails it (see `modem/pool.rs`); a notice is charged an attempt (and follows its
//! error class's retry policy, dead-lettered when the attempts are used up) only when the
//! failure is plausibly the message's:
//!
//! ```text
//! failure                                                   charged   next try
//! message-level class (Permanent, Bug, DestinationUnavail.) yes       class policy
//! the same failure on two different modems                  yes       class policy
//! a failure on a modem that already failed this notice      yes       class policy
//! the sink names no modem (a test double)                   yes       class policy
//! any other failure on a modem (CMS 500, ERROR, timeout…)   no        1 s, another modem
//! no modem tried at all (all down or paced out)             no        5 s
//! ```
//!
//! The modems that failed a notice are remembered in memory (bounded, see [`History`]) and
//! handed to the sink as modems to avoid, so a retry prefers a different modem.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::SmsConfig;
use crate::inbox::{Change, Inbox, Record};
use crate::modem::cms::ErrorClass;
use crate::modem::pdu::{encode_submit, SubmitOptions};
use crate::phone::E164;
use crate::render::Renderer;

/// One modem's failure of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedOn {
    pub modem: String,
    /// The failure as text (`+CMS ERROR: 500`): equal texts are the same failure.
    pub failure: String,
    pub class: ErrorClass,
}

/// Why the modems did not take a message.
#[derive(Clone, Debug)]
pub struct SinkFailure {
    pub class: ErrorClass,
    pub reason: String,
    /// The last PDU was written and no answer came back: the SMS may have gone out.
    pub maybe_sent: bool,
    /// No modem could take it (all down, paced out, or each one tried failed): `failed_on`
    /// says which modems did try.
    pub no_modem: bool,
    /// The modems that failed it in this submit, in order; the last one gave `class`. Empty
    /// when the sink cannot tell (the failure is then charged to the notice).
    pub failed_on: Vec<FailedOn>,
}

/// Where rendered PDUs go: the modem pool (or a test double).
pub trait SmsSink: Send + Sync + 'static {
    /// Submits all parts of one SMS; returns the name of the modem that sent it. The modems
    /// in `avoid` failed this message before: use them only when no other can take it.
    fn submit(
        &self,
        pdus: Vec<(usize, String)>,
        avoid: Vec<String>,
    ) -> impl Future<Output = Result<String, SinkFailure>> + Send;
}

/// Notices remembered at most by [`History`]; past this the memory starts over (a notice
/// then may get one more uncharged try).
const HISTORY_NOTICES: usize = 65_536;
/// Failures remembered per notice.
const HISTORY_PER_NOTICE: usize = 16;
/// The next try after a failure not charged to the notice.
const UNCHARGED_RETRY: Duration = Duration::from_secs(1);
/// The next try when no modem could take the notice at all.
const NO_MODEM_RETRY: Duration = Duration::from_secs(5);

/// The modems that failed each queued notice, and how: in memory only (about 100 bytes per
/// failure, at most [`HISTORY_NOTICES`] notices), forgotten when the notice is sent or dead.
/// After a restart a notice starts with a clean slate.
#[derive(Debug, Default)]
pub struct History {
    by_seq: Mutex<HashMap<u64, Vec<(String, String)>>>,
}

impl History {
    fn get(&self, seq: u64) -> Vec<(String, String)> {
        self.by_seq
            .lock()
            .map(|m| m.get(&seq).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    fn add(&self, seq: u64, failures: &[FailedOn]) {
        if failures.is_empty() {
            return;
        }
        if let Ok(mut m) = self.by_seq.lock() {
            if m.len() >= HISTORY_NOTICES && !m.contains_key(&seq) {
                m.clear();
            }
            let v = m.entry(seq).or_default();
            for f in failures {
                if v.len() >= HISTORY_PER_NOTICE {
                    v.remove(0);
                }
                v.push((f.modem.clone(), f.failure.clone()));
            }
        }
    }

    fn forget(&self, seq: u64) {
        if let Ok(mut m) = self.by_seq.lock() {
            m.remove(&seq);
        }
    }

    /// Notices with failures remembered.
    pub fn len(&self) -> usize {
        self.by_seq.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether no failure is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether the failures of this submit (`now`, the last one deciding) are plausibly the
/// message's, given the failures of earlier submits (`before`, `(modem, failure)`).
fn charged(now: &[FailedOn], before: &[(String, String)]) -> bool {
    let Some(last) = now.last() else {
        return true; // the sink cannot say which modem: the old rule
    };
    if last.class.is_message_level() {
        return true;
    }
    let all: Vec<(&str, &str)> = before
        .iter()
        .map(|(m, f)| (m.as_str(), f.as_str()))
        .chain(now.iter().map(|f| (f.modem.as_str(), f.failure.as_str())))
        .collect();
    // the same failure on two different modems
    let same_elsewhere = all.iter().any(|&(m, f)| {
        all.iter()
            .any(|&(m2, f2)| m2 != m && f2 == f && f == last.failure.as_str())
    });
    // a modem that failed this notice before failed it again (no other modem took it)
    let same_modem_again = before.iter().any(|(m, _)| *m == last.modem);
    same_elsewhere || same_modem_again
}

/// Counters for metrics and status.
#[derive(Debug, Default)]
pub struct DispatchStats {
    pub sent: AtomicU64,
    pub parts: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    pub maybe_sent: AtomicU64,
    /// Failures by error class.
    pub failed: Mutex<BTreeMap<String, u64>>,
}

impl DispatchStats {
    fn count_failure(&self, class: ErrorClass) {
        if let Ok(mut m) = self.failed.lock() {
            *m.entry(format!("{class:?}")).or_default() += 1;
        }
    }
}

/// The dispatcher.
pub struct Dispatcher<S: SmsSink> {
    pub inbox: Inbox,
    pub sink: Arc<S>,
    pub renderer: Arc<Renderer>,
    pub sms: SmsConfig,
    /// Notices handed to the modems at once (about the number of modems).
    pub concurrency: usize,
    pub resend_uncertain: bool,
    pub stats: Arc<DispatchStats>,
    /// The modems that failed each queued notice.
    pub history: History,
}

/// What the dispatcher decided for a notice, before it is written to the inbox.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Sent,
    Retry {
        attempts: u16,
        after: Duration,
    },
    /// Give up after `attempts` submits to a modem (0 when none was tried).
    Dead {
        attempts: u16,
        reason: String,
    },
}

/// Given up before a modem saw this attempt: the attempts so far stand.
fn dead_before_submit(r: &Record, reason: String) -> Verdict {
    Verdict::Dead {
        attempts: r.attempts,
        reason,
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl<S: SmsSink> Dispatcher<S> {
    /// Runs until `shutdown`; then waits (bounded) for submits already at a modem.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let notify = self.inbox.notifier();
        let mut busy: HashSet<u64> = HashSet::new();
        let mut jobs: JoinSet<u64> = JoinSet::new();
        let concurrency = self.concurrency.max(1);
        loop {
            let mut next_due: Option<i64> = None;
            let free = concurrency.saturating_sub(busy.len());
            if free > 0 {
                match self.inbox.ready_records(now_ms(), free, &busy) {
                    Ok((items, next)) => {
                        next_due = next;
                        for r in items {
                            busy.insert(r.seq);
                            let me = self.clone();
                            jobs.spawn(async move {
                                let seq = r.seq;
                                me.process(r).await;
                                seq
                            });
                        }
                    }
                    Err(e) => error!(error = %e, "cannot read the inbox"),
                }
            }
            let wait = next_due
                .map(|t| Duration::from_millis(u64::try_from(t - now_ms()).unwrap_or(0)))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = notify.notified() => {}
                Some(done) = jobs.join_next(), if !jobs.is_empty() => {
                    if let Ok(seq) = done {
                        busy.remove(&seq);
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
            // Collect every other finished job without waiting.
            while let Some(done) = jobs.try_join_next() {
                if let Ok(seq) = done {
                    busy.remove(&seq);
                }
            }
        }
        let grace = Duration::from_secs(10);
        if tokio::time::timeout(grace, async { while jobs.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            warn!("submits still at a modem at shutdown; they will count as uncertain");
            jobs.abort_all();
        }
    }

    async fn process(&self, r: Record) {
        let started = Instant::now();
        let verdict = self.attempt(&r).await;
        let change = match &verdict {
            Verdict::Sent => Change::Sent(r.seq),
            Verdict::Retry { attempts, after } => Change::Retry {
                seq: r.seq,
                attempts: *attempts,
                next_at_ms: now_ms() + i64::try_from(after.as_millis()).unwrap_or(i64::MAX / 2),
            },
            Verdict::Dead { attempts, reason } => Change::Dead {
                seq: r.seq,
                attempts: *attempts,
                reason: reason.clone(),
            },
        };
        match &verdict {
            Verdict::Sent => self.history.forget(r.seq),
            Verdict::Retry { .. } => {
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Dead { attempts, reason } => {
                self.history.forget(r.seq);
                self.stats.dead.fetch_add(1, Ordering::Relaxed);
                warn!(notif_id = %r.id, seq = r.seq, attempts, %reason, "notice dead-lettered");
            }
        }
        if let Err(e) = self.inbox.change(change).await {
            // The notice stays queued (possibly marked in flight); it is retried later.
            error!(notif_id = %r.id, error = %e, "cannot record the outcome of a notice");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        debug!(notif_id = %r.id, elapsed = ?started.elapsed(), ?verdict, "notice processed");
    }

    async fn attempt(&self, r: &Record) -> Verdict {
        let Some(n) = r.notification() else {
            return dead_before_submit(r, "malformed notification payload".into());
        };
        let dest: E164 = match n.phone.parse() {
            Ok(d) => d,
            Err(e) => return dead_before_submit(r, format!("invalid phone number: {e}")),
        };
        let text = match &n.text {
            Some(t) => t.clone(),
            None => match self.renderer.render(&n) {
                Ok(t) => t,
                Err(e) => return dead_before_submit(r, format!("cannot render SMS: {e}")),
            },
        };
        let opts = SubmitOptions {
            max_parts: self.renderer.max_parts_for(&n),
            concat_ref: (r.seq & 0xff) as u8,
            request_status_report: self.sms.status_report,
            validity: self.sms.validity,
        };
        let pdus = match encode_submit(&dest, &text, &opts) {
            Ok(p) => p,
            Err(e) => return dead_before_submit(r, format!("cannot encode SMS: {e}")),
        };
        let parts: Vec<(usize, String)> = pdus.into_iter().map(|p| (p.tpdu_len, p.hex)).collect();
        let nparts = parts.len() as u64;
        if let Err(e) = self.inbox.change(Change::InFlight(r.seq)).await {
            error!(error = %e, "cannot mark a notice in flight; retrying later");
            return Verdict::Retry {
                attempts: r.attempts,
                after: Duration::from_secs(5),
            };
        }
        let attempt_no = u32::from(r.attempts) + 1;
        // The submits a modem has seen, this one included.
        let tried = u16::try_from(attempt_no).unwrap_or(u16::MAX);
        let before = self.history.get(r.seq);
        let mut avoid: Vec<String> = Vec::new();
        for (m, _) in &before {
            if !avoid.contains(m) {
                avoid.push(m.clone());
            }
        }
        match self.sink.submit(parts, avoid).await {
            Ok(modem) => {
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
                self.stats.parts.fetch_add(nparts, Ordering::Relaxed);
                info!(notif_id = %n.id, to = %dest.masked(), %modem, parts = nparts, attempt = attempt_no, "sms sent");
                Verdict::Sent
            }
            Err(f) if f.no_modem && f.failed_on.is_empty() => {
                warn!(notif_id = %n.id, reason = %f.reason, "no modem available; notice waits");
                Verdict::Retry {
                    attempts: r.attempts,
                    after: NO_MODEM_RETRY,
                }
            }
            Err(f) => {
                for fo in &f.failed_on {
                    self.stats.count_failure(fo.class);
                }
                if f.failed_on.is_empty() {
                    self.stats.count_failure(f.class);
                }
                let charge = charged(&f.failed_on, &before);
                self.history.add(r.seq, &f.failed_on);
                if !charge && (!f.maybe_sent || self.resend_uncertain) {
                    if f.maybe_sent {
                        self.stats.maybe_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    warn!(notif_id = %n.id, to = %dest.masked(), reason = %f.reason, class = ?f.class, "a modem failed the sms; trying another modem (no attempt charged)");
                    return Verdict::Retry {
                        attempts: r.attempts,
                        after: UNCHARGED_RETRY,
                    };
                }
                if f.maybe_sent {
                    self.stats.maybe_sent.fetch_add(1, Ordering::Relaxed);
                    if !self.resend_uncertain {
                        return Verdict::Dead {
                            attempts: tried,
                            reason: format!(
                                "{} (the SMS may have been sent; not resent by policy)",
                                f.reason
                            ),
                        };
                    }
                }
                let policy = self.sms.policy(f.class);
                let max = policy.max_attempts.min(u32::from(self.sms.max_attempts));
                if attempt_no >= max {
                    Verdict::Dead {
                        attempts: tried,
                        reason: format!(
                            "{} ({:?}, attempt {attempt_no} of {max})",
                            f.reason, f.class
                        ),
                    }
                } else {
                    let after = policy
                        .delay_before(attempt_no + 1)
                        .max(Duration::from_secs(1));
                    warn!(notif_id = %n.id, to = %dest.masked(), reason = %f.reason, class = ?f.class, ?after, "sms failed; will retry");
                    Verdict::Retry {
                        attempts: tried,
                        after,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::InboxConfig;
    use crate::render::RenderConfig;
    use mailbell_link::net::Inbox as _;
    use mailbell_link::{NotifId, Notification};
    use std::collections::VecDeque;

    /// A sink that answers from a script, then succeeds.
    #[derive(Default)]
    struct Scripted {
        answers: Mutex<VecDeque<Result<String, SinkFailure>>>,
        calls: AtomicU64,
        /// The `avoid` list of each call.
        avoided: Mutex<Vec<Vec<String>>>,
    }

    impl SmsSink for Scripted {
        async fn submit(
            &self,
            _pdus: Vec<(usize, String)>,
            avoid: Vec<String>,
        ) -> Result<String, SinkFailure> {
            self.avoided.lock().unwrap().push(avoid);
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.answers
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Ok("m0".into()))
        }
    }

    fn fail(class: ErrorClass) -> Result<String, SinkFailure> {
        Err(SinkFailure {
            class,
            reason: format!("{class:?}"),
            maybe_sent: false,
            no_modem: false,
            failed_on: Vec::new(),
        })
    }

    /// A failure on these modems, each with this failure text (class from `class`).
    fn fail_on(class: ErrorClass, modems: &[(&str, &str)]) -> Result<String, SinkFailure> {
        Err(SinkFailure {
            class,
            reason: format!("{class:?}"),
            maybe_sent: false,
            no_modem: false,
            failed_on: modems
                .iter()
                .map(|(m, f)| FailedOn {
                    modem: m.to_string(),
                    failure: f.to_string(),
                    class,
                })
                .collect(),
        })
    }

    async fn setup(
        answers: Vec<Result<String, SinkFailure>>,
    ) -> (tempfile::TempDir, Arc<Dispatcher<Scripted>>) {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(
            &dir.path().join("inbox"),
            InboxConfig::default(),
            Arc::new(|_| Ok(())),
        )
        .unwrap();
        let sms = crate::config::Config::from_toml("", "t").unwrap().sms;
        let d = Arc::new(Dispatcher {
            inbox,
            sink: Arc::new(Scripted {
                answers: Mutex::new(answers.into()),
                calls: AtomicU64::new(0),
                avoided: Mutex::default(),
            }),
            renderer: Arc::new(Renderer::new(RenderConfig::default()).unwrap()),
            sms,
            concurrency: 1,
            resend_uncertain: true,
            stats: Arc::new(DispatchStats::default()),
            history: History::default(),
        });
        (dir, d)
    }

    async fn queue(d: &Dispatcher<Scripted>, phone: &str) -> Record {
        let n = Notification {
            id: NotifId::random(),
            phone: phone.into(),
            recipient: "alice@example.com".into(),
            from_addr: "bob@example.org".into(),
            subject: "Quarterly report".into(),
            count: 1,
            ..Default::default()
        };
        d.inbox
            .store("t".into(), vec![(n.id, n.encode_payload().unwrap())])
            .await;
        let (mut r, _) = d
            .inbox
            .ready_records(i64::MAX, 10, &HashSet::new())
            .unwrap();
        r.pop().unwrap()
    }

    #[tokio::test]
    async fn classes_drive_the_verdict() {
        let (_d, d) = setup(vec![
            fail(ErrorClass::Permanent),
            fail(ErrorClass::Transient),
            fail(ErrorClass::Bug),
        ])
        .await;
        let r = queue(&d, "+8613800138000").await;
        assert!(matches!(
            d.attempt(&r).await,
            Verdict::Dead { attempts: 1, reason } if reason.contains("Permanent")
        ));
        let v = d.attempt(&r).await;
        assert!(
            matches!(v, Verdict::Retry { attempts: 1, after } if after >= Duration::from_secs(60)),
            "{v:?}"
        );
        assert!(matches!(
            d.attempt(&r).await,
            Verdict::Dead { attempts: 1, .. }
        ));
        assert_eq!(d.attempt(&r).await, Verdict::Sent);
    }

    #[tokio::test]
    async fn one_modem_failing_a_notice_is_not_charged_and_its_retry_avoids_that_modem() {
        let cms500 = "+CMS ERROR: 500";
        let (_d, d) = setup(vec![
            fail_on(ErrorClass::Unknown, &[("m0", cms500)]),
            Ok("m1".into()),
        ])
        .await;
        let r = queue(&d, "+8613800138000").await;
        assert_eq!(
            d.attempt(&r).await,
            Verdict::Retry {
                attempts: 0,
                after: UNCHARGED_RETRY
            }
        );
        assert_eq!(d.attempt(&r).await, Verdict::Sent);
        let avoided = d.sink.avoided.lock().unwrap().clone();
        assert_eq!(avoided, vec![vec![], vec!["m0".to_string()]]);
        assert_eq!(d.stats.failed.lock().unwrap().get("Unknown"), Some(&1));
    }

    #[tokio::test]
    async fn the_same_failure_on_two_modems_is_charged() {
        let cms500 = "+CMS ERROR: 500";
        let (_d, d) = setup(vec![
            // in one submit (the pool failed over)
            fail_on(ErrorClass::Unknown, &[("m0", cms500), ("m1", cms500)]),
            // across submits
            fail_on(ErrorClass::Unknown, &[("m2", "modem answered ERROR")]),
            fail_on(ErrorClass::Unknown, &[("m3", "modem answered ERROR")]),
            // the same modem again, with nothing else to try
            fail_on(ErrorClass::Transient, &[("m4", "modem answered ERROR")]),
            fail_on(ErrorClass::Transient, &[("m4", "+CMS ERROR: 41")]),
        ])
        .await;
        let mut r = queue(&d, "+8613800138000").await;
        let v = d.attempt(&r).await;
        assert!(
            matches!(v, Verdict::Retry { attempts: 1, after } if after >= Duration::from_secs(60)),
            "{v:?}"
        );
        d.history.forget(r.seq);
        r.attempts = 0;
        assert!(matches!(
            d.attempt(&r).await,
            Verdict::Retry { attempts: 0, .. }
        ));
        assert!(matches!(
            d.attempt(&r).await,
            Verdict::Retry { attempts: 1, .. }
        ));
        d.history.forget(r.seq);
        assert!(matches!(
            d.attempt(&r).await,
            Verdict::Retry { attempts: 0, .. }
        ));
        assert!(matches!(
            d.attempt(&r).await,
            Verdict::Retry { attempts: 1, .. }
        ));
    }

    #[tokio::test]
    async fn a_poison_notice_still_dead_letters_after_its_attempts() {
        // CMS 500 for this message on every modem: charged each time, dead after the
        // Unknown class's three attempts
        let all = &[("m0", "+CMS ERROR: 500"), ("m1", "+CMS ERROR: 500")];
        let (_d, d) = setup(vec![
            fail_on(ErrorClass::Unknown, all),
            fail_on(ErrorClass::Unknown, all),
            fail_on(ErrorClass::Unknown, all),
            // a permanent class is charged on one modem
            fail_on(ErrorClass::Permanent, &[("m0", "+CMS ERROR: 21")]),
        ])
        .await;
        let mut r = queue(&d, "+8613800138000").await;
        for expect in 1..=2 {
            match d.attempt(&r).await {
                Verdict::Retry { attempts, .. } => {
                    assert_eq!(attempts, expect);
                    r.attempts = attempts;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            d.attempt(&r).await,
            Verdict::Dead { attempts: 3, reason } if reason.contains("attempt 3 of 3")
        ));
        r.attempts = 0;
        d.history.forget(r.seq);
        assert!(matches!(
            d.attempt(&r).await,
            Verdict::Dead { attempts: 1, .. }
        ));
    }

    #[test]
    fn the_failure_history_is_bounded() {
        let h = History::default();
        let f = |m: &str| FailedOn {
            modem: m.into(),
            failure: "x".into(),
            class: ErrorClass::Unknown,
        };
        for seq in 0..HISTORY_NOTICES as u64 {
            h.add(seq, &[f("m0")]);
        }
        assert_eq!(h.len(), HISTORY_NOTICES);
        h.add(u64::MAX, &[f("m0")]);
        assert_eq!(h.len(), 1, "starts over when full");
        for _ in 0..100 {
            h.add(u64::MAX, &[f("m1")]);
        }
        assert_eq!(h.get(u64::MAX).len(), HISTORY_PER_NOTICE);
        h.forget(u64::MAX);
        assert!(h.is_empty());
    }

    #[tokio::test]
    async fn capped_attempts_end_in_dead_letter() {
        let (_d, d) = setup(vec![fail(ErrorClass::Unknown)]).await;
        let mut r = queue(&d, "+8613800138000").await;
        r.attempts = 2; // the third attempt of a class allowing three
        assert!(matches!(
            d.attempt(&r).await,
            Verdict::Dead { attempts: 3, reason } if reason.contains("attempt 3 of 3")
        ));
    }

    #[tokio::test]
    async fn invalid_number_never_reaches_a_modem() {
        let (_d, d) = setup(vec![]).await;
        let r = queue(&d, "0800-FLOWERS").await;
        assert!(
            matches!(d.attempt(&r).await, Verdict::Dead { attempts: 0, reason } if reason.contains("invalid phone number"))
        );
        assert_eq!(d.sink.calls.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn poison_notice_does_not_block_the_queue() {
        // The first notice always fails permanently; the ones behind it go out.
        let (_d, d) = setup(vec![fail(ErrorClass::Permanent)]).await;
        for _ in 0..3 {
            queue(&d, "+8613800138000").await;
        }
        let stop = CancellationToken::new();
        let task = tokio::spawn(d.clone().run(stop.clone()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.stats.sent.load(Ordering::Relaxed) < 2 {
            assert!(Instant::now() < deadline, "queue stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(d.stats.dead.load(Ordering::Relaxed), 1);
        stop.cancel();
        task.await.unwrap();
        assert_eq!(d.inbox.dead_letters(10).unwrap().len(), 1);
    }
}
