//! The operator's side: the admin HTTP API ([`api`]: users), the operator routes ([`ops`]:
//! queue, audit log, metrics, status), the ledger's ([`billing`]: top-ups, tariffs, verify; [`billing_reports`]: statements,
//! usage reports, unbilled deliveries), the meter store's records ([`meter`]: `GET
//! /admin/v1/meter`, `mailbell meter list`) and the `mailbell` command line ([`cli`]), which acts
//! through the running daemon's API or, with the daemon stopped, on the stores directly
//! ([`ownership`]: file modes, and who may open them).
pub mod api;
pub mod billing;
pub mod billing_reports;
pub mod cli;
pub mod meter;
pub mod ops;
pub mod ownership;
