//! From an arrival to notices on the wire: [`arrival`] (what the MTA endpoints hand over),
//! [`intake`] (who is notified, recorded durably before the MTA gets its answer), the
//! [`outbox`] with its write-ahead [`journal`], and the [`sender`] that hands notices to the
//! link and retires them on the agent's acknowledgement.
pub mod arrival;
pub mod intake;
pub(crate) mod journal;
pub mod outbox;
pub mod sender;
