//! Helpers shared by the mail side's black-box tests.

pub mod cli;
pub mod retrieval;
