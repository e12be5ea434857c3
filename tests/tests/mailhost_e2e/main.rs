//! Black-box tests of the mail host: the real `mailbell` and `mailbell-gsm-agent` binaries as
//! separate processes (killed with SIGKILL where the test says so), linked over real mutual TLS
//! with one dev PKI, the agent on its simulated modem, fed by a private Postfix + swaks or by
//! indymilter-test playing the MTA. See support.rs for how the binaries are found.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod policy;
mod postfix;
mod reliability;
mod support;
