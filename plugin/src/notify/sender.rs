//! The outbox as the link client sees it, with every hand-over, acknowledgement, deferral,
//! dead letter and session recorded in the audit log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mailbell_link::net::{OutItem, Outbox as LinkOutbox, SessionEvent, StoreError};
use mailbell_link::{NotifId, Notification};
use tokio::sync::Notify;

use crate::audit::{AuditEvent, AuditLog};
use crate::notify::outbox::Outbox;

/// Most in-flight ids whose recipient is remembered for the audit log (beyond it, link events
/// are logged without a user).
const MAX_TRACKED: usize = 100_000;

/// Maps a notice's recipient, as addressed (an alias, a sub-address), to the registered user
/// it reached (see [`crate::notify::intake::MailIntake::user_resolver`]).
pub type UserResolver = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// [`Outbox`] plus audit records.
pub struct AuditedOutbox {
    outbox: Outbox,
    audit: AuditLog,
    /// Files link events under the registered user, not the address as written.
    resolve: Option<UserResolver>,
    /// The agent of the current session.
    agent: Mutex<String>,
    /// Recipient of each notice handed to the link and not settled yet.
    users: Mutex<HashMap<NotifId, String>>,
}

impl AuditedOutbox {
    pub fn new(outbox: Outbox, audit: AuditLog) -> Self {
        Self {
            outbox,
            audit,
            resolve: None,
            agent: Mutex::new(String::new()),
            users: Mutex::new(HashMap::new()),
        }
    }

    /// Records link events under the user `resolve` names for a notice's recipient (the
    /// recipient itself when it names none: a user removed since).
    pub fn resolving_users(mut self, resolve: UserResolver) -> Self {
        self.resolve = Some(resolve);
        self
    }

    /// The user a notice to `recipient` is filed under.
    fn user_of(&self, recipient: String) -> String {
        match &self.resolve {
            Some(resolve) => resolve(&recipient).unwrap_or(recipient),
            None => recipient,
        }
    }

    fn agent(&self) -> String {
        self.agent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn settled_user(&self, id: &NotifId) -> Option<String> {
        self.users
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)
    }
}

impl LinkOutbox for AuditedOutbox {
    fn ready(&self, after: Option<u64>, max: usize) -> Result<Vec<OutItem>, StoreError> {
        let items = self.outbox.ready(after, max)?;
        if items.is_empty() {
            return Ok(items);
        }
        let agent = self.agent();
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        let mut events = Vec::with_capacity(items.len());
        for it in &items {
            let user = Notification::decode_payload(it.id, &it.payload)
                .ok()
                .map(|n| self.user_of(n.recipient));
            if let Some(u) = &user {
                if users.len() < MAX_TRACKED {
                    users.insert(it.id, u.clone());
                }
            }
            events.push(AuditEvent::Sent {
                notice: it.id.to_string(),
                user,
                agent: agent.clone(),
            });
        }
        self.audit.record_all(events);
        Ok(items)
    }

    fn acked(&self, ids: &[NotifId]) -> Result<(), StoreError> {
        self.outbox.acked(ids)?;
        let agent = self.agent();
        let events = ids
            .iter()
            .map(|id| AuditEvent::Acked {
                notice: id.to_string(),
                user: self.settled_user(id),
                agent: agent.clone(),
            })
            .collect();
        self.audit.record_all(events);
        Ok(())
    }

    fn dead_letter(&self, id: NotifId, reason: &str) -> Result<(), StoreError> {
        self.outbox.dead_letter(id, reason)?;
        self.audit.record(AuditEvent::DeadLettered {
            notice: id.to_string(),
            user: self.settled_user(&id),
            reason: reason.to_owned(),
        });
        Ok(())
    }

    fn retry_later(&self, id: NotifId, after: Duration, reason: &str) -> Result<(), StoreError> {
        self.outbox.retry_later(id, after, reason)?;
        let user = self
            .users
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned();
        self.audit.record(AuditEvent::Deferred {
            notice: id.to_string(),
            user,
            reason: reason.to_owned(),
            retry_in_ms: u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
        });
        Ok(())
    }

    fn notifier(&self) -> Arc<Notify> {
        LinkOutbox::notifier(&self.outbox)
    }

    fn session_event(&self, event: SessionEvent<'_>) {
        let ev = match event {
            SessionEvent::Up { agent, window } => {
                *self.agent.lock().unwrap_or_else(PoisonError::into_inner) = agent.to_owned();
                AuditEvent::SessionUp {
                    agent: agent.to_owned(),
                    addr: agent.to_owned(),
                    window: u32::from(window),
                }
            }
            SessionEvent::Down {
                agent,
                reason,
                sent,
                acked,
            } => AuditEvent::SessionDown {
                agent: agent.to_owned(),
                addr: agent.to_owned(),
                reason: reason.to_string(),
                sent,
                acked,
            },
            SessionEvent::Failed { agent, reason } => AuditEvent::ConnectFailed {
                agent: agent.to_owned(),
                addr: agent.to_owned(),
                reason: reason.to_string(),
            },
        };
        self.audit.record(ev);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::audit::{AuditConfig, AuditQuery};
    use crate::notify::outbox::Settle;

    #[tokio::test]
    async fn link_events_are_filed_under_the_registered_user() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("outbox"), Default::default()).unwrap();
        let audit = AuditLog::open(&dir.path().join("audit"), AuditConfig::default()).unwrap();
        let n = Notification {
            id: NotifId::random(),
            phone: "+8613800138000".into(),
            recipient: "A.Li+news@HL.test".into(),
            subject: "s".into(),
            count: 1,
            ..Default::default()
        };
        outbox
            .settle(Settle {
                enqueue: vec![n.clone()],
                ..Default::default()
            })
            .await
            .unwrap();
        let sender = AuditedOutbox::new(outbox.clone(), audit.clone()).resolving_users(Arc::new(
            |rcpt: &str| {
                rcpt.eq_ignore_ascii_case("a.li+news@hl.test")
                    .then(|| "alice@hl.test".to_owned())
            },
        ));
        let items = sender.ready(None, 10).unwrap();
        assert_eq!(items.len(), 1);
        sender.acked(&[n.id]).unwrap();
        audit.flush().unwrap();
        let log = audit
            .query(&AuditQuery {
                user: Some("alice@hl.test".into()),
                ..Default::default()
            })
            .unwrap();
        let names: Vec<&str> = log.iter().map(|r| r.event.name()).collect();
        assert_eq!(names, ["sent", "acked"]);
        assert!(log
            .iter()
            .all(|r| r.event.notice() == Some(&*n.id.to_string())));
        // Without a resolver (or for a user removed since): the address as written.
        let n2 = Notification {
            id: NotifId::random(),
            recipient: "bob@hl.test".into(),
            ..n
        };
        outbox
            .settle(Settle {
                enqueue: vec![n2],
                ..Default::default()
            })
            .await
            .unwrap();
        let plain = AuditedOutbox::new(outbox, audit.clone());
        assert_eq!(
            plain.ready(items.last().map(|i| i.seq), 10).unwrap().len(),
            1
        );
        audit.flush().unwrap();
        let log = audit
            .query(&AuditQuery {
                user: Some("bob@hl.test".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(log.len(), 1);
    }
}
