//! The operator's side: the admin HTTP API ([`api`]: users), the operator routes ([`ops`]:
//! queue, audit log, metrics, status) and the `mailbell` command line ([`cli`]), which acts
//! through the running daemon's API or, with the daemon stopped, on the stores directly
//! ([`ownership`]: file modes, and who may open them).
pub mod api;
pub mod cli;
pub mod ops;
pub mod ownership;
