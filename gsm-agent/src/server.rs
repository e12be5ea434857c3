//! The link listener setup: TLS material (operator files or a dev PKI), the bound socket and
//! the server settings; `app` runs `mailbell_link::net::serve` with them into the inbox.

use std::sync::Arc;

use mailbell_link::net::{ServerSettings, UnprovenLimits};
use mailbell_link::pki::{ensure_dev_pki, DevPkiPaths, PkiError};
use mailbell_link::tls::{self, ServerTlsFiles, TlsError};
use tokio::net::TcpListener;

use crate::config::{LinkConfig, LinkTls};

/// Listener setup errors; each cause is the `source()`, not repeated in `Display`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("dev PKI")]
    Pki(#[from] PkiError),
    #[error("link TLS")]
    Tls(#[from] TlsError),
    #[error("bind link listener on {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// The server-side TLS files, creating the dev PKI first when configured.
pub fn resolve_tls(cfg: &LinkConfig) -> Result<(ServerTlsFiles, Option<DevPkiPaths>), ServerError> {
    match &cfg.tls {
        LinkTls::Files { ca, cert, key } => Ok((
            ServerTlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                allowed_client_names: cfg.allowed_clients.clone(),
            },
            None,
        )),
        LinkTls::DevPki { dir, names } => {
            let paths = ensure_dev_pki(dir, names, "mailhost", false)?;
            Ok((paths.server_files(cfg.allowed_clients.clone()), Some(paths)))
        }
    }
}

/// Binds the listener (so the caller learns the address before serving).
pub async fn bind(cfg: &LinkConfig) -> Result<TcpListener, ServerError> {
    TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })
}

/// Builds the server settings.
pub fn settings(
    cfg: &LinkConfig,
    files: &ServerTlsFiles,
) -> Result<Arc<ServerSettings>, ServerError> {
    Ok(Arc::new(ServerSettings {
        tls: tls::server_config(files)?,
        allowed_client_names: cfg.allowed_clients.clone(),
        receiver: cfg.receiver.clone(),
        handshake_timeout: cfg.handshake_timeout,
        io_timeout: cfg.io_timeout,
        max_sessions: cfg.max_sessions,
        unproven: UnprovenLimits {
            max_handshakes: cfg.max_handshakes,
            max_per_source: cfg.max_handshakes_per_source,
            tls_timeout: cfg.tls_handshake_timeout,
            session_wait: cfg.session_wait,
        },
    }))
}
