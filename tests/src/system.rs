//! The whole system in one process: a GSM agent on a simulated modem and the mail side
//! (`mailbell serve`) linked to it over the real mutual-TLS link, with one dev PKI shared by
//! both. Used by the demo (the README's first command), the end-to-end benchmark and tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use mailbell_gsm_agent::config::LinkTls as AgentTls;
use mailbell_gsm_agent::modem::pdu::decode_submit;
use mailbell_gsm_agent::sim::ReceivedPdu;
use tokio_util::sync::CancellationToken;

/// Both daemons, running.
pub struct System {
    pub agent: mailbell_gsm_agent::app::Running,
    pub mail: mailbell::app::Running,
    pub mail_config: mailbell::config::Config,
    pub dir: PathBuf,
}

/// Webhook signing key the system is configured with.
pub const WEBHOOK_KEY: &str = "demo-webhook-key";
/// Admin token the system is configured with.
pub const ADMIN_TOKEN: &str = "demo-admin-token";

/// The mail side's configuration in `dir`: every listener on an ephemeral loopback port, the
/// admin token and webhook key above, the dev PKI in `dir/pki`.
pub fn mail_config(dir: &Path) -> anyhow::Result<mailbell::config::Config> {
    Ok(mailbell::config::Config::from_toml(
        &format!(
            "[mailbell]\ndata_dir = {:?}\n[listen]\nhttp = \"127.0.0.1:0\"\nmilter = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [admin]\ntoken = \"{ADMIN_TOKEN}\"\n[stalwart]\nsignature_key = \"{WEBHOOK_KEY}\"\n\
             [link]\ndev_pki_dir = {:?}\n",
            dir.join("mail"),
            dir.join("pki")
        ),
        "(system)",
    )?)
}

/// Starts the agent (simulated modem) and the mail side in `dir`, every listener on an
/// ephemeral loopback port. `tweak` may change either configuration before start.
pub async fn start(
    dir: &Path,
    tweak: impl FnOnce(&mut mailbell::config::Config, &mut mailbell_gsm_agent::config::Config),
) -> anyhow::Result<System> {
    start_via(dir, tweak, |agent| agent).await
}

/// [`start`], with the mail side's link pointed at `via(agent's link address)` (a relay, say).
pub async fn start_via(
    dir: &Path,
    tweak: impl FnOnce(&mut mailbell::config::Config, &mut mailbell_gsm_agent::config::Config),
    via: impl FnOnce(std::net::SocketAddr) -> std::net::SocketAddr,
) -> anyhow::Result<System> {
    let pki = dir.join("pki");
    let mut agent_cfg = mailbell_gsm_agent::config::Config::from_toml("", "(defaults)")?;
    // The whole system on one machine: the agent on its simulated modem, asked for.
    agent_cfg.simulator.enable = true;
    agent_cfg.data_dir = dir.join("agent");
    agent_cfg.link.listen = "127.0.0.1:0".parse()?;
    agent_cfg.metrics_listen = Some("127.0.0.1:0".parse()?);
    if let AgentTls::DevPki { dir: d, .. } = &mut agent_cfg.link.tls {
        *d = pki.clone();
    }
    let mut mail_cfg = mail_config(dir)?;
    tweak(&mut mail_cfg, &mut agent_cfg);
    let agent = mailbell_gsm_agent::app::start(agent_cfg)
        .await
        .context("start the agent")?;
    let link_addr = via(agent.link_addr);
    for a in &mut mail_cfg.link.agents {
        a.addr = link_addr.to_string();
    }
    let mail = mailbell::app::start(mail_cfg.clone(), CancellationToken::new())
        .await
        .context("start the mail side")?;
    Ok(System {
        agent,
        mail,
        mail_config: mail_cfg,
        dir: dir.to_path_buf(),
    })
}

impl System {
    /// Writes `DIR/mailbell.toml`, a configuration for the admin CLI that names the running
    /// mail side's data directory, admin address and token (absolute paths), so that
    /// `mailbell --config DIR/mailbell.toml user list` reaches it. Returns the path.
    pub fn write_cli_config(&self) -> anyhow::Result<PathBuf> {
        let admin = self
            .mail
            .admin_addr
            .context("the mail side has no admin listener")?;
        let dir = std::path::absolute(&self.dir)?;
        let path = dir.join("mailbell.toml");
        let text = format!(
            "# Written by the demo for `mailbell --config {} ...` while it runs.\n\
             [mailbell]\ndata_dir = {:?}\n[listen]\nadmin = \"{admin}\"\n\
             [admin]\ntoken = \"{ADMIN_TOKEN}\"\n[link]\ndev_pki_dir = {:?}\n",
            path.display(),
            dir.join("mail"),
            dir.join("pki")
        );
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    /// PDUs the simulated modem has accepted so far.
    pub fn pdus(&self) -> Vec<ReceivedPdu> {
        self.agent
            .sim
            .as_ref()
            .map(|s| s.received())
            .unwrap_or_default()
    }

    /// How many PDUs the simulated modem has accepted since start. Unlike `pdus().len()`
    /// this goes on counting past the newest 1,000 the agent's simulator keeps.
    pub fn pdu_count(&self) -> usize {
        self.agent
            .sim
            .as_ref()
            .map_or(0, |s| usize::try_from(s.accepted()).unwrap_or(usize::MAX))
    }

    /// Waits until the modem has accepted more than `before` PDUs (a [`System::pdu_count`]);
    /// returns the new ones it still holds.
    pub async fn wait_pdus(
        &self,
        before: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<ReceivedPdu>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let count = self.pdu_count();
            if count > before {
                let got = self.pdus();
                let new = (count - before).min(got.len());
                return Ok(got[got.len() - new..].to_vec());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the simulated modem received nothing within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every modem of the agent reports ready (the simulated one takes about a
    /// second to register).
    pub async fn wait_modems_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let addr = self
            .agent
            .metrics_addr
            .context("agent without metrics endpoint")?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let m = mailbell_gsm_agent::app::http_get(addr, "/metrics").await?;
            let ups: Vec<&str> = m
                .lines()
                .filter(|l| l.starts_with("mailbell_modem_up{"))
                .collect();
            if !ups.is_empty() && ups.iter().all(|l| l.ends_with(" 1")) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("modems not ready within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Posts a Stalwart MTA-hook request body; returns the HTTP status and the answer.
    pub async fn hook(&self, body: &str) -> anyhow::Result<(u16, String)> {
        let addr = self.mail.http_addr.context("no Stalwart endpoint")?;
        let r = mailbell_link::http::request(
            addr,
            "POST",
            &self.mail_config.stalwart.hook_path,
            None,
            Some(("application/json", body.as_bytes())),
            Duration::from_secs(30),
        )
        .await?;
        Ok((r.status, r.body))
    }

    /// Posts a webhook batch signed like Stalwart does.
    pub async fn webhook(&self, body: &str) -> anyhow::Result<(u16, String)> {
        let addr = self.mail.http_addr.context("no Stalwart endpoint")?;
        post_webhook(addr, &self.mail_config.stalwart.webhook_path, body).await
    }

    pub async fn stop(self) {
        self.mail.stop().await;
        self.agent.stop().await;
    }
}

/// base64(HMAC-SHA256(key, body)), as Stalwart's X-Signature.
pub fn sign(key: &str, body: &[u8]) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ring::hmac::sign(&k, body).as_ref())
}

/// Posts a webhook batch to `addr` signed with [`WEBHOOK_KEY`]; returns status and answer.
pub async fn post_webhook(
    addr: std::net::SocketAddr,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let r = signed_post(addr, path, body, &sign(WEBHOOK_KEY, body.as_bytes())).await?;
    Ok((r.status, r.body))
}

async fn signed_post(
    addr: std::net::SocketAddr,
    path: &str,
    body: &str,
    sig: &str,
) -> anyhow::Result<mailbell_link::http::Response> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nX-Signature: {sig}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        s.take(1 << 20).read_to_end(&mut buf),
    )
    .await??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("malformed HTTP status")?;
    Ok(mailbell_link::http::Response {
        status,
        body: body.to_string(),
    })
}

/// A Stalwart data-stage MTA-hook request, shaped like the captured ones.
pub fn hook_data_request(
    queue_id: u64,
    from: &str,
    rcpts: &[&str],
    headers: &[(&str, &str)],
    body: &str,
) -> String {
    let to: Vec<serde_json::Value> = rcpts
        .iter()
        .map(|r| serde_json::json!({ "address": r }))
        .collect();
    let hdrs: Vec<serde_json::Value> = headers
        .iter()
        .map(|(n, v)| serde_json::json!([n, format!(" {v}\r\n")]))
        .collect();
    let size = headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 4)
        .sum::<usize>()
        + 2
        + body.len();
    serde_json::json!({
        "context": {
            "stage": "data",
            "client": {"ip": "203.0.113.9", "port": 40000, "ptr": null, "helo": "mx.remote.example", "activeConnections": 1},
            "server": {"name": "Stalwart v0.16.0", "port": 25, "ip": "127.0.0.1"},
            "queue": {"id": format!("{queue_id:x}")},
            "protocol": {"version": 1}
        },
        "envelope": {"from": {"address": from}, "to": to},
        "message": {"headers": hdrs, "contents": body, "size": size}
    })
    .to_string()
}

/// A webhook batch with one `message-ingest.ham` event.
pub fn ham_batch(queue_id: u64, account_id: u64) -> String {
    serde_json::json!({"events": [{
        "id": "1795357815506",
        "createdAt": "2026-11-22T10:00:00Z",
        "type": "message-ingest.ham",
        "data": {
            "spanId": 1, "accountId": account_id, "documentId": 1, "mailboxId": [0],
            "messageId": "demo@remote.example", "size": 400, "queueId": queue_id,
            "queueName": "local", "from": "sender@remote.example", "to": ["alice@example.com"]
        }
    }]})
    .to_string()
}

/// Decodes a PDU the modem received into (destination, text).
pub fn decode(p: &ReceivedPdu) -> anyhow::Result<(String, String)> {
    let d = decode_submit(&p.hex)?;
    Ok((d.destination, d.text))
}
