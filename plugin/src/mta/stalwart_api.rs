//! Which addresses belong to a Stalwart account id.
//!
//! Stalwart's `message-ingest.*` webhook events name the mailbox owner only by number
//! (`accountId`), and list every recipient of the delivery attempt, not the one delivered to.
//! To release exactly that user's notice, mailbell asks Stalwart's management API
//! (`GET /api/principal?types=individual&fields=name,emails`, research §2.3) for the account
//! list and keeps it in memory. The scheduler's lookup never waits: a miss returns `None`
//! (the confirmation then applies to every waiting recipient of that message) and wakes a
//! background refresh, rate-limited to one every [`MIN_REFRESH`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::config::StalwartApi;
use crate::notify::intake::AccountResolver;

/// Shortest interval between two refreshes.
pub const MIN_REFRESH: Duration = Duration::from_secs(10);
/// The list is refreshed at least this often.
pub const MAX_AGE: Duration = Duration::from_secs(300);
const PAGE: usize = 1000;
/// Accounts kept at most (a bound, not a realistic size).
const MAX_ACCOUNTS: usize = 1_000_000;

#[derive(Deserialize)]
struct ListReply {
    data: ListData,
}

#[derive(Deserialize)]
struct ListData {
    #[serde(default)]
    items: Vec<Principal>,
    #[serde(default)]
    total: u64,
}

#[derive(Deserialize)]
struct Principal {
    id: Option<u64>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    emails: OneOrMany,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

/// Account id and its addresses.
type Account = (u64, Vec<String>);

/// Parses one page of the principal list into accounts and the total count.
fn parse_page(body: &str) -> Result<(Vec<Account>, u64), String> {
    let r: ListReply =
        serde_json::from_str(body).map_err(|e| format!("unexpected principal list: {e}"))?;
    let items = r
        .data
        .items
        .into_iter()
        .filter_map(|p| {
            let id = p.id?;
            let mut addrs = match p.emails {
                OneOrMany::None => Vec::new(),
                OneOrMany::One(a) => vec![a],
                OneOrMany::Many(v) => v,
            };
            if addrs.is_empty() && p.name.contains('@') {
                addrs.push(p.name);
            }
            Some((id, addrs))
        })
        .collect();
    Ok((items, r.data.total))
}

/// Splits "http://host:port" into a socket address (plain HTTP on a trusted network only).
fn api_addr(url: &str) -> Result<SocketAddr, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!(
            "stalwart_api.url {url:?}: only http:// on loopback or a private network is supported"
        )
    })?;
    let host = rest.trim_end_matches('/');
    use std::net::ToSocketAddrs;
    host.to_socket_addrs()
        .map_err(|e| format!("stalwart_api.url {url:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("stalwart_api.url {url:?} resolves to nothing"))
}

struct Map {
    accounts: RwLock<HashMap<u64, Vec<String>>>,
    wake: Notify,
}

async fn fetch_all(addr: SocketAddr, auth: &str) -> Result<HashMap<u64, Vec<String>>, String> {
    let mut out = HashMap::new();
    for page in 1.. {
        let path =
            format!("/api/principal?types=individual&fields=name,emails&page={page}&limit={PAGE}");
        let r = mailbell_link::http::request(
            addr,
            "GET",
            &path,
            Some(auth),
            None,
            Duration::from_secs(10),
        )
        .await
        .map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(format!(
                "Stalwart API answered {}: {}",
                r.status,
                r.body.trim()
            ));
        }
        let (items, total) = parse_page(&r.body)?;
        let n = items.len();
        out.extend(items);
        if n < PAGE || out.len() as u64 >= total || out.len() >= MAX_ACCOUNTS {
            break;
        }
    }
    Ok(out)
}

/// The resolver for the configured API, or `None` when no API is configured. Must be called
/// inside a tokio runtime (it spawns the refresher).
pub fn resolver(cfg: &StalwartApi) -> anyhow::Result<Option<AccountResolver>> {
    if cfg.url.trim().is_empty() {
        return Ok(None);
    }
    let addr = api_addr(cfg.url.trim()).map_err(anyhow::Error::msg)?;
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", cfg.user, cfg.secret))
    );
    let map = Arc::new(Map {
        accounts: RwLock::new(HashMap::new()),
        wake: Notify::new(),
    });
    let m = map.clone();
    tokio::spawn(async move {
        let mut last: Option<Instant> = None;
        loop {
            if let Some(t) = last {
                let wait = MIN_REFRESH.saturating_sub(t.elapsed());
                tokio::time::sleep(wait).await;
                tokio::select! {
                    _ = m.wake.notified() => {}
                    _ = tokio::time::sleep(MAX_AGE) => {}
                }
            }
            last = Some(Instant::now());
            match fetch_all(addr, &auth).await {
                Ok(accounts) => {
                    info!(accounts = accounts.len(), "Stalwart account list loaded");
                    *m.accounts
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = accounts;
                }
                Err(e) => {
                    warn!(error = %e, "cannot read Stalwart's account list; confirmations apply per message until it works")
                }
            }
            if Arc::strong_count(&m) == 1 {
                break; // the resolver is gone
            }
        }
    });
    let r: AccountResolver = Arc::new(move |id| {
        let hit = map
            .accounts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .cloned();
        if hit.is_none() {
            debug!(
                account_id = id,
                "unknown Stalwart account; refreshing the list"
            );
            map.wake.notify_one();
        }
        hit
    });
    Ok(Some(r))
}

/// Stalwart permissions withheld from an account in arrears, as a second line of defence
/// behind the retrieval proxy (research §5.2): a client that reaches Stalwart directly can
/// still log in and list, but not read a message.
pub const ARREARS_PERMISSIONS: &[&str] = &["pop3-retr", "imap-fetch"];

/// Sets and clears [`ARREARS_PERMISSIONS`] in a principal's `disabledPermissions` through
/// the management API (`PATCH /api/principal/{name}`, one `addItem`/`removeItem` per value).
pub struct Permissions {
    addr: SocketAddr,
    auth: String,
}

const API_TIMEOUT: Duration = Duration::from_secs(10);

impl Permissions {
    /// `None` when no API is configured.
    pub fn new(cfg: &StalwartApi) -> Result<Option<Self>, String> {
        if cfg.url.trim().is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            addr: api_addr(cfg.url.trim())?,
            auth: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", cfg.user, cfg.secret))
            ),
        }))
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<serde_json::Value, String> {
        let r = mailbell_link::http::request(
            self.addr,
            method,
            path,
            Some(&self.auth),
            body.map(|b| ("application/json", b.as_bytes())),
            API_TIMEOUT,
        )
        .await
        .map_err(|e| format!("Stalwart API {method} {path}: {e}"))?;
        let v: serde_json::Value = serde_json::from_str(&r.body).map_err(|_| {
            format!(
                "Stalwart API {method} {path}: HTTP {} {}",
                r.status,
                r.body.trim()
            )
        })?;
        if r.status != 200 || v.get("error").is_some() {
            return Err(format!(
                "Stalwart API {method} {path}: HTTP {} {}",
                r.status,
                r.body.trim()
            ));
        }
        Ok(v)
    }

    /// The principal whose name or addresses are `email`, with its disabled permissions.
    async fn principal(&self, email: &str) -> Result<(String, Vec<String>), String> {
        let q = format!(
            "/api/principal?types=individual&fields=name,emails,disabledPermissions&limit=50&filter={}",
            url_encode(email)
        );
        let v = self.call("GET", &q, None).await?;
        let items = v["data"]["items"].as_array().cloned().unwrap_or_default();
        let strings = |x: &serde_json::Value| -> Vec<String> {
            match x {
                serde_json::Value::String(s) => vec![s.clone()],
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect(),
                _ => Vec::new(),
            }
        };
        for it in items {
            let name = it["name"].as_str().unwrap_or_default().to_owned();
            let emails = strings(&it["emails"]);
            if name.eq_ignore_ascii_case(email)
                || emails.iter().any(|e| e.eq_ignore_ascii_case(email))
            {
                return Ok((name, strings(&it["disabledPermissions"])));
            }
        }
        Err(format!("Stalwart has no account with the address {email}"))
    }

    /// Withholds (`arrears`) or gives back the read permissions of the account `email`.
    /// Only what differs is changed; returns how many permissions changed.
    pub async fn set_arrears(&self, email: &str, arrears: bool) -> Result<usize, String> {
        let (name, disabled) = self.principal(email).await?;
        let ops: Vec<serde_json::Value> = ARREARS_PERMISSIONS
            .iter()
            .filter(|p| disabled.iter().any(|d| d == *p) != arrears)
            .map(|p| {
                serde_json::json!({
                    "action": if arrears { "addItem" } else { "removeItem" },
                    "field": "disabledPermissions",
                    "value": p,
                })
            })
            .collect();
        if ops.is_empty() {
            return Ok(0);
        }
        let body = serde_json::Value::Array(ops.clone()).to_string();
        self.call(
            "PATCH",
            &format!("/api/principal/{}", url_encode(&name)),
            Some(&body),
        )
        .await?;
        Ok(ops.len())
    }
}

fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn principal_pages_as_stalwart_answers_them() {
        let body = r#"{"data":{"items":[
            {"id":2,"type":"individual","name":"alice","emails":["alice@test.local","a@test.local"]},
            {"id":3,"type":"individual","name":"bob","emails":"bob@test.local"},
            {"id":4,"type":"individual","name":"carol@test.local"},
            {"type":"individual","name":"noid"}],"total":4}}"#;
        let (items, total) = parse_page(body).unwrap();
        assert_eq!(total, 4);
        assert_eq!(
            items,
            vec![
                (2, vec!["alice@test.local".into(), "a@test.local".into()]),
                (3, vec!["bob@test.local".into()]),
                (4, vec!["carol@test.local".into()]),
            ]
        );
        assert!(parse_page(r#"{"error":"forbidden"}"#).is_err());
    }

    #[test]
    fn only_plain_http_urls() {
        assert_eq!(
            api_addr("http://127.0.0.1:8080/").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert!(api_addr("https://mail.example:443").is_err());
        assert!(api_addr("127.0.0.1:8080").is_err());
    }
}
