//! Meter records as people and spreadsheets read them: one text line per record, CSV rows.

use chrono::{DateTime, SecondsFormat, Utc};

use super::{Entry, Message, MeterRecord};

fn time(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.to_rfc3339_opts(SecondsFormat::Millis, true),
    )
}

/// Free text without spaces, quotes or control characters as is, else quoted and escaped
/// (so an account name cannot forge a line).
fn text(v: &str) -> String {
    if !v.is_empty() && v.chars().all(|c| !c.is_control() && c != ' ' && c != '"') {
        v.to_owned()
    } else {
        format!("{v:?}")
    }
}

/// One line per record. A session: its end time, id, account, listener, client, login, bytes
/// each way, then its messages summed (`messages=N/BYTES`) and the end reason; a long
/// session's earlier message batch: its count and bytes.
///
/// ```text
/// 2026-12-07T09:00:01.200Z #12 session account=alice pop3s client=192.0.2.1:50123 tls login=ok start=2026-12-07T09:00:00.100Z to_client=15420 to_backend=52 messages=3/15304 end="backend closed the connection"
/// ```
pub fn format_session(r: &MeterRecord) -> String {
    match &r.entry {
        Entry::Session(s) => format!(
            "{} #{} session account={} {} client={} {}login={} start={} to_client={} to_backend={} messages={}/{} end={} id={}",
            time(s.end_ms),
            r.id,
            text(s.account.as_deref().unwrap_or("-")),
            s.listener,
            s.client,
            if s.tls { "tls " } else { "" },
            login(s.login),
            time(s.start_ms),
            s.bytes_to_client,
            s.bytes_to_backend,
            s.messages,
            s.message_bytes,
            text(&s.end),
            s.session,
        ),
        Entry::Messages(m) => format!(
            "{} #{} messages account={} messages={}/{} id={}",
            time(r.at_ms),
            r.id,
            text(m.account.as_deref().unwrap_or("-")),
            m.retrieved.len(),
            m.retrieved.iter().map(|m| m.bytes).sum::<u64>(),
            m.session,
        ),
    }
}

fn login(l: super::Login) -> &'static str {
    match l {
        super::Login::Ok => "ok",
        super::Login::Refused => "refused",
        super::Login::None => "none",
    }
}

/// The CSV columns: a `session` row has the session columns, a `message` row (one per
/// message or section, after its record's row) the id, time, session and account and the
/// message columns.
pub const CSV_HEADER: [&str; 25] = [
    "id",
    "at_ms",
    "kind",
    "session",
    "account",
    "client",
    "protocol",
    "listener",
    "tls",
    "start_ms",
    "end_ms",
    "login",
    "bytes_to_client",
    "bytes_to_backend",
    "messages",
    "message_bytes",
    "end",
    "msg",
    "uidl",
    "top_lines",
    "mailbox",
    "uid",
    "section",
    "bytes",
    "complete",
];

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// The CSV rows of one record (without the header).
pub fn csv_rows(r: &MeterRecord) -> Vec<Vec<String>> {
    let (session, account, retrieved) = match &r.entry {
        Entry::Session(s) => (&s.session, &s.account, &s.retrieved),
        Entry::Messages(m) => (&m.session, &m.account, &m.retrieved),
    };
    let head = |kind: &str| -> Vec<String> {
        vec![
            r.id.to_string(),
            r.at_ms.to_string(),
            kind.to_owned(),
            session.clone(),
            account.clone().unwrap_or_default(),
        ]
    };
    let mut rows = Vec::new();
    if let Entry::Session(s) = &r.entry {
        let mut row = head("session");
        row.extend([
            s.client.to_string(),
            format!("{:?}", s.protocol).to_lowercase(),
            s.listener.clone(),
            s.tls.to_string(),
            s.start_ms.to_string(),
            s.end_ms.to_string(),
            login(s.login).to_owned(),
            s.bytes_to_client.to_string(),
            s.bytes_to_backend.to_string(),
            s.messages.to_string(),
            s.message_bytes.to_string(),
            s.end.clone(),
        ]);
        row.extend(std::iter::repeat_n(String::new(), 8));
        rows.push(row);
    }
    for m in retrieved {
        rows.push(message_row(head("message"), m));
    }
    rows
}

fn message_row(mut row: Vec<String>, m: &Message) -> Vec<String> {
    row.extend(std::iter::repeat_n(String::new(), 12));
    row.extend([
        m.msg.to_string(),
        opt(m.uidl.as_deref()),
        opt(m.top_lines),
        opt(m.mailbox.as_deref()),
        opt(m.uid),
        opt(m.section.as_deref()),
        m.bytes.to_string(),
        m.complete.to_string(),
    ]);
    row
}
