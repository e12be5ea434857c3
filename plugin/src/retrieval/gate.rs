//! Account gating at the retrieval proxy: what a session may do given its account's
//! [`AccountState`] and allowed [`Networks`](crate::users::Networks) in the user registry.
//!
//! ```text
//! account named (USER, LOGIN, first SASL response)   -- before the password is forwarded
//!   unwelcome                  -> refused: unwelcome_text       (backend never asked)
//!   client outside networks    -> refused: network_text         (logged with the address)
//!   arrears                    -> forwarded; commands pipelined after the login are held
//!   normal, or not registered  -> forwarded (an unknown account passes, metered by name)
//! backend accepted the login  -- checked again (the registry may have changed meanwhile)
//!   arrears                    -> POP3: the notice maildrop; IMAP: NO [ALERT] arrears_text
//! registry changed (UserStore::changes) while the session lives
//!   verdict differs from the one the session was admitted with -> closed at the next
//!   command boundary: where the backend is not in the middle of a reply (at once when
//!   idle, IMAP IDLE included; else right after the reply being relayed)
//! ```
//!
//! The decisions are plain functions of the registry entry and the client address
//! ([`verdict`]); [`Gate`] keeps one session's side of it (the account, the verdict it was
//! admitted with, the commands held behind an arrears login) and has no I/O but the change
//! signal it waits on.

use std::net::IpAddr;

use tokio::sync::watch;

use crate::config::GateTexts;
use crate::users::{AccountState, User, UserStore};

/// What the registry says about an account logging in from an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Normal, or not registered.
    Pass,
    /// Logs in, sees only the payment notice.
    Arrears,
    /// Refused: the account is unwelcome.
    Unwelcome,
    /// Refused: the client address is outside the account's networks.
    Network,
}

/// The verdict for `user` (`None`: not in the registry) at client address `client`. An
/// unwelcome account is refused wherever it comes from; arrears applies only to an allowed
/// address.
pub fn verdict(user: Option<&User>, client: IpAddr) -> Verdict {
    let Some(user) = user else {
        return Verdict::Pass;
    };
    if user.state == AccountState::Unwelcome {
        Verdict::Unwelcome
    } else if !user.networks.allows(client) {
        Verdict::Network
    } else if user.state == AccountState::Arrears {
        Verdict::Arrears
    } else {
        Verdict::Pass
    }
}

/// Most bytes of client commands held behind an arrears login before the session ends.
pub const MAX_HELD: usize = 64 * 1024;

/// Text that closes a live session whose account changed back to normal (it must log in again
/// to see its real mailbox).
pub const RELOGIN_TEXT: &str = "The account's status changed; please log in again.";

/// One session's gate.
#[derive(Debug)]
pub struct Gate {
    users: UserStore,
    changes: watch::Receiver<u64>,
    client: IpAddr,
    account: Option<String>,
    /// The verdict the session was admitted with (Pass or Arrears).
    admitted: Verdict,
    /// A login command (PASS, APOP, AUTH, LOGIN, AUTHENTICATE) was forwarded and not answered.
    login_sent: bool,
    /// Client bytes held while an arrears login awaits the backend's answer.
    held: Option<Vec<u8>>,
    /// The session must end at the next command boundary, with this text.
    closing: Option<String>,
}

/// Whether a command keyword finishes a login (the backend's answer to it decides).
pub fn is_login_verb(verb: &str) -> bool {
    matches!(verb, "PASS" | "APOP" | "AUTH" | "LOGIN" | "AUTHENTICATE")
}

impl Gate {
    pub fn new(users: UserStore, client: IpAddr) -> Gate {
        let mut changes = users.changes();
        changes.mark_unchanged();
        Gate {
            users,
            changes,
            client,
            account: None,
            admitted: Verdict::Pass,
            login_sent: false,
            held: None,
            closing: None,
        }
    }

    fn look(&self, account: &str) -> Verdict {
        verdict(self.users.lookup(account).as_deref(), self.client)
    }

    /// The client named `account` (before its password goes on). `Err(verdict)` refuses it.
    pub fn named(&mut self, account: &str) -> Result<(), Verdict> {
        let v = self.look(account);
        self.account = Some(account.to_owned());
        match v {
            Verdict::Unwelcome | Verdict::Network => Err(v),
            _ => {
                self.admitted = v;
                Ok(())
            }
        }
    }

    /// A client command starts (`verb` upper case). Before login, after a login command went
    /// to the backend for an account in arrears, what follows is held until the answer.
    pub fn command(&mut self, verb: &str, logged_in: bool) {
        if logged_in {
            return;
        }
        if self.login_sent && self.admitted == Verdict::Arrears && self.held.is_none() {
            self.held = Some(Vec::new());
        }
        if is_login_verb(verb) {
            self.login_sent = true;
        }
    }

    /// Client bytes for the backend: `None` to send them now, `Some(Err)` when the held bytes
    /// passed [`MAX_HELD`], `Some(Ok)` when they were held.
    pub fn hold(&mut self, bytes: &[u8]) -> Option<Result<(), ()>> {
        let held = self.held.as_mut()?;
        if held.len() + bytes.len() > MAX_HELD {
            return Some(Err(()));
        }
        held.extend_from_slice(bytes);
        Some(Ok(()))
    }

    /// The backend refused the login: what was held goes on to it now (the account stays
    /// named; the next one named is judged afresh).
    pub fn login_failed(&mut self) -> Vec<u8> {
        self.login_sent = false;
        self.held.take().unwrap_or_default()
    }

    /// The backend accepted the login of `account` (`None`: the one named before, or none).
    /// Returns the verdict now (the registry may have changed since the account was named)
    /// and the client bytes held behind the login.
    pub fn logged_in(&mut self, account: Option<&str>) -> (Verdict, Vec<u8>) {
        if let Some(a) = account {
            self.account = Some(a.to_owned());
        }
        self.login_sent = false;
        let v = match &self.account {
            Some(a) => self.look(a),
            None => Verdict::Pass,
        };
        self.admitted = v;
        (v, self.held.take().unwrap_or_default())
    }

    /// Resolves when the registry changed; then call [`Gate::recheck`]. Pends forever once the
    /// store is gone.
    pub async fn changed(&mut self) {
        if self.changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// After a registry change: `Some(text)` when the session must end (its verdict is no
    /// longer the one it was admitted with). Sessions without a named account never end so.
    pub fn recheck(&mut self, texts: &GateTexts) -> Option<String> {
        let account = self.account.as_deref()?;
        let now = self.look(account);
        if now == self.admitted {
            return None;
        }
        let text = match now {
            Verdict::Unwelcome => texts.unwelcome.clone(),
            Verdict::Network => texts.network.clone(),
            Verdict::Arrears => texts.arrears.clone(),
            Verdict::Pass => RELOGIN_TEXT.to_owned(),
        };
        self.closing = Some(text.clone());
        Some(text)
    }

    /// The text a session due to close ends with, at its next command boundary.
    pub fn closing(&self) -> Option<&str> {
        self.closing.as_deref()
    }

    pub fn account(&self) -> Option<&str> {
        self.account.as_deref()
    }

    pub fn client(&self) -> IpAddr {
        self.client
    }
}

/// The operator's text for a refusal verdict.
pub fn refusal_text(v: Verdict, texts: &GateTexts) -> &str {
    match v {
        Verdict::Network => &texts.network,
        Verdict::Arrears => &texts.arrears,
        _ => &texts.unwelcome,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::Networks;

    fn texts() -> GateTexts {
        GateTexts {
            unwelcome: "go away".into(),
            network: "not from there".into(),
            arrears: "pay up".into(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn user(state: AccountState, nets: &str) -> User {
        User {
            state,
            networks: Networks::parse(nets).unwrap(),
            notify: false,
            ..User::new("a@example.com")
        }
    }

    #[test]
    fn verdicts() {
        let home = ip("10.1.1.1");
        let away = ip("2001:db8::1");
        assert_eq!(verdict(None, home), Verdict::Pass);
        let n = |s, nets| verdict(Some(&user(s, nets)), home);
        assert_eq!(n(AccountState::Normal, ""), Verdict::Pass);
        assert_eq!(n(AccountState::Normal, "10.0.0.0/8"), Verdict::Pass);
        assert_eq!(n(AccountState::Normal, "192.0.2.0/24"), Verdict::Network);
        assert_eq!(n(AccountState::Arrears, "10.0.0.0/8"), Verdict::Arrears);
        assert_eq!(n(AccountState::Arrears, "192.0.2.0/24"), Verdict::Network);
        assert_eq!(n(AccountState::Unwelcome, "10.0.0.0/8"), Verdict::Unwelcome);
        assert_eq!(
            verdict(Some(&user(AccountState::Unwelcome, "10.0.0.0/8")), away),
            Verdict::Unwelcome
        );
    }

    #[tokio::test]
    async fn a_session_follows_registry_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = UserStore::open(&dir.path().join("u")).unwrap();
        store.upsert(user(AccountState::Normal, "")).unwrap();
        let mut g = Gate::new(store.clone(), ip("10.1.1.1"));
        assert_eq!(g.recheck(&texts()), None, "no account yet");
        assert_eq!(g.named("A@example.com"), Ok(()));
        assert_eq!(g.logged_in(None).0, Verdict::Pass);
        store
            .update(
                "a@example.com",
                &crate::users::UserPatch {
                    networks: Some(Networks::parse("192.0.2.0/24").unwrap()),
                    ..Default::default()
                },
            )
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), g.changed())
            .await
            .unwrap();
        assert_eq!(g.recheck(&texts()).as_deref(), Some("not from there"));
        assert_eq!(g.closing(), Some("not from there"));
    }

    #[test]
    fn commands_after_an_arrears_login_are_held_until_its_answer() {
        let dir = tempfile::tempdir().unwrap();
        let store = UserStore::open(&dir.path().join("u")).unwrap();
        store.upsert(user(AccountState::Arrears, "")).unwrap();
        let mut g = Gate::new(store, ip("10.1.1.1"));
        g.command("USER", false);
        assert_eq!(g.named("a@example.com"), Ok(()));
        assert_eq!(g.hold(b"USER a@example.com\r\n"), None);
        g.command("PASS", false);
        assert_eq!(g.hold(b"PASS x\r\n"), None, "the login itself goes on");
        g.command("RETR", false);
        assert_eq!(g.hold(b"RETR 1\r\n"), Some(Ok(())));
        g.command("DELE", false);
        assert_eq!(g.hold(b"DELE 1\r\n"), Some(Ok(())));
        assert_eq!(g.hold(&vec![b'x'; MAX_HELD]), Some(Err(())));
        // A failed login releases them to the backend; a good one hands them over.
        assert_eq!(g.login_failed(), b"RETR 1\r\nDELE 1\r\n");
        g.command("PASS", false);
        g.command("STAT", false);
        assert_eq!(g.hold(b"STAT\r\n"), Some(Ok(())));
        assert_eq!(g.logged_in(None), (Verdict::Arrears, b"STAT\r\n".to_vec()));
    }
}
