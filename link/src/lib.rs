//! The mailbell link: an acknowledged, mutually authenticated stream of notices (mail
//! arrivals, billing notices) from the mail host (sender) to the GSM agent (receiver).
//!
//! Layout:
//! - [`id`] and [`notification`]: the item carried (its kind, tag 12), with its stable 128-bit
//!   id.
//! - [`frame`]: the sans-I/O wire codec (length-prefixed, versioned frames, size-capped).
//! - [`sender`] and [`receiver`]: sans-I/O state machines for the window, acks, nacks,
//!   resends and de-duplication. They take time as an argument and do no I/O.
//! - [`tls`] and [`pki`]: rustls mutual-TLS configuration and a dev PKI generator (rcgen).
//! - [`net`]: the thin tokio shell that runs the state machines over a TLS stream.
//! - [`listen`]: accepting under caps: slots before accept, eviction of unproven peers,
//!   per-source caps, accept errors retried with a pause (shared by both daemons).
//! - [`http_server`]: the hardened HTTP/1 server behind every HTTP listener (timeouts for
//!   headers, idle keep-alive, bodies and writes; connection caps through [`listen`]).
//! - [`metrics`]: `/metrics` of both daemons: the `prometheus-client` registry, encoder and
//!   the helpers the collectors of each stats source use.
//! - [`memory`]: an in-memory outbox for one-off sends and tests.
//! - [`units`], [`logging`] and [`systemd`]: what both daemons share around the link: reading
//!   config files, durations, the log subscriber (`--log-json`, `RUST_LOG`, `NO_COLOR`), and
//!   the readiness notification for `Type=notify` units.
//!
//! The wire format is documented in docs/protocol.md.
//!
//! Logging: `warn` for a peer that breaks the protocol or fails authentication, `info` for
//! session start/end, `debug` for per-frame detail.

pub mod durable;
pub mod frame;
pub mod heartbeat;
pub mod http;
pub mod http_server;
pub mod id;
pub mod listen;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod notification;
pub mod paths;
pub mod phone;
pub mod pki;
pub mod receiver;
pub mod sender;
pub mod systemd;
pub mod tls;
pub mod units;

pub use frame::{Frame, NackClass};
pub use id::NotifId;
pub use notification::Notification;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
