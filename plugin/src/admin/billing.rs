//! `mailbell billing …` and `/admin/v1/billing/…`: top-ups, adjustments, balances, tariffs,
//! accounts and `verify` on the ledger of record. Both surfaces run the same operations
//! ([`Ops`]) on the [`Ledger`] thread; the CLI goes through the daemon when it runs.
//!
//! ```text
//! POST /admin/v1/billing/topup    {"user","amount":"12.34","key","note"}   -> PostReply
//! POST /admin/v1/billing/adjust   {"user","amount":"-1.00","key","reason"} -> PostReply
//! GET  /admin/v1/billing/accounts/{user}                                   -> Statement
//! PUT  /admin/v1/billing/accounts/{user}  {"staff_no","real_name","class","status","note"}
//!                                  (fields left out keep their value)      -> UserAccount
//! GET  /admin/v1/billing/tariffs                                           -> [Tariff]
//! PUT  /admin/v1/billing/tariffs  {"class","zone","price_per_mb","min_charge"} -> Tariff
//! GET  /admin/v1/billing/verify                                            -> VerifyReport
//! POST /admin/v1/billing/run      {"date":"YYYY-MM-DD"} (absent: yesterday) -> RunReply
//! POST /admin/v1/billing/notice   {"user","kind":"arrears"|"warning","threshold"}
//!                                  (threshold: warnings only)               -> NoticeReply
//! amounts are JSON strings ("12.34"); 400 bad input, 404 unknown account, 409 a key reused
//! for another request, 503 the ledger or the outbox failing
//! ```
//! `notice` sends the user the billing SMS for their current posted balance now, through the
//! outbox like the accounting run's notices ([`crate::notify::billing`]): an operator's test
//! of the templates and the path, or a manual reminder. It needs the daemon (its outbox).

use std::path::Path;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::admin::api::ApiError;
use crate::admin::cli::{api, enc, target, Target};
use crate::audit::AuditLog;
use crate::billing::accountant::{Accountant, Registry, RunReply};
use crate::billing::ledger::{
    Entry, LedgerError, Statement, Status, Tariff, UserAccount, VerifyReport,
};
use crate::billing::money::Money;
use crate::billing::run::{LogProgress, Period, Progress, RunError};
use crate::billing::{adjust, topup, BillingConfig, Ledger};
use crate::notify::billing::{send_billing_notices, BillingKind, BillingNotice, Outcome};
use crate::notify::outbox::Outbox;
use crate::users::{address_key, UserStore};

/// What a top-up or adjustment answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct PostReply {
    pub entry: Entry,
    pub replayed: bool,
    /// The user's posted balance afterwards.
    pub balance: Money,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TopupBody {
    pub user: String,
    pub amount: String,
    pub key: String,
    #[serde(default)]
    pub note: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AdjustBody {
    pub user: String,
    pub amount: String,
    pub key: String,
    pub reason: String,
}

/// A change to an account; `None` keeps the value (a new account gets the defaults).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountPatch {
    pub staff_no: Option<String>,
    pub real_name: Option<String>,
    pub class: Option<String>,
    pub status: Option<String>,
    pub note: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TariffBody {
    pub class: String,
    pub zone: String,
    pub price_per_mb: String,
    #[serde(default)]
    pub min_charge: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RunBody {
    /// The local day to account (`YYYY-MM-DD`); absent: yesterday.
    #[serde(default)]
    pub date: Option<String>,
    /// Account everything recorded up to now instead of a day (`date` must be absent).
    #[serde(default)]
    pub now: bool,
}

/// `POST /admin/v1/billing/notice`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoticeBody {
    pub user: String,
    /// "arrears" or "warning".
    pub kind: String,
    /// The warning threshold ("5.00"); warnings only.
    #[serde(default)]
    pub threshold: Option<String>,
}

/// What `POST /admin/v1/billing/notice` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct NoticeReply {
    /// The notice id, as in the audit log and the outbox.
    pub notice: String,
    /// The user's primary address (the registry's), or the login as given if unknown.
    pub user: String,
    pub kind: String,
    /// The posted balance the notice states.
    pub balance: Money,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<Money>,
    /// Queued for the agent.
    pub queued: bool,
    /// Why not, when not queued: unknown_user, notify_off, licence_expired, no_phone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Failures of an operation: the ledger's, or input refused before it.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{field}: {reason}")]
    Input { field: &'static str, reason: String },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Run(RunError),
    #[error(transparent)]
    Notice(#[from] crate::notify::billing::BillingNoticeError),
    #[error("{0}")]
    Registry(String),
}

impl From<RunError> for OpError {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Ledger(l) => OpError::Ledger(l),
            other => OpError::Run(other),
        }
    }
}

fn input(field: &'static str) -> impl Fn(crate::billing::money::MoneyError) -> OpError {
    move |e| OpError::Input {
        field,
        reason: e.to_string(),
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        let status = match &e {
            OpError::Input { .. } => StatusCode::BAD_REQUEST,
            OpError::Run(r) => match r {
                RunError::BadDate(_) | RunError::NotEnded { .. } => StatusCode::BAD_REQUEST,
                RunError::Busy { .. } => StatusCode::CONFLICT,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            },
            OpError::Ledger(l) => match l {
                LedgerError::UnknownUser(_) | LedgerError::UnknownEntry(_) => StatusCode::NOT_FOUND,
                LedgerError::KeyConflict { .. } | LedgerError::AlreadyResolved { .. } => {
                    StatusCode::CONFLICT
                }
                LedgerError::Sqlite { .. } | LedgerError::Io { .. } | LedgerError::Stopped => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                _ => StatusCode::BAD_REQUEST,
            },
            OpError::Notice(_) | OpError::Registry(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        if status.is_server_error() {
            warn!(error = %e, "billing request failed");
        }
        ApiError::new(status, e.to_string())
    }
}

/// The operations both surfaces run.
#[derive(Clone)]
pub struct Ops {
    pub ledger: Ledger,
    pub cfg: BillingConfig,
    /// Runs accounting and carries out its effects (registry states, SMS).
    pub accountant: Accountant,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A posting's answer: its entry, and the account's posted balance after it.
fn post_reply(
    s: &mut dyn crate::billing::ledger::LedgerStore,
    login: &str,
    p: crate::billing::ledger::Posted,
) -> Result<PostReply, LedgerError> {
    Ok(PostReply {
        balance: s.statement(login)?.balance.posted()?,
        entry: p.entry,
        replayed: p.replayed,
    })
}

impl Ops {
    pub async fn topup(&self, b: TopupBody) -> Result<PostReply, OpError> {
        let amount = Money::parse_positive(b.amount.trim()).map_err(input("amount"))?;
        let login = address_key(&b.user);
        let at = now_ms();
        let rules = self.cfg.standing_rules();
        let (reply, restored) = self
            .ledger
            .call(move |s| {
                let p = topup(s, &login, amount, &b.key, &b.note, at)?;
                // Paid back to the threshold: normal at once, not at the next run.
                let restored = s.restore_if_paid(&login, &rules, "topup", at)?;
                Ok((post_reply(s, &login, p)?, restored))
            })
            .await?;
        if restored {
            self.settle().await;
        }
        Ok(reply)
    }

    /// Carries out open effects now (a failure is logged; they are retried every minute).
    async fn settle(&self) {
        if let Err(e) = self.accountant.apply_effects().await {
            warn!(error = %e, "billing effects not carried out yet; retried");
        }
    }

    /// Runs accounting for `date` (default: yesterday) and carries out its effects.
    pub async fn run(
        &self,
        b: RunBody,
        progress: std::sync::Arc<dyn Progress + Send + Sync>,
    ) -> Result<RunReply, OpError> {
        let period = match (b.now, b.date.as_deref()) {
            (true, Some(_)) => {
                return Err(OpError::Input {
                    field: "now",
                    reason: "give a date or now, not both".into(),
                })
            }
            (true, None) => Period::until(now_ms())?,
            (false, d) => Period::parse_or_yesterday(d.map(str::trim), now_ms())?,
        };
        Ok(self.accountant.run(period, progress).await?)
    }

    pub async fn adjust(&self, b: AdjustBody) -> Result<PostReply, OpError> {
        let amount = Money::parse(b.amount.trim()).map_err(input("amount"))?;
        if amount == Money::ZERO {
            return Err(OpError::Input {
                field: "amount",
                reason: "an adjustment of zero changes nothing".into(),
            });
        }
        let login = address_key(&b.user);
        let at = now_ms();
        let rules = self.cfg.standing_rules();
        let restored = self
            .ledger
            .call(move |s| {
                let p = adjust(s, &login, amount, &b.key, &b.reason, at)?;
                let restored = s.restore_if_paid(&login, &rules, "adjust", at)?;
                Ok((post_reply(s, &login, p)?, restored))
            })
            .await
            .map_err(OpError::from)?;
        if restored.1 {
            self.settle().await;
        }
        Ok(restored.0)
    }

    pub async fn statement(&self, user: &str) -> Result<Statement, OpError> {
        let login = address_key(user);
        Ok(self.ledger.call(move |s| s.statement(&login)).await?)
    }

    pub async fn put_account(&self, user: &str, p: AccountPatch) -> Result<UserAccount, OpError> {
        let login = address_key(user);
        let status: Option<Status> = p.status.as_deref().map(str::parse).transpose()?;
        let class = self.cfg.default_class.clone();
        let a = self
            .ledger
            .call(move |s| {
                let mut a = s.user(&login)?.unwrap_or(UserAccount {
                    login: login.clone(),
                    class,
                    ..UserAccount::default()
                });
                let set = |f: &mut String, v: Option<String>| {
                    if let Some(v) = v {
                        *f = v;
                    }
                };
                set(&mut a.staff_no, p.staff_no);
                set(&mut a.real_name, p.real_name);
                set(&mut a.class, p.class);
                set(&mut a.note, p.note);
                if let Some(st) = status {
                    a.status = st;
                }
                s.put_user(&a)?;
                Ok(a)
            })
            .await?;
        if let Some(st) = status {
            // The proxy enforces the registry's state: it follows the ledger's status.
            let acc = self.accountant.clone();
            let login = a.login.clone();
            tokio::task::spawn_blocking(move || acc.set_registry_state(&login, st))
                .await
                .map_err(|_| OpError::Ledger(LedgerError::Stopped))?
                .map_err(|why| {
                    OpError::Registry(format!(
                    "{}: the ledger's status is {st}, but the user registry was not updated: {why}",
                    a.login
                ))
                })?;
        }
        Ok(a)
    }

    pub async fn tariffs(&self) -> Result<Vec<Tariff>, OpError> {
        Ok(self.ledger.call(|s| s.tariffs()).await?)
    }

    pub async fn set_tariff(&self, b: TariffBody) -> Result<Tariff, OpError> {
        let t = Tariff {
            class: b.class,
            zone: b.zone,
            price_per_mb: Money::parse_non_negative(b.price_per_mb.trim())
                .map_err(input("price_per_mb"))?,
            min_charge: b
                .min_charge
                .as_deref()
                .map(|m| Money::parse_non_negative(m.trim()))
                .transpose()
                .map_err(input("min_charge"))?
                .unwrap_or(Money::ZERO),
        }
        .checked(self.cfg.max_price_per_mb)?;
        let put = t.clone();
        self.ledger.call(move |s| s.put_tariff(&put)).await?;
        Ok(t)
    }

    pub async fn verify(&self) -> Result<VerifyReport, OpError> {
        Ok(self.ledger.verify().await?)
    }
}

/// What `POST /admin/v1/billing/notice` needs besides the ledger: the daemon's stores.
#[derive(Clone)]
pub struct NoticeOps {
    pub ledger: Ledger,
    pub outbox: Outbox,
    pub users: UserStore,
    pub audit: AuditLog,
}

impl NoticeOps {
    /// Sends `b.user` the billing notice of `b.kind` for their posted balance now.
    pub async fn notice(&self, b: NoticeBody) -> Result<NoticeReply, OpError> {
        let threshold = b
            .threshold
            .as_deref()
            .map(|t| Money::parse(t.trim()))
            .transpose()
            .map_err(input("threshold"))?;
        let login = address_key(&b.user);
        let l = login.clone();
        let balance = self
            .ledger
            .call(move |s| s.statement(&l)?.balance.posted())
            .await?;
        let kind = match (b.kind.trim(), threshold) {
            ("arrears", None) => BillingKind::Arrears { balance },
            ("warning", Some(threshold)) => BillingKind::Warning { balance, threshold },
            ("arrears", Some(_)) => {
                return Err(OpError::Input {
                    field: "threshold",
                    reason: "only a warning has a threshold".into(),
                })
            }
            ("warning", None) => {
                return Err(OpError::Input {
                    field: "threshold",
                    reason: "a warning needs the threshold it warns about".into(),
                })
            }
            (other, _) => {
                return Err(OpError::Input {
                    field: "kind",
                    reason: format!("{other:?} is not one of arrears, warning"),
                })
            }
        };
        let notice = BillingNotice {
            login,
            kind,
            at_ms: now_ms(),
        };
        let out = send_billing_notices(&self.outbox, &self.users, &self.audit, vec![notice])
            .await?
            .into_iter()
            .next();
        let (id, user, reason) = match out {
            Some(Outcome::Queued { id, login }) => (id, login, None),
            Some(Outcome::Skipped { id, login, why }) => (id, login, Some(why.to_string())),
            None => {
                return Err(OpError::Input {
                    field: "user",
                    reason: "no notice was made".into(),
                })
            }
        };
        Ok(NoticeReply {
            notice: id.to_string(),
            user,
            kind: kind.name().to_owned(),
            balance,
            threshold,
            queued: reason.is_none(),
            reason,
        })
    }
}

/// `POST /admin/v1/billing/notice`, unauthenticated: merge it before
/// [`crate::admin::api::protect`].
pub fn notice_routes(ops: NoticeOps) -> Router {
    Router::new()
        .route("/admin/v1/billing/notice", post(notice_h))
        .with_state(ops)
}

async fn notice_h(
    State(o): State<NoticeOps>,
    b: Result<Json<NoticeBody>, JsonRejection>,
) -> Reply<NoticeReply> {
    Ok(Json(o.notice(b?.0).await?))
}

/// The billing routes, unauthenticated: merge them before [`crate::admin::api::protect`].
pub fn routes(ops: Ops) -> Router {
    Router::new()
        .route("/admin/v1/billing/topup", post(topup_h))
        .route("/admin/v1/billing/adjust", post(adjust_h))
        .route(
            "/admin/v1/billing/accounts/{user}",
            get(account_h).put(put_account_h),
        )
        .route(
            "/admin/v1/billing/tariffs",
            get(tariffs_h).put(set_tariff_h),
        )
        .route("/admin/v1/billing/verify", get(verify_h))
        .route("/admin/v1/billing/run", post(run_h))
        .with_state(ops)
}

type Reply<T> = Result<Json<T>, ApiError>;

async fn topup_h(
    State(o): State<Ops>,
    b: Result<Json<TopupBody>, JsonRejection>,
) -> Reply<PostReply> {
    Ok(Json(o.topup(b?.0).await?))
}

async fn adjust_h(
    State(o): State<Ops>,
    b: Result<Json<AdjustBody>, JsonRejection>,
) -> Reply<PostReply> {
    Ok(Json(o.adjust(b?.0).await?))
}

async fn account_h(
    State(o): State<Ops>,
    user: Result<UrlPath<String>, PathRejection>,
) -> Reply<Statement> {
    Ok(Json(o.statement(&user?.0).await?))
}

async fn put_account_h(
    State(o): State<Ops>,
    user: Result<UrlPath<String>, PathRejection>,
    b: Result<Json<AccountPatch>, JsonRejection>,
) -> Reply<UserAccount> {
    let user = user?.0;
    Ok(Json(o.put_account(&user, b?.0).await?))
}

async fn tariffs_h(State(o): State<Ops>) -> Reply<Vec<Tariff>> {
    Ok(Json(o.tariffs().await?))
}

async fn set_tariff_h(
    State(o): State<Ops>,
    b: Result<Json<TariffBody>, JsonRejection>,
) -> Reply<Tariff> {
    Ok(Json(o.set_tariff(b?.0).await?))
}

async fn verify_h(State(o): State<Ops>) -> Reply<VerifyReport> {
    Ok(Json(o.verify().await?))
}

async fn run_h(State(o): State<Ops>, b: Result<Json<RunBody>, JsonRejection>) -> Reply<RunReply> {
    Ok(Json(
        o.run(b?.0, std::sync::Arc::new(LogProgress::default()))
            .await?,
    ))
}

#[derive(Debug, Subcommand)]
pub enum BillingCmd {
    /// Credit a prepaid top-up (cash → user). Rerun with the same --key to retry safely.
    Topup {
        user: String,
        /// Above zero, at most two decimals: "50", "12.34".
        #[arg(allow_hyphen_values = true)]
        amount: String,
        /// Idempotency key (default: a new random one, printed).
        #[arg(long)]
        key: Option<String>,
        #[arg(long, default_value = "")]
        note: String,
        #[arg(long)]
        json: bool,
    },
    /// Correct a balance: a positive amount credits the user, a negative one debits.
    Adjust {
        user: String,
        #[arg(allow_hyphen_values = true)]
        amount: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// A user's account and balances.
    Balance {
        user: String,
        #[arg(long)]
        json: bool,
    },
    /// Create or change a user's billing account (the seed's fields).
    #[command(subcommand)]
    Account(AccountCmd),
    /// Check the hash chain, the zero-sum invariant and every balance; name the first bad row.
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Prices per MB by tariff class and zone.
    #[command(subcommand)]
    Tariff(TariffCmd),
    #[command(flatten)]
    Reports(crate::admin::billing_reports::ReportCmd),
    /// Run the accounting of one local day (default: yesterday): charge the period's
    /// traffic, update balances and standings. A finished day is not run twice; a day whose
    /// run stopped is resumed.
    Run {
        /// YYYY-MM-DD.
        #[arg(long, conflicts_with = "now")]
        date: Option<String>,
        /// Account everything recorded up to now (an ad-hoc period; the nightly run takes
        /// what comes after).
        #[arg(long)]
        now: bool,
        #[arg(long)]
        json: bool,
    },
    /// Send the user the arrears or warning SMS for their balance now, as the accounting run
    /// would (through the running daemon's outbox): test the templates and the path, or remind.
    NotifyTest {
        user: String,
        #[arg(long, value_parser = ["arrears", "warning"])]
        kind: String,
        /// The threshold a warning names ("5.00"); warnings only.
        #[arg(long, allow_hyphen_values = true)]
        threshold: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccountCmd {
    /// Create the account, or change the fields given.
    Set {
        user: String,
        /// Staff or student number.
        #[arg(long = "staff-no")]
        staff_no: Option<String>,
        #[arg(long = "name")]
        real_name: Option<String>,
        /// Tariff class (default for a new account: billing.default_class).
        #[arg(long)]
        class: Option<String>,
        /// normal, arrears or unwelcome.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TariffCmd {
    List {
        #[arg(long)]
        json: bool,
    },
    /// Set the price per MB of a zone for a tariff class ("0" for a free zone).
    Set {
        class: String,
        zone: String,
        #[arg(allow_hyphen_values = true)]
        price_per_mb: String,
        #[arg(long = "min-charge")]
        min_charge: Option<String>,
    },
}

fn new_key() -> String {
    format!("cli-{:016x}", rand::random::<u64>())
}

/// Where a command runs: the daemon's API, or the ledger file opened here.
pub(crate) enum Via {
    Api {
        addr: std::net::SocketAddr,
        token: String,
    },
    Local(Box<Ops>),
}

async fn via(config: Option<&Path>) -> anyhow::Result<Via> {
    Ok(match target(config).await? {
        Target::Api { addr, token, .. } => Via::Api { addr, token },
        Target::Local(cfg) => Via::Local(Box::new(Ops {
            ledger: Ledger::open(&cfg.ledger_path())?,
            cfg: cfg.billing.clone(),
            accountant: Accountant {
                ledger_path: cfg.ledger_path(),
                meter: Some(crate::meter::MeterStore::open_read_only(&cfg.meter_path())),
                users: Registry::Path {
                    path: cfg.users_path(),
                    languages: cfg.link.agent_languages.clone(),
                },
                accounts: None,
                settings: cfg.billing.run_settings(),
                audit: None,
                notifier: None,
                stalwart: if cfg.billing.stalwart_permissions {
                    crate::mta::stalwart_api::Permissions::new(&cfg.stalwart_api)
                        .map_err(anyhow::Error::msg)?
                        .map(std::sync::Arc::new)
                } else {
                    None
                },
            },
        })),
    })
}

/// Sends `b` as JSON to the daemon's `path` and reads its JSON answer.
pub(crate) async fn send<B: Serialize, R: serde::de::DeserializeOwned>(
    addr: std::net::SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    b: &B,
) -> anyhow::Result<R> {
    let j = serde_json::to_vec(b)?;
    api(
        addr,
        token,
        method,
        path,
        Some(("application/json", &j[..])),
    )
    .await
}

/// `mailbell billing …`.
pub async fn billing(config: Option<&Path>, cmd: BillingCmd) -> anyhow::Result<()> {
    let via = via(config).await?;
    match cmd {
        BillingCmd::Topup {
            user,
            amount,
            key,
            note,
            json,
        } => {
            let b = TopupBody {
                user,
                amount,
                key: key.unwrap_or_else(new_key),
                note,
            };
            let r: PostReply = match &via {
                Via::Api { addr, token } => {
                    send(*addr, token, "POST", "/admin/v1/billing/topup", &b).await?
                }
                Via::Local(o) => o.topup(b).await?,
            };
            print_post(&r, json)
        }
        BillingCmd::Adjust {
            user,
            amount,
            reason,
            key,
            json,
        } => {
            let b = AdjustBody {
                user,
                amount,
                key: key.unwrap_or_else(new_key),
                reason,
            };
            let r: PostReply = match &via {
                Via::Api { addr, token } => {
                    send(*addr, token, "POST", "/admin/v1/billing/adjust", &b).await?
                }
                Via::Local(o) => o.adjust(b).await?,
            };
            print_post(&r, json)
        }
        BillingCmd::Balance { user, json } => {
            let s: Statement = match &via {
                Via::Api { addr, token } => {
                    let p = format!("/admin/v1/billing/accounts/{}", enc(&user));
                    api(*addr, token, "GET", &p, None).await?
                }
                Via::Local(o) => o.statement(&user).await?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", statement_text(&s)?);
            }
            Ok(())
        }
        BillingCmd::Account(AccountCmd::Set {
            user,
            staff_no,
            real_name,
            class,
            status,
            note,
        }) => {
            let p = AccountPatch {
                staff_no,
                real_name,
                class,
                status,
                note,
            };
            let a: UserAccount = match &via {
                Via::Api { addr, token } => {
                    let path = format!("/admin/v1/billing/accounts/{}", enc(&user));
                    send(*addr, token, "PUT", &path, &p).await?
                }
                Via::Local(o) => o.put_account(&user, p).await?,
            };
            println!("{}: class {}, status {}", a.login, a.class, a.status);
            Ok(())
        }
        BillingCmd::Verify { json } => {
            let r: VerifyReport = match &via {
                Via::Api { addr, token } => {
                    api(*addr, token, "GET", "/admin/v1/billing/verify", None).await?
                }
                Via::Local(o) => o.verify().await?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            }
            match r.problem {
                Some(p) => anyhow::bail!("ledger verify failed: {p}"),
                None if !json => {
                    println!(
                        "ledger ok: {} entries, {} accounts, balances sum to zero, head {}",
                        r.entries, r.accounts, r.head
                    );
                    Ok(())
                }
                None => Ok(()),
            }
        }
        BillingCmd::Reports(c) => crate::admin::billing_reports::run(config, &via, c).await,
        BillingCmd::NotifyTest {
            user,
            kind,
            threshold,
            json,
        } => {
            let b = NoticeBody {
                user,
                kind,
                threshold,
            };
            let r: NoticeReply = match &via {
                Via::Api { addr, token } => {
                    send(*addr, token, "POST", "/admin/v1/billing/notice", &b).await?
                }
                Via::Local(_) => anyhow::bail!(
                    "billing notify-test needs the running daemon (it queues the SMS in the \
                     daemon's outbox): start `mailbell serve`, with [listen] admin set"
                ),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            }
            match (&r.reason, json) {
                (Some(why), _) => anyhow::bail!(
                    "{} notice {} for {} not sent: {why} (balance {})",
                    r.kind,
                    r.notice,
                    r.user,
                    r.balance
                ),
                (None, false) => println!(
                    "{} notice {} for {} queued: balance {}{}",
                    r.kind,
                    r.notice,
                    r.user,
                    r.balance,
                    r.threshold
                        .map(|t| format!(", threshold {t}"))
                        .unwrap_or_default()
                ),
                (None, true) => {}
            }
            Ok(())
        }
        BillingCmd::Tariff(TariffCmd::List { json }) => {
            let ts: Vec<Tariff> = match &via {
                Via::Api { addr, token } => {
                    api(*addr, token, "GET", "/admin/v1/billing/tariffs", None).await?
                }
                Via::Local(o) => o.tariffs().await?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&ts)?);
            } else {
                for t in ts {
                    println!(
                        "{}\t{}\t{}/MB\tmin {}",
                        t.class, t.zone, t.price_per_mb, t.min_charge
                    );
                }
            }
            Ok(())
        }
        BillingCmd::Run { date, now, json } => {
            let b = RunBody { date, now };
            let r: RunReply = match &via {
                Via::Api { addr, token } => {
                    send(*addr, token, "POST", "/admin/v1/billing/run", &b).await?
                }
                Via::Local(o) => o.run(b, progress()).await?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", run_text(&r));
            }
            Ok(())
        }
        BillingCmd::Tariff(TariffCmd::Set {
            class,
            zone,
            price_per_mb,
            min_charge,
        }) => {
            let b = TariffBody {
                class,
                zone,
                price_per_mb,
                min_charge,
            };
            let t: Tariff = match &via {
                Via::Api { addr, token } => {
                    send(*addr, token, "PUT", "/admin/v1/billing/tariffs", &b).await?
                }
                Via::Local(o) => o.set_tariff(b).await?,
            };
            println!(
                "tariff {}/{}: {}/MB, min {}",
                t.class, t.zone, t.price_per_mb, t.min_charge
            );
            Ok(())
        }
    }
}

/// A progress bar on a terminal, log lines otherwise.
fn progress() -> std::sync::Arc<dyn Progress + Send + Sync> {
    use std::io::IsTerminal as _;
    if std::io::stderr().is_terminal() {
        std::sync::Arc::new(Bar::default())
    } else {
        std::sync::Arc::new(LogProgress::default())
    }
}

/// indicatif's bar, one per stage.
#[derive(Default)]
struct Bar(std::sync::Mutex<Option<indicatif::ProgressBar>>);

impl Progress for Bar {
    fn stage(&self, name: &'static str, total: u64) {
        let mut b = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(old) = b.take() {
            old.finish();
        }
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg:>11} [{bar:40}] {pos}/{len} {per_sec} {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(name);
        *b = Some(bar);
    }

    fn advance(&self, n: u64) {
        let b = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(bar) = b.as_ref() {
            bar.inc(n);
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(b) = self.0.get_mut().ok().and_then(Option::take) {
            b.finish();
        }
    }
}

fn run_text(r: &RunReply) -> String {
    let s = &r.summary;
    if s.already {
        return format!(
            "period {} was accounted before: nothing changed ({} charges, {} total)\n",
            s.period, s.charges, s.charged
        );
    }
    format!(
        "period {}{}: {} deliveries ({} bytes), {} retrievals\n\
         charged {} in {} charges; {} pending ({}); {} earlier pending posted, {} expired\n\
         unbilled deliveries (unknown accounts): {}; earlier ones billed now: {}; bytes without a tariff: {}\n\
         {} new ledger entries; {} state changes, {} notices sent, {} waiting{}; {} ms\n",
        s.period,
        if s.resumed { " (resumed)" } else { "" },
        s.deliveries,
        s.delivery_bytes,
        s.retrievals,
        s.charged,
        s.charges,
        s.pending,
        s.pending_amount,
        s.pending_posted,
        s.expired,
        s.unbilled,
        s.unbilled_billed,
        s.unpriced_bytes,
        s.new_entries,
        r.effects.states,
        r.effects.notices,
        r.effects.waiting,
        if r.effects.stalwart_failed > 0 {
            format!(
                "; {} Stalwart permission changes failed (retried by the daemon)",
                r.effects.stalwart_failed
            )
        } else {
            String::new()
        },
        s.millis
    )
}

fn print_post(r: &PostReply, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let e = &r.entry;
    println!(
        "{}entry {}: {} {} (key {}); balance {}",
        if r.replayed {
            "replayed, nothing changed: "
        } else {
            ""
        },
        e.id,
        e.kind,
        e.amount,
        e.key,
        r.balance
    );
    Ok(())
}

fn statement_text(s: &Statement) -> anyhow::Result<String> {
    let a = &s.account;
    let b = &s.balance;
    Ok(format!(
        "login          {}\nstaff no       {}\nreal name      {}\nclass          {}\n\
         status         {}\nnote           {}\nbalance        {}\npending        {}\n\
         available      {}\n",
        a.login,
        a.staff_no,
        a.real_name,
        a.class,
        a.status,
        a.note,
        b.posted()?,
        b.debits_pending,
        b.available()?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_statuses() {
        let s = |e: OpError| ApiError::from(e).status;
        assert_eq!(
            s(LedgerError::UnknownUser("a".into()).into()),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            s(LedgerError::KeyConflict {
                key: "k".into(),
                id: 1
            }
            .into()),
            StatusCode::CONFLICT
        );
        assert_eq!(
            s(LedgerError::NotPositive(Money::ZERO).into()),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            s(LedgerError::Stopped.into()),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            s(OpError::Input {
                field: "amount",
                reason: "x".into()
            }),
            StatusCode::BAD_REQUEST
        );
    }
}
