//! From an arrival to notices on the wire: [`arrival`] (what the MTA endpoints hand over),
//! [`intake`] (who is notified, recorded durably before the MTA gets its answer), the
//! [`outbox`] with its write-ahead [`journal`], and the [`sender`] that hands notices to the
//! link and retires them on the agent's acknowledgement. [`billing`] queues billing notices
//! (arrears, balance warnings) decided by the accounting run or an operator.
pub mod arrival;
pub mod billing;
pub mod intake;
pub(crate) mod journal;
pub mod outbox;
pub mod sender;
