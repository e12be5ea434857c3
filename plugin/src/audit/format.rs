//! The audit log as people read and write it: `--since`/`--until` times and the one-line
//! text form of a record.

use super::*;

/// Parses a `--since`/`--until` argument into ms since the Unix epoch: a date
/// (`2026-11-22`, midnight UTC), an RFC 3339 time (`2026-11-22T10:00:00Z`, `…+01:00`), a UTC
/// time without offset (`2026-11-22T10:00`, `2026-11-22 10:00:00`), or a span back from
/// `now_ms`: a whole number with `s`, `m`, `h`, `d` or `w` (`90m`, `2h`, `7d`).
pub fn parse_since(s: &str, now_ms: i64) -> Result<i64, AuditError> {
    let bad = |reason| AuditError::BadTime {
        input: s.chars().take(64).collect(),
        reason,
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(bad("empty"));
    }
    if let Some(unit) = t.chars().last().filter(char::is_ascii_alphabetic) {
        let digits = &t[..t.len() - 1];
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            let unit_ms: i64 = match unit {
                's' => 1000,
                'm' => 60_000,
                'h' => 3_600_000,
                'd' => DAY_MS,
                'w' => 7 * DAY_MS,
                _ => return Err(bad("unknown unit (use s, m, h, d or w)")),
            };
            let n: i64 = digits.parse().map_err(|_| bad("number too large"))?;
            return n
                .checked_mul(unit_ms)
                .and_then(|back| now_ms.checked_sub(back))
                .ok_or_else(|| bad("too far back"));
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return d
            .and_hms_opt(0, 0, 0)
            .map(|dt| dt.and_utc().timestamp_millis())
            .ok_or_else(|| bad("not a valid date"));
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
        return Ok(dt.timestamp_millis());
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(t, fmt) {
            return Ok(dt.and_utc().timestamp_millis());
        }
    }
    Err(bad(
        "expected YYYY-MM-DD, an RFC 3339 time or a span like 90m, 2h, 7d",
    ))
}

/// One line for humans: the UTC time (RFC 3339, ms), the event name, then `key=value` fields.
/// Free text is quoted and escaped when it has spaces, quotes or control characters (so a
/// subject cannot forge a line), and digit runs that look like phone numbers are masked.
///
/// ```text
/// 2026-11-22T10:00:00.000Z created notice=4f… user=alice queue_id=42 from=bob@example.org subject="Lunch?"
/// ```
pub fn format_record(r: &AuditRecord) -> String {
    use std::fmt::Write as _;
    let mut out = match DateTime::<Utc>::from_timestamp_millis(r.at_ms) {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Millis, true),
        None => format!("@{}ms", r.at_ms),
    };
    out.push(' ');
    out.push_str(r.event.name());
    let line = &mut out;
    match &r.event {
        AuditEvent::Created {
            notice,
            user,
            queue_id,
            from,
            subject,
        } => {
            id_field(line, "notice", notice);
            field(line, "user", user);
            if let Some(q) = queue_id {
                id_field(line, "queue_id", &q.to_string());
            }
            field(line, "from", from);
            field(line, "subject", subject);
        }
        AuditEvent::Held {
            notice,
            user,
            reason,
            until_ms,
        } => {
            id_field(line, "notice", notice);
            field(line, "user", user);
            field(line, "reason", reason);
            match DateTime::<Utc>::from_timestamp_millis(*until_ms) {
                Some(t) => {
                    let _ = write!(
                        line,
                        " until={}",
                        t.to_rfc3339_opts(SecondsFormat::Secs, true)
                    );
                }
                None => {
                    let _ = write!(line, " until_ms={until_ms}");
                }
            }
        }
        AuditEvent::Coalesced {
            notice,
            user,
            into,
            count,
        } => {
            id_field(line, "notice", notice);
            field(line, "user", user);
            id_field(line, "into", into);
            let _ = write!(line, " count={count}");
        }
        AuditEvent::Dropped {
            notice,
            user,
            reason,
        } => {
            id_field(line, "notice", notice);
            field(line, "user", user);
            field(line, "reason", reason);
        }
        AuditEvent::Queued { notice, user } => {
            id_field(line, "notice", notice);
            field(line, "user", user);
        }
        AuditEvent::BillingNotice {
            notice,
            user,
            kind,
            balance,
            threshold,
        } => {
            id_field(line, "notice", notice);
            field(line, "user", user);
            field(line, "kind", kind);
            id_field(line, "balance", balance);
            if let Some(t) = threshold {
                id_field(line, "threshold", t);
            }
        }
        AuditEvent::Sent {
            notice,
            user,
            agent,
        }
        | AuditEvent::Acked {
            notice,
            user,
            agent,
        } => {
            id_field(line, "notice", notice);
            opt_field(line, "user", user.as_deref());
            field(line, "agent", agent);
        }
        AuditEvent::Deferred {
            notice,
            user,
            reason,
            retry_in_ms,
        } => {
            id_field(line, "notice", notice);
            opt_field(line, "user", user.as_deref());
            field(line, "reason", reason);
            let _ = write!(line, " retry_in_ms={retry_in_ms}");
        }
        AuditEvent::DeadLettered {
            notice,
            user,
            reason,
        } => {
            id_field(line, "notice", notice);
            opt_field(line, "user", user.as_deref());
            field(line, "reason", reason);
        }
        AuditEvent::Requeued { notice, by } => {
            id_field(line, "notice", notice);
            field(line, "by", by);
        }
        AuditEvent::SessionUp {
            agent,
            addr,
            window,
        } => {
            field(line, "agent", agent);
            field(line, "addr", addr);
            let _ = write!(line, " window={window}");
        }
        AuditEvent::SessionDown {
            agent,
            addr,
            reason,
            sent,
            acked,
        } => {
            field(line, "agent", agent);
            field(line, "addr", addr);
            field(line, "reason", reason);
            let _ = write!(line, " sent={sent} acked={acked}");
        }
        AuditEvent::ConnectFailed {
            agent,
            addr,
            reason,
        } => {
            field(line, "agent", agent);
            field(line, "addr", addr);
            field(line, "reason", reason);
        }
        AuditEvent::Admin {
            actor,
            action,
            target,
        } => {
            field(line, "actor", actor);
            field(line, "action", action);
            field(line, "target", target);
        }
        AuditEvent::Refused {
            mta,
            stage,
            client_ip,
            matched,
        } => {
            field(line, "mta", mta);
            field(line, "stage", stage);
            field(line, "client_ip", client_ip);
            field(line, "matched", matched);
        }
    }
    out
}

fn field(out: &mut String, k: &str, v: &str) {
    use std::fmt::Write as _;
    let _ = write!(out, " {k}={}", quote(&mask_phones(v)));
}

/// Ids are printed as they are: a hex id may hold a long run of digits.
fn id_field(out: &mut String, k: &str, v: &str) {
    use std::fmt::Write as _;
    let _ = write!(out, " {k}={}", quote(v));
}

fn opt_field(out: &mut String, k: &str, v: Option<&str>) {
    match v {
        Some(v) => field(out, k, v),
        None => out.push_str(&format!(" {k}=-")),
    }
}

/// `v` as is when it is a plain token, else in double quotes with Rust escapes.
fn quote(v: &str) -> String {
    let plain = !v.is_empty()
        && v != "-"
        && v.chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '\\' && c != '=');
    if plain {
        v.to_owned()
    } else {
        format!("{v:?}")
    }
}

/// Masks runs that look like phone numbers: 8 or more digits in a row (or `+` and 7 or more),
/// keeping the first 3 and the last 2 digits (`+33612345678` gives `+336******78`). Numbers written with spaces or
/// dashes are not recognised; none should reach the audit log anyway.
pub(super) fn mask_phones(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let mut copied = 0;
    while i < b.len() {
        let plus = b.get(i) == Some(&b'+');
        let start = if plus { i + 1 } else { i };
        let mut end = start;
        while b.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
        let digits = end - start;
        // Only at the start of a digit run, not in its middle.
        let at_run_start = i == 0 || !b.get(i - 1).is_some_and(u8::is_ascii_digit);
        if at_run_start && (digits >= 8 || (plus && digits >= 7)) {
            out.push_str(&s[copied..start]);
            out.push_str(&s[start..start + 3]);
            out.extend(std::iter::repeat_n('*', digits - 5));
            out.push_str(&s[end - 2..end]);
            copied = end;
            i = end;
        } else {
            i = if end > i { end } else { i + 1 };
        }
    }
    out.push_str(&s[copied..]);
    out
}
