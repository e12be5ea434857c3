//! The MTA endpoints: what Stalwart (MTA hook, webhooks, its management API) and any milter
//! MTA (Postfix, Sendmail) tell mailbell about a message, turned into arrivals for
//! [`crate::notify`].
pub mod headers;
pub mod milter;
pub mod milter_policy;
pub(crate) mod milter_wire;
pub mod stalwart;
pub mod stalwart_api;
