//! Black-box tests of the `mailbell-gsm-agent` binary: real mutual TLS on loopback, real sled
//! files, simulated modems speaking AT over real pseudo-terminals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod config_errors;
mod crash;
mod faults;
mod pipeline;
#[path = "../../../tests/shared/prometheus.rs"]
mod prometheus;
mod status_http;
mod support;
