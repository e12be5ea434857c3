//! The hash chain over the ledger's entries: `hash = SHA-256(prev_hash || canonical(entry))`,
//! the first entry's `prev_hash` all zeros.
//!
//! ```text
//! canonical(entry), integers big-endian, texts as u32 length + UTF-8 bytes:
//!   b"mailbell-ledger-v1"  id:i64  key:text  kind:text  phase:text  debit:i64  credit:i64
//!   amount:i64  pending_id:i64 (0 for none)  at_ms:i64  memo:text
//! ```
//!
//! The hash covers every column but itself and `prev_hash` (which the chain covers), so an
//! edited field, a deleted or re-ordered row and an inserted row each break it.

use ring::digest::{Context, SHA256};

use super::Entry;

/// The `prev_hash` of the first entry.
pub const GENESIS: [u8; 32] = [0; 32];

const DOMAIN: &[u8] = b"mailbell-ledger-v1";

/// The bytes an entry's hash covers (see the module doc).
pub fn canonical(e: &Entry) -> Vec<u8> {
    let mut b = Vec::with_capacity(96 + e.key.len() + e.memo.len());
    b.extend_from_slice(DOMAIN);
    b.extend_from_slice(&e.id.to_be_bytes());
    text(&mut b, &e.key);
    text(&mut b, e.kind.as_str());
    text(&mut b, e.phase.as_str());
    for n in [
        e.debit,
        e.credit,
        e.amount.minor(),
        e.pending_id.unwrap_or(0),
        e.at_ms,
    ] {
        b.extend_from_slice(&n.to_be_bytes());
    }
    text(&mut b, &e.memo);
    b
}

fn text(b: &mut Vec<u8>, s: &str) {
    // Texts are capped far below 4 GiB (MAX_TEXT_LEN); saturate rather than wrap.
    let n = u32::try_from(s.len()).unwrap_or(u32::MAX);
    b.extend_from_slice(&n.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// The hash an entry must carry, given its predecessor's.
pub fn hash(prev: &[u8; 32], e: &Entry) -> [u8; 32] {
    let mut c = Context::new(&SHA256);
    c.update(prev);
    c.update(&canonical(e));
    let mut out = [0u8; 32];
    out.copy_from_slice(c.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::ledger::{Kind, Phase};
    use crate::billing::money::Money;

    fn entry() -> Entry {
        Entry {
            id: 1,
            key: "k".into(),
            kind: Kind::Topup,
            phase: Phase::Posted,
            debit: 1,
            credit: 2,
            amount: Money::from_minor(500),
            pending_id: None,
            at_ms: 1_796_083_200_000,
            memo: String::new(),
            prev_hash: GENESIS,
            hash: GENESIS,
        }
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = hash(&GENESIS, &entry());
        let edits: Vec<fn(&mut Entry)> = vec![
            |e| e.id = 2,
            |e| e.key = "k2".into(),
            |e| e.kind = Kind::Charge,
            |e| e.phase = Phase::Pending,
            |e| e.debit = 3,
            |e| e.credit = 3,
            |e| e.amount = Money::from_minor(501),
            |e| e.pending_id = Some(1),
            |e| e.at_ms += 1,
            |e| e.memo = "x".into(),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut e = entry();
            edit(&mut e);
            assert_ne!(hash(&GENESIS, &e), base, "edit {i}");
        }
        assert_ne!(hash(&[1; 32], &entry()), base);
        // Length prefixes keep "ab"+"" apart from "a"+"b".
        let mut a = entry();
        a.key = "ab".into();
        let mut b = entry();
        b.key = "a".into();
        b.memo = "b".into();
        assert_ne!(canonical(&a), canonical(&b));
    }
}
