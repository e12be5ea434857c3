//! What one proxy session retrieved, and how it reaches the meter store ([`crate::meter`]).
//!
//! The shell ([`super::server`]) counts into a [`Meter`] as it relays and hands it to
//! [`Meter::store`] once: when the backend starts answering QUIT/LOGOUT with `sync =
//! "per-session"` (the record is durable before the client gets that reply), else when the
//! session ends. A long session's messages go ahead in [`Messages`] records of
//! [`MESSAGES_PER_RECORD`], so no record grows without bound; they precede the session's own
//! record in the store.

use std::net::SocketAddr;

use tracing::{error, warn};

use super::{imap, pop3};
use crate::meter::{
    self, Entry, Login, Message, Messages, MeterError, MeterStore, Protocol, Session, Sync,
};

/// Messages kept in memory per session before they are stored ahead of the session record.
pub const MESSAGES_PER_RECORD: usize = 1000;

/// What one session did.
#[derive(Debug)]
pub(super) struct Meter {
    pub(super) session: String,
    pub(super) account: Option<String>,
    pub(super) client: SocketAddr,
    pub(super) listener: &'static str,
    pub(super) protocol: Protocol,
    pub(super) start_ms: i64,
    pub(super) login: Login,
    pub(super) logged_in: bool,
    pub(super) tls: bool,
    /// Bytes from the backend relayed to the client (and the proxy's own replies), and the
    /// client's bytes to the backend.
    pub(super) to_client: u64,
    pub(super) to_backend: u64,
    /// RETR/TOP replies (POP3) or FETCH responses (IMAP) with message bytes, and their bytes.
    pub(super) retrieved: u64,
    pub(super) retrieved_bytes: u64,
    /// Messages not stored yet.
    pending: Vec<Message>,
    /// The backend is answering QUIT/LOGOUT.
    pub(super) ending: bool,
    /// The session's record has gone to the store (at QUIT/LOGOUT, with per-session sync).
    pub(super) stored: bool,
}

impl Meter {
    pub(super) fn new(client: SocketAddr, listener: &'static str, imap: bool) -> Self {
        Self {
            session: meter::new_session_id(),
            account: None,
            client,
            listener,
            protocol: if imap { Protocol::Imap } else { Protocol::Pop3 },
            start_ms: chrono::Utc::now().timestamp_millis(),
            login: Login::None,
            logged_in: false,
            tls: false,
            to_client: 0,
            to_backend: 0,
            retrieved: 0,
            retrieved_bytes: 0,
            pending: Vec::new(),
            ending: false,
            stored: false,
        }
    }

    /// Adds one retrieval (a RETR/TOP reply, a FETCH response's sections); once
    /// [`MESSAGES_PER_RECORD`] wait, they go to the store ahead of the session.
    pub(super) fn retrieved(&mut self, store: &MeterStore, messages: Vec<Message>) {
        self.retrieved += 1;
        self.retrieved_bytes += messages.iter().map(|m| m.bytes).sum::<u64>();
        self.pending.extend(messages);
        if self.pending.len() >= MESSAGES_PER_RECORD {
            let entry = Entry::Messages(Messages {
                session: self.session.clone(),
                account: self.account.clone(),
                retrieved: std::mem::take(&mut self.pending),
            });
            if let Err(e) = store.append(vec![entry.clone()]) {
                lost(&e, &entry);
            }
        }
    }

    fn entry(&mut self, end: &str) -> Entry {
        Entry::Session(Session {
            session: self.session.clone(),
            account: self.account.clone(),
            client: self.client,
            protocol: self.protocol,
            listener: self.listener.to_owned(),
            tls: self.tls,
            start_ms: self.start_ms,
            end_ms: chrono::Utc::now().timestamp_millis(),
            login: self.login,
            bytes_to_client: self.to_client,
            bytes_to_backend: self.to_backend,
            messages: self.retrieved,
            message_bytes: self.retrieved_bytes,
            end: end.to_owned(),
            retrieved: std::mem::take(&mut self.pending),
        })
    }

    /// Stores the session's record (once): with per-session sync it is durable on return.
    /// A store that cannot take it now keeps it and retries; one that refuses it outright
    /// (backlog full, closed) gets it logged in full at error level, never dropped unseen.
    pub(super) async fn store(&mut self, store: &MeterStore, end: &str) {
        if self.stored {
            return;
        }
        self.stored = true;
        let entry = self.entry(end);
        let r = match store.config().sync {
            Sync::PerSession => store.append_durable(vec![entry.clone()]).await,
            Sync::Interval => store.append(vec![entry.clone()]),
        };
        match r {
            Ok(()) => {}
            Err(MeterError::Unwritable(cause)) => {
                warn!(error = %cause, session = %self.session, "session record not durable yet; the store keeps it and retries");
            }
            Err(e) => lost(&e, &entry),
        }
    }
}

/// A record the store refused: logged whole so an operator can replay it.
fn lost(e: &MeterError, entry: &Entry) {
    error!(
        error = %e,
        record = %serde_json::to_string(entry).unwrap_or_default(),
        "meter record refused by the store"
    );
}

/// A POP3 RETR/TOP reply as a meter message.
pub(super) fn pop3_message(r: pop3::Retrieval) -> Vec<Message> {
    vec![Message {
        msg: r.msg,
        uidl: r.uid,
        top_lines: r.top_lines,
        bytes: r.bytes,
        complete: r.complete,
        ..Message::default()
    }]
}

/// An IMAP FETCH response as meter messages, one per section.
pub(super) fn imap_messages(f: imap::Fetch) -> Vec<Message> {
    f.sections
        .into_iter()
        .map(|s| Message {
            msg: f.seq,
            mailbox: f.mailbox.clone(),
            uid: f.uid,
            section: Some(s.section),
            bytes: s.bytes,
            complete: f.complete,
            ..Message::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::meter::{MeterConfig, MeterQuery};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_session_stores_its_messages_ahead_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = MeterStore::open(dir.path(), MeterConfig::default()).unwrap();
        let mut m = Meter::new("192.0.2.7:4000".parse().unwrap(), "imaps", true);
        m.account = Some("dave".into());
        m.login = Login::Ok;
        for n in 0..2_500u32 {
            let fetch = imap::Fetch {
                mailbox: Some("INBOX".into()),
                seq: n + 1,
                uid: Some(n + 100),
                sections: vec![imap::SectionBytes {
                    section: "BODY[]".into(),
                    bytes: 10,
                }],
                complete: true,
            };
            m.retrieved(&store, imap_messages(fetch));
        }
        m.store(&store, "logout").await;
        // Stored once only.
        m.store(&store, "backend closed the connection").await;
        let s2 = store.clone();
        let page = tokio::task::spawn_blocking(move || {
            s2.flush().unwrap();
            s2.query(&MeterQuery {
                limit: 100,
                ..MeterQuery::default()
            })
            .unwrap()
        })
        .await
        .unwrap();
        let shapes: Vec<(u64, &str, usize)> = page
            .records
            .iter()
            .map(|r| match &r.entry {
                Entry::Messages(b) => (r.id, "messages", b.retrieved.len()),
                Entry::Session(s) => (r.id, "session", s.retrieved.len()),
            })
            .collect();
        assert_eq!(
            shapes,
            [
                (1, "messages", 1000),
                (2, "messages", 1000),
                (3, "session", 500)
            ]
        );
        let Entry::Session(s) = &page.records[2].entry else {
            unreachable!()
        };
        assert_eq!((s.messages, s.message_bytes), (2_500, 25_000));
        assert_eq!(s.protocol, Protocol::Imap);
        assert_eq!(s.end, "logout");
        assert_eq!(s.retrieved[0].uid, Some(2_100));
        let Entry::Messages(b) = &page.records[0].entry else {
            unreachable!()
        };
        assert_eq!(b.session, s.session);
        assert_eq!(b.account.as_deref(), Some("dave"));
    }
}
