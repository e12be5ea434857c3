//! mailbell GSM agent: runs on the host with the GSM modems, receives arrival notices from the
//! mail host over the mutual-TLS link, keeps them in a durable inbox, renders them as SMS and
//! sends them through a pool of AT modems.
//!
//! Layout:
//! - [`config`]: the TOML configuration, parsed once into typed values.
//! - [`inbox`]: the durable sled inbox, dedupe store, dead letters and uncertain submits.
//! - [`render`] and [`phone`]: SMS text templates and E.164 validation.
//! - [`modem`]: the sans-I/O AT dialogue (`at`), PDU encoding (`pdu`), error classes (`cms`),
//!   the serial-port driver thread (`driver`) and the pool with pacing and failover (`pool`).
//! - [`sim`]: a simulated modem speaking real AT over a pseudo-terminal.
//! - [`dispatch`]: moves inbox items to the modem pool and applies retry policy.
//! - [`memory`]: glibc allocator limits and trimming, so the RSS stays level.
//! - [`server`]: the link listener; [`metrics`]: the HTTP status/metrics endpoint.
//! - [`app`]: wires everything together for `serve`, `send-test`, `status`, `demo`.
//!
//! Logging: `error` = service impaired (modem down, store failure), `warn` = a peer or operator
//! did something wrong, `info` = lifecycle and one line per SMS outcome, `debug`/`trace` =
//! protocol detail. Phone numbers are masked above trace.

pub mod app;
pub mod config;
pub mod dispatch;
pub mod inbox;
pub mod memory;
pub mod metrics;
pub mod modem;
pub mod phone;
pub mod render;
pub mod server;
pub mod sim;
