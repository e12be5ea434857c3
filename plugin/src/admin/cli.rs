//! The admin commands (`mailbell user|queue|log|status`). When the daemon runs, its stores are
//! locked (sled allows one process), so the commands talk to its admin API (loopback, token
//! from the config); when it does not answer, they open the stores directly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;

use crate::admin::api::UserPage;
use crate::admin::ops::{parse_select, CountReply, QueueEntry};
use crate::audit::{format_record, parse_since, AuditLog, AuditPage, AuditQuery};
use crate::billing::ledger::sqlite::SqliteLedger;
use crate::config::Config;
use crate::notify::intake::{pending_notices, PendingNotice};
use crate::notify::outbox::{Outbox, OutboxConfig};
use crate::users::account_fields::{accounts_of, apply as apply_accounts};
use crate::users::{
    address_key, parse_bool, parse_licence, ExportFormat, Exporter, ImportMode, ImportOptions,
    ImportReport, Networks, QuietHours, User, UserError, UserPatch, UserStore, MAX_LIST_LIMIT,
};

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Register a user (fails if the address is taken).
    Add {
        address: String,
        #[command(flatten)]
        opts: UserOpts,
        /// Alias addresses (repeat).
        #[arg(long = "alias")]
        aliases: Vec<String>,
    },
    /// Change some of a user's settings.
    Set {
        address: String,
        #[command(flatten)]
        opts: UserOpts,
        #[arg(long = "add-alias")]
        add_aliases: Vec<String>,
        #[arg(long = "remove-alias")]
        remove_aliases: Vec<String>,
    },
    /// Show one user (text; --json for the admin API's document).
    Show {
        address: String,
        #[arg(long)]
        json: bool,
    },
    /// List users, by address (one line each; --json for the admin API's page).
    List {
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Delete a user.
    Remove { address: String },
    /// Print every user (no page cap): CSV that `user import` reads back to the same
    /// registry, or JSON. Use for backups: `mailbell user export > users.csv`.
    Export {
        /// csv (default) or json.
        #[arg(long, default_value = "csv")]
        format: String,
    },
    /// Import users from CSV (header row; columns address, phone, notify, licence_until,
    /// quiet, rate_limit_secs, language, aliases, allow_senders, deny_senders, max_parts,
    /// state, networks)
    /// or from the JSON that `user export --format json` writes. An empty cell (a field left
    /// out in JSON) keeps the user's value; "-" (JSON null) clears it.
    Import {
        file: PathBuf,
        /// csv or json; by default json for a *.json file, otherwise csv.
        #[arg(long)]
        format: Option<String>,
        /// upsert (default) or add (existing addresses are skipped).
        #[arg(long, default_value = "upsert")]
        mode: String,
        /// Report what would change, write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Args, Default)]
pub struct UserOpts {
    /// Phone number, E.164 ("+8613800138000"); "" removes it.
    #[arg(long)]
    phone: Option<String>,
    /// on | off
    #[arg(long)]
    notify: Option<String>,
    /// Licence end: YYYY-MM-DD, RFC 3339, or "none".
    #[arg(long)]
    licence: Option<String>,
    /// Quiet hours "22:00-07:00" (local to intake.timezone), or "none".
    #[arg(long)]
    quiet: Option<String>,
    /// At most one SMS per this many seconds ("default": the daemon's; 0: no limit).
    #[arg(long = "rate-limit")]
    rate_limit: Option<String>,
    /// Template language ("zh", "en"; "" = agent default).
    #[arg(long)]
    language: Option<String>,
    /// Only notify for these senders ("user@dom", "@dom", "*.dom"; repeat). "none" clears.
    #[arg(long = "allow")]
    allow: Vec<String>,
    /// Never notify for these senders (repeat). "none" clears.
    #[arg(long = "deny")]
    deny: Vec<String>,
    /// Most SMS parts per notice (0 = default).
    #[arg(long = "max-parts")]
    max_parts: Option<u8>,
    /// Standing at the retrieval proxy: normal, arrears (sees only the payment notice) or
    /// unwelcome (login refused).
    #[arg(long)]
    state: Option<String>,
    /// Client networks allowed at the retrieval proxy, "10.0.0.0/8,2001:db8::/32"; "any"
    /// (or "") allows every address again.
    #[arg(long)]
    networks: Option<String>,
}

/// The user `user add` registers.
fn new_user(address: &str, opts: &UserOpts, aliases: Vec<String>) -> anyhow::Result<User> {
    let mut u = User::new(address);
    let mut p = opts.patch()?;
    p.add_aliases = aliases;
    p.apply(&mut u);
    Ok(u)
}

/// The change `user set` makes (an empty one is an error).
fn change(
    opts: &UserOpts,
    add_aliases: Vec<String>,
    remove_aliases: Vec<String>,
) -> anyhow::Result<UserPatch> {
    let mut p = opts.patch()?;
    p.add_aliases = add_aliases;
    p.remove_aliases = remove_aliases;
    if p.is_empty() {
        bail!("nothing to change: give at least one option");
    }
    Ok(p)
}

fn list_opt(v: &[String]) -> Option<Vec<String>> {
    match v {
        [] => None,
        [one] if one.eq_ignore_ascii_case("none") => Some(Vec::new()),
        v => Some(v.to_vec()),
    }
}

impl UserOpts {
    fn patch(&self) -> anyhow::Result<UserPatch> {
        Ok(UserPatch {
            phone: self.phone.clone(),
            notify: self
                .notify
                .as_deref()
                .map(|s| parse_bool("notify", s))
                .transpose()?,
            licence_until: self.licence.as_deref().map(parse_licence).transpose()?,
            quiet: self
                .quiet
                .as_deref()
                .map(|s| {
                    if s.eq_ignore_ascii_case("none") || s.is_empty() {
                        Ok(None)
                    } else {
                        QuietHours::parse(s).map(Some)
                    }
                })
                .transpose()?,
            rate_limit_secs: self
                .rate_limit
                .as_deref()
                .map(|s| {
                    if s.eq_ignore_ascii_case("default") {
                        Ok(None)
                    } else {
                        s.trim()
                            .parse::<u32>()
                            .map(Some)
                            .map_err(|_| anyhow!("--rate-limit {s:?}: seconds or \"default\""))
                    }
                })
                .transpose()?,
            allow_senders: list_opt(&self.allow),
            deny_senders: list_opt(&self.deny),
            language: self.language.clone(),
            max_parts: self.max_parts,
            state: self.state.as_deref().map(str::parse).transpose()?,
            networks: self.networks.as_deref().map(Networks::parse).transpose()?,
            ..Default::default()
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum QueueCmd {
    /// Notices waiting for the agent.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Show the dead letters instead.
        #[arg(long, conflicts_with = "held")]
        dead: bool,
        /// Show the notices not queued yet instead: held by quiet hours or the rate limit, or
        /// awaiting Stalwart's delivery confirmation.
        #[arg(long)]
        held: bool,
    },
    /// Put dead letters back in the queue: a notice id, or "all".
    Retry { which: String },
    /// Delete dead letters: --all, or those dead longer than --older-than (e.g. "7d"). One
    /// of the two is required, so a bare `queue purge` deletes nothing.
    #[command(group(clap::ArgGroup::new("selection").required(true).args(["all", "older_than"])))]
    Purge {
        /// Delete every dead letter.
        #[arg(long)]
        all: bool,
        #[arg(long = "older-than")]
        older_than: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Only this registered user's records (the primary address; mail to an alias or a
    /// sub-address is filed under it).
    #[arg(long)]
    user: Option<String>,
    /// Only records about this notice.
    #[arg(long)]
    notice: Option<String>,
    /// From this time: "2026-11-22", RFC 3339, or relative "2h", "7d".
    #[arg(long)]
    since: Option<String>,
    /// Before this time (same forms as --since).
    #[arg(long)]
    until: Option<String>,
    /// Most records printed: the newest ones; stderr says how many older ones were left out.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

/// Where the commands go.
pub(crate) enum Target {
    Api {
        addr: SocketAddr,
        token: String,
        /// `link.agent_languages`, for the checks made before a call.
        languages: Vec<String>,
    },
    Local(Box<Config>),
}

const API_TIMEOUT: Duration = Duration::from_secs(60);

/// The daemon's admin API when it answers; else the stores, once [`ownership::check`] lets
/// this process open them.
///
/// [`ownership::check`]: crate::admin::ownership::check
pub(crate) async fn target(config: Option<&Path>) -> anyhow::Result<Target> {
    let t = reach(config).await?;
    if let Target::Local(cfg) = &t {
        crate::admin::ownership::check(&cfg.data_dir)?;
    }
    Ok(t)
}

/// Where the commands would go, without the ownership check (for `status`, which opens
/// nothing).
async fn reach(config: Option<&Path>) -> anyhow::Result<Target> {
    let cfg = Config::load(config)?;
    if let Some(addr) = cfg.admin_listen {
        if tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            return Ok(Target::Api {
                addr,
                token: cfg.admin_token.clone(),
                languages: cfg.link.agent_languages.clone(),
            });
        }
    }
    Ok(Target::Local(Box::new(cfg)))
}

/// One admin API call; the body of a 2xx answer. An error answer becomes its message: bad
/// input, an unknown user and a conflict read as they do without the daemon (the message is
/// the registry's own); other statuses are named.
async fn call(
    addr: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> anyhow::Result<String> {
    let auth = format!("Bearer {token}");
    let r = mailbell_link::http::request(addr, method, path, Some(&auth), body, API_TIMEOUT)
        .await
        .context("the running daemon's admin API")?;
    if !(200..300).contains(&r.status) {
        let msg = serde_json::from_str::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| r.body.trim().to_owned());
        if matches!(r.status, 400 | 404 | 409) {
            bail!("{msg}");
        }
        bail!("{msg} (HTTP {})", r.status);
    }
    Ok(r.body)
}

/// [`call`] with a JSON answer.
pub(crate) async fn api<T: DeserializeOwned>(
    addr: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> anyhow::Result<T> {
    let body = call(addr, token, method, path, body).await?;
    serde_json::from_str(&body).with_context(|| format!("unexpected answer: {body}"))
}

pub(crate) fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@+".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn open_users(cfg: &Config) -> anyhow::Result<UserStore> {
    std::fs::create_dir_all(&cfg.data_dir)?;
    Ok(UserStore::open(&cfg.users_path())?.with_languages(&cfg.link.agent_languages))
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A licence expiry as the operator wrote it: the day for an end-of-day expiry
/// (`2027-06-30`), else the UTC time; `never` for none.
fn licence_text(until: Option<i64>) -> String {
    let Some(ms) = until else {
        return "never".into();
    };
    let Some(t) = chrono::DateTime::from_timestamp_millis(ms) else {
        return ms.to_string();
    };
    if ms % 86_400_000 == 0 {
        if let Some(day) = chrono::DateTime::from_timestamp_millis(ms - 1) {
            return day.format("%Y-%m-%d").to_string();
        }
    }
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// The human lines of `mailbell user show`.
fn user_text(u: &User) -> String {
    let or = |s: &str, none: &str| {
        if s.is_empty() {
            none.to_owned()
        } else {
            s.to_owned()
        }
    };
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(", ")
        }
    };
    let rate = match u.rate_limit_secs {
        None => "daemon default".to_owned(),
        Some(0) => "none".to_owned(),
        Some(n) => format!("{n}s"),
    };
    let parts = match u.max_parts {
        0 => "agent default".to_owned(),
        n => n.to_string(),
    };
    format!(
        "address        {}\naliases        {}\nphone          {}\nnotify         {}\n\
         licence until  {}\nquiet hours    {}\nrate limit     {rate}\nlanguage       {}\n\
         max parts      {parts}\nallow senders  {}\ndeny senders   {}\nstate          {}\n\
         networks       {}",
        u.address,
        list(&u.aliases),
        or(&u.phone, "-"),
        if u.notify { "on" } else { "off" },
        licence_text(u.licence_until),
        u.quiet.map_or_else(|| "-".to_owned(), |q| q.to_string()),
        or(&u.language, "agent default"),
        list(&u.allow_senders),
        list(&u.deny_senders),
        u.state,
        u.networks,
    )
}

fn print_user(u: &User, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(u);
    }
    println!("{}", user_text(u));
    Ok(())
}

/// One line per user: address, phone, notify, licence, quiet hours, language.
fn print_page(page: &UserPage, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(page);
    }
    for u in &page.users {
        println!(
            "{}  {}  notify={}  licence={}  quiet={}  lang={}",
            u.address,
            if u.phone.is_empty() { "-" } else { &u.phone },
            if u.notify { "on" } else { "off" },
            licence_text(u.licence_until),
            u.quiet.map_or_else(|| "-".to_owned(), |q| q.to_string()),
            if u.language.is_empty() {
                "-"
            } else {
                &u.language
            },
        );
    }
    if let Some(next) = &page.next {
        println!("more: --after {next}");
    }
    Ok(())
}

/// `mailbell user …`: the same output and exit status whether the daemon runs (admin API)
/// or not (the registry opened here).
pub async fn user(config: Option<&Path>, cmd: UserCmd) -> anyhow::Result<()> {
    if let UserCmd::List { limit: 0, .. } = cmd {
        bail!("limit must be at least 1");
    }
    match target(config).await? {
        Target::Api {
            addr,
            token,
            languages,
        } => user_api(addr, &token, &languages, cmd).await,
        Target::Local(cfg) => tokio::task::spawn_blocking(move || user_local(&cfg, cmd)).await?,
    }
}

fn read_import(file: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("read {}", file.display()))
}

/// `--format`, or else json for a `*.json` file and csv for anything else.
fn import_format(file: &Path, format: Option<&str>) -> anyhow::Result<ExportFormat> {
    Ok(match format {
        Some(f) => f.parse()?,
        None if file
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json")) =>
        {
            ExportFormat::Json
        }
        None => ExportFormat::Csv,
    })
}

async fn user_api(
    addr: SocketAddr,
    token: &str,
    languages: &[String],
    cmd: UserCmd,
) -> anyhow::Result<()> {
    let path = |a: &str| format!("/admin/v1/users/{}", enc(a));
    match cmd {
        UserCmd::Add {
            address,
            opts,
            aliases,
        } => {
            // Checked here first, as the registry does without the daemon.
            let u = new_user(&address, &opts, aliases)?.validated_with(languages)?;
            let existing: anyhow::Result<User> =
                api(addr, token, "GET", &path(&u.address), None).await;
            // The API finds a user by address or alias: an alias names its owner, as the
            // registry does without the daemon.
            if let Ok(owner) = existing {
                return Err(if owner.address == u.address {
                    UserError::Exists { address: u.address }
                } else {
                    UserError::IsAlias {
                        alias: u.address,
                        owner: owner.address,
                    }
                }
                .into());
            }
            let body = serde_json::to_vec(&u)?;
            let u: User = api(
                addr,
                token,
                "PUT",
                &path(&u.address),
                Some(("application/json", &body)),
            )
            .await?;
            print_json(&u)
        }
        UserCmd::Set {
            address,
            opts,
            add_aliases,
            remove_aliases,
        } => {
            let p = change(&opts, add_aliases, remove_aliases)?;
            let body = serde_json::to_vec(&p)?;
            let u: User = api(
                addr,
                token,
                "PATCH",
                &path(&address),
                Some(("application/json", &body)),
            )
            .await?;
            print_json(&u)
        }
        UserCmd::Show { address, json } => {
            let u: User = api(addr, token, "GET", &path(&address), None).await?;
            print_user(&u, json)
        }
        UserCmd::List { after, limit, json } => {
            let mut q = format!("/admin/v1/users?limit={limit}");
            if let Some(a) = after {
                q.push_str(&format!("&after={}", enc(&a)));
            }
            let page: UserPage = api(addr, token, "GET", &q, None).await?;
            print_page(&page, json)
        }
        UserCmd::Export { format } => {
            // Pages of the list route (each well under the client's response cap), written
            // as the registry writes them without the daemon.
            let format: ExportFormat = format.parse()?;
            let accounts = crate::admin::billing_reports::api_accounts(addr, token).await?;
            let mut out = Exporter::new(format, std::io::stdout())?;
            let mut after: Option<String> = None;
            loop {
                let mut q = format!("/admin/v1/users?limit={MAX_LIST_LIMIT}");
                if let Some(a) = &after {
                    q.push_str(&format!("&after={}", enc(a)));
                }
                let page: UserPage = api(addr, token, "GET", &q, None).await?;
                for u in &page.users {
                    out.write_with(u, accounts.get(&u.address))?;
                }
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            out.finish()?;
            Ok(())
        }
        UserCmd::Remove { address } => {
            // 204, no body.
            call(addr, token, "DELETE", &path(&address), None).await?;
            println!("removed {}", address_key(&address));
            Ok(())
        }
        UserCmd::Import {
            file,
            format,
            mode,
            dry_run,
        } => {
            let mode: ImportMode = mode.parse()?;
            let format = import_format(&file, format.as_deref())?;
            let data = read_import(&file)?;
            let m = if mode == ImportMode::AddOnly {
                "add"
            } else {
                "upsert"
            };
            let (f, content_type) = match format {
                ExportFormat::Csv => ("csv", "text/csv"),
                ExportFormat::Json => ("json", "application/json"),
            };
            let r: ImportReport = api(
                addr,
                token,
                "POST",
                &format!("/admin/v1/users/import?mode={m}&format={f}&dry_run={dry_run}"),
                Some((content_type, &data)),
            )
            .await?;
            report(&r)
        }
    }
}

fn report(r: &ImportReport) -> anyhow::Result<()> {
    if r.dry_run {
        for (line, change) in &r.changes {
            println!("line {line}: would {change}");
        }
        print!("dry run, nothing written: would have ");
    }
    println!(
        "added {}, updated {}, skipped {}, failed {}, unchanged {}",
        r.added, r.updated, r.skipped, r.failed, r.unchanged
    );
    if r.ledger_accounts > 0 {
        println!("ledger accounts created or changed: {}", r.ledger_accounts);
    }
    for (line, msg) in &r.errors {
        eprintln!("line {line}: {msg}");
    }
    if r.failed > 0 {
        bail!("{} line(s) were not imported", r.failed);
    }
    Ok(())
}

fn user_local(cfg: &Config, cmd: UserCmd) -> anyhow::Result<()> {
    let users = open_users(cfg)?;
    let r = match cmd {
        UserCmd::Add {
            address,
            opts,
            aliases,
        } => print_json(&users.insert(new_user(&address, &opts, aliases)?)?),
        UserCmd::Set {
            address,
            opts,
            add_aliases,
            remove_aliases,
        } => print_json(&users.update(&address, &change(&opts, add_aliases, remove_aliases)?)?),
        UserCmd::Show { address, json } => match users.get(&address)? {
            Some(u) => print_user(&u, json),
            None => Err(UserError::NotFound {
                address: address_key(&address),
            }
            .into()),
        },
        UserCmd::List { after, limit, json } => {
            // The page the admin API answers.
            let limit = limit.min(MAX_LIST_LIMIT);
            let users = users.list(after.as_deref(), limit)?;
            let next = match users.last() {
                Some(last) if users.len() == limit => Some(last.address.clone()),
                _ => None,
            };
            print_page(&UserPage { users, next }, json)
        }
        UserCmd::Export { format } => {
            let format: ExportFormat = format.parse()?;
            // The ledger's fields, when there is a ledger (an export never creates one).
            let accounts = if cfg.ledger_path().exists() {
                accounts_of(&SqliteLedger::open_read_only(&cfg.ledger_path())?)?
            } else {
                Default::default()
            };
            users.export_with(format, std::io::stdout().lock(), &accounts)?;
            Ok(())
        }
        UserCmd::Remove { address } => {
            if !users.remove(&address)? {
                return Err(UserError::NotFound {
                    address: address_key(&address),
                }
                .into());
            }
            println!("removed {}", address_key(&address));
            Ok(())
        }
        UserCmd::Import {
            file,
            format,
            mode,
            dry_run,
        } => {
            let mode = mode.parse()?;
            let format = import_format(&file, format.as_deref())?;
            let data = read_import(&file)?;
            let (mut r, accounts) =
                users.import_with_accounts(format, &data[..], ImportOptions { mode, dry_run })?;
            if !dry_run && !accounts.is_empty() {
                let mut ledger = SqliteLedger::open(&cfg.ledger_path())?;
                r.ledger_accounts =
                    apply_accounts(&mut ledger, &accounts, &cfg.billing.default_class)?;
            }
            report(&r)
        }
    };
    users.flush()?;
    r
}

fn print_entries(items: &[QueueEntry]) {
    if items.is_empty() {
        println!("(empty)");
    }
    for e in items {
        let when =
            chrono::DateTime::from_timestamp_millis(e.dead_at_ms.unwrap_or(e.enqueued_at_ms))
                .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_default();
        println!(
            "{} {when} {} to={} phone={} count={} attempts={} {}{}",
            e.id,
            if e.kind.is_empty() { "?" } else { &e.kind },
            e.recipient,
            e.phone,
            e.count,
            e.attempts,
            e.subject,
            if e.reason.is_empty() {
                String::new()
            } else {
                format!(" [{}]", e.reason)
            }
        );
    }
}

fn print_pending(items: &[PendingNotice]) {
    if items.is_empty() {
        println!("(empty)");
    }
    for p in items {
        let when = chrono::DateTime::from_timestamp_millis(p.received_at_ms)
            .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_default();
        println!(
            "{} {when} user={} to={} from={} [{}] {}",
            p.id, p.user, p.recipient, p.from, p.state, p.subject
        );
    }
}

fn open_outbox(cfg: &Config) -> anyhow::Result<Outbox> {
    std::fs::create_dir_all(&cfg.data_dir)?;
    Ok(Outbox::open(
        &cfg.outbox_path(),
        OutboxConfig {
            max_depth: cfg.outbox_max_depth,
            max_age: cfg.outbox_max_age,
            ..Default::default()
        },
    )?)
}

/// `mailbell queue …`
pub async fn queue(config: Option<&Path>, cmd: QueueCmd) -> anyhow::Result<()> {
    match target(config).await? {
        Target::Api { addr, token, .. } => match cmd {
            QueueCmd::List {
                limit, held: true, ..
            } => {
                let items: Vec<PendingNotice> = api(
                    addr,
                    &token,
                    "GET",
                    &format!("/admin/v1/queue/held?limit={limit}"),
                    None,
                )
                .await?;
                print_pending(&items);
                Ok(())
            }
            QueueCmd::List { limit, dead, .. } => {
                let p = if dead {
                    "/admin/v1/queue/dead"
                } else {
                    "/admin/v1/queue"
                };
                let items: Vec<QueueEntry> =
                    api(addr, &token, "GET", &format!("{p}?limit={limit}"), None).await?;
                print_entries(&items);
                Ok(())
            }
            QueueCmd::Retry { which } => {
                parse_select(&which).map_err(anyhow::Error::msg)?;
                let r: CountReply = api(
                    addr,
                    &token,
                    "POST",
                    &format!("/admin/v1/queue/retry?id={}", enc(&which)),
                    None,
                )
                .await?;
                println!("{} dead letter(s) queued again", r.count);
                Ok(())
            }
            QueueCmd::Purge { older_than, .. } => {
                let q = older_than
                    .map(|o| format!("?older_than={}", enc(&o)))
                    .unwrap_or_default();
                let r: CountReply = api(
                    addr,
                    &token,
                    "POST",
                    &format!("/admin/v1/queue/purge{q}"),
                    None,
                )
                .await?;
                println!("{} dead letter(s) deleted", r.count);
                Ok(())
            }
        },
        Target::Local(cfg) => {
            tokio::task::spawn_blocking(move || {
                let ob = open_outbox(&cfg)?;
                let r = match cmd {
                    QueueCmd::List {
                        limit, held: true, ..
                    } => {
                        print_pending(&pending_notices(&ob.staged()?, limit));
                        Ok(())
                    }
                    QueueCmd::List { limit, dead, .. } => {
                        let items: Vec<QueueEntry> = if dead {
                            ob.dead_letters(limit)?
                                .iter()
                                .map(QueueEntry::from)
                                .collect()
                        } else {
                            ob.list(limit)?.iter().map(QueueEntry::from).collect()
                        };
                        print_entries(&items);
                        Ok(())
                    }
                    QueueCmd::Retry { which } => {
                        let n = ob.retry_dead(parse_select(&which).map_err(anyhow::Error::msg)?)?;
                        println!("{n} dead letter(s) queued again");
                        Ok(())
                    }
                    QueueCmd::Purge { older_than, .. } => {
                        let d = match older_than {
                            Some(o) => mailbell_link::units::parse_duration(&o)
                                .map_err(anyhow::Error::msg)?,
                            None => Duration::ZERO,
                        };
                        println!("{} dead letter(s) deleted", ob.purge_dead(d)?);
                        Ok(())
                    }
                };
                ob.close();
                r
            })
            .await?
        }
    }
}

/// `mailbell log …`
pub async fn log(config: Option<&Path>, a: LogArgs) -> anyhow::Result<()> {
    let page: AuditPage = match target(config).await? {
        Target::Api { addr, token, .. } => {
            let mut q = format!("/admin/v1/log/page?limit={}", a.limit);
            for (k, v) in [
                ("user", &a.user),
                ("notice", &a.notice),
                ("since", &a.since),
                ("until", &a.until),
            ] {
                if let Some(v) = v {
                    q.push_str(&format!("&{k}={}", enc(v)));
                }
            }
            api(addr, &token, "GET", &q, None).await?
        }
        Target::Local(cfg) => {
            let now = chrono::Utc::now().timestamp_millis();
            let query = AuditQuery {
                user: a.user.clone(),
                notice: a.notice.clone(),
                since_ms: a
                    .since
                    .as_deref()
                    .map(|s| parse_since(s, now))
                    .transpose()?,
                until_ms: a
                    .until
                    .as_deref()
                    .map(|s| parse_since(s, now))
                    .transpose()?,
                limit: a.limit,
            };
            tokio::task::spawn_blocking(move || -> anyhow::Result<AuditPage> {
                std::fs::create_dir_all(&cfg.data_dir)?;
                let log = AuditLog::open(&cfg.audit_path(), cfg.audit.clone())?;
                Ok(log.query_page(&query)?)
            })
            .await??
        }
    };
    for r in &page.records {
        if a.json {
            println!("{}", serde_json::to_string(r)?);
        } else {
            println!("{}", format_record(r));
        }
    }
    if let Some(note) = left_out_note(&page) {
        eprintln!("{note}");
    }
    Ok(())
}

/// What `mailbell log` says on stderr when it printed only the newest records.
fn left_out_note(page: &AuditPage) -> Option<String> {
    if page.omitted == 0 {
        return None;
    }
    let at_least = if page.omitted_exact { "" } else { "at least " };
    let mut note = format!(
        "mailbell log: printed the newest {} matching record(s); {at_least}{} older one(s) left out.",
        page.records.len(),
        page.omitted
    );
    match page
        .records
        .first()
        .and_then(|r| chrono::DateTime::from_timestamp_millis(r.at_ms + 1))
    {
        Some(t) => note.push_str(&format!(
            " Older ones: add --until {} (the oldest printed millisecond is printed again), \
             narrow with --since, or raise --limit (at most {}).",
            t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            crate::audit::MAX_QUERY_LIMIT
        )),
        None => note.push_str(&format!(
            " Raise --limit (at most {}) or narrow with --since/--until.",
            crate::audit::MAX_QUERY_LIMIT
        )),
    }
    Some(note)
}

/// `mailbell status`: the configuration file and data directory in use, then the running
/// daemon's counters.
pub async fn status(config: Option<&Path>) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    println!(
        "config: {}",
        config.map_or_else(|| "(built-in defaults)".into(), |p| p.display().to_string())
    );
    let data_dir = std::path::absolute(&cfg.data_dir).unwrap_or_else(|_| cfg.data_dir.clone());
    println!("data_dir: {}", data_dir.display());
    match reach(config).await? {
        Target::Api { addr, .. } => {
            let r = mailbell_link::http::request(addr, "GET", "/status", None, None, API_TIMEOUT)
                .await?;
            println!("{}", r.body.trim());
            Ok(())
        }
        Target::Local(_) => bail!("mailbell is not running (its admin API does not answer)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Q {
        #[command(subcommand)]
        cmd: QueueCmd,
    }

    #[test]
    fn user_text_shows_quiet_hours_and_licence_date() {
        let mut u = User::new("a@example.com");
        u.quiet = Some(crate::users::QuietHours::parse("22:00-07:00").unwrap());
        u.licence_until = crate::users::parse_licence("2027-06-30").unwrap();
        let t = user_text(&u);
        assert!(t.contains("quiet hours    22:00-07:00"), "{t}");
        assert!(t.contains("licence until  2027-06-30"), "{t}");
        assert!(
            t.contains("state          normal\nnetworks       any"),
            "{t}"
        );
        assert_eq!(licence_text(None), "never");
    }

    #[test]
    fn queue_purge_needs_a_selection() {
        assert!(Q::try_parse_from(["q", "purge"]).is_err());
        assert!(matches!(
            Q::try_parse_from(["q", "purge", "--all"]).unwrap().cmd,
            QueueCmd::Purge {
                all: true,
                older_than: None
            }
        ));
        assert!(matches!(
            Q::try_parse_from(["q", "purge", "--older-than", "7d"])
                .unwrap()
                .cmd,
            QueueCmd::Purge {
                all: false,
                older_than: Some(_)
            }
        ));
        assert!(Q::try_parse_from(["q", "purge", "--all", "--older-than", "7d"]).is_err());
    }
}
