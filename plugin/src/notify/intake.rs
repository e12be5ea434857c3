//! The intake: turns accepted messages into arrival notices for registered users, and decides
//! when each notice goes out (delivery confirmation, quiet hours, rate limit with coalescing).
//!
//! ```text
//! MTA endpoint ──accept──► scheduler task (one, owns all state below); the MTA's reply waits
//!                          until the round that took the arrival is durable
//!                               │
//!   entries: Wait (Stalwart: until message-ingest confirms) ─┐
//!            Ready (milter; or confirmed) ──► filters, quiet hours, rate limit
//!                                               │ send now      │ hold (coalesce per user)
//!                                               ▼               ▼ window ends
//!                                 settle: staged record written/rewritten/deleted + notices
//!                                         queued, in one atomic, flushed batch (exactly once)
//! ```
//!
//! Each scheduler round (every command that arrived meanwhile: arrivals, confirmations, timers)
//! ends in one settle. Rounds are pipelined: the next round is computed while the previous one
//! commits; answers (the MTA's reply, the webhook's 200) go out when their round is durable.
//! An arrival whose entries can all be notified at once never becomes a staged record: its
//! notices are queued directly, so a milter message costs one commit and its notices' inserts.
//!
//! Only recipients that are registered users with notification on, a valid licence and a phone
//! number get an entry at all (checked at accept; the others get a `created` and a `dropped`
//! audit record saying why); the user record is read again when the notice is released, so
//! turning notification off or a licence running out in the meantime drops held notices.
//!
//! Each entry gets its notice id at accept, stored with it: every audit record of the notice
//! carries it, and the notice queued for it has it as its `NotifId` (a coalesced notice: the
//! newest entry's). A round's audit events are recorded by the outbox committer once the
//! round is durable and before the link can see its notices, so they come before the link's.
//!
//! What survives a crash: staged records with each entry's state (waiting, ready, done).
//! What does not: per-user rate-limit clocks and hold windows (kept in memory); after a
//! restart, ready entries are evaluated afresh, so a held burst may go out at once as one
//! coalesced notice instead of at its window's end. Nothing accepted is lost and nothing is
//! sent twice: an entry becomes "done" in the same batch that queues its notice.
//!
//! Stalwart's confirmations (`message-ingest.*` webhooks) are lossy, duplicated and unordered.
//! A waiting entry whose confirmation never comes is released (or dropped, by configuration)
//! `confirm_timeout` after arrival; duplicates find the entry done and change nothing.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use mailbell_link::{NotifId, Notification};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::audit::{AuditEvent, AuditLog, QueueId};
use crate::notify::arrival::{Accepted, Arrival, Ingest, IngestKind, Intake, IntakeError, Origin};
use crate::notify::outbox::{Admission, OnDurable, Outbox, OutboxError, Settle, StagedRecord};
use crate::users::{Ineligible, User, UserStore};

/// What to do with a notice whose delivery confirmation never arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutPolicy {
    /// Send it anyway (webhooks are lossy; a late notice beats none).
    #[default]
    Release,
    /// Drop it (only notify on confirmed delivery).
    Drop,
}

/// Intake tunables (`[intake]` in the config).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeConfig {
    /// How long a Stalwart arrival waits for its `message-ingest` confirmation, in seconds.
    pub confirm_timeout_secs: u64,
    /// What happens when the confirmation does not come in time.
    pub on_confirm_timeout: TimeoutPolicy,
    /// Whether mail Stalwart filed as spam still notifies.
    pub spam_notifies: bool,
    /// Default per-user rate limit: at most one SMS per this many seconds; arrivals in between
    /// are coalesced into one notice. 0 = no limit. A user's own setting wins.
    pub rate_limit_secs: u32,
    /// The time zone quiet hours are read in, as a UTC offset ("+08:00").
    pub timezone: String,
    /// Default SMS part limit for a notice (0 = the agent's default). A user's own wins.
    pub max_parts: u8,
    /// Most envelope recipients considered per message (the rest are ignored, with a log line).
    pub max_recipients: usize,
    /// Only release on timeout what Stalwart reported as queued (`queue.queue-message`): a
    /// message rejected after mailbell's hook (a later hook, a Sieve script, Stalwart's own hook
    /// timeout) is never queued, and the sender's retries would each give an SMS. Needs
    /// `queue.queue-message` in the webhook's events. Off: release every timed-out arrival.
    pub timeout_requires_queued: bool,
    /// Sub-address separator: `alice+news@example.com` is alice's mail. "" turns it off.
    pub subaddress_separator: String,
}

impl Default for IntakeConfig {
    fn default() -> Self {
        Self {
            confirm_timeout_secs: 600,
            on_confirm_timeout: TimeoutPolicy::Release,
            spam_notifies: false,
            rate_limit_secs: 60,
            timezone: "+00:00".into(),
            max_parts: 0,
            max_recipients: 1000,
            timeout_requires_queued: true,
            subaddress_separator: "+".into(),
        }
    }
}

/// Maps a Stalwart account id to the addresses of that account, when known.
pub type AccountResolver = Arc<dyn Fn(u64) -> Option<Vec<String>> + Send + Sync>;

/// Entry state as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum EntryState {
    /// Waiting for Stalwart's delivery confirmation.
    #[serde(rename = "w")]
    Wait,
    /// Delivered (or milter-accepted): to be notified.
    #[serde(rename = "r")]
    Ready,
    /// Notified or dropped: nothing more to do.
    #[serde(rename = "d")]
    Done,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    /// The user's primary address.
    #[serde(rename = "u")]
    user: String,
    /// The recipient as addressed (an alias, maybe).
    #[serde(rename = "r")]
    rcpt: String,
    #[serde(rename = "s")]
    state: EntryState,
    /// The notice id (32 hex digits), from creation on: the audit log's `created`, `held`,
    /// `queued`, `sent`, `acked` of this entry all carry it, and the notice queued for it
    /// (alone, or as the newest of a coalesced group) has it as its `NotifId`. Empty in
    /// records written before ids were stored: [`Scheduler::index`] gives those one.
    #[serde(rename = "n", default, skip_serializing_if = "String::is_empty")]
    id: String,
    /// Why and until when the entry is held (quiet hours, rate limit), for `queue list --held`.
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    hold: Option<HoldNote>,
}

/// A held entry's reason as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct HoldNote {
    #[serde(rename = "w")]
    why: String,
    #[serde(rename = "u")]
    until_ms: i64,
}

fn new_notice_id() -> String {
    NotifId::random().to_string()
}

/// One staged message: what every notice about it needs, and one entry per notified user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StagedMsg {
    #[serde(rename = "q", default, skip_serializing_if = "Option::is_none")]
    queue_id: Option<u64>,
    /// A milter client's queue id (Postfix's `{i}`), for the audit log.
    #[serde(rename = "mq", default, skip_serializing_if = "Option::is_none")]
    mta_queue_id: Option<String>,
    #[serde(rename = "t")]
    received_at_ms: i64,
    #[serde(rename = "fn", default)]
    from_name: String,
    #[serde(rename = "fa", default)]
    from_addr: String,
    #[serde(rename = "ef", default)]
    env_from: String,
    #[serde(rename = "sj", default)]
    subject: String,
    #[serde(rename = "e")]
    entries: Vec<Entry>,
    /// Stalwart reported the message queued (`queue.queue-message`).
    #[serde(rename = "qd", default, skip_serializing_if = "std::ops::Not::not")]
    queued: bool,
}

impl StagedMsg {
    fn encode(&self) -> Vec<u8> {
        // Plain data: serialising it cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn all_done(&self) -> bool {
        self.entries.iter().all(|e| e.state == EntryState::Done)
    }

    /// Entries not notified or dropped yet: the most notices the record can still become,
    /// what it counts against `[outbox] max_depth`.
    fn pending(&self) -> u32 {
        let n = self
            .entries
            .iter()
            .filter(|e| e.state != EntryState::Done)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn record(&self, seq: u64) -> StagedRecord {
        StagedRecord {
            seq,
            notices: self.pending(),
            value: self.encode(),
        }
    }

    fn sender(&self) -> &str {
        if self.from_addr.is_empty() {
            &self.env_from
        } else {
            &self.from_addr
        }
    }

    /// The MTA's queue id, as the audit log records it.
    fn audit_queue_id(&self) -> Option<QueueId> {
        self.queue_id
            .map(QueueId::Stalwart)
            .or_else(|| self.mta_queue_id.clone().map(QueueId::Mta))
    }

    /// The `created` record of an entry.
    fn created(&self, e: &Entry) -> AuditEvent {
        AuditEvent::Created {
            notice: e.id.clone(),
            user: e.user.clone(),
            queue_id: self.audit_queue_id(),
            from: self.sender().to_owned(),
            subject: self.subject.clone(),
        }
    }
}

/// A notice not in the queue yet, as `mailbell queue list --held` shows it: waiting for
/// Stalwart's delivery confirmation, or held by quiet hours or the rate limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingNotice {
    /// The notice id (as in the audit log).
    pub id: String,
    /// The registered user.
    pub user: String,
    /// The recipient as addressed.
    pub recipient: String,
    pub received_at_ms: i64,
    pub from: String,
    pub subject: String,
    /// "awaiting delivery confirmation", "quiet hours until …", "rate limit until …", or
    /// "ready" (to be evaluated at once).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<i64>,
}

/// The notices the staged records still stand for, oldest arrival first, at most `limit`;
/// records that do not decode are skipped (the intake logs them at start).
pub fn pending_notices(records: &[StagedRecord], limit: usize) -> Vec<PendingNotice> {
    let mut out = Vec::new();
    for r in records {
        let Ok(m) = serde_json::from_slice::<StagedMsg>(&r.value) else {
            continue;
        };
        for e in m.entries.iter().filter(|e| e.state != EntryState::Done) {
            if out.len() >= limit {
                return out;
            }
            let (state, until_ms) = match (&e.state, &e.hold) {
                (EntryState::Wait, _) => ("awaiting delivery confirmation".to_owned(), None),
                (_, Some(h)) => (h.why.clone(), Some(h.until_ms)),
                _ => ("ready".to_owned(), None),
            };
            out.push(PendingNotice {
                id: e.id.clone(),
                user: e.user.clone(),
                recipient: e.rcpt.clone(),
                received_at_ms: m.received_at_ms,
                from: m.sender().to_owned(),
                subject: m.subject.clone(),
                state,
                until_ms,
            });
        }
    }
    out
}

/// Why a registered user gets no notice, as the audit log says it.
fn ineligible_reason(why: Ineligible) -> &'static str {
    match why {
        Ineligible::NotifyOff => "notifications off",
        Ineligible::LicenceExpired => "licence expired",
        Ineligible::NoPhone => "no phone number",
    }
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct IntakeStats {
    pub messages: std::sync::atomic::AtomicU64,
    pub notices_created: std::sync::atomic::AtomicU64,
    pub unknown_recipients: std::sync::atomic::AtomicU64,
    pub ineligible_recipients: std::sync::atomic::AtomicU64,
    pub queued: std::sync::atomic::AtomicU64,
    pub coalesced: std::sync::atomic::AtomicU64,
    pub dropped: std::sync::atomic::AtomicU64,
    pub confirmations: std::sync::atomic::AtomicU64,
    pub unmatched_confirmations: std::sync::atomic::AtomicU64,
    pub confirm_timeouts: std::sync::atomic::AtomicU64,
    pub store_errors: std::sync::atomic::AtomicU64,
}

fn bump(c: &std::sync::atomic::AtomicU64, n: u64) {
    c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

enum Cmd {
    Arrive(StagedMsg, oneshot::Sender<Result<(), IntakeError>>),
    /// A round's commit failed: rebuild the state from the store.
    Reload,
    Confirm(Vec<Ingest>, oneshot::Sender<Result<(), IntakeError>>),
    Tick(oneshot::Sender<Result<(), IntakeError>>),
}

/// A clock in Unix milliseconds (tests move it by hand).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The intake handle the endpoints share.
#[derive(Clone)]
pub struct MailIntake {
    users: UserStore,
    audit: AuditLog,
    tx: mpsc::UnboundedSender<Cmd>,
    max_recipients: usize,
    subaddress: Option<char>,
    clock: Clock,
    pub stats: Arc<IntakeStats>,
}

impl MailIntake {
    /// Starts the scheduler task (on the current runtime) after loading the staged records.
    pub fn start(
        cfg: IntakeConfig,
        outbox: Outbox,
        users: UserStore,
        audit: AuditLog,
        accounts: Option<AccountResolver>,
        clock: Clock,
        shutdown: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), IntakeStartError> {
        let offset_secs = mailbell_link::units::parse_utc_offset(&cfg.timezone)
            .map_err(IntakeStartError::Timezone)?
            * 60;
        let stats = Arc::new(IntakeStats::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let mut sched = Scheduler {
            me: tx.downgrade(),
            cfg: cfg.clone(),
            offset_secs,
            outbox,
            users: users.clone(),
            audit: audit.clone(),
            accounts,
            clock: clock.clone(),
            stats: stats.clone(),
            msgs: HashMap::new(),
            by_queue: HashMap::new(),
            deadlines: BinaryHeap::new(),
            holds: HashMap::new(),
            hold_timers: BinaryHeap::new(),
            last_sent: HashMap::new(),
            miscounted: Vec::new(),
        };
        sched.load()?;
        let handle = tokio::spawn(sched.run(rx, shutdown));
        Ok((
            Self {
                users,
                audit,
                tx,
                max_recipients: cfg.max_recipients.max(1),
                subaddress: cfg.subaddress_separator.chars().next(),
                clock,
                stats,
            },
            handle,
        ))
    }

    /// The registered user (primary address) mail to `rcpt` reaches: by address, alias or
    /// sub-address, as at intake.
    fn registered(&self, rcpt: &str) -> Option<Arc<User>> {
        registered(&self.users, self.subaddress, rcpt)
    }

    /// Maps a recipient as addressed to its registered user's address, for the audit
    /// records of the link side ([`crate::notify::sender::AuditedOutbox::resolving_users`]).
    pub fn user_resolver(&self) -> crate::notify::sender::UserResolver {
        let (users, sep) = (self.users.clone(), self.subaddress);
        Arc::new(move |rcpt| registered(&users, sep, rcpt).map(|u| u.address.clone()))
    }

    /// The entries an arrival creates: one per distinct registered, eligible user; and the
    /// registered users who get none, with why.
    fn entries(&self, arrival: &Arrival, now: i64) -> (Vec<Entry>, Vec<(Entry, Ineligible)>) {
        let mut out: Vec<Entry> = Vec::new();
        let mut skipped: Vec<(Entry, Ineligible)> = Vec::new();
        let wait = matches!(arrival.origin, Origin::Stalwart { .. });
        if arrival.rcpts.len() > self.max_recipients {
            warn!(
                rcpts = arrival.rcpts.len(),
                max = self.max_recipients,
                "too many recipients; the rest get no notice"
            );
        }
        for rcpt in arrival.rcpts.iter().take(self.max_recipients) {
            let Some(user) = self.registered(rcpt) else {
                bump(&self.stats.unknown_recipients, 1);
                debug!(rcpt = %rcpt, "not a registered user");
                continue;
            };
            if out.iter().any(|e| e.user == user.address)
                || skipped.iter().any(|(e, _)| e.user == user.address)
            {
                continue; // two aliases of one user: one notice
            }
            let entry = Entry {
                user: user.address.clone(),
                rcpt: rcpt.clone(),
                state: if wait {
                    EntryState::Wait
                } else {
                    EntryState::Ready
                },
                id: new_notice_id(),
                hold: None,
            };
            if let Some(why) = user.ineligible(now) {
                bump(&self.stats.ineligible_recipients, 1);
                debug!(rcpt = %rcpt, reason = ?why, "user gets no notices");
                skipped.push((entry, why));
                continue;
            }
            out.push(entry);
        }
        (out, skipped)
    }
}

/// Why the intake could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IntakeStartError {
    #[error("intake.timezone: {0}")]
    Timezone(String),
    #[error("cannot load staged arrivals")]
    Load(#[from] OutboxError),
}

fn store_error(e: OutboxError) -> IntakeError {
    match e {
        OutboxError::Full { held, limit } => {
            IntakeError::Full(format!("{held} notices held, limit {limit}"))
        }
        OutboxError::Stopped => IntakeError::ShuttingDown,
        e => IntakeError::Store(e.to_string()),
    }
}

impl Intake for MailIntake {
    async fn accept(&self, arrival: Arrival) -> Result<Accepted, IntakeError> {
        bump(&self.stats.messages, 1);
        let now = (self.clock)();
        let (entries, skipped) = self.entries(&arrival, now);
        if entries.is_empty() && skipped.is_empty() {
            return Ok(Accepted { notices: 0 });
        }
        let h = &arrival.headers;
        let msg = StagedMsg {
            queue_id: match arrival.origin {
                Origin::Stalwart { queue_id } => Some(queue_id),
                Origin::Milter => None,
            },
            mta_queue_id: arrival.mta_queue_id.clone(),
            received_at_ms: arrival.received_at_ms,
            from_name: h.from_name.clone(),
            from_addr: h.from_addr.clone(),
            env_from: arrival.env_from.clone(),
            subject: h.subject.clone(),
            entries,
            queued: false,
        };
        if !skipped.is_empty() {
            // Registered users who get no SMS: the decision is on record, under a notice id of
            // its own. Nothing else ever happens to these notices, so they need not wait for
            // the commit of the others.
            let mut events = Vec::with_capacity(skipped.len() * 2);
            for (e, why) in &skipped {
                events.push(msg.created(e));
                events.push(AuditEvent::Dropped {
                    notice: e.id.clone(),
                    user: e.user.clone(),
                    reason: ineligible_reason(*why).to_owned(),
                });
            }
            self.audit.record_all(events);
        }
        if msg.entries.is_empty() {
            return Ok(Accepted { notices: 0 });
        }
        let n = msg.entries.len();
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Arrive(msg, reply))
            .map_err(|_| IntakeError::ShuttingDown)?;
        rx.await.map_err(|_| IntakeError::ShuttingDown)??;
        Ok(Accepted { notices: n })
    }

    async fn confirm(&self, events: Vec<Ingest>) -> Result<(), IntakeError> {
        if events.is_empty() {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Confirm(events, reply))
            .map_err(|_| IntakeError::ShuttingDown)?;
        rx.await.map_err(|_| IntakeError::ShuttingDown)?
    }
}

impl MailIntake {
    /// Makes the scheduler handle everything sent to it so far and evaluate its timers against
    /// the clock now; resolves when that is durable. The daemon never needs it (the scheduler
    /// wakes on its own); tests with a manual clock do.
    pub async fn tick(&self) -> Result<(), IntakeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Tick(reply))
            .map_err(|_| IntakeError::ShuttingDown)?;
        rx.await.map_err(|_| IntakeError::ShuttingDown)?
    }
}

/// The registered user mail to `rcpt` reaches: by address or alias, else by the address
/// without its sub-address tag.
fn registered(users: &UserStore, sep: Option<char>, rcpt: &str) -> Option<Arc<User>> {
    users
        .lookup(rcpt)
        .or_else(|| users.lookup(&base_address(rcpt, sep?)?))
}

/// `alice+news@example.com` → `alice@example.com` (None when there is no tag).
fn base_address(addr: &str, sep: char) -> Option<String> {
    let (local, domain) = addr.rsplit_once('@')?;
    let (base, _tag) = local.split_once(sep)?;
    (!base.is_empty()).then(|| format!("{base}@{domain}"))
}

/// The address of `user` that `rcpt` reached, as registered (lower-case): what the SMS shows
/// as `{recipient}`, never the sender's spelling. A sub-address or an address the user no
/// longer has gives the primary address.
fn registered_address(user: &User, rcpt: &str) -> String {
    let key = rcpt
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim()
        .to_lowercase();
    std::iter::once(&user.address)
        .chain(&user.aliases)
        .find(|a| **a == key)
        .unwrap_or(&user.address)
        .clone()
}

/// A position of one entry: (staged seq, entry index).
type EntryRef = (u64, usize);

/// What keeps a user's notices back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum HoldWhy {
    QuietHours,
    #[default]
    RateLimit,
    /// A commit failed; ready entries wait a second before they are evaluated again.
    Retry,
}

impl HoldWhy {
    fn as_str(self) -> &'static str {
        match self {
            HoldWhy::QuietHours => "quiet hours",
            HoldWhy::RateLimit => "rate limit",
            HoldWhy::Retry => "store error, retrying",
        }
    }
}

#[derive(Default)]
struct Hold {
    entries: Vec<EntryRef>,
    until_ms: i64,
    why: HoldWhy,
}

struct Scheduler {
    /// To tell itself to reload after a failed commit.
    me: mpsc::WeakUnboundedSender<Cmd>,
    cfg: IntakeConfig,
    offset_secs: i32,
    outbox: Outbox,
    users: UserStore,
    audit: AuditLog,
    accounts: Option<AccountResolver>,
    clock: Clock,
    stats: Arc<IntakeStats>,
    msgs: HashMap<u64, StagedMsg>,
    by_queue: HashMap<u64, Vec<u64>>,
    /// (confirmation deadline, staged seq) of messages with waiting entries.
    deadlines: BinaryHeap<Reverse<(i64, u64)>>,
    holds: HashMap<String, Hold>,
    hold_timers: BinaryHeap<Reverse<(i64, String)>>,
    last_sent: HashMap<String, i64>,
    /// Staged records whose stored notice count is not their pending entries (written before
    /// the count was stored): rewritten by the next round.
    miscounted: Vec<u64>,
}

/// Changes of one scheduler round, applied with one settle.
#[derive(Default)]
struct Round {
    /// Staged messages changed this round (written, rewritten, or deleted when all done).
    touched: Vec<u64>,
    /// Messages that arrived this round: not in the store yet.
    fresh: std::collections::HashSet<u64>,
    /// Room under `[outbox] max_depth` taken by the arrivals accepted this round.
    admitted: Admission,
    notices: Vec<Notification>,
    audits: Vec<AuditEvent>,
    sent_users: Vec<(String, i64)>,
    replies: Vec<oneshot::Sender<Result<(), IntakeError>>>,
}

impl Round {
    fn touch(&mut self, seq: u64) {
        if !self.touched.contains(&seq) {
            self.touched.push(seq);
        }
    }
}

const MAX_ROUND_CMDS: usize = 512;

impl Scheduler {
    fn now(&self) -> i64 {
        (self.clock)()
    }

    fn confirm_timeout_ms(&self) -> i64 {
        i64::try_from(self.cfg.confirm_timeout_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    /// Rebuilds the in-memory state from the staged records.
    fn load(&mut self) -> Result<(), OutboxError> {
        self.msgs.clear();
        self.by_queue.clear();
        self.deadlines.clear();
        self.holds.clear();
        self.hold_timers.clear();
        self.miscounted.clear();
        let mut bad = 0usize;
        for r in self.outbox.staged()? {
            let seq = r.seq;
            match serde_json::from_slice::<StagedMsg>(&r.value) {
                Ok(m) => {
                    if m.pending() != r.notices {
                        self.miscounted.push(seq);
                    }
                    self.index(seq, m);
                }
                Err(e) => {
                    bad += 1;
                    error!(seq, error = %e, "unreadable staged arrival; left in the store");
                }
            }
        }
        info!(
            staged = self.msgs.len(),
            unreadable = bad,
            recount = self.miscounted.len(),
            "intake state loaded"
        );
        Ok(())
    }

    /// Has the round rewrite the records [`load`](Self::load) found miscounted.
    fn recount(&mut self, round: &mut Round) {
        for seq in std::mem::take(&mut self.miscounted) {
            round.touch(seq);
        }
    }

    fn index(&mut self, seq: u64, mut m: StagedMsg) {
        for e in &mut m.entries {
            if e.id.is_empty() {
                e.id = new_notice_id();
            }
        }
        if let Some(q) = m.queue_id {
            self.by_queue.entry(q).or_default().push(seq);
        }
        if m.entries.iter().any(|e| e.state == EntryState::Wait) {
            let deadline = m.received_at_ms.saturating_add(self.confirm_timeout_ms());
            self.deadlines.push(Reverse((deadline, seq)));
        }
        self.msgs.insert(seq, m);
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>, shutdown: CancellationToken) {
        // Entries left ready by a previous run are evaluated at once.
        let mut round = Round::default();
        self.recount(&mut round);
        let now = self.now();
        for r in self.ready_entries() {
            self.release(r, now, &mut round);
        }
        self.finish(round).await;
        loop {
            let next = self.next_timer();
            let sleep_for = next.map_or(Duration::from_secs(3600), |t| {
                Duration::from_millis(u64::try_from(t - self.now()).unwrap_or(0))
            });
            let mut round = Round::default();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    self.command(cmd, &mut round);
                    while round.replies.len() + round.touched.len() < MAX_ROUND_CMDS {
                        match rx.try_recv() {
                            Ok(cmd) => self.command(cmd, &mut round),
                            Err(_) => break,
                        }
                    }
                }
                _ = tokio::time::sleep(sleep_for) => {}
            }
            self.timers(&mut round);
            self.finish(round).await;
        }
        info!("intake scheduler stopped");
    }

    /// Every entry in the ready state, in sequence order.
    fn ready_entries(&self) -> Vec<EntryRef> {
        let mut ready: Vec<EntryRef> = self
            .msgs
            .iter()
            .flat_map(|(seq, m)| {
                m.entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.state == EntryState::Ready)
                    .map(move |(i, _)| (*seq, i))
            })
            .collect();
        ready.sort_unstable();
        ready
    }

    fn next_timer(&self) -> Option<i64> {
        let a = self.deadlines.peek().map(|Reverse((t, _))| *t);
        let b = self.hold_timers.peek().map(|Reverse((t, _))| *t);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn command(&mut self, cmd: Cmd, round: &mut Round) {
        let now = self.now();
        match cmd {
            Cmd::Arrive(m, reply) => {
                // Room for every notice the arrival can become, before anything is written
                // or answered; it counts at once, so the rounds after this one (pipelined
                // while it commits) see it.
                let n = m.entries.len() as u64;
                let room = match self.outbox.admit(n) {
                    Ok(room) => room,
                    Err(e) => {
                        bump(&self.stats.store_errors, 1);
                        let _ = reply.send(Err(store_error(e)));
                        return;
                    }
                };
                let seq = match self.outbox.reserve_seq() {
                    Ok(s) => s,
                    Err(e) => {
                        bump(&self.stats.store_errors, 1);
                        let _ = reply.send(Err(store_error(e)));
                        return;
                    }
                };
                round.admitted.merge(room);
                bump(&self.stats.notices_created, n);
                for e in &m.entries {
                    round.audits.push(m.created(e));
                }
                let ready: Vec<usize> = m
                    .entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.state == EntryState::Ready)
                    .map(|(i, _)| i)
                    .collect();
                self.index(seq, m);
                round.fresh.insert(seq);
                round.touch(seq);
                for i in ready {
                    self.release((seq, i), now, round);
                }
                round.replies.push(reply);
            }
            Cmd::Reload => {
                self.reload();
                self.recount(round);
            }
            Cmd::Confirm(events, reply) => {
                for ev in events {
                    self.confirm(&ev, now, round);
                }
                round.replies.push(reply);
            }
            Cmd::Tick(reply) => round.replies.push(reply),
        }
    }

    /// Applies one `message-ingest` event.
    fn confirm(&mut self, ev: &Ingest, now: i64, round: &mut Round) {
        bump(&self.stats.confirmations, 1);
        let Some(q) = ev.queue_id else { return };
        if ev.kind == IngestKind::Queued {
            for seq in self.by_queue.get(&q).cloned().unwrap_or_default() {
                if let Some(m) = self.msgs.get_mut(&seq) {
                    if !m.queued {
                        m.queued = true;
                        round.touch(seq);
                    }
                }
            }
            return;
        }
        let Some(seqs) = self.by_queue.get(&q).cloned() else {
            bump(&self.stats.unmatched_confirmations, 1);
            debug!(
                queue_id = q,
                "confirmation for no pending arrival (not ours, or done)"
            );
            return;
        };
        // Which users does this event concern? With an account map, that account's; without
        // one, every waiting entry of the message.
        let account: Option<Vec<String>> = match (&self.accounts, ev.account_id) {
            (Some(resolve), Some(id)) => resolve(id),
            _ => None,
        };
        let account_users: Option<Vec<String>> = account.map(|addrs| {
            addrs
                .iter()
                .filter_map(|a| self.users.lookup(a).map(|u| u.address.clone()))
                .collect()
        });
        let mut matched = false;
        for seq in seqs {
            let Some(m) = self.msgs.get_mut(&seq) else {
                continue;
            };
            let mut hits = Vec::new();
            for (i, e) in m.entries.iter_mut().enumerate() {
                if e.state != EntryState::Wait {
                    continue;
                }
                if let Some(us) = &account_users {
                    if !us.contains(&e.user) {
                        continue;
                    }
                }
                hits.push(i);
            }
            for i in hits {
                matched = true;
                let notify = match ev.kind {
                    IngestKind::Ham => true,
                    IngestKind::Spam => self.cfg.spam_notifies,
                    IngestKind::Duplicate | IngestKind::Queued => false,
                };
                if notify {
                    self.set_state((seq, i), EntryState::Ready, round);
                    self.release((seq, i), now, round);
                } else {
                    let reason = match ev.kind {
                        IngestKind::Spam => "spam (filed as junk)",
                        _ => "duplicate, not stored",
                    };
                    self.drop_entry((seq, i), reason, round);
                }
            }
        }
        if !matched {
            bump(&self.stats.unmatched_confirmations, 1);
        }
    }

    fn set_state(&mut self, (seq, i): EntryRef, state: EntryState, round: &mut Round) {
        if let Some(e) = self.msgs.get_mut(&seq).and_then(|m| m.entries.get_mut(i)) {
            if e.state != state {
                e.state = state;
                round.touch(seq);
            }
        }
    }

    fn drop_entry(&mut self, r: EntryRef, reason: &str, round: &mut Round) {
        let Some(e) = self.entry(r) else { return };
        let (user, notice) = (e.user.clone(), e.id.clone());
        bump(&self.stats.dropped, 1);
        round.audits.push(AuditEvent::Dropped {
            notice,
            user,
            reason: reason.to_owned(),
        });
        self.set_state(r, EntryState::Done, round);
    }

    fn entry(&self, (seq, i): EntryRef) -> Option<&Entry> {
        self.msgs.get(&seq).and_then(|m| m.entries.get(i))
    }

    fn minute_of_day(&self, now: i64) -> u16 {
        let local = now.div_euclid(1000) + i64::from(self.offset_secs);
        u16::try_from(local.rem_euclid(86_400) / 60).unwrap_or(0)
    }

    /// A ready entry: drop it, hold it, or send it now.
    fn release(&mut self, r: EntryRef, now: i64, round: &mut Round) {
        let Some(e) = self.entry(r) else { return };
        let Some(m) = self.msgs.get(&r.0) else { return };
        let user_addr = e.user.clone();
        let sender = m.sender().to_owned();
        let Some(user) = self.users.lookup(&user_addr) else {
            self.drop_entry(r, "no longer a registered user", round);
            return;
        };
        if let Some(why) = user.ineligible(now) {
            self.drop_entry(r, ineligible_reason(why), round);
            return;
        }
        if !sender.is_empty() && !user.sender_allowed(&sender) {
            self.drop_entry(r, &format!("sender filter: {sender} is not allowed"), round);
            return;
        }
        let (hold_until, why) = self.hold_until(&user, now);
        let held = self
            .holds
            .get(&user.address)
            .filter(|h| !h.entries.is_empty())
            .map(|h| (h.until_ms, h.why));
        if hold_until > now || held.is_some() {
            let (until, why) = match held {
                Some((until, why)) if until >= hold_until => (until, why),
                _ => (hold_until, why),
            };
            self.hold(&user.address, r, until, why, round);
            return;
        }
        self.send(&user, vec![r], now, round);
    }

    /// When the user may next get an SMS (<= now: at once), and what holds it back until
    /// then (the later of quiet hours' end and the rate limit's).
    fn hold_until(&self, user: &User, now: i64) -> (i64, HoldWhy) {
        let mut until = now;
        let mut why = HoldWhy::RateLimit;
        if let Some(q) = user.quiet {
            let min = self.minute_of_day(now);
            if q.contains(min) {
                let left = i64::from(q.minutes_until_end(min));
                // Back to the start of this minute, then forward to the window's end.
                until = until.max(now - now.rem_euclid(60_000) + left * 60_000);
                why = HoldWhy::QuietHours;
            }
        }
        let window = user.rate_limit_secs.unwrap_or(self.cfg.rate_limit_secs);
        if window > 0 {
            if let Some(last) = self.last_sent.get(&user.address) {
                let end = last.saturating_add(i64::from(window) * 1000);
                if end > until {
                    until = end;
                    why = HoldWhy::RateLimit;
                }
            }
        }
        (until, why)
    }

    /// "quiet hours until 2026-11-22T19:00:00+08:00" (in the configured time zone).
    fn hold_reason(&self, why: HoldWhy, until_ms: i64) -> String {
        let at = chrono::FixedOffset::east_opt(self.offset_secs)
            .zip(chrono::DateTime::from_timestamp_millis(until_ms))
            .map(|(tz, t)| {
                t.with_timezone(&tz)
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            })
            .unwrap_or_else(|| format!("{until_ms} ms"));
        format!("{} until {at}", why.as_str())
    }

    /// Holds entry `r` of `user` until `until` (or the user's hold's end, if later).
    fn hold(&mut self, user: &str, r: EntryRef, until: i64, why: HoldWhy, round: &mut Round) {
        let h = self.holds.entry(user.to_owned()).or_default();
        if h.entries.contains(&r) {
            return;
        }
        h.entries.push(r);
        if until > h.until_ms {
            h.until_ms = until;
            h.why = why;
            self.hold_timers.push(Reverse((until, user.to_owned())));
        }
        let (until, why) = (h.until_ms, h.why);
        self.note_hold(r, user, until, why, round);
    }

    /// Records that entry `r` is held (audit and the staged record).
    fn note_hold(&mut self, r: EntryRef, user: &str, until: i64, why: HoldWhy, round: &mut Round) {
        let reason = self.hold_reason(why, until);
        let Some(e) = self.msgs.get_mut(&r.0).and_then(|m| m.entries.get_mut(r.1)) else {
            return;
        };
        round.audits.push(AuditEvent::Held {
            notice: e.id.clone(),
            user: user.to_owned(),
            reason: reason.clone(),
            until_ms: until,
        });
        e.hold = Some(HoldNote {
            why: reason,
            until_ms: until,
        });
        round.touch(r.0);
    }

    /// Queues one notice standing for `refs` (the newest one's sender and subject).
    fn send(&mut self, user: &User, refs: Vec<EntryRef>, now: i64, round: &mut Round) {
        let live: Vec<EntryRef> = refs
            .into_iter()
            .filter(|r| self.entry(*r).is_some_and(|e| e.state == EntryState::Ready))
            .collect();
        let Some(&newest) = live
            .iter()
            .max_by_key(|r| (self.msgs.get(&r.0).map_or(0, |m| m.received_at_ms), r.0))
        else {
            return;
        };
        let (Some(m), Some(e)) = (self.msgs.get(&newest.0), self.entry(newest)) else {
            return;
        };
        let count = u32::try_from(live.len()).unwrap_or(u32::MAX);
        // The newest entry's id: its `created` record names the sender and subject the SMS
        // shows; the others are recorded as coalesced into it.
        let id =
            e.id.parse::<NotifId>()
                .unwrap_or_else(|_| NotifId::random());
        let n = Notification {
            id,
            kind: mailbell_link::notification::NoticeKind::Arrival,
            phone: user.phone.clone(),
            recipient: registered_address(user, &e.rcpt),
            sole_address: user.aliases.is_empty(),
            from_name: m.from_name.clone(),
            from_addr: m.sender().to_owned(),
            subject: m.subject.clone(),
            received_at_ms: m.received_at_ms,
            language: user.language.clone(),
            count,
            max_parts: if user.max_parts > 0 {
                user.max_parts
            } else {
                self.cfg.max_parts
            },
            text: None,
        };
        let notice = n.id.to_string();
        if count > 1 {
            bump(&self.stats.coalesced, u64::from(count));
            for r in live.iter().filter(|r| **r != newest) {
                let Some(other) = self.entry(*r) else {
                    continue;
                };
                round.audits.push(AuditEvent::Coalesced {
                    notice: other.id.clone(),
                    user: user.address.clone(),
                    into: notice.clone(),
                    count,
                });
            }
        }
        round.audits.push(AuditEvent::Queued {
            notice,
            user: user.address.clone(),
        });
        for r in live {
            self.set_state(r, EntryState::Done, round);
        }
        round.notices.push(n);
        round.sent_users.push((user.address.clone(), now));
        self.last_sent.insert(user.address.clone(), now);
    }

    /// Confirmation deadlines and hold windows that have come.
    fn timers(&mut self, round: &mut Round) {
        let now = self.now();
        while let Some(Reverse((t, seq))) = self.deadlines.peek().cloned() {
            if t > now {
                break;
            }
            self.deadlines.pop();
            let waiting: Vec<usize> = self.msgs.get(&seq).map_or_else(Vec::new, |m| {
                m.entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.state == EntryState::Wait)
                    .map(|(i, _)| i)
                    .collect()
            });
            let queued =
                self.msgs.get(&seq).is_some_and(|m| m.queued) || !self.cfg.timeout_requires_queued;
            for i in waiting {
                bump(&self.stats.confirm_timeouts, 1);
                match self.cfg.on_confirm_timeout {
                    TimeoutPolicy::Release if !queued => self.drop_entry(
                        (seq, i),
                        "no delivery confirmation, and Stalwart never reported it queued \
                         (rejected after the hook?)",
                        round,
                    ),
                    TimeoutPolicy::Release => {
                        debug!(seq, "no delivery confirmation in time; notifying anyway");
                        self.set_state((seq, i), EntryState::Ready, round);
                        self.release((seq, i), now, round);
                    }
                    TimeoutPolicy::Drop => {
                        self.drop_entry((seq, i), "no delivery confirmation in time", round)
                    }
                }
            }
        }
        while let Some(Reverse((t, user))) = self.hold_timers.peek().cloned() {
            if t > now {
                break;
            }
            self.hold_timers.pop();
            let Some(h) = self.holds.get(&user) else {
                continue;
            };
            if h.until_ms > now {
                continue; // extended meanwhile; a later timer exists
            }
            let Some(h) = self.holds.remove(&user) else {
                continue;
            };
            let Some(u) = self.users.lookup(&user) else {
                for r in h.entries {
                    self.drop_entry(r, "no longer a registered user", round);
                }
                continue;
            };
            if let Some(why) = u.ineligible(now) {
                for r in h.entries {
                    self.drop_entry(r, ineligible_reason(why), round);
                }
                continue;
            }
            // Quiet hours may still be on (e.g. a rate-limit window ended inside them).
            self.last_sent.remove(&user);
            let (until, why) = self.hold_until(&u, now);
            if until > now {
                let mut h = h;
                h.until_ms = until;
                h.why = why;
                for r in &h.entries {
                    self.note_hold(*r, &user, until, why, round);
                }
                self.hold_timers.push(Reverse((until, user.clone())));
                self.holds.insert(user, h);
                continue;
            }
            self.send(&u, h.entries, now, round);
        }
    }

    /// Hands a round to the outbox and moves on; a task answers and logs the round once it
    /// is durable. On a store error it answers with the error and has the scheduler rebuild
    /// its state from the store (which has every round that did commit).
    async fn finish(&mut self, round: Round) {
        let mut settle = Settle::default();
        for seq in &round.touched {
            let fresh = round.fresh.contains(seq);
            match self.msgs.get(seq) {
                Some(m) if m.all_done() && fresh => {}
                Some(m) if m.all_done() => settle.remove.push(*seq),
                Some(m) if fresh => settle.insert.push(m.record(*seq)),
                Some(m) => settle.rewrite.push(m.record(*seq)),
                None => {}
            }
        }
        // Done messages leave memory now; if the commit fails, the reload brings back what
        // the store still has.
        for seq in &round.touched {
            if self.msgs.get(seq).is_some_and(StagedMsg::all_done) {
                self.forget(*seq);
            }
        }
        settle.enqueue = round.notices;
        settle.admitted = round.admitted;
        // The round's audit events are recorded by the committer once the round is durable
        // and before the link can see its notices: a notice's `queued` always comes before
        // its `sent`.
        if !round.audits.is_empty() {
            let (audit, audits) = (self.audit.clone(), round.audits);
            settle.on_durable = Some(OnDurable::new(move || audit.record_all(audits)));
        }
        let queued = settle.enqueue.len() as u64;
        let receipt = self.outbox.settle_begin(settle).await;
        let stats = self.stats.clone();
        let me = self.me.clone();
        let replies = round.replies;
        let done = async move {
            let result = match receipt {
                Ok(rx) => rx.await.unwrap_or(Err(OutboxError::Stopped)),
                Err(e) => Err(e),
            };
            match result {
                Ok(_) => {
                    bump(&stats.queued, queued);
                    for r in replies {
                        let _ = r.send(Ok(()));
                    }
                }
                Err(e) => {
                    bump(&stats.store_errors, 1);
                    error!(error = %e, "cannot commit notices; the MTA is told to retry, state reloaded");
                    let err = store_error(e);
                    for r in replies {
                        let _ = r.send(Err(IntakeError::Store(err.to_string())));
                    }
                    if let Some(me) = me.upgrade() {
                        let _ = me.send(Cmd::Reload);
                    }
                }
            }
        };
        tokio::spawn(done);
    }

    fn forget(&mut self, seq: u64) {
        if let Some(m) = self.msgs.remove(&seq) {
            if let Some(q) = m.queue_id {
                if let Some(v) = self.by_queue.get_mut(&q) {
                    v.retain(|s| *s != seq);
                    if v.is_empty() {
                        self.by_queue.remove(&q);
                    }
                }
            }
        }
    }

    /// After a failed commit: the store is the truth. Rate-limit clocks are forgotten and
    /// ready entries are held a second, then evaluated afresh.
    fn reload(&mut self) {
        self.last_sent.clear();
        if let Err(e) = self.load() {
            error!(error = %e, "cannot reload intake state");
        }
        let now = self.now();
        for r in self.ready_entries() {
            if let Some(user) = self.entry(r).map(|e| e.user.clone()) {
                self.hold(&user, r, now + 1000, HoldWhy::Retry, &mut Round::default());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;
    use crate::audit::AuditConfig;
    use crate::notify::arrival::HeaderFacts;
    use crate::users::QuietHours;

    /// 2026-11-22 10:00:00 UTC.
    const T0: i64 = 1_795_341_600_000;

    struct Rig {
        _dir: tempfile::TempDir,
        intake: MailIntake,
        outbox: Outbox,
        users: UserStore,
        audit: AuditLog,
        now: Arc<AtomicI64>,
        token: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn user(addr: &str, phone: &str) -> User {
        let mut u = User::new(addr);
        u.phone = phone.into();
        u
    }

    async fn rig_with(
        cfg: IntakeConfig,
        users: Vec<User>,
        accounts: Option<AccountResolver>,
    ) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("outbox"), Default::default()).unwrap();
        let store = UserStore::open(&dir.path().join("users")).unwrap();
        for u in users {
            // save, not insert: some users here deliberately have no phone.
            store.save(u).unwrap();
        }
        let audit = AuditLog::open(&dir.path().join("audit"), AuditConfig::default()).unwrap();
        start(dir, cfg, outbox, store, audit, accounts)
    }

    fn start(
        dir: tempfile::TempDir,
        cfg: IntakeConfig,
        outbox: Outbox,
        users: UserStore,
        audit: AuditLog,
        accounts: Option<AccountResolver>,
    ) -> Rig {
        let now = Arc::new(AtomicI64::new(T0));
        let n = now.clone();
        let token = CancellationToken::new();
        let (intake, task) = MailIntake::start(
            cfg,
            outbox.clone(),
            users.clone(),
            audit.clone(),
            accounts,
            Arc::new(move || n.load(Ordering::SeqCst)),
            token.clone(),
        )
        .unwrap();
        Rig {
            _dir: dir,
            intake,
            outbox,
            users,
            audit,
            now,
            token,
            task,
        }
    }

    /// A rig whose outbox holds at most `max_depth` notices.
    async fn rig_depth(users: Vec<User>, max_depth: u64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::notify::outbox::OutboxConfig {
            max_depth,
            ..Default::default()
        };
        let outbox = Outbox::open(&dir.path().join("outbox"), cfg).unwrap();
        let store = UserStore::open(&dir.path().join("users")).unwrap();
        for u in users {
            store.insert(u).unwrap();
        }
        let audit = AuditLog::open(&dir.path().join("audit"), AuditConfig::default()).unwrap();
        start(dir, IntakeConfig::default(), outbox, store, audit, None)
    }

    /// `n` registered users, u0@test.local ...
    fn users(n: usize) -> (Vec<User>, Vec<String>) {
        let us: Vec<User> = (0..n)
            .map(|i| user(&format!("u{i}@test.local"), &format!("+86138000{i:05}")))
            .collect();
        let addrs = us.iter().map(|u| u.address.clone()).collect();
        (us, addrs)
    }

    async fn rig(users: Vec<User>) -> Rig {
        rig_with(IntakeConfig::default(), users, None).await
    }

    impl Rig {
        /// Stops the scheduler, closes and reopens the outbox, starts a new scheduler on it
        /// (a daemon restart; the clock starts again at T0).
        async fn restart(self) -> Rig {
            self.token.cancel();
            let Rig {
                _dir,
                outbox,
                users,
                audit,
                intake,
                task,
                ..
            } = self;
            drop(intake);
            task.await.unwrap();
            outbox.close();
            drop(outbox);
            let outbox = Outbox::open(&_dir.path().join("outbox"), Default::default()).unwrap();
            start(_dir, IntakeConfig::default(), outbox, users, audit, None)
        }

        /// A Stalwart arrival for alice@test.local, subject "s", at T0.
        async fn alice_via_stalwart(&self, queue_id: u64) {
            self.intake
                .accept(arrival(
                    Origin::Stalwart { queue_id },
                    &["alice@test.local"],
                    "s",
                    T0,
                ))
                .await
                .unwrap();
        }

        fn advance(&self, ms: i64) {
            self.now.fetch_add(ms, Ordering::SeqCst);
        }

        async fn tick(&self) {
            self.intake.tick().await.unwrap();
        }

        /// Every audit event about notice `id`, in the order recorded.
        fn history(&self, id: &str) -> Vec<AuditEvent> {
            self.events(crate::audit::AuditQuery {
                notice: Some(id.into()),
                ..Default::default()
            })
        }

        /// Every audit event filed under `user`, in the order recorded.
        fn user_log(&self, user: &str) -> Vec<AuditEvent> {
            self.events(crate::audit::AuditQuery {
                user: Some(user.into()),
                ..Default::default()
            })
        }

        /// The events `query` selects, once everything recorded so far is on disk.
        fn events(&self, query: crate::audit::AuditQuery) -> Vec<AuditEvent> {
            self.audit.flush().unwrap();
            self.audit
                .query(&query)
                .unwrap()
                .into_iter()
                .map(|r| r.event)
                .collect()
        }

        /// Queued notices, oldest first.
        fn queued(&self) -> Vec<Notification> {
            self.outbox
                .list(1000)
                .unwrap()
                .iter()
                .map(|q| q.notification().unwrap())
                .collect()
        }
    }

    fn arrival(origin: Origin, rcpts: &[&str], subject: &str, at: i64) -> Arrival {
        Arrival {
            origin,
            client_ip: None,
            helo: "mx.remote.example".into(),
            env_from: "bounce@remote.example".into(),
            rcpts: rcpts.iter().map(|s| s.to_string()).collect(),
            headers: HeaderFacts {
                from_name: "张伟".into(),
                from_addr: "zhang.wei@remote.example".into(),
                subject: subject.into(),
                message_id: "m1@remote.example".into(),
                date_ms: None,
                auth_results: Vec::new(),
            },
            size: 1234,
            received_at_ms: at,
            mta_queue_id: None,
        }
    }

    fn ingest(kind: IngestKind, queue_id: u64, account_id: Option<u64>) -> Ingest {
        Ingest {
            kind,
            queue_id: Some(queue_id),
            account_id,
            document_id: Some(1),
            message_id: "m1@remote.example".into(),
            to: vec![],
        }
    }

    #[tokio::test]
    async fn milter_arrival_notifies_registered_eligible_users_only() {
        let mut off = user("off@example.com", "+8613800000001");
        off.notify = false;
        let mut expired = user("old@example.com", "+8613800000002");
        expired.licence_until = Some(T0 - 1);
        let mut alias = user("alice@example.com", "+8613800138000");
        alias.aliases = vec!["a.li@example.com".into()];
        alias.language = "zh".into();
        let r = rig(vec![alias, off, expired, user("nophone@example.com", "")]).await;
        let a = arrival(
            Origin::Milter,
            &[
                "A.Li@Example.com",
                "alice@example.com",
                "off@example.com",
                "old@example.com",
                "nophone@example.com",
                "stranger@example.com",
            ],
            "季度报告",
            T0,
        );
        let got = r.intake.accept(a).await.unwrap();
        assert_eq!(got.notices, 1, "two addresses of one user give one notice");
        r.tick().await;
        let q = r.queued();
        assert_eq!(q.len(), 1);
        let n = &q[0];
        assert_eq!(n.phone, "+8613800138000");
        // The alias as registered, not the sender's spelling (issue 9); she has two
        // addresses, so the SMS names the one the mail reached.
        assert_eq!(n.recipient, "a.li@example.com");
        assert!(!n.sole_address);
        assert_eq!(n.from_name, "张伟");
        assert_eq!(n.from_addr, "zhang.wei@remote.example");
        assert_eq!(n.subject, "季度报告");
        assert_eq!(n.received_at_ms, T0);
        assert_eq!(n.language, "zh");
        assert_eq!(n.count, 1);
        assert_eq!(r.outbox.stats.staged.load(Ordering::Relaxed), 0);
        let s = &r.intake.stats;
        assert_eq!(s.unknown_recipients.load(Ordering::Relaxed), 1);
        assert_eq!(s.ineligible_recipients.load(Ordering::Relaxed), 3);
        // Nobody to notify: accepted, nothing stored.
        let got = r
            .intake
            .accept(arrival(Origin::Milter, &["stranger@example.com"], "x", T0))
            .await
            .unwrap();
        assert_eq!(got.notices, 0);
        assert_eq!(r.outbox.stats.staged.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn stalwart_arrival_waits_for_ham_and_duplicates_change_nothing() {
        let r = rig(vec![user("alice@test.local", "+8613800138000")]).await;
        let q = 341_998_963_378_880_878;
        r.intake
            .accept(arrival(
                Origin::Stalwart { queue_id: q },
                &["alice@test.local"],
                "s",
                T0,
            ))
            .await
            .unwrap();
        r.tick().await;
        assert!(
            r.queued().is_empty(),
            "not before the delivery is confirmed"
        );
        assert_eq!(r.outbox.stats.staged.load(Ordering::Relaxed), 1);
        // A confirmation for some other message changes nothing.
        r.intake
            .confirm(vec![ingest(IngestKind::Ham, 7, Some(2))])
            .await
            .unwrap();
        assert!(r.queued().is_empty());
        r.intake
            .confirm(vec![ingest(IngestKind::Ham, q, Some(2))])
            .await
            .unwrap();
        assert_eq!(r.queued().len(), 1);
        // Stalwart resends whole batches: the same confirmation again sends nothing.
        r.intake
            .confirm(vec![ingest(IngestKind::Ham, q, Some(2))])
            .await
            .unwrap();
        r.advance(3_600_000);
        r.tick().await;
        assert_eq!(r.queued().len(), 1);
        assert_eq!(r.outbox.stats.staged.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn spam_and_duplicates_are_not_notified_unless_configured() {
        let users = vec![user("alice@test.local", "+8613800138000")];
        let r = rig(users.clone()).await;
        for (q, kind) in [(1, IngestKind::Spam), (2, IngestKind::Duplicate)] {
            r.intake
                .accept(arrival(
                    Origin::Stalwart { queue_id: q },
                    &["alice@test.local"],
                    "s",
                    T0,
                ))
                .await
                .unwrap();
            r.intake.confirm(vec![ingest(kind, q, None)]).await.unwrap();
        }
        r.advance(3_600_000);
        r.tick().await;
        assert!(r.queued().is_empty());
        assert_eq!(r.intake.stats.dropped.load(Ordering::Relaxed), 2);
        let log = r.user_log("alice@test.local");
        let AuditEvent::Created { notice, .. } = &log[0] else {
            panic!("{log:?}")
        };
        assert!(
            matches!(&log[1], AuditEvent::Dropped { notice: n, reason, .. }
                if n == notice && reason == "spam (filed as junk)"),
            "{log:?}"
        );
        let cfg = IntakeConfig {
            spam_notifies: true,
            ..Default::default()
        };
        let r = rig_with(cfg, users, None).await;
        r.alice_via_stalwart(1).await;
        r.intake
            .confirm(vec![ingest(IngestKind::Spam, 1, None)])
            .await
            .unwrap();
        assert_eq!(r.queued().len(), 1);
    }

    #[tokio::test]
    async fn missing_confirmation_releases_or_drops_after_the_timeout() {
        // (policy, Stalwart reported it queued, needs that evidence, SMS expected)
        let cases = [
            (TimeoutPolicy::Release, true, true, 1),
            (TimeoutPolicy::Release, false, true, 0),
            (TimeoutPolicy::Release, false, false, 1),
            (TimeoutPolicy::Drop, true, true, 0),
        ];
        for (policy, queued, requires, expect) in cases {
            let cfg = IntakeConfig {
                on_confirm_timeout: policy,
                confirm_timeout_secs: 300,
                timeout_requires_queued: requires,
                ..Default::default()
            };
            let case = format!("{policy:?} queued={queued} requires={requires}");
            let r = rig_with(cfg, vec![user("alice@test.local", "+8613800138000")], None).await;
            r.alice_via_stalwart(9).await;
            if queued {
                r.intake
                    .confirm(vec![ingest(IngestKind::Queued, 9, None)])
                    .await
                    .unwrap();
                assert!(r.queued().is_empty(), "{case}: queued is not delivered");
            }
            r.advance(299_000);
            r.tick().await;
            assert!(r.queued().is_empty(), "{case}: too early");
            r.advance(2_000);
            r.tick().await;
            assert_eq!(r.queued().len(), expect, "{case}");
            assert_eq!(r.outbox.stats.staged.load(Ordering::Relaxed), 0, "{case}");
            // A late confirmation finds nothing to do.
            r.intake
                .confirm(vec![ingest(IngestKind::Ham, 9, None)])
                .await
                .unwrap();
            assert_eq!(r.queued().len(), expect, "{case}");
        }
    }

    #[tokio::test]
    async fn the_queued_evidence_survives_a_restart() {
        let r = rig(vec![user("alice@test.local", "+8613800138000")]).await;
        r.alice_via_stalwart(12).await;
        r.intake
            .confirm(vec![ingest(IngestKind::Queued, 12, None)])
            .await
            .unwrap();
        let r = r.restart().await;
        r.advance(601_000);
        r.tick().await;
        assert_eq!(r.queued().len(), 1, "released on timeout: it was queued");
    }

    #[tokio::test]
    async fn sub_addresses_reach_their_user() {
        let r = rig(vec![user("alice@example.com", "+8613800138000")]).await;
        let got = r
            .intake
            .accept(arrival(
                Origin::Milter,
                &["alice+news@example.com", "+x@example.com"],
                "s",
                T0,
            ))
            .await
            .unwrap();
        assert_eq!(got.notices, 1);
        r.tick().await;
        // The registered address, and her only one: the SMS need not name it.
        assert_eq!(r.queued()[0].recipient, "alice@example.com");
        assert!(r.queued()[0].sole_address);
        let cfg = IntakeConfig {
            subaddress_separator: String::new(),
            ..Default::default()
        };
        let r = rig_with(cfg, vec![user("alice@example.com", "+8613800138000")], None).await;
        let got = r
            .intake
            .accept(arrival(
                Origin::Milter,
                &["alice+news@example.com"],
                "s",
                T0,
            ))
            .await
            .unwrap();
        assert_eq!(got.notices, 0, "separator turned off");
    }

    #[tokio::test]
    async fn a_burst_inside_the_rate_limit_becomes_one_coalesced_notice() {
        let mut u = user("alice@example.com", "+8613800138000");
        u.rate_limit_secs = Some(300);
        let r = rig(vec![u]).await;
        for i in 0..5 {
            r.advance(10_000);
            let at = r.now.load(Ordering::SeqCst);
            r.intake
                .accept(arrival(
                    Origin::Milter,
                    &["alice@example.com"],
                    &format!("m{i}"),
                    at,
                ))
                .await
                .unwrap();
            r.tick().await;
        }
        let q = r.queued();
        assert_eq!(q.len(), 1, "the first one goes at once");
        assert_eq!(q[0].subject, "m0");
        assert_eq!(
            r.outbox.held().0,
            5,
            "one queued and four held, all counted"
        );
        r.advance(250_000); // 290 s after the first SMS
        r.tick().await;
        assert_eq!(r.queued().len(), 1, "still inside the window");
        r.advance(20_000);
        r.tick().await;
        let q = r.queued();
        assert_eq!(q.len(), 2);
        assert_eq!(q[1].count, 4, "four arrivals in one SMS");
        assert_eq!(r.outbox.held().0, 2, "coalescing frees room");
        assert_eq!(q[1].subject, "m4", "with the newest one's subject");
        assert_eq!(r.outbox.stats.staged.load(Ordering::Relaxed), 0);
        assert_eq!(r.intake.stats.coalesced.load(Ordering::Relaxed), 4);
        r.audit.flush().unwrap();
        let log = r
            .audit
            .query(&crate::audit::AuditQuery {
                user: Some("alice@example.com".into()),
                ..Default::default()
            })
            .unwrap();
        let names: Vec<String> = log
            .iter()
            .map(|l| {
                serde_json::to_value(&l.event).unwrap()["event"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            names.iter().filter(|n| *n == "created").count(),
            5,
            "{names:?}"
        );
        assert_eq!(
            names.iter().filter(|n| *n == "held").count(),
            4,
            "{names:?}"
        );
        assert_eq!(
            names.iter().filter(|n| *n == "coalesced").count(),
            3,
            "the three older ones, into the newest: {names:?}"
        );
        assert_eq!(
            names.iter().filter(|n| *n == "queued").count(),
            2,
            "{names:?}"
        );
        // The coalesced SMS has the newest arrival's notice id, from `created` on; the
        // others name it as what they were folded into.
        let story = r.history(&q[1].id.to_string());
        let names: Vec<&str> = story.iter().map(|e| e.name()).collect();
        assert_eq!(
            names,
            [
                "created",
                "held",
                "coalesced",
                "coalesced",
                "coalesced",
                "queued"
            ],
            "{story:?}"
        );
        let AuditEvent::Created { subject, .. } = &story[0] else {
            panic!("{story:?}")
        };
        assert_eq!(subject, "m4");
        let AuditEvent::Held { reason, .. } = &story[1] else {
            panic!("{story:?}")
        };
        assert_eq!(reason, "rate limit until 2026-11-22T10:05:10Z", "{story:?}");
    }

    #[tokio::test]
    async fn quiet_hours_hold_until_the_window_ends() {
        let mut u = user("alice@example.com", "+8613800138000");
        // T0 is 10:00 UTC = 18:00 at +08:00; quiet 17:30-19:00 local.
        u.quiet = Some(QuietHours::parse("17:30-19:00").unwrap());
        u.rate_limit_secs = Some(0);
        let cfg = IntakeConfig {
            timezone: "+08:00".into(),
            ..Default::default()
        };
        let r = rig_with(cfg, vec![u], None).await;
        for s in ["a", "b"] {
            r.intake
                .accept(arrival(Origin::Milter, &["alice@example.com"], s, T0))
                .await
                .unwrap();
        }
        r.tick().await;
        assert!(r.queued().is_empty());
        assert_eq!(r.outbox.held().0, 2, "held by quiet hours, counted");
        r.advance(59 * 60_000);
        r.tick().await;
        assert!(r.queued().is_empty(), "18:59 is still quiet");
        r.advance(60_000);
        r.tick().await;
        let q = r.queued();
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].count, 2);
        assert_eq!(r.outbox.held().0, 1, "two held became one notice");
        let reasons: Vec<String> = r
            .history(&q[0].id.to_string())
            .into_iter()
            .filter_map(|e| match e {
                AuditEvent::Held { reason, .. } => Some(reason),
                _ => None,
            })
            .collect();
        assert_eq!(reasons, ["quiet hours until 2026-11-22T19:00:00+08:00"]);
    }

    #[tokio::test]
    async fn sender_filters_and_users_switched_off_while_held() {
        let mut u = user("alice@example.com", "+8613800138000");
        u.deny_senders = vec!["@remote.example".into()];
        let mut b = user("bob@example.com", "+8613800138001");
        b.rate_limit_secs = Some(300);
        let r = rig(vec![u, b]).await;
        r.intake
            .accept(arrival(
                Origin::Milter,
                &["alice@example.com", "bob@example.com"],
                "s",
                T0,
            ))
            .await
            .unwrap();
        r.intake
            .accept(arrival(Origin::Milter, &["bob@example.com"], "t", T0))
            .await
            .unwrap();
        r.tick().await;
        let q = r.queued();
        assert_eq!(
            q.len(),
            1,
            "alice filtered the sender; bob's second one is held"
        );
        assert_eq!(q[0].recipient, "bob@example.com");
        let alice = r.user_log("alice@example.com");
        assert!(
            matches!(&alice[..], [AuditEvent::Created { notice: a, .. }, AuditEvent::Dropped { notice: b, reason, .. }]
                if a == b && reason == "sender filter: zhang.wei@remote.example is not allowed"),
            "{alice:?}"
        );
        // Bob turns notices off before his window ends: the held one is dropped.
        r.users
            .update(
                "bob@example.com",
                &crate::users::UserPatch {
                    notify: Some(false),
                    ..Default::default()
                },
            )
            .unwrap();
        r.advance(301_000);
        r.tick().await;
        assert_eq!(r.queued().len(), 1);
        assert_eq!(r.outbox.stats.staged.load(Ordering::Relaxed), 0);
        assert_eq!(r.intake.stats.dropped.load(Ordering::Relaxed), 2);
        let bob = r.user_log("bob@example.com");
        assert!(
            matches!(bob.last(), Some(AuditEvent::Dropped { reason, .. }) if reason == "notifications off"),
            "{bob:?}"
        );
    }

    #[tokio::test]
    async fn one_notice_id_from_creation_on_and_every_decision_on_record() {
        let mut alice = user("alice@example.com", "+8613800138000");
        alice.aliases = vec!["a.li@example.com".into()];
        let mut off = user("off@example.com", "+8613800000001");
        off.notify = false;
        let mut expired = user("old@example.com", "+8613800000002");
        expired.licence_until = Some(T0 - 1);
        let r = rig(vec![alice, off, expired, user("nophone@example.com", "")]).await;
        let mut a = arrival(
            Origin::Milter,
            &[
                "A.Li@Example.com",
                "off@example.com",
                "old@example.com",
                "nophone@example.com",
            ],
            "季度报告",
            T0,
        );
        a.mta_queue_id = Some("4XyZ1c2d3e".into());
        assert_eq!(r.intake.accept(a).await.unwrap().notices, 1);
        r.tick().await;
        let q = r.queued();
        let id = q[0].id.to_string();
        // The notice's whole story under its one id, filed under the registered user
        // although the mail was addressed to an alias, with the MTA's queue id.
        let story = r.history(&id);
        assert_eq!(
            story,
            [
                AuditEvent::Created {
                    notice: id.clone(),
                    user: "alice@example.com".into(),
                    queue_id: Some(QueueId::Mta("4XyZ1c2d3e".into())),
                    from: "zhang.wei@remote.example".into(),
                    subject: "季度报告".into(),
                },
                AuditEvent::Queued {
                    notice: id.clone(),
                    user: "alice@example.com".into(),
                },
            ]
        );
        assert_eq!(r.user_log("alice@example.com"), story);
        // Registered users who get no SMS: created and dropped, with why.
        for (u, why) in [
            ("off@example.com", "notifications off"),
            ("old@example.com", "licence expired"),
            ("nophone@example.com", "no phone number"),
        ] {
            let log = r.user_log(u);
            let [AuditEvent::Created { notice: a, .. }, AuditEvent::Dropped {
                notice: b, reason, ..
            }] = &log[..]
            else {
                panic!("{u}: {log:?}")
            };
            assert_eq!((a, reason.as_str()), (b, why), "{u}");
            assert!(a.parse::<NotifId>().is_ok() && *a != id, "{u}: {a}");
        }
    }

    #[tokio::test]
    async fn a_stalwart_notice_keeps_its_id_across_a_restart() {
        let r = rig(vec![user("alice@test.local", "+8613800138000")]).await;
        r.alice_via_stalwart(7).await;
        let r = r.restart().await;
        r.intake
            .confirm(vec![ingest(IngestKind::Ham, 7, None)])
            .await
            .unwrap();
        let q = r.queued();
        assert_eq!(q.len(), 1);
        let names: Vec<&str> = r
            .history(&q[0].id.to_string())
            .iter()
            .map(|e| e.name())
            .collect();
        assert_eq!(names, ["created", "queued"]);
    }

    #[tokio::test]
    async fn held_notices_are_listed_with_why() {
        let mut u = user("alice@example.com", "+8613800138000");
        u.quiet = Some(QuietHours::parse("17:30-19:00").unwrap());
        let cfg = IntakeConfig {
            timezone: "+08:00".into(),
            ..Default::default()
        };
        let r = rig_with(cfg, vec![u, user("bob@test.local", "+8613800138001")], None).await;
        r.intake
            .accept(arrival(Origin::Milter, &["alice@example.com"], "q", T0))
            .await
            .unwrap();
        r.intake
            .accept(arrival(
                Origin::Stalwart { queue_id: 3 },
                &["bob@test.local"],
                "w",
                T0,
            ))
            .await
            .unwrap();
        r.tick().await;
        let got = pending_notices(&r.outbox.staged().unwrap(), 10);
        let states: Vec<(&str, &str, Option<i64>)> = got
            .iter()
            .map(|p| (p.user.as_str(), p.state.as_str(), p.until_ms))
            .collect();
        assert_eq!(
            states,
            [
                (
                    "alice@example.com",
                    "quiet hours until 2026-11-22T19:00:00+08:00",
                    Some(T0 + 3_600_000)
                ),
                ("bob@test.local", "awaiting delivery confirmation", None),
            ]
        );
        let held = r.history(&got[0].id);
        assert_eq!(held[0].name(), "created", "{held:?}");
        assert_eq!(pending_notices(&r.outbox.staged().unwrap(), 1).len(), 1);
    }

    /// The committer records a round's events before the link can see its notices, so a
    /// notice's `queued` always comes before its `sent` (they used to race: the round's task
    /// recorded `queued` after the sender had already recorded `sent`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_is_always_recorded_before_sent() {
        use crate::notify::sender::AuditedOutbox;
        use mailbell_link::net::Outbox as _;
        let (us, addrs) = users(20);
        let r = rig(us).await;
        let sender = Arc::new(AuditedOutbox::new(r.outbox.clone(), r.audit.clone()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let link = {
            let (sender, stop) = (sender.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut after = None;
                let mut sent = 0;
                let give_up = std::time::Instant::now() + Duration::from_secs(60);
                while (!stop.load(Ordering::SeqCst) || sent < 300)
                    && std::time::Instant::now() < give_up
                {
                    let items = sender.ready(after, 64).unwrap();
                    if let Some(last) = items.last() {
                        after = Some(last.seq);
                    }
                    sent += items.len();
                    let ids: Vec<NotifId> = items.iter().map(|i| i.id).collect();
                    sender.acked(&ids).unwrap();
                    if items.is_empty() {
                        std::thread::yield_now();
                    }
                }
            })
        };
        for i in 0..300 {
            // No rate limit in the way: each user's clock moves a window on.
            r.advance(61_000);
            let at = r.now.load(Ordering::SeqCst);
            r.intake
                .accept(arrival(Origin::Milter, &[&addrs[i % 20]], "s", at))
                .await
                .unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        tokio::task::spawn_blocking(move || link.join().unwrap())
            .await
            .unwrap();
        r.audit.flush().unwrap();
        let log = r
            .audit
            .query(&crate::audit::AuditQuery {
                limit: 10_000,
                ..Default::default()
            })
            .unwrap();
        let mut queued_at: HashMap<String, u64> = HashMap::new();
        let mut checked = 0;
        for rec in &log {
            match &rec.event {
                AuditEvent::Queued { notice, .. } => {
                    queued_at.insert(notice.clone(), rec.seq);
                }
                AuditEvent::Sent { notice, .. } => {
                    assert!(
                        queued_at.contains_key(notice),
                        "sent before queued: {notice}"
                    );
                    checked += 1;
                }
                _ => {}
            }
        }
        assert_eq!(checked, 300);
    }

    #[tokio::test]
    async fn an_account_map_releases_only_that_users_notice() {
        let accounts: AccountResolver = Arc::new(|id| match id {
            2 => Some(vec!["alice@test.local".into()]),
            3 => Some(vec!["bob@test.local".into()]),
            _ => None,
        });
        let r = rig_with(
            IntakeConfig::default(),
            vec![
                user("alice@test.local", "+8613800138000"),
                user("bob@test.local", "+8613800138001"),
            ],
            Some(accounts),
        )
        .await;
        r.intake
            .accept(arrival(
                Origin::Stalwart { queue_id: 5 },
                &["alice@test.local", "bob@test.local"],
                "s",
                T0,
            ))
            .await
            .unwrap();
        r.intake
            .confirm(vec![ingest(IngestKind::Ham, 5, Some(3))])
            .await
            .unwrap();
        let q = r.queued();
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].recipient, "bob@test.local");
        r.intake
            .confirm(vec![ingest(IngestKind::Spam, 5, Some(2))])
            .await
            .unwrap();
        r.advance(3_600_000);
        r.tick().await;
        assert_eq!(r.queued().len(), 1, "alice's copy was spam");
    }

    #[tokio::test]
    async fn waiting_arrivals_survive_a_restart() {
        let r = rig(vec![user("alice@test.local", "+8613800138000")]).await;
        r.alice_via_stalwart(11).await;
        r.tick().await;
        let r = r.restart().await;
        r.tick().await;
        assert!(r.queued().is_empty());
        r.intake
            .confirm(vec![ingest(IngestKind::Ham, 11, None)])
            .await
            .unwrap();
        assert_eq!(r.queued().len(), 1);
    }

    #[tokio::test]
    async fn every_unconfirmed_notice_counts_and_a_crossing_arrival_is_refused_whole() {
        let (us, addrs) = users(6);
        let to: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let r = rig_depth(us, 10).await;
        let stalwart = |q| arrival(Origin::Stalwart { queue_id: q }, &to, "s", T0);
        let ok = r.intake.accept(stalwart(1)).await.unwrap();
        assert_eq!(ok.notices, 6);
        assert_eq!(
            r.outbox.held(),
            (6, 10),
            "six notices wait for a confirmation"
        );
        // Six more would cross the limit while those are unconfirmed: refused whole.
        let e = r.intake.accept(stalwart(2)).await.unwrap_err();
        assert!(matches!(e, IntakeError::Full(_)), "{e}");
        assert_eq!(e.to_string(), "notice store full: 6 notices held, limit 10");
        assert_eq!(r.outbox.stats.staged.load(Ordering::Relaxed), 1);
        assert_eq!(r.intake.stats.store_errors.load(Ordering::Relaxed), 1);
        // Four fit exactly.
        let four = arrival(Origin::Stalwart { queue_id: 3 }, &to[..4], "s", T0);
        r.intake.accept(four).await.unwrap();
        assert_eq!(r.outbox.held().0, 10);
        // Confirmed: six queued; the other four are then inside their users' rate-limit
        // window and held. Still ten notices.
        for q in [1, 3] {
            r.intake
                .confirm(vec![ingest(IngestKind::Ham, q, None)])
                .await
                .unwrap();
        }
        assert_eq!(r.queued().len(), 6);
        assert_eq!(r.outbox.held().0, 10);
        let e = r.intake.accept(stalwart(4)).await.unwrap_err();
        assert!(matches!(e, IntakeError::Full(_)), "{e}");
        // The agent takes the six queued ones: room for six.
        use mailbell_link::net::Outbox as _;
        let sent = r.outbox.ready(None, 10).unwrap();
        let ids: Vec<NotifId> = sent.iter().map(|i| i.id).collect();
        r.outbox.acked(&ids).unwrap();
        assert_eq!(r.outbox.held().0, 4);
        r.intake.accept(stalwart(5)).await.unwrap();
        assert_eq!(r.outbox.held().0, 10);
        // A restart counts the same from the store (the held four go out at once then).
        let r = r.restart().await;
        r.tick().await;
        assert_eq!(r.outbox.held().0, 10);
        assert_eq!(r.queued().len(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_arrivals_across_pipelined_rounds_stay_under_the_limit() {
        let (us, addrs) = users(6);
        let r = rig_depth(us, 20).await;
        let tasks: Vec<_> = (0..10u64)
            .map(|q| {
                let intake = r.intake.clone();
                let to = addrs.clone();
                tokio::spawn(async move {
                    let to: Vec<&str> = to.iter().map(String::as_str).collect();
                    intake
                        .accept(arrival(Origin::Stalwart { queue_id: q }, &to, "s", T0))
                        .await
                })
            })
            .collect();
        let (mut ok, mut full) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(a) => {
                    assert_eq!(a.notices, 6);
                    ok += 1;
                }
                Err(IntakeError::Full(_)) => full += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(
            (ok, full),
            (3, 7),
            "3 x 6 = 18 fit under 20, a fourth would not"
        );
        r.tick().await;
        assert_eq!(r.outbox.held().0, 18);
        assert_eq!(r.outbox.stats.staged.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_record_stored_with_the_wrong_count_is_recounted_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("outbox"), Default::default()).unwrap();
        let store = UserStore::open(&dir.path().join("users")).unwrap();
        let audit = AuditLog::open(&dir.path().join("audit"), AuditConfig::default()).unwrap();
        let m = StagedMsg {
            queue_id: Some(5),
            mta_queue_id: None,
            received_at_ms: T0,
            from_name: String::new(),
            from_addr: "li.na@example.org".into(),
            env_from: String::new(),
            subject: "s".into(),
            entries: ["a", "b", "c"]
                .iter()
                .map(|u| Entry {
                    user: format!("{u}@test.local"),
                    rcpt: format!("{u}@test.local"),
                    state: EntryState::Wait,
                    // As written before entries carried their notice id.
                    id: String::new(),
                    hold: None,
                })
                .collect(),
            queued: false,
        };
        // As a store written before records carried their count reads (one each).
        let seq = outbox.reserve_seq().unwrap();
        outbox
            .settle(Settle {
                insert: vec![StagedRecord {
                    notices: 1,
                    ..m.record(seq)
                }],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(outbox.held().0, 1);
        let r = start(dir, IntakeConfig::default(), outbox, store, audit, None);
        r.tick().await;
        assert_eq!(r.outbox.held().0, 3);
        let stored = r.outbox.staged().unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!((stored[0].seq, stored[0].notices), (seq, 3));
        // Rewritten with the notice ids the entries were given at load.
        let mut got: StagedMsg = serde_json::from_slice(&stored[0].value).unwrap();
        for e in &mut got.entries {
            assert!(e.id.parse::<NotifId>().is_ok(), "{:?}", e.id);
            e.id.clear();
        }
        assert_eq!(got, m);
    }
}
