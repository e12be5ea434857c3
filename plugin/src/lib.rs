//! mailbell mail-host side: MTA intake (Stalwart MTA hook + webhooks, milter), user registry,
//! durable outbox to the GSM agent.
pub mod admin;
pub mod arrival;
pub mod audit;
pub mod headers;
pub mod milter;
pub mod outbox;
pub mod stalwart;
pub mod users;
