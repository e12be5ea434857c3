//! mailbell mail-host side: MTA intake (Stalwart MTA hook + webhooks, milter), user registry,
//! durable outbox to the GSM agent.
//!
//! Grouped by concern; the data flows top to bottom and imports only point down:
//!
//! - [`mta`]: the MTA endpoints (Stalwart MTA hook and webhooks, the Stalwart API client, the
//!   milter) and header decoding. They turn what the MTA says into an [`notify::arrival`].
//! - [`notify`]: from an arrival to notices on the wire: intake (who gets a notice), the
//!   durable outbox and its journal, and the sender that hands notices to the link.
//! - [`admin`]: the admin HTTP API, the operator routes (queue, log, metrics, status) and the
//!   `mailbell` CLI.
//! - [`retrieval`]: the POP3/IMAP retrieval proxy's sans-I/O protocol cores (login, capability
//!   rewriting, metering) and the PROXY v2 header it opens backend connections with.
//! - [`billing`]: traffic billing; so far the ledger of record (SQLite, double-entry,
//!   two-phase transfers, hash chain, verify) and the thread that owns it.
//! - The stores the others write to: the user registry ([`users`]), the audit log
//!   ([`audit`]) and the meter store ([`meter`], what the retrieval proxy's sessions
//!   retrieved, for billing).
//! - [`config`] (the TOML file) and [`app`] (which starts everything) sit on top.
pub mod admin;
pub mod app;
pub mod audit;
pub mod bearer;
pub mod billing;
pub mod config;
pub mod meter;
pub mod mta;
pub mod notify;
pub mod policy;
pub mod retrieval;
pub mod users;
