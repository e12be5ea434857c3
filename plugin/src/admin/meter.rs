//! `GET /admin/v1/meter` and `mailbell meter list`: the meter store's records (what the
//! retrieval proxy's sessions retrieved), by user and time, paged by record id.
//!
//! ```text
//! GET /admin/v1/meter?user=alice&since=7d&until=2026-12-08&after=41&limit=1000&format=json
//!   json (default): {"records":[MeterRecord…],"next_after":1041|null}
//!   csv:  meter::CSV_HEADER, then the rows of each record; `x-next-after: 1041` when more match
//!   text: one line per record (meter::format_session); `x-next-after` likewise
//! ```

use std::path::Path;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::{Args, Subcommand};
use serde::Deserialize;

use crate::admin::api::ApiError;
use crate::admin::cli::{api, enc, target, Target};
use crate::audit::parse_since;
use crate::meter::{csv_rows, format_session, MeterPage, MeterQuery, MeterStore, CSV_HEADER};

/// Records a page holds unless the request says otherwise.
pub const DEFAULT_LIMIT: usize = 1000;

/// The meter route, unauthenticated: merge it before [`crate::admin::api::protect`].
pub fn routes(store: MeterStore) -> Router {
    Router::new()
        .route("/admin/v1/meter", get(list))
        .with_state(store)
}

#[derive(Debug, Default, Deserialize)]
struct MeterQ {
    user: Option<String>,
    since: Option<String>,
    until: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
    format: Option<String>,
}

/// The output forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    Json,
    Csv,
    Text,
}

fn query(q: &MeterQ) -> Result<MeterQuery, String> {
    let now = chrono::Utc::now().timestamp_millis();
    let time = |key: &str, v: &Option<String>| {
        v.as_deref()
            .map(|s| parse_since(s, now))
            .transpose()
            .map_err(|e| format!("{key}: {e}"))
    };
    Ok(MeterQuery {
        user: q.user.clone().filter(|u| !u.is_empty()),
        since_ms: time("since", &q.since)?,
        until_ms: time("until", &q.until)?,
        after: q.after,
        limit: q.limit.unwrap_or(DEFAULT_LIMIT),
    })
}

fn form(s: Option<&str>) -> Result<Form, String> {
    match s.unwrap_or("json") {
        "json" => Ok(Form::Json),
        "csv" => Ok(Form::Csv),
        "text" => Ok(Form::Text),
        other => Err(format!("format {other:?}: expected json, csv or text")),
    }
}

async fn list(State(store): State<MeterStore>, Query(q): Query<MeterQ>) -> Response {
    let (mq, form) = match query(&q).and_then(|mq| Ok((mq, form(q.format.as_deref())?))) {
        Ok(v) => v,
        Err(e) => return ApiError::new(StatusCode::BAD_REQUEST, e).into_response(),
    };
    let page = match tokio::task::spawn_blocking(move || store.query(&mq)).await {
        Ok(Ok(page)) => page,
        Ok(Err(e)) => {
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
        Err(e) => {
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    };
    let (kind, body) = match form {
        Form::Json => return Json(page).into_response(),
        Form::Csv => match csv_text(&page) {
            Ok(b) => ("text/csv; charset=utf-8", b),
            Err(e) => {
                return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                    .into_response()
            }
        },
        Form::Text => ("text/plain; charset=utf-8", text(&page)),
    };
    let mut r = ([(header::CONTENT_TYPE, kind)], body).into_response();
    if let Some(next) = page.next_after {
        r.headers_mut().insert("x-next-after", next.into());
    }
    r
}

/// The page as CSV with its header row.
pub fn csv_text(page: &MeterPage) -> Result<String, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(CSV_HEADER)?;
    for r in &page.records {
        for row in csv_rows(r) {
            w.write_record(&row)?;
        }
    }
    let bytes = w
        .into_inner()
        .map_err(|e| csv::Error::from(e.into_error()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn text(page: &MeterPage) -> String {
    page.records
        .iter()
        .map(|r| format_session(r) + "\n")
        .collect()
}

#[derive(Debug, Subcommand)]
pub enum MeterCmd {
    /// List what retrieval sessions retrieved: one line per session, its messages summed.
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this account's sessions (the login name, case-insensitive).
    #[arg(long)]
    user: Option<String>,
    /// From this time: "2026-11-22", RFC 3339, or relative "2h", "7d".
    #[arg(long)]
    since: Option<String>,
    /// Before this time (same forms as --since).
    #[arg(long)]
    until: Option<String>,
    /// Only records after this id (a consumer's cursor; stderr gives the next one).
    #[arg(long)]
    after: Option<u64>,
    /// Most records printed, oldest first.
    #[arg(long, default_value_t = DEFAULT_LIMIT)]
    limit: usize,
    /// One JSON object per record, every field.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// CSV with a header row: a row per session and one per message, every field.
    #[arg(long)]
    csv: bool,
}

/// `mailbell meter …`: through the daemon's admin API when it runs, else the files directly
/// (read-only: the daemon's writer need not be stopped).
pub async fn meter(config: Option<&Path>, cmd: MeterCmd) -> anyhow::Result<()> {
    let MeterCmd::List(a) = cmd;
    let q = MeterQ {
        user: a.user.clone(),
        since: a.since.clone(),
        until: a.until.clone(),
        after: a.after,
        limit: Some(a.limit),
        format: None,
    };
    let page: MeterPage = match target(config).await? {
        Target::Api { addr, token, .. } => {
            let mut path = format!("/admin/v1/meter?limit={}", a.limit);
            for (k, v) in [("user", &a.user), ("since", &a.since), ("until", &a.until)] {
                if let Some(v) = v {
                    path.push_str(&format!("&{k}={}", enc(v)));
                }
            }
            if let Some(after) = a.after {
                path.push_str(&format!("&after={after}"));
            }
            api(addr, &token, "GET", &path, None).await?
        }
        Target::Local(cfg) => {
            let mq = query(&q).map_err(anyhow::Error::msg)?;
            let dir = cfg.meter_path();
            tokio::task::spawn_blocking(move || MeterStore::open_read_only(&dir).query(&mq))
                .await??
        }
    };
    if a.csv {
        print!("{}", csv_text(&page)?);
    } else if a.json {
        for r in &page.records {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print!("{}", text(&page));
    }
    if let Some(next) = page.next_after {
        eprintln!(
            "mailbell meter list: printed {} record(s); more match: add --after {next}",
            page.records.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn bad_times_and_formats_name_the_parameter() {
        let q = MeterQ {
            since: Some("yesterday".into()),
            ..MeterQ::default()
        };
        assert!(query(&q).unwrap_err().starts_with("since: "));
        assert!(form(Some("xml")).unwrap_err().contains("xml"));
        assert_eq!(form(None).unwrap(), Form::Json);
        let q = MeterQ {
            since: Some("2026-12-01".into()),
            user: Some(String::new()),
            ..MeterQ::default()
        };
        let mq = query(&q).unwrap();
        assert_eq!(mq.since_ms, Some(1_796_083_200_000));
        assert_eq!(mq.user, None);
        assert_eq!(mq.limit, DEFAULT_LIMIT);
    }
}
