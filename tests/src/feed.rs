//! A link client that feeds an in-process agent from an in-memory outbox: what the agent
//! benchmarks push their notices through (the real mutual-TLS link, no mail side).

use std::sync::Arc;
use std::time::Duration;

use mailbell_link::memory::MemoryOutbox;
use mailbell_link::net::{self, ClientSettings, ClientStats, Endpoint};
use mailbell_link::sender::SenderConfig;
use mailbell_link::tls::{self, ClientTlsFiles};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The running client: push notices into `outbox`; [`LinkFeed::stop`] ends it.
pub struct LinkFeed {
    pub outbox: Arc<MemoryOutbox>,
    stop: CancellationToken,
    client: JoinHandle<()>,
}

impl LinkFeed {
    /// Connects to the agent at `addr` (certificate name `localhost`) with `files`, with short
    /// timeouts and backoff, as a benchmark wants.
    pub fn start(addr: &str, files: &ClientTlsFiles) -> anyhow::Result<LinkFeed> {
        let outbox = MemoryOutbox::new();
        let stop = CancellationToken::new();
        let settings = ClientSettings {
            agents: vec![Endpoint {
                addr: addr.to_owned(),
                server_name: "localhost".into(),
            }],
            tls: tls::client_config(files)?,
            sender: SenderConfig::default(),
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(500),
        };
        let client = tokio::spawn(net::run_client(
            settings,
            outbox.clone(),
            stop.clone(),
            Arc::new(ClientStats::default()),
        ));
        Ok(LinkFeed {
            outbox,
            stop,
            client,
        })
    }

    /// Stops the client and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.client.await;
    }
}
