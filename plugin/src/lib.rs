//! mailbell mail-host side (built out in the intake issue).
pub mod outbox;
