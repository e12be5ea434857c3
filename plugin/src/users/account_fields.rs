//! The ledger's account fields in the registry's import and export files: `staff_no`,
//! `real_name`, `class` and `note` (the seed's user table; docs/billing.md, "Accounts").
//! They are not the registry's (the ledger of record keeps them), but one file carries both,
//! so an operator imports a user list once:
//!
//! ```text
//! address,phone,state,staff_no,real_name,class,note
//! alice@example.com,+8613800138000,normal,2026011234,张三,student,研究生
//! ```
//!
//! - As with the registry's columns, an empty cell (or a column the file lacks) keeps the
//!   account's value and `-` clears it (`class`: back to `billing.default_class`).
//! - A line with any of the four creates the user's ledger account if there is none, or
//!   updates it; a line with only `state` updates an existing account's status (the registry's
//!   state and the ledger's status stay together) and creates none.
//! - The ledger is written after the registry, in one transaction for the whole file, and
//!   only for lines the registry took (not failed, not skipped in add mode).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{AccountState, UserError, CSV_CLEAR};
use crate::billing::ledger::{
    LedgerError, LedgerStore, Status, UserAccount, MAX_KEY_LEN, MAX_TEXT_LEN,
};

/// The ledger's columns, after the registry's in an export.
pub const LEDGER_COLUMNS: [&str; 4] = ["staff_no", "real_name", "class", "note"];

/// A line's ledger fields: `None` keeps the account's value, `Some("")` clears it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staff_no: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub real_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl AccountFields {
    pub fn is_empty(&self) -> bool {
        *self == AccountFields::default()
    }

    /// An account's fields as an export writes them (every one present).
    pub fn of(a: &UserAccount) -> AccountFields {
        AccountFields {
            staff_no: Some(a.staff_no.clone()),
            real_name: Some(a.real_name.clone()),
            class: Some(a.class.clone()),
            note: Some(a.note.clone()),
        }
    }

    /// From CSV cells (`LEDGER_COLUMNS` order; `None`: the file lacks the column): empty
    /// keeps, [`CSV_CLEAR`] clears. The error names the column.
    pub fn from_cells(cells: [Option<&str>; 4]) -> Result<AccountFields, UserError> {
        let [staff_no, real_name, class, note] = cells.map(|c| match c {
            None | Some("") => None,
            Some(CSV_CLEAR) => Some(String::new()),
            Some(s) => Some(s.to_owned()),
        });
        AccountFields {
            staff_no,
            real_name,
            class,
            note,
        }
        .checked()
    }

    /// Checks sizes and characters; the error names the column.
    pub fn checked(self) -> Result<AccountFields, UserError> {
        let check = |field: &'static str, v: &Option<String>, max: usize| {
            let Some(v) = v else { return Ok(()) };
            if v.len() > max {
                return Err(UserError::InvalidField {
                    field,
                    input: v.chars().take(40).collect(),
                    reason: if max == MAX_KEY_LEN {
                        "longer than 200 bytes"
                    } else {
                        "longer than 500 bytes"
                    },
                });
            }
            if v.chars().any(char::is_control) {
                return Err(UserError::InvalidField {
                    field,
                    input: v.clone(),
                    reason: "contains a control character",
                });
            }
            Ok(())
        };
        check("staff_no", &self.staff_no, MAX_TEXT_LEN)?;
        check("real_name", &self.real_name, MAX_TEXT_LEN)?;
        check("note", &self.note, MAX_TEXT_LEN)?;
        check("class", &self.class, MAX_KEY_LEN)?;
        if let Some(c) = &self.class {
            if c.chars().any(char::is_whitespace) {
                return Err(UserError::InvalidField {
                    field: "class",
                    input: c.clone(),
                    reason: "a tariff class is one word (no spaces)",
                });
            }
        }
        Ok(self)
    }

    /// The export cells: every field of an account ([`CSV_CLEAR`] for an empty one), or
    /// empty cells for a user with no ledger account (importing them changes nothing).
    pub fn cells(fields: Option<&AccountFields>) -> [String; 4] {
        let cell = |v: &Option<String>| match v.as_deref() {
            None => String::new(),
            Some("") => CSV_CLEAR.to_owned(),
            Some(s) => s.to_owned(),
        };
        match fields {
            None => Default::default(),
            Some(f) => [
                cell(&f.staff_no),
                cell(&f.real_name),
                cell(&f.class),
                cell(&f.note),
            ],
        }
    }
}

/// What an imported line asks of the user's ledger account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountChange {
    pub line: u64,
    /// The registry address (the ledger's login).
    pub login: String,
    pub fields: AccountFields,
    /// The line's `state` cell, if it had one.
    pub state: Option<AccountState>,
}

fn status(s: AccountState) -> Status {
    match s {
        AccountState::Normal => Status::Normal,
        AccountState::Arrears => Status::Arrears,
        AccountState::Unwelcome => Status::Unwelcome,
    }
}

/// Accounts per page when every one is read.
pub const ACCOUNT_PAGE: usize = 1_000;

/// Every user account's fields, by login (for an export).
pub fn accounts_of(store: &dyn LedgerStore) -> Result<HashMap<String, AccountFields>, LedgerError> {
    let mut out = HashMap::new();
    let mut after = String::new();
    loop {
        let page = store.user_accounts(&after, ACCOUNT_PAGE)?;
        let Some(last) = page.last() else {
            return Ok(out);
        };
        last.login.clone_into(&mut after);
        out.extend(page.iter().map(|a| (a.login.clone(), AccountFields::of(a))));
    }
}

/// [`accounts_of`] on the ledger's own read connection.
pub async fn ledger_accounts(
    ledger: &crate::billing::Ledger,
) -> Result<HashMap<String, AccountFields>, LedgerError> {
    ledger.read(|s| accounts_of(s)).await
}

/// Writes the changes to the ledger in one transaction; returns how many accounts were
/// created or changed.
pub fn apply(
    store: &mut dyn LedgerStore,
    changes: &[AccountChange],
    default_class: &str,
) -> Result<u64, LedgerError> {
    let mut out: HashMap<&str, UserAccount> = HashMap::new();
    let mut order = Vec::new();
    for c in changes {
        let existing = store.user(&c.login)?;
        if existing.is_none() && c.fields.is_empty() {
            continue;
        }
        let mut a = existing.clone().unwrap_or_else(|| UserAccount {
            login: c.login.clone(),
            class: default_class.to_owned(),
            ..UserAccount::default()
        });
        let f = &c.fields;
        for (to, from) in [
            (&mut a.staff_no, &f.staff_no),
            (&mut a.real_name, &f.real_name),
            (&mut a.note, &f.note),
        ] {
            if let Some(v) = from {
                v.clone_into(to);
            }
        }
        match f.class.as_deref() {
            Some("") => default_class.clone_into(&mut a.class),
            Some(c) => c.clone_into(&mut a.class),
            None => {}
        }
        if let Some(s) = c.state {
            a.status = status(s);
        }
        if existing.as_ref() != Some(&a) {
            order.push(c.login.as_str());
            out.insert(c.login.as_str(), a);
        }
    }
    let accounts: Vec<UserAccount> = order.iter().filter_map(|l| out.remove(l)).collect();
    if !accounts.is_empty() {
        store.put_users(&accounts)?;
    }
    Ok(accounts.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::ledger::sqlite::SqliteLedger;

    fn change(login: &str, fields: AccountFields, state: Option<AccountState>) -> AccountChange {
        AccountChange {
            line: 2,
            login: login.into(),
            fields,
            state,
        }
    }

    #[test]
    fn apply_creates_with_fields_follows_state_and_pages_every_account() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = SqliteLedger::open(&dir.path().join("ledger.sqlite")).unwrap();
        let named = AccountFields {
            real_name: Some("张三".into()),
            ..AccountFields::default()
        };
        let n = apply(
            &mut l,
            &[
                change("a@x", named.clone(), Some(AccountState::Arrears)),
                change("b@x", AccountFields::default(), Some(AccountState::Arrears)),
            ],
            "student",
        )
        .unwrap();
        assert_eq!(n, 1);
        let a = l.user("a@x").unwrap().unwrap();
        assert_eq!((a.class.as_str(), a.status), ("student", Status::Arrears));
        assert_eq!(a.real_name, "张三");
        assert_eq!(l.user("b@x").unwrap(), None);
        // The same again changes nothing; a state alone moves an existing account; "-"
        // (Some("")) puts the class back to the default and clears a field.
        assert_eq!(
            apply(&mut l, &[change("a@x", named, None)], "student").unwrap(),
            0
        );
        let back = AccountFields {
            class: Some(String::new()),
            real_name: Some(String::new()),
            ..AccountFields::default()
        };
        l.put_user(&UserAccount {
            class: "staff".into(),
            ..a
        })
        .unwrap();
        assert_eq!(
            apply(
                &mut l,
                &[change("a@x", back, Some(AccountState::Normal))],
                "student"
            )
            .unwrap(),
            1
        );
        let a = l.user("a@x").unwrap().unwrap();
        assert_eq!((a.class.as_str(), a.status), ("student", Status::Normal));
        assert_eq!(a.real_name, "");

        let many: Vec<UserAccount> = (0..ACCOUNT_PAGE + 5)
            .map(|i| UserAccount {
                login: format!("u{i:05}@x"),
                class: "c".into(),
                ..UserAccount::default()
            })
            .collect();
        l.put_users(&many).unwrap();
        let all = accounts_of(&l).unwrap();
        assert_eq!(all.len(), ACCOUNT_PAGE + 6);
        assert_eq!(all["a@x"].class.as_deref(), Some("student"));
    }

    #[test]
    fn cells_keep_clear_and_refuse_naming_the_column() {
        let f = AccountFields::from_cells([Some("2026"), Some(""), Some("-"), None]).unwrap();
        assert_eq!(f.staff_no.as_deref(), Some("2026"));
        assert_eq!(f.real_name, None);
        assert_eq!(f.class.as_deref(), Some(""));
        assert_eq!(f.note, None);
        let e = AccountFields::from_cells([None, None, Some("post grad"), None])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("invalid class \"post grad\""), "{e}");
        let long = "x".repeat(501);
        let e = AccountFields::from_cells([None, None, None, Some(&long)])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid note") && e.contains("500 bytes"),
            "{e}"
        );
        let e = AccountFields::from_cells([Some("a\u{1}"), None, None, None])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("invalid staff_no"), "{e}");
        assert_eq!(
            AccountFields::cells(Some(&AccountFields::of(&UserAccount {
                login: "a@x".into(),
                class: "c".into(),
                ..UserAccount::default()
            }))),
            ["-", "-", "c", "-"]
        );
        assert_eq!(AccountFields::cells(None), ["", "", "", ""]);
    }
}
