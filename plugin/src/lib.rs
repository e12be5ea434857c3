//! mailbell mail-host side: MTA intake (Stalwart MTA hook + webhooks, milter), user registry,
//! durable outbox to the GSM agent.
pub mod admin;
pub mod app;
pub mod arrival;
pub mod audit;
pub mod cli;
pub mod config;
pub mod headers;
pub mod intake;
mod journal;
pub mod milter;
pub mod ops;
pub mod outbox;
pub mod sender;
pub mod stalwart;
pub mod stalwart_api;
pub mod users;
