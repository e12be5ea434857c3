//! `mailbell billing statement|report|unbilled|write-off` and their admin API routes: a
//! user's monthly statement, usage per zone and day, deliveries to accounts the ledger does
//! not know, and an operator's write-off of them. Assembled by [`crate::billing::report`];
//! read on a connection of their own ([`Ledger::read`]), so a report over millions of
//! deliveries never holds up postings. As with the other billing commands, the CLI goes
//! through the daemon when it runs and opens the ledger file when it does not.
//!
//! ```text
//! GET  /admin/v1/billing/statement/{user}?month=YYYY-MM             -> MonthlyStatement
//! GET  /admin/v1/billing/report?month=YYYY-MM&zone=Z                -> UsageReport
//! GET  /admin/v1/billing/unbilled                                   -> UnbilledReply
//! POST /admin/v1/billing/unbilled/write-off {"account","reason","by"} -> WriteOff
//! GET  /admin/v1/billing/accounts?after=LOGIN&limit=N (N ≤ 1000)    -> [UserAccount] by login
//! month defaults to the current local month; 400 bad input, 404 unknown user or nothing
//! unbilled for the account, 503 the ledger failing
//! ```

use std::fmt::Write as _;
use std::path::Path;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::admin::api::ApiError;
use crate::admin::billing::{send, OpError, Via};
use crate::admin::cli::{api, enc};
use crate::audit::{AuditEvent, AuditLog};
use crate::billing::ledger::{LedgerError, UnbilledAccount, WriteOff, MAX_TEXT_LEN};
use crate::billing::money::Money;
use crate::billing::report::{self, Month, MonthlyStatement, ReportError, UsageReport};
use crate::billing::Ledger;
use crate::users::account_fields::ACCOUNT_PAGE;
use crate::users::{address_key, AccountFields};

/// Failures of a statement, report or write-off.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportsError {
    #[error("{field}: {reason}")]
    Input { field: &'static str, reason: String },
    #[error("no unbilled deliveries to account {0:?} (see `mailbell billing unbilled`)")]
    NothingUnbilled(String),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl From<ReportsError> for ApiError {
    fn from(e: ReportsError) -> Self {
        match e {
            ReportsError::Ledger(l) => OpError::Ledger(l).into(),
            ReportsError::NothingUnbilled(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            _ => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
        }
    }
}

/// What `GET /admin/v1/billing/unbilled` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct UnbilledReply {
    /// At most [`crate::billing::ledger::reports::MAX_UNBILLED_ACCOUNTS`], by account.
    pub accounts: Vec<UnbilledAccount>,
    /// How many accounts have unbilled deliveries.
    pub total_accounts: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WriteOffBody {
    /// As `billing unbilled` names it (`stalwart:<id>` or an address).
    pub account: String,
    pub reason: String,
    /// The operator (recorded with the write-off and in the audit log).
    pub by: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct AccountsQuery {
    #[serde(default)]
    pub after: String,
    pub limit: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
pub struct MonthQuery {
    pub month: Option<String>,
    pub zone: Option<String>,
}

/// The operations both surfaces run.
#[derive(Clone)]
pub struct ReportOps {
    pub ledger: Ledger,
    /// Where write-offs are recorded (the daemon's audit log).
    pub audit: Option<AuditLog>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn text(field: &'static str, v: &str, max: usize) -> Result<String, ReportsError> {
    let v = v.trim();
    if v.is_empty() || v.len() > max || v.chars().any(char::is_control) {
        return Err(ReportsError::Input {
            field,
            reason: format!("1 to {max} bytes of text without control characters"),
        });
    }
    Ok(v.to_owned())
}

impl ReportOps {
    pub async fn statement(
        &self,
        user: &str,
        month: Option<&str>,
    ) -> Result<MonthlyStatement, ReportsError> {
        let month = Month::parse_or_current(month, now_ms())?;
        let login = address_key(user);
        let (since, until) = (month.start_ms, month.end_ms);
        let d = self
            .ledger
            .read(move |s| s.statement_data(&login, since, until))
            .await?;
        Ok(report::statement(
            d.account,
            &month,
            &d.entries,
            &d.retrievals,
            &d.charges,
        )?)
    }

    pub async fn report(
        &self,
        month: Option<&str>,
        zone: Option<&str>,
    ) -> Result<UsageReport, ReportsError> {
        let month = Month::parse_or_current(month, now_ms())?;
        let zone = zone
            .map(|z| text("zone", z, crate::billing::ledger::MAX_KEY_LEN))
            .transpose()?;
        let (days, end) = month.days();
        let mut bounds: Vec<i64> = days.iter().map(|d| d.1).collect();
        bounds.push(end);
        let rows = self.ledger.read(move |s| s.usage(&bounds)).await?;
        let names: Vec<String> = days.into_iter().map(|d| d.0).collect();
        Ok(report::usage(&month, zone.as_deref(), &names, &rows)?)
    }

    pub async fn unbilled(&self) -> Result<UnbilledReply, ReportsError> {
        let (accounts, total_accounts) = self.ledger.read(|s| s.unbilled_accounts()).await?;
        Ok(UnbilledReply {
            accounts,
            total_accounts,
        })
    }

    /// Writes off an account's unbilled deliveries; `via` says which surface (for the audit
    /// log: `admin-api` or `cli`).
    pub async fn write_off(&self, b: WriteOffBody, via: &str) -> Result<WriteOff, ReportsError> {
        let account = text("account", &b.account, crate::billing::ledger::MAX_KEY_LEN)?;
        let reason = text("reason", &b.reason, MAX_TEXT_LEN)?;
        let by = text("by", &b.by, crate::billing::ledger::MAX_KEY_LEN)?;
        let at = now_ms();
        let a = account.clone();
        let w = self
            .ledger
            .call(move |s| s.write_off_unbilled(&a, &by, &reason, at))
            .await?
            .ok_or(ReportsError::NothingUnbilled(account))?;
        info!(
            account = %w.account,
            deliveries = w.deliveries,
            bytes = w.bytes,
            by = %w.by,
            reason = %w.reason,
            "billing write-off of unbilled deliveries"
        );
        if let Some(log) = &self.audit {
            log.record(AuditEvent::Admin {
                actor: format!("{} via {via}", w.by),
                action: format!(
                    "billing write-off: {} deliveries, {} bytes, oldest {}: {}",
                    w.deliveries,
                    w.bytes,
                    local_time(w.oldest_ms),
                    w.reason
                ),
                target: format!("unbilled:{}", w.account),
            });
        }
        Ok(w)
    }
}

/// The routes, unauthenticated: merge them before [`crate::admin::api::protect`].
pub fn routes(ops: ReportOps) -> Router {
    Router::new()
        .route("/admin/v1/billing/statement/{user}", get(statement_h))
        .route("/admin/v1/billing/report", get(report_h))
        .route("/admin/v1/billing/unbilled", get(unbilled_h))
        .route("/admin/v1/billing/unbilled/write-off", post(write_off_h))
        .route("/admin/v1/billing/accounts", get(accounts_h))
        .with_state(ops)
}

type Reply<T> = Result<Json<T>, ApiError>;

fn query(q: Result<Query<MonthQuery>, QueryRejection>) -> Result<MonthQuery, ApiError> {
    q.map(|q| q.0)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))
}

async fn statement_h(
    State(o): State<ReportOps>,
    user: Result<UrlPath<String>, PathRejection>,
    q: Result<Query<MonthQuery>, QueryRejection>,
) -> Reply<MonthlyStatement> {
    let q = query(q)?;
    Ok(Json(o.statement(&user?.0, q.month.as_deref()).await?))
}

async fn report_h(
    State(o): State<ReportOps>,
    q: Result<Query<MonthQuery>, QueryRejection>,
) -> Reply<UsageReport> {
    let q = query(q)?;
    Ok(Json(o.report(q.month.as_deref(), q.zone.as_deref()).await?))
}

async fn accounts_h(
    State(o): State<ReportOps>,
    q: Result<Query<AccountsQuery>, QueryRejection>,
) -> Reply<Vec<crate::billing::ledger::UserAccount>> {
    let q = q
        .map(|q| q.0)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = q.limit.unwrap_or(ACCOUNT_PAGE).clamp(1, ACCOUNT_PAGE);
    Ok(Json(
        o.ledger
            .read(move |s| s.user_accounts(&q.after, limit))
            .await
            .map_err(ReportsError::from)?,
    ))
}

/// Every ledger account's fields through the daemon's API, by login (for `user export`).
pub(crate) async fn api_accounts(
    addr: std::net::SocketAddr,
    token: &str,
) -> anyhow::Result<std::collections::HashMap<String, AccountFields>> {
    let mut out = std::collections::HashMap::new();
    let mut after = String::new();
    loop {
        let p = format!(
            "/admin/v1/billing/accounts?limit={ACCOUNT_PAGE}&after={}",
            enc(&after)
        );
        let page: Vec<crate::billing::ledger::UserAccount> =
            api(addr, token, "GET", &p, None).await?;
        let Some(last) = page.last() else {
            return Ok(out);
        };
        last.login.clone_into(&mut after);
        out.extend(page.iter().map(|a| (a.login.clone(), AccountFields::of(a))));
    }
}

async fn unbilled_h(State(o): State<ReportOps>) -> Reply<UnbilledReply> {
    Ok(Json(o.unbilled().await?))
}

async fn write_off_h(
    State(o): State<ReportOps>,
    b: Result<Json<WriteOffBody>, JsonRejection>,
) -> Reply<WriteOff> {
    Ok(Json(o.write_off(b?.0, "admin-api").await?))
}

/// How a statement or report is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Text,
    Csv,
    Json,
}

fn format(csv: bool, json: bool) -> Format {
    match (csv, json) {
        (_, true) => Format::Json,
        (true, _) => Format::Csv,
        _ => Format::Text,
    }
}

#[derive(Debug, Subcommand)]
pub enum ReportCmd {
    /// A user's monthly statement: each retrieval with its time, client, messages, bytes per
    /// zone and charge; opening balance, top-ups, adjustments, charges, pending, closing.
    Statement {
        user: String,
        /// YYYY-MM (default: the current month).
        #[arg(long)]
        month: Option<String>,
        #[arg(long, conflicts_with = "json")]
        csv: bool,
        #[arg(long)]
        json: bool,
    },
    /// Usage per zone and per day: delivered messages and bytes, retrievals, charges.
    Report {
        /// YYYY-MM (default: the current month).
        #[arg(long)]
        month: Option<String>,
        /// Only this zone (free, foreign, …).
        #[arg(long)]
        zone: Option<String>,
        #[arg(long, conflicts_with = "json")]
        csv: bool,
        #[arg(long)]
        json: bool,
    },
    /// Deliveries to accounts the ledger does not know, per account: kept until the account
    /// exists (the next run charges them) or an operator writes them off.
    Unbilled {
        #[arg(long)]
        json: bool,
    },
    /// Write off an account's unbilled deliveries (never charged); recorded with who and why
    /// in the ledger and the audit log.
    WriteOff {
        /// As `billing unbilled` lists it.
        account: String,
        #[arg(long)]
        reason: String,
        /// The operator (default: $SUDO_USER, else $USER).
        #[arg(long)]
        by: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn operator() -> String {
    ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "operator".to_owned())
}

fn month_query(month: Option<&str>, zone: Option<&str>) -> String {
    let mut q: Vec<String> = Vec::new();
    if let Some(m) = month {
        q.push(format!("month={}", enc(m)));
    }
    if let Some(z) = zone {
        q.push(format!("zone={}", enc(z)));
    }
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

/// `mailbell billing statement|report|unbilled|write-off`, on `via` (the daemon's API or the
/// ledger opened here); `config` names the audit log a local write-off records in.
pub(crate) async fn run(config: Option<&Path>, via: &Via, cmd: ReportCmd) -> anyhow::Result<()> {
    let local = |o: &crate::admin::billing::Ops| ReportOps {
        ledger: o.ledger.clone(),
        audit: None,
    };
    match cmd {
        ReportCmd::Statement {
            user,
            month,
            csv,
            json,
        } => {
            let s: MonthlyStatement = match via {
                Via::Local(o) => local(o).statement(&user, month.as_deref()).await?,
                Via::Api { addr, token } => {
                    let p = format!(
                        "/admin/v1/billing/statement/{}{}",
                        enc(&user),
                        month_query(month.as_deref(), None)
                    );
                    api(*addr, token, "GET", &p, None).await?
                }
            };
            print!(
                "{}",
                match format(csv, json) {
                    Format::Json => serde_json::to_string_pretty(&s)? + "\n",
                    Format::Csv => statement_csv(&s)?,
                    Format::Text => statement_text(&s),
                }
            );
            Ok(())
        }
        ReportCmd::Report {
            month,
            zone,
            csv,
            json,
        } => {
            let r: UsageReport = match via {
                Via::Local(o) => local(o).report(month.as_deref(), zone.as_deref()).await?,
                Via::Api { addr, token } => {
                    let p = format!(
                        "/admin/v1/billing/report{}",
                        month_query(month.as_deref(), zone.as_deref())
                    );
                    api(*addr, token, "GET", &p, None).await?
                }
            };
            print!(
                "{}",
                match format(csv, json) {
                    Format::Json => serde_json::to_string_pretty(&r)? + "\n",
                    Format::Csv => report_csv(&r)?,
                    Format::Text => report_text(&r),
                }
            );
            Ok(())
        }
        ReportCmd::Unbilled { json } => {
            let r: UnbilledReply = match via {
                Via::Local(o) => local(o).unbilled().await?,
                Via::Api { addr, token } => {
                    api(*addr, token, "GET", "/admin/v1/billing/unbilled", None).await?
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", unbilled_text(&r));
            }
            Ok(())
        }
        ReportCmd::WriteOff {
            account,
            reason,
            by,
            json,
        } => {
            let b = WriteOffBody {
                account,
                reason,
                by: by.unwrap_or_else(operator),
            };
            let w: WriteOff = match via {
                Via::Api { addr, token } => {
                    send(
                        *addr,
                        token,
                        "POST",
                        "/admin/v1/billing/unbilled/write-off",
                        &b,
                    )
                    .await?
                }
                Via::Local(o) => {
                    // Opened before the write-off: one that cannot be audited is not made.
                    let cfg = crate::config::Config::load(config)?;
                    std::fs::create_dir_all(&cfg.data_dir)?;
                    let log = AuditLog::open(&cfg.audit_path(), cfg.audit.clone())?;
                    let ops = ReportOps {
                        ledger: o.ledger.clone(),
                        audit: Some(log.clone()),
                    };
                    let w = ops.write_off(b, "cli").await?;
                    log.flush()?;
                    w
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&w)?);
            } else {
                println!(
                    "wrote off {} deliveries ({} bytes, oldest {}) to {} by {}: {}",
                    w.deliveries,
                    w.bytes,
                    local_time(w.oldest_ms),
                    w.account,
                    w.by,
                    w.reason
                );
            }
            Ok(())
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS` in local time.
pub fn local_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// Columns padded to their widest cell; `right` marks the right-aligned ones (numbers).
fn table(head: &[&str], rows: &[Vec<String>], right: &[bool]) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            let pad = w[i].saturating_sub(c.chars().count());
            if i > 0 {
                l.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                l.push_str(&" ".repeat(pad));
                l.push_str(c);
            } else {
                l.push_str(c);
                l.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, &mut head.iter().copied());
    for r in rows {
        line(&mut out, &mut r.iter().map(String::as_str));
    }
    out
}

fn signed(m: Money) -> String {
    if !m.is_positive() {
        m.to_string()
    } else {
        format!("+{m}")
    }
}

/// Bytes per zone of a retrieval, in the statement's zone order.
fn zone_bytes(s: &MonthlyStatement, r: &report::StatementRetrieval) -> Vec<String> {
    s.zones
        .iter()
        .map(|z| {
            r.zones
                .iter()
                .find(|x| &x.zone == z)
                .map_or_else(|| "0".to_owned(), |x| x.bytes.to_string())
        })
        .collect()
}

pub fn statement_text(s: &MonthlyStatement) -> String {
    let a = &s.account;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Statement {} for {}{}{}, class {}, status {}",
        s.month,
        a.login,
        if a.real_name.is_empty() {
            String::new()
        } else {
            format!(" ({})", a.real_name)
        },
        if a.staff_no.is_empty() {
            String::new()
        } else {
            format!(", staff no {}", a.staff_no)
        },
        a.class,
        a.status
    );
    let _ = writeln!(
        out,
        "From {} to {} (local time)\n",
        local_time(s.since_ms),
        local_time(s.until_ms)
    );
    if s.retrievals.is_empty() {
        out.push_str("No retrievals.\n");
    } else {
        let zone_heads: Vec<String> = s.zones.iter().map(|z| format!("{z} bytes")).collect();
        let mut head = vec!["Time", "Client", "Protocol", "Messages", "Bytes"];
        head.extend(zone_heads.iter().map(String::as_str));
        head.push("Charge");
        let mut right = vec![false, false, false, true, true];
        right.extend(s.zones.iter().map(|_| true));
        right.push(true);
        let rows: Vec<Vec<String>> = s
            .retrievals
            .iter()
            .map(|r| {
                let mut row = vec![
                    local_time(r.at_ms),
                    r.client.clone(),
                    r.protocol.clone(),
                    r.messages.to_string(),
                    r.bytes.to_string(),
                ];
                row.extend(zone_bytes(s, r));
                row.push(r.charge.to_string());
                row
            })
            .collect();
        out.push_str(&table(&head, &rows, &right));
    }
    if !s.postings.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = s
            .postings
            .iter()
            .map(|p| {
                vec![
                    local_time(p.at_ms),
                    p.kind.to_string(),
                    signed(p.amount),
                    p.memo.clone(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["Time", "Posting", "Amount", "Note"],
            &rows,
            &[false, false, true, false],
        ));
    }
    out.push('\n');
    let totals = [
        ("Opening balance", s.opening.to_string()),
        ("Top-ups", signed(s.topups)),
        ("Adjustments", signed(s.adjustments)),
        (
            "Charges",
            signed(Money::ZERO.checked_sub(s.charges).unwrap_or(s.charges)),
        ),
        ("Closing balance", s.closing.to_string()),
        ("Pending", s.pending.to_string()),
        ("Available", s.available.to_string()),
    ];
    let rows: Vec<Vec<String>> = totals
        .iter()
        .map(|(k, v)| vec![(*k).to_owned(), v.clone()])
        .collect();
    let t = table(&["", ""], &rows, &[false, true]);
    // The header row of the totals is empty.
    out.push_str(t.split_once('\n').map_or("", |x| x.1));
    out
}

fn csv_out(rows: Vec<Vec<String>>) -> anyhow::Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.write_record(r)?;
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}

/// One row per line: the opening balance, each retrieval and posting in time order, the
/// pending amount and the closing balance. `amount` is the line's effect on the balance, so
/// the opening balance plus the amounts of the lines in between is the closing one.
pub fn statement_csv(s: &MonthlyStatement) -> anyhow::Result<String> {
    let mut head: Vec<String> = ["time", "type", "client", "protocol", "messages", "bytes"]
        .iter()
        .map(|h| (*h).to_owned())
        .collect();
    head.extend(s.zones.iter().map(|z| format!("{z}_bytes")));
    head.extend(["amount".to_owned(), "note".to_owned()]);
    let blank = |n: usize| vec![String::new(); n];
    let zn = s.zones.len();
    let mut lines: Vec<(i64, i64, Vec<String>)> = Vec::new();
    for r in &s.retrievals {
        let mut row = vec![
            local_time(r.at_ms),
            "retrieval".to_owned(),
            r.client.clone(),
            r.protocol.clone(),
            r.messages.to_string(),
            r.bytes.to_string(),
        ];
        row.extend(zone_bytes(s, r));
        row.push(Money::ZERO.checked_sub(r.charge)?.to_string());
        row.push(String::new());
        lines.push((r.at_ms, 0, row));
    }
    for p in &s.postings {
        let mut row = vec![local_time(p.at_ms), p.kind.to_string()];
        row.extend(blank(4 + zn));
        row.push(p.amount.to_string());
        row.push(p.memo.clone());
        lines.push((p.at_ms, p.entry, row));
    }
    lines.sort_by_key(|l| (l.0, l.1));
    let edge = |at: i64, kind: &str, amount: Money, note: &str| {
        let mut row = vec![local_time(at), kind.to_owned()];
        row.extend(blank(4 + zn));
        row.push(amount.to_string());
        row.push(note.to_owned());
        row
    };
    let mut rows = vec![head, edge(s.since_ms, "opening", s.opening, "")];
    rows.extend(lines.into_iter().map(|l| l.2));
    rows.push(edge(
        s.until_ms,
        "pending",
        s.pending,
        "delivered, not yet retrieved: reserved, not in the balance",
    ));
    rows.push(edge(s.until_ms, "closing", s.closing, ""));
    csv_out(rows)
}

pub fn report_text(r: &UsageReport) -> String {
    let mut out = format!(
        "Usage {}{} (local days)\n\n",
        r.month,
        r.zone
            .as_deref()
            .map(|z| format!(", zone {z}"))
            .unwrap_or_default()
    );
    let mut rows = Vec::new();
    for d in r.days.iter().chain(std::iter::once(&r.total)) {
        let day = if d.day == r.month { "total" } else { &d.day };
        if d.zones.is_empty() {
            rows.push(vec![
                day.to_owned(),
                "-".into(),
                "0".into(),
                "0".into(),
                "0.00".into(),
                d.retrievals.to_string(),
                d.retrieved_bytes.to_string(),
            ]);
        }
        for (i, z) in d.zones.iter().enumerate() {
            let first = i == 0;
            rows.push(vec![
                if first { day.to_owned() } else { String::new() },
                z.zone.clone(),
                z.messages.to_string(),
                z.bytes.to_string(),
                z.charged.to_string(),
                if first {
                    d.retrievals.to_string()
                } else {
                    String::new()
                },
                if first {
                    d.retrieved_bytes.to_string()
                } else {
                    String::new()
                },
            ]);
        }
    }
    out.push_str(&table(
        &[
            "Day",
            "Zone",
            "Messages",
            "Bytes",
            "Charged",
            "Retrievals",
            "Retrieved bytes",
        ],
        &rows,
        &[false, false, true, true, true, true, true],
    ));
    out
}

/// One row per day and zone; retrievals are per day, not per zone, so they are in the rows
/// whose zone is `*` (one per day, and one for the month with day `total`).
pub fn report_csv(r: &UsageReport) -> anyhow::Result<String> {
    let mut rows = vec![[
        "day",
        "zone",
        "messages",
        "bytes",
        "charged",
        "retrievals",
        "retrieved_bytes",
    ]
    .iter()
    .map(|h| (*h).to_owned())
    .collect::<Vec<_>>()];
    for d in r.days.iter().chain(std::iter::once(&r.total)) {
        let day = if d.day == r.month { "total" } else { &d.day };
        for z in &d.zones {
            rows.push(vec![
                day.to_owned(),
                z.zone.clone(),
                z.messages.to_string(),
                z.bytes.to_string(),
                z.charged.to_string(),
                String::new(),
                String::new(),
            ]);
        }
        rows.push(vec![
            day.to_owned(),
            "*".to_owned(),
            String::new(),
            String::new(),
            String::new(),
            d.retrievals.to_string(),
            d.retrieved_bytes.to_string(),
        ]);
    }
    csv_out(rows)
}

pub fn unbilled_text(r: &UnbilledReply) -> String {
    if r.accounts.is_empty() {
        return "no unbilled deliveries\n".to_owned();
    }
    let rows: Vec<Vec<String>> = r
        .accounts
        .iter()
        .map(|a| {
            vec![
                a.account.clone(),
                a.deliveries.to_string(),
                a.bytes.to_string(),
                local_time(a.oldest_ms),
                if a.first_period == a.last_period {
                    a.first_period.clone()
                } else {
                    format!("{} to {}", a.first_period, a.last_period)
                },
            ]
        })
        .collect();
    let mut out = table(
        &["Account", "Deliveries", "Bytes", "Oldest", "Runs"],
        &rows,
        &[false, true, true, false, false],
    );
    if r.total_accounts > r.accounts.len() as u64 {
        let _ = writeln!(
            out,
            "… {} accounts in all; the first {} are listed",
            r.total_accounts,
            r.accounts.len()
        );
    }
    out.push_str(
        "Kept until the account exists (the next run charges them) or `mailbell billing \
         write-off ACCOUNT --reason R`.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_numbers_right() {
        let t = table(
            &["Name", "Bytes"],
            &[
                vec!["a".into(), "1".into()],
                vec!["long name".into(), "12345".into()],
            ],
            &[false, true],
        );
        assert_eq!(t, "Name       Bytes\na              1\nlong name  12345\n");
    }

    #[test]
    fn errors_map_to_statuses() {
        let s = |e: ReportsError| ApiError::from(e).status;
        assert_eq!(
            s(ReportsError::NothingUnbilled("x".into())),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            s(ReportError::BadMonth("x".into()).into()),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            s(LedgerError::UnknownUser("a".into()).into()),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            s(LedgerError::Stopped.into()),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let e = text("reason", "  ", 10).unwrap_err().to_string();
        assert!(e.starts_with("reason: 1 to 10 bytes"), "{e}");
        assert!(text("reason", "a\u{7}b", 10).is_err());
    }
}
