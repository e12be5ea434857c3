//! Everything that talks to a GSM modem.

pub mod at;
pub mod cms;
pub mod driver;
pub mod pdu;
pub mod pool;
pub mod submit_time;
