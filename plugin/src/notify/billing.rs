//! Billing notices over the SMS path: "your account is in arrears" and "your balance has
//! reached a warning threshold", queued in the same durable outbox as arrival notices and
//! rendered by the agent from its own per-language `arrears` / `warning` templates (link tag
//! 12, docs/protocol.md).
//!
//! Who gets which notice is decided elsewhere (the accounting run, or an operator through
//! `POST /admin/v1/billing/notice`); [`send_billing_notices`] only delivers the decisions:
//!
//! - it looks each login up in the user registry: the phone number, the language, the part
//!   budget, and whether the user gets SMS at all (notify switch, licence) — the same rules as
//!   arrival notices;
//! - it queues one [`Notification`] per deliverable notice through the outbox, all of one call
//!   in one durable group commit per [`MAX_BATCH`];
//! - it records each notice in the audit log as `billing-notice` (kind, balance, threshold),
//!   then `queued` or `dropped` with the reason (`unknown_user`, `notify_off`,
//!   `licence_expired`, `no_phone`), so `mailbell log --user U` answers "was she told she is in
//!   arrears, and if not, why". The link adds `sent`, `acked` or `dead-lettered` as for any
//!   notice.
//!
//! Each notice's id is derived from (login, kind, threshold, `at_ms`) — [`notice_id`] — not
//! drawn at random, so a rerun of the same decision (a resumed accounting run) produces the
//! same id, and the agent, which keeps the ids it has received for `inbox.dedupe_retention`
//! (7 days by default), acknowledges the second copy without sending a second SMS. The balance
//! is not part of the id: the same crossing rerun with a recomputed balance is still the same
//! notice. A caller that repeats a decision later than the agent's retention must not pass it
//! again.

use std::collections::HashSet;

use mailbell_link::notification::{DecimalText, NoticeKind};
use mailbell_link::{NotifId, Notification};
use tracing::{info, warn};

use crate::audit::{AuditEvent, AuditLog};
use crate::billing::money::{Money, MINOR_DIGITS};
use crate::notify::outbox::{OnDurable, Outbox, OutboxError, Settle};
use crate::users::{address_key, Ineligible, UserStore};

/// Most notices queued in one outbox commit (one outbox group holds up to 256).
pub const MAX_BATCH: usize = 256;

/// What a billing notice tells the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BillingKind {
    /// The account has entered arrears; `balance` is its balance now.
    Arrears { balance: Money },
    /// The balance has fallen to or below `threshold`.
    Warning { balance: Money, threshold: Money },
}

impl BillingKind {
    /// "arrears" or "warning", as in the audit log and the agent's template keys.
    pub fn name(&self) -> &'static str {
        match self {
            BillingKind::Arrears { .. } => "arrears",
            BillingKind::Warning { .. } => "warning",
        }
    }

    pub fn balance(&self) -> Money {
        match *self {
            BillingKind::Arrears { balance } | BillingKind::Warning { balance, .. } => balance,
        }
    }

    pub fn threshold(&self) -> Option<Money> {
        match *self {
            BillingKind::Arrears { .. } => None,
            BillingKind::Warning { threshold, .. } => Some(threshold),
        }
    }

    /// The link's notice kind, amounts as decimal text ("-3.20").
    fn wire(&self) -> NoticeKind {
        let text = |m: Money| DecimalText::from_minor(m.minor(), MINOR_DIGITS);
        match *self {
            BillingKind::Arrears { balance } => NoticeKind::BillingArrears {
                balance: text(balance),
            },
            BillingKind::Warning { balance, threshold } => NoticeKind::BillingWarning {
                balance: text(balance),
                threshold: text(threshold),
            },
        }
    }
}

/// One decision to tell a user about their balance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BillingNotice {
    /// The account's login: the user's primary address (or an alias of it).
    pub login: String,
    pub kind: BillingKind,
    /// When it was decided, Unix ms: the accounting period's time for a nightly run (part of
    /// the notice id, so the same decision keeps its id) and `{time}` in the SMS.
    pub at_ms: i64,
}

/// Why a notice was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skipped {
    /// No registered user has this login.
    UnknownUser,
    /// The user gets no SMS now: notify off, licence expired, or no phone.
    Ineligible(Ineligible),
    /// The same notice (same id) came earlier in this call.
    Repeated,
}

impl Skipped {
    /// The reason as the audit log records it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Skipped::UnknownUser => "unknown_user",
            Skipped::Ineligible(i) => i.as_str(),
            Skipped::Repeated => "repeated",
        }
    }
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What became of one notice, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Durable in the outbox for the agent.
    Queued { id: NotifId, login: String },
    /// Not queued, and why (recorded in the audit log as `dropped`).
    Skipped {
        id: NotifId,
        login: String,
        why: Skipped,
    },
}

impl Outcome {
    pub fn id(&self) -> NotifId {
        match self {
            Outcome::Queued { id, .. } | Outcome::Skipped { id, .. } => *id,
        }
    }
}

/// Why notices could not be queued. The notices of the failed commit are recorded as
/// `dropped` with this error; queue them again later (their ids do not change).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BillingNoticeError {
    #[error("billing notices for {logins} user(s) not queued: {error}")]
    Outbox { logins: usize, error: OutboxError },
}

/// The id of a billing notice: the first 16 bytes of SHA-256 over a version tag, the login
/// (as the registry keys it: [`send_billing_notices`] puts the primary address for an alias),
/// the kind, the threshold in minor units (warnings) and `at_ms`.
pub fn notice_id(n: &BillingNotice) -> NotifId {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"mailbell billing notice 1\0");
    ctx.update(address_key(&n.login).as_bytes());
    ctx.update(b"\0");
    ctx.update(n.kind.name().as_bytes());
    ctx.update(b"\0");
    if let Some(t) = n.kind.threshold() {
        ctx.update(&t.minor().to_be_bytes());
    }
    ctx.update(b"\0");
    ctx.update(&n.at_ms.to_be_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&ctx.finish().as_ref()[..16]);
    NotifId(id)
}

/// Looks each notice's user up, queues the deliverable ones durably and records every one in
/// the audit log (see the module docs). Answers one [`Outcome`] per notice, in order, once the
/// queued ones are durable. An outbox error (full, failing) ends the call: the commits before
/// it stand, the notices of the failed commit and after it are not queued.
pub async fn send_billing_notices(
    outbox: &Outbox,
    users: &UserStore,
    audit: &AuditLog,
    notices: Vec<BillingNotice>,
) -> Result<Vec<Outcome>, BillingNoticeError> {
    let mut outcomes = Vec::with_capacity(notices.len());
    let mut seen = HashSet::new();
    // Notices to queue, with their `billing-notice` events, a commit's worth at a time.
    let mut batch: Vec<(Notification, AuditEvent)> = Vec::new();
    // The audit events of skipped notices, recorded with the next commit's, after them.
    let mut skips: Vec<AuditEvent> = Vec::new();
    let now_ms = chrono::Utc::now().timestamp_millis();
    for mut n in notices {
        let user = users.lookup(&n.login);
        // The id and the audit log use the primary address, also for a login given as an alias.
        let login = user
            .as_ref()
            .map_or_else(|| address_key(&n.login), |u| u.address.clone());
        n.login.clone_from(&login);
        let id = notice_id(&n);
        let created = AuditEvent::BillingNotice {
            notice: id.to_string(),
            user: login.clone(),
            kind: n.kind.name().to_owned(),
            balance: n.kind.balance().to_string(),
            threshold: n.kind.threshold().map(|t| t.to_string()),
        };
        let skip = if !seen.insert(id) {
            Some(Skipped::Repeated)
        } else {
            match &user {
                None => Some(Skipped::UnknownUser),
                Some(u) => u.ineligible(now_ms).map(Skipped::Ineligible),
            }
        };
        let (Some(user), None) = (user, skip) else {
            let why = skip.unwrap_or(Skipped::UnknownUser);
            info!(notif_id = %id, user = %login, kind = n.kind.name(), reason = %why, "billing notice not sent");
            skips.extend([
                created,
                AuditEvent::Dropped {
                    notice: id.to_string(),
                    user: login.clone(),
                    reason: why.as_str().to_owned(),
                },
            ]);
            outcomes.push(Outcome::Skipped { id, login, why });
            continue;
        };
        let notification = Notification {
            id,
            kind: n.kind.wire(),
            phone: user.phone.clone(),
            recipient: user.address.clone(),
            received_at_ms: n.at_ms,
            language: user.language.clone(),
            count: 1,
            max_parts: user.max_parts,
            ..Notification::default()
        };
        outcomes.push(Outcome::Queued { id, login });
        batch.push((notification, created));
        if batch.len() == MAX_BATCH {
            commit(
                outbox,
                audit,
                std::mem::take(&mut batch),
                std::mem::take(&mut skips),
            )
            .await?;
        }
    }
    commit(outbox, audit, batch, skips).await?;
    Ok(outcomes)
}

/// Queues `batch` in one durable commit; its audit events are recorded once it is durable and
/// before the link can send it (so `queued` comes before `sent`), or as `dropped` if it fails;
/// then `skips`, the events of the notices skipped meanwhile.
async fn commit(
    outbox: &Outbox,
    audit: &AuditLog,
    batch: Vec<(Notification, AuditEvent)>,
    skips: Vec<AuditEvent>,
) -> Result<(), BillingNoticeError> {
    if batch.is_empty() {
        audit.record_all(skips);
        return Ok(());
    }
    let (notifications, created): (Vec<Notification>, Vec<AuditEvent>) = batch.into_iter().unzip();
    let logins = notifications.len();
    // `billing-notice` then `queued` (or `dropped`) for each notice.
    let with = |then: &dyn Fn(&Notification) -> AuditEvent| -> Vec<AuditEvent> {
        created
            .iter()
            .zip(&notifications)
            .flat_map(|(c, n)| [c.clone(), then(n)])
            .collect()
    };
    let mut queued = with(&|n| AuditEvent::Queued {
        notice: n.id.to_string(),
        user: n.recipient.clone(),
    });
    queued.extend(skips.iter().cloned());
    let result = match outbox.admit(logins as u64) {
        Ok(admitted) => {
            let log = audit.clone();
            outbox
                .settle(Settle {
                    enqueue: notifications.clone(),
                    admitted,
                    on_durable: Some(OnDurable::new(move || log.record_all(queued))),
                    ..Settle::default()
                })
                .await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(_) => {
            for n in &notifications {
                info!(notif_id = %n.id, user = %n.recipient, kind = n.kind.name(), "billing notice queued");
            }
            Ok(())
        }
        Err(error) => {
            warn!(%error, notices = logins, "billing notices not queued");
            let reason = format!("not queued: {error}");
            let mut dropped = with(&|n| AuditEvent::Dropped {
                notice: n.id.to_string(),
                user: n.recipient.clone(),
                reason: reason.clone(),
            });
            dropped.extend(skips);
            audit.record_all(dropped);
            Err(BillingNoticeError::Outbox { logins, error })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::audit::{AuditConfig, AuditQuery};
    use crate::notify::outbox::OutboxConfig;
    use crate::users::User;

    struct Stores {
        _dir: tempfile::TempDir,
        outbox: Outbox,
        users: UserStore,
        audit: AuditLog,
    }

    fn stores(max_depth: u64) -> Stores {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(
            &dir.path().join("outbox"),
            OutboxConfig {
                max_depth,
                ..OutboxConfig::default()
            },
        )
        .unwrap();
        let users = UserStore::open(&dir.path().join("users")).unwrap();
        let audit = AuditLog::open(&dir.path().join("audit"), AuditConfig::default()).unwrap();
        let user = |address: &str, phone: &str, language: &str| {
            let mut u = User::new(address);
            u.phone = phone.into();
            u.notify = !phone.is_empty();
            u.language = language.into();
            u
        };
        let mut alice = user("alice@example.com", "+8613800138000", "zh");
        alice.aliases = vec!["a@example.com".into()];
        alice.max_parts = 2;
        users.upsert(alice).unwrap();
        users
            .upsert(user("bob@example.com", "+447700900123", "en"))
            .unwrap();
        let mut carol = user("carol@example.com", "+8613900139000", "");
        carol.licence_until = Some(1);
        users.upsert(carol).unwrap();
        let mut dave = user("dave@example.com", "+8613700137000", "");
        dave.notify = false;
        users.upsert(dave).unwrap();
        Stores {
            _dir: dir,
            outbox,
            users,
            audit,
        }
    }

    const AT: i64 = 1_795_305_600_000;

    fn money(s: &str) -> Money {
        Money::parse(s).unwrap()
    }

    fn arrears(login: &str, balance: &str) -> BillingNotice {
        BillingNotice {
            login: login.into(),
            kind: BillingKind::Arrears {
                balance: money(balance),
            },
            at_ms: AT,
        }
    }

    fn warning(login: &str, balance: &str, threshold: &str) -> BillingNotice {
        BillingNotice {
            login: login.into(),
            kind: BillingKind::Warning {
                balance: money(balance),
                threshold: money(threshold),
            },
            at_ms: AT,
        }
    }

    /// `event` names and reasons of `user`'s audit records, oldest first.
    fn history(audit: &AuditLog, user: &str) -> Vec<String> {
        audit.flush().unwrap();
        audit
            .query(&AuditQuery {
                user: Some(user.into()),
                ..AuditQuery::default()
            })
            .unwrap()
            .into_iter()
            .map(|r| match r.event {
                AuditEvent::Dropped { reason, .. } => format!("dropped {reason}"),
                AuditEvent::BillingNotice {
                    kind,
                    balance,
                    threshold,
                    ..
                } => format!("billing-notice {kind} {balance} {threshold:?}"),
                e => e.name().to_owned(),
            })
            .collect()
    }

    #[tokio::test]
    async fn queues_deliverable_notices_and_records_why_not() {
        let s = stores(1000);
        let out = send_billing_notices(
            &s.outbox,
            &s.users,
            &s.audit,
            vec![
                arrears("A@Example.com", "-3.20"), // an alias, in capitals
                warning("bob@example.com", "4.80", "5.00"),
                arrears("nobody@example.com", "-1.00"),
                arrears("carol@example.com", "-1.00"),
                arrears("dave@example.com", "-1.00"),
                arrears("alice@example.com", "-3.25"), // the same decision again
            ],
        )
        .await
        .unwrap();
        let whys: Vec<Option<Skipped>> = out
            .iter()
            .map(|o| match o {
                Outcome::Queued { .. } => None,
                Outcome::Skipped { why, .. } => Some(*why),
            })
            .collect();
        assert_eq!(
            whys,
            [
                None,
                None,
                Some(Skipped::UnknownUser),
                Some(Skipped::Ineligible(Ineligible::LicenceExpired)),
                Some(Skipped::Ineligible(Ineligible::NotifyOff)),
                Some(Skipped::Repeated),
            ]
        );
        assert_eq!(
            out[0].id(),
            out[5].id(),
            "the alias and the address are one notice"
        );
        let queued: Vec<Notification> = s
            .outbox
            .list(10)
            .unwrap()
            .iter()
            .map(|q| q.notification().unwrap())
            .collect();
        assert_eq!(queued.len(), 2);
        let a = &queued[0];
        assert_eq!(a.id, out[0].id());
        assert_eq!(
            (a.phone.as_str(), a.recipient.as_str(), a.language.as_str()),
            ("+8613800138000", "alice@example.com", "zh")
        );
        assert_eq!((a.max_parts, a.received_at_ms, a.count), (2, AT, 1));
        assert_eq!(
            a.kind,
            NoticeKind::BillingArrears {
                balance: DecimalText::parse("-3.20").unwrap()
            }
        );
        assert_eq!(
            queued[1].kind,
            NoticeKind::BillingWarning {
                balance: DecimalText::parse("4.80").unwrap(),
                threshold: DecimalText::parse("5.00").unwrap()
            }
        );

        assert_eq!(
            history(&s.audit, "alice@example.com"),
            [
                "billing-notice arrears -3.20 None",
                "queued",
                "billing-notice arrears -3.25 None",
                "dropped repeated"
            ]
        );
        assert_eq!(
            history(&s.audit, "bob@example.com"),
            ["billing-notice warning 4.80 Some(\"5.00\")", "queued"]
        );
        for (user, reason) in [
            ("nobody@example.com", "unknown_user"),
            ("carol@example.com", "licence_expired"),
            ("dave@example.com", "notify_off"),
        ] {
            assert_eq!(
                history(&s.audit, user),
                [
                    "billing-notice arrears -1.00 None".to_owned(),
                    format!("dropped {reason}")
                ],
                "{user}"
            );
        }
        s.outbox.close();
    }

    #[test]
    fn notice_ids_are_stable_per_decision() {
        let id = |n: BillingNotice| notice_id(&n);
        let base = id(warning("alice@example.com", "4.80", "5.00"));
        assert_eq!(base, id(warning("Alice@Example.COM", "4.80", "5.00")));
        assert_eq!(
            base,
            id(warning("alice@example.com", "4.10", "5.00")),
            "a recomputed balance is the same decision"
        );
        let mut other_time = warning("alice@example.com", "4.80", "5.00");
        other_time.at_ms += 1;
        for different in [
            id(warning("alice@example.com", "4.80", "2.00")),
            id(warning("bob@example.com", "4.80", "5.00")),
            id(arrears("alice@example.com", "4.80")),
            id(other_time),
        ] {
            assert_ne!(base, different);
        }
        // Fixed across versions: a resumed run after an upgrade keeps the ids.
        assert_eq!(
            id(arrears("alice@example.com", "-3.20")).to_string(),
            "608bd6e03b222c954dc03fb441264355"
        );
    }

    #[tokio::test]
    async fn a_full_outbox_is_an_error_and_recorded() {
        let s = stores(1);
        let err = send_billing_notices(
            &s.outbox,
            &s.users,
            &s.audit,
            vec![
                arrears("alice@example.com", "-3.20"),
                arrears("bob@example.com", "-1.00"),
            ],
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("billing notices for 2 user(s) not queued: outbox full"),
            "{err}"
        );
        assert!(s.outbox.list(10).unwrap().is_empty(), "all or nothing");
        let h = history(&s.audit, "alice@example.com");
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(h[1].starts_with("dropped not queued: outbox full"), "{h:?}");
        // Within the room left, the same decision is queued under the same id.
        let out = send_billing_notices(
            &s.outbox,
            &s.users,
            &s.audit,
            vec![arrears("alice@example.com", "-3.20")],
        )
        .await
        .unwrap();
        assert_eq!(
            out[0].id(),
            notice_id(&arrears("alice@example.com", "-3.20"))
        );
        assert_eq!(s.outbox.list(10).unwrap().len(), 1);
        s.outbox.close();
    }

    #[test]
    fn audit_line() {
        let r = crate::audit::AuditRecord {
            at_ms: AT,
            seq: 1,
            event: AuditEvent::BillingNotice {
                notice: "ab".into(),
                user: "alice@example.com".into(),
                kind: "warning".into(),
                balance: "123456789.00".into(),
                threshold: Some("5.00".into()),
            },
        };
        assert_eq!(
            crate::audit::format_record(&r),
            "2026-11-22T00:00:00.000Z billing-notice notice=ab user=alice@example.com \
             kind=warning balance=123456789.00 threshold=5.00"
        );
        let json = serde_json::to_string(&r.event).unwrap();
        assert!(json.starts_with(r#"{"event":"billing-notice","#), "{json}");
        assert_eq!(serde_json::from_str::<AuditEvent>(&json).unwrap(), r.event);
    }

    #[tokio::test]
    async fn nothing_to_send_is_not_an_error() {
        let s = stores(1);
        assert!(send_billing_notices(&s.outbox, &s.users, &s.audit, vec![])
            .await
            .unwrap()
            .is_empty());
        s.outbox.close();
    }
}
