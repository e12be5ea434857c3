//! What `billing verify` checks, without I/O: a store feeds the entries in id order, then
//! every account's stored columns, then its recorded head; the first problem found is named.
//!
//! Checks, in order:
//! 1. ids run 1, 2, 3, … (a gap is a deleted row);
//! 2. each `prev_hash` is the previous entry's `hash` and each `hash` matches the entry's
//!    contents ([`super::chain`]);
//! 3. each entry is well-formed: amount above zero, two different accounts, a `post`/`void`
//!    resolving an open pending transfer of the same accounts, a post no larger than it;
//! 4. each account's stored debits/credits, posted and pending, equal the sums of its entries,
//!    and no entry names an account that does not exist;
//! 5. the stored columns sum to zero over all accounts (debits = credits, posted and pending);
//! 6. the recorded head (last id and hash, written in each posting's transaction) is the last
//!    entry: a deleted last row is found too.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{chain, Entry, Phase};

/// The first thing wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The entry (row id) at fault, when one is.
    pub entry: Option<i64>,
    /// The account at fault, when one is ("user:alice@example.org (id 7)").
    pub account: Option<String>,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.entry, &self.account) {
            (Some(id), _) => write!(f, "entry {id}: {}", self.what),
            (None, Some(a)) => write!(f, "account {a}: {}", self.what),
            (None, None) => f.write_str(&self.what),
        }
    }
}

/// What `verify` found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub entries: u64,
    pub accounts: u64,
    /// The last entry's hash (hex): note it, and a later verify proves nothing before it
    /// changed.
    pub head: String,
    /// `None`: everything checks.
    pub problem: Option<Problem>,
}

/// Debits posted, credits posted, debits pending, credits pending.
pub type Columns = [i64; 4];

/// The checks, fed row by row.
pub struct Verifier {
    prev: [u8; 32],
    last_id: i64,
    sums: HashMap<i64, Columns>,
    /// Pending transfers not resolved yet: id → (debit, credit, amount).
    open: HashMap<i64, (i64, i64, i64)>,
    seen_accounts: u64,
    stored_total: Columns,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new()
    }
}

fn at_entry(id: i64, what: String) -> Problem {
    Problem {
        entry: Some(id),
        account: None,
        what,
    }
}

impl Verifier {
    pub fn new() -> Self {
        Self {
            prev: chain::GENESIS,
            last_id: 0,
            sums: HashMap::new(),
            open: HashMap::new(),
            seen_accounts: 0,
            stored_total: [0; 4],
        }
    }

    /// The next entry, in id order.
    pub fn entry(&mut self, e: &Entry) -> Result<(), Problem> {
        let expected = self.last_id + 1;
        if e.id != expected {
            return Err(at_entry(
                expected,
                format!(
                    "missing: entry {} follows entry {} (a deleted row?)",
                    e.id, self.last_id
                ),
            ));
        }
        if e.prev_hash != self.prev {
            return Err(at_entry(
                e.id,
                format!(
                    "prev_hash does not match entry {}'s hash (a row removed or replaced \
                     before it?)",
                    self.last_id
                ),
            ));
        }
        if chain::hash(&self.prev, e) != e.hash {
            return Err(at_entry(
                e.id,
                "hash does not match the entry's contents (edited?)".into(),
            ));
        }
        self.apply(e).map_err(|what| at_entry(e.id, what))?;
        self.prev = e.hash;
        self.last_id = e.id;
        Ok(())
    }

    fn apply(&mut self, e: &Entry) -> Result<(), String> {
        let amount = e.amount.minor();
        if amount <= 0 {
            return Err(format!("amount {} is not above zero", e.amount));
        }
        if e.debit == e.credit {
            return Err(format!("debits and credits the same account {}", e.debit));
        }
        let (posted, pending_delta) = match e.phase {
            Phase::Posted => (amount, 0),
            Phase::Pending => {
                self.open.insert(e.id, (e.debit, e.credit, amount));
                (0, amount)
            }
            Phase::Post | Phase::Void => {
                let pid = e
                    .pending_id
                    .ok_or_else(|| format!("a {} without a pending entry", e.phase))?;
                let (d, c, reserved) = self.open.remove(&pid).ok_or_else(|| {
                    format!("resolves entry {pid}, which is not an open pending transfer")
                })?;
                if (d, c) != (e.debit, e.credit) {
                    return Err(format!("accounts differ from pending entry {pid}'s"));
                }
                if e.phase == Phase::Post && amount > reserved {
                    return Err(format!("posts more than pending entry {pid} reserved"));
                }
                if e.phase == Phase::Void && amount != reserved {
                    return Err(format!("voids another amount than entry {pid} reserved"));
                }
                let posted = if e.phase == Phase::Post { amount } else { 0 };
                (posted, -reserved)
            }
        };
        let overflow = || "a balance overflows".to_owned();
        for (id, side) in [(e.debit, 0), (e.credit, 1)] {
            let c = self.sums.entry(id).or_insert([0; 4]);
            c[side] = c[side].checked_add(posted).ok_or_else(overflow)?;
            c[side + 2] = c[side + 2]
                .checked_add(pending_delta)
                .ok_or_else(overflow)?;
        }
        Ok(())
    }

    /// After the entries: the recorded head (`None`: an empty ledger) must be the last one.
    pub fn head(&self, head: Option<(i64, [u8; 32])>) -> Result<(), Problem> {
        let found = (self.last_id, self.prev);
        match head {
            None if self.last_id == 0 => {}
            Some(h) if h == found => {}
            Some((id, _)) => {
                return Err(at_entry(
                    id.max(self.last_id),
                    format!(
                        "the recorded head is entry {id}, the last entry is {} (rows \
                         deleted at the end, or the head edited)",
                        self.last_id
                    ),
                ))
            }
            None => {
                return Err(at_entry(
                    self.last_id,
                    "entries exist but no head was recorded".into(),
                ))
            }
        }
        Ok(())
    }

    /// One account's stored columns (`name` for the report), after all entries.
    pub fn account(&mut self, id: i64, name: &str, stored: Columns) -> Result<(), Problem> {
        self.seen_accounts += 1;
        let computed = self.sums.remove(&id).unwrap_or([0; 4]);
        let who = || Some(format!("{name} (id {id})"));
        if stored != computed {
            return Err(Problem {
                entry: None,
                account: who(),
                what: format!(
                    "stored debits/credits posted {}/{} pending {}/{}, entries sum to \
                     {}/{} pending {}/{}",
                    stored[0],
                    stored[1],
                    stored[2],
                    stored[3],
                    computed[0],
                    computed[1],
                    computed[2],
                    computed[3]
                ),
            });
        }
        for (t, s) in self.stored_total.iter_mut().zip(stored) {
            *t = t.checked_add(s).ok_or_else(|| Problem {
                entry: None,
                account: who(),
                what: "the column totals overflow".into(),
            })?;
        }
        Ok(())
    }

    /// The end: the totals.
    pub fn finish(self) -> Result<VerifyReport, Problem> {
        if let Some(id) = self.sums.keys().min() {
            let entry = self.sums.len();
            return Err(Problem {
                entry: None,
                account: Some(format!("id {id}")),
                what: format!("named by entries but missing from the accounts ({entry} such)"),
            });
        }
        let [dp, cp, dq, cq] = self.stored_total;
        if dp != cp || dq != cq {
            return Err(Problem {
                entry: None,
                account: None,
                what: format!(
                    "balances do not sum to zero: debits {dp} credits {cp} posted, \
                     {dq}/{cq} pending"
                ),
            });
        }
        Ok(VerifyReport {
            entries: u64::try_from(self.last_id).unwrap_or(0),
            accounts: self.seen_accounts,
            head: hex::encode(self.prev),
            problem: None,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::billing::ledger::Kind;
    use crate::billing::money::Money;

    /// A chain of well-hashed entries from (phase, debit, credit, amount, pending_id).
    fn chain_of(rows: &[(Phase, i64, i64, i64, Option<i64>)]) -> Vec<Entry> {
        let mut prev = chain::GENESIS;
        let mut out = Vec::new();
        for (i, &(phase, debit, credit, amount, pending_id)) in rows.iter().enumerate() {
            let mut e = Entry {
                id: i as i64 + 1,
                key: format!("k{i}"),
                kind: Kind::Charge,
                phase,
                debit,
                credit,
                amount: Money::from_minor(amount),
                pending_id,
                at_ms: 0,
                memo: String::new(),
                prev_hash: prev,
                hash: [0; 32],
            };
            e.hash = chain::hash(&prev, &e);
            prev = e.hash;
            out.push(e);
        }
        out
    }

    fn first_problem(rows: &[(Phase, i64, i64, i64, Option<i64>)]) -> Option<Problem> {
        let mut v = Verifier::new();
        chain_of(rows).iter().find_map(|e| v.entry(e).err())
    }

    #[test]
    fn malformed_resolutions_are_named_even_when_well_hashed() {
        use Phase::*;
        let p = first_problem(&[(Pending, 1, 2, 5, None), (Post, 1, 2, 6, Some(1))]).unwrap();
        assert_eq!(p.entry, Some(2));
        assert!(p.what.contains("posts more"), "{p}");
        let p = first_problem(&[(Pending, 1, 2, 5, None), (Void, 1, 2, 4, Some(1))]).unwrap();
        assert!(p.what.contains("voids another amount"), "{p}");
        let p = first_problem(&[(Pending, 1, 2, 5, None), (Post, 2, 1, 5, Some(1))]).unwrap();
        assert!(p.what.contains("accounts differ"), "{p}");
        let p = first_problem(&[
            (Pending, 1, 2, 5, None),
            (Void, 1, 2, 5, Some(1)),
            (Post, 1, 2, 5, Some(1)),
        ])
        .unwrap();
        assert_eq!(p.entry, Some(3));
        assert!(p.what.contains("not an open pending"), "{p}");
        let p = first_problem(&[(Posted, 1, 1, 5, None)]).unwrap();
        assert!(p.what.contains("same account"), "{p}");
        let p = first_problem(&[(Posted, 1, 2, 0, None)]).unwrap();
        assert!(p.what.contains("not above zero"), "{p}");
        let p = first_problem(&[(Post, 1, 2, 5, None)]).unwrap();
        assert!(p.what.contains("without a pending entry"), "{p}");
    }

    #[test]
    fn sums_heads_and_missing_accounts() {
        use Phase::*;
        let rows = chain_of(&[(Posted, 1, 2, 5, None), (Pending, 2, 1, 3, None)]);
        let mut v = Verifier::new();
        for e in &rows {
            v.entry(e).unwrap();
        }
        v.head(Some((2, rows[1].hash))).unwrap();
        assert!(v.head(Some((3, rows[1].hash))).is_err());
        assert!(v.head(None).is_err());
        v.account(1, "cash", [5, 0, 0, 3]).unwrap();
        let p = v.account(2, "user:a", [0, 5, 3, 1]).unwrap_err();
        assert_eq!(p.account.as_deref(), Some("user:a (id 2)"));
        // An account the entries name but the table lacks.
        let mut v = Verifier::new();
        v.entry(&rows[0]).unwrap();
        v.account(1, "cash", [5, 0, 0, 0]).unwrap();
        assert!(v
            .finish()
            .unwrap_err()
            .what
            .contains("missing from the accounts"));
        // All well: the report.
        let mut v = Verifier::new();
        v.entry(&rows[0]).unwrap();
        v.account(1, "cash", [5, 0, 0, 0]).unwrap();
        v.account(2, "user:a", [0, 5, 0, 0]).unwrap();
        let r = v.finish().unwrap();
        assert_eq!((r.entries, r.accounts), (1, 2));
        assert_eq!(r.head, hex::encode(rows[0].hash));
    }
}
