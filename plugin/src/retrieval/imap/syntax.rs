//! IMAP syntax the session needs: literal announcements, client command strings, and the item
//! name in front of a literal in a FETCH response.

use super::ImapError;

/// A literal announced at the end of a line: `{n}`, `{n+}`, `~{n}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Literal {
    pub len: u64,
    pub sync: bool,
}

/// Reads a literal announcement at the end of `text` (a line without CRLF). Returns it and the
/// text before it; `Err` for a `{...}` ending that is not a valid announcement.
pub fn trailing_literal(text: &[u8]) -> Result<Option<(Literal, &[u8])>, ImapError> {
    let Some(inner) = text.strip_suffix(b"}") else {
        return Ok(None);
    };
    let Some(open) = inner.iter().rposition(|b| *b == b'{') else {
        return Ok(None);
    };
    let mut digits = &inner[open + 1..];
    let sync = match digits.strip_suffix(b"+") {
        Some(d) => {
            digits = d;
            false
        }
        None => true,
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ImapError::BadLiteral);
    }
    let len = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or(ImapError::BadLiteral)?;
    let before = &inner[..open];
    let before = before.strip_suffix(b"~").unwrap_or(before);
    Ok(Some((Literal { len, sync }, before)))
}

/// Splits a client line part into strings: atoms and quoted strings (unescaped).
pub(super) fn strings(text: &[u8]) -> Result<Vec<Vec<u8>>, ImapError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < text.len() {
        match text[at] {
            b' ' => at += 1,
            b'"' => {
                let mut s = Vec::new();
                at += 1;
                loop {
                    match text.get(at) {
                        None => return Err(ImapError::BadCommand),
                        Some(b'"') => break,
                        Some(b'\\') => {
                            s.push(*text.get(at + 1).ok_or(ImapError::BadCommand)?);
                            at += 2;
                        }
                        Some(b) => {
                            s.push(*b);
                            at += 1;
                        }
                    }
                }
                at += 1;
                out.push(s);
            }
            _ => {
                let end = text[at..]
                    .iter()
                    .position(|b| *b == b' ')
                    .map_or(text.len(), |p| at + p);
                out.push(text[at..end].to_vec());
                at = end;
            }
        }
    }
    Ok(out)
}

/// The item name right before a literal: `BODY[1.2]<0>` in `... BODY[1.2]<0> {n}`.
pub(super) fn section_before(text: &[u8]) -> &[u8] {
    let end = text.iter().rposition(|b| *b != b' ').map_or(0, |p| p + 1);
    let text = &text[..end];
    let mut depth = 0u32;
    let mut start = text.len();
    for (i, b) in text.iter().enumerate().rev() {
        match b {
            b']' => depth += 1,
            b'[' => depth = depth.saturating_sub(1),
            b' ' | b'(' if depth == 0 => break,
            _ => {}
        }
        start = i;
    }
    &text[start..]
}

/// Whether an item's literal is message bytes: BODY[...], BINARY[...], RFC822, RFC822.TEXT,
/// RFC822.HEADER.
pub(super) fn counted(section: &[u8]) -> bool {
    let upper = section.to_ascii_uppercase();
    upper.starts_with(b"BODY[")
        || upper.starts_with(b"BINARY[")
        || upper == b"RFC822"
        || upper == b"RFC822.TEXT"
        || upper == b"RFC822.HEADER"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_announcements() {
        assert_eq!(
            trailing_literal(b"a LOGIN {12+}").unwrap(),
            Some((
                Literal {
                    len: 12,
                    sync: false
                },
                &b"a LOGIN "[..]
            ))
        );
        assert_eq!(
            trailing_literal(b"X BINARY[] ~{3}").unwrap(),
            Some((Literal { len: 3, sync: true }, &b"X BINARY[] "[..]))
        );
        assert_eq!(trailing_literal(b"a NOOP").unwrap(), None);
        assert_eq!(trailing_literal(b"a {x}"), Err(ImapError::BadLiteral));
        assert_eq!(
            trailing_literal(b"a {99999999999999999999}"),
            Err(ImapError::BadLiteral)
        );
        assert_eq!(section_before(b"* 1 FETCH (BODY[1.2]<0> "), b"BODY[1.2]<0>");
        assert_eq!(
            section_before(b"(BODY[HEADER.FIELDS (A B)] "),
            b"BODY[HEADER.FIELDS (A B)]"
        );
    }

    #[test]
    fn strings_are_atoms_and_unescaped_quoted_strings() {
        assert_eq!(
            strings(br#"a LOGIN "al\"ice" pw"#).unwrap(),
            [&b"a"[..], b"LOGIN", b"al\"ice", b"pw"]
        );
        assert_eq!(strings(b"a LOGIN \"open"), Err(ImapError::BadCommand));
    }

    #[test]
    fn counted_items_are_message_bytes() {
        for item in [
            "BODY[]",
            "body[1.2]<0>",
            "BINARY[1]",
            "RFC822",
            "RFC822.TEXT",
            "RFC822.HEADER",
        ] {
            assert!(counted(item.as_bytes()), "{item}");
        }
        for item in ["ENVELOPE", "(", "NIL", "RFC822.SIZE", "BODYSTRUCTURE"] {
            assert!(!counted(item.as_bytes()), "{item}");
        }
    }
}
